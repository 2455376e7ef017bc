//! Per-user workspaces: one pod per user holding the editor and the runtime, started on demand
//! (one start per user however many requests arrive at once), with ports from configured ranges
//! that the database keeps unique, and ready only when both containers answer.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::db::{Db, DbError, WorkspaceRow, WorkspaceState};
use crate::engine::{ContainerEngine, ContainerSpec, PodSpec, LABEL_INSTANCE, LABEL_MANAGED, LABEL_ROLE, LABEL_USER};
use crate::http_client;

#[derive(Debug, Clone, PartialEq)]
pub struct WorkspaceConfig {
    /// Labels this gateway's containers (see `LABEL_INSTANCE`); derived from the database URL.
    pub instance: String,
    /// The label earlier releases gave this gateway's containers ([`legacy_instance_of`]).
    pub legacy_instance: Option<String>,
    /// The `[cluster]` node this gateway is (stored with each workspace it starts); `None`: alone.
    pub node: Option<String>,
    /// Where the containers publish their ports: 127.0.0.1 alone, the node's `advertise` address
    /// in a cluster (other gateways proxy to it).
    pub advertise: std::net::IpAddr,
    pub engine_socket: PathBuf,
    pub data_dir: PathBuf,
    /// Owner (uid) of a user's data directory, set once when it is created.
    pub data_uid: u32,
    pub editor_image: String,
    pub runtime_image: String,
    pub editor_ports: (u16, u16),
    pub runtime_ports: (u16, u16),
    pub ready_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// Empty: the image's own command. `{port}`, `{runtime_port}`, `{user_id}`, `{base_path}` are
    /// replaced.
    pub editor_command: Vec<String>,
    pub runtime_command: Vec<String>,
    pub editor_env: BTreeMap<String, String>,
    pub runtime_env: BTreeMap<String, String>,
    pub editor_memory: Option<u64>,
    pub runtime_memory: Option<u64>,
    pub runtime_cpus: Option<f64>,
    /// How often every running workspace's runtime is probed (three failures: replaced).
    pub health_interval: Duration,
    /// Limits by the user's plan (`users.plan`); a plan not listed uses "free", and without
    /// "free" the limits above.
    pub plans: BTreeMap<String, PlanLimits>,
}

/// Resources of one plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanLimits {
    pub editor_memory: Option<u64>,
    pub runtime_memory: Option<u64>,
    pub runtime_cpus: Option<f64>,
}

impl Default for WorkspaceConfig {
    fn default() -> Self {
        let env = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        WorkspaceConfig {
            instance: "default".into(),
            legacy_instance: None,
            node: None,
            advertise: std::net::IpAddr::from([127, 0, 0, 1]),
            engine_socket: PathBuf::from("/run/podman/podman.sock"),
            data_dir: PathBuf::from("/data/users"),
            data_uid: 1000,
            editor_image: "localhost/mrmd-editor:latest".into(),
            runtime_image: "localhost/mrmd-runtime:latest".into(),
            editor_ports: (20000, 39999),
            runtime_ports: (40000, 59999),
            ready_timeout: Duration::from_secs(30),
            idle_timeout: Some(Duration::from_secs(30 * 60)),
            editor_command: ["node", "/app/mrmd-server/bin/cli.js", "--port", "{port}", "--host", "0.0.0.0", "--no-auth", "/home/ubuntu"]
                .map(String::from)
                .to_vec(),
            runtime_command: vec![
                "bash".into(),
                "-lc".into(),
                "rm -f /home/ubuntu/.mrmd/runtimes/default.json && exec mrmd-python --foreground --port {port} --host 0.0.0.0 --id default".into(),
            ],
            editor_env: env(&[
                ("HOME", "/home/ubuntu"),
                ("CLOUD_HOME", "/home/ubuntu"),
                ("USER", "ubuntu"),
                ("LOGNAME", "ubuntu"),
                ("CLOUD_MODE", "1"),
                ("PORT", "{port}"),
                ("RUNTIME_PORT", "{runtime_port}"),
                ("BASE_PATH", "{base_path}"),
                ("CLOUD_USER_ID", "{user_id}"),
            ]),
            runtime_env: env(&[("HOME", "/home/ubuntu"), ("PORT", "{port}")]),
            editor_memory: Some(512 * 1024 * 1024),
            runtime_memory: Some(256 * 1024 * 1024),
            runtime_cpus: Some(0.5),
            health_interval: Duration::from_secs(20),
            // Today's compute-manager plans (runtime), with today's 512 MiB editor.
            plans: [("free", 256u64, 0.5), ("pro", 512, 1.0), ("team", 1024, 2.0)]
                .into_iter()
                .map(|(name, mb, cpus)| {
                    let limits = PlanLimits {
                        editor_memory: Some(512 * 1024 * 1024),
                        runtime_memory: Some(mb * 1024 * 1024),
                        runtime_cpus: Some(cpus),
                    };
                    (name.to_string(), limits)
                })
                .collect(),
        }
    }
}

