//! systemd's notify protocol, spoken over a `NOTIFY_SOCKET` this test creates (systemd does not
//! run here): READY=1 once the listeners answer, WATCHDOG=1 pings, RELOADING=1 (with
//! MONOTONIC_USEC) then READY=1 around SIGHUP, STOPPING=1 on SIGTERM; and `systemd-analyze verify`
//! on the shipped unit where it is installed.

mod common;

use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CONFIG: &str = r#"
[server]
http = "{http}"
admin = "{admin}"
upgrade_sock = "{dir}/upgrade.sock"
pid_file = "{dir}/markco.pid"

[database]
url = "sqlite://{dir}/markco.db"

[[site]]
hosts = ["*"]

  [[site.route]]
  name = "hello"
  match = ["/*"]
  respond = "hello\n"
"#;

/// The notifications received so far, in order.
struct Listener {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl Listener {
    /// Waits for a message that has `line` as one of its lines; returns it.
    fn wait_for(&mut self, line: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {line:?} within {timeout:?}; received: {:#?}", self.seen);
            self.sock.set_read_timeout(Some(left)).expect("timeout");
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                if msg.lines().any(|l| l == line) {
                    return msg;
                }
            }
        }
    }
}

#[test]
fn notify_protocol_ready_watchdog_reload_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = Ports::free();
    let config = dir.path().join("markco.toml");
    std::fs::write(&config, render(CONFIG, ports, dir.path())).expect("config");
    let sock_path = dir.path().join("notify.sock");
    let mut n = Listener { sock: UnixDatagram::bind(&sock_path).expect("bind NOTIFY_SOCKET"), seen: Vec::new() };
    let log = std::fs::File::create(dir.path().join("markco.log")).expect("log");
    let child = Command::new(markco_bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        // 400 ms: pings every 200 ms.
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start markco");
    let mut proc = Proc { child };
    let pid = proc.child.id();

    let ready = n.wait_for("READY=1", Duration::from_secs(20));
    // The listeners answer the moment READY arrives: no retry here.
    let hello = http_get(ports.http, "/", &[]).expect("the HTTP listener answers at READY");
    assert_eq!(hello.status, 200);
    assert_eq!(http_get(ports.admin, "/health", &[]).expect("the admin API answers at READY").status, 200);
    let status = ready.lines().find_map(|l| l.strip_prefix("STATUS=")).unwrap_or_default().to_string();
    assert!(
        status.contains(&ports.http.to_string()) && status.contains("1 routes"),
        "STATUS says what serves: {ready}"
    );
    assert!(!n.seen[..n.seen.len() - 1].iter().any(|m| m.contains("WATCHDOG=1")), "no ping before READY: {:?}", n.seen);

    // Pings at about half of WATCHDOG_USEC.
    let start = Instant::now();
    for _ in 0..4 {
        n.wait_for("WATCHDOG=1", Duration::from_secs(2));
    }
    assert!(start.elapsed() < Duration::from_secs(3), "four pings took {:?}", start.elapsed());

    // A reload: RELOADING=1 with MONOTONIC_USEC (systemd >= 253 needs it), then READY=1.
    std::fs::write(&config, render(&CONFIG.replace("hello\\n", "hello again\\n"), ports, dir.path())).expect("config");
    signal(pid, libc::SIGHUP);
    let reloading = n.wait_for("RELOADING=1", Duration::from_secs(5));
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("RELOADING=1 comes with MONOTONIC_USEC: {reloading:?}"));
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let now_usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
    assert!(usec <= now_usec && now_usec - usec < 10_000_000, "MONOTONIC_USEC {usec} is CLOCK_MONOTONIC ({now_usec})");
    let after = n.wait_for("READY=1", Duration::from_secs(5));
    assert!(after.contains("STATUS=serving generation 2"), "{after}");
    assert_eq!(http_get(ports.http, "/", &[]).expect("get").body_text(), "hello again\n");

    // A refused reload also ends with READY=1, and says why in STATUS.
    std::fs::write(&config, "[server\n").expect("config");
    signal(pid, libc::SIGHUP);
    n.wait_for("RELOADING=1", Duration::from_secs(5));
    let after = n.wait_for("READY=1", Duration::from_secs(5));
    assert!(after.contains("STATUS=reload refused, still serving generation 2"), "{after}");
    n.wait_for("WATCHDOG=1", Duration::from_secs(2));

    signal(pid, libc::SIGTERM);
    n.wait_for("STOPPING=1", Duration::from_secs(5));
    let _ = proc.child.wait();
}

/// Kills a process we did not spawn ourselves (the one an upgrade started) when dropped.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        signal(self.0, libc::SIGKILL);
    }
}

/// Kills the children of a process when dropped, so that a failing test leaves no new markco
/// behind (it would outlive its parent).
struct KillChildrenOnDrop(u32);

