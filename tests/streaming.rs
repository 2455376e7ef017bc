//! Streaming through markco as a user sees it: websockets (echo, subprotocol, close codes),
//! server-sent events without buffering, large uploads and downloads in bounded memory,
//! websockets surviving reloads, refused reloads, and the admin token.

// The shared harness is linted with this file; it has a loop clippy would rather see as `while let`.
#[allow(clippy::while_let_loop)]
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Per-message timeout on websocket reads.
const WS_TIMEOUT: Duration = Duration::from_secs(10);

/// The `[server]` part shared by every config here; per-test sockets and pid files live in the
/// harness's temporary directory so parallel tests do not collide.
const SERVER: &str = r#"[server]
http = "{http}"
admin = "{admin}"
threads = 2
upgrade_sock = "{dir}/upgrade.sock"
pid_file = "{dir}/markco.pid"
grace_period = "1s"
shutdown_timeout = "1s"
"#;

/// A config with one catch-all proxy route named `route` to `upstream`.
fn proxy_all(route: &str, upstream: SocketAddr) -> String {
    format!(
        r#"{SERVER}
[[site]]
hosts = ["*"]

  [[site.route]]
  name = "{route}"
  match = ["/*"]
  proxy = "{upstream}"
"#
    )
}

/// Runs blocking harness code (std sockets, `eventually`) without stalling the runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn admin_json(m: &Markco, method: &str, path: &str) -> (u16, serde_json::Value) {
    let r = request(m.admin, method, path, &[], b"").unwrap_or_else(|e| panic!("admin {method} {path}: {e}"));
    let status = r.status;
    (status, r.json())
}

fn generation(m: &Markco) -> u64 {
    let (status, v) = admin_json(m, "GET", "/routes");
    assert_eq!(status, 200, "GET /routes: {v}");
    v["generation"].as_u64().unwrap_or_else(|| panic!("no generation in /routes: {v}"))
}

fn metric(m: &Markco, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metric_value(&m.metrics(), name, labels)
}

/// Which upstream a plain HTTP request through markco reaches (the echo's `name`).
fn http_upstream_name(m: &Markco, path: &str) -> String {
    let r = http_get(m.http, path, &[]).unwrap_or_else(|e| panic!("GET {path} through markco: {e}"));
    assert_eq!(r.status, 200, "GET {path}: {}", r.body_text());
    r.json()["name"].as_str().unwrap_or_else(|| panic!("no name in echo of {path}: {}", r.body_text())).to_string()
}

async fn ws_connect(addr: SocketAddr, path: &str) -> Ws {
    let req = format!("ws://{addr}{path}").into_client_request().expect("websocket request");
    let (ws, resp) = match tokio::time::timeout(WS_TIMEOUT, tokio_tungstenite::connect_async(req)).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => panic!("websocket handshake to {addr}{path}: {e}"),
        Err(_) => panic!("websocket handshake to {addr}{path} timed out"),
    };
    assert_eq!(resp.status(), 101);
    ws
}

/// The next data or close message (pings and pongs are skipped).
async fn ws_next(ws: &mut Ws) -> Message {
    loop {
        let msg = tokio::time::timeout(WS_TIMEOUT, ws.next())
            .await
            .expect("websocket message timed out")
            .expect("websocket closed without a close frame")
            .expect("websocket read error");
        match msg {
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            m => return m,
        }
    }
}

async fn ws_text_roundtrip(ws: &mut Ws, text: &str) -> String {
    ws.send(Message::text(text)).await.expect("send text");
    match ws_next(ws).await {
        Message::Text(t) => t.as_str().to_string(),
        other => panic!("expected a text reply to {text:?}, got {other:?}"),
    }
}

async fn whoami(ws: &mut Ws) -> String {
    ws_text_roundtrip(ws, "__whoami").await
}

/// Opens a websocket and asks `__whoami`; errors (rather than panics) name the failing step.
async fn try_ws_whoami(addr: SocketAddr, path: &str) -> Result<(String, Ws), String> {
    let req = format!("ws://{addr}{path}").into_client_request().map_err(|e| format!("request: {e}"))?;
    let (mut ws, _) = tokio::time::timeout(WS_TIMEOUT, tokio_tungstenite::connect_async(req))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    ws.send(Message::text("__whoami")).await.map_err(|e| format!("send __whoami: {e}"))?;
    loop {
        let msg = tokio::time::timeout(WS_TIMEOUT, ws.next())
            .await
            .map_err(|_| "no reply to __whoami in time".to_string())?
            .ok_or("connection ended before the reply to __whoami")?
            .map_err(|e| format!("reading the reply to __whoami: {e}"))?;
        match msg {
            Message::Text(t) => return Ok((t.as_str().to_string(), ws)),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            other => return Err(format!("unexpected reply to __whoami: {other:?}")),
        }
    }
}

