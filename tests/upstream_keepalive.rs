//! Plain requests proxied by markco's own loop (`proxy/src/upstream.rs`): upstream connections
//! are kept and reused, one the upstream closed while idle is replaced without the client
//! noticing, a close-delimited body reaches the client chunked on a connection that stays open,
//! and a client that leaves frees the upstream connection. The upstream here is a scripted
//! raw-TCP server in the test, so each test controls exactly what goes over the wire.

#[allow(clippy::while_let_loop)]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;

/// One thread: deterministic per-thread pooling.
const SERVER: &str = r#"
[server]
http = "{http}"
admin = "{admin}"
upgrade_sock = "{dir}/upgrade.sock"
pid_file = "{dir}/markco.pid"
threads = 1
"#;

fn config(upstream: SocketAddr) -> String {
    format!(
        r#"{SERVER}
[[site]]
hosts = ["*"]

  [[site.route]]
  name = "app"
  match = ["/*"]
  proxy = "{upstream}"
"#
    )
}

/// Reads one request head (the tests send no bodies); `None` at EOF.
fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => buf.push(b[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// A scripted upstream: `serve(connection index, stream)` runs for each accepted connection
/// on a thread of its own. Returns the address and the number of connections accepted.
fn scripted(serve: impl Fn(usize, TcpStream) + Send + Sync + 'static) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let i = count.fetch_add(1, Ordering::SeqCst);
            let serve = serve.clone();
            std::thread::spawn(move || serve(i, s));
        }
    });
    (addr, accepted)
}

/// Reads exactly one response from a connection that stays open.
fn read_one(s: &mut TcpStream) -> Resp {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Ok(r) = parse_response_to("GET", &out) {
            return r;
        }
        let n = s.read(&mut buf).unwrap_or_else(|e| panic!("reading a response: {e}; so far {out:?}"));
        assert!(n > 0, "closed before a complete response: {:?}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn an_upstream_connection_is_reused_and_one_closed_while_idle_is_replaced() {
    // Each upstream connection answers two requests, saying which connection and request it
    // was, then closes (as an upstream with a short keep-alive timeout does).
    let (up, accepted) = scripted(|conn, mut s| {
        for req in 0..2 {
            if read_head(&mut s).is_none() {
                return;
            }
            let body = format!("conn-{conn} req-{req}");
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        }
    });
    let m = Markco::start(&config(up));
    let get = || {
        let r = http_get(m.http, "/", &[("Host", "a.test")]).expect("GET /");
        assert_eq!(r.status, 200, "{:?}", r.body_text());
        r.body_text()
    };
    // Two client connections, one after the other, share one upstream connection.
    assert_eq!(get(), "conn-0 req-0");
    assert_eq!(get(), "conn-0 req-1", "the second request reused the first upstream connection");
    // The upstream has closed that connection by now; markco still holds it as idle. The next
    // request finds it closed and goes out again on a new one: the client sees no error.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(get(), "conn-1 req-0", "a closed pooled connection is replaced, not answered with 502");
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "two upstream connections in all");
}

#[test]
fn a_close_delimited_body_is_chunked_and_the_client_connection_stays_open() {
    // HTTP/1.0-style: no length, the body ends when the upstream closes.
    let (up, _) = scripted(|conn, mut s| {
        if read_head(&mut s).is_some() {
            let _ = write!(s, "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from connection {conn}");
        }
    });
    let m = Markco::start(&config(up));
    let mut c = TcpStream::connect(m.http).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    for i in 0..2 {
        c.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").expect("send");
        let r = read_one(&mut c);
        assert_eq!(r.status, 200, "request {i}: {:?}", r.body_text());
        assert_eq!(r.header("transfer-encoding"), Some("chunked"), "request {i}: {:?}", r.headers);
        assert_eq!(r.body_text(), format!("hello from connection {i}"), "request {i}");
    }
    // HEAD on the same connection: the upstream's bytes after its head are not relayed, and
    // the connection still answers afterwards.
    c.write_all(b"HEAD / HTTP/1.1\r\nHost: a.test\r\n\r\n").expect("send HEAD");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head = loop {
        if let Ok(r) = parse_response_to("HEAD", &raw) {
            break r;
        }
        let n = c.read(&mut buf).expect("read the HEAD answer");
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
    };
    assert_eq!(head.status, 200);
    c.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").expect("send GET");
    let r = read_one(&mut c);
    assert_eq!(r.body_text(), "hello from connection 3", "no HEAD body came before the GET's answer");
}

