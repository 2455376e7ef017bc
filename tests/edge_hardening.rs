//! Edge hardening as a client and an upstream see it: request targets, upgrade tunnels, the
//! whole-header deadline, framing, connection limits and rate limits. The upstream here is a
//! small recorder written in this file: it answers every request and keeps what it received, so
//! each test can assert that a forbidden request never reached it. It is deliberately hostile:
//! it answers 101 with `Upgrade: h2c` to anything that asks for an upgrade.

#[allow(clippy::while_let_loop)]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// One request as the recorder read it.
#[derive(Debug, Clone)]
struct Seen {
    line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }
}

/// The recording upstream.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Raw bytes received after it answered 101 (what a tunnel would carry).
    tunnelled: Arc<Mutex<Vec<u8>>>,
}

impl Recorder {
    fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind recorder");
        let addr = listener.local_addr().expect("recorder addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tunnelled = Arc::new(Mutex::new(Vec::new()));
        let (s, t) = (seen.clone(), tunnelled.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (s, t) = (s.clone(), t.clone());
                std::thread::spawn(move || serve_recorded(conn, s, t));
            }
        });
        Recorder { addr, seen, tunnelled }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("recorder lock").clone()
    }

    fn saw_target_containing(&self, needle: &str) -> bool {
        self.seen().iter().any(|s| s.line.contains(needle))
            || String::from_utf8_lossy(&self.tunnelled.lock().expect("lock")).contains(needle)
    }
}

fn serve_recorded(mut conn: TcpStream, seen: Arc<Mutex<Vec<Seen>>>, tunnelled: Arc<Mutex<Vec<u8>>>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // Read one request head.
        let head_len = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(&buf[..head_len]), Ok(httparse::Status::Complete(_))) {
            return;
        }
        let line = format!("{} {}", req.method.unwrap_or(""), req.path.unwrap_or(""));
        let hdrs: Vec<(String, String)> =
            req.headers.iter().map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).to_string())).collect();
        let upgrade = hdrs.iter().any(|(k, _)| k.eq_ignore_ascii_case("upgrade"));
        let len: usize = hdrs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        buf.drain(..head_len);
        while buf.len() < len {
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..len).collect();
        seen.lock().expect("lock").push(Seen { line, headers: hdrs, body });
        if upgrade {
            // Hostile: switch to h2c whatever was asked, then keep everything that follows.
            let _ = conn.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n");
            tunnelled.lock().expect("lock").extend_from_slice(&buf);
            loop {
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => tunnelled.lock().expect("lock").extend_from_slice(&chunk[..n]),
                }
            }
        }
        if conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok").is_err() {
            return;
        }
    }
}

/// A deny rule before a catch-all proxy, as in the issue's probe.
fn config(upstream: SocketAddr, extra_server: &str) -> String {
    let extra_server = if extra_server.contains("header_timeout") {
        extra_server.to_string()
    } else {
        format!("header_timeout = \"2s\"\n{extra_server}")
    };
    format!(
        r#"
[server]
http = "{{http}}"
admin = "{{admin}}"
upgrade_sock = "{{dir}}/upgrade.sock"
pid_file = "{{dir}}/markco.pid"
{extra_server}

[[site]]
hosts = ["a.test"]

  [[site.route]]
  name = "deny-admin"
  match = ["/admin/*"]
  respond = "forbidden"
  status = 403

  [[site.route]]
  name = "limited"
  match = ["/limited/*"]
  proxy = "{upstream}"
  rate_limit = "5/m"

  [[site.route]]
  name = "all"
  match = ["/*"]
  proxy = "{upstream}"
"#
    )
}

/// A client connection whose reads give up after 10 s (a test waiting on markco fails rather
/// than hangs).
fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s
}

