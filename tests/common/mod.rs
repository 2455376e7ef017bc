//! Test harness: starts the real `markco` binary and the project's test upstream as child
//! processes on loopback, with free ports and a temporary directory each.
#![allow(dead_code)]

pub mod pebble;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The directory holding the workspace's binaries (target/debug or target/release).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test>
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

pub fn markco_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_markco"))
}

pub fn upstream_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MARKCO_TESTUPSTREAM_BIN") {
        return PathBuf::from(p);
    }
    let p = bin_dir().join("markco-testupstream");
    assert!(p.exists(), "{} is missing: build it first with `cargo build --workspace --bins`", p.display());
    p
}

/// A free loopback port (bound, then released: good enough on a test machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind :0").local_addr().expect("addr").port()
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test upstream.
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    pub proc: Proc,
}

impl Upstream {
    pub fn start(name: &str) -> Upstream {
        Self::start_on(name, "127.0.0.1:0")
    }

    pub fn start_on(name: &str, listen: &str) -> Upstream {
        let mut child = Command::new(upstream_bin())
            .args(["--listen", listen, "--name", name])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start test upstream");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read upstream banner");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected upstream banner {line:?}"))
            .parse()
            .expect("upstream address");
        Upstream { addr, name: name.to_string(), proc: Proc { child } }
    }

    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }
}

/// A running markco.
pub struct Markco {
    pub http: SocketAddr,
    /// Allocated for every instance; used when the config says `https = "{https}"`.
    pub https: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub proc: Proc,
}

/// The three listen addresses of one markco.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
}

impl Ports {
    /// Fresh free loopback ports.
    pub fn free() -> Ports {
        let a = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().expect("addr") };
        Ports { http: a(free_port()), https: a(free_port()), admin: a(free_port()) }
    }
}

/// Replaces `{http}`, `{https}`, `{admin}` and `{dir}` in a config template.
pub fn render(template: &str, ports: Ports, dir: &Path) -> String {
    template
        .replace("{http}", &ports.http.to_string())
        .replace("{https}", &ports.https.to_string())
        .replace("{admin}", &ports.admin.to_string())
        .replace("{dir}", &dir.display().to_string())
}

impl Markco {
    /// Starts markco on a config template (see [`render`]) and waits until it serves.
    pub fn start(template: &str) -> Markco {
        Self::start_with_args(template, &[])
    }

    pub fn start_with_args(template: &str, extra: &[&str]) -> Markco {
        Self::start_in(tempfile::tempdir().expect("tempdir"), Ports::free(), template, extra)
    }

    /// Starts markco in a given directory on given ports (to restart one on the same state, or
    /// to tell another process, such as an ACME server, where it will listen).
    pub fn start_in(dir: tempfile::TempDir, ports: Ports, template: &str, extra: &[&str]) -> Markco {
        let Ports { http, https, admin } = ports;
        let config_path = dir.path().join("markco.toml");
        std::fs::write(&config_path, render(template, ports, dir.path())).expect("write config");
        let log_path = dir.path().join("markco.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(markco_bin())
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start markco");
        let m = Markco { http, https, admin, dir, config_path, log_path, proc: Proc { child } };
        m.wait_ready();
        m
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http_get(self.admin, "/health", &[]) {
                if r.status == 200 && TcpStream::connect(self.http).is_ok() {
                    // Give the SIGHUP handler (a background service) a moment to be installed.
                    std::thread::sleep(Duration::from_millis(100));
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!("markco did not become ready; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn ports(&self) -> Ports {
        Ports { http: self.http, https: self.https, admin: self.admin }
    }

    /// Rewrites the config file (same template placeholders).
    pub fn write_config(&self, template: &str) {
        std::fs::write(&self.config_path, render(template, self.ports(), self.dir.path())).expect("write config");
    }

    /// Stops the process (SIGKILL) and hands back its directory, to start again on the same state.
    pub fn stop(mut self) -> (tempfile::TempDir, Ports) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        let ports = self.ports();
        // Swap the directory out; dropping `self` then removes only the empty stand-in.
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        (dir, ports)
    }

    pub fn sighup(&self) {
        signal(self.pid(), libc::SIGHUP);
    }

    /// Resident memory in KiB (VmRSS) or peak (VmHWM).
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    pub fn metrics(&self) -> String {
        http_get(self.admin, "/metrics", &[]).expect("metrics").body_text()
    }

    /// Is the process still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.proc.child.try_wait(), Ok(None))
    }
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid we spawned.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body_text()))
    }
}

/// Sends raw bytes, reads until the server closes (or `timeout`), and parses the response.
pub fn raw_exchange(addr: SocketAddr, request: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(request)?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    Ok(out)
}

pub fn parse_response(raw: &[u8]) -> Option<Resp> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked =
        headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = markco_proxy::tunnel::dechunk(&body, usize::MAX).ok()?;
    }
    Some(Resp { status, headers, body })
}

/// A GET with `Connection: close`; `headers` may include `Host`.
pub fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> std::io::Result<Resp> {
    request(addr, "GET", path, headers, b"")
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Resp> {
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("Connection: close\r\n\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    let raw = raw_exchange(addr, &bytes, Duration::from_secs(10))?;
    parse_response(&raw).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unparseable response: {:?}", String::from_utf8_lossy(&raw)),
        )
    })
}

/// Waits until `f` is true or panics after `timeout` with `what`.
pub fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out waiting for: {what}");
}

/// The value of one sample in Prometheus text output, e.g.
/// `metric_value(&text, "markco_route_table_generation", &[])`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = match series.find('{') {
            Some(i) => (&series[..i], &series[i..]),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        if labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
            value.parse().ok()
        } else {
            None
        }
    })
}

/// Creates a user and a session through `markco user add --json` on this markco's config.
pub fn add_user(m: &Markco, email: &str) -> (String, String) {
    let out = Command::new(markco_bin())
        .args(["user", "add", email, "--json", "--config"])
        .arg(&m.config_path)
        .output()
        .expect("run markco user add");
    assert!(out.status.success(), "user add failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("user add prints JSON");
    (v["id"].as_str().expect("id").to_string(), v["token"].as_str().expect("token").to_string())
}

/// Registers a workspace through the admin API.
pub fn put_workspace(m: &Markco, user: &str, editor: SocketAddr, runtime: SocketAddr) {
    let body = serde_json::json!({"editor": editor.to_string(), "runtime": runtime.to_string()}).to_string();
    let r = request(
        m.admin,
        "PUT",
        &format!("/api/admin/workspaces/{user}"),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .expect("PUT workspace");
    assert_eq!(r.status, 200, "PUT workspace: {}", r.body_text());
}
