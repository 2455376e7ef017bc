//! The operator commands against a running markco: `status`, `routes`, `workspaces`, `certs`,
//! `route disable|enable`, `workspace stop`, through the admin API with the config's token;
//! tables, `--json`, and exit codes (1: answered but unhealthy or refused, 3: unreachable or
//! wrong token).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const TOKEN: &str = "op-token-0123456789abcdef";

const CONFIG: &str = r#"
[server]
http = "{http}"
https = "{https}"
redirect_to_https = false
admin = "{admin}"
admin_token_file = "admin.token"
upgrade_sock = "{dir}/upgrade.sock"
pid_file = "{dir}/markco.pid"

[database]
url = "sqlite://{dir}/markco.db"

[[health_check]]
name = "auth"
url = "http://{auth}/health"
interval = "200ms"
timeout = "500ms"
disable_route = "login"

[[site]]
hosts = ["secure.test"]
tls = { cert = "{dir}/site.pem", key = "{dir}/site.key" }

  [[site.route]]
  name = "login"
  match = ["/login"]
  proxy = "{auth}"

  [[site.route]]
  name = "api"
  match = ["/api/*"]
  proxy = "{api}"

  [[site.route]]
  name = "workspace"
  match = ["/u/*"]
  workspace = true
"#;

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn markco(args: &[&str], config: &Path) -> Out {
    let out = Command::new(markco_bin()).args(args).arg("--config").arg(config).output().expect("run markco");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn row<'a>(table: &'a str, first_cells: &[&str]) -> Option<&'a str> {
    table.lines().find(|l| {
        let cells: Vec<&str> = l.split_whitespace().collect();
        cells.len() >= first_cells.len() && cells[..first_cells.len()] == *first_cells
    })
}

