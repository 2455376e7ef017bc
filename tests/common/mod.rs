//! Test harness: starts the real `markco` binary and the project's test upstream as child
//! processes on loopback, with free ports and a temporary directory each.
#![allow(dead_code)]

pub mod pebble;
pub mod pg;
pub mod podman;
pub mod tls;

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

/// The kernel's ephemeral port range (`ip_local_port_range`): ports it hands to outgoing
/// connections and to `bind(:0)` at any moment, so a port from there can be taken between our
/// choosing it and markco binding it.
pub fn ephemeral_range() -> (u16, u16) {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = text.split_whitespace().filter_map(|v| v.parse::<u16>().ok());
    match (it.next(), it.next()) {
        (Some(lo), Some(hi)) if lo <= hi => (lo, hi),
        _ => (32768, 60999),
    }
}

/// Where [`free_port`] picks from: below the ephemeral range, and below the workspace tests'
/// container port ranges (which sit above it, see `tests/workspaces.rs`).
const PORT_BAND_START: u16 = 15000;

/// A free loopback port outside the ephemeral range. Each call in this process gets a different
/// port (a cursor from a random start walks the band), and it was bindable when chosen; another
/// process can still take it before markco binds it, which [`Markco::start`] survives by
/// retrying on new ports.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU32, Ordering};
    static CURSOR: AtomicU32 = AtomicU32::new(u32::MAX);
    let band_end = ephemeral_range().0.max(PORT_BAND_START + 2000);
    let band = u32::from(band_end - PORT_BAND_START);
    if CURSOR.load(Ordering::Relaxed) == u32::MAX {
        // A random start, so concurrent test processes rarely walk the same ports.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let _ = CURSOR.compare_exchange(
            u32::MAX,
            (h.finish() % u64::from(band)) as u32,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
    for _ in 0..band {
        let n = CURSOR.fetch_add(1, Ordering::Relaxed);
        let port = PORT_BAND_START + (n % band) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {PORT_BAND_START}..{band_end}");
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
        let mut dir = tempfile::tempdir().expect("tempdir");
        // Ports are chosen here, so a collision with another process is retried on new ones.
        for _ in 0..5 {
            match Self::try_start_in(dir, Ports::free(), template, extra) {
                Ok(m) => return m,
                Err(d) => dir = d,
            }
        }
        panic!("markco could not bind free ports in 5 attempts");
    }

    /// Starts markco in a given directory on given ports (to restart one on the same state, or
    /// to tell another process, such as an ACME server, where it will listen). A port taken by
    /// a short-lived socket is retried a few times.
    pub fn start_in(mut dir: tempfile::TempDir, ports: Ports, template: &str, extra: &[&str]) -> Markco {
        for _ in 0..5 {
            match Self::try_start_in(dir, ports, template, extra) {
                Ok(m) => return m,
                Err(d) => dir = d,
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("markco could not bind {ports:?} in 5 attempts");
    }

    /// Starts markco and waits until it serves; on a port collision (another process bound
    /// one of ours first) hands the directory back for another attempt. Any other failure
    /// to start panics with markco's log.
    pub fn try_start_in(
        dir: tempfile::TempDir,
        ports: Ports,
        template: &str,
        extra: &[&str],
    ) -> Result<Markco, tempfile::TempDir> {
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
        let mut m = Markco { http, https, admin, dir, config_path, log_path, proc: Proc { child } };
        match m.wait_ready() {
            Ok(()) => Ok(m),
            Err(log) if log.contains("Address already in use") || log.contains("cannot listen on") => {
                eprintln!("markco: a port of {ports:?} was taken, retrying");
                let (dir, _) = m.stop();
                Err(dir)
            }
            Err(log) => panic!("markco did not become ready; log:\n{log}"),
        }
    }

    /// Waits until the admin API and the HTTP listener answer and the SIGHUP handler is
    /// installed; `Err(log)` when markco exits or does not get there in a minute (a generous
    /// bound for a busy machine: it only costs time when markco is broken).
    pub fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if !self.alive() {
                // Let the last lines reach the log file.
                std::thread::sleep(Duration::from_millis(50));
                return Err(self.log());
            }
            if http_get(self.admin, "/health", &[]).is_ok_and(|r| r.status == 200)
                && TcpStream::connect(self.http).is_ok()
                && catches_signal(self.pid(), libc::SIGHUP)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("(not ready after 60 s)\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn sigterm(&self) {
        signal(self.pid(), libc::SIGTERM);
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
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

/// Has `pid` installed a handler for `sig`? (`SigCgt` in /proc: until markco's handler is in
/// place a SIGHUP is ignored, so a test that sends one must wait for this.)
pub fn catches_signal(pid: u32, sig: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|mask| mask & (1u64 << (sig - 1)) != 0)
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

/// Sends raw bytes and reads until the server closes. A read timeout is an error: a server
/// that keeps a connection open it should have closed must fail the test, not pass it.
pub fn raw_exchange(addr: SocketAddr, request: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(request)?;
    read_to_close(&mut s)
}

/// Reads until EOF; a reset after some bytes counts as the end (a server may reset a
/// connection it refused), a timeout is an error that says what had arrived.
pub fn read_to_close(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the connection was not closed within the read timeout; received so far: {:?}",
                        String::from_utf8_lossy(&out[..out.len().min(2000)])
                    ),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !out.is_empty() => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}

/// Sends raw bytes and reads one complete response (the connection may stay open, as it may
/// without `Connection: close`); a timeout before the response is complete is an error.
pub fn raw_exchange_one(addr: SocketAddr, request: &[u8], timeout: Duration) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(request)?;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Ok(r) = parse_response_to("GET", &out) {
            return Ok(r);
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed before a complete response: {:?}", String::from_utf8_lossy(&out)),
            ));
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Parses one HTTP/1.1 response to a GET (see [`parse_response_to`]); `None` if it is not
/// a complete, well-formed response.
pub fn parse_response(raw: &[u8]) -> Option<Resp> {
    parse_response_to("GET", raw).ok()
}

/// Parses one HTTP/1.1 response with httparse and frames its body by itself (not with the
/// code under test): a chunked body must be well-formed and terminated, a `Content-Length`
/// body complete and no longer, so a truncated or malformed response is an error.
pub fn parse_response_to(method: &str, raw: &[u8]) -> Result<Resp, String> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("incomplete response head".into()),
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    let status = parsed.code.ok_or("no status code")?;
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).trim().to_string()))
        .collect();
    let find = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    let rest = &raw[head_len..];
    let bodyless =
        method.eq_ignore_ascii_case("HEAD") || (100..200).contains(&status) || status == 204 || status == 304;
    let body = if bodyless {
        Vec::new()
    } else if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        decode_chunked(rest)?
    } else if let Some(cl) = find("content-length") {
        let cl: usize = cl.parse().map_err(|_| format!("bad Content-Length {cl:?}"))?;
        if rest.len() < cl {
            return Err(format!("body truncated: {} of {cl} bytes", rest.len()));
        }
        // Bytes past the body would be a second response on a connection asked to close.
        if rest.len() > cl {
            return Err(format!("{} bytes after the {cl}-byte body", rest.len() - cl));
        }
        rest.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Resp { status, headers, body })
}

