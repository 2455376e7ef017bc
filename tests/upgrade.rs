//! Zero-downtime binary upgrade: `markco run --upgrade` takes the listeners over from a running
//! markco, which then gets SIGQUIT, while keep-alive clients send at least 50,000 requests and
//! 100 websockets are open on the old process. No request may fail; the old websockets keep
//! working through the grace period and then end; websockets opened after the handover land on
//! the new process. The figures are printed (run with `--nocapture` to see them).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const GRACE: u64 = 4;

fn config(upstream: SocketAddr) -> String {
    format!(
        r#"
[server]
http = "{{http}}"
admin = "{{admin}}"
upgrade_sock = "{{dir}}/upgrade.sock"
pid_file = "{{dir}}/markco.pid"
grace_period = "{GRACE}s"
shutdown_timeout = "2s"

[database]
url = "sqlite://{{dir}}/markco.db"

[log]
access_log = false

[[site]]
hosts = ["*"]

  [[site.route]]
  name = "ws"
  match = ["/ws/*"]
  proxy = "{upstream}"

  [[site.route]]
  name = "load"
  match = ["/*"]
  respond = "ok\n"
"#
    )
}

#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Connections the server closed after answering with `Connection: close` (draining).
    closed_by_server: AtomicU64,
    /// An idle kept-alive connection closed by the server before it read our next request:
    /// resent on a new connection, as HTTP clients do for idempotent requests (RFC 9112 9.3.1).
    resent: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Stats {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if e.len() < 20 {
            e.push(why);
        }
    }
}

/// One keep-alive client: GET /load again and again, a new connection only when the server says
/// `Connection: close`.
fn client(addr: SocketAddr, stop: Arc<AtomicBool>, stats: Arc<Stats>) {
    let mut conn: Option<BufReader<TcpStream>> = None;
    let mut reused = false;
    while !stop.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match TcpStream::connect(addr) {
                Ok(s) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    let _ = s.set_nodelay(true);
                    reused = false;
                    conn.insert(BufReader::new(s))
                }
                Err(e) => {
                    stats.fail(format!("connect: {e}"));
                    continue;
                }
            },
        };
        if let Err(e) = c.get_mut().write_all(b"GET /load HTTP/1.1\r\nHost: upgrade.test\r\n\r\n") {
            if reused {
                stats.resent.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.fail(format!("send on a new connection: {e}"));
            }
            conn = None;
            continue;
        }
        let mut status = String::new();
        match c.read_line(&mut status) {
            Ok(0) | Err(_) if reused && status.is_empty() => {
                stats.resent.fetch_add(1, Ordering::Relaxed);
                conn = None;
                continue;
            }
            Ok(0) => {
                stats.fail("closed without an answer on a new connection".into());
                conn = None;
                continue;
            }
            Err(e) => {
                stats.fail(format!("reading the status line: {e}"));
                conn = None;
                continue;
            }
            Ok(_) => {}
        }
        let (mut length, mut close) = (0usize, false);
        loop {
            let mut line = String::new();
            if c.read_line(&mut line).unwrap_or(0) == 0 {
                stats.fail(format!("cut in the header after {status:?}"));
                close = true;
                break;
            }
            let l = line.trim_end().to_ascii_lowercase();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if l.starts_with("connection:") && l.contains("close") {
                close = true;
            }
        }
        let mut body = vec![0u8; length];
        let body_ok = c.read_exact(&mut body).is_ok();
        if status.starts_with("HTTP/1.1 200") && body_ok && body == b"ok\n" {
            stats.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.fail(format!("answer {:?} body {:?}", status.trim_end(), String::from_utf8_lossy(&body)));
            close = true;
        }
        if close {
            stats.closed_by_server.fetch_add(1, Ordering::Relaxed);
            conn = None;
        } else {
            reused = true;
        }
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open_ws(addr: SocketAddr, i: usize) -> Ws {
    let url = format!("ws://{addr}/ws/{i}");
    let (mut ws, _) =
        match tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(url.as_str())).await {
            Ok(Ok(ok)) => ok,
            Ok(Err(e)) => panic!("websocket {i}: {e}"),
            Err(_) => panic!("websocket {i}: no upgrade within 10s"),
        };
    echo(&mut ws, &format!("hello {i}")).await.unwrap_or_else(|e| panic!("websocket {i}: {e}"));
    ws
}

async fn echo(ws: &mut Ws, text: &str) -> Result<(), String> {
    ws.send(Message::text(text)).await.map_err(|e| format!("send: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text => Ok(()),
        other => Err(format!("no echo: {other:?}")),
    }
}

/// How a websocket ended: a Close frame, or the connection ending without one.
async fn until_closed(mut ws: Ws) -> (Instant, String) {
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => {
                return (Instant::now(), format!("close frame {:?}", frame.map(|f| u16::from(f.code))))
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return (Instant::now(), format!("ended without a close frame: {e}")),
            None => return (Instant::now(), "ended without a close frame: EOF".into()),
        }
    }
}

