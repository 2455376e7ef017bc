//! The workspace health loop: every running workspace's runtime is probed concurrently (bounded),
//! and one that fails three probes in a row (a container that runs but does not answer counts as
//! failed) is replaced by a fresh runtime in the same pod on the pod's spare runtime port; the
//! route moves and the editor is told through the update-port flow. The old runtime is removed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::db::Db;
use crate::http_client;
use crate::plane::{ControlPlane, Moved};
use crate::workspaces::{spare_port, Workspaces};

/// Probes at once at most this many runtimes.
const CONCURRENCY: usize = 16;
const STRIKES: u32 = 3;

impl ControlPlane {
    pub(crate) async fn runtime_health_loop(self: Arc<Self>, db: Arc<Db>, ws: Arc<Workspaces>, interval: Duration) {
        let mut strikes: HashMap<String, u32> = HashMap::new();
        loop {
            tokio::time::sleep(interval).await;
            let table = self.table.load_full();
            let running = table.workspaces.iter().filter(|(_, r)| r.running).count() as i64;
            ws.metrics.by_state.with_label_values(&["running"]).set(running);
            ws.metrics.by_state.with_label_values(&["down"]).set(table.workspaces.size() as i64 - running);
            // In a cluster, each node probes and replaces only the runtimes it runs.
            let mine = |u: &str| self.cluster.as_ref().is_none_or(|c| c.owns(u));
            let targets: Vec<(String, SocketAddr)> = table
                .workspaces
                .iter()
                .filter(|(u, r)| r.running && mine(u))
                .map(|(u, r)| (u.to_string(), r.runtime))
                .collect();
            for chunk in targets.chunks(CONCURRENCY) {
                let results = futures_util::future::join_all(chunk.iter().map(|(user, addr)| async move {
                    let ok = matches!(
                        http_client::call(*addr, "GET", "/mrp/v1/capabilities", None, Duration::from_secs(2)).await,
                        Ok(r) if (200..300).contains(&r.status)
                    );
                    (user.clone(), ok)
                }))
                .await;
                for (user, ok) in results {
                    if ok {
                        strikes.remove(&user);
                        continue;
                    }
                    ws.metrics.probe_failures.inc();
                    let n = strikes.entry(user.clone()).or_insert(0);
                    *n += 1;
                    tracing::warn!(user = %user, strike = *n, "runtime health probe failed");
                    if *n >= STRIKES {
                        strikes.remove(&user);
                        if let Err(e) = self.replace_runtime(&db, &ws, &user).await {
                            tracing::error!(user = %user, "replacing the runtime failed: {e:#}");
                        }
                    }
                }
            }
        }
    }

    /// A new runtime on the pod's spare port; once it answers, the update-port flow moves the
    /// route and tells the editor; then the old runtime goes.
    async fn replace_runtime(&self, db: &Db, ws: &Workspaces, user: &str) -> anyhow::Result<()> {
        let lock = ws.user_lock(user);
        let _guard = lock.lock().await;
        // The old runtime's exit is ours: the event watcher must not restart it.
        self.stopping.lock().unwrap_or_else(|p| p.into_inner()).insert(user.to_string());
        let res = self.replace_runtime_locked(db, ws, user).await;
        self.stopping.lock().unwrap_or_else(|p| p.into_inner()).remove(user);
        res
    }

    async fn replace_runtime_locked(&self, db: &Db, ws: &Workspaces, user: &str) -> anyhow::Result<()> {
        let Some(row) = db.get_workspace(user).await? else { return Ok(()) };
        let started = Instant::now();
        let started_unix = chrono::Utc::now().timestamp();
        let old_port = row.runtime_port;
        let new_port = spare_port(old_port);
        let old_name =
            row.runtime_container.clone().unwrap_or_else(|| crate::workspaces::container_name("runtime", user));
        let new_name = format!("markco-runtime-{user}-p{new_port}");
        // Made like the first runtime, with the user's plan limits.
        let limits = ws.limits_of(db, user).await;
        let spec = ws.runtime_spec(&new_name, user, new_port, &limits);
        // A leftover from an earlier failed replacement on this port.
        self.remove_retired(ws, &new_name).await;
        ws.engine.create_container(&spec).await?;
        ws.engine.start_container(&new_name).await?;
        // Where the pod publishes: 127.0.0.1 alone, the node's advertise address in a cluster.
        let host = ws.cfg().advertise;
        let addr = SocketAddr::new(host, new_port);
        let deadline = Instant::now() + ws.cfg().ready_timeout;
        // The probe of the update-port flow: the new runtime must answer before anything moves.
        loop {
            let probe = http_client::call(addr, "GET", "/mrp/v1/capabilities", None, Duration::from_secs(2)).await;
            if probe.is_ok_and(|r| r.is_success()) {
                break;
            }
            if Instant::now() > deadline {
                self.remove_retired(ws, &new_name).await;
                anyhow::bail!("the replacement runtime did not answer within {:?}", ws.cfg().ready_timeout);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let probe_ms = started.elapsed().as_millis() as u64;
        let host = host.to_string();
        let moved = Moved { row: &row, host: &host, port: new_port, target: addr, runtime_container: Some(new_name) };
        let outcome = self
            .complete_move(db, moved, started, started_unix, probe_ms)
            .await
            .map_err(|e| anyhow::anyhow!("moving to the replacement runtime: {e}"))?;
        // Retired: podman may report its exit after `stopping` is over, and the event watcher
        // must not take it for the workspace dying (it would mark it down, and the next request
        // would start a new editor that never heard of this move).
        self.remove_retired(ws, &old_name).await;
        tracing::warn!(
            user,
            from = old_port,
            to = new_port,
            editor_notified = outcome.editor_notified,
            "unresponsive runtime replaced"
        );
        Ok(())
    }
}
