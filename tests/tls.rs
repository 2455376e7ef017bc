//! TLS and ACME against a real ACME server (Debian's pebble): issuance by HTTP-01 and by
//! TLS-ALPN-01, reuse of the stored certificate across a restart, falling back to the next
//! challenge, renewal under an open websocket, an unreachable CA, certificate files refused by
//! `markco check`, and bad input on the HTTPS listener.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pebble::Pebble;
use common::*;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use x509_parser::prelude::{FromDer, X509Certificate};

// ---------------------------------------------------------------------------------------------
// Configs

/// The `[server]` section with an HTTPS listener; `extra` adds lines.
fn server_section(extra: &str) -> String {
    format!(
        r#"[server]
http = "{{http}}"
https = "{{https}}"
admin = "{{admin}}"
upgrade_sock = "{{dir}}/upgrade.sock"
pid_file = "{{dir}}/markco.pid"
{extra}
"#
    )
}

/// markco with one ACME site, `localhost`, proxied to `upstream`, certificates from `pebble`.
fn acme_config(pebble: &Pebble, challenges: &[&str], tls_extra: &str, upstream: SocketAddr) -> String {
    format!(
        r#"{server}
{tls}
[[site]]
hosts = ["localhost"]
tls = "acme"

  [[site.route]]
  name = "app"
  match = ["/*"]
  proxy = "{upstream}"
"#,
        server = server_section(""),
        tls = pebble.tls_section(challenges, tls_extra),
    )
}

// ---------------------------------------------------------------------------------------------
// TLS clients

fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>().expect("PEM certificates")
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").expect("server name")
}

type SyncTls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects and completes a TLS handshake (the client verifies the server's chain).
fn tls_connect(
    addr: SocketAddr,
    name: ServerName<'static>,
    cfg: &Arc<rustls::ClientConfig>,
) -> std::io::Result<SyncTls> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut conn = rustls::ClientConnection::new(cfg.clone(), name).map_err(std::io::Error::other)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// The serial of a DER certificate, written as markco's `GET /certs` writes it.
fn serial_of(der: &[u8]) -> String {
    let (_, x) = X509Certificate::from_der(der).expect("parse the served certificate");
    x.raw_serial_as_string().replace(':', "").to_ascii_uppercase()
}

/// The serial of the leaf a fresh handshake with SNI `localhost` gets.
fn served_serial(addr: SocketAddr, cfg: &Arc<rustls::ClientConfig>) -> std::io::Result<String> {
    let s = tls_connect(addr, localhost(), cfg)?;
    let leaf = s.conn.peer_certificates().and_then(|c| c.first()).expect("the server sent a certificate");
    Ok(serial_of(leaf))
}

/// An HTTP/1.1 GET over TLS with SNI and Host `localhost`.
fn https_get(addr: SocketAddr, cfg: &Arc<rustls::ClientConfig>, path: &str) -> std::io::Result<Resp> {
    let mut s = tls_connect(addr, localhost(), cfg)?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    s.flush()?;
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        // A peer that closes without close_notify, after the whole response.
        Err(e) if e.kind() == ErrorKind::UnexpectedEof && !out.is_empty() => {}
        Err(e) => return Err(e),
    }
    parse_response(&out).ok_or_else(|| {
        std::io::Error::new(ErrorKind::InvalidData, format!("unparseable: {:?}", String::from_utf8_lossy(&out)))
    })
}

/// Did a handshake fail because the server refused it (an alert or a closed connection), rather
/// than because the client disliked a certificate the server sent?
fn refused_by_server(e: &std::io::Error) -> bool {
    let text = e.to_string();
    (text.contains("received fatal alert")
        || matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted))
        && !text.contains("invalid peer certificate")
}