/// Raises the soft open-files limit towards the hard one when it is below `want`.
fn ensure_nofile(want: libc::rlim_t) {
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < want {
            lim.rlim_cur = std::cmp::min(want, lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

// 1 --------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_text_binary_close_code() {
    let up = Upstream::start("one");
    let m = Markco::start(&proxy_all("ws", up.addr));

    let mut req = format!("ws://{}/chat/room", m.http).into_client_request().expect("websocket request");
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("chat, superchat"));
    let (mut ws, resp) = tokio::time::timeout(WS_TIMEOUT, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake timed out")
        .unwrap_or_else(|e| panic!("handshake through markco: {e}\nlog:\n{}", m.log()));
    assert_eq!(resp.status(), 101);
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()),
        Some("chat"),
        "selected subprotocol; response headers: {:?}",
        resp.headers()
    );

    blocking(|| {
        eventually(Duration::from_secs(20), "markco_websockets_open{route=\"ws\"} == 1", || {
            metric(&m, "markco_websockets_open", &[("route", "ws")]) == Some(1.0)
        })
    });

    assert_eq!(ws_text_roundtrip(&mut ws, "hello, markco ✓").await, "hello, markco ✓");

    let small: Vec<u8> = (0..=255u8).collect();
    ws.send(Message::binary(small.clone())).await.expect("send binary");
    match ws_next(&mut ws).await {
        Message::Binary(b) => assert_eq!(&b[..], &small[..], "small binary echo"),
        other => panic!("expected binary, got {other:?}"),
    }

    let big: Vec<u8> = (0..1024 * 1024u32).map(|i| (i.wrapping_mul(31) % 256) as u8).collect();
    tokio::time::timeout(WS_TIMEOUT, ws.send(Message::binary(big.clone())))
        .await
        .expect("1 MiB sent in time")
        .expect("send 1 MiB binary");
    match ws_next(&mut ws).await {
        Message::Binary(b) => {
            assert_eq!(b.len(), big.len(), "1 MiB echo length");
            assert!(b[..] == big[..], "1 MiB echo content differs");
        }
        other => panic!("expected binary, got {other:?}"),
    }

    tokio::time::timeout(WS_TIMEOUT, ws.close(Some(CloseFrame { code: CloseCode::from(4001), reason: "bye".into() })))
        .await
        .expect("close sent in time")
        .expect("send close");
    match ws_next(&mut ws).await {
        Message::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 4001, "close code echoed");
            assert_eq!(f.reason.as_str(), "bye", "close reason echoed");
        }
        other => panic!("expected a close frame with 4001/bye, got {other:?}"),
    }
    // The connection ends after the close handshake.
    let end = tokio::time::timeout(WS_TIMEOUT, ws.next()).await.expect("stream end timed out");
    assert!(matches!(end, None | Some(Err(_))), "after close: {end:?}");
    drop(ws);

    blocking(|| {
        eventually(Duration::from_secs(20), "markco_websockets_open{route=\"ws\"} == 0", || {
            metric(&m, "markco_websockets_open", &[("route", "ws")]) == Some(0.0)
        })
    });
}

