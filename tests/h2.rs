//! HTTP/2 over TLS, driven by a real HTTP/2 client (the `h2` crate over rustls, ALPN `h2`):
//! markco runs its own accept loop over Pingora's HTTP/2 sessions, answering streams without a
//! request body itself and handing the others to Pingora's proxy. These tests hold that loop to
//! what a client sees: many streams of both kinds on one connection, an idle connection closed
//! (but never one with a stream in flight), and a graceful shutdown that finishes open streams.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use rustls::pki_types::ServerName;

const STEP: Duration = Duration::from_secs(20);

struct Site {
    m: Markco,
    cfg: Arc<rustls::ClientConfig>,
}

/// markco with a self-signed certificate for `localhost`, a fixed answer at `/fixed` and the
/// test upstream behind everything else.
fn start(up: SocketAddr, server_extra: &str) -> Site {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = tls::write_localhost_cert(dir.path());
    let template = format!(
        r#"[server]
http = "{{http}}"
https = "{{https}}"
admin = "{{admin}}"
upgrade_sock = "{{dir}}/upgrade.sock"
pid_file = "{{dir}}/markco.pid"
{server_extra}

[[site]]
hosts = ["localhost"]
tls = {{ cert = "{{dir}}/site.pem", key = "{{dir}}/site.key" }}

  [[site.route]]
  name = "fixed"
  match = ["/fixed"]
  respond = "fixed\n"

  [[site.route]]
  name = "app"
  match = ["/*"]
  proxy = "{up}"
"#
    );
    let m = Markco::start_in(dir, Ports::free(), &template, &[]);
    Site { m, cfg: tls::client_config(&[cert], &[b"h2"]) }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

/// An HTTP/2 connection: the request sender, and the task driving the connection, which ends
/// when the server closes it.
async fn connect(site: &Site) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let tcp = tokio::net::TcpStream::connect(site.m.https).await.expect("connect to the HTTPS port");
    let name = ServerName::try_from("localhost").expect("server name");
    let tls = tokio::time::timeout(STEP, tokio_rustls::TlsConnector::from(site.cfg.clone()).connect(name, tcp))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "h2 negotiated by ALPN");
    let (send, conn) = tokio::time::timeout(STEP, h2::client::handshake(tls))
        .await
        .expect("HTTP/2 handshake in time")
        .expect("HTTP/2 handshake");
    (send, tokio::spawn(conn))
}

fn request(method: &str, path: &str) -> http::Request<()> {
    http::Request::builder().method(method).uri(format!("https://localhost{path}")).body(()).expect("request")
}

/// Sends one request (with `body`, if any) and reads the whole answer: status and body.
async fn exchange(
    send: &h2::client::SendRequest<Bytes>,
    method: &str,
    path: &str,
    body: Option<Bytes>,
) -> Result<(u16, Bytes), h2::Error> {
    let mut send = send.clone().ready().await?;
    let (resp, mut stream) = send.send_request(request(method, path), body.is_none())?;
    if let Some(body) = body {
        stream.send_data(body, true)?;
    }
    read_answer(resp.await?).await
}

/// The status and whole body of an answer.
async fn read_answer(resp: http::Response<h2::RecvStream>) -> Result<(u16, Bytes), h2::Error> {
    let status = resp.status().as_u16();
    let mut recv = resp.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        recv.flow_control().release_capacity(chunk.len())?;
        out.extend_from_slice(&chunk);
    }
    Ok((status, Bytes::from(out)))
}

fn echoed(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("not the upstream's echo ({e}): {body:?}"))
}