/// Sends raw bytes, reads until the server closes or `timeout`; returns what came back.
fn exchange(addr: SocketAddr, raw: &[u8], timeout: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(timeout)).expect("timeout");
    s.write_all(raw).expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn status_of(raw: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(raw);
    text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[test]
fn request_targets_that_are_not_origin_form_never_reach_the_upstream() {
    let rec = Recorder::start();
    let m = Markco::start(&config(rec.addr, ""));
    let send = |target: &str| {
        let raw = format!("GET {target} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
        exchange(m.http, raw.as_bytes(), Duration::from_secs(10))
    };
    assert_eq!(status_of(&send("/admin/secret.txt")), 403, "the deny rule itself");
    for target in [
        "admin/secret.txt",
        " /../admin/secret.txt",
        "x/../admin/secret.txt",
        "*admin/x",
        "%2Fadmin/x",
        "./admin/x",
        "\\admin/x",
        "?admin",
        "ftp://a.test/admin/x",
    ] {
        let got = send(target);
        assert_eq!(status_of(&got), 400, "target {target:?}: {}", String::from_utf8_lossy(&got));
    }
    // `*` is for OPTIONS only, and is answered by markco itself.
    assert_eq!(status_of(&send("*")), 400);
    let opts =
        exchange(m.http, b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n", Duration::from_secs(10));
    assert_eq!(status_of(&opts), 200);
    assert!(String::from_utf8_lossy(&opts).to_ascii_lowercase().contains("allow: get"), "{opts:?}");
    assert!(!rec.saw_target_containing("admin"), "the upstream saw a denied path: {:?}", rec.seen());
    assert!(rec.seen().is_empty(), "nothing was proxied: {:?}", rec.seen());

    // Absolute-form: routed on its path, sent upstream in origin-form, normalised.
    let got = send("http://a.test/admin/secret.txt");
    assert_eq!(status_of(&got), 403, "{}", String::from_utf8_lossy(&got));
    let got = send("http://a.test/x/../y/./z?q=1");
    assert_eq!(status_of(&got), 200, "{}", String::from_utf8_lossy(&got));
    let got = send("http://other.test/y");
    assert_eq!(status_of(&got), 400, "authority must match Host: {}", String::from_utf8_lossy(&got));
    let seen = rec.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].line, "GET /y/z?q=1", "the upstream gets the normalised origin-form target");
    assert!(!rec.saw_target_containing("admin"));
    // An origin-form path with dot segments: the upstream gets the path the route was chosen on.
    let got = send("/x/../y//w");
    assert_eq!(status_of(&got), 200);
    assert_eq!(rec.seen().last().map(|s| s.line.clone()).as_deref(), Some("GET /y/w"));
    let metrics = m.metrics();
    assert!(
        metric_value(&metrics, "markco_http_bad_requests_total", &[("reason", "target_form")])
            .expect("the metric is exported")
            >= 8.0,
        "refusals are counted by reason:\n{metrics}"
    );
}

#[test]
fn h2c_is_never_tunnelled_and_nothing_is_smuggled_behind_it() {
    let rec = Recorder::start();
    let m = Markco::start(&config(rec.addr, ""));
    // 1. The client asks for h2c: the upstream gets a plain request, and the next request on
    //    the connection is routed by markco (the deny rule answers it).
    let mut s = connect(m.http);
    s.write_all(
        b"GET /page HTTP/1.1\r\nHost: a.test\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    .expect("send");
    let first = read_response(&mut s);
    assert_eq!(status_of(&first), 200, "{}", String::from_utf8_lossy(&first));
    s.write_all(b"GET /admin/secret.txt HTTP/1.1\r\nHost: a.test\r\n\r\n").expect("send second");
    let second = read_response(&mut s);
    assert_eq!(status_of(&second), 403, "{}", String::from_utf8_lossy(&second));
    let seen = rec.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].header_values("upgrade").is_empty(), "Upgrade: h2c reached the upstream: {seen:?}");
    assert!(seen[0].header_values("http2-settings").is_empty(), "{seen:?}");
    assert!(
        seen[0].header_values("connection").iter().all(|v| !v.to_ascii_lowercase().contains("upgrade")),
        "{seen:?}"
    );

    // 2. A websocket request that the upstream answers with a switch to h2c: refused (502),
    //    and what the client sends next never reaches the upstream through a tunnel.
    let mut s = connect(m.http);
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .expect("send");
    let answer = read_response(&mut s);
    assert_eq!(status_of(&answer), 502, "{}", String::from_utf8_lossy(&answer));
    let _ = s.write_all(b"GET /admin/smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!rec.saw_target_containing("smuggled"), "a request was smuggled: {:?}", rec.seen());
}

#[test]
fn h2c_in_a_route_upgrades_list_is_refused_by_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("markco.toml");
    std::fs::write(
        &path,
        "[[site]]\nhosts = [\"a.test\"]\n  [[site.route]]\n  match = [\"/*\"]\n  proxy = \"127.0.0.1:9\"\n  upgrades = [\"h2c\"]\n",
    )
    .expect("write");
    let out = std::process::Command::new(markco_bin()).arg("check").arg("--config").arg(&path).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("h2c") && err.contains(":6:"), "names the problem and its line: {err}");
}

