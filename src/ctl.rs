//! Operator commands for a running gateway (`markco status`, `routes`, `workspaces`, `certs`,
//! `route disable|enable`, `workspace stop`): calls to the admin API named in the config, with
//! the token from its `admin_token_file`, shown as a table or as JSON.
//!
//! Exit codes: 0 fine; 1 the gateway answered but something is wrong (a failing health check, a
//! certificate close to expiry, an unknown route, a refused stop); 2 bad usage or config; 3 the
//! admin API cannot be reached or refuses the token.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;

use crate::config::Config;

/// A certificate closer than this to its expiry makes `status` and `certs` exit 1.
const CERT_WARN_DAYS: i64 = 14;
const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BODY: usize = 64 * 1024 * 1024;
/// A name in one path segment: everything but RFC 3986's unreserved characters is escaped.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

pub enum Op {
    Status,
    Routes,
    Workspaces,
    Certs,
    Route { name: String, disable: bool },
    WorkspaceStop { user: String },
}

enum Failure {
    /// Cannot reach, or not allowed: exit 3.
    Unreachable(String),
    /// Reached; the gateway said no: exit 1.
    Refused(String),
}

struct Admin {
    addr: SocketAddr,
    token: Option<String>,
}

impl Admin {
    async fn call(&self, method: Method, path: &str) -> Result<Value, Failure> {
        match tokio::time::timeout(TIMEOUT, self.exchange(method.clone(), path)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Unreachable(format!(
                "{method} http://{}{path}: no answer within {TIMEOUT:?} (is markco overloaded or stopped?)",
                self.addr
            ))),
        }
    }

    async fn exchange(&self, method: Method, path: &str) -> Result<Value, Failure> {
        let at = format!("{method} http://{}{path}", self.addr);
        let stream = tokio::net::TcpStream::connect(self.addr).await.map_err(|e| {
            Failure::Unreachable(format!(
                "cannot reach the admin API at {}: {e} (is markco running with this config? `[server] admin` names the address)",
                self.addr
            ))
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failure::Unreachable(format!("{at}: {e}")))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.addr.to_string())
            .header(header::USER_AGENT, concat!("markco-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::new())).map_err(|e| Failure::Refused(format!("{at}: bad request: {e}")))?;
        let resp = sender.send_request(req).await.map_err(|e| Failure::Unreachable(format!("{at}: {e}")))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| Failure::Unreachable(format!("{at}: reading the answer: {e}")))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&body).map_err(|e| {
            Failure::Unreachable(format!(
                "{at}: the answer is not JSON ({e}); is {} markco's admin listener?",
                self.addr
            ))
        })?;
        let error = || value.get("error").and_then(Value::as_str).unwrap_or("").to_string();
        match status.as_u16() {
            200..=299 => Ok(value),
            401 | 403 => Err(Failure::Unreachable(format!(
                "{at}: the admin API refused the token ({}); the config's `admin_token_file` must be the one markco runs with",
                error()
            ))),
            code => Err(Failure::Refused(format!("{at}: {code}: {}", error()))),
        }
    }
}