type AsyncTls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A websocket over our own TLS stream (SNI localhost, HTTP/1.1); returns it with the serial
/// of the certificate its handshake saw.
async fn open_wss(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> (WebSocketStream<AsyncTls>, String) {
    let step = Duration::from_secs(20);
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect to the HTTPS port");
    let tls = tokio::time::timeout(step, tokio_rustls::TlsConnector::from(cfg).connect(localhost(), tcp))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake");
    let serial = serial_of(tls.get_ref().1.peer_certificates().and_then(|c| c.first()).expect("a certificate"));
    let url = format!("wss://localhost:{}/ws", addr.port());
    let (ws, resp) = tokio::time::timeout(step, tokio_tungstenite::client_async(url, tls))
        .await
        .expect("websocket upgrade in time")
        .expect("websocket upgrade over TLS");
    assert_eq!(resp.status(), 101);
    (ws, serial)
}

/// Sends a text message and returns the next text message received.
async fn ws_exchange(ws: &mut WebSocketStream<AsyncTls>, text: &str) -> String {
    ws.send(Message::text(text)).await.expect("send on the websocket");
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a websocket reply within 10 s")
            .expect("the websocket is still open")
            .expect("a websocket message");
        match msg {
            Message::Text(t) => return t.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected websocket message {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// markco state

/// One sample; a missing one fails (a renamed metric must not read as 0).
fn metric(m: &Markco, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = m.metrics();
    metric_value(&text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in the metrics:\n{text}"))
}

fn orders(m: &Markco, result: &str) -> f64 {
    metric(m, "markco_acme_orders_total", &[("result", result)])
}

/// The `GET /certs` row of `host`, if its certificate came from ACME.
fn acme_cert(m: &Markco, host: &str) -> Option<serde_json::Value> {
    let r = http_get(m.admin, "/certs", &[]).ok()?;
    assert_eq!(r.status, 200, "GET /certs: {}", r.body_text());
    r.json()["certificates"].as_array()?.iter().find(|c| c["host"] == host && c["source"] == "acme").cloned()
}

/// Waits until markco serves an ACME certificate for `localhost`; returns its `/certs` row.
fn wait_for_acme_cert(m: &Markco, pebble: &Pebble, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(c) = acme_cert(m, "localhost") {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "no ACME certificate for localhost after {timeout:?}\n--- markco log:\n{}\n--- pebble log:\n{}",
            m.log(),
            pebble.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn http01_from_empty_storage_serves_h2_and_restart_reuses_it() {
    let up = Upstream::start("app");
    let ports = Ports::free();
    let pebble = Pebble::start(ports.http.port(), ports.https.port());
    let template = acme_config(&pebble, &["http-01"], "", up.addr);
    let m = Markco::start_in(tempfile::tempdir().expect("tempdir"), ports, &template, &[]);

    let cert = wait_for_acme_cert(&m, &pebble, Duration::from_secs(20));
    let serial = cert["serial"].as_str().expect("serial").to_string();
    assert!(cert["names"].as_array().expect("names").iter().any(|n| n == "localhost"), "{cert}");
    assert!(cert["issuer"].as_str().unwrap_or("").contains("Pebble"), "issued by pebble: {cert}");
    assert!(m.log().contains("answered an HTTP-01 validation"), "{}", m.log());
    assert_eq!(orders(&m, "ok"), 1.0);
    let not_after = cert["not_after"].as_f64().expect("not_after");
    assert_eq!(
        metric(&m, "markco_tls_certificate_expiry_timestamp_seconds", &[("host", "localhost")]),
        not_after,
        "the expiry gauge shows the served certificate"
    );

    // curl trusting only pebble's root: the chain verifies, and h2 is negotiated.
    let root_path = pebble.write_root(&pebble.dir.path().join("issuing-root.pem"));
    let port = m.https.port();
    let out = Command::new("curl")
        .args(["-sS", "--http2", "--max-time", "10", "--cacert"])
        .arg(&root_path)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["-w", "\n%{http_code} %{http_version}"])
        // Two cookie fields, as HTTP/2 clients may send them: one line upstream.
        .args(["-H", "Cookie: a=1", "-H", "Cookie: b=2"])
        .arg(format!("https://localhost:{port}/hello?via=curl"))
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "curl failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let (body, status_line) = stdout.rsplit_once('\n').expect("curl's -w line");
    assert_eq!(status_line, "200 2", "status and HTTP version; body: {body}");
    let json: serde_json::Value = serde_json::from_str(body).expect("upstream JSON");
    assert_eq!(json["name"], "app", "{body}");
    // HTTP/2 carries the host in `:authority`; the HTTP/1.1 upstream gets it as `Host`.
    assert_eq!(json["headers"]["host"], format!("localhost:{port}").as_str(), "{body}");
    assert_eq!(json["headers"]["cookie"], "a=1; b=2", "{body}");

    // Our own client, trusting only pebble's root, sees the same certificate.
    let cfg = tls::client_config(&pem_certs(&pebble.root_pem()), &[]);
    assert_eq!(served_serial(m.https, &cfg).expect("handshake"), serial);

    // The key is private.
    let key = find_file(&m.dir.path().join("certs"), "key.pem").expect("key.pem under the storage dir");
    let mode = std::fs::metadata(&key).expect("key metadata").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{} has mode {mode:o}", key.display());

    // Restart on the same storage: the stored certificate is served at once, nothing is ordered.
    let orders_before = pebble.order_count();
    assert!(orders_before >= 1, "pebble logged the order:\n{}", pebble.log());
    let (dir, ports) = m.stop();
    let m = Markco::start_in(dir, ports, &template, &[]);
    assert_eq!(served_serial(m.https, &cfg).expect("handshake right after the restart"), serial);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(pebble.order_count(), orders_before, "no new order after the restart:\n{}", pebble.log());
    assert_eq!(served_serial(m.https, &cfg).expect("handshake"), serial);
    assert_eq!(orders(&m, "ok"), 0.0, "the new process ordered nothing");
    assert_eq!(orders(&m, "error"), 0.0);
    let cert = acme_cert(&m, "localhost").expect("the stored certificate is listed");
    assert_eq!(cert["serial"], serial.as_str());
    assert!(m.log().contains("serving the stored certificate"), "{}", m.log());
}

#[test]
fn tls_alpn01_issuance() {
    let up = Upstream::start("app");
    let ports = Ports::free();
    let pebble = Pebble::start(ports.http.port(), ports.https.port());
    let template = acme_config(&pebble, &["tls-alpn-01"], "", up.addr);
    let m = Markco::start_in(tempfile::tempdir().expect("tempdir"), ports, &template, &[]);

    let cert = wait_for_acme_cert(&m, &pebble, Duration::from_secs(20));
    assert!(m.log().contains("answered a TLS-ALPN-01 validation"), "{}", m.log());
    assert!(!m.log().contains("answered an HTTP-01 validation"), "{}", m.log());
    let cfg = tls::client_config(&pem_certs(&pebble.root_pem()), &[]);
    assert_eq!(served_serial(m.https, &cfg).expect("handshake"), cert["serial"].as_str().expect("serial"));
    let r = https_get(m.https, &cfg, "/over-tls").expect("HTTPS request");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.json()["name"], "app");

    // Plain HTTP to a TLS site is redirected with path and query kept...
    let r = http_get(m.http, "/path?q", &[("Host", "localhost")]).expect("HTTP request");
    assert_eq!(r.status, 308, "{r:?}");
    assert_eq!(r.header("location"), Some(format!("https://localhost:{}/path?q", m.https.port()).as_str()));
    // ...but ACME's HTTP-01 path is not (an unknown token is simply not found).
    let r = http_get(m.http, "/.well-known/acme-challenge/x", &[("Host", "localhost")]).expect("HTTP request");
    assert!(
        !(300..400).contains(&r.status) && r.header("location").is_none(),
        "the ACME challenge path must not be redirected to HTTPS: {} {:?}",
        r.status,
        r.header("location")
    );
}

#[test]
fn second_challenge_is_tried_when_the_first_fails() {
    let up = Upstream::start("app");
    let ports = Ports::free();
    // Pebble validates TLS-ALPN-01 on a port where nothing listens.
    let dead_port = free_port();
    let pebble = Pebble::start(ports.http.port(), dead_port);
    let template = acme_config(&pebble, &["tls-alpn-01", "http-01"], "", up.addr);
    let m = Markco::start_in(tempfile::tempdir().expect("tempdir"), ports, &template, &[]);

    let cert = wait_for_acme_cert(&m, &pebble, Duration::from_secs(25));
    let log = m.log();
    assert!(
        log.lines().any(|l| l.contains("order failed") && l.contains("tls-alpn-01")),
        "the TLS-ALPN-01 order failed first: {log}"
    );
    assert!(log.contains("answered an HTTP-01 validation"), "{log}");
    assert!(orders(&m, "error") >= 1.0, "the TLS-ALPN-01 attempt counts as an error");
    assert_eq!(orders(&m, "ok"), 1.0);
    assert_eq!(pebble.order_count(), 2, "one order per challenge:\n{}", pebble.log());
    let cfg = tls::client_config(&pem_certs(&pebble.root_pem()), &[]);
    assert_eq!(served_serial(m.https, &cfg).expect("handshake"), cert["serial"].as_str().expect("serial"));
    // Nothing more is ordered once a certificate is served.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(orders(&m, "ok"), 1.0);
}

#[test]
fn forced_renewal_serves_new_serial_while_websocket_stays_open() {
    let up = Upstream::start("app");
    let ports = Ports::free();
    let pebble = Pebble::start(ports.http.port(), ports.https.port());
    let m = Markco::start_in(
        tempfile::tempdir().expect("tempdir"),
        ports,
        &acme_config(&pebble, &["http-01"], "", up.addr),
        &[],
    );
    let cert = wait_for_acme_cert(&m, &pebble, Duration::from_secs(20));
    let s1 = cert["serial"].as_str().expect("serial").to_string();
    let cfg = tls::client_config(&pem_certs(&pebble.root_pem()), &[]);
    assert_eq!(served_serial(m.https, &cfg).expect("handshake"), s1);
    // The gauge is set just after the certificate is installed: it may lag the handshake a little.
    eventually(Duration::from_secs(5), "markco_acme_last_success_timestamp_seconds > 0", || {
        metric(&m, "markco_acme_last_success_timestamp_seconds", &[]) > 0.0
    });

    let rt = runtime();
    let (mut ws, ws_serial) = rt.block_on(open_wss(m.https, cfg.clone()));
    assert_eq!(ws_serial, s1);
    assert_eq!(rt.block_on(ws_exchange(&mut ws, "__whoami")), "app");

    // Renew now: a window wider than pebble's 5-year certificates makes it due at once.
    m.write_config(&acme_config(
        &pebble,
        &["http-01"],
        "renew_before = \"6y\"\nrenew_check_interval = \"1s\"",
        up.addr,
    ));
    let r = request(m.admin, "POST", "/reload", &[], b"").expect("POST /reload");
    assert_eq!(r.status, 200, "{}", r.body_text());

    let deadline = Instant::now() + Duration::from_secs(20);
    let s2 = loop {
        let s = served_serial(m.https, &cfg).expect("handshake during renewal");
        if s != s1 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no new certificate within 20 s\n--- markco log:\n{}\n--- pebble log:\n{}",
            m.log(),
            pebble.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_ne!(s2, s1);
    assert!(m.log().contains("certificate obtained"), "{}", m.log());

    // The websocket opened on the old certificate is untouched.
    assert_eq!(rt.block_on(ws_exchange(&mut ws, "still here after renewal")), "still here after renewal");
    assert_eq!(rt.block_on(ws_exchange(&mut ws, "__whoami")), "app");
    // And new requests work on the new certificate.
    let r = https_get(m.https, &cfg, "/after").expect("HTTPS request");
    assert_eq!(r.status, 200);
    assert!(orders(&m, "ok") >= 2.0);
    assert!(metric(&m, "markco_acme_last_success_timestamp_seconds", &[]) > 0.0);
    rt.block_on(async {
        let _ = ws.close(None).await;
    });
}

#[test]
fn acme_server_down_stored_cert_served_and_retries_counted() {
    let up = Upstream::start("app");
    let ports = Ports::free();
    let mut pebble = Pebble::start(ports.http.port(), ports.https.port());
    let m = Markco::start_in(
        tempfile::tempdir().expect("tempdir"),
        ports,
        &acme_config(&pebble, &["http-01"], "", up.addr),
        &[],
    );
    let cert = wait_for_acme_cert(&m, &pebble, Duration::from_secs(20));
    let serial = cert["serial"].as_str().expect("serial").to_string();
    let cfg = tls::client_config(&pem_certs(&pebble.root_pem()), &[]);

    let (dir, ports) = m.stop();
    pebble.kill();
    let template = acme_config(
        &pebble,
        &["http-01"],
        "renew_before = \"6y\"\nretry_initial = \"200ms\"\nretry_max = \"1s\"\nrenew_check_interval = \"1s\"",
        up.addr,
    );
    let m = Markco::start_in(dir, ports, &template, &[]);
    assert_eq!(served_serial(m.https, &cfg).expect("the stored certificate is served"), serial);
    let r = https_get(m.https, &cfg, "/while-ca-down").expect("HTTPS request");
    assert_eq!(r.status, 200);

    let deadline = Instant::now() + Duration::from_secs(10);
    while !(orders(&m, "error") >= 2.0 && m.log().contains("certificate order failed")) {
        assert!(
            Instant::now() < deadline,
            "no retried, failed orders within 10 s (errors: {})\n{}",
            orders(&m, "error"),
            m.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(orders(&m, "ok"), 0.0);
    assert_eq!(served_serial(m.https, &cfg).expect("still served"), serial);
    assert!(m.log().contains("the current certificate keeps serving"), "{}", m.log());
}

/// A date as (year, month, day).
type Ymd = (i32, u8, u8);

/// A self-signed certificate and its key (PEM) for `names`, valid over the given dates.
fn self_signed(names: &[&str], dates: Option<(Ymd, Ymd)>) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
    if let Some(((y1, m1, d1), (y2, m2, d2))) = dates {
        params.not_before = rcgen::date_time_ymd(y1, m1, d1);
        params.not_after = rcgen::date_time_ymd(y2, m2, d2);
    }
    let cert = params.self_signed(&key).expect("certificate");
    (cert.pem(), key.serialize_pem())
}

#[test]
fn bad_certificate_files_are_refused_by_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let (good_cert, good_key) = self_signed(&["localhost"], None);
    let (expired_cert, expired_key) = self_signed(&["localhost"], Some(((2020, 1, 1), (2021, 1, 1))));
    let (_, other_key) = self_signed(&["localhost"], None);
    let (other_host_cert, other_host_key) = self_signed(&["other.test"], None);
    let (future_cert, future_key) = self_signed(&["localhost"], Some(((2099, 1, 1), (2100, 1, 1))));
    let cases = [
        ("is not valid before", write("future.pem", &future_cert), write("future.key", &future_key)),
        ("expired", write("expired.pem", &expired_cert), write("expired.key", &expired_key)),
        ("does not belong", write("good.pem", &good_cert), write("other.key", &other_key)),
        ("does not cover", write("other-host.pem", &other_host_cert), write("other-host.key", &other_host_key)),
    ];
    let config_for = |cert: &Path, key: &Path| -> PathBuf {
        let text = format!(
            r#"[server]
http = "127.0.0.1:18080"
https = "127.0.0.1:18443"
admin = "127.0.0.1:12019"

[[site]]
hosts = ["localhost"]
tls = {{ cert = "{}", key = "{}" }}

  [[site.route]]
  match = ["/*"]
  respond = "ok\n"
"#,
            cert.display(),
            key.display()
        );
        write("markco.toml", &text)
    };
    for (want, cert, key) in &cases {
        let config = config_for(cert, key);
        let out = Command::new(markco_bin()).args(["check", "--config"]).arg(&config).output().expect("run check");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "check must refuse {} / {}: {stderr}", cert.display(), key.display());
        assert!(stderr.contains(want), "the message says {want:?}: {stderr}");
    }
    let config = config_for(&write("good.pem", &good_cert), &write("good.key", &good_key));
    let out = Command::new(markco_bin()).args(["check", "--config"]).arg(&config).output().expect("run check");
    assert!(out.status.success(), "a good pair passes: {}", String::from_utf8_lossy(&out.stderr));
}

/// A ClientHello offering only TLS 1.0 (legacy_version 0x0301, no supported_versions), with SNI.
fn tls10_client_hello(sni: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&[0x03, 0x01]);
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0, 6, 0x00, 0x2f, 0x00, 0x35, 0x00, 0x0a]); // RSA AES/3DES CBC suites
    body.extend_from_slice(&[1, 0]); // null compression
    let name = sni.as_bytes();
    let mut server_name = Vec::new();
    server_name.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    server_name.push(0); // host_name
    server_name.extend_from_slice(&(name.len() as u16).to_be_bytes());
    server_name.extend_from_slice(name);
    let mut ext = vec![0x00, 0x00];
    ext.extend_from_slice(&(server_name.len() as u16).to_be_bytes());
    ext.extend_from_slice(&server_name);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1, 0, (body.len() >> 8) as u8, body.len() as u8];
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01, (hs.len() >> 8) as u8, hs.len() as u8];
    rec.extend_from_slice(&hs);
    rec
}

