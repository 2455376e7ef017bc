//! The workspace health loop: every running workspace's runtime is probed concurrently (bounded),
//! and one that fails three probes in a row (a container that runs but does not answer counts as
//! failed) is replaced by a fresh runtime in the same pod on the pod's spare runtime port; the
//! route moves and the editor is told through the update-port flow. The old runtime is removed.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use markco_proxy::table::UserRoutes;

use crate::db::{Db, MoveRecord};
use crate::engine::{ContainerSpec, LABEL_INSTANCE, LABEL_MANAGED, LABEL_ROLE, LABEL_USER};
use crate::http_client;
use crate::plane::ControlPlane;
use crate::workspaces::{pod_name, spare_port, Workspaces};

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
            let targets: Vec<(String, SocketAddr)> =
                table.workspaces.iter().filter(|(_, r)| r.running).map(|(u, r)| (u.to_string(), r.runtime)).collect();
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
        let old_port = row.runtime_port;
        let new_port = spare_port(old_port);
        let old_name =
            row.runtime_container.clone().unwrap_or_else(|| crate::workspaces::container_name("runtime", user));
        let new_name = format!("markco-runtime-{user}-p{new_port}");
        let mut labels = BTreeMap::new();
        labels.insert(LABEL_MANAGED.to_string(), "true".to_string());
        labels.insert(LABEL_USER.to_string(), user.to_string());
        labels.insert(LABEL_ROLE.to_string(), "runtime".to_string());
        labels.insert(LABEL_INSTANCE.to_string(), ws.cfg.instance.clone());
        let spec = ContainerSpec {
            name: new_name.clone(),
            pod: pod_name(user),
            image: ws.cfg.runtime_image.clone(),
            command: ws
                .cfg
                .runtime_command
                .iter()
                .map(|c| crate::workspaces::fill(c, new_port, new_port, user))
                .collect(),
            env: ws
                .cfg
                .runtime_env
                .iter()
                .map(|(k, v)| (k.clone(), crate::workspaces::fill(v, new_port, new_port, user)))
                .collect(),
            labels,
            mounts: vec![(ws.cfg.data_dir.join(user).display().to_string(), "/home/ubuntu".to_string())],
            memory_bytes: ws.cfg.runtime_memory,
            cpus: ws.cfg.runtime_cpus,
        };
        // A leftover from an earlier failed replacement on this port.
        let _ = ws.engine.remove_container(&new_name).await;
        ws.engine.create_container(&spec).await?;
        ws.engine.start_container(&new_name).await?;
        let addr = SocketAddr::from(([127, 0, 0, 1], new_port));
        let deadline = Instant::now() + ws.cfg.ready_timeout;
        loop {
            if matches!(http_client::call(addr, "GET", "/mrp/v1/capabilities", None, Duration::from_secs(2)).await, Ok(r) if (200..300).contains(&r.status))
            {
                break;
            }
            if Instant::now() > deadline {
                let _ = ws.engine.remove_container(&new_name).await;
                anyhow::bail!("the replacement runtime did not answer within {:?}", ws.cfg.ready_timeout);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The update-port flow: route, database, editor, record.
        db.set_runtime(user, "127.0.0.1", new_port).await?;
        let mut new_row = row.clone();
        new_row.runtime_port = new_port;
        new_row.runtime_container = Some(new_name.clone());
        db.upsert_workspace(&new_row).await?;
        self.table.rcu(|t| match t.user(user) {
            Some(r) => t.with_user(user, UserRoutes { runtime: addr, ..(**r).clone() }),
            None => (**t).clone(),
        });
        let notify_started = Instant::now();
        let body = serde_json::json!({"port": new_port, "host": "127.0.0.1"}).to_string();
        let editor = SocketAddr::from(([127, 0, 0, 1], row.editor_port));
        let notified =
            http_client::call(editor, "POST", "/api/runtime/update-port", Some(&body), Duration::from_secs(5)).await;
        let rec = MoveRecord {
            user_id: user.to_string(),
            from: format!("127.0.0.1:{old_port}"),
            to: format!("127.0.0.1:{new_port}"),
            status: match &notified {
                Ok(r) if (200..300).contains(&r.status) => "completed".into(),
                Ok(r) => format!("completed; editor answered {}", r.status),
                Err(e) => format!("completed; editor not told: {e}"),
            },
            probe_ms: started.elapsed().as_millis() as i64,
            notify_ms: notify_started.elapsed().as_millis() as i64,
            started_at: chrono::Utc::now().timestamp(),
            completed_at: chrono::Utc::now().timestamp(),
        };
        if let Err(e) = db.record_move(&rec).await {
            tracing::warn!("cannot record the runtime replacement: {e:#}");
        }
        let _ = ws.engine.remove_container(&old_name).await;
        tracing::warn!(user, from = old_port, to = new_port, "unresponsive runtime replaced; editor told");
        Ok(())
    }
}
