//! 10,000 idle websockets through markco all still relay a message after idling.
//!
//! Each websocket costs markco two file descriptors (client and upstream), so the count is
//! 10,000 where the open-file limit allows it and as many as it allows otherwise (the count and
//! the limit are printed; below 1,000 the test is skipped with a message, since that would no
//! longer test scale). Alone in its test binary: it needs most of the machine's descriptors.

#[allow(clippy::while_let_loop)]
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WANTED: usize = 10_000;

fn nofile_limit() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    // Raise the soft limit to the hard one; markco and the upstream inherit it.
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: as above; raising the soft limit up to the hard limit is always allowed.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
}

async fn open(addr: SocketAddr, i: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect #{i}: {e}"));
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .expect("handshake");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut b))
            .await
            .unwrap_or_else(|_| panic!("websocket #{i}: no 101 within 60 s"))
            .expect("read the 101");
        assert!(n == 1, "websocket #{i}: closed during the handshake: {:?}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "websocket #{i}: {:?}", String::from_utf8_lossy(&head));
    s
}

/// One masked text frame out, its unmasked echo back.
async fn echo(s: &mut TcpStream, i: usize) {
    let msg = format!("hello {i:05}");
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81, 0x80 | msg.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(msg.bytes().enumerate().map(|(j, b)| b ^ mask[j % 4]));
    s.write_all(&frame).await.expect("send a frame");
    let mut hdr = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(60), s.read_exact(&mut hdr))
        .await
        .unwrap_or_else(|_| panic!("websocket #{i}: no echo within 60 s"))
        .unwrap_or_else(|e| panic!("websocket #{i} was closed while idle: {e}"));
    let mut body = vec![0u8; usize::from(hdr[1] & 0x7f)];
    s.read_exact(&mut body).await.expect("echo body");
    assert_eq!(hdr[0], 0x81, "websocket #{i}: a text frame back");
    assert_eq!(body, msg.as_bytes(), "websocket #{i}: its own message back");
}

#[test]
fn ten_thousand_idle_websockets_all_relay_after_idling() {
    let limit = nofile_limit();
    // markco holds two descriptors per websocket, plus its listeners, database and logs.
    let count = WANTED.min(limit.saturating_sub(600) / 2);
    if count < 1000 {
        println!("SKIPPED: the open-file limit is {limit}; 10,000 websockets need about 20,600 (raise `ulimit -Hn`)");
        return;
    }
    println!("opening {count} websockets (wanted {WANTED}; open-file limit {limit})");
    let up = Upstream::start("app");
    let m = Markco::start(&format!(
        r#"
[server]
http = "{{http}}"
admin = "{{admin}}"
upgrade_sock = "{{dir}}/upgrade.sock"
pid_file = "{{dir}}/markco.pid"
max_connections_per_ip = {per_ip}
max_connections = {per_ip}
websocket_idle_timeout = "10m"
# Thousands of upstream connections are opened at once on a busy test machine.
upstream_connect_timeout = "30s"
[log]
access_log = false
[[site]]
hosts = ["app"]
  [[site.route]]
  match = ["/*"]
  proxy = "{up}"
"#,
        per_ip = count + 100,
        up = up.addr
    ));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let before_kib = m.rss_kib();
    let started = Instant::now();
    let mut socks = rt.block_on(async {
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(128));
        let mut tasks = Vec::with_capacity(count);
        for i in 0..count {
            let sem = sem.clone();
            let addr = m.http;
            tasks.push(tokio::spawn(async move {
                let _p = sem.acquire().await.expect("semaphore");
                open(addr, i).await
            }));
        }
        let mut out = Vec::with_capacity(count);
        for t in tasks {
            out.push(t.await.expect("open task"));
        }
        out
    });
    let opened_in = started.elapsed();
    std::thread::sleep(Duration::from_secs(5)); // idle
    let open_kib = m.rss_kib();
    rt.block_on(async {
        let mut tasks = Vec::with_capacity(count);
        for (i, mut s) in socks.drain(..).enumerate() {
            tasks.push(tokio::spawn(async move {
                echo(&mut s, i).await;
                s
            }));
        }
        for t in tasks {
            socks.push(t.await.expect("echo task"));
        }
    });
    let per_ws = open_kib.saturating_sub(before_kib) as f64 / count as f64;
    println!(
        "{count} websockets opened in {opened_in:?}, idled 5 s, all relayed; markco RSS {before_kib} -> {open_kib} KiB \
         ({per_ws:.1} KiB per websocket, debug build)"
    );
    let metrics = m.metrics();
    let open_gauge = metric_value(&metrics, "markco_websockets_open", &[]).expect("the websocket gauge is exported");
    assert_eq!(open_gauge as usize, count, "every tunnel is counted as open");
    drop(socks);
    eventually(Duration::from_secs(30), "the gauge returns to 0 once the clients close", || {
        metric_value(&m.metrics(), "markco_websockets_open", &[]) == Some(0.0)
    });
}
