//! A user's runtime and editor run that user's code, so whatever they answer is hostile input.
//! Each kind of hostile answer is given to the `update-port` probe, to the editor notification
//! and to a refused websocket upgrade on `/r/<id>/`. After each, the call it hit is answered in
//! bounded time, another user's runtime move still works at its normal speed, and the gateway
//! serves everyone else.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CONFIG: &str = r#"
[server]
http = "{http}"
admin = "{admin}"
upgrade_sock = "{dir}/upgrade.sock"
pid_file = "{dir}/markco.pid"

[database]
url = "sqlite://{dir}/markco.db"

[runtime_moves]
max_moves = 1000
window = "10m"
probe_timeout = "1s"
notify_timeout = "1s"

[log]
access_log = false

[[site]]
hosts = ["*"]

  [[site.route]]
  name = "runtime"
  match = ["/r/*"]
  runtime = true

  [[site.route]]
  name = "workspace"
  match = ["/u/*"]
  workspace = true
"#;

/// The hostile answers, each given after the peer read the request head.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// A chunk size near `usize::MAX`: what used to panic the control plane.
    HugeChunkSize,
    /// A chunk size with more hex digits than fit in 64 bits.
    OverflowingChunkSize,
    NonHexChunkSize,
    /// A chunk longer than its size says, no CRLF where one must be.
    BadChunkFraming,
    /// Chunks forever.
    EndlessChunks,
    OverflowingContentLength,
    ConflictingContentLengths,
    /// Header lines forever, never the empty line.
    EndlessHeader,
    /// One header line of 1 MiB.
    HugeHeader,
    /// A body announced as a gigabyte, trickled forever.
    EndlessBody,
    /// 10 MiB of body at full speed.
    HugeBody,
    NotAStatusLine,
    BinaryGarbage,
    /// A good answer, later than any timeout.
    TooSlow,
    /// The connection reset half-way through the body.
    ResetMidBody,
    /// Closed without a byte.
    CloseAtOnce,
    /// Not hostile: a well-formed chunked refusal, relayed as it is.
    ChunkedRefusal,
}

const KINDS: [Kind; 16] = [
    Kind::HugeChunkSize,
    Kind::OverflowingChunkSize,
    Kind::NonHexChunkSize,
    Kind::BadChunkFraming,
    Kind::EndlessChunks,
    Kind::OverflowingContentLength,
    Kind::ConflictingContentLengths,
    Kind::EndlessHeader,
    Kind::HugeHeader,
    Kind::EndlessBody,
    Kind::HugeBody,
    Kind::NotAStatusLine,
    Kind::BinaryGarbage,
    Kind::TooSlow,
    Kind::ResetMidBody,
    Kind::CloseAtOnce,
];

/// Hostile peers on a runtime of their own; dropped with it.
struct Peers {
    rt: tokio::runtime::Runtime,
}

impl Peers {
    fn new() -> Peers {
        Peers {
            rt: tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime"),
        }
    }

    /// A listener answering every connection the `kind` way.
    fn start(&self, kind: Kind) -> SocketAddr {
        let listener = self.rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        self.rt.spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(answer(s, kind));
            }
        });
        addr
    }
}