#[test]
fn streams_with_and_without_bodies_share_one_connection() {
    let up = Upstream::start("app");
    let site = start(up.addr, "");
    let rt = runtime();
    rt.block_on(async {
        let (send, _conn) = connect(&site).await;
        let mut tasks = Vec::new();
        // Without a body: answered by markco's own loop. With one: by Pingora's proxy. All at
        // once, interleaved on the one connection.
        for i in 0..40 {
            let send = send.clone();
            tasks.push(tokio::spawn(async move {
                let (path, body) = if i % 5 == 0 {
                    (format!("/post/{i}"), Some(Bytes::from(vec![b'x'; 100_000 + i])))
                } else {
                    (format!("/get/{i}"), None)
                };
                let method = if body.is_some() { "POST" } else { "GET" };
                let sent = body.as_ref().map_or(0, |b| b.len());
                let got = exchange(&send, method, &path, body).await;
                (path, sent, got)
            }));
        }
        for t in tasks {
            let (path, sent, got) = t.await.expect("request task");
            let (status, body) = got.unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(status, 200, "{path}: {body:?}");
            let echo = echoed(&body);
            assert_eq!(echo["path"], path.as_str(), "{path}: the upstream got the stream's own request");
            assert_eq!(echo["body_bytes"], sent as u64, "{path}: the whole body reached the upstream");
            assert_eq!(echo["headers"]["x-forwarded-proto"], "https", "{path}: forwarded headers are set");
        }
        let (status, body) = exchange(&send, "GET", "/fixed", None).await.expect("GET /fixed");
        assert_eq!((status, &body[..]), (200, &b"fixed\n"[..]), "a reply markco writes itself");
        let (status, _) = exchange(&send, "HEAD", "/get/head", None).await.expect("HEAD");
        assert_eq!(status, 200);
    });
    let handshakes = metric_value(&site.m.metrics(), "markco_tls_handshakes_total", &[("result", "ok")]);
    assert_eq!(handshakes, Some(1.0), "every stream went over the one connection");
}

#[test]
fn a_stalled_request_body_ends_its_stream_but_a_slow_one_does_not() {
    let up = Upstream::start("app");
    let site = start(up.addr, "client_idle_timeout = \"1s\"");
    let rt = runtime();
    rt.block_on(async {
        let (send, _conn) = connect(&site).await;
        // Slow but steady: a piece every 400 ms for 2.4 s, longer than the idle timeout in all.
        let mut ready = send.clone().ready().await.expect("ready");
        let (resp, mut body) = ready.send_request(request("POST", "/slow-upload"), false).expect("send");
        for i in 0..6 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            body.send_data(Bytes::from(vec![b'x'; 100]), i == 5).expect("a piece of the body");
        }
        let resp = tokio::time::timeout(STEP, resp).await.expect("an answer in time").expect("an answer");
        let (status, got) = read_answer(resp).await.expect("the answer's body");
        assert_eq!(status, 200);
        assert_eq!(echoed(&got)["body_bytes"], 600, "the whole slow body reached the upstream");

        // Stalled: 10 bytes, then nothing. The stream ends (reset) after the idle timeout.
        let mut ready = send.clone().ready().await.expect("ready");
        let (resp, mut body) = ready.send_request(request("POST", "/stalled-upload"), false).expect("send");
        body.send_data(Bytes::from_static(b"0123456789"), false).expect("the first piece");
        let started = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(10), resp).await;
        let after = started.elapsed();
        let ended = ended.unwrap_or_else(|_| panic!("a stalled request body still held its stream after 10 s"));
        println!("stalled body ended after {after:?}: {:?}", ended.as_ref().map(|r| r.status()));
        assert!(ended.is_err(), "the stream is reset, not answered: {:?}", ended.map(|r| r.status()));
        assert!(after >= Duration::from_millis(900), "ended before the idle timeout: {after:?}");
        assert!(after < Duration::from_secs(4), "ended long after the idle timeout: {after:?}");
        // The connection itself is fine.
        assert_eq!(exchange(&send, "GET", "/after", None).await.expect("GET after").0, 200);

        // Once the body has ended, a long answer is never cut: 15 pieces over 1.5 s.
        let (status, got) = exchange(&send, "POST", "/drip?chunks=15&interval_ms=100", Some(Bytes::from_static(b"x")))
            .await
            .expect("a long answer to a POST");
        assert_eq!(status, 200);
        assert_eq!(got.iter().filter(|&&b| b == b'\n').count(), 15, "every piece: {got:?}");
    });
}

