//! The command line (`check`, `version`, the embedded default), bad input on the HTTP listener,
//! and what the logs may and may not contain.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn simple_config(upstream: &Upstream, extra_server: &str) -> String {
    format!(
        r#"
[server]
http = "{{http}}"
admin = "{{admin}}"
upgrade_sock = "{{dir}}/upgrade.sock"
pid_file = "{{dir}}/markco.pid"
{extra_server}

[[site]]
hosts = ["*"]

  [[site.route]]
  name = "app"
  match = ["/*"]
  proxy = "{}"
"#,
        upstream.addr
    )
}

#[test]
fn check_reports_file_line_column_and_help() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nhttp = \"127.0.0.1:8080\"\n\n[[site]]\nhosts = [\"a.test\"]\n  [[site.route]]\n  match = [\"/x\"]\n  proxy = \"127.0.0.1:3000\"\n  static = \"/srv\"\n",
    )
    .expect("write");
    let out = Command::new(markco_bin()).args(["check", "--config"]).arg(&bad).output().expect("run check");
    assert!(!out.status.success(), "a bad config must fail the check");
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!("{}:6:", bad.display());
    assert!(err.contains(&want), "stderr names file and line ({want}): {err}");
    assert!(err.contains("several actions"), "says what is wrong: {err}");
    assert!(err.contains("help:"), "says how to fix it: {err}");

    // A syntax error: line and column of the bad token.
    std::fs::write(&bad, "[server]\nhttp = 127.0.0.1:8080\n").expect("write");
    let out = Command::new(markco_bin()).args(["check", "--config"]).arg(&bad).output().expect("run check");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:2:", bad.display())), "{err}");

    // A missing file.
    let out = Command::new(markco_bin()).args(["check", "--config", "/nonexistent/markco.toml"]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the config file"));

    // The shipped example is valid.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/markco.example.toml");
    let out = Command::new(markco_bin()).args(["check", "--config", example]).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("15 routes"));
}

#[test]
fn version_prints_the_version() {
    let out = Command::new(markco_bin()).arg("version").output().expect("run");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("markco {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn run_refuses_a_bad_config_and_a_taken_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nhttps_typo = 1\n").expect("write");
    let out = Command::new(markco_bin()).args(["run", "--config"]).arg(&bad).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(":2:"));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let cfg = dir.path().join("taken.toml");
    std::fs::write(&cfg, format!("[server]\nhttp = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{}\"\n", free_port()))
        .expect("write");
    let out = Command::new(markco_bin()).args(["run", "--config"]).arg(&cfg).output().expect("run");
    assert!(!out.status.success(), "must not start on a taken port");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "names the address: {err}");
}

#[test]
fn embedded_default_serves_the_welcome_page() {
    // The embedded default listens on the fixed ports 8080 and 2019.
    if TcpStream::connect("127.0.0.1:8080").is_ok() || TcpStream::connect("127.0.0.1:2019").is_ok() {
        panic!("ports 8080/2019 are taken on this machine; the embedded-default test needs them");
    }
    let child = Command::new(markco_bin())
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start");
    let _p = Proc { child };
    let http = "127.0.0.1:8080".parse().expect("addr");
    eventually(Duration::from_secs(15), "embedded default up", || http_get(http, "/", &[]).is_ok());
    let r = http_get(http, "/any/path", &[]).expect("get");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap_or("").starts_with("text/html"));
    let body = r.body_text();
    assert!(body.contains("markco is running"), "{body}");
    assert!(body.contains("--config"), "tells how to configure: {body}");
    let metrics = http_get("127.0.0.1:2019".parse().expect("addr"), "/metrics", &[]).expect("metrics");
    assert_eq!(metrics.status, 200);
}

fn status_of(raw: &[u8]) -> Option<u16> {
    parse_response(raw).map(|r| r.status)
}