/// Sends `bytes` (if any) and reads until the server closes; returns what it sent and how long
/// it took. Panics if the server keeps the connection open for 8 s.
fn send_and_read_to_close(addr: SocketAddr, bytes: &[u8]) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(8))).expect("timeout");
    if !bytes.is_empty() {
        s.write_all(bytes).expect("send");
    }
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => break,
            Err(e) => panic!("the server did not close the connection ({e}); it sent {out:02x?}"),
        }
    }
    (out, start.elapsed())
}

fn is_server_hello(b: &[u8]) -> bool {
    b.len() > 5 && b[0] == 0x16 && b[5] == 0x02
}

#[test]
fn tls_listener_refuses_bad_input_and_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = tls::write_localhost_cert(dir.path());
    let template = format!(
        r#"{}
[[site]]
hosts = ["localhost"]
tls = {{ cert = "{{dir}}/site.pem", key = "{{dir}}/site.key" }}

  [[site.route]]
  name = "hello"
  match = ["/*"]
  respond = "hello over tls\n"
"#,
        server_section("header_timeout = \"1s\"")
    );
    let m = Markco::start_in(dir, Ports::free(), &template, &[]);
    let cfg = tls::client_config(std::slice::from_ref(&cert), &[]);
    let expected_serial = serial_of(&cert);
    let serves = |after: &str| {
        assert_eq!(
            served_serial(m.https, &cfg).unwrap_or_else(|e| panic!("handshake after {after}: {e}")),
            expected_serial
        );
        let r = https_get(m.https, &cfg, "/x").unwrap_or_else(|e| panic!("HTTPS request after {after}: {e}"));
        assert_eq!((r.status, r.body_text().as_str()), (200, "hello over tls\n"), "after {after}");
    };
    serves("start");
    let certs = http_get(m.admin, "/certs", &[]).expect("GET /certs").json();
    let row = &certs["certificates"][0];
    assert_eq!(
        (&row["host"], &row["source"], &row["serial"]),
        (&"localhost".into(), &"file".into(), &expected_serial.clone().into())
    );

    // (a) Not TLS at all: closed without a ServerHello.
    let (got, _) = send_and_read_to_close(m.https, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(!is_server_hello(&got), "plain HTTP on the HTTPS port got a ServerHello: {got:02x?}");
    let (got, _) = send_and_read_to_close(m.https, &[0x8f, 0x00, 0x13, 0x37, 0xde, 0xad, 0xbe, 0xef, 0x00, 0xff]);
    assert!(!is_server_hello(&got), "random bytes got a ServerHello: {got:02x?}");
    serves("garbage");

    // (b) An SNI no site has.
    let e = tls_connect(m.https, ServerName::try_from("unknown.test").expect("name"), &cfg)
        .expect_err("a handshake for unknown.test must fail");
    assert!(refused_by_server(&e), "refused by the server, not a certificate the client rejected: {e}");
    serves("an unknown SNI");

    // (c) No SNI (rustls sends none for an IP address).
    let ip = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let e = tls_connect(m.https, ip, &cfg).expect_err("a handshake without SNI must fail");
    assert!(refused_by_server(&e), "refused by the server: {e}");
    serves("no SNI");

    // (d) TLS 1.0 only: an alert or a close, never a ServerHello.
    let (got, _) = send_and_read_to_close(m.https, &tls10_client_hello("localhost"));
    assert!(!is_server_hello(&got), "a TLS 1.0 ClientHello got a ServerHello: {got:02x?}");
    assert!(got.is_empty() || got[0] == 0x15, "an alert record or nothing: {got:02x?}");
    serves("a TLS 1.0 ClientHello");

    // (e) Silence: cut after header_timeout (1 s).
    let (got, took) = send_and_read_to_close(m.https, b"");
    assert!(got.is_empty(), "{got:02x?}");
    assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(6), "cut after {took:?}");
    serves("a silent client");

    let text = m.metrics();
    for result in ["not_tls", "unknown_sni", "no_sni", "protocol_version", "no_client_hello", "ok"] {
        let count = metric_value(&text, "markco_tls_handshakes_total", &[("result", result)]);
        assert!(count.is_some_and(|c| c >= 1.0), "markco_tls_handshakes_total{{result=\"{result}\"}} >= 1:\n{text}");
    }
}