// 2 --------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_first_event_arrives_before_upstream_finishes() {
    let up = Upstream::start("one");
    let m = Markco::start(&proxy_all("sse", up.addr));

    let mut s = TcpStream::connect(m.http).await.expect("connect to markco");
    let req = format!(
        "GET /sse?n=3&interval_ms={SSE_INTERVAL_MS} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n",
        m.http
    );
    let start = Instant::now();
    s.write_all(req.as_bytes()).await.expect("send request");

    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut first_event = None;
    let deadline = Duration::from_secs(30);
    loop {
        let left = deadline.checked_sub(start.elapsed()).expect("SSE stream did not finish in 30 s");
        let n = tokio::time::timeout(left, s.read(&mut buf))
            .await
            .expect("SSE stream did not finish in 30 s")
            .expect("read SSE");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if first_event.is_none() && contains(&got, b"data: event 0") {
            first_event = Some(start.elapsed());
            // Buffering would deliver the events together: the first must come alone.
            assert!(!contains(&got, b"data: event 1"), "events 0 and 1 arrived together (buffered?)");
        }
        // `Connection: close` ends the stream with EOF; a chunked terminator also ends it.
        if is_chunked(&got) && got.ends_with(b"\r\n0\r\n\r\n") {
            break;
        }
    }
    let total = start.elapsed();
    let text = String::from_utf8_lossy(&got).into_owned();
    let first = first_event.unwrap_or_else(|| panic!("no `data: event 0` in {text:?}"));
    println!("sse: first event after {first:?}, whole stream {total:?}");

    assert!(text.starts_with("HTTP/1.1 200"), "status line: {text:?}");
    assert!(text.to_ascii_lowercase().contains("content-type: text/event-stream"), "content type: {text:?}");
    for i in 0..3 {
        assert!(text.contains(&format!("data: event {i}\n\n")), "event {i} missing: {text:?}");
    }
    // The upstream sends event 0 at once and the next ones SSE_INTERVAL_MS apart: a user sees
    // the first event long before the second exists, even on a loaded machine.
    let interval = Duration::from_millis(SSE_INTERVAL_MS);
    assert!(first < interval * 2 / 3, "first event took {first:?} (buffered?); response: {text:?}");
    assert!(total >= interval * 2, "the whole stream took only {total:?}");
}

/// Time between the test upstream's SSE events.
const SSE_INTERVAL_MS: u64 = 3000;

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn is_chunked(raw: &[u8]) -> bool {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase().contains("transfer-encoding: chunked")
}

// 3 --------------------------------------------------------------------------------------------

