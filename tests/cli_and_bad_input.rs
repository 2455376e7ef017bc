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

/// Runs `script` under `sh` in new user, network and mount namespaces with a private `/tmp`
/// and `dir` as the working directory: the embedded default's fixed ports (8080, 2019), its
/// `data/markco.db` and its `/tmp/markco.pid` then touch nothing outside the test.
fn in_private_namespaces(dir: &std::path::Path, script: &str) -> std::process::Output {
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "--mount", "sh", "-ec"])
        .arg(format!("ip link set lo up\nmount -t tmpfs tmpfs /tmp\n{script}"))
        .current_dir(dir)
        .env("MARKCO", markco_bin())
        .output()
        .expect("run unshare (util-linux)");
    assert!(
        out.status.success(),
        "the namespaced script failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn embedded_default_serves_the_welcome_page() {
    // Not under /tmp, which the namespace replaces with an empty tmpfs.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    // markco with no config, then the page and the metrics fetched with curl from inside the
    // namespace (the test process cannot reach that loopback), separated by markers.
    let out = in_private_namespaces(
        dir.path(),
        r#"
"$MARKCO" run >markco.log 2>&1 &
pid=$!
# Whatever happens below, markco does not outlive the script (SIGKILL: no grace period).
trap 'kill -9 $pid 2>/dev/null' EXIT
i=0
until curl -s -o /dev/null http://127.0.0.1:8080/; do
  i=$((i+1)); [ $i -lt 600 ] || { echo "markco did not start"; cat markco.log; exit 1; }
  sleep 0.1
done
echo '--- page'
curl -sS -o page.html -w '%{http_code} %{content_type}\n' --max-time 10 http://127.0.0.1:8080/any/path
echo '--- metrics'
curl -sS -o /dev/null -w '%{http_code}\n' --max-time 10 http://127.0.0.1:2019/metrics
"#,
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let section = |name: &str| -> String {
        let start = text.find(&format!("--- {name}\n")).unwrap_or_else(|| panic!("no {name} section in {text}"));
        let rest = &text[start + name.len() + 5..];
        rest[..rest.find("\n--- ").unwrap_or(rest.len())].to_string()
    };
    let page = section("page");
    let (status, content_type) = page.trim().split_once(' ').unwrap_or_else(|| panic!("status line: {page:?}"));
    assert_eq!(status, "200", "{text}");
    assert!(content_type.starts_with("text/html"), "{text}");
    let body = std::fs::read_to_string(dir.path().join("page.html")).expect("the page curl saved");
    assert!(body.contains("markco is running"), "{body}");
    assert!(body.contains("--config"), "tells how to configure: {body}");
    assert_eq!(section("metrics").trim(), "200", "{text}");
    // The embedded default's SQLite database lands in the working directory, here the temp dir.
    assert!(dir.path().join("data/markco.db").exists(), "data/markco.db in the working directory");
}

fn status_of(raw: &[u8]) -> Option<u16> {
    parse_response(raw).map(|r| r.status)
}

/// Sends `bytes` from a second thread while reading the answer to the server's close.
fn exchange_while_sending(addr: std::net::SocketAddr, bytes: Vec<u8>, timeout: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(timeout)).expect("timeout");
    let mut w = s.try_clone().expect("clone socket");
    // The server may close before everything is sent; that write error is expected.
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&bytes);
    });
    let out = read_to_close(&mut s).expect("an answer, then the connection closed");
    let _ = writer.join();
    out
}

/// Reads until the server closes or resets the connection and returns how many bytes came;
/// the socket's read timeout passing (the server holding the connection) fails the test.
fn read_or_reset(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("the connection was not closed ({e}) after {got:?}"),
        }
    }
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

    // Headers over Pingora's hard limit (1 MiB): refused, not buffered without end. The
    // server answers before the client is done sending, so send from another thread.
    let huge = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "a".repeat(2 * 1024 * 1024));
    let raw = exchange_while_sending(m.http, huge.into_bytes(), t);
    // Pingora itself answers 400 past its hard limit, before markco sees the request; an
    // answer is required either way (a timeout or a bare close fails).
    assert!(
        matches!(status_of(&raw), Some(400) | Some(431)),
        "{}",
        String::from_utf8_lossy(&raw[..raw.len().min(200)])
    );

    // Content-Length and Transfer-Encoding together: refused (request smuggling).
    let smuggle = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    // raw_exchange fails unless markco closes the connection after its 400.
    let raw = raw_exchange(m.http, smuggle, t).expect("the connection is closed after the 400");
    let text = String::from_utf8_lossy(&raw);
    assert_eq!(status_of(&raw), Some(400), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "exactly one response, nothing served after it: {text}");
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
    let got = read_or_reset(&mut s);
    let waited = started.elapsed();
    assert!(
        got.is_empty() || status_of(&got).is_some_and(|s| s >= 400),
        "slow client got a response it should not: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(waited < Duration::from_secs(6), "slow client held the connection for {waited:?}");

    // A new connection that sends nothing is cut too, with a 408 (it may still be a client that
    // is merely slow to start).
    let mut idle = TcpStream::connect(m.http).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let started = Instant::now();
    let got = read_or_reset(&mut idle);
    assert_eq!(status_of(&got), Some(408), "{:?}", String::from_utf8_lossy(&got));
    assert!(started.elapsed() < Duration::from_secs(6), "an idle connection held for {:?}", started.elapsed());

    // After all of it the gateway still serves, and said what it refused.
    let r = http_get(m.http, "/hello", &[]).expect("get");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["name"], "app");
    let metrics = m.metrics();
    for reason in ["header_too_large", "content_length_and_transfer_encoding"] {
        let v = metric_value(&metrics, "markco_http_bad_requests_total", &[("reason", reason)]);
        assert!(v.is_some_and(|v| v >= 1.0), "markco_http_bad_requests_total{{reason={reason:?}}} = {v:?}: {metrics}");
    }
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
    eventually(Duration::from_secs(20), "access log line", || m.log().contains("/docs/page"));
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
    eventually(Duration::from_secs(20), "access log line", || m.log().contains("/j?"));
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

/// The harness's answer to the `free_port` race: a port taken between choosing and binding is
/// recognised as such (so `Markco::start` retries on new ports) rather than failing the test.
#[test]
fn a_taken_port_is_recognised_for_a_retry() {
    // markco's own check fails on the taken port before it binds anything.
    let up = Upstream::start("app");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut ports = Ports::free();
    ports.http = taken.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    match Markco::try_start_in(dir, ports, &simple_config(&up, ""), &[]) {
        Ok(_) => panic!("markco started on a taken port"),
        // The directory comes back for the next attempt.
        Err(dir) => assert_eq!(dir.path(), path),
    }
}