/// Runs one operator command against the gateway `cfg` describes.
pub fn run(cfg: &Config, op: Op, json: bool) -> ExitCode {
    // A wildcard listen address is reached on loopback.
    let addr = match cfg.server.admin.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), cfg.server.admin.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), cfg.server.admin.port()),
        _ => cfg.server.admin,
    };
    let admin = Admin { addr, token: cfg.server.admin_token.clone() };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start a runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(dispatch(&admin, op, json)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(Failure::Refused(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        Err(Failure::Unreachable(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(3)
        }
    }
}

/// `Ok(false)`: answered, but not healthy.
async fn dispatch(admin: &Admin, op: Op, json: bool) -> Result<bool, Failure> {
    let now = unix_now();
    match op {
        Op::Status => {
            let status = admin.call(Method::GET, "/status").await?;
            let routes = admin.call(Method::GET, "/routes").await?;
            let workspaces = admin.call(Method::GET, "/api/admin/workspaces").await?;
            let certs = admin.call(Method::GET, "/certs").await?;
            let healthy = status["status"] == "ok";
            let certs_ok = expiring(&certs, now).is_empty();
            if json {
                let all =
                    serde_json::json!({"status": status, "routes": routes, "workspaces": workspaces, "certs": certs});
                println!("{all:#}");
            } else {
                print_status(admin.addr, &status, &routes, &workspaces, &certs, now);
            }
            Ok(healthy && certs_ok)
        }
        Op::Routes => {
            let v = admin.call(Method::GET, "/routes").await?;
            if json {
                println!("{v:#}");
            } else {
                print_routes(&v);
            }
            Ok(true)
        }
        Op::Workspaces => {
            let v = admin.call(Method::GET, "/api/admin/workspaces").await?;
            if json {
                println!("{v:#}");
            } else {
                print_workspaces(&v, now);
            }
            Ok(true)
        }
        Op::Certs => {
            let v = admin.call(Method::GET, "/certs").await?;
            if json {
                println!("{v:#}");
            } else {
                print_certs(&v, now);
            }
            let soon = expiring(&v, now);
            for host in &soon {
                eprintln!("warning: the certificate for {host} expires within {CERT_WARN_DAYS} days");
            }
            Ok(soon.is_empty())
        }
        Op::Route { name, disable } => {
            let verb = if disable { "disable" } else { "enable" };
            let path = format!("/api/admin/routes/{}/{verb}", utf8_percent_encode(&name, SEGMENT));
            let v = admin.call(Method::POST, &path).await.map_err(|e| match e {
                Failure::Refused(m) if m.contains(": 404:") => {
                    Failure::Refused(format!("{m}\nhelp: `markco routes` lists the route names"))
                }
                other => other,
            })?;
            if json {
                println!("{v:#}");
            } else {
                let state = if disable { "off (503 with Retry-After)" } else { "on" };
                println!("route {name}: {state}");
            }
            Ok(true)
        }
        Op::WorkspaceStop { user } => {
            let path = format!("/api/admin/workspaces/{}/stop", utf8_percent_encode(&user, SEGMENT));
            let v = admin.call(Method::POST, &path).await?;
            if json {
                println!("{v:#}");
            } else {
                println!("workspace of {user}: stopped");
            }
            Ok(true)
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Hosts whose certificate expires within [`CERT_WARN_DAYS`].
fn expiring(certs: &Value, now: i64) -> Vec<String> {
    list(certs, "certificates")
        .iter()
        .filter(|c| c["not_after"].as_i64().is_some_and(|t| t - now < CERT_WARN_DAYS * 86400))
        .map(|c| str_of(&c["host"]))
        .collect()
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key).and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// "3d", "5h", "12m", "40s": how long ago or ahead.
fn span(secs: i64) -> String {
    let s = secs.abs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// Prints rows under a header, columns as wide as their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// Control characters in names or upstream answers never reach the terminal as such.
fn clean(s: String) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

fn print_routes(v: &Value) {
    let mut rows = Vec::new();
    for site in list(v, "sites") {
        let hosts: Vec<String> = list(site, "hosts").iter().map(str_of).collect();
        for r in list(site, "routes") {
            let patterns: Vec<String> = list(r, "match").iter().map(str_of).collect();
            let target = match (&r["target"], &r["status"]) {
                (Value::Null, Value::Null) => "-".to_string(),
                (t, Value::Null) => str_of(t),
                (Value::Null, s) => str_of(s),
                (t, s) => format!("{} ({})", str_of(t), str_of(s)),
            };
            // Who holds a route off, when the gateway says so (holders), else just off.
            let holders: Vec<String> = list(r, "holders").iter().map(str_of).collect();
            let state = match (r["disabled"].as_bool().unwrap_or(false), holders.is_empty()) {
                (false, true) => "on".to_string(),
                (_, false) => format!("OFF ({})", holders.join(", ")),
                (true, true) => "OFF".to_string(),
            };
            rows.push(
                [hosts.join(","), str_of(&r["name"]), patterns.join(" "), str_of(&r["action"]), target, state]
                    .into_iter()
                    .map(clean)
                    .collect(),
            );
        }
    }
    table(&["SITE", "ROUTE", "MATCH", "ACTION", "TARGET", "STATE"], &rows);
    println!("generation {}", str_of(&v["generation"]));
}

fn print_workspaces(v: &Value, now: i64) {
    let rows: Vec<Vec<String>> = list(v, "workspaces")
        .iter()
        .map(|w| {
            let addr = |h: &str, p: &str| format!("{}:{}", str_of(&w[h]), str_of(&w[p]));
            let updated = w["updated_at"].as_i64().filter(|t| *t > 0).map(|t| format!("{} ago", span(now - t)));
            [
                str_of(&w["user_id"]),
                str_of(&w["state"]),
                addr("editor_host", "editor_port"),
                addr("runtime_host", "runtime_port"),
                updated.unwrap_or_else(|| "-".into()),
            ]
            .into_iter()
            .map(clean)
            .collect()
        })
        .collect();
    table(&["USER", "STATE", "EDITOR", "RUNTIME", "CHANGED"], &rows);
    println!("{} workspace(s)", rows.len());
}

fn print_certs(v: &Value, now: i64) {
    let rows: Vec<Vec<String>> = list(v, "certificates")
        .iter()
        .map(|c| {
            let expires = match c["not_after"].as_i64() {
                Some(t) if t < now => format!("EXPIRED {} ago", span(now - t)),
                Some(t) if t - now < CERT_WARN_DAYS * 86400 => format!("in {} (SOON)", span(t - now)),
                Some(t) => format!("in {}", span(t - now)),
                None => "-".into(),
            };
            [str_of(&c["host"]), str_of(&c["source"]), str_of(&c["issuer"]), expires].into_iter().map(clean).collect()
        })
        .collect();
    table(&["HOST", "SOURCE", "ISSUER", "EXPIRES"], &rows);
    println!("{} certificate(s)", rows.len());
}

fn print_status(addr: SocketAddr, status: &Value, routes: &Value, workspaces: &Value, certs: &Value, now: i64) {
    let healthy = status["status"] == "ok";
    println!(
        "markco {} (pid {}) at {addr}: {}",
        str_of(&status["version"]),
        str_of(&status["pid"]),
        if healthy { "ok" } else { "DEGRADED" }
    );
    let all: Vec<&Value> = list(routes, "sites").iter().flat_map(|s| list(s, "routes")).collect();
    let off: Vec<String> = all.iter().filter(|r| r["disabled"] == true).map(|r| clean(str_of(&r["name"]))).collect();
    println!(
        "routes      {} in {} site(s), generation {}{}",
        all.len(),
        list(routes, "sites").len(),
        str_of(&routes["generation"]),
        if off.is_empty() { String::new() } else { format!("; OFF: {}", off.join(", ")) }
    );
    let ws = list(workspaces, "workspaces");
    let running = ws.iter().filter(|w| w["state"] == "running").count();
    println!("workspaces  {} ({running} running)", ws.len());
    let cs = list(certs, "certificates");
    let next = cs.iter().filter_map(|c| Some((c["not_after"].as_i64()?, str_of(&c["host"])))).min();
    match next {
        Some((t, host)) => println!("certs       {}, next expiry {} in {}", cs.len(), clean(host), span(t - now)),
        None => println!("certs       none"),
    }
    let checks = list(status, "health_checks");
    if checks.is_empty() {
        println!("health      no checks configured");
    }
    for (i, c) in checks.iter().enumerate() {
        let label = if i == 0 { "health" } else { "" };
        let state = if c["passing"] == true { "ok" } else { "FAILING" };
        let disables = match &c["disables_route"] {
            Value::String(r) if c["passing"] != true => format!(" (route {} is off)", clean(r.clone())),
            _ => String::new(),
        };
        println!("{label:<11} {:<10} {state:<8} {}{disables}", clean(str_of(&c["name"])), clean(str_of(&c["url"])));
    }
    for host in expiring(certs, now) {
        println!("warning: the certificate for {host} expires within {CERT_WARN_DAYS} days");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_cleaning() {
        assert_eq!(span(30), "30s");
        assert_eq!(span(-600), "10m");
        assert_eq!(span(3 * 86400), "3d");
        assert_eq!(clean("a\x1b[31mb\n".into()), "a?[31mb?");
        let certs = serde_json::json!({"certificates": [{"host": "a", "not_after": 100 + 86400}, {"host": "b", "not_after": 100 + 90 * 86400}]});
        assert_eq!(expiring(&certs, 100), ["a"]);
    }
}