const BIG: u64 = 200 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_and_download_stream_with_bounded_memory() {
    let up = Upstream::start("one");
    let m = Markco::start(&proxy_all("bulk", up.addr));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("reqwest client");
    let base = format!("http://{}", m.http);

    // Warm-up: one small request of each kind so connection pools and buffers exist.
    let r = client.post(format!("{base}/upload")).body(vec![1u8; 1024]).send().await.expect("warm-up upload");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.expect("warm-up body")).expect("warm-up JSON");
    assert_eq!(v["bytes"], 1024);
    let r = client.get(format!("{base}/large?bytes=65536")).send().await.expect("warm-up download");
    assert_eq!(r.bytes().await.expect("warm-up download body").len(), 65536);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle = m.rss_kib();
    assert!(idle > 0, "cannot read markco's VmRSS");

    // Upload 200 MiB, generated on the fly in 64 KiB chunks: byte i is (i % 253) as u8, a
    // period that does not divide the chunk size.
    const CHUNK: u64 = 64 * 1024;
    const UP_PERIOD: u64 = 253;
    let up_pattern: Vec<u8> = (0..CHUNK + UP_PERIOD).map(|i| (i % UP_PERIOD) as u8).collect();
    let expected_checksum = {
        let (q, r) = (BIG / UP_PERIOD, BIG % UP_PERIOD);
        q * (UP_PERIOD * (UP_PERIOD - 1) / 2) + r * r.saturating_sub(1) / 2
    };
    let stream = futures_util::stream::unfold(0u64, move |pos| {
        let chunk = (pos < BIG).then(|| {
            let len = CHUNK.min(BIG - pos);
            let start = (pos % UP_PERIOD) as usize;
            up_pattern[start..start + len as usize].to_vec()
        });
        async move { chunk.map(|c| (Ok::<Vec<u8>, std::io::Error>(c), pos + CHUNK)) }
    });
    let t = Instant::now();
    let r = client
        .post(format!("{base}/upload"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap_or_else(|e| panic!("200 MiB upload through markco: {e}\nlog:\n{}", m.log()));
    assert_eq!(r.status(), 200, "upload status");
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.expect("upload answer")).expect("upload JSON");
    let upload_time = t.elapsed();
    assert_eq!(v["bytes"].as_u64(), Some(BIG), "uploaded byte count: {v}");
    assert_eq!(v["checksum"].as_u64(), Some(expected_checksum), "upload checksum: {v}");
    let after_upload = m.peak_rss_kib();

    // Download 200 MiB, checking the pattern as it streams.
    let t = Instant::now();
    let mut r = client
        .get(format!("{base}/large?bytes={BIG}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("200 MiB download through markco: {e}\nlog:\n{}", m.log()));
    assert_eq!(r.status(), 200, "download status");
    let down_pattern: Vec<u8> = (0..(CHUNK as usize + 251)).map(|i| (i % 251) as u8).collect();
    let mut i: u64 = 0;
    while let Some(chunk) = r.chunk().await.expect("download body") {
        for (k, piece) in chunk.chunks(CHUNK as usize).enumerate() {
            let at = i + (k as u64) * CHUNK;
            let phase = (at % 251) as usize;
            if piece != &down_pattern[phase..phase + piece.len()] {
                let bad = piece.iter().zip(&down_pattern[phase..]).position(|(a, b)| a != b).unwrap_or(0);
                panic!("download byte {} differs from the pattern", at + bad as u64);
            }
        }
        i += chunk.len() as u64;
    }
    let download_time = t.elapsed();
    assert_eq!(i, BIG, "downloaded byte count");

    let peak = m.peak_rss_kib();
    println!(
        "memory: markco idle RSS {idle} KiB, peak after upload {after_upload} KiB, peak after both {peak} KiB \
         (limit {} KiB); upload {upload_time:?}, download {download_time:?}",
        idle + 64 * 1024
    );
    assert!(
        peak < idle + 64 * 1024,
        "markco's peak RSS {peak} KiB is not below idle {idle} KiB + 64 MiB: bodies are buffered"
    );
}

// 4 --------------------------------------------------------------------------------------------

const SOCKETS: usize = 200;

/// Config for reload step `step` (0 = the starting config): odd steps route `/*` to "two" and
/// add an `extra` route, even steps route `/*` to "one" without it.
fn reload_config(step: usize, one: SocketAddr, two: SocketAddr) -> String {
    let (upstream, extra) = if step % 2 == 1 {
        (
            two,
            r#"
  [[site.route]]
  name = "extra"
  match = ["/extra"]
  respond = "extra route\n"
"#,
        )
    } else {
        (one, "")
    };
    format!(
        r#"{SERVER}
[[site]]
hosts = ["*"]
{extra}
  [[site.route]]
  name = "main"
  match = ["/*"]
  proxy = "{upstream}"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_200_websockets() {
    ensure_nofile(4 * SOCKETS as libc::rlim_t + 256);
    let one = Upstream::start("one");
    let two = Upstream::start("two");
    let m = Markco::start(&reload_config(0, one.addr, two.addr));
    assert_eq!(blocking(|| generation(&m)), 1, "initial generation");

    // 200 websockets, opened concurrently (in batches of 50), each asked who it reaches.
    let mut sockets: Vec<Ws> = Vec::with_capacity(SOCKETS);
    let mut failures: Vec<(usize, String)> = Vec::new();
    let http = m.http;
    for batch in 0..SOCKETS / 50 {
        let mut set = tokio::task::JoinSet::new();
        for k in 0..50 {
            let idx = batch * 50 + k;
            set.spawn(async move { (idx, try_ws_whoami(http, &format!("/ws/{idx}")).await) });
        }
        while let Some(res) = set.join_next().await {
            let (idx, res) = res.expect("websocket task");
            match res {
                Ok((who, ws)) => {
                    assert_eq!(who, "one", "socket {idx} before reloads");
                    sockets.push(ws);
                }
                Err(e) => failures.push((idx, e)),
            }
        }
    }
    if !failures.is_empty() {
        let log = m.log();
        let lines: Vec<&str> = failures
            .iter()
            .flat_map(|(idx, _)| {
                let uri = format!("uri=/ws/{idx} ");
                log.lines().filter(move |l| l.contains(&uri)).collect::<Vec<_>>()
            })
            .collect();
        panic!(
            "{} of {SOCKETS} websockets through markco failed right after their handshake: {failures:?}\n\
             their markco log lines:\n{}",
            failures.len(),
            lines.join("\n")
        );
    }
    assert_eq!(sockets.len(), SOCKETS);
    blocking(|| {
        eventually(Duration::from_secs(20), "200 websockets open on route main", || {
            metric(&m, "markco_websockets_open", &[("route", "main")]) == Some(SOCKETS as f64)
        })
    });

    for step in 1..=10usize {
        let want_gen = step as u64 + 1;
        let (want_name, extra) = if step % 2 == 1 { ("two", true) } else { ("one", false) };
        m.write_config(&reload_config(step, one.addr, two.addr));
        if step % 2 == 1 {
            m.sighup();
        } else {
            let (status, v) = blocking(|| admin_json(&m, "POST", "/reload"));
            assert_eq!(status, 200, "POST /reload at step {step}: {v}\nlog:\n{}", m.log());
            assert_eq!(v["status"], "reloaded", "step {step}: {v}");
            assert_eq!(v["generation"].as_u64(), Some(want_gen), "step {step}: {v}");
        }
        blocking(|| {
            eventually(Duration::from_secs(30), &format!("generation {want_gen} after reload {step}"), || {
                generation(&m) == want_gen
            })
        });
        let (_, routes) = blocking(|| admin_json(&m, "GET", "/routes"));
        let names: Vec<&str> = routes["sites"][0]["routes"]
            .as_array()
            .unwrap_or_else(|| panic!("no routes in {routes}"))
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert_eq!(names.contains(&"extra"), extra, "step {step}: routes {names:?}");

        // New traffic follows the new table.
        let mut ws = ws_connect(m.http, "/ws/new").await;
        assert_eq!(whoami(&mut ws).await, want_name, "new websocket after reload {step}");
        ws.close(None).await.expect("close new websocket");
        drop(ws);
        blocking(|| {
            assert_eq!(http_upstream_name(&m, "/who"), want_name, "new HTTP request after reload {step}");
            let r = http_get(m.http, "/extra", &[]).expect("GET /extra");
            if extra {
                assert_eq!(r.status, 200);
                assert_eq!(r.body_text(), "extra route\n", "step {step}: /extra");
            } else {
                assert_eq!(r.json()["name"], "one", "step {step}: /extra goes to the catch-all");
            }
        });
    }

    // Every original socket still works and still reaches "one".
    for (idx, ws) in sockets.iter_mut().enumerate() {
        let msg = format!("still here {idx}");
        assert_eq!(ws_text_roundtrip(ws, &msg).await, msg, "socket {idx} echo after reloads");
        assert_eq!(whoami(ws).await, "one", "socket {idx} upstream after reloads");
    }

    let text = blocking(|| m.metrics());
    assert_eq!(
        metric_value(&text, "markco_config_reloads_total", &[("result", "ok")]),
        Some(10.0),
        "reloads ok\n{text}"
    );
    assert_eq!(
        metric_value(&text, "markco_config_reloads_total", &[("result", "error")]),
        Some(0.0),
        "reloads error\n{text}"
    );
    assert_eq!(metric_value(&text, "markco_route_table_generation", &[]), Some(11.0), "generation\n{text}");
    assert_eq!(
        metric_value(&text, "markco_websockets_open", &[("route", "main")]),
        Some(SOCKETS as f64),
        "open websockets after reloads\n{text}"
    );

    for ws in &mut sockets {
        let _ = ws.close(None).await;
    }
}

// 5 --------------------------------------------------------------------------------------------

/// Asserts `err` names `markco.toml:<line>:<col>:` and returns (line, col).
fn error_position(err: &str) -> (usize, usize) {
    let at = err.find("markco.toml:").unwrap_or_else(|| panic!("error does not name the config file: {err:?}"));
    let mut parts = err[at + "markco.toml:".len()..].splitn(3, ':');
    let line = parts.next().and_then(|l| l.parse().ok());
    let col = parts.next().and_then(|c| c.parse().ok());
    match (line, col) {
        (Some(l), Some(c)) if l > 0 && c > 0 => (l, c),
        _ => panic!("error has no line:column after the file name: {err:?}"),
    }
}

fn line_of(config: &str, needle: &str) -> usize {
    config.lines().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle:?} not in config")) + 1
}

#[test]
fn invalid_reload_is_refused_and_old_table_keeps_serving() {
    let one = Upstream::start("one");
    let two = Upstream::start("two");
    let good = proxy_all("main", one.addr);
    let mut m = Markco::start(&good);
    assert_eq!(generation(&m), 1);
    assert_eq!(http_upstream_name(&m, "/before"), "one");

    // A TOML syntax error (pointing the catch-all at "two", so a wrongly applied table shows).
    let syntax = proxy_all("main", two.addr).replace(r#"match = ["/*"]"#, r#"match = ["/*"] oops"#);
    let syntax_line = line_of(&syntax, "oops");
    // A semantic error: a route with both `proxy` and `static`.
    let semantic = format!(
        "{}\n  [[site.route]]\n  name = \"both\"\n  match = [\"/both/*\"]\n  proxy = \"{}\"\n  static = \"{{dir}}\"\n",
        proxy_all("main", two.addr),
        two.addr
    );
    let both_first = line_of(&semantic, "name = \"both\"") - 1;
    let both_last = line_of(&semantic, "static = ");

    let mut refusals = 0.0;
    for (what, config, lines) in
        [("syntax error", &syntax, syntax_line..=syntax_line), ("proxy and static", &semantic, both_first..=both_last)]
    {
        m.write_config(config);

        let (status, v) = admin_json(&m, "POST", "/reload");
        assert_eq!(status, 422, "{what}: POST /reload should be refused: {v}");
        assert_eq!(v["status"], "refused", "{what}: {v}");
        let err = v["error"].as_str().unwrap_or_else(|| panic!("{what}: no error string in {v}"));
        println!("{what}: POST /reload -> 422: {err}");
        let (line, _col) = error_position(err);
        assert!(lines.contains(&line), "{what}: error points at line {line}, expected {lines:?}: {err}");
        refusals += 1.0;
        assert_eq!(generation(&m), 1, "{what}: generation after a refused POST /reload");
        assert_eq!(http_upstream_name(&m, "/after-post"), "one", "{what}: old table serves");
        assert_eq!(
            metric(&m, "markco_config_reloads_total", &[("result", "error")]),
            Some(refusals),
            "{what}: refused reloads counted"
        );

        m.sighup();
        refusals += 1.0;
        eventually(Duration::from_secs(30), &format!("{what}: SIGHUP refusal counted"), || {
            metric(&m, "markco_config_reloads_total", &[("result", "error")]) == Some(refusals)
        });
        assert!(m.alive(), "{what}: markco died on SIGHUP with a bad config; log:\n{}", m.log());
        assert_eq!(generation(&m), 1, "{what}: generation after a refused SIGHUP");
        assert_eq!(http_upstream_name(&m, "/after-hup"), "one", "{what}: old table serves after SIGHUP");
    }
    assert_eq!(metric(&m, "markco_config_reloads_total", &[("result", "ok")]), Some(0.0));
    assert_eq!(metric(&m, "markco_route_table_generation", &[]), Some(1.0));
    let log = m.log();
    assert!(log.contains("config reload refused"), "refusals are logged:\n{log}");

    // And a good config still applies afterwards.
    m.write_config(&proxy_all("main", two.addr));
    let (status, v) = admin_json(&m, "POST", "/reload");
    assert_eq!(status, 200, "good config after refusals: {v}");
    assert_eq!(v["generation"].as_u64(), Some(2), "{v}");
    assert_eq!(http_upstream_name(&m, "/after-fix"), "two");
    assert!(m.alive());
}

#[test]
fn a_reload_applies_the_routes_and_names_what_needs_a_restart() {
    let one = Upstream::start("one");
    let two = Upstream::start("two");
    let mut m = Markco::start(&proxy_all("main", one.addr));

    // Threads, the listener's grace period and the database URL are read once at start; the route
    // to "two" is not.
    let changed = proxy_all("main", two.addr)
        .replace("threads = 2\n", "threads = 3\n")
        .replace("grace_period = \"1s\"", "grace_period = \"2s\"")
        + "\n[database]\nurl = \"sqlite://{dir}/another.db\"\n";
    m.write_config(&changed);
    let (status, v) = admin_json(&m, "POST", "/reload");
    assert_eq!(status, 200, "POST /reload: {v}");
    assert_eq!(v["generation"].as_u64(), Some(2), "{v}");
    let named: Vec<&str> =
        v["needs_restart"].as_array().map(|a| a.iter().filter_map(|k| k.as_str()).collect()).unwrap_or_default();
    for key in ["server.threads", "server.grace_period", "database.url"] {
        assert!(named.contains(&key), "{key} is not named in the reload's answer: {v}");
    }
    assert_eq!(named.len(), 3, "only what changed is named: {v}");
    assert_eq!(http_upstream_name(&m, "/after"), "two", "the routes applied");
    let log = m.log();
    let line = log.lines().find(|l| l.contains("config reloaded")).unwrap_or_else(|| panic!("no reload line:\n{log}"));
    for key in ["server.threads", "server.grace_period", "database.url"] {
        assert!(line.contains(key), "{key} is not in the reload's log line: {line}");
    }

    // Still different from what runs: named again. Back to the started values: nothing is.
    let (_, v) = admin_json(&m, "POST", "/reload");
    assert_eq!(v["needs_restart"].as_array().map(Vec::len), Some(3), "{v}");
    m.write_config(&proxy_all("main", one.addr));
    let (status, v) = admin_json(&m, "POST", "/reload");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["needs_restart"], serde_json::json!([]), "{v}");
    assert_eq!(http_upstream_name(&m, "/back"), "one");
    assert!(m.alive());
}

// 6 --------------------------------------------------------------------------------------------

#[test]
fn admin_token_protects_admin_api() {
    let up = Upstream::start("one");
    let secrets = tempfile::tempdir().expect("tempdir for the token");
    let token = "s3cr3t-t0ken-4-markco-tests-0123456789abcdef";
    let token_path = secrets.path().join("admin.token");
    std::fs::write(&token_path, format!("{token}\n")).expect("write token file");
    let config = proxy_all("main", up.addr)
        .replace("threads = 2\n", &format!("threads = 2\nadmin_token_file = \"{}\"\n", token_path.display()));
    assert!(config.contains("admin_token_file"));
    let m = Markco::start(&config);

    let bearer = format!("Bearer {token}");
    let good: &[(&str, &str)] = &[("Authorization", &bearer)];
    let wrong: &[(&str, &str)] = &[("Authorization", "Bearer not-the-token")];

    for (method, path) in [("GET", "/metrics"), ("GET", "/routes"), ("POST", "/reload")] {
        let r = request(m.admin, method, path, &[], b"").expect("admin request");
        assert_eq!(r.status, 401, "{method} {path} without a token: {}", r.body_text());
        assert!(
            r.header("www-authenticate").is_some_and(|v| v.starts_with("Bearer")),
            "{method} {path}: WWW-Authenticate {:?}",
            r.header("www-authenticate")
        );
        let r = request(m.admin, method, path, wrong, b"").expect("admin request");
        assert_eq!(r.status, 401, "{method} {path} with a wrong token: {}", r.body_text());
    }
    // Nothing was reloaded by the refused POST.
    let r = http_get(m.admin, "/routes", good).expect("GET /routes");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.json()["generation"], 1);

    let r = http_get(m.admin, "/metrics", good).expect("GET /metrics");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert!(r.body_text().contains("markco_route_table_generation"), "{}", r.body_text());

    let r = request(m.admin, "POST", "/reload", good, b"").expect("POST /reload");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.json()["generation"], 2);
    let r = http_get(m.admin, "/routes", good).expect("GET /routes");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["generation"], 2);

    let r = http_get(m.admin, "/health", &[]).expect("GET /health");
    assert_eq!(r.status, 200, "/health needs no token: {}", r.body_text());

    // The proxy itself is not behind the admin token.
    assert_eq!(http_upstream_name(&m, "/x"), "one");
}