#[test]
fn an_idle_connection_is_closed_but_never_one_with_a_stream_in_flight() {
    let up = Upstream::start("app");
    let site = start(up.addr, "header_timeout = \"1s\"");
    let rt = runtime();
    rt.block_on(async {
        let (send, conn) = connect(&site).await;
        assert_eq!(exchange(&send, "GET", "/first", None).await.expect("GET").0, 200);
        // A stream that stays open for 2.5 idle timeouts: the connection is busy, not idle.
        let (status, body) = exchange(&send, "GET", "/slow?ms=2500", None).await.expect("a slow stream");
        assert_eq!((status, &body[..]), (200, &b"slow done"[..]), "the slow stream finished");
        let quiet = Instant::now();
        // Now idle: GOAWAY after 1 s, then the connection closes.
        let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
        let after = quiet.elapsed();
        let ended = ended.unwrap_or_else(|_| panic!("the idle connection was still open after 10 s"));
        println!("idle connection closed {after:?} after its last stream: {ended:?}");
        // GOAWAY at 1 s, upon which the client closes; a client ignoring it would be dropped a
        // second later. (Either side may see the other's close as an error: not checked.)
        assert!(after >= Duration::from_millis(900), "closed before the idle timeout: {after:?}");
        assert!(after < Duration::from_millis(1800), "not closed by GOAWAY after the idle timeout: {after:?}");
        let _ = ended.expect("connection task");
        assert!(exchange(&send, "GET", "/late", None).await.is_err(), "no stream on a closed connection");

        // A client that completes TLS (h2 by ALPN) and then says nothing is not kept either.
        let tcp = tokio::net::TcpStream::connect(site.m.https).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("server name");
        let mut tls = tokio_rustls::TlsConnector::from(site.cfg.clone()).connect(name, tcp).await.expect("TLS");
        let silent = Instant::now();
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue, // the server's SETTINGS, if any
                }
            }
        })
        .await;
        assert!(read.is_ok(), "a silent HTTP/2 client was still connected after 10 s");
        println!("silent client dropped after {:?}", silent.elapsed());
    });
}

#[test]
fn sigterm_finishes_open_streams_then_closes_the_connection() {
    let up = Upstream::start("app");
    let mut site = start(up.addr, "grace_period = \"3s\"\nshutdown_timeout = \"5s\"");
    let rt = runtime();
    rt.block_on(async {
        let (send, conn) = connect(&site).await;
        assert_eq!(exchange(&send, "GET", "/first", None).await.expect("GET").0, 200);
        let slow = {
            let send = send.clone();
            tokio::spawn(async move { exchange(&send, "GET", "/slow?ms=1500", None).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        site.m.sigterm();
        // GOAWAY comes at once: a stream opened after it is refused.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(exchange(&send, "GET", "/after", None).await.is_err(), "a new stream after GOAWAY");
        // The stream in flight ends within the grace period (3 s), and the connection with it
        // (without GOAWAY it would stay open until the runtime's shutdown cut it).
        let (status, body) = tokio::time::timeout(STEP, slow)
            .await
            .expect("the slow stream ends in time")
            .expect("request task")
            .expect("the stream in flight is finished, not reset");
        assert_eq!((status, &body[..]), (200, &b"slow done"[..]));
        let ended = tokio::time::timeout(Duration::from_millis(1500), conn)
            .await
            .expect("the connection closes once its last stream ended");
        let _ = ended.expect("connection task");
    });
    let status = site.m.wait_exit(STEP).unwrap_or_else(|| panic!("markco still runs; log:\n{}", site.m.log()));
    assert!(status.success(), "markco exits cleanly: {status}; log:\n{}", site.m.log());
}
