//! What a client sees when time runs out: SIGTERM's graceful shutdown, 504 on a silent
//! upstream, an upstream that closes before or dies in the middle of its response, and each
//! idle timeout (upstream, websocket, client body), which must fire when the connection is idle
//! and only then.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// Bound on every websocket step and socket read: a hang fails instead of blocking the suite.
const STEP: Duration = Duration::from_secs(20);

/// One catch-all proxy route named `app` to `upstream`, with `server_extra` under `[server]`.
fn config(upstream: SocketAddr, server_extra: &str) -> String {
    format!(
        r#"[server]
http = "{{http}}"
admin = "{{admin}}"
upgrade_sock = "{{dir}}/upgrade.sock"
pid_file = "{{dir}}/markco.pid"
{server_extra}

[[site]]
hosts = ["*"]

  [[site.route]]
  name = "app"
  match = ["/*"]
  proxy = "{upstream}"
"#
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_open(addr: SocketAddr, path: &str) -> Ws {
    let (ws, resp) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(format!("ws://{addr}{path}")))
        .await
        .expect("websocket handshake in time")
        .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// Sends `text` and waits for its echo.
async fn ws_echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send on the websocket");
    loop {
        match tokio::time::timeout(STEP, ws.next()).await.expect("an echo in time") {
            Some(Ok(Message::Text(t))) => {
                assert_eq!(t.as_str(), text);
                return;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected the echo of {text:?}, got {other:?}"),
        }
    }
}

/// Waits until the websocket ends (a close frame, EOF or a reset); returns when it did.
async fn ws_wait_end(ws: &mut Ws, limit: Duration) -> Instant {
    loop {
        match tokio::time::timeout(limit, ws.next()).await {
            Err(_) => panic!("the websocket was still open after {limit:?}"),
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return Instant::now(),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Reads from `s` until EOF or a reset; a read timeout fails.
fn read_until_closed(s: &mut TcpStream, got: &mut Vec<u8>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the connection was not closed ({e}); received {:?}", String::from_utf8_lossy(got)),
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_finishes_requests_in_flight_and_closes_websockets_at_the_end_of_the_grace_period() {
    let up = Upstream::start("app");
    let grace = Duration::from_secs(5);
    let mut m = Markco::start(&config(up.addr, "grace_period = \"5s\"\nshutdown_timeout = \"1s\""));
    let rt = runtime();
    let mut ws = rt.block_on(ws_open(m.http, "/ws"));
    rt.block_on(ws_echo(&mut ws, "before"));

    // A response in flight: 3 chunks 1 s apart; the first has arrived when SIGTERM is sent.
    let mut s = TcpStream::connect(m.http).expect("connect");
    s.set_read_timeout(Some(STEP)).expect("timeout");
    s.write_all(b"GET /drip?chunks=3&interval_ms=1000 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !contains(&got, b"chunk 0\n") {
        let n = s.read(&mut buf).expect("the first chunk");
        assert!(n > 0, "closed before the first chunk: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    m.sigterm();
    let term = Instant::now();

    // New connections are refused soon (the listener closes); Pingora stops accepting at once.
    eventually(Duration::from_secs(4), "no new connection accepted after SIGTERM", || {
        TcpStream::connect(m.http).is_err()
    });
    // The open websocket keeps working during the grace period.
    rt.block_on(ws_echo(&mut ws, "during the grace period"));

    // The request in flight finishes, complete.
    read_until_closed(&mut s, &mut got);
    let r = parse_response(&got)
        .unwrap_or_else(|| panic!("an incomplete response after SIGTERM: {:?}", String::from_utf8_lossy(&got)));
    assert_eq!((r.status, r.body_text().as_str()), (200, "chunk 0\nchunk 1\nchunk 2\n"));
    assert!(term.elapsed() < grace, "the response finished within the grace period");

    // The websocket is closed at the end of the grace period, not before: with a Close frame
    // (1001, going away) in its last 1.5 s, so that the close handshake fits in the period.
    let (closed, code) = rt.block_on(async {
        loop {
            match tokio::time::timeout(grace + STEP, ws.next()).await {
                Err(_) => panic!("the websocket was still open after the grace period"),
                Ok(Some(Ok(Message::Close(frame)))) => return (Instant::now(), frame.map(|f| u16::from(f.code))),
                Ok(None | Some(Err(_))) => return (Instant::now(), None),
                Ok(Some(Ok(_))) => continue,
            }
        }
    });
    let closed = closed.duration_since(term);
    println!("websocket closed {closed:?} after SIGTERM (grace period {grace:?}), close code {code:?}");
    assert!(closed >= grace - Duration::from_secs(2), "the websocket was closed before the end of the grace period");
    assert!(closed <= grace + Duration::from_secs(1), "the websocket outlived the grace period");
    assert_eq!(code, Some(1001), "a Close frame saying the server is going away");
    let status = m.wait_exit(STEP).unwrap_or_else(|| panic!("markco still runs after SIGTERM; log:\n{}", m.log()));
    assert!(status.success(), "markco exits cleanly on SIGTERM: {status}; log:\n{}", m.log());
}

#[test]
fn silent_upstream_gives_504_within_the_upstream_timeout_and_a_slow_stream_does_not() {
    let up = Upstream::start("app");
    let m = Markco::start(&config(up.addr, "upstream_idle_timeout = \"3s\""));

    // Silent for 60 s: 504 once the 3 s idle timeout passes, with a body that names nothing.
    let t = Instant::now();
    let r = http_get(m.http, "/slow?ms=60000", &[]).expect("GET /slow");
    let took = t.elapsed();
    println!("504 after {took:?}");
    assert_eq!(r.status, 504, "{}", r.body_text());
    assert!(took >= Duration::from_millis(2900), "504 before the timeout: {took:?}");
    assert!(took < Duration::from_secs(12), "504 long after the 3 s timeout: {took:?}");
    assert!(!r.body_text().contains(&up.addr.port().to_string()), "{}", r.body_text());
    let text = m.metrics();
    let timeouts = metric_value(
        &text,
        "markco_upstream_errors_total",
        &[("upstream", &up.addr.to_string()), ("kind", "read_timeout")],
    );
    assert!(timeouts.is_some_and(|v| v >= 1.0), "read timeouts counted: {timeouts:?}\n{text}");

    // Bytes 1 s apart, 5 s in all: never idle for 3 s, so it is served whole.
    let r = http_get(m.http, "/drip?chunks=6&interval_ms=1000", &[]).expect("GET /drip");
    assert_eq!(r.status, 200);
    assert_eq!(r.body_text(), (0..6).map(|i| format!("chunk {i}\n")).collect::<String>());

    // A response that stops half-way for longer than the timeout is cut: the client never sees
    // it complete (the chunked body has no end) and the connection is closed.
    let raw = raw_exchange(
        m.http,
        b"GET /drip?chunks=3&interval_ms=6000 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
        STEP,
    )
    .expect("the cut response ends with a close");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("chunk 0"), "{text}");
    assert!(!text.contains("chunk 1"), "{text}");
    assert!(parse_response(&raw).is_none(), "a cut response must not look complete: {text}");
}

#[test]
fn upstream_dying_mid_response_is_not_passed_off_as_complete() {
    let up = Upstream::start("app");
    let m = Markco::start(&config(up.addr, ""));
    let t = Instant::now();
    let raw = raw_exchange(
        m.http,
        b"GET /die?bytes=5000&of=100000&ms=300 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
        STEP,
    )
    .expect("the connection is closed after the upstream dies");
    let took = t.elapsed();
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // The client sees fewer bytes than announced (or an unterminated chunked body): never a
    // response that parses as complete.
    let err = parse_response_to("GET", &raw).expect_err("a truncated response must not parse as complete");
    println!("upstream died: client saw {} body bytes, {err}, after {took:?}", raw.len() - head_end);
    assert!(raw.len() - head_end < 100_000);
    assert!(took < Duration::from_secs(10), "the client waited {took:?} for a dead upstream");
    // The gateway carries on.
    let r = http_get(m.http, "/after", &[]).expect("GET /after");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["name"], "app");
}

#[test]
fn websocket_idle_timeout_closes_only_a_silent_websocket() {
    let up = Upstream::start("app");
    let m = Markco::start(&config(up.addr, "websocket_idle_timeout = \"3s\""));
    let rt = runtime();
    rt.block_on(async {
        let mut ws = ws_open(m.http, "/ws").await;
        // Busy for 5 s, a message every second: never idle for 3 s, so it stays open.
        for i in 0..5 {
            ws_echo(&mut ws, &format!("busy {i}")).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        ws_echo(&mut ws, "still open after 5 s").await;
        let last = Instant::now();
        // Then silent: closed about 3 s after the last message.
        let closed = ws_wait_end(&mut ws, STEP).await.duration_since(last);
        println!("silent websocket closed after {closed:?}");
        assert!(closed >= Duration::from_millis(2500), "closed before it was idle for 3 s: {closed:?}");
        assert!(closed < Duration::from_secs(13), "closed long after the 3 s idle timeout: {closed:?}");
    });
}

#[test]
fn client_idle_timeout_cuts_only_a_stalled_upload() {
    let up = Upstream::start("app");
    let m = Markco::start(&config(up.addr, "client_idle_timeout = \"3s\""));

    // A slow upload, 100 bytes a second for 5 s: never idle for 3 s, so it is received whole.
    let mut s = TcpStream::connect(m.http).expect("connect");
    s.set_read_timeout(Some(STEP)).expect("timeout");
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 600\r\nConnection: close\r\n\r\n")
        .expect("send head");
    for _ in 0..6 {
        s.write_all(&[7u8; 100]).expect("send a piece of the body");
        std::thread::sleep(Duration::from_secs(1));
    }
    let mut got = Vec::new();
    read_until_closed(&mut s, &mut got);
    let r = parse_response(&got).unwrap_or_else(|| panic!("{:?}", String::from_utf8_lossy(&got)));
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.json()["bytes"], 600, "{}", r.body_text());

    // A stalled upload: 100 of 600 bytes, then nothing. Cut about 3 s later.
    let mut s = TcpStream::connect(m.http).expect("connect");
    s.set_read_timeout(Some(STEP)).expect("timeout");
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 600\r\nConnection: close\r\n\r\n")
        .expect("send head");
    s.write_all(&[7u8; 100]).expect("send a piece of the body");
    let stalled = Instant::now();
    let mut got = Vec::new();
    read_until_closed(&mut s, &mut got);
    let cut = stalled.elapsed();
    println!("stalled upload cut after {cut:?}: {:?}", String::from_utf8_lossy(&got));
    assert!(cut >= Duration::from_millis(2500), "cut before the upload was idle for 3 s: {cut:?}");
    assert!(cut < Duration::from_secs(13), "cut long after the 3 s idle timeout: {cut:?}");
    // Whatever markco answered, it is not the upstream's success.
    if let Some(r) = parse_response(&got) {
        assert!(r.status >= 400, "a stalled upload got {}: {}", r.status, r.body_text());
    }
}

#[test]
fn upstream_closing_before_its_answer_gives_502_at_once() {
    // An "upstream" that accepts each connection, reads the request and closes without a word.
    let dying = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = dying.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in dying.incoming() {
            let Ok(mut c) = conn else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = c.read(&mut [0u8; 4096]);
            drop(c);
        }
    });
    // A long idle timeout: the 502 must come from the close, not from a timer.
    let m = Markco::start(&config(addr, "upstream_idle_timeout = \"60s\""));
    let t = Instant::now();
    let r = http_get(m.http, "/x", &[]).expect("GET /x");
    let took = t.elapsed();
    assert_eq!(r.status, 502, "{}", r.body_text());
    assert!(took < Duration::from_secs(5), "502 after {took:?}");
    let body = r.body_text();
    assert!(!body.contains(&addr.port().to_string()) && body.len() < 200, "names nothing internal: {body:?}");
}