async fn answer(mut s: TcpStream, kind: Kind) {
    // The request head (what is in it does not matter).
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
    let ok_chunked = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    let _ = match kind {
        Kind::HugeChunkSize => s.write_all(format!("{ok_chunked}ffffffffffffffff\r\n{{}}\r\n").as_bytes()).await,
        Kind::OverflowingChunkSize => {
            s.write_all(format!("{ok_chunked}fffffffffffffffffffffffff\r\n{{}}\r\n0\r\n\r\n").as_bytes()).await
        }
        Kind::NonHexChunkSize => s.write_all(format!("{ok_chunked}zz\r\n{{}}\r\n0\r\n\r\n").as_bytes()).await,
        Kind::BadChunkFraming => s.write_all(format!("{ok_chunked}2\r\n{{}}xyz0\r\n\r\n").as_bytes()).await,
        Kind::EndlessChunks => {
            let _ = s.write_all(ok_chunked.as_bytes()).await;
            while s.write_all(b"400\r\n").await.is_ok() && s.write_all(&[b'a'; 1024]).await.is_ok() {
                if s.write_all(b"\r\n").await.is_err() {
                    break;
                }
            }
            Ok(())
        }
        Kind::OverflowingContentLength => {
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999999\r\n\r\n{}").await
        }
        Kind::ConflictingContentLengths => {
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 7\r\n\r\n{}").await
        }
        Kind::EndlessHeader => {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n").await;
            while s.write_all(b"X-More: yes\r\n").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(())
        }
        Kind::HugeHeader => {
            let mut h = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
            h.extend(std::iter::repeat_n(b'a', 1024 * 1024));
            h.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\n{}");
            s.write_all(&h).await
        }
        Kind::EndlessBody => {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n").await;
            while s.write_all(b"a").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        }
        Kind::HugeBody => {
            let _ = s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 10 << 20).as_bytes()).await;
            let block = vec![b'a'; 64 * 1024];
            for _ in 0..160 {
                if s.write_all(&block).await.is_err() {
                    break;
                }
            }
            Ok(())
        }
        Kind::NotAStatusLine => s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await,
        Kind::BinaryGarbage => s.write_all(&[0u8, 0xff, 0xfe, 0x13, 0x37, b'\r', b'\n', b'\r', b'\n', 0x80]).await,
        Kind::TooSlow => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").await
        }
        Kind::ResetMidBody => {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"partial\":").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            // A zero linger makes the close a reset, and a drop that does not block.
            #[allow(deprecated)]
            let _ = s.set_linger(Some(Duration::ZERO));
            drop(s);
            return;
        }
        Kind::CloseAtOnce => return,
        Kind::ChunkedRefusal => {
            s.write_all(b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nno \r\n2\r\nws\r\n0\r\n\r\n")
                .await
        }
    };
    // Then close, as a runtime that said its piece does: the reader has it all and must cope.
    let _ = s.shutdown().await;
}

fn move_to(m: &Markco, user: &str, port: u16) -> (Resp, Duration) {
    let body = serde_json::json!({"userId": user, "port": port, "host": "127.0.0.1"}).to_string();
    let started = Instant::now();
    let r =
        request(m.admin, "POST", "/api/runtime/update-port", &[("Content-Type", "application/json")], body.as_bytes())
            .expect("update-port answers");
    (r, started.elapsed())
}

fn runtime_name(m: &Markco, user: &str, token: &str) -> String {
    let r =
        http_get(m.http, &format!("/r/{user}/whoami"), &[("Authorization", &format!("Bearer {token}"))]).expect("get");
    assert_eq!(r.status, 200, "{}", r.body_text());
    r.json()["name"].as_str().unwrap_or_default().to_string()
}

/// Bob, the bystander: his runtime moves between two good runtimes, quickly, after every hostile
/// answer somebody else got.
struct Bystander {
    user: String,
    token: String,
    runtimes: [Upstream; 2],
    _editor: Upstream,
    moves: usize,
}

impl Bystander {
    fn new(m: &Markco) -> Bystander {
        let (user, token) = add_user(m, "bob@example.com");
        let editor = Upstream::start("bob-editor");
        let runtimes = [Upstream::start("bob-one"), Upstream::start("bob-two")];
        put_workspace(m, &user, editor.addr, runtimes[0].addr);
        Bystander { user, token, runtimes, _editor: editor, moves: 0 }
    }

    fn still_served(&mut self, m: &Markco, after: &str) {
        self.moves += 1;
        let to = &self.runtimes[self.moves % 2];
        let (r, took) = move_to(m, &self.user, to.addr.port());
        assert_eq!(r.status, 200, "after {after}: Bob's move failed: {}", r.body_text());
        assert_eq!(r.json()["editor_notified"], true, "after {after}: {}", r.body_text());
        assert!(took < Duration::from_secs(1), "after {after}: Bob's move took {took:?}");
        assert_eq!(runtime_name(m, &self.user, &self.token), to.name, "after {after}");
    }
}