#[test]
fn operator_commands_against_a_running_gateway() {
    let auth = Upstream::start("auth");
    let api = Upstream::start("api");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("admin.token"), format!("{TOKEN}\n")).expect("token");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["secure.test".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    std::fs::write(dir.path().join("site.pem"), cert.pem()).expect("cert");
    std::fs::write(dir.path().join("site.key"), key.serialize_pem()).expect("key");
    let template = CONFIG.replace("{auth}", &auth.addr.to_string()).replace("{api}", &api.addr.to_string());
    let mut auth = auth;
    let m = Markco::start_in(dir, Ports::free(), &template, &[]);
    let cfg = m.config_path.clone();
    let bearer = format!("Bearer {TOKEN}");
    let host = [("Host", "secure.test")];

    // A workspace registered through the admin API (no containers here).
    let editor = Upstream::start("editor");
    let runtime = Upstream::start("runtime");
    let body = serde_json::json!({"editor": editor.addr.to_string(), "runtime": runtime.addr.to_string()}).to_string();
    let r = request(
        m.admin,
        "PUT",
        "/api/admin/workspaces/0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
        &[("Authorization", &bearer), ("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .expect("PUT workspace");
    assert_eq!(r.status, 200, "{}", r.body_text());
    eventually(Duration::from_secs(10), "the auth health check passes", || markco(&["status"], &cfg).code == Some(0));

    // status: everything fine.
    let s = markco(&["status"], &cfg);
    assert_eq!(s.code, Some(0), "{}{}", s.stdout, s.stderr);
    assert!(
        s.stdout.lines().next().is_some_and(|l| l.contains(": ok") && l.contains(&format!("pid {}", m.pid()))),
        "{}",
        s.stdout
    );
    assert!(s.stdout.contains("routes      3 in 1 site(s)"), "{}", s.stdout);
    assert!(s.stdout.contains("workspaces  1 (1 running)"), "{}", s.stdout);
    assert!(s.stdout.contains("next expiry secure.test"), "{}", s.stdout);
    assert!(row(&s.stdout, &["health", "auth", "ok"]).is_some(), "{}", s.stdout);
    let j = markco(&["status", "--json"], &cfg);
    let v: serde_json::Value = serde_json::from_str(&j.stdout).expect("status --json is JSON");
    assert_eq!(v["status"]["status"], "ok");
    assert_eq!(v["workspaces"]["workspaces"][0]["user_id"], "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");

    // routes: a table, then a route switched off and on from the command line.
    let s = markco(&["routes"], &cfg);
    assert_eq!(s.code, Some(0), "{}", s.stderr);
    assert!(row(&s.stdout, &["SITE", "ROUTE", "MATCH", "ACTION", "TARGET", "STATE"]).is_some(), "{}", s.stdout);
    let api_row = row(&s.stdout, &["secure.test", "api", "/api/*", "proxy"]).unwrap_or_else(|| panic!("{}", s.stdout));
    assert!(api_row.contains(&api.addr.to_string()) && api_row.ends_with(" on"), "{api_row}");
    let s = markco(&["route", "disable", "api"], &cfg);
    assert_eq!((s.code, s.stdout.trim()), (Some(0), "route api: off (503 with Retry-After)"), "{}", s.stderr);
    let r = http_get(m.http, "/api/x", &host).expect("get");
    assert_eq!(r.status, 503, "a disabled route answers 503: {}", r.body_text());
    let s = markco(&["routes"], &cfg);
    assert!(row(&s.stdout, &["secure.test", "api"]).is_some_and(|l| l.contains("OFF")), "{}", s.stdout);
    let s = markco(&["status"], &cfg);
    assert!(s.stdout.contains("OFF: api"), "status names the route that is off: {}", s.stdout);
    let s = markco(&["route", "enable", "api"], &cfg);
    assert_eq!(s.code, Some(0), "{}", s.stderr);
    let r = http_get(m.http, "/api/x", &host).expect("get");
    assert_eq!(r.status, 200, "{}", r.body_text());
    let s = markco(&["route", "disable", "no-such-route"], &cfg);
    assert_eq!(s.code, Some(1), "an unknown route is exit 1");
    assert!(s.stderr.contains("no route named") && s.stderr.contains("markco routes"), "{}", s.stderr);

    // workspaces and certs.
    let s = markco(&["workspaces"], &cfg);
    assert_eq!(s.code, Some(0), "{}", s.stderr);
    let w =
        row(&s.stdout, &["0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "running"]).unwrap_or_else(|| panic!("{}", s.stdout));
    assert!(w.contains(&editor.addr.to_string()) && w.contains(&runtime.addr.to_string()), "{w}");
    let s = markco(&["certs"], &cfg);
    assert_eq!(s.code, Some(0), "{}", s.stderr);
    assert!(row(&s.stdout, &["secure.test", "file"]).is_some(), "{}", s.stdout);
    let j = markco(&["certs", "--json"], &cfg);
    let v: serde_json::Value = serde_json::from_str(&j.stdout).expect("JSON");
    assert_eq!(v["certificates"][0]["host"], "secure.test");

    // Stopping a workspace markco does not manage (no [workspaces]) is refused, with the reason.
    let s = markco(&["workspace", "stop", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"], &cfg);
    assert_eq!(s.code, Some(1), "{}{}", s.stdout, s.stderr);
    assert!(s.stderr.contains("[workspaces]"), "{}", s.stderr);

    // A failing health check: status exits 1 and says which; the route it guards is off.
    let _ = auth.proc.child.kill();
    let _ = auth.proc.child.wait();
    eventually(Duration::from_secs(10), "status notices the failing check", || {
        markco(&["status"], &cfg).code == Some(1)
    });
    let s = markco(&["status"], &cfg);
    assert!(s.stdout.lines().next().is_some_and(|l| l.contains("DEGRADED")), "{}", s.stdout);
    assert!(
        row(&s.stdout, &["health", "auth", "FAILING"]).is_some_and(|l| l.contains("route login is off")),
        "{}",
        s.stdout
    );

    // A wrong token and a stopped gateway: exit 3, with what to do.
    let other = m.dir.path().join("other.toml");
    std::fs::write(m.dir.path().join("wrong.token"), "not-the-token\n").expect("token");
    let text = std::fs::read_to_string(&cfg).expect("config").replace("\"admin.token\"", "\"wrong.token\"");
    std::fs::write(&other, text).expect("config");
    let s = markco(&["routes"], &other);
    assert_eq!(s.code, Some(3), "{}", s.stderr);
    assert!(s.stderr.contains("refused the token") && s.stderr.contains("admin_token_file"), "{}", s.stderr);
    let (dir, _) = m.stop();
    let s = markco(&["status"], &dir.path().join("markco.toml"));
    assert_eq!(s.code, Some(3), "{}", s.stderr);
    assert!(s.stderr.contains("cannot reach the admin API"), "{}", s.stderr);
    let s = markco(&["status"], Path::new("/nonexistent/markco.toml"));
    assert_eq!(s.code, Some(2), "{}", s.stderr);
}