#[test]
fn an_http10_client_gets_no_transfer_coding_and_its_body_ends_with_the_connection() {
    // Chunked, and to the close: markco reads both; an HTTP/1.0 client can read neither
    // a chunked body nor a Transfer-Encoding header (RFC 9112 6.1).
    let (up, _) = scripted(|_, mut s| {
        let Some(head) = read_head(&mut s) else { return };
        if head.starts_with("POST ") {
            let mut body = [0u8; 2]; // the tests' POST body: read before answering
            let _ = s.read_exact(&mut body);
        }
        let path = head.split(' ').nth(1).unwrap_or_default();
        if path == "/gzip" {
            // A transfer coding other than chunked: the body runs to the close (RFC 9112 6.3).
            // `Connection` names it too, which must not make it hop-by-hop.
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: gzip\r\n\r\n(gzip bytes)",
            );
        } else if path == "/chunked-comma" {
            // Chunked to us (empty elements are skipped), not to Pingora's proxy loop.
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
        } else if path == "/chunked" {
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            );
        } else {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello to the close");
        }
    });
    let m = Markco::start(&config(up));
    for (request, body) in [
        ("GET /chunked HTTP/1.0\r\nHost: a.test\r\n\r\n", "hello world"),
        ("GET /close HTTP/1.0\r\nHost: a.test\r\n\r\n", "hello to the close"),
        // With a body: Pingora's proxy loop, which takes the same rule (and itself chunks a
        // body that ends at the close, before the gateway sees the answer).
        ("POST /chunked HTTP/1.0\r\nHost: a.test\r\nContent-Length: 2\r\n\r\nhi", "hello world"),
        ("POST /close HTTP/1.0\r\nHost: a.test\r\nContent-Length: 2\r\n\r\nhi", "hello to the close"),
        // Keep-alive asked for, but a body of unknown length can only end with the connection.
        ("GET /chunked HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n", "hello world"),
    ] {
        let what = request.lines().next().unwrap_or_default();
        let mut c = TcpStream::connect(m.http).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        c.write_all(request.as_bytes()).expect("send");
        let raw =
            read_to_close(&mut c).unwrap_or_else(|e| panic!("{what}: the body must end with the connection: {e}"));
        let text = String::from_utf8_lossy(&raw);
        let (head, got) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{what}: no head: {text:?}"));
        assert!(head.starts_with("HTTP/1.1 200"), "{what}: {head}");
        assert!(!head.to_ascii_lowercase().contains("transfer-encoding"), "{what}: {head}");
        assert!(head.to_ascii_lowercase().contains("connection: close"), "{what}: {head}");
        assert_eq!(got, body, "{what}: the body as it is, no chunk sizes");
    }
    // A coding an HTTP/1.0 client cannot be sent, and cannot be taken off: 502, on both loops.
    for request in [
        &b"GET /gzip HTTP/1.0\r\nHost: a.test\r\n\r\n"[..],
        &b"POST /gzip HTTP/1.0\r\nHost: a.test\r\nContent-Length: 2\r\n\r\nhi"[..],
    ] {
        let r = raw_exchange_one(m.http, request, Duration::from_secs(10)).expect("a gzip-coded answer");
        assert_eq!(r.status, 502, "{:?}: {:?}", String::from_utf8_lossy(request), r.body_text());
    }
    // An answer Pingora's loop would read one way and frame the other: 502.
    let r = raw_exchange_one(
        m.http,
        b"POST /chunked-comma HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        Duration::from_secs(10),
    )
    .expect("POST /chunked-comma");
    assert_eq!(r.status, 502, "{:?}", r.body_text());
    // HTTP/1.1 on the same routes, on both loops: chunked, and the connection stays open.
    let mut c = TcpStream::connect(m.http).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    for (method, path, body) in [
        ("GET", "/chunked", "hello world"),
        ("GET", "/close", "hello to the close"),
        ("POST", "/chunked", "hello world"),
        ("POST", "/close", "hello to the close"),
    ] {
        let request = match method {
            "POST" => format!("POST {path} HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\n\r\nhi"),
            _ => format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n"),
        };
        c.write_all(request.as_bytes()).expect("send");
        let r = read_one(&mut c);
        assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{method} {path}: {:?}", r.headers);
        assert_eq!(r.body_text(), body, "{method} {path}");
    }
    // Another coding: chunked on top of it, then the next answer on the same connection.
    c.write_all(b"GET /gzip HTTP/1.1\r\nHost: a.test\r\n\r\n").expect("send");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.ends_with(b"\r\n0\r\n\r\n") {
        let n =
            c.read(&mut buf).unwrap_or_else(|e| panic!("GET /gzip: {e}; so far {:?}", String::from_utf8_lossy(&raw)));
        assert!(n > 0, "GET /gzip: closed: {:?}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&raw);
    assert!(text.to_ascii_lowercase().contains("transfer-encoding: gzip, chunked\r\n"), "{text}");
    // (Chunk sizes are hexadecimal, in either case.)
    assert!(
        text.to_ascii_lowercase().ends_with("\r\n\r\nc\r\n(gzip bytes)\r\n0\r\n\r\n"),
        "the coded bytes in one chunk: {text:?}"
    );
    c.write_all(b"GET /chunked HTTP/1.1\r\nHost: a.test\r\n\r\n").expect("send");
    assert_eq!(read_one(&mut c).body_text(), "hello world", "the connection went on after it");
}

#[test]
fn a_client_that_leaves_frees_its_upstream_connection() {
    // The upstream never answers; it reports how long until markco closed its connection.
    let (closed_tx, closed_rx) = mpsc::channel::<Duration>();
    let closed_tx = std::sync::Mutex::new(closed_tx);
    let (up, _) = scripted(move |_, mut s| {
        if read_head(&mut s).is_none() {
            return;
        }
        let t = Instant::now();
        let mut b = [0u8; 64];
        while matches!(s.read(&mut b), Ok(n) if n > 0) {}
        let _ = closed_tx.lock().map(|tx| tx.send(t.elapsed()));
    });
    let m = Markco::start(&config(up));
    let mut c = TcpStream::connect(m.http).expect("connect");
    c.write_all(b"GET /slow HTTP/1.1\r\nHost: a.test\r\n\r\n").expect("send");
    std::thread::sleep(Duration::from_millis(300));
    drop(c);
    let took = closed_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("markco closed the upstream connection after the client left");
    assert!(took < Duration::from_secs(5), "upstream connection closed {took:?} after the request");
}

#[test]
fn informational_answers_are_skipped_and_endless_ones_refused() {
    // Connection 0 sends an Early Hints answer before the real one; later connections send
    // nothing but 100 Continue.
    let (up, _) = scripted(|conn, mut s| {
        if read_head(&mut s).is_none() {
            return;
        }
        if conn == 0 {
            let _ = s.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n");
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal");
        } else {
            for _ in 0..1000 {
                if s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
                    return;
                }
            }
        }
    });
    let m = Markco::start(&config(up));
    let r = http_get(m.http, "/", &[("Host", "a.test")]).expect("GET");
    assert_eq!((r.status, r.body_text().as_str()), (200, "final"));
    let r = http_get(m.http, "/", &[("Host", "a.test")]).expect("GET");
    assert_eq!(r.status, 502, "an upstream that never gives a final answer: {:?}", r.body_text());
}