/// A client that offers TLS 1.2 only.
fn tls12_client_config(roots: &[CertificateDer<'static>]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).expect("add a root");
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .expect("TLS 1.2")
            .with_root_certificates(store)
            .with_no_client_auth(),
    )
}

#[test]
fn hsts_only_over_tls_and_tls12_is_accepted() {
    let up = Upstream::start("app");
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = tls::write_localhost_cert(dir.path());
    const HSTS: &str = "max-age=63072000; includeSubDomains";
    // Plain HTTP is served here (no redirect), so its responses can show they carry no HSTS.
    let template = format!(
        r#"{}
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
  proxy = "{}"
"#,
        server_section(&format!("hsts = \"{HSTS}\"\nredirect_to_https = false")),
        up.addr
    );
    let m = Markco::start_in(dir, Ports::free(), &template, &[]);
    let roots = [cert.clone()];

    for (version, cfg) in
        [("TLS 1.3 or 1.2", tls::client_config(&roots, &[])), ("TLS 1.2 only", tls12_client_config(&roots))]
    {
        let s = tls_connect(m.https, localhost(), &cfg).unwrap_or_else(|e| panic!("{version}: handshake: {e}"));
        if version == "TLS 1.2 only" {
            assert_eq!(s.conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2), "negotiated version");
        }
        drop(s);
        for path in ["/fixed", "/proxied"] {
            let r = https_get(m.https, &cfg, path).unwrap_or_else(|e| panic!("{version}: GET {path}: {e}"));
            assert_eq!(r.status, 200, "{version}: GET {path}: {}", r.body_text());
            assert_eq!(r.header("strict-transport-security"), Some(HSTS), "{version}: GET {path} over HTTPS");
        }
    }
    for path in ["/fixed", "/proxied"] {
        let r = http_get(m.http, path, &[("Host", "localhost")]).expect("plain HTTP");
        assert_eq!(r.status, 200, "GET {path} over HTTP: {}", r.body_text());
        assert_eq!(r.header("strict-transport-security"), None, "no HSTS over plain HTTP: GET {path}");
    }
    let text = m.metrics();
    let tls12 = text
        .lines()
        .filter(|l| l.starts_with("markco_tls_handshakes_total") && l.contains("result=\"ok\""))
        .any(|l| l.contains("1.2") || l.contains("1_2"));
    assert!(tls12, "a TLS 1.2 handshake is counted by protocol:\n{text}");
}