// 7 --------------------------------------------------------------------------------------------

#[test]
fn slow_response_in_flight_spans_a_reload_and_finishes_whole() {
    use std::io::{Read, Write};
    let one = Upstream::start("one");
    let two = Upstream::start("two");
    let m = Markco::start(&proxy_all("main", one.addr));

    // 6 chunks 1 s apart from "one"; the reload happens once the first has arrived.
    let mut s = std::net::TcpStream::connect(m.http).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    s.write_all(b"GET /drip?chunks=6&interval_ms=1000 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").expect("send");
    let sent = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !contains(&got, b"chunk 0\n") {
        let n = s.read(&mut buf).expect("the first chunk");
        assert!(n > 0, "closed before the first chunk: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    m.write_config(&proxy_all("main", two.addr));
    m.sighup();
    eventually(Duration::from_secs(30), "generation 2 after SIGHUP", || generation(&m) == 2);
    assert_eq!(http_upstream_name(&m, "/new"), "two", "new requests follow the new table");
    assert!(sent.elapsed() < Duration::from_secs(5), "the reload came after the response ended: nothing was tested");

    // The response in flight finishes on the old upstream, whole.
    got.extend(read_to_close(&mut s).expect("the rest of the response"));
    let r = parse_response(&got)
        .unwrap_or_else(|| panic!("the response across the reload is incomplete: {:?}", String::from_utf8_lossy(&got)));
    assert_eq!(r.status, 200);
    assert_eq!(r.body_text(), (0..6).map(|i| format!("chunk {i}\n")).collect::<String>());
}
