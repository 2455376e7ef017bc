//! Certificates across a fleet (`[cluster]`): three real gateways on one fresh PostgreSQL
//! database and one pebble, all configured with the same new ACME site, started at once.
//!
//! - pebble receives exactly one order, and all three serve that certificate (verified against
//!   pebble's root);
//! - a fourth gateway started later serves it from the database without ordering;
//! - the key in the database is sealed (no PEM, no key bytes in clear);
//! - the renewal is ordered once for the fleet, by a gateway pebble cannot reach directly (it
//!   validates HTTP-01 only through gateway A's port, and A is told not to check its
//!   certificates), so A answers from the shared challenge table and serves the renewed
//!   certificate because of the NOTIFY;
//! - the same by TLS-ALPN-01 (A installs the challenge certificate on the NOTIFY);
//! - the PostgreSQL store on its own: the lock, sealing, challenges;
//! - `markco check` refuses `[cluster]` with ACME sites and no `secret_file`, naming the line,
//!   and a missing or short key file.
//!
//! Needs PostgreSQL (`MARKCO_TEST_PG_URL`, default
//! `postgres://postgres:postgres@127.0.0.1:5432/postgres`) and pebble; `.ci/run` provides both.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pebble::Pebble;
use common::pg::*;
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// One gateway of the fleet: ACME site `localhost` (by `challenge`) proxied to `upstream`.
fn gateway_config(
    node: &str,
    db: &str,
    secret: &Path,
    pebble: &Pebble,
    challenge: &str,
    tls_extra: &str,
    upstream: SocketAddr,
) -> String {
    format!(
        r#"[server]
http = "{{http}}"
https = "{{https}}"
admin = "{{admin}}"
upgrade_sock = "{{dir}}/upgrade.sock"
pid_file = "{{dir}}/markco.pid"

[database]
url = "{db}"

[cluster]
node = "{node}"
secret_file = "{secret}"

{tls}
[[site]]
hosts = ["localhost"]
tls = "acme"

  [[site.route]]
  name = "app"
  match = ["/*"]
  proxy = "{upstream}"
"#,
        secret = secret.display(),
        tls = pebble.tls_section(&[challenge], tls_extra),
    )
}

/// The leaf a fresh handshake with SNI `localhost` gets; the client verifies the chain against
/// `cfg`'s roots (pebble's), so an `Ok` is a certificate pebble issued.
fn served_leaf(addr: SocketAddr, cfg: &Arc<rustls::ClientConfig>) -> std::io::Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let name = ServerName::try_from("localhost").expect("server name");
    let mut conn = rustls::ClientConnection::new(cfg.clone(), name).map_err(std::io::Error::other)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    let leaf = conn.peer_certificates().and_then(|c| c.first()).expect("the server sent a certificate");
    Ok(leaf.to_vec())
}

