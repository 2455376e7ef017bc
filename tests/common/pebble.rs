//! A real ACME server for the TLS tests: Debian's `pebble`, started on free loopback ports with
//! an HTTPS certificate from a private CA made here with rcgen, and killed on drop.
//!
//! Pebble validates HTTP-01 at `http://localhost:<httpPort>` and TLS-ALPN-01 at
//! `localhost:<tlsPort>`, so tests choose markco's ports first ([`super::Ports::free`]) and give
//! them to [`Pebble::start`]. Its issuing root is new at every start: [`Pebble::root_pem`].

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};

use super::{free_port, Proc};

pub const PEBBLE_BIN: &str = "/usr/bin/pebble";

/// A private CA and, signed by it, a server certificate for `localhost` and `127.0.0.1`.
pub struct TestCa {
    /// The CA certificate: what a client of pebble's HTTPS must trust (markco's `acme_ca_root`).
    pub ca_pem: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestCa {
    /// Writes `ca.pem`, `server.pem` and `server.key` into `dir`.
    pub fn generate(dir: &Path) -> TestCa {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.distinguished_name.push(DnType::CommonName, "markco test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA certificate");

        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("server params");
        params.distinguished_name.push(DnType::CommonName, "pebble test server");
        let cert = params.signed_by(&key, &ca).expect("server certificate");

        let t = TestCa {
            ca_pem: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        };
        std::fs::write(&t.ca_pem, ca.pem()).expect("write ca.pem");
        std::fs::write(&t.server_cert, cert.pem()).expect("write server.pem");
        std::fs::write(&t.server_key, key.serialize_pem()).expect("write server.key");
        t
    }
}

/// One running pebble.
pub struct Pebble {
    pub dir: tempfile::TempDir,
    /// The ACME API (`/dir`).
    pub acme: SocketAddr,
    /// The management API (`/roots/0`).
    pub mgmt: SocketAddr,
    pub ca: TestCa,
    pub log_path: PathBuf,
    proc: Option<Proc>,
}

impl Pebble {
    /// Starts pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port` (of
    /// `localhost`), and waits until its ACME directory is served.
    pub fn start(http_port: u16, tls_port: u16) -> Pebble {
        Self::start_with_validity(http_port, tls_port, None)
    }

    /// [`Pebble::start`], issuing certificates valid for `validity_s` seconds (pebble's default:
    /// five years), so a test can see a certificate become due.
    pub fn start_with_validity(http_port: u16, tls_port: u16, validity_s: Option<u64>) -> Pebble {
        assert!(Path::new(PEBBLE_BIN).exists(), "{PEBBLE_BIN} is missing: apt-get install pebble");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::generate(dir.path());
        let a = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().expect("addr") };
        // Its own two ports are chosen here: a collision with another process is retried.
        for _ in 0..5 {
            let (acme, mgmt) = (a(free_port()), a(free_port()));
            let config = serde_json::json!({
                "pebble": {
                    "listenAddress": acme.to_string(),
                    "managementListenAddress": mgmt.to_string(),
                    "certificate": ca.server_cert,
                    "privateKey": ca.server_key,
                    "httpPort": http_port,
                    "tlsPort": tls_port,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": false
                }
            });
            let mut config = config;
            if let Some(v) = validity_s {
                config["pebble"]["certificateValidityPeriod"] = serde_json::json!(v);
            }
            let config_path = dir.path().join("pebble.json");
            std::fs::write(&config_path, serde_json::to_vec_pretty(&config).expect("json")).expect("write pebble.json");
            let log_path = dir.path().join("pebble.log");
            let log = File::create(&log_path).expect("pebble log");
            let child = Command::new(PEBBLE_BIN)
                .arg("-config")
                .arg(&config_path)
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .env("PEBBLE_AUTHZREUSE", "0")
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log handle"))
                .stderr(log)
                .spawn()
                .expect("start pebble");
            let mut proc = Proc { child };
            let deadline = Instant::now() + Duration::from_secs(30);
            let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
            loop {
                // Pebble prints its addresses before it binds them, and a connect may reach
                // another process on a taken port: a bind error in the log or an exit wins.
                if read_log().contains("ACME directory available")
                    && TcpStream::connect(acme).is_ok()
                    && TcpStream::connect(mgmt).is_ok()
                    && matches!(proc.child.try_wait(), Ok(None))
                    && !read_log().contains("address already in use")
                {
                    return Pebble { dir, acme, mgmt, ca, log_path, proc: Some(proc) };
                }
                if matches!(proc.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                assert!(Instant::now() < deadline, "pebble did not start; its log:\n{}", read_log());
                std::thread::sleep(Duration::from_millis(50));
            }
            let log = read_log();
            assert!(log.contains("address already in use"), "pebble exited; its log:\n{log}");
            eprintln!("pebble: a port was taken, retrying");
        }
        panic!("pebble could not bind free ports in 5 attempts");
    }

    pub fn directory_url(&self) -> String {
        format!("https://{}/dir", self.acme)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// How many orders pebble has received (`POST /order-plz` in its log).
    pub fn order_count(&self) -> usize {
        self.log_lines_with("POST /order-plz")
    }

    /// How many challenge validations pebble has started (one per challenge a client asked it
    /// to validate; none for an order whose authorization pebble reused).
    pub fn validation_count(&self) -> usize {
        self.log_lines_with("Pulled a task from the Tasks queue")
    }

    fn log_lines_with(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// The PEM of the root that issues this pebble's certificates (fetched over HTTPS from the
    /// management API, trusting our CA).
    pub fn root_pem(&self) -> String {
        let url = format!("https://{}/roots/0", self.mgmt);
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "10", "--cacert"])
            .arg(&self.ca.ca_pem)
            .arg(&url)
            .output()
            .expect("run curl");
        let pem = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && pem.contains("BEGIN CERTIFICATE"),
            "GET {url} failed: {}{pem}",
            String::from_utf8_lossy(&out.stderr)
        );
        pem
    }

    /// Writes [`Pebble::root_pem`] to `path` and returns the path.
    pub fn write_root(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.root_pem()).expect("write pebble root");
        path.to_path_buf()
    }

    /// A `[tls]` section for markco pointing at this pebble (`{dir}` is markco's directory).
    /// `extra` adds lines such as `renew_before = "6y"`.
    pub fn tls_section(&self, challenges: &[&str], extra: &str) -> String {
        let list: Vec<String> = challenges.iter().map(|c| format!("{c:?}")).collect();
        format!(
            "[tls]\nacme_directory = \"{}\"\nacme_ca_root = \"{}\"\nstorage = \"{{dir}}/certs\"\nchallenges = [{}]\n{extra}\n",
            self.directory_url(),
            self.ca.ca_pem.display(),
            list.join(", ")
        )
    }

    /// Kills pebble now (the ACME server goes down).
    pub fn kill(&mut self) {
        self.proc.take();
    }
}