#[test]
fn upgrade_under_load_drops_nothing() {
    let upstream = Upstream::start("ws-echo");
    let old = Markco::start(&config(upstream.addr));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");

    // 100 websockets on the old process.
    let old_ws: Vec<Ws> = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..100 {
            v.push(open_ws(old.http, i).await);
        }
        v
    });
    let gauge = |m: &str| metric_value(m, "markco_websockets_open", &[("route", "ws")]).unwrap_or(-1.0);
    assert_eq!(gauge(&old.metrics()), 100.0);

    // Keep-alive load through the whole upgrade.
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (stop, stats, addr) = (stop.clone(), stats.clone(), old.http);
            std::thread::spawn(move || client(addr, stop, stats))
        })
        .collect();
    eventually(Duration::from_secs(20), "load running", || stats.ok.load(Ordering::Relaxed) > 2000);

    // The new binary waits on the upgrade socket; then the old one gets SIGQUIT.
    let sock = old.dir.path().join("upgrade.sock");
    let _ = std::fs::remove_file(&sock);
    let log = std::fs::File::create(old.dir.path().join("markco-new.log")).expect("log");
    let new = Command::new(markco_bin())
        .args(["run", "--upgrade", "--config"])
        .arg(&old.config_path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the new markco");
    let mut new = Proc { child: new };
    eventually(Duration::from_secs(20), "the new process listens on the upgrade socket", || sock.exists());
    let before = stats.ok.load(Ordering::Relaxed);
    let sigquit = Instant::now();
    signal(old.pid(), libc::SIGQUIT);

    // Old websockets: still served during the grace period (the old process stops accepting
    // ~5 s after SIGQUIT, Pingora's fixed close timeout, then serves open connections for
    // grace_period).
    let mut old_ws = old_ws;
    std::thread::sleep(Duration::from_secs(5 + GRACE / 2));
    rt.block_on(async {
        for (i, ws) in old_ws.iter_mut().enumerate() {
            echo(ws, &format!("still there {i}"))
                .await
                .unwrap_or_else(|e| panic!("old websocket {i} in the grace period: {e}"));
        }
    });
    // New websockets now land on the new process (the old one no longer accepts).
    let new_ws: Vec<Ws> = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..20 {
            v.push(open_ws(old.http, 1000 + i).await);
        }
        v
    });
    let ends = rt.block_on(async {
        let waits: Vec<_> = old_ws.into_iter().map(|ws| tokio::spawn(until_closed(ws))).collect();
        let mut out = Vec::new();
        for w in waits {
            out.push(
                tokio::time::timeout(Duration::from_secs(30), w).await.expect("old websocket ends").expect("join"),
            );
        }
        out
    });
    let mut old = old;
    eventually(Duration::from_secs(20), "the old process exits", || !old.alive());
    let old_exit = sigquit.elapsed();
    // At least 50,000 requests in all, some of them on the new process alone.
    let at_exit = stats.ok.load(Ordering::Relaxed);
    eventually(Duration::from_secs(120), "50,000 requests", || {
        let ok = stats.ok.load(Ordering::Relaxed);
        ok >= 50_000 && ok > at_exit + 1000
    });
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    assert!(matches!(new.child.try_wait(), Ok(None)), "the new process runs");

    let earliest = ends.iter().map(|(t, _)| t.duration_since(sigquit)).min().unwrap_or_default();
    let latest = ends.iter().map(|(t, _)| t.duration_since(sigquit)).max().unwrap_or_default();
    let mut how: Vec<String> = ends.iter().map(|(_, h)| h.clone()).collect();
    how.sort();
    how.dedup();
    let ok = stats.ok.load(Ordering::Relaxed);
    let failed = stats.failed.load(Ordering::Relaxed);
    println!(
        "upgrade: {ok} requests ({} after SIGQUIT), {failed} failed, {} connections closed by the draining server, {} idle kept-alive connections closed under a request (resent); \
         100 old websockets answered {}s after SIGQUIT and ended {:.1}-{:.1}s after it ({how:?}); old process exited {:.1}s after SIGQUIT",
        ok - before,
        stats.closed_by_server.load(Ordering::Relaxed),
        stats.resent.load(Ordering::Relaxed),
        5 + GRACE / 2,
        earliest.as_secs_f64(),
        latest.as_secs_f64(),
        old_exit.as_secs_f64()
    );
    let errors = stats.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(failed, 0, "failed requests: {errors:#?}");
    assert_eq!(stats.resent.load(Ordering::Relaxed), 0, "no kept-alive connection is closed under a request");
    assert!(ok >= 50_000, "only {ok} requests");
    assert!(ok - before > 1000, "the load ran through the upgrade");
    // They get their Close frame in the last 1.5 s of the grace period (kept for the handshake).
    assert!(
        earliest >= Duration::from_millis((5 + GRACE) * 1000 - 2000),
        "old websockets live through the grace period; the first ended {earliest:?} after SIGQUIT"
    );
    assert!(latest <= old_exit, "old websockets end before the old process exits ({latest:?}, {old_exit:?})");
    assert!(how.iter().all(|h| h.starts_with("close frame")), "old websockets end with a close frame: {how:?}");

    // The new websockets are the new process's: it counts exactly them, and they outlive the old.
    let admin = SocketAddr::from(([127, 0, 0, 1], old.admin.port()));
    let text = http_get(admin, "/metrics", &[]).expect("metrics of the new process").body_text();
    assert_eq!(gauge(&text), 20.0, "the new process holds the 20 new websockets");
    rt.block_on(async {
        let mut new_ws = new_ws;
        for (i, ws) in new_ws.iter_mut().enumerate() {
            echo(ws, &format!("after {i}"))
                .await
                .unwrap_or_else(|e| panic!("new websocket {i} after the old exit: {e}"));
        }
    });
    let _ = new.child.kill();
    let _ = new.child.wait();
}