/// Waits until every gateway serves a verified certificate other than `not`, and the same one;
/// returns it.
fn wait_same_leaf(
    gateways: &[&Markco],
    cfg: &Arc<rustls::ClientConfig>,
    not: Option<&[u8]>,
    timeout: Duration,
    pebble: &Pebble,
) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    loop {
        let leaves: Vec<Option<Vec<u8>>> = gateways.iter().map(|g| served_leaf(g.https, cfg).ok()).collect();
        if let Some(Some(first)) = leaves.first() {
            if Some(first.as_slice()) != not && leaves.iter().all(|l| l.as_ref() == Some(first)) {
                return first.clone();
            }
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = gateways.iter().map(|g| g.log()).collect();
            panic!(
                "the gateways do not serve one new certificate after {timeout:?} (served: {:?})\n--- logs:\n{}\n--- pebble:\n{}",
                leaves.iter().map(|l| l.as_ref().map(|d| d.len())).collect::<Vec<_>>(),
                logs.join("\n-----\n"),
                pebble.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metric(m: &Markco, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = m.metrics();
    metric_value(&text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in the metrics:\n{text}"))
}

#[test]
fn three_gateways_make_one_order_serve_it_and_renew_once_http01() {
    three_gateways_one_order("http-01");
}

#[test]
fn three_gateways_make_one_order_serve_it_and_renew_once_tls_alpn01() {
    three_gateways_one_order("tls-alpn-01");
}

fn three_gateways_one_order(challenge: &str) {
    let db = TestDb::new();
    let up = Upstream::start("app");
    let shared_dir = tempfile::tempdir().expect("tempdir");
    let secret = shared_dir.path().join("cluster.key");
    std::fs::write(&secret, "c2VjcmV0IGZvciB0aGUgbWFya2NvIGZsZWV0IHRlc3QgKDQ4IGJ5dGVzKQ==\n").expect("write secret");

    let ports = [Ports::free(), Ports::free(), Ports::free()];
    // Pebble validates through gateway A only (HTTP-01 on its HTTP port, TLS-ALPN-01 on its HTTPS
    // port): an order made by B or C is validated through A, which must answer from what the
    // fleet shares (the challenge table, or the NOTIFY that installs the challenge certificate).
    // 60 s certificates, renewed when 30 s are left: the renewal comes during the test.
    let pebble = Pebble::start_with_validity(ports[0].http.port(), ports[0].https.port(), Some(60));
    let tls_extra = "renew_before = \"30s\"\nrenew_check_interval = \"1s\"";
    let nodes = ["gw-a", "gw-b", "gw-c"];
    let configs: Vec<String> =
        nodes.iter().map(|n| gateway_config(n, &db.url, &secret, &pebble, challenge, tls_extra, up.addr)).collect();

    // All three at once.
    let started = Instant::now();
    let handles: Vec<_> = ports
        .iter()
        .zip(configs.iter())
        .map(|(p, c)| {
            let (p, c) = (*p, c.clone());
            std::thread::spawn(move || Markco::start_in(tempfile::tempdir().expect("tempdir"), p, &c, &[]))
        })
        .collect();
    let gws: Vec<Markco> = handles.into_iter().map(|h| h.join().expect("a gateway started")).collect();
    let (a, b, c) = (&gws[0], &gws[1], &gws[2]);

    let root = pebble.root_pem();
    let roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(root.as_bytes()).collect::<Result<_, _>>().expect("pebble's root");
    let cfg = tls::client_config(&roots, &[]);
    let first = wait_same_leaf(&[a, b, c], &cfg, None, Duration::from_secs(40), &pebble);
    eprintln!("all three serve the first certificate {:?} after start", started.elapsed());

    // One order at pebble for the whole fleet (the three asked at once), also once the
    // gateways that waited for the lock have had their turn.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(pebble.order_count(), 1, "one order for the fleet:\n{}", pebble.log());
    for g in [a, b, c] {
        assert_eq!(served_leaf(g.https, &cfg).expect("handshake"), first, "every gateway still serves it");
    }
    // A gateway that joins later, with nothing stored locally, serves the fleet's certificate
    // without ordering.
    let d = Markco::start(&gateway_config("gw-d", &db.url, &secret, &pebble, challenge, tls_extra, up.addr));
    assert_eq!(wait_same_leaf(&[&d], &cfg, None, Duration::from_secs(10), &pebble), first, "D serves it");
    assert_eq!(pebble.order_count(), 1, "D ordered nothing:\n{}", pebble.log());
    assert_eq!(metric(&d, "markco_acme_orders_total", &[("result", "ok")]), 0.0);
    drop(d);
    let ordered_by = psql(&db.url, "SELECT node FROM markco_certificates WHERE name = 'localhost'");
    assert!(nodes.contains(&ordered_by.as_str()), "the certificate row names its gateway: {ordered_by:?}");
    let oks: f64 = gws.iter().map(|g| metric(g, "markco_acme_orders_total", &[("result", "ok")])).sum();
    assert_eq!(oks, 1.0, "one gateway ordered");
    let adopted: f64 =
        gws.iter().map(|g| metric(g, "markco_acme_fleet_certificates_total", &[("event", "adopted")])).sum();
    assert_eq!(adopted, 2.0, "the two others took it from the database");
    // One ACME account for the fleet.
    assert_eq!(psql(&db.url, "SELECT count(*) FROM markco_acme_accounts"), "1");

    // The database holds the chain in clear and the key sealed: no PEM, no DER key in it.
    let chain = psql(&db.url, "SELECT chain_pem FROM markco_certificates");
    assert!(chain.contains("BEGIN CERTIFICATE"));
    let key_hex = psql(&db.url, "SELECT encode(key_sealed, 'hex') FROM markco_certificates");
    let key_bytes: Vec<u8> =
        (0..key_hex.len() / 2).map(|i| u8::from_str_radix(&key_hex[2 * i..2 * i + 2], 16).expect("hex")).collect();
    assert!(key_bytes.len() > 100, "a sealed key is stored");
    assert!(!key_bytes.windows(10).any(|w| w == b"PRIVATE KE"), "the key is not stored as PEM");
    let local_key = std::fs::read_dir(a.dir.path().join("certs"))
        .ok()
        .and_then(|_| find_key(&a.dir.path().join("certs")))
        .expect("gateway A keeps a local copy of the key");
    let local_key = std::fs::read_to_string(local_key).expect("read the local key");
    let der = rustls::pki_types::PrivateKeyDer::from_pem_slice(local_key.as_bytes()).expect("local key PEM");
    let der_bytes = der.secret_der();
    assert!(
        !key_bytes.windows(32).any(|w| der_bytes.windows(32).any(|d| d == w)),
        "no 32-byte run of the key's DER appears in the database"
    );
    let creds = psql(&db.url, "SELECT encode(credentials, 'escape') FROM markco_acme_accounts");
    assert!(!creds.contains("private") && !creds.contains("key_pkcs8"), "the account credentials are sealed");

    // Renewal: A stops checking (it can only learn of the renewal from the fleet), so B or C
    // renews, and pebble validates that order through A's port.
    a.write_config(&gateway_config(
        "gw-a",
        &db.url,
        &secret,
        &pebble,
        challenge,
        "renew_before = \"30s\"\nrenew_check_interval = \"1h\"",
        up.addr,
    ));
    // What A logged and counted before: the renewal's validation must show after this.
    let log_before = a.log().len();
    let validations_before = pebble.validation_count();
    let hits_before = metric(a, "markco_acme_shared_challenge_lookups_total", &[("result", "hit")]);
    let r = request(a.admin, "POST", "/reload", &[], b"").expect("POST /reload");
    assert_eq!(r.status, 200, "{}", r.body_text());
    let renewed = wait_same_leaf(&[b, c], &cfg, Some(&first), Duration::from_secs(60), &pebble);
    let seen_on_bc = Instant::now();
    // A serves it from a NOTIFY (its periodic re-read is 30 s away).
    let on_a = wait_same_leaf(&[a], &cfg, Some(&first), Duration::from_secs(5), &pebble);
    assert_eq!(on_a, renewed, "A serves the renewed certificate");
    eprintln!("A served the renewed certificate {:?} after B and C", seen_on_bc.elapsed());
    assert_eq!(pebble.order_count(), 2, "the renewal was ordered once:\n{}", pebble.log());
    let renewed_by = psql(&db.url, "SELECT node FROM markco_certificates WHERE name = 'localhost'");
    assert!(renewed_by == "gw-b" || renewed_by == "gw-c", "B or C renewed: {renewed_by:?}");
    let log_after = a.log()[log_before..].to_string();
    // Pebble 2.4 reuses a valid authorization about 1 % of the time even with
    // PEBBLE_AUTHZREUSE=0 (its test is `rand.Intn(100) > percent`). Then the renewal needs no
    // validation, nobody is asked for an answer, and what A answered cannot be checked.
    if pebble.validation_count() == validations_before {
        eprintln!("pebble reused the first authorization for the renewal: no validation, A's answer not checked");
    } else if challenge == "http-01" {
        assert!(
            metric(a, "markco_acme_shared_challenge_lookups_total", &[("result", "hit")]) > hits_before,
            "A answered the CA from the shared challenges\n{log_after}"
        );
        assert!(log_after.contains("answering an HTTP-01 validation of another gateway's order"), "{log_after}");
    } else {
        assert!(log_after.contains("answering the fleet's TLS-ALPN-01 challenge"), "{log_after}");
    }
    assert!(!log_after.contains("ordering a certificate"), "A did not order: {log_after}");
    // The challenges are withdrawn once the order is done.
    eventually(Duration::from_secs(5), "the challenges are withdrawn", || {
        psql(&db.url, "SELECT count(*) FROM markco_acme_challenges") == "0"
    });
    // And it stays at one renewal (the new certificate is not due for another ~30 s).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(pebble.order_count(), 2, "no further order:\n{}", pebble.log());
    for g in [a, b, c] {
        assert_eq!(served_leaf(g.https, &cfg).expect("handshake"), renewed);
    }
}

fn find_key(dir: &Path) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(k) = find_key(&p) {
                return Some(k);
            }
        } else if p.file_name().is_some_and(|n| n == "key.pem") {
            return Some(p);
        }
    }
    None
}

#[test]
fn cluster_with_acme_sites_needs_a_secret_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("markco.toml");
    std::fs::write(
        &path,
        r#"[server]
http = "127.0.0.1:18080"
https = "127.0.0.1:18443"

[database]
url = "postgres://markco@127.0.0.1/markco"

[cluster]
node = "gw-a"

[[site]]
hosts = ["localhost"]
tls = "acme"

  [[site.route]]
  match = ["/*"]
  proxy = "127.0.0.1:9"
"#,
    )
    .expect("write config");
    let check = || {
        let out =
            Command::new(markco_bin()).arg("check").arg("--config").arg(&path).output().expect("run markco check");
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = check();
    assert!(!ok, "refused: {err}");
    assert!(err.contains("secret_file"), "names the missing key: {err}");
    assert!(err.contains("markco.toml:8:"), "points at the [cluster] line: {err}");

    // A secret_file that is missing, or too short, is refused naming the file.
    let config = std::fs::read_to_string(&path).expect("read config");
    let key = dir.path().join("cluster.key");
    std::fs::write(
        &path,
        config.replace("node = \"gw-a\"", &format!("node = \"gw-a\"\nsecret_file = {:?}", key.display().to_string())),
    )
    .expect("write config");
    let (ok, err) = check();
    assert!(!ok && err.contains(&key.display().to_string()) && err.contains("markco.toml:10:"), "missing: {err}");
    std::fs::write(&key, "short\n").expect("write key");
    let (ok, err) = check();
    assert!(!ok && err.contains("too short") && err.contains(&key.display().to_string()), "short: {err}");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef0123456789\n").expect("write key");
    let (ok, err) = check();
    assert!(ok, "a good key file passes: {err}");
}

/// The PostgreSQL store itself: the per-name lock excludes a second holder and is freed even by a
/// gateway that vanishes without releasing it; keys round-trip sealed and refuse another
/// secret; challenges are answered until withdrawn or expired.
#[test]
fn shared_store_lock_sealing_and_challenges() {
    use markco_certs::acme::Challenge;
    use markco_certs::{PendingChallenge, SecretKey, SharedCerts};
    use markco_control::fleet_certs::PgSharedCerts;

    let db = TestDb::new();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let plane_db = markco_control::db::Db::connect(&db.url).await.expect("connect");
        plane_db.migrate().await.expect("migrate");
        let key = SecretKey::from_secret(b"0123456789abcdef0123456789abcdef", Path::new("/k/a"));
        let other_key = SecretKey::from_secret(b"another fleet's secret of 32 bytes", Path::new("/k/b"));
        let a = PgSharedCerts::connect(&db.url, key.clone(), "gw-a").await.expect("a");
        let b = PgSharedCerts::connect(&db.url, key, "gw-b").await.expect("b");
        let stranger = PgSharedCerts::connect(&db.url, other_key, "gw-x").await.expect("x");

        // The lock: one holder; the other gives up after its wait; release lets it in.
        let held = a.lock("order dir localhost", Duration::from_secs(1)).await.expect("a takes the lock");
        let t = Instant::now();
        let e = b.lock("order dir localhost", Duration::from_millis(600)).await.err().expect("b must wait");
        assert!(t.elapsed() >= Duration::from_millis(600), "b waited its time");
        assert!(format!("{e:#}").contains("held the fleet's lock"), "{e:#}");
        // Another name is not blocked.
        let other = b.lock("order dir other.test", Duration::from_millis(100)).await.expect("another name");
        other.release().await;
        held.release().await;
        let again = b.lock("order dir localhost", Duration::from_millis(500)).await.expect("b after release");
        // A holder that vanishes (dropped, connection closed) frees it too.
        drop(again);
        let t = Instant::now();
        let last = a.lock("order dir localhost", Duration::from_secs(5)).await.expect("freed by the dropped holder");
        assert!(t.elapsed() < Duration::from_secs(2), "freed promptly: {:?}", t.elapsed());
        last.release().await;

        // Sealed storage.
        let pem_key = b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";
        a.save_cert("dir", "localhost", b"CHAIN", pem_key, 2_000_000_000).await.expect("save");
        let (chain, k) = b.cert("dir", "localhost").await.expect("read").expect("stored");
        assert_eq!((chain.as_slice(), k.as_slice()), (&b"CHAIN"[..], &pem_key[..]));
        let e = stranger.cert("dir", "localhost").await.expect_err("another secret cannot open it");
        assert!(format!("{e:#}").contains("same secret_file"), "{e:#}");
        // A sealed value moved to another row does not open.
        psql(&db.url, "INSERT INTO markco_certificates (directory, name, chain_pem, key_sealed, not_after) SELECT directory, 'moved', chain_pem, key_sealed, not_after FROM markco_certificates WHERE name = 'localhost'");
        assert!(b.cert("dir", "moved").await.is_err(), "bound to its row");
        a.save_account("dir", b"{\"id\":\"acct\"}").await.expect("save account");
        assert_eq!(b.account("dir").await.expect("account").as_deref(), Some(&b"{\"id\":\"acct\"}"[..]));

        // Challenges.
        let ch = |token: &str| PendingChallenge {
            kind: Challenge::Http01,
            token: token.into(),
            host: "localhost".into(),
            answer: format!("{token}.thumb"),
        };
        a.put_challenge(&ch("tok-live-0123456789"), Duration::from_secs(60)).await.expect("put");
        a.put_challenge(&ch("tok-expired-0123456"), Duration::ZERO).await.expect("put");
        assert_eq!(b.http01_answer("tok-live-0123456789").await.expect("q").as_deref(), Some("tok-live-0123456789.thumb"));
        assert_eq!(b.http01_answer("tok-expired-0123456").await.expect("q"), None, "expired");
        assert_eq!(b.http01_answer("unknown-0123456789").await.expect("q"), None);
        a.remove_challenges(&["tok-live-0123456789".to_string()]).await.expect("remove");
        assert_eq!(b.http01_answer("tok-live-0123456789").await.expect("q"), None, "withdrawn");
        plane_db.close().await;
    });
}