/// Sends `req` and reads until the answer's head is in (or the connection closed, or 25 s
/// passed); how long that took.
fn answer_head(addr: SocketAddr, req: &[u8]) -> (Vec<u8>, Duration) {
    use std::io::{Read, Write};
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(25))).expect("timeout");
    s.write_all(req).expect("send");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(n) if n > 0 => raw.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    (raw, started.elapsed())
}

#[test]
fn hostile_answers_to_the_update_port_probe() {
    let m = Markco::start(CONFIG);
    let peers = Peers::new();
    let mut bob = Bystander::new(&m);
    let (eve, eve_token) = add_user(&m, "eve@example.com");
    let editor = Upstream::start("eve-editor");
    let runtime = Upstream::start("eve-runtime");
    put_workspace(&m, &eve, editor.addr, runtime.addr);
    for kind in KINDS {
        let hostile = peers.start(kind);
        let (r, took) = move_to(&m, &eve, hostile.port());
        // probe_timeout is 1 s: refused within it (and a little).
        assert_eq!(r.status, 409, "{kind:?}: {}", r.body_text());
        assert!(took < Duration::from_secs(3), "{kind:?}: the refused move took {took:?}");
        assert_eq!(runtime_name(&m, &eve, &eve_token), "eve-runtime", "{kind:?}: Eve was moved anyway");
        bob.still_served(&m, &format!("{kind:?} on the probe"));
    }
}

#[test]
fn hostile_answers_to_the_editor_notification() {
    let m = Markco::start(CONFIG);
    let peers = Peers::new();
    let mut bob = Bystander::new(&m);
    let (eve, eve_token) = add_user(&m, "eve@example.com");
    let runtimes = [Upstream::start("eve-one"), Upstream::start("eve-two")];
    for (i, kind) in KINDS.into_iter().enumerate() {
        // Eve's editor answers the notification the hostile way.
        let hostile = peers.start(kind);
        let from = &runtimes[i % 2];
        let to = &runtimes[(i + 1) % 2];
        put_workspace(&m, &eve, hostile, from.addr);
        let (r, took) = move_to(&m, &eve, to.addr.port());
        // The move itself is done (the runtime answered); the editor was not told.
        assert_eq!(r.status, 200, "{kind:?}: {}", r.body_text());
        assert_eq!(r.json()["editor_notified"], false, "{kind:?}: {}", r.body_text());
        assert!(took < Duration::from_secs(3), "{kind:?}: the move took {took:?}");
        assert_eq!(runtime_name(&m, &eve, &eve_token), to.name, "{kind:?}");
        bob.still_served(&m, &format!("{kind:?} on the notification"));
    }
}

