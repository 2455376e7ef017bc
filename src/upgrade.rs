//! SIGUSR2: replace this process with the binary now on disk, without dropping a connection.
//!
//! The new process is started as our child, with our arguments plus `--upgrade`, so that under
//! systemd it runs in the service's cgroup and may take the service over (it reports
//! `MAINPID=`, see `systemd.rs`). Once it waits on `upgrade_sock`, this process gets SIGQUIT,
//! which hands the listening sockets over and drains (Pingora's graceful upgrade). If the new
//! binary fails to start, nothing is handed over and this process keeps serving.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

/// Set once this process hands over to a new one: its shutdown is not the service stopping.
pub static HANDING_OVER: AtomicBool = AtomicBool::new(false);

/// The environment variable that tells a new process it was started by a SIGUSR2 upgrade.
pub const UPGRADED_FROM: &str = "MARKCO_UPGRADED_FROM";

/// How long the new binary may take to reach the point where it waits for the sockets.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct SelfUpgrade {
    pub upgrade_sock: PathBuf,
}

#[async_trait]
impl BackgroundService for SelfUpgrade {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let (mut usr2, mut quit) = match (signal(SignalKind::user_defined2()), signal(SignalKind::quit())) {
            (Ok(u), Ok(q)) => (u, q),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(
                    "cannot listen for SIGUSR2/SIGQUIT; upgrade with `markco run --upgrade` and SIGQUIT: {e}"
                );
                return;
            }
        };
        loop {
            tokio::select! {
                _ = usr2.recv() => {
                    if HANDING_OVER.load(Ordering::SeqCst) {
                        tracing::warn!("SIGUSR2: an upgrade is already under way");
                        continue;
                    }
                    if let Err(e) = self.upgrade().await {
                        tracing::error!("upgrade failed, this process keeps serving: {e}");
                        crate::systemd::status(&format!("upgrade failed, still serving: {e}"));
                    }
                }
                // A SIGQUIT sent by hand (after `markco run --upgrade`) is a handover too.
                _ = quit.recv() => HANDING_OVER.store(true, Ordering::SeqCst),
                _ = shutdown.changed() => return,
            }
        }
    }
}

impl SelfUpgrade {
    async fn upgrade(&self) -> Result<(), String> {
        let mut args: Vec<OsString> = std::env::args_os().collect();
        if args.is_empty() {
            return Err("no program path in argv".into());
        }
        // The path we were started as: after an install it names the new binary (our own inode,
        // /proc/self/exe, is the old one).
        let program = args.remove(0);
        if !args.iter().any(|a| a == "--upgrade") {
            args.push("--upgrade".into());
        }
        // The new process creates the socket; a stale one must not look like it.
        match std::fs::remove_file(&self.upgrade_sock) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove the stale {}: {e}", self.upgrade_sock.display())),
        }
        tracing::info!(program = ?program, "SIGUSR2: starting the new binary to take over");
        let mut child = Command::new(&program)
            .args(&args)
            .env(UPGRADED_FROM, std::process::id().to_string())
            .spawn()
            .map_err(|e| format!("cannot start {program:?}: {e}"))?;
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("the new binary {program:?} exited before taking over ({status}); see its log"));
            }
            if self.upgrade_sock.exists() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the new binary did not wait on {} within {START_TIMEOUT:?}; it was stopped",
                    self.upgrade_sock.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        HANDING_OVER.store(true, Ordering::SeqCst);
        tracing::info!(new_pid = child.id(), "handing the listeners over to the new process");
        crate::systemd::status(&format!("handing over to pid {}", child.id()));
        // Pingora's graceful upgrade: send the sockets, stop accepting, drain.
        // SAFETY: kill(2) on our own pid with a signal Pingora handles.
        unsafe {
            libc::kill(std::process::id() as libc::pid_t, libc::SIGQUIT);
        }
        // Dropping the handle leaves the child running; it outlives us and is reaped by systemd
        // (or init).
        drop(child);
        Ok(())
    }
}