#[test]
fn bad_requests_are_refused_cleanly() {
    let up = Upstream::start("app");
    let m = Markco::start(&simple_config(&up, "header_timeout = \"1s\"\nmax_header_bytes = 8192"));
    let t = Duration::from_secs(5);

    // A request line that is not HTTP.
    let raw = raw_exchange(m.http, b"GARBAGE\r\n\r\n", t).expect("io");
    assert_eq!(status_of(&raw), Some(400), "{}", String::from_utf8_lossy(&raw));

    // A header name with a space in it.
    let raw = raw_exchange(m.http, b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n", t).expect("io");
    assert_eq!(status_of(&raw), Some(400), "{}", String::from_utf8_lossy(&raw));

    // A malformed percent-escape in the path.
    let raw = raw_exchange(m.http, b"GET /a%zz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", t).expect("io");
    assert_eq!(status_of(&raw), Some(400), "{}", String::from_utf8_lossy(&raw));

    // Headers over our limit: 431.
    let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(20_000));
    let raw = raw_exchange(m.http, big.as_bytes(), t).expect("io");
    assert_eq!(status_of(&raw), Some(431), "{}", String::from_utf8_lossy(&raw));

    // Headers over Pingora's hard limit (1 MiB): refused, not buffered without end.
    let huge = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "a".repeat(2 * 1024 * 1024));
    let raw = raw_exchange(m.http, huge.as_bytes(), t).unwrap_or_default();
    assert!(
        matches!(status_of(&raw), Some(400) | Some(431) | None),
        "{}",
        String::from_utf8_lossy(&raw[..raw.len().min(200)])
    );

    // Content-Length and Transfer-Encoding together: refused (request smuggling).
    let smuggle = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let raw = raw_exchange(m.http, smuggle, t).expect("io");
    let text = String::from_utf8_lossy(&raw);
    assert_eq!(status_of(&raw), Some(400), "{text}");
    assert!(!text.contains("/smuggled"), "the smuggled request must not be served: {text}");

    // Two different Content-Lengths: refused.
    let raw = raw_exchange(
        m.http,
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        t,
    )
    .expect("io");
    assert_eq!(status_of(&raw), Some(400), "{}", String::from_utf8_lossy(&raw));

    // A client that never finishes its header is cut by the header timeout (1 s here).
    let mut s = TcpStream::connect(m.http).expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").expect("write");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap_or(0);
    let waited = started.elapsed();
    assert!(
        n == 0 || status_of(&buf[..n]).is_some_and(|s| s >= 400),
        "slow client got a response it should not: {:?}",
        &buf[..n]
    );
    assert!(waited < Duration::from_secs(4), "slow client held the connection for {waited:?}");

    // A new connection that sends nothing is cut too, with a 408 (it may still be a client that
    // is merely slow to start).
    let mut idle = TcpStream::connect(m.http).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let started = Instant::now();
    let n = idle.read(&mut buf).expect("the 408 arrives before the read timeout");
    assert_eq!(status_of(&buf[..n]), Some(408), "{:?}", String::from_utf8_lossy(&buf[..n]));
    assert!(started.elapsed() < Duration::from_secs(4));

    // After all of it the gateway still serves, and said what it refused.
    let r = http_get(m.http, "/hello", &[]).expect("get");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["name"], "app");
    let metrics = m.metrics();
    assert!(
        metric_value(&metrics, "markco_http_bad_requests_total", &[("reason", "header_too_large")]).unwrap_or(0.0)
            >= 1.0,
        "{metrics}"
    );
    assert!(
        metric_value(&metrics, "markco_http_bad_requests_total", &[("reason", "content_length_and_transfer_encoding")])
            .unwrap_or(0.0)
            >= 1.0,
        "{metrics}"
    );
    assert!(!m.log().contains("panicked"), "{}", m.log());
}

#[test]
fn access_log_has_the_request_and_no_credentials() {
    let up = Upstream::start("app");
    let m = Markco::start(&simple_config(&up, ""));
    let r = http_get(
        m.http,
        "/docs/page?token=querysecret123&a=1",
        &[("Authorization", "Bearer headersecret456"), ("Cookie", "session_token=cookiesecret789")],
    )
    .expect("get");
    assert_eq!(r.status, 200);
    // The upstream got the credentials (it needs them), the log must not have them.
    assert_eq!(r.json()["headers"]["authorization"], "Bearer headersecret456");
    eventually(Duration::from_secs(5), "access log line", || m.log().contains("/docs/page"));
    let log = m.log();
    let line = log.lines().find(|l| l.contains("/docs/page")).expect("line");
    for secret in ["querysecret123", "headersecret456", "cookiesecret789"] {
        assert!(!log.contains(secret), "log leaks {secret}: {line}");
    }
    for want in ["GET", "token=REDACTED", "status=200", "route=\"app\"", &up.addr.to_string(), "duration_ms="] {
        assert!(line.contains(want), "access line lacks {want}: {line}");
    }
}

#[test]
fn json_logs_are_one_object_per_line() {
    let up = Upstream::start("app");
    let m = Markco::start_with_args(&simple_config(&up, ""), &["--log-format", "json"]);
    assert_eq!(http_get(m.http, "/j?token=zzsecret", &[]).expect("get").status, 200);
    eventually(Duration::from_secs(5), "access log line", || m.log().contains("/j?"));
    let log = m.log();
    let mut access = None;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["uri"].as_str().is_some_and(|u| u.starts_with("/j?")) {
            access = Some(v);
        }
    }
    let v = access.expect("access log line");
    assert_eq!(v["status"], 200);
    assert_eq!(v["route"], "app");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["uri"], "/j?token=REDACTED");
    assert!(!log.contains("zzsecret"));
}