#[test]
fn hostile_answers_to_a_websocket_upgrade_on_the_runtime_route() {
    let m = Markco::start(CONFIG);
    let peers = Peers::new();
    let mut bob = Bystander::new(&m);
    // One user per kind, all upgrading at once while Bob keeps being served.
    let mut eves = Vec::new();
    for (i, kind) in KINDS.into_iter().enumerate() {
        let (user, token) = add_user(&m, &format!("eve{i}@example.com"));
        // Editors are not asked here; each workspace needs an address of its own all the same.
        let editor: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        put_workspace(&m, &user, editor, peers.start(kind));
        eves.push((kind, user, token));
    }
    let http = m.http;
    let upgrades: Vec<_> = eves
        .into_iter()
        .map(|(kind, user, token)| {
            std::thread::spawn(move || {
                let req = format!(
                    "GET /r/{user}/ws HTTP/1.1\r\nHost: {http}\r\nAuthorization: Bearer {token}\r\n\
                     Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                );
                let (raw, took) = answer_head(http, req.as_bytes());
                (kind, raw, took)
            })
        })
        .collect();
    // While the upgrades are being answered, Bob is served and moved as usual.
    for i in 0..3 {
        bob.still_served(&m, &format!("upgrades in flight ({i})"));
        std::thread::sleep(Duration::from_millis(300));
    }
    for t in upgrades {
        let (kind, raw, took) = t.join().expect("upgrade thread");
        let head = String::from_utf8_lossy(raw.get(..raw.len().min(64)).unwrap_or_default()).to_string();
        // Never a 101, never a hang: an error status, or at worst the connection closed.
        assert!(!head.starts_with("HTTP/1.1 101"), "{kind:?}: upgraded on a hostile answer: {head}");
        // The tunnel's head reader treats a Content-Length it cannot parse as absent, so that
        // body ends at the close and is relayed (bounded, with its own Content-Length).
        if kind != Kind::OverflowingContentLength {
            assert!(raw.is_empty() || head.starts_with("HTTP/1.1 5"), "{kind:?}: unexpected answer {head:?}");
        }
        assert!(took < Duration::from_secs(20), "{kind:?}: the refused upgrade took {took:?}");
    }
    bob.still_served(&m, "every hostile upgrade");

    // A well-formed refusal still reaches the client whole.
    let (user, token) = add_user(&m, "refused@example.com");
    let editor: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    put_workspace(&m, &user, editor, peers.start(Kind::ChunkedRefusal));
    let req = format!(
        "GET /r/{user}/ws HTTP/1.1\r\nHost: {http}\r\nAuthorization: Bearer {token}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    // The connection may stay open after the answer: read one whole response.
    let r = raw_exchange_one(http, req.as_bytes(), Duration::from_secs(10)).expect("one whole response");
    assert_eq!((r.status, r.body_text().as_str()), (403, "no ws"));
    assert!(m.log().lines().all(|l| !l.contains("panicked")), "{}", m.log());
}

/// The runtime health loop probes every running workspace's runtime: with one runtime of each
/// hostile kind, it keeps its rhythm, never panics, and Bob's runtime keeps passing and moving.
/// Needs podman (`MARKCO_PODMAN_SOCKET`): the loop runs only when markco manages containers. No
/// container is started (the workspaces are registered through the admin API).
#[test]
fn hostile_answers_to_the_runtime_health_probe() {
    let socket = std::env::var("MARKCO_PODMAN_SOCKET").unwrap_or_else(|_| "/run/podman/podman.sock".into());
    let config = CONFIG.to_string()
        + &format!(
            "\n[workspaces]\nengine = \"unix://{socket}\"\ndata_dir = \"{{dir}}/users\"\n\
             health_interval = \"200ms\"\nidle_timeout = \"1h\"\n"
        );
    let m = Markco::start(&config);
    let peers = Peers::new();
    let mut bob = Bystander::new(&m);
    for (i, kind) in KINDS.into_iter().enumerate() {
        let (user, _) = add_user(&m, &format!("eve{i}@example.com"));
        let editor: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        put_workspace(&m, &user, editor, peers.start(kind));
    }
    let failures = |m: &Markco| metric_value(&m.metrics(), "markco_workspace_probe_failures_total", &[]).unwrap_or(0.0);
    // Every hostile runtime fails its probes, round after round (a round is bounded by the
    // probe's 2 s timeout, whatever the runtimes answer).
    eventually(Duration::from_secs(15), "two rounds of failed probes", || failures(&m) >= 2.0 * KINDS.len() as f64);
    let before = failures(&m);
    bob.still_served(&m, "hostile health probes");
    eventually(Duration::from_secs(15), "the health loop goes on", || failures(&m) >= before + KINDS.len() as f64);
    let metrics = m.metrics();
    assert_eq!(
        metric_value(&metrics, "markco_task_restarts_total", &[("task", "runtime_health")]),
        Some(0.0),
        "the runtime health loop panicked:\n{}",
        m.log()
    );
    bob.still_served(&m, "more hostile health probes");
    assert!(m.log().lines().all(|l| !l.contains("panicked")), "{}", m.log());
}