/// `(seconds since midnight UTC, retry_in_s)` of every "certificate order failed" log line.
fn order_failures(log: &str) -> Vec<(f64, u64)> {
    let mut failures: Vec<(f64, u64)> = log
        .lines()
        .filter(|l| l.contains("certificate order failed"))
        .filter_map(|l| {
            // `2026-12-04T17:33:01.627947Z ERROR ...`
            let ts = l.split_whitespace().next()?.get(11..)?.trim_end_matches('Z');
            let mut hms = ts.split(':');
            let (h, m, s): (f64, f64, f64) =
                (hms.next()?.parse().ok()?, hms.next()?.parse().ok()?, hms.next()?.parse().ok()?);
            let retry = l.split("retry_in_s=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
            Some((h * 3600.0 + m * 60.0 + s, retry))
        })
        .collect();
    // Times of day: a run across midnight UTC continues past 24 h (the lines are in order).
    let mut days = 0.0;
    for i in 1..failures.len() {
        if failures[i].0 + days < failures[i - 1].0 - 43_200.0 {
            days += 86_400.0;
        }
        failures[i].0 += days;
    }
    failures
}

#[test]
fn acme_server_down_at_first_start_start_up_is_not_blocked_retries_double_to_the_cap_then_issue() {
    let up = Upstream::start("app");
    let ports = Ports::free();
    // No ACME server at all yet: the directory is a port where nothing listens.
    let ca_dir = tempfile::tempdir().expect("tempdir");
    let ca = common::pebble::TestCa::generate(ca_dir.path());
    let dead_directory = format!("https://127.0.0.1:{}/dir", free_port());
    let retry = "retry_initial = \"1s\"\nretry_max = \"4s\"\nrenew_check_interval = \"1s\"";
    let template = format!(
        r#"{}
[tls]
acme_directory = "{dead_directory}"
acme_ca_root = "{}"
storage = "{{dir}}/certs"
challenges = ["http-01"]
{retry}

[[site]]
hosts = ["localhost"]
tls = "acme"

  [[site.route]]
  name = "app"
  match = ["/*"]
  proxy = "{}"
"#,
        server_section(""),
        ca.ca_pem.display(),
        up.addr
    );
    // Start-up does not wait for the CA: ready (admin and listeners up) as usual.
    let m = Markco::start_in(tempfile::tempdir().expect("tempdir"), ports, &template, &[]);
    let r = http_get(m.http, "/x", &[("Host", "localhost")]).expect("plain HTTP while the CA is down");
    assert_eq!(r.status, 308, "plain HTTP redirects to HTTPS: {}", r.body_text());

    // Failures are retried 1 s, 2 s, 4 s, then 4 s (the cap) apart.
    let deadline = Instant::now() + Duration::from_secs(60);
    while order_failures(&m.log()).len() < 5 {
        assert!(Instant::now() < deadline, "fewer than 5 failed orders in 60 s:\n{}", m.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let failures = order_failures(&m.log());
    let delays: Vec<u64> = failures.iter().map(|f| f.1).collect();
    assert_eq!(&delays[..5], &[1, 2, 4, 4, 4], "retry delays double up to retry_max:\n{}", m.log());
    for (i, pair) in failures.windows(2).take(4).enumerate() {
        let (gap, promised) = (pair[1].0 - pair[0].0, pair[0].1 as f64);
        // Delays are kept in whole seconds, so a retry may come up to 1 s early.
        assert!(
            gap >= promised - 1.0 && gap <= promised + 4.0,
            "retry {} came {gap:.1} s after a failure that promised {promised} s",
            i + 1
        );
    }
    assert!(m.log().contains("handshakes for its hosts fail until one is obtained"), "{}", m.log());
    let e = tls_connect(m.https, localhost(), &tls::client_config(&[], &[])).expect_err("no certificate yet");
    assert!(refused_by_server(&e), "the handshake is refused while there is no certificate: {e}");

    // The CA comes up (at a new address, told by a reload): a certificate is obtained.
    let pebble = Pebble::start(ports.http.port(), ports.https.port());
    m.write_config(&acme_config(&pebble, &["http-01"], retry, up.addr));
    let r = request(m.admin, "POST", "/reload", &[], b"").expect("POST /reload");
    assert_eq!(r.status, 200, "{}", r.body_text());
    let cert = wait_for_acme_cert(&m, &pebble, Duration::from_secs(60));
    let cfg = tls::client_config(&pem_certs(&pebble.root_pem()), &[]);
    assert_eq!(served_serial(m.https, &cfg).expect("handshake"), cert["serial"].as_str().expect("serial"));
    assert_eq!(orders(&m, "ok"), 1.0);
    assert!(orders(&m, "error") >= 5.0);
}