impl Drop for KillChildrenOnDrop {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir("/proc") else { return };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The parent pid is the second field after the parenthesised command name.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if ppid.and_then(|p| p.parse::<u32>().ok()) == Some(self.0) {
                signal(pid, libc::SIGKILL);
            }
        }
    }
}

#[test]
fn sigusr2_hands_over_to_a_new_process_that_systemd_then_follows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = Ports::free();
    let config = dir.path().join("markco.toml");
    let quick = CONFIG.replace("[database]", "grace_period = \"1s\"\nshutdown_timeout = \"1s\"\n\n[database]");
    std::fs::write(&config, render(&quick, ports, dir.path())).expect("config");
    let sock_path = dir.path().join("notify.sock");
    let mut n = Listener { sock: UnixDatagram::bind(&sock_path).expect("bind"), seen: Vec::new() };
    let log = std::fs::File::create(dir.path().join("markco.log")).expect("log");
    let child = Command::new(markco_bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start markco");
    let mut old = Proc { child };
    let old_pid = old.child.id();
    // Dropped before `old` is killed: the new process, still its child, goes too.
    let _children = KillChildrenOnDrop(old_pid);
    n.wait_for("READY=1", Duration::from_secs(20));

    signal(old_pid, libc::SIGUSR2);
    let took_over = n.wait_for("READY=1", Duration::from_secs(30));
    let new_pid: u32 = took_over
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the new process names itself the main process: {took_over:?}"));
    let _new = KillOnDrop(new_pid);
    assert_ne!(new_pid, old_pid);
    // The old process drains and exits (Pingora's 5 s close timeout, then grace_period).
    let deadline = Instant::now() + Duration::from_secs(20);
    while matches!(old.child.try_wait(), Ok(None)) {
        assert!(Instant::now() < deadline, "the old process did not exit");
        let _ = n.sock.set_read_timeout(Some(Duration::from_millis(100)));
        let mut buf = [0u8; 4096];
        if let Ok(k) = n.sock.recv(&mut buf) {
            n.seen.push(String::from_utf8_lossy(&buf[..k]).into_owned());
        }
    }
    assert!(!n.seen.iter().any(|m| m.contains("STOPPING=1")), "a handover is not a stop: {:#?}", n.seen);
    // The new process serves and keeps systemd's watchdog fed.
    n.wait_for("WATCHDOG=1", Duration::from_secs(2));
    let r = http_get(ports.http, "/", &[]).expect("served by the new process");
    assert_eq!((r.status, r.body_text().as_str()), (200, "hello\n"));
    let status = std::fs::read_to_string(format!("/proc/{new_pid}/status")).unwrap_or_default();
    assert!(status.contains("State:") && !status.contains("zombie"), "the new process runs");
}

#[test]
fn no_watchdog_pings_unless_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = Ports::free();
    let config = dir.path().join("markco.toml");
    std::fs::write(&config, render(CONFIG, ports, dir.path())).expect("config");
    let sock_path = dir.path().join("notify.sock");
    let mut n = Listener { sock: UnixDatagram::bind(&sock_path).expect("bind"), seen: Vec::new() };
    let child = Command::new(markco_bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env_remove("WATCHDOG_USEC")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start markco");
    let _proc = Proc { child };
    n.wait_for("READY=1", Duration::from_secs(20));
    assert!(TcpStream::connect(ports.http).is_ok());
    std::thread::sleep(Duration::from_millis(800));
    n.sock.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 4096];
    while let Ok(k) = n.sock.recv(&mut buf) {
        let msg = String::from_utf8_lossy(&buf[..k]).into_owned();
        assert!(!msg.contains("WATCHDOG=1"), "a ping without WATCHDOG_USEC: {msg}");
    }
}

#[test]
fn the_unit_file_verifies() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("SKIPPED: systemd-analyze is not installed; the unit file was not verified");
        return;
    };
    assert!(out.status.success());
    // The unit names /usr/local/bin/markco; point it at the binary under test so that verify
    // checks the commands exist.
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/markco.service")).expect("unit");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("markco.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/markco", &markco_bin().display().to_string())).expect("write");
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().expect("verify");
    let err = String::from_utf8_lossy(&out.stderr);
    // Lines about the host (no systemd running, no markco user here) are not the unit's fault.
    let problems: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("markco.service"))
        .filter(|l| !l.contains("Failed to resolve user") && !l.contains("Failed to resolve group"))
        .collect();
    assert!(out.status.success() || problems.is_empty(), "systemd-analyze verify:\n{err}");
    assert!(problems.is_empty(), "systemd-analyze verify:\n{err}");
    assert!(unit.contains("Type=notify\n") && unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    assert!(unit.contains("WatchdogSec="));
}