#[test]
fn a_kept_connection_that_dies_as_a_request_goes_out_is_retried_only_for_idempotent_methods() {
    // Connection 0 answers one request, then takes the next and closes without answering (an
    // upstream closing an idle connection just as markco reuses it). Later connections answer,
    // counting what they saw.
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    let (up, accepted) = scripted(move |conn, mut s| {
        while let Some(head) = read_head(&mut s) {
            let line = head.lines().next().unwrap_or_default().to_string();
            if let Ok(mut l) = log.lock() {
                l.push(format!("conn-{conn} {line}"));
            }
            if (conn == 0 && line.starts_with("GET /second")) || line.starts_with("POST /second") {
                return; // closes without an answer
            }
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    let m = Markco::start(&config(up));
    let get = |method: &str, path: &str| request(m.http, method, path, &[("Host", "a.test")], b"").expect("request");
    assert_eq!(get("GET", "/first").status, 200);
    let r = get("GET", "/second");
    assert_eq!(r.status, 200, "a GET is sent again on a new connection: {:?}", r.body_text());
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // The same for a POST without a body: sent once, and the client gets 502.
    assert_eq!(get("GET", "/third").status, 200);
    let r = get("POST", "/second");
    assert_eq!(r.status, 502, "a POST is not sent twice: {:?}", r.body_text());
    let posts = seen.lock().map(|l| l.iter().filter(|l| l.contains("POST /second")).count()).unwrap_or(0);
    assert_eq!(posts, 1, "the upstream saw the POST once: {:?}", seen.lock().map(|l| l.clone()));
}

#[test]
fn bytes_an_upstream_sends_on_an_idle_connection_never_answer_a_later_request() {
    // Connection 0 answers its first request, then writes a stray response while idle.
    let (up, accepted) = scripted(|conn, mut s| {
        let mut n = 0;
        while read_head(&mut s).is_some() {
            let body = format!("conn-{conn} req-{n}");
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            if conn == 0 {
                // Later, once markco has read the answer and pooled the connection.
                std::thread::sleep(Duration::from_millis(100));
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTALE");
            }
            n += 1;
        }
    });
    let m = Markco::start(&config(up));
    let get = || http_get(m.http, "/", &[("Host", "a.test")]).expect("GET").body_text();
    assert_eq!(get(), "conn-0 req-0");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(), "conn-1 req-0", "the connection with stray bytes is not reused");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[test]
fn every_framing_written_a_byte_at_a_time_reaches_the_client_whole() {
    // markco reads these answers itself (`proxy/src/h1.rs`): each one is written a byte at a
    // time, so every boundary of the head, the chunk lines and the trailers falls inside a
    // read. One upstream connection serves them all, in turn, so each answer must also end
    // exactly where its framing says.
    let answers: [&[u8]; 5] = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Case: Kept\r\n\r\nlength",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;name=\"a b\"\r\nchun\r\n3\r\nked\r\n0\r\nX-Trailer: dropped\r\n\r\n",
        // `chunked,` is chunked (empty list elements do not count, RFC 9110 5.6.1): the client
        // must get a body framed as chunked under a header that says so, not the decoded bytes
        // under `chunked,` (which a client would parse as chunks: `0\r\n\r\n` in a body would
        // end it early, and what follows would be read as the next answer).
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\n\r\n7\r\n0\r\n\r\nX!\r\n0\r\n\r\n",
        // An HTTP/1.0 upstream that keeps the connection open when asked to, folding a header.
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nX-Folded: a\r\n b\r\nContent-Length: 4\r\n\r\n1.0!",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ];
    let (up, accepted) = scripted(move |_, mut s| {
        // Each byte its own segment.
        let _ = s.set_nodelay(true);
        for answer in answers {
            if read_head(&mut s).is_none() {
                return;
            }
            for b in answer {
                if s.write_all(&[*b]).is_err() {
                    return;
                }
                let _ = s.flush();
            }
        }
    });
    let m = Markco::start(&config(up));
    let mut c = TcpStream::connect(m.http).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut get = || {
        c.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").expect("send");
        read_one(&mut c)
    };
    let r = get();
    assert_eq!((r.status, r.body_text().as_str()), (200, "length"));
    assert_eq!(r.header("x-case"), Some("Kept"));
    let r = get();
    assert_eq!((r.status, r.body_text().as_str()), (200, "chunked"), "{:?}", r.headers);
    let r = get();
    assert_eq!((r.status, r.body_text().as_str()), (200, "0\r\n\r\nX!"), "{:?}", r.headers);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    let r = get();
    assert_eq!((r.status, r.body_text().as_str()), (200, "1.0!"));
    let folded = r.header("x-folded").expect("the folded header is relayed");
    assert!(folded.starts_with('a') && folded.ends_with('b') && !folded.contains('\n'), "{folded:?}");
    let r = get();
    assert_eq!((r.status, r.body_text().as_str()), (204, ""));
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one upstream connection carried all five");
}

#[test]
fn an_answer_followed_by_more_bytes_is_relayed_alone_and_its_connection_dropped() {
    // Connection 0 writes a second response right behind its first, in the same write: a
    // broken or hostile upstream. Those bytes must never answer another request.
    let (up, accepted) = scripted(|conn, mut s| {
        let mut n = 0;
        while read_head(&mut s).is_some() {
            let body = format!("conn-{conn} req-{n}");
            let extra = if conn == 0 { "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTALE" } else { "" };
            // One write, so that markco reads the extra bytes with the answer (the pool's check
            // at checkout would find bytes that came later).
            let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}{extra}", body.len());
            let _ = s.write_all(answer.as_bytes());
            n += 1;
        }
    });
    let m = Markco::start(&config(up));
    let get = || http_get(m.http, "/", &[("Host", "a.test")]).expect("GET").body_text();
    assert_eq!(get(), "conn-0 req-0");
    assert_eq!(get(), "conn-1 req-0", "the connection that sent too much is not reused");
    assert_eq!(get(), "conn-1 req-1");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[test]
fn an_upstreams_keep_alive_timeout_is_honoured() {
    // The upstream says how long it keeps an idle connection (`Keep-Alive: timeout=N`, as
    // Node.js does), and here never closes one itself, so only markco decides: it reuses a
    // connection for at most N - 1 seconds, and not at all when N is 1.
    let (up, accepted) = scripted(|conn, mut s| {
        let mut n = 0;
        while read_head(&mut s).is_some() {
            let body = format!("conn-{conn} req-{n}");
            let timeout = if conn == 0 { 1 } else { 2 };
            let answer = format!(
                "HTTP/1.1 200 OK\r\nKeep-Alive: timeout={timeout}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(answer.as_bytes());
            n += 1;
        }
    });
    let m = Markco::start(&config(up));
    let get = || http_get(m.http, "/", &[("Host", "a.test")]).expect("GET").body_text();
    assert_eq!(get(), "conn-0 req-0");
    assert_eq!(get(), "conn-1 req-0", "a connection the upstream keeps 1 s is not pooled");
    assert_eq!(get(), "conn-1 req-1", "one kept 2 s is reused at once");
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(get(), "conn-2 req-0", "but not after 1 s idle");
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}