/// A strict chunked-body decoder (RFC 9112 7.1) built on httparse's chunk-size parser.
fn decode_chunked(mut raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let (used, size) = match httparse::parse_chunk_size(raw) {
            Ok(httparse::Status::Complete(v)) => v,
            Ok(httparse::Status::Partial) => return Err("chunked body ends inside a chunk size".into()),
            Err(_) => {
                return Err(format!("bad chunk size line in {:?}", String::from_utf8_lossy(&raw[..raw.len().min(40)])))
            }
        };
        raw = &raw[used..];
        let size = usize::try_from(size).map_err(|_| "chunk too large")?;
        if size == 0 {
            // No trailers are expected from markco; the body ends with an empty line.
            return if raw == b"\r\n" { Ok(out) } else { Err(format!("bad chunked terminator {raw:?}")) };
        }
        if raw.len() < size + 2 {
            return Err(format!("chunked body truncated: a {size}-byte chunk has {} bytes", raw.len()));
        }
        if &raw[size..size + 2] != b"\r\n" {
            return Err("a chunk is not followed by CRLF".into());
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
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
    parse_response_to(method, &raw).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{e}: {:?}", String::from_utf8_lossy(&raw[..raw.len().min(4000)])),
        )
    })
}

/// Waits until `f` is true or panics after `timeout` with `what`. Deadlines are sized for a
/// loaded machine: they only cost time when the awaited thing is broken.
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