/// Reads one response (head, and a Content-Length body) without waiting for the close.
fn read_response(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= i + 4 + len {
                return buf;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => return buf,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("reading a response: {e}; got {:?}", String::from_utf8_lossy(&buf)),
        }
    }
}

#[test]
fn framing_duplicate_content_length_and_missing_host() {
    let rec = Recorder::start();
    let m = Markco::start(&config(rec.addr, ""));
    let got = exchange(
        m.http,
        b"POST /a HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5, 5\r\nConnection: close\r\n\r\nhello",
        Duration::from_secs(10),
    );
    assert_eq!(status_of(&got), 200, "{}", String::from_utf8_lossy(&got));
    let got = exchange(
        m.http,
        b"POST /b HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nworld",
        Duration::from_secs(10),
    );
    assert_eq!(status_of(&got), 200, "{}", String::from_utf8_lossy(&got));
    let got = exchange(
        m.http,
        b"POST /c HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello!",
        Duration::from_secs(10),
    );
    assert_eq!(status_of(&got), 400, "differing lengths: {}", String::from_utf8_lossy(&got));
    let seen = rec.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (s, body) in seen.iter().zip([&b"hello"[..], b"world"]) {
        assert_eq!(s.header_values("content-length"), vec!["5"], "one Content-Length upstream: {s:?}");
        assert_eq!(s.body, body);
    }
    let got = exchange(m.http, b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n", Duration::from_secs(10));
    assert_eq!(status_of(&got), 400, "HTTP/1.1 without Host: {}", String::from_utf8_lossy(&got));
    assert_eq!(rec.seen().len(), 2);
}

#[test]
fn header_deadline_is_for_the_whole_header_with_a_408() {
    let rec = Recorder::start();
    let m = Markco::start(&config(rec.addr, ""));
    // A trickler: one byte every 400 ms never completes a header.
    let mut s = TcpStream::connect(m.http).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let start = Instant::now();
    let head = b"GET /slow HTTP/1.1\r\nHost: a.test\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut got = Vec::new();
    let mut closed_at = None;
    for b in head.iter().cycle() {
        if s.write_all(&[*b]).is_err() {
            closed_at = Some(start.elapsed());
            break;
        }
        let mut chunk = [0u8; 512];
        match s.read(&mut chunk) {
            Ok(0) => {
                closed_at = Some(start.elapsed());
                break;
            }
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => {
                closed_at = Some(start.elapsed());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        if start.elapsed() > Duration::from_secs(15) {
            break;
        }
    }
    let closed_at = closed_at.expect("a trickling client is cut");
    assert!(closed_at >= Duration::from_millis(1800), "not before the deadline: {closed_at:?}");
    assert!(closed_at <= Duration::from_secs(4), "within header_timeout (2 s) + slack: {closed_at:?}");
    assert_eq!(status_of(&got), 408, "{}", String::from_utf8_lossy(&got));

    // A silent new connection gets a 408 too; an idle kept-alive one is closed quietly.
    let start = Instant::now();
    let got = exchange(m.http, b"", Duration::from_secs(10));
    assert!(start.elapsed() < Duration::from_secs(4), "{:?}", start.elapsed());
    assert_eq!(status_of(&got), 408, "{}", String::from_utf8_lossy(&got));
    let mut s = connect(m.http);
    s.write_all(b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\n").expect("send");
    assert_eq!(status_of(&read_response(&mut s)), 200);
    let start = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(start.elapsed() < Duration::from_secs(5), "idle keep-alive closed: {:?}", start.elapsed());
    assert!(rest.is_empty(), "no 408 on an idle kept-alive connection: {:?}", String::from_utf8_lossy(&rest));
    // The deadline holds for every request on a connection, not only its first: a second header
    // begun and never finished gets its 408 too.
    let mut s = connect(m.http);
    s.write_all(b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\n").expect("send");
    assert_eq!(status_of(&read_response(&mut s)), 200);
    s.write_all(b"GET /two HTTP/1.1\r\nHost: a.te").expect("send");
    let start = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(start.elapsed() < Duration::from_secs(4), "second header cut in time: {:?}", start.elapsed());
    assert_eq!(status_of(&rest), 408, "{}", String::from_utf8_lossy(&rest));
    // A head longer than the edge loop looks at (64 KiB) goes on in Pingora's reader under the
    // same clock: never finished, it is cut at the deadline too.
    let mut s = connect(m.http);
    let long = format!("GET /long HTTP/1.1\r\nHost: a.test\r\nX-Long: {}", "a".repeat(70_000));
    let start = Instant::now();
    s.write_all(long.as_bytes()).expect("send");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(start.elapsed() < Duration::from_secs(4), "long header cut in time: {:?}", start.elapsed());
    assert_eq!(status_of(&rest), 408, "{}", String::from_utf8_lossy(&rest));
    let metrics = m.metrics();
    assert!(
        metric_value(&metrics, "markco_http_header_timeouts_total", &[]).expect("the metric is exported") >= 3.0,
        "{metrics}"
    );
}

/// A connection from a given loopback source address.
fn connect_from(src: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let src: SocketAddr = format!("{src}:0").parse().expect("source addr");
    sock.bind(&src.into())?;
    sock.connect(&to.into())?;
    Ok(sock.into())
}

#[test]
fn connections_beyond_the_per_ip_limit_are_refused_at_once() {
    let rec = Recorder::start();
    let m = Markco::start(&config(rec.addr, "header_timeout = \"20s\"\nmax_connections_per_ip = 5"));
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut s = connect_from("127.0.0.2", m.http).expect("connect");
        s.write_all(b"GET /held HTTP/1.1\r\nHost: a.test\r\n\r\n").expect("send");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        assert_eq!(status_of(&read_response(&mut s)), 200);
        held.push(s);
    }
    // The sixth from the same address is closed before it is read.
    let mut s = connect_from("127.0.0.2", m.http).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let start = Instant::now();
    let _ = s.write_all(b"GET /sixth HTTP/1.1\r\nHost: a.test\r\n\r\n");
    let mut out = Vec::new();
    let r = s.read_to_end(&mut out);
    assert!(start.elapsed() < Duration::from_secs(2), "refused at once: {:?}", start.elapsed());
    assert!(out.is_empty(), "no answer for a refused connection: {r:?} {:?}", String::from_utf8_lossy(&out));
    // Another client is served.
    let mut other = connect_from("127.0.0.3", m.http).expect("connect");
    other.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    other.write_all(b"GET /other HTTP/1.1\r\nHost: a.test\r\n\r\n").expect("send");
    assert_eq!(status_of(&read_response(&mut other)), 200);
    assert!(!rec.saw_target_containing("sixth"));
    // A slot is given back when a connection closes.
    held.pop();
    eventually(Duration::from_secs(5), "a freed slot is reused", || {
        let Ok(mut s) = connect_from("127.0.0.2", m.http) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(b"GET /again HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        status_of(&out) == 200
    });
    let metrics = m.metrics();
    assert!(
        metric_value(&metrics, "markco_connections_refused_total", &[("limit", "per_ip")])
            .expect("the metric is exported")
            >= 1.0,
        "{metrics}"
    );
}

#[test]
fn rate_limit_per_client_gives_429_with_retry_after() {
    let rec = Recorder::start();
    let m = Markco::start(&config(rec.addr, ""));
    let get_from = |src: &str, path: &str| -> Vec<u8> {
        let mut s = connect_from(src, m.http).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n").as_bytes())
            .expect("send");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    };
    for i in 0..5 {
        assert_eq!(status_of(&get_from("127.0.0.2", &format!("/limited/{i}"))), 200, "request {i} within the limit");
    }
    let refused = get_from("127.0.0.2", "/limited/over");
    assert_eq!(status_of(&refused), 429, "{}", String::from_utf8_lossy(&refused));
    assert!(String::from_utf8_lossy(&refused).to_ascii_lowercase().contains("retry-after: 60"), "{refused:?}");
    assert_eq!(status_of(&get_from("127.0.0.3", "/limited/x")), 200, "another client has its own budget");
    assert_eq!(status_of(&get_from("127.0.0.2", "/other")), 200, "other routes are not limited");
    assert!(!rec.saw_target_containing("/limited/over"));
    let metrics = m.metrics();
    assert_eq!(
        metric_value(&metrics, "markco_http_rate_limited_total", &[("route", "limited")]),
        Some(1.0),
        "{metrics}"
    );
}

/// Requests without a body are served by markco's own loop, the others by Pingora's proxy,
/// which is given what the loop already read as its read buffer: one kept-alive connection
/// carries both kinds in turn, our own answers among them, and a head longer than the loop
/// looks at.
#[test]
fn one_connection_carries_requests_with_and_without_a_body_in_turn() {
    let rec = Recorder::start();
    // A long header clock, so that only an answer that ends the connection closes it early.
    let m = Markco::start(&config(rec.addr, "max_header_bytes = 200000\nheader_timeout = \"60s\""));
    let mut s = connect(m.http);
    let long = "x".repeat(100_000);
    let requests: Vec<(Vec<u8>, u16)> = vec![
        (b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\n".to_vec(), 200),
        (b"POST /two HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello".to_vec(), 200),
        (b"GET /admin/x HTTP/1.1\r\nHost: a.test\r\n\r\n".to_vec(), 403),
        (b"POST /three HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n".to_vec(), 200),
        (b"PUT /four HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n\r\nabc".to_vec(), 200),
        (format!("GET /five HTTP/1.1\r\nHost: a.test\r\nX-Long: {long}\r\n\r\n").into_bytes(), 200),
        (b"HEAD /six HTTP/1.1\r\nHost: a.test\r\n\r\n".to_vec(), 200),
        (b"GET /seven HTTP/1.1\r\nHost: a.test\r\n\r\n".to_vec(), 200),
    ];
    for (req, status) in &requests {
        s.write_all(req).expect("send on the kept-alive connection");
        let head_only = req.starts_with(b"HEAD");
        let got = if head_only {
            // No body follows a HEAD's head, whatever its Content-Length says.
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut chunk).expect("read the HEAD answer");
                assert!(n > 0, "closed after HEAD");
                buf.extend_from_slice(&chunk[..n]);
            }
            assert!(buf.ends_with(b"\r\n\r\n"), "nothing follows a HEAD's answer head: {buf:?}");
            buf
        } else {
            read_response(&mut s)
        };
        let line = String::from_utf8_lossy(req.get(..20).unwrap_or(req));
        assert_eq!(status_of(&got), *status, "{line}: {}", String::from_utf8_lossy(&got));
        let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
        assert!(!text.contains("connection: close"), "{line}: the connection stays open: {text}");
    }
    // An HTTP/1.0 request without keep-alive ends the connection after its answer.
    s.write_all(b"GET /eight HTTP/1.0\r\nHost: a.test\r\n\r\n").expect("send");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("the connection closes after an HTTP/1.0 answer");
    assert_eq!(status_of(&rest), 200, "{}", String::from_utf8_lossy(&rest));
    let seen = rec.seen();
    let lines: Vec<&str> = seen.iter().map(|s| s.line.as_str()).collect();
    assert_eq!(
        lines,
        ["GET /one", "POST /two", "POST /three", "PUT /four", "GET /five", "HEAD /six", "GET /seven", "GET /eight"]
    );
    assert_eq!(seen[1].body, b"hello");
    assert_eq!(seen[3].body, b"abc");
    assert_eq!(seen[4].header_values("x-long"), vec![long.as_str()]);

    // Pipelined requests: the first is answered whole, then the connection closes (Pingora
    // does not serve a request that came with the previous one; RFC 9112 9.3.2 lets the
    // client retry it), rather than hanging or mixing answers.
    let mut p = connect(m.http);
    p.write_all(b"GET /p1 HTTP/1.1\r\nHost: a.test\r\n\r\nGET /p2 HTTP/1.1\r\nHost: a.test\r\n\r\n").expect("send");
    let mut got = Vec::new();
    p.read_to_end(&mut got).expect("the connection closes after the first answer");
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "one answer: {text}");
    assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("ok"), "{text}");
    assert!(rec.saw_target_containing("/p1"), "{:?}", rec.seen());
    assert!(!rec.saw_target_containing("/p2"), "the pipelined request is not served: {:?}", rec.seen());
}