/// A stable instance name for a database URL (the same state gives the same name): the first 16
/// bytes of its SHA-256, in hex. Fixed by the algorithm, so no toolchain upgrade can orphan
/// containers.
pub fn instance_of(database_url: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(database_url.as_bytes());
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// The instance name earlier markco releases derived with `DefaultHasher` (whose output may
/// change between Rust releases). Containers carrying it are adopted as this gateway's; new ones
/// get [`instance_of`]'s name.
pub fn legacy_instance_of(database_url: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    database_url.hash(&mut h);
    format!("{:016x}", h.finish())
}

impl WorkspaceConfig {
    /// Whether a container's instance label says it is this gateway's (its own label, or the one
    /// an earlier release gave it).
    pub fn owns(&self, instance_label: Option<&String>) -> bool {
        instance_label.is_some_and(|l| *l == self.instance || self.legacy_instance.as_ref() == Some(l))
    }
}

/// Names built from the whole user id: two users never share one (no prefix truncation).
pub fn pod_name(user: &str) -> String {
    format!("markco-ws-{user}")
}

pub fn container_name(role: &str, user: &str) -> String {
    format!("markco-{role}-{user}")
}

/// The pod's other runtime port: runtime ports are allocated even, and each pod also publishes
/// the odd one after it, so a replacement runtime can start beside an unresponsive one.
pub fn spare_port(port: u16) -> u16 {
    port ^ 1
}

pub(crate) fn fill(template: &str, port: u16, runtime_port: u16, user: &str) -> String {
    template
        .replace("{port}", &port.to_string())
        .replace("{runtime_port}", &runtime_port.to_string())
        .replace("{user_id}", user)
        .replace("{base_path}", &format!("/u/{user}/"))
}

/// Is this host port free right now? (The database keeps markco's own ports unique; this also
/// avoids ports some other program holds.)
fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn pick_port(range: (u16, u16), taken: &[u16]) -> Option<u16> {
    let span = (range.1 - range.0) as u32 + 1;
    for _ in 0..64 {
        let p = range.0 + (fastrand::u32(..span)) as u16;
        if !taken.contains(&p) && port_free(p) {
            return Some(p);
        }
    }
    None
}

/// An even runtime port whose spare (the odd one after it) is free too, both in range.
fn pick_runtime_port(range: (u16, u16), taken: &[u16]) -> Option<u16> {
    for _ in 0..64 {
        let p = pick_port(range, taken)? & !1;
        let s = spare_port(p);
        if p >= range.0 && s <= range.1 && !taken.contains(&p) && !taken.contains(&s) && port_free(p) && port_free(s) {
            return Some(p);
        }
    }
    None
}

pub struct Workspaces {
    /// Swapped by a reload: each start reads it afresh, so `[workspaces]` changes apply to the
    /// next start (containers already running keep what they were made with).
    cfg: arc_swap::ArcSwap<WorkspaceConfig>,
    pub engine: Arc<dyn ContainerEngine>,
    pub metrics: WorkspaceMetrics,
    /// One start at a time per user.
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Workspaces {
    pub fn new(cfg: WorkspaceConfig, engine: Arc<dyn ContainerEngine>, metrics: WorkspaceMetrics) -> Workspaces {
        Workspaces {
            cfg: arc_swap::ArcSwap::from_pointee(cfg),
            engine,
            metrics,
            locks: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The settings the next start uses.
    pub fn cfg(&self) -> Arc<WorkspaceConfig> {
        self.cfg.load_full()
    }

    /// Applies a reloaded `[workspaces]` to the next start. Returns the settings that changed but
    /// need a restart (kept as they were): the container engine's socket (its client is made
    /// once), the instance label (it follows the database URL) and the intervals of the loops
    /// started with the control plane.
    pub fn reconfigure(&self, mut new: WorkspaceConfig) -> Vec<String> {
        let old = self.cfg();
        let mut needs_restart = Vec::new();
        if new.engine_socket != old.engine_socket {
            needs_restart.push("workspaces.engine_socket".to_string());
        }
        if new.health_interval != old.health_interval {
            needs_restart.push("workspaces.health_interval".to_string());
        }
        if new.idle_timeout != old.idle_timeout {
            needs_restart.push("workspaces.idle_timeout".to_string());
        }
        new.engine_socket = old.engine_socket.clone();
        new.instance = old.instance.clone();
        new.legacy_instance = old.legacy_instance.clone();
        new.node = old.node.clone();
        new.advertise = old.advertise;
        new.health_interval = old.health_interval;
        new.idle_timeout = old.idle_timeout;
        self.cfg.store(Arc::new(new));
        needs_restart
    }

    pub fn user_lock(&self, user: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).entry(user.to_string()).or_default().clone()
    }

    /// Creates the user's data directory with its owner the first time; never re-chowns it.
    fn data_dir(&self, user: &str) -> anyhow::Result<PathBuf> {
        let cfg = self.cfg();
        let dir = cfg.data_dir.join(user);
        if !dir.exists() {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            if let Err(e) = std::os::unix::fs::chown(&dir, Some(cfg.data_uid), Some(cfg.data_uid)) {
                tracing::warn!(dir = %dir.display(), "cannot give the data directory to uid {}: {e}", cfg.data_uid);
            }
        }
        Ok(dir)
    }

    /// Starts the user's pod and waits until both containers answer. Returns the running row.
    pub async fn start(&self, db: &Db, user: &str) -> anyhow::Result<WorkspaceRow> {
        let started = Instant::now();
        let data = self.data_dir(user)?;
        let rows = db.list_workspaces().await?;
        let taken_e: Vec<u16> = rows.iter().filter(|r| r.user_id != user).map(|r| r.editor_port).collect();
        let taken_r: Vec<u16> = rows.iter().filter(|r| r.user_id != user).map(|r| r.runtime_port).collect();
        // Ports are claimed in the database first: its unique constraints settle any race.
        let mut row = None;
        for _ in 0..16 {
            let e =
                pick_port(self.cfg().editor_ports, &taken_e).ok_or_else(|| anyhow!("no free editor port in range"))?;
            let r = pick_runtime_port(self.cfg().runtime_ports, &taken_r)
                .ok_or_else(|| anyhow!("no free runtime port pair in range"))?;
            let candidate = WorkspaceRow {
                user_id: user.to_string(),
                editor_host: self.cfg().advertise.to_string(),
                editor_port: e,
                runtime_host: self.cfg().advertise.to_string(),
                runtime_port: r,
                state: WorkspaceState::Starting,
                editor_container: Some(container_name("editor", user)),
                runtime_container: Some(container_name("runtime", user)),
                updated_at: chrono::Utc::now().timestamp(),
                node: self.cfg().node.clone(),
            };
            match db.upsert_workspace(&candidate).await {
                Ok(()) => {
                    row = Some(candidate);
                    break;
                }
                // Taken meanwhile (another start, another gateway): the next free pair.
                Err(DbError::AddressInUse { .. }) => continue,
                Err(err) => return Err(err.into()),
            }
        }
        let Some(mut row) = row else { bail!("could not claim free ports after 16 tries") };
        let limits = self.limits_of(db, user).await;
        let pod = pod_name(user);
        // A leftover pod of this user (a crash mid-start) is ours to replace.
        let _ = self.engine.remove_pod(&pod).await;
        let labels = |role: &str| self.labels(user, role);
        // Both ports on 127.0.0.1 only (alone) or on the node's advertise address (a cluster's
        // private network): the gateways are the way in.
        self.engine
            .create_pod(&PodSpec {
                name: pod.clone(),
                host_ip: self.cfg().advertise,
                labels: labels(""),
                publish: vec![
                    (row.editor_port, row.editor_port),
                    (row.runtime_port, row.runtime_port),
                    (spare_port(row.runtime_port), spare_port(row.runtime_port)),
                ],
            })
            .await?;
        let (ep, rp) = (row.editor_port, row.runtime_port);
        let cfg = self.cfg();
        let mount = vec![(data.display().to_string(), "/home/ubuntu".to_string())];
        let runtime = self.runtime_spec(&container_name("runtime", user), user, rp, &limits);
        let editor = ContainerSpec {
            name: container_name("editor", user),
            pod: pod.clone(),
            image: cfg.editor_image.clone(),
            command: cfg.editor_command.iter().map(|c| fill(c, ep, rp, user)).collect(),
            env: cfg.editor_env.iter().map(|(k, v)| (k.clone(), fill(v, ep, rp, user))).collect(),
            labels: labels("editor"),
            mounts: mount,
            memory_bytes: limits.editor_memory,
            cpus: None,
        };
        let run = async {
            self.engine.create_container(&runtime).await?;
            self.engine.create_container(&editor).await?;
            self.engine.start_pod(&pod).await?;
            self.wait_ready(ep, rp).await
        };
        if let Err(e) = run.await {
            self.metrics.starts.with_label_values(&["error"]).inc();
            let _ = self.engine.remove_pod(&pod).await;
            row.state = WorkspaceState::Failed;
            let _ = db.upsert_workspace(&row).await;
            return Err(e.context(format!("starting the workspace of {user}")));
        }
        row.state = WorkspaceState::Running;
        row.updated_at = chrono::Utc::now().timestamp();
        db.upsert_workspace(&row).await?;
        self.metrics.starts.with_label_values(&["ok"]).inc();
        self.metrics.ready_seconds.observe(started.elapsed().as_secs_f64());
        tracing::info!(
            user,
            editor_port = ep,
            runtime_port = rp,
            ms = started.elapsed().as_millis() as u64,
            "workspace ready"
        );
        Ok(row)
    }

    /// The resources of the user's plan (`users.plan`; unknown plans use "free", and without
    /// "free" the `[workspaces]` limits).
    pub async fn limits_of(&self, db: &Db, user: &str) -> PlanLimits {
        let plan = db.user_plan(user).await.ok().flatten().unwrap_or_else(|| "free".to_string());
        let cfg = self.cfg();
        cfg.plans.get(&plan).or_else(|| cfg.plans.get("free")).copied().unwrap_or(PlanLimits {
            editor_memory: cfg.editor_memory,
            runtime_memory: cfg.runtime_memory,
            runtime_cpus: cfg.runtime_cpus,
        })
    }

    /// The labels of this gateway's containers (`role` empty: the pod's).
    pub fn labels(&self, user: &str, role: &str) -> BTreeMap<String, String> {
        let mut l = BTreeMap::new();
        l.insert(LABEL_MANAGED.to_string(), "true".to_string());
        l.insert(LABEL_USER.to_string(), user.to_string());
        l.insert(LABEL_INSTANCE.to_string(), self.cfg().instance.clone());
        if let Some(node) = &self.cfg().node {
            l.insert(crate::engine::LABEL_NODE.to_string(), node.clone());
        }
        if !role.is_empty() {
            l.insert(LABEL_ROLE.to_string(), role.to_string());
        }
        l
    }

    /// A runtime container listening on `port` in the user's pod, with the plan's limits: the
    /// first runtime of a start and a replacement runtime are made alike.
    pub fn runtime_spec(&self, name: &str, user: &str, port: u16, limits: &PlanLimits) -> ContainerSpec {
        let cfg = self.cfg();
        ContainerSpec {
            name: name.to_string(),
            pod: pod_name(user),
            image: cfg.runtime_image.clone(),
            command: cfg.runtime_command.iter().map(|c| fill(c, port, port, user)).collect(),
            env: cfg.runtime_env.iter().map(|(k, v)| (k.clone(), fill(v, port, port, user))).collect(),
            labels: self.labels(user, "runtime"),
            mounts: vec![(cfg.data_dir.join(user).display().to_string(), "/home/ubuntu".to_string())],
            memory_bytes: limits.runtime_memory,
            cpus: limits.runtime_cpus,
        }
    }

    /// Both the editor's `/health` and the runtime's `/mrp/v1/capabilities` answer 2xx.
    pub async fn wait_ready(&self, editor_port: u16, runtime_port: u16) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.cfg().ready_timeout;
        let host = self.cfg().advertise;
        let probe = |port: u16, path: &'static str| async move {
            let addr = SocketAddr::new(host, port);
            matches!(http_client::call(addr, "GET", path, None, Duration::from_secs(2)).await, Ok(r) if (200..300).contains(&r.status))
        };
        let (mut editor_ok, mut runtime_ok) = (false, false);
        while Instant::now() < deadline {
            if !editor_ok {
                editor_ok = probe(editor_port, "/health").await;
            }
            if !runtime_ok {
                runtime_ok = probe(runtime_port, "/mrp/v1/capabilities").await;
            }
            if editor_ok && runtime_ok {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "not ready within {:?} (editor {}, runtime {})",
            self.cfg().ready_timeout,
            if editor_ok { "ready" } else { "not answering /health" },
            if runtime_ok { "ready" } else { "not answering /mrp/v1/capabilities" }
        )
    }

    /// Stops and removes the user's pod; the row stays, marked stopped.
    pub async fn stop(&self, db: &Db, user: &str) -> anyhow::Result<()> {
        self.engine.remove_pod(&pod_name(user)).await?;
        self.metrics.stops.inc();
        if let Some(mut row) = db.get_workspace(user).await? {
            row.state = WorkspaceState::Stopped;
            db.upsert_workspace(&row).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_use_the_whole_id() {
        let a = "aaaaaaaa-1111-4111-8111-111111111111";
        let b = "aaaaaaaa-2222-4222-8222-222222222222";
        assert_ne!(container_name("editor", a), container_name("editor", b));
        assert_ne!(pod_name(a), pod_name(b));
    }

    #[test]
    fn instance_labels_are_fixed_and_old_ones_are_adopted() {
        // SHA-256, pinned: a change here would orphan every running container.
        assert_eq!(instance_of("sqlite://markco.db"), "49a7ff35dec4a70b3c610dbe773177c6");
        let cfg = WorkspaceConfig {
            instance: instance_of("sqlite://markco.db"),
            legacy_instance: Some(legacy_instance_of("sqlite://markco.db")),
            ..WorkspaceConfig::default()
        };
        assert!(cfg.owns(Some(&instance_of("sqlite://markco.db"))));
        assert!(cfg.owns(Some(&legacy_instance_of("sqlite://markco.db"))));
        assert!(!cfg.owns(Some(&instance_of("sqlite://other.db"))));
        assert!(!cfg.owns(Some(&legacy_instance_of("sqlite://other.db"))));
        assert!(!cfg.owns(None));
    }

    #[test]
    fn placeholders() {
        assert_eq!(fill("--port {port} {user_id} {base_path} {runtime_port}", 1, 2, "u"), "--port 1 u /u/u/ 2");
    }

    #[test]
    fn ports_from_range() {
        let p = pick_port((45000, 45010), &[45000, 45001]).expect("a port");
        assert!((45002..=45010).contains(&p));
    }
}

/// Workspace metrics (labels are fixed sets; never a user id).
#[derive(Clone)]
pub struct WorkspaceMetrics {
    pub starts: prometheus::IntCounterVec,
    pub stops: prometheus::IntCounter,
    pub exits: prometheus::IntCounter,
    pub ready_seconds: prometheus::Histogram,
    pub probe_failures: prometheus::IntCounter,
    pub by_state: prometheus::IntGaugeVec,
}

impl WorkspaceMetrics {
    pub fn new(registry: &prometheus::Registry) -> WorkspaceMetrics {
        use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts};
        let m = WorkspaceMetrics {
            starts: IntCounterVec::new(
                Opts::new("markco_workspace_starts_total", "Workspace starts, by result"),
                &["result"],
            )
            .expect("static metric definition"),
            stops: IntCounter::new(
                "markco_workspace_stops_total",
                "Workspaces stopped by markco (admin, logout, idle)",
            )
            .expect("static metric definition"),
            exits: IntCounter::new(
                "markco_workspace_container_exits_total",
                "Unexpected container exits seen as events",
            )
            .expect("static metric definition"),
            ready_seconds: Histogram::with_opts(
                HistogramOpts::new("markco_workspace_start_seconds", "Time from start to both containers answering")
                    .buckets(vec![0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0]),
            )
            .expect("static metric definition"),
            probe_failures: IntCounter::new("markco_workspace_probe_failures_total", "Failed runtime health probes")
                .expect("static metric definition"),
            by_state: IntGaugeVec::new(
                Opts::new("markco_workspaces", "Workspaces known to the gateway, by state"),
                &["state"],
            )
            .expect("static metric definition"),
        };
        for c in [
            Box::new(m.starts.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.stops.clone()),
            Box::new(m.exits.clone()),
            Box::new(m.ready_seconds.clone()),
            Box::new(m.probe_failures.clone()),
            Box::new(m.by_state.clone()),
        ] {
            let _ = registry.register(c);
        }
        m.starts.with_label_values(&["ok"]);
        m.starts.with_label_values(&["error"]);
        m
    }
}