/// A certificate that reaches the database without its NOTIFY (lost, or written while nobody
/// listened) is served after the periodic re-read; one sealed with another secret never is.
#[test]
fn a_certificate_stored_without_notify_is_served_after_the_refresh() {
    use markco_certs::SecretKey;
    use markco_control::fleet_certs::{key_context, REFRESH};

    let db = TestDb::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_text = "a fleet secret for the lost-notify test, long enough";
    let secret = dir.path().join("cluster.key");
    std::fs::write(&secret, format!("{secret_text}\n")).expect("write secret");
    // No CA answers: the gateway's one attempt fails and it waits an hour before the next, so
    // only the re-read can bring the certificate.
    let directory = format!("https://127.0.0.1:{}/dir", free_port());
    let config = format!(
        r#"[server]
http = "{{http}}"
https = "{{https}}"
admin = "{{admin}}"
upgrade_sock = "{{dir}}/upgrade.sock"
pid_file = "{{dir}}/markco.pid"

[database]
url = "{db}"

[cluster]
node = "gw-a"
secret_file = "{secret}"

[tls]
acme_directory = "{directory}"
storage = "{{dir}}/certs"
challenges = ["http-01"]
retry_initial = "1h"

[[site]]
hosts = ["localhost"]
tls = "acme"

  [[site.route]]
  match = ["/*"]
  respond = "ok"
"#,
        db = db.url,
        secret = secret.display(),
    );
    let m = Markco::start(&config);
    eventually(Duration::from_secs(20), "the first order attempt fails", || {
        metric(&m, "markco_acme_orders_total", &[("result", "error")]) >= 1.0
    });

    let ca = common::pebble::TestCa::generate(dir.path());
    let chain = std::fs::read_to_string(&ca.server_cert).expect("cert");
    let key_pem = std::fs::read(&ca.server_key).expect("key");
    let insert = |sealed: &[u8]| {
        let hex: String = sealed.iter().map(|b| format!("{b:02x}")).collect();
        psql(
            &db.url,
            &format!(
                "INSERT INTO markco_certificates (directory, name, chain_pem, key_sealed, not_after) \
                 VALUES ('{directory}', 'localhost', '{chain}', decode('{hex}', 'hex'), now() + interval '1 day') \
                 ON CONFLICT (directory, name) DO UPDATE SET chain_pem = EXCLUDED.chain_pem, key_sealed = EXCLUDED.key_sealed"
            ),
        );
    };
    let ca_pem = std::fs::read_to_string(&ca.ca_pem).expect("ca");
    let roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(ca_pem.as_bytes()).collect::<Result<_, _>>().expect("CA");
    let cfg = tls::client_config(&roots, &[]);

    // Sealed with another secret: never served (and said so in the log).
    let stranger = SecretKey::from_secret(b"not the fleet's secret, but long enough", Path::new("/elsewhere"));
    insert(&stranger.seal(&key_pem, &key_context(&directory, "localhost")).expect("seal"));
    // Sealed with the fleet's secret: served within one re-read.
    let fleet_key = SecretKey::from_secret(secret_text.as_bytes(), &secret);
    let t = Instant::now();
    eventually(REFRESH + Duration::from_secs(10), "the refusal of the foreign key is logged", || {
        m.log().contains("same secret_file on every gateway")
    });
    assert!(served_leaf(m.https, &cfg).is_err(), "nothing is served for a key it cannot open");
    insert(&fleet_key.seal(&key_pem, &key_context(&directory, "localhost")).expect("seal"));
    let t2 = Instant::now();
    eventually(REFRESH + Duration::from_secs(10), "the stored certificate is served", || {
        served_leaf(m.https, &cfg).is_ok()
    });
    eprintln!("refused after {:?}; served {:?} after it was stored", t.elapsed() - t2.elapsed(), t2.elapsed());
    assert!(
        metric(&m, "markco_acme_fleet_certificates_total", &[("event", "adopted")]) == 1.0,
        "taken from the database"
    );
}
