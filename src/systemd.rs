//! systemd's notify protocol (`Type=notify`): READY=1 once the listeners answer and the control
//! plane has its state, WATCHDOG=1 while the data plane, the admin API and the control plane keep
//! answering, STATUS= lines, RELOADING=1/READY=1 around a reload and STOPPING=1 at shutdown.
//! Without `NOTIFY_SOCKET` (not under systemd) nothing here does anything.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use markco_control::plane::{ControlPlane, PlaneError};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use sd_notify::NotifyState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one liveness probe may take before the check counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Sends one notification; a failure is logged, never fatal (systemd may be gone at shutdown).
fn send(states: &[NotifyState<'_>]) {
    if !enabled() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd through NOTIFY_SOCKET: {e}");
    }
}

/// A STATUS= line for `systemctl status`.
pub fn status(msg: &str) {
    send(&[NotifyState::Status(msg)]);
}

/// WATCHDOG_USEC, when systemd asks for pings. A process started by an upgrade takes the pings
/// over from the one whose pid WATCHDOG_PID names.
fn watchdog_interval(took_over: bool) -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    let pid_ok = took_over
        || std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
    (pid_ok && usec > 0).then(|| Duration::from_micros(usec))
}

/// Marks a reload: RELOADING=1 (with MONOTONIC_USEC, which systemd 253 and later require) now,
/// READY=1 with the outcome as STATUS when dropped, whatever the outcome.
pub struct Reloading {
    status: String,
}

impl Reloading {
    pub fn begin() -> Reloading {
        if enabled() {
            match NotifyState::monotonic_usec_now() {
                Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status("reloading the config")]),
                Err(e) => tracing::warn!("cannot read CLOCK_MONOTONIC for systemd's reload notice: {e}"),
            }
        }
        Reloading { status: "reload finished".into() }
    }

    pub fn status(&mut self, status: String) {
        self.status = status;
    }
}

impl Drop for Reloading {
    fn drop(&mut self) {
        send(&[NotifyState::Ready, NotifyState::Status(&self.status)]);
    }
}

/// The background service that speaks to systemd.
pub struct Notifier {
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub plane: Arc<ControlPlane>,
    /// What READY's STATUS line says (listeners, sites, routes).
    pub summary: String,
    /// Started with `--upgrade`: this process becomes the service's main process when ready.
    pub took_over: bool,
}

/// A wildcard listen address is probed on loopback.
fn probe_addr(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), a.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), a.port()),
        _ => a,
    }
}

/// Sends a GET and returns the status line's code.
async fn http_status(addr: SocketAddr, path: &str, host: &str) -> Result<u16, String> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: markco-watchdog\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.map_err(|e| format!("no answer: {e}"))?;
        let text = String::from_utf8_lossy(&head);
        text.strip_prefix("HTTP/1.")
            .and_then(|r| r.get(2..5))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("not an HTTP answer: {text:?}"))
    };
    tokio::time::timeout(PROBE_TIMEOUT, exchange).await.map_err(|_| format!("no answer within {PROBE_TIMEOUT:?}"))?
}

impl Notifier {
    /// Does every part answer? The error names the part that does not.
    async fn alive(&self) -> Result<(), String> {
        // Any HTTP answer from the edge listener is fine (a made-up host gets 404).
        http_status(probe_addr(self.http), "/.markco/watchdog", "markco-watchdog.invalid")
            .await
            .map_err(|e| format!("the HTTP listener {} does not answer: {e}", self.http))?;
        match http_status(probe_addr(self.admin), "/health", "localhost").await {
            Ok(200) => {}
            Ok(code) => return Err(format!("the admin API {} answers /health with {code}", self.admin)),
            Err(e) => return Err(format!("the admin API {} does not answer: {e}", self.admin)),
        }
        // A read through the control plane's command loop and its database (a well-formed id
        // that no user has). A refusal is an answer too; only internal failures and silence are not.
        let probe = self.plane.get_workspace("00000000-0000-0000-0000-000000000000");
        match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(_)) | Ok(Err(PlaneError::NotFound(_) | PlaneError::Invalid(_))) => Ok(()),
            Ok(Err(e)) => Err(format!("the control plane fails: {e}")),
            Err(_) => Err(format!("the control plane does not answer within {PROBE_TIMEOUT:?}")),
        }
    }
}

#[async_trait]
impl BackgroundService for Notifier {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if !enabled() {
            return;
        }
        send(&[NotifyState::Status("starting: waiting for the listeners and the control plane")]);
        // READY only when a request would be served: listeners bound and the state loaded.
        loop {
            let not_yet = match self.alive().await {
                Ok(()) => break,
                Err(e) => e,
            };
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = shutdown.changed() => {
                    tracing::warn!("stopping before ready ({not_yet})");
                    return;
                }
            }
        }
        let ready_status = format!("serving: {}", self.summary);
        if self.took_over {
            // The old process is on its way out: systemd must follow this one from now on
            // (accepted with NotifyAccess=all from a process in the service's cgroup).
            send(&[NotifyState::MainPid(std::process::id()), NotifyState::Ready, NotifyState::Status(&ready_status)]);
        } else {
            send(&[NotifyState::Ready, NotifyState::Status(&ready_status)]);
        }
        tracing::info!(took_over = self.took_over, "told systemd: ready");
        // systemd wants a ping at least every WATCHDOG_USEC; ping at half of it.
        let watchdog = watchdog_interval(self.took_over);
        let mut tick = tokio::time::interval(watchdog.map(|w| w / 2).unwrap_or(Duration::from_secs(3600)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick(), if watchdog.is_some() => match self.alive().await {
                    Ok(()) => {
                        if std::mem::replace(&mut failing, false) {
                            send(&[NotifyState::Watchdog, NotifyState::Status(&ready_status)]);
                        } else {
                            send(&[NotifyState::Watchdog]);
                        }
                    }
                    // No ping: if this lasts, systemd restarts markco (WatchdogSec in the unit).
                    Err(e) => {
                        failing = true;
                        tracing::error!("watchdog: {e}; not telling systemd we are alive");
                        send(&[NotifyState::Status(&format!("unhealthy: {e}"))]);
                    }
                },
                _ = shutdown.changed() => {
                    // Handing over to a new process is not the service stopping.
                    if crate::upgrade::HANDING_OVER.load(std::sync::atomic::Ordering::SeqCst) {
                        tracing::info!("handed over to the new process; draining");
                    } else {
                        send(&[NotifyState::Stopping, NotifyState::Status("stopping: draining connections")]);
                    }
                    return;
                }
            }
        }
    }
}
