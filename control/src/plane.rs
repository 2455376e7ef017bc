//! The control plane: owns the database (on its own runtime), answers session lookups, applies
//! workspace changes and runtime moves to the route table, and watches configured services.
//! It reaches the data plane only by publishing new route-table snapshots.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use markco_proxy::table::{TablePublisher, TableReader, UserRoutes};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::db::{Db, DbError, DbErrorKind, MoveRecord, WorkspaceRow, WorkspaceState};
use crate::engine::ContainerEngine;
use crate::http_client;
use crate::sessions::{Lookup, SessionCache, SessionSettings};
use crate::state::{CommitError, Sessions, StateCommand, StateError, StateOwner};
use crate::supervise::{panic_message, Supervisor};
use crate::switches::{health_holder, Hold, Switches, ADMIN};
use crate::workspaces::{WorkspaceConfig, Workspaces};

#[derive(Debug, Clone)]
pub struct MoveLimits {
    /// At most this many moves of one user's runtime...
    pub max_moves: usize,
    /// ...within this window; more get 429 (no migration loops).
    pub window: Duration,
    pub probe_timeout: Duration,
    pub notify_timeout: Duration,
}

impl Default for MoveLimits {
    fn default() -> Self {
        MoveLimits {
            max_moves: 5,
            window: Duration::from_secs(600),
            probe_timeout: Duration::from_secs(3),
            notify_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub name: String,
    pub addr: SocketAddr,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// A route disabled while this check fails, re-enabled when it passes again.
    pub disable_route: Option<String>,
}

#[derive(Debug, Clone)]
pub struct PlaneConfig {
    pub database_url: String,
    /// Containers per user; `None`: workspaces are registered through the admin API only.
    pub workspaces: Option<WorkspaceConfig>,
    pub sessions: SessionSettings,
    pub moves: MoveLimits,
    pub health_checks: Vec<HealthCheck>,
    /// `[cluster]`: several gateways sharing this PostgreSQL; `None`: a single gateway.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// What an admin call can fail with, mapped to an HTTP status by the API.
#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooMany(String),
    /// The database cannot be reached: the same call may work again soon.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

impl PlaneError {
    pub fn status(&self) -> u16 {
        match self {
            PlaneError::NotFound(_) => 404,
            PlaneError::Invalid(_) => 400,
            PlaneError::Conflict(_) => 409,
            PlaneError::TooMany(_) => 429,
            PlaneError::Unavailable(_) => 503,
            PlaneError::Internal(_) => 500,
        }
    }
}

impl From<StateError> for PlaneError {
    fn from(e: StateError) -> PlaneError {
        match e {
            StateError::AddressTaken { .. } => PlaneError::Conflict(e.to_string()),
            StateError::Broken(_) => PlaneError::Internal(anyhow::Error::new(e)),
        }
    }
}

impl From<CommitError<DbError>> for PlaneError {
    fn from(e: CommitError<DbError>) -> PlaneError {
        match e {
            CommitError::State(e) => e.into(),
            CommitError::Db(e) => e.into(),
        }
    }
}

/// Database errors by kind: the one mapping from a [`DbError`] to what an admin call answers
/// (with [`PlaneError::status`]).
impl From<DbError> for PlaneError {
    fn from(e: DbError) -> PlaneError {
        match e.kind() {
            DbErrorKind::Conflict => PlaneError::Conflict(e.to_string()),
            DbErrorKind::NotFound => PlaneError::NotFound(e.to_string()),
            DbErrorKind::Invalid => PlaneError::Invalid(e.to_string()),
            DbErrorKind::Unavailable => PlaneError::Unavailable(e.to_string()),
            DbErrorKind::Internal => PlaneError::Internal(anyhow::Error::new(e)),
        }
    }
}

/// A runtime move whose target answered its probe (see [`ControlPlane::complete_move`]).
pub(crate) struct Moved<'a> {
    /// The workspace before the move.
    pub row: &'a WorkspaceRow,
    pub host: &'a str,
    pub port: u16,
    pub target: SocketAddr,
    /// A replacement runtime's container (the health loop's); `None`: only the address moves.
    pub runtime_container: Option<String>,
}

/// The answer to a successful `update-port`.
#[derive(Debug, Clone, Serialize)]
pub struct MoveOutcome {
    pub ok: bool,
    #[serde(rename = "userId")]
    pub user_id: String,
    pub from: String,
    pub to: String,
    pub probe_ms: u64,
    pub editor_notified: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub editor_error: Option<String>,
    pub notify_ms: u64,
}

type Reply<T> = oneshot::Sender<Result<T, PlaneError>>;

enum Command {
    List(Reply<Vec<WorkspaceRow>>),
    Get(String, Reply<Option<WorkspaceRow>>),
    Put(WorkspaceRow, Reply<()>),
    Delete(String, Reply<bool>),
    /// The latest recorded runtime moves (read only).
    Moves(Reply<Vec<crate::db::MoveRow>>),
    Move {
        user: String,
        host: Option<String>,
        port: u16,
        reply: Reply<MoveOutcome>,
    },
    Ensure(String, Reply<Option<Arc<UserRoutes>>>),
    Stop(String, Reply<()>),
    /// The operator holds a route off (`off`) or lifts its own hold.
    Switch {
        route: String,
        off: bool,
        reply: Reply<Vec<Hold>>,
    },
    /// Drops every session of a user, here and (in a cluster) on every gateway.
    InvalidateSessions(String, Reply<()>),
    /// A handler that panics, to prove the loop survives one.
    #[cfg(test)]
    Panic(Reply<()>),
}

/// The control plane's shared state; `run` is its loop on the control runtime.
pub struct ControlPlane {
    /// The live table, read-only: every change goes through `state`.
    pub table: TableReader,
    /// The one owner of the live state (route table, holds, session invalidation).
    pub state: Arc<StateOwner>,
    pub sessions: Arc<SessionCache>,
    config: ArcSwap<PlaneConfig>,
    health: ArcSwap<BTreeMap<String, bool>>,
    lookups: Mutex<Option<mpsc::Receiver<Lookup>>>,
    commands: mpsc::Sender<Command>,
    command_rx: Mutex<Option<mpsc::Receiver<Command>>>,
    recent_moves: Mutex<HashMap<String, VecDeque<Instant>>>,
    health_wake: tokio::sync::Notify,
    pub workspaces: Option<Arc<Workspaces>>,
    /// Users whose workspace markco itself is stopping: their containers' exits are expected.
    pub(crate) stopping: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Containers markco removed while their workspace runs on (a replaced runtime), with when.
    /// Podman's event stream reports their exit after the removal has returned, so `stopping`
    /// is over by then; such an exit is not the workspace dying. A container started later
    /// under the same name is live again (its `start` event clears the name).
    retired: Retired,
    /// Restarts the background loops after a panic, and knows which are down.
    pub supervisor: Supervisor,
    /// `[cluster]`: this gateway's place in the cluster; `None`: alone.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// How long the name of a container removed on purpose is remembered
/// ([`ControlPlane::remove_retired`]).
const RETIRED_FOR: Duration = Duration::from_secs(3600);

/// Names of containers removed on purpose while their workspace runs on, with when.
#[derive(Default)]
struct Retired(Mutex<HashMap<String, Instant>>);

impl Retired {
    fn retire(&self, container: &str) {
        let mut names = self.0.lock().unwrap_or_else(|p| p.into_inner());
        names.retain(|_, at| at.elapsed() < RETIRED_FOR);
        names.insert(container.to_string(), Instant::now());
    }

    /// Whether `ev` is a container's exit that takes its workspace down: a `died` event of a
    /// container not retired. A `start` event makes its name count again (a new container
    /// under a retired name).
    fn live_exit(&self, ev: &crate::engine::ContainerEvent) -> bool {
        let mut names = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match ev.status.as_str() {
            "died" if names.get(&ev.name).is_some_and(|at| at.elapsed() < RETIRED_FOR) => {
                tracing::debug!(container = %ev.name, "exit of a container markco removed on purpose");
                false
            }
            "died" => true,
            "start" => {
                names.remove(&ev.name);
                false
            }
            _ => false,
        }
    }
}

pub fn routes_of(row: &WorkspaceRow) -> Option<UserRoutes> {
    let editor = resolve(&row.editor_host, row.editor_port)?;
    let runtime = resolve(&row.runtime_host, row.runtime_port)?;
    Some(UserRoutes::new(editor, runtime, row.state == WorkspaceState::Running))
}

fn resolve(host: &str, port: u16) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    let host = if host == "localhost" { "127.0.0.1" } else { host };
    (host, port).to_socket_addrs().ok()?.next()
}

/// What a start loads from the database before any listener accepts traffic.
pub struct Boot {
    /// `[cluster]`: the change log's head, read before the tables; the follower starts after it.
    pub change_seq: i64,
    pub rows: Vec<WorkspaceRow>,
    /// Stored route holds: (route, holder, since in unix seconds).
    pub holds: Vec<(String, String, i64)>,
}

/// Loads the workspace map and the route holds from the database before any listener accepts traffic, checked
/// against the container engine when markco manages containers: running workspaces whose
/// containers still run are adopted as they are (ports included, also a runtime moved by
/// update-port), rows whose containers are gone are marked stopped (the next request starts them
/// again), and markco-labelled pods of users with no running workspace are removed. Runs on a
/// short-lived runtime of its own: the pool it opens is closed before the control runtime starts.
pub fn bootstrap(
    url: &str,
    workspaces: Option<&WorkspaceConfig>,
    cluster: Option<&crate::cluster::ClusterConfig>,
) -> anyhow::Result<Boot> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let db = Db::connect_as(url, cluster.map(|c| c.node.as_str())).await?;
        db.migrate().await?;
        // The log's position before the tables: what changes meanwhile is applied after.
        let change_seq = match (cluster, db.postgres()) {
            (Some(_), Some(pool)) => crate::cluster::head(pool).await?,
            _ => 0,
        };
        let mut rows = db.list_workspaces().await?;
        if let Some(cfg) = workspaces {
            let engine = crate::engine::podman::Podman::new(&cfg.engine_socket);
            reconcile(&db, &engine, cfg, &mut rows).await?;
        }
        let holds = db.route_holds().await?;
        db.close().await;
        Ok(Boot { change_seq, rows, holds })
    })
}

async fn reconcile(
    db: &Db,
    engine: &dyn ContainerEngine,
    cfg: &WorkspaceConfig,
    rows: &mut [WorkspaceRow],
) -> anyhow::Result<()> {
    let mut managed = engine.list_managed().await.map_err(|e| e.context("listing markco's containers"))?;
    // Another gateway's containers (another database) are not ours to judge.
    managed.retain(|c| cfg.owns(c.labels.get(crate::engine::LABEL_INSTANCE)));
    let legacy = managed.iter().filter(|c| c.labels.get(crate::engine::LABEL_INSTANCE) != Some(&cfg.instance)).count();
    if legacy > 0 {
        tracing::info!(containers = legacy, "adopting containers labelled with this gateway's former instance label");
    }
    let running = |name: &Option<String>| {
        name.as_ref().is_some_and(|n| managed.iter().any(|c| &c.name == n && c.state == "running"))
    };
    // In a cluster, each node judges only the workspaces it runs: the others' containers are on
    // their podman (or under their instance label).
    let mine = |row: &WorkspaceRow| cfg.node.is_none() || row.node == cfg.node;
    for row in rows.iter_mut().filter(|r| mine(r)) {
        if row.state == WorkspaceState::Running && !(running(&row.editor_container) && running(&row.runtime_container))
        {
            tracing::warn!(user = %row.user_id, "workspace containers are gone; marked stopped");
            row.state = WorkspaceState::Stopped;
            db.upsert_workspace(row).await?;
            let _ = engine.remove_pod(&crate::workspaces::pod_name(&row.user_id)).await;
        } else if row.state == WorkspaceState::Running {
            tracing::info!(user = %row.user_id, "adopted running workspace");
        }
    }
    let live: std::collections::HashSet<&str> =
        rows.iter().filter(|r| r.state == WorkspaceState::Running && mine(r)).map(|r| r.user_id.as_str()).collect();
    let mut strays: Vec<String> = managed
        .iter()
        .filter_map(|c| c.labels.get(crate::engine::LABEL_USER))
        .filter(|u| !live.contains(u.as_str()))
        .cloned()
        .collect();
    strays.sort();
    strays.dedup();
    for user in strays {
        tracing::warn!(user = %user, "removing markco containers of a workspace that is not running");
        engine.remove_pod(&crate::workspaces::pod_name(&user)).await?;
    }
    Ok(())
}

impl ControlPlane {
    pub fn new(table: TablePublisher, config: PlaneConfig, registry: &prometheus::Registry) -> Arc<ControlPlane> {
        let (sessions, lookups) = SessionCache::new(config.sessions);
        let (commands, command_rx) = mpsc::channel(256);
        let workspaces = config.workspaces.clone().map(|cfg| {
            let engine = Arc::new(crate::engine::podman::Podman::new(&cfg.engine_socket));
            Arc::new(Workspaces::new(cfg, engine, crate::workspaces::WorkspaceMetrics::new(registry)))
        });
        let state = Arc::new(StateOwner::new(table, Switches::new(registry), sessions.clone()));
        let cluster = config.cluster.clone().map(|c| Arc::new(crate::cluster::Cluster::new(c, registry)));
        Arc::new(ControlPlane {
            cluster,
            supervisor: Supervisor::new(registry),
            workspaces,
            stopping: Arc::default(),
            retired: Retired::default(),
            table: state.reader(),
            state,
            sessions,
            config: ArcSwap::from_pointee(config),
            health: ArcSwap::default(),
            lookups: Mutex::new(Some(lookups)),
            commands,
            command_rx: Mutex::new(Some(command_rx)),
            recent_moves: Mutex::new(HashMap::new()),
            health_wake: tokio::sync::Notify::new(),
        })
    }

    /// Applies a reloaded config: health checks, move limits, and `[workspaces]` for the next
    /// start. Returns what changed but needs a restart (kept as it was), by config key.
    pub fn reconfigure(&self, config: PlaneConfig) -> Vec<String> {
        let old = self.config.load();
        let mut needs_restart = Vec::new();
        if old.database_url != config.database_url {
            needs_restart.push("database.url".to_string());
        }
        let (a, b) = (&old.sessions, &config.sessions);
        if (a.ttl, a.negative_ttl, a.capacity, a.lookup_timeout)
            != (b.ttl, b.negative_ttl, b.capacity, b.lookup_timeout)
        {
            needs_restart.push("sessions".to_string());
        }
        match (&self.workspaces, &config.workspaces) {
            (Some(ws), Some(new)) => needs_restart.extend(ws.reconfigure(new.clone())),
            (None, None) => {}
            // The container loops and the engine client are made at start.
            (Some(_), None) | (None, Some(_)) => needs_restart.push("workspaces (added or removed)".to_string()),
        }
        if old.cluster != config.cluster {
            needs_restart.push("cluster".to_string());
        }
        let keep = PlaneConfig {
            database_url: old.database_url.clone(),
            sessions: old.sessions,
            workspaces: old.workspaces.clone(),
            cluster: old.cluster.clone(),
            ..config
        };
        self.config.store(Arc::new(keep));
        self.health_wake.notify_one();
        needs_restart
    }

    /// Applies what the database holds (at start, before traffic): the workspaces, skipping (and
    /// logging) rows whose addresses do not resolve or clash, and the route holds.
    pub fn restore(&self, boot: &Boot) -> Result<(), StateError> {
        if let Some(c) = &self.cluster {
            c.restore(boot.change_seq, &boot.rows);
        }
        for row in &boot.rows {
            let Some(routes) = routes_of(row) else {
                tracing::error!(user = %row.user_id, "workspace row has an unresolvable address; skipped");
                continue;
            };
            if let Err(e) = self.state.apply(StateCommand::WorkspaceUp { user: row.user_id.clone(), routes }) {
                tracing::error!(user = %row.user_id, "workspace row skipped: {e}");
            }
        }
        for (route, holder, since) in &boot.holds {
            self.state.apply(StateCommand::RouteHeld {
                route: route.clone(),
                holder: holder.clone(),
                since: *since,
            })?;
            tracing::warn!(route = %route, holder = %holder, "route held off since before the restart");
        }
        self.state.verify()
    }

    /// The operator holds `route` off (`off`) or lifts its own hold; other holders stay. Returns
    /// the route's holders after the change.
    pub async fn switch_route(&self, route: &str, off: bool) -> Result<Vec<Hold>, PlaneError> {
        self.ask(|reply| Command::Switch { route: route.to_string(), off, reply }).await
    }

    /// Service states by name (`true`: passing).
    pub fn health(&self) -> Arc<BTreeMap<String, bool>> {
        self.health.load_full()
    }

    pub fn health_checks(&self) -> Vec<HealthCheck> {
        self.config.load().health_checks.clone()
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, PlaneError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| PlaneError::Internal(anyhow::anyhow!("the control plane is not running")))?;
        // A dropped reply: the handler panicked (the loop goes on) or the plane is shutting down.
        rx.await.map_err(|_| PlaneError::Internal(anyhow::anyhow!("the control plane failed to handle this call")))?
    }

    pub async fn list_workspaces(&self) -> Result<Vec<WorkspaceRow>, PlaneError> {
        self.ask(Command::List).await
    }

    pub async fn get_workspace(&self, user: &str) -> Result<Option<WorkspaceRow>, PlaneError> {
        self.ask(|r| Command::Get(user.to_string(), r)).await
    }

    pub async fn put_workspace(&self, row: WorkspaceRow) -> Result<(), PlaneError> {
        self.ask(|r| Command::Put(row, r)).await
    }

    pub async fn delete_workspace(&self, user: &str) -> Result<bool, PlaneError> {
        self.ask(|r| Command::Delete(user.to_string(), r)).await
    }

    /// The latest runtime moves recorded in the database, newest first.
    pub async fn recent_moves(&self) -> Result<Vec<crate::db::MoveRow>, PlaneError> {
        self.ask(Command::Moves).await
    }

    pub async fn move_runtime(&self, user: &str, host: Option<String>, port: u16) -> Result<MoveOutcome, PlaneError> {
        self.ask(|reply| Command::Move { user: user.to_string(), host, port, reply }).await
    }

    /// Starts the user's workspace unless it runs; once it does, its entry in the published table.
    pub async fn ensure_workspace(&self, user: &str) -> Result<Option<Arc<UserRoutes>>, PlaneError> {
        if self.workspaces.is_none() {
            return Ok(None);
        }
        self.ask(|r| Command::Ensure(user.to_string(), r)).await
    }

    /// Drops every cached session of `user` here at once, and in a `[cluster]` on every gateway
    /// (through the change log).
    pub async fn invalidate_sessions(&self, user: &str) -> Result<(), PlaneError> {
        // Here first: it cannot be refused, and needs no database.
        let _ = self.state.apply(StateCommand::SessionInvalidated(Sessions::User(user.to_string())));
        if self.cluster.is_none() {
            return Ok(());
        }
        self.ask(|r| Command::InvalidateSessions(user.to_string(), r)).await
    }

    pub async fn stop_workspace(&self, user: &str) -> Result<(), PlaneError> {
        if self.workspaces.is_none() {
            return Err(PlaneError::Invalid("no [workspaces] section: markco manages no containers".into()));
        }
        self.ask(|r| Command::Stop(user.to_string(), r)).await
    }

    /// The control plane's loop; returns when `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let url = self.config.load().database_url.clone();
        let node = self.cluster.as_ref().map(|c| c.cfg.node.clone());
        let db = loop {
            match Db::connect_as(&url, node.as_deref()).await {
                Ok(db) => break Arc::new(db),
                Err(e) => {
                    tracing::error!("control plane cannot open its database ({e:#}); retrying in 2s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        };
        let lookups = self.lookups.lock().unwrap_or_else(|p| p.into_inner()).take();
        let commands = self.command_rx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (Some(mut lookups), Some(mut commands)) = (lookups, commands) else {
            tracing::error!("control plane started twice");
            return;
        };
        // Session lookups: each in its own task, so a slow query does not hold up the others.
        let lookup_db = db.clone();
        let lookup_task = tokio::spawn(async move {
            while let Some(Lookup { token, reply }) = lookups.recv().await {
                let db = lookup_db.clone();
                tokio::spawn(async move {
                    let _ = reply.send(db.session_user(&token).await.map_err(anyhow::Error::new));
                });
            }
        });
        // Background loops: each restarted with backoff if it panics.
        let sup = &self.supervisor;
        let mut tasks = Vec::new();
        let (p, d) = (self.clone(), db.clone());
        tasks.push(sup.spawn("listen", move || Self::follow_session_changes(p.clone(), d.clone())));
        let p = self.clone();
        tasks.push(sup.spawn("health", move || Self::health_loop(p.clone())));
        if db.postgres().is_some() {
            let (p, d) = (self.clone(), db.clone());
            tasks.push(sup.spawn("change_log_trim", move || Self::trim_loop(p.clone(), d.clone())));
        }
        if self.cluster.is_some() {
            let (p, d) = (self.clone(), db.clone());
            tasks.push(sup.spawn("cluster_changes", move || Self::follow_changes(p.clone(), d.clone())));
            let (p, d) = (self.clone(), db.clone());
            tasks.push(sup.spawn("cluster_heartbeat", move || Self::heartbeat_loop(p.clone(), d.clone())));
        }
        if let Some(ws) = &self.workspaces {
            let (p, w) = (self.clone(), ws.clone());
            tasks.push(sup.spawn("events", move || Self::watch_containers(p.clone(), w.clone())));
            let (p, d, w) = (self.clone(), db.clone(), ws.clone());
            tasks.push(sup.spawn("runtime_health", move || {
                Self::runtime_health_loop(p.clone(), d.clone(), w.clone(), w.cfg().health_interval)
            }));
            if let (Some(_), Some(_)) = (&self.cluster, ws.cfg().idle_timeout) {
                // Each gateway knows only its own traffic: one would stop a workspace another serves.
                tracing::warn!(
                    "[workspaces] idle_timeout is not applied in a [cluster]: activity is recorded per gateway"
                );
            } else if let Some(idle) = ws.cfg().idle_timeout {
                let (p, d, w) = (self.clone(), db.clone(), ws.clone());
                tasks.push(sup.spawn("reaping", move || Self::reap_idle(p.clone(), d.clone(), w.clone(), idle)));
            }
        }
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => {
                        use futures_util::FutureExt;
                        // A panicking handler drops its reply (that caller gets a 500); the loop
                        // and every other caller go on.
                        let handled = std::panic::AssertUnwindSafe(self.handle(&db, cmd)).catch_unwind().await;
                        if let Err(payload) = handled {
                            tracing::error!("a control-plane command panicked: {}", panic_message(payload));
                        }
                    }
                    None => break,
                },
                _ = shutdown.changed() => break,
            }
        }
        lookup_task.abort();
        for t in tasks {
            t.abort();
        }
        db.close().await;
    }

    /// PostgreSQL: a deleted or changed session row (logout in the auth service) is dropped from
    /// the cache at once. A notification lost while reconnecting is covered by the cache TTL.
    async fn follow_session_changes(self: Arc<Self>, db: Arc<Db>) {
        use futures_util::StreamExt;
        loop {
            match db.session_changes().await {
                Ok(None) => return,
                Ok(Some(mut stream)) => {
                    tracing::info!("following session changes through LISTEN/NOTIFY");
                    while let Some(token) = stream.next().await {
                        let _ = self.state.apply(StateCommand::SessionInvalidated(Sessions::Token(token)));
                    }
                }
                Err(e) => tracing::warn!("cannot LISTEN for session changes ({e:#}); retrying"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn handle(self: &Arc<Self>, db: &Arc<Db>, cmd: Command) {
        match cmd {
            Command::Ensure(user, reply) => {
                let (Some(ws), db, plane) = (self.workspaces.clone(), db.clone(), self.clone()) else {
                    let _ = reply.send(Ok(None));
                    return;
                };
                // Starts run beside other commands; the per-user lock makes concurrent first
                // requests of one user share one start.
                tokio::spawn(async move {
                    let lock = ws.user_lock(&user);
                    let _guard = lock.lock().await;
                    if let Some(running) = plane.state.table().user(&user).filter(|r| r.running) {
                        let _ = reply.send(Ok(Some(running.clone())));
                        return;
                    }
                    let res = match (&plane.cluster, db.postgres()) {
                        (Some(cluster), Some(pool)) => plane.ensure_in_cluster(cluster, pool, &db, &ws, &user).await,
                        _ => plane.start_here(&db, &ws, &user).await,
                    };
                    let _ = reply.send(res);
                });
            }
            Command::Stop(user, reply) => {
                let Some(ws) = self.workspaces.clone() else {
                    let _ = reply.send(Ok(()));
                    return;
                };
                let _ = reply.send(self.stop_now(&ws, db, &user).await.map_err(PlaneError::Internal));
            }
            Command::List(r) => {
                let _ = r.send(db.list_workspaces().await.map_err(PlaneError::from));
            }
            Command::Moves(r) => {
                let _ = r.send(db.recent_moves().await.map_err(PlaneError::from));
            }
            Command::Get(u, r) => {
                let _ = r.send(db.get_workspace(&u).await.map_err(PlaneError::from));
            }
            Command::Put(row, r) => {
                let _ = r.send(self.put(db, row).await);
            }
            Command::Delete(u, r) => {
                let down = StateCommand::WorkspaceDown { user: u.clone() };
                let res = self.state.commit(down, db.delete_workspace(&u)).await.map(|(deleted, _)| deleted);
                let _ = r.send(res.map_err(PlaneError::from));
            }
            Command::Move { user, host, port, reply } => {
                let _ = reply.send(self.move_runtime_now(db, &user, host, port).await);
            }
            Command::Switch { route, off, reply } => {
                // Stored first: a hold the database did not take would vanish at the next restart.
                let now = chrono::Utc::now().timestamp();
                let res = if off {
                    let held = StateCommand::RouteHeld { route: route.clone(), holder: ADMIN.into(), since: now };
                    self.state.commit(held, db.hold_route(&route, ADMIN, now)).await.map(|_| ())
                } else {
                    let lifted = StateCommand::RouteReleased { route: route.clone(), holder: ADMIN.into() };
                    self.state.commit(lifted, db.release_route(&route, ADMIN)).await.map(|_| ())
                };
                let res = res.map_err(PlaneError::from).map(|()| {
                    let holders = self.state.holders(&route);
                    tracing::warn!(route = %route, held = off, holders = holders.len(), "route switched by the operator");
                    holders
                });
                let _ = reply.send(res);
            }
            Command::InvalidateSessions(user, reply) => {
                let res = match db.postgres() {
                    Some(pool) => crate::cluster::log_sessions_of_user(pool, &user).await.map_err(PlaneError::from),
                    None => Ok(()),
                };
                let _ = reply.send(res);
            }
            #[cfg(test)]
            Command::Panic(_reply) => panic!("a handler bug"),
        }
    }

    /// Starts the user's workspace on this node's podman; the caller holds the user's lock.
    pub(crate) async fn start_here(
        &self,
        db: &Db,
        ws: &Workspaces,
        user: &str,
    ) -> Result<Option<Arc<UserRoutes>>, PlaneError> {
        match ws.start(db, user).await {
            // The row is stored by the start; the owner publishes it and hands back the entry, so
            // the waiting request needs no second snapshot.
            Ok(row) => match routes_of(&row) {
                Some(routes) => self
                    .state
                    .apply(StateCommand::WorkspaceUp { user: user.to_string(), routes })
                    .map(|t| t.user(user).cloned())
                    .map_err(PlaneError::from),
                None => Err(PlaneError::Internal(anyhow::anyhow!("started workspace has no address"))),
            },
            Err(e) => {
                tracing::error!(user = %user, "workspace start failed: {e:#}");
                Err(PlaneError::Internal(e))
            }
        }
    }

    /// Removes a container its workspace goes on without (a replaced runtime), retired first:
    /// its exit, however late podman reports it, restarts nothing. A failed removal is left to
    /// the next one under the name.
    pub(crate) async fn remove_retired(&self, ws: &Workspaces, container: &str) {
        self.retired.retire(container);
        let _ = ws.engine.remove_container(container).await;
    }

    /// Stops a workspace on purpose (admin call, logout, idle reaping).
    async fn stop_now(&self, ws: &Workspaces, db: &Db, user: &str) -> anyhow::Result<()> {
        let lock = ws.user_lock(user);
        let _guard = lock.lock().await;
        self.stopping.lock().unwrap_or_else(|p| p.into_inner()).insert(user.to_string());
        // Out of the table first: requests get 503 while the containers stop.
        if let Err(e) = self.state.apply(StateCommand::WorkspaceDown { user: user.to_string() }) {
            tracing::error!(user, "cannot take the workspace out of the table: {e}");
        }
        let res = ws.stop(db, user).await;
        self.stopping.lock().unwrap_or_else(|p| p.into_inner()).remove(user);
        res
    }

    /// Stops workspaces nobody used for `idle_timeout`: no request and no open websocket (the
    /// gateway's own record, not CPU). The next request starts them again.
    async fn reap_idle(self: Arc<Self>, db: Arc<Db>, ws: Arc<Workspaces>, idle: Duration) {
        let tick = (idle / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            tokio::time::sleep(tick).await;
            let table = self.table.load_full();
            let idle_users: Vec<String> = table
                .workspaces
                .iter()
                .filter(|(_, r)| {
                    r.running && r.activity.open_websockets() <= 0 && r.activity.idle_secs() >= idle.as_secs()
                })
                .map(|(u, _)| u.to_string())
                .collect();
            for user in idle_users {
                tracing::info!(user = %user, idle_s = idle.as_secs(), "stopping an idle workspace");
                if let Err(e) = self.stop_now(&ws, &db, &user).await {
                    tracing::warn!(user = %user, "stopping an idle workspace failed: {e:#}");
                }
            }
        }
    }

    /// Container exits arrive as events: the workspace is marked down at once (requests get 503,
    /// not a hang) and its container restarted with backoff.
    async fn watch_containers(self: Arc<Self>, ws: Arc<Workspaces>) {
        use futures_util::StreamExt;
        let mut restarts: HashMap<String, (Instant, u32)> = HashMap::new();
        // Containers with a restart scheduled: a second `died` event for the same exit (podman
        // can send more than one) must not schedule another restart, which would come early,
        // off the first one's clock, after the next exit.
        let pending: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
        loop {
            let mut events = match ws.engine.events().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot follow container events ({e:#}); retrying in 1s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(ev) = events.next().await {
                let Ok(ev) = ev else { break };
                if !ws.cfg().owns(ev.labels.get(crate::engine::LABEL_INSTANCE)) {
                    continue;
                }
                if !self.retired.live_exit(&ev) {
                    continue;
                }
                let Some(user) = ev.labels.get(crate::engine::LABEL_USER).cloned() else { continue };
                if self.stopping.lock().unwrap_or_else(|p| p.into_inner()).contains(&user) {
                    continue;
                }
                let Some(routes) = self.table.load().user(&user).cloned() else { continue };
                if !pending.lock().unwrap_or_else(|p| p.into_inner()).insert(ev.name.clone()) {
                    tracing::debug!(user = %user, container = %ev.name, "another exit event of a container whose restart is scheduled");
                    continue;
                }
                tracing::warn!(user = %user, container = %ev.name, "workspace container died; marked down, restarting");
                ws.metrics.exits.inc();
                if let Err(e) = self.state.apply(StateCommand::WorkspaceRunning { user: user.clone(), running: false })
                {
                    tracing::error!(user = %user, "cannot mark the workspace down: {e}");
                }
                // Backoff: 0.5 s doubling per restart within 10 minutes, at most 30 s.
                let entry = restarts.entry(user.clone()).or_insert((Instant::now(), 0));
                if entry.0.elapsed() > Duration::from_secs(600) {
                    *entry = (Instant::now(), 0);
                }
                let delay =
                    Duration::from_millis(500u64.saturating_mul(1 << entry.1.min(6))).min(Duration::from_secs(30));
                entry.1 += 1;
                let (plane, ws, name, pending) = (self.clone(), ws.clone(), ev.name.clone(), pending.clone());
                tokio::spawn(async move {
                    // Whatever the outcome, the next exit of this container schedules anew.
                    struct Done(Arc<Mutex<std::collections::HashSet<String>>>, String);
                    impl Drop for Done {
                        fn drop(&mut self) {
                            self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
                        }
                    }
                    let _done = Done(pending, name.clone());
                    tokio::time::sleep(delay).await;
                    let lock = ws.user_lock(&user);
                    let _guard = lock.lock().await;
                    if plane.table.load().user(&user).is_none_or(|r| r.running) {
                        return; // stopped meanwhile, or already back
                    }
                    let back = async {
                        ws.engine.restart_container(&name).await?;
                        ws.wait_ready(routes.editor.port(), routes.runtime.port()).await
                    };
                    match back.await {
                        Ok(()) => {
                            let back = StateCommand::WorkspaceRunning { user: user.clone(), running: true };
                            if let Err(e) = plane.state.apply(back) {
                                tracing::error!(user = %user, "cannot mark the workspace back: {e}");
                            }
                            tracing::info!(user = %user, container = %name, "workspace back after a container exit");
                        }
                        Err(e) => tracing::error!(user = %user, container = %name, "restart failed: {e:#}"),
                    }
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn put(&self, db: &Db, row: WorkspaceRow) -> Result<(), PlaneError> {
        let routes =
            routes_of(&row).ok_or_else(|| PlaneError::Invalid("editor or runtime address does not resolve".into()))?;
        let up = StateCommand::WorkspaceUp { user: row.user_id.clone(), routes };
        self.state.commit(up, db.upsert_workspace(&row)).await?;
        Ok(())
    }

    /// Probes the new runtime, then moves the route, persists, tells the editor, records the move.
    async fn move_runtime_now(
        &self,
        db: &Db,
        user: &str,
        host: Option<String>,
        port: u16,
    ) -> Result<MoveOutcome, PlaneError> {
        let limits = self.config.load().moves.clone();
        let started = Instant::now();
        let started_unix = chrono::Utc::now().timestamp();
        {
            let mut recent = self.recent_moves.lock().unwrap_or_else(|p| p.into_inner());
            let q = recent.entry(user.to_string()).or_default();
            while q.front().is_some_and(|t| started.duration_since(*t) > limits.window) {
                q.pop_front();
            }
            if q.len() >= limits.max_moves {
                return Err(PlaneError::TooMany(format!(
                    "{} moves of this runtime within {:?} already; wait before moving it again",
                    q.len(),
                    limits.window
                )));
            }
        }
        // In a cluster the moves made through the other gateways count too.
        if self.cluster.is_some() {
            if let Some(n) = db.count_recent_moves(user, limits.window).await? {
                if n as usize >= limits.max_moves {
                    return Err(PlaneError::TooMany(format!(
                        "{n} moves of this runtime within {:?} already, through all gateways; wait before moving it again",
                        limits.window
                    )));
                }
            }
        }
        let Some(row) = db.get_workspace(user).await? else {
            return Err(PlaneError::NotFound(format!("no workspace for user {user}")));
        };
        let host = host.unwrap_or_else(|| row.runtime_host.clone());
        let Some(target) = resolve(&host, port) else {
            return Err(PlaneError::Invalid(format!("cannot resolve {host}:{port}")));
        };
        let from = format!("{}:{}", row.runtime_host, row.runtime_port);
        let to = format!("{host}:{port}");
        let probe = http_client::call(target, "GET", "/mrp/v1/capabilities", None, limits.probe_timeout).await;
        let probe_ms = started.elapsed().as_millis() as u64;
        let probe_error = match probe {
            Ok(r) if (200..300).contains(&r.status) => None,
            Ok(r) => Some(format!("the new runtime answered {} to /mrp/v1/capabilities", r.status)),
            Err(e) => Some(format!("the new runtime did not answer /mrp/v1/capabilities: {e:#}")),
        };
        if let Some(why) = probe_error {
            let rec = MoveRecord {
                user_id: user.to_string(),
                from,
                to,
                status: format!("failed: {why}"),
                probe_ms: probe_ms as i64,
                notify_ms: 0,
                started_at: started_unix,
                completed_at: chrono::Utc::now().timestamp(),
            };
            if let Err(e) = db.record_move(&rec).await {
                tracing::warn!("cannot record the failed move: {e:#}");
            }
            return Err(PlaneError::Conflict(format!("{why}; the user stays on {}", rec.from)));
        }
        let moved = Moved { row: &row, host: &host, port, target, runtime_container: None };
        let outcome = self.complete_move(db, moved, started, started_unix, probe_ms).await?;
        self.recent_moves
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(user.to_string())
            .or_default()
            .push_back(started);
        Ok(outcome)
    }

    /// The second half of every `update-port` (the admin call and the health loop's replacement
    /// alike), once the new runtime answered its probe: persist, move the route, tell the editor,
    /// record the move.
    pub(crate) async fn complete_move(
        &self,
        db: &Db,
        m: Moved<'_>,
        started: Instant,
        started_unix: i64,
        probe_ms: u64,
    ) -> Result<MoveOutcome, PlaneError> {
        let limits = self.config.load().moves.clone();
        let (row, user) = (m.row, m.row.user_id.as_str());
        let from = format!("{}:{}", row.runtime_host, row.runtime_port);
        let to = format!("{}:{}", m.host, m.port);
        let moved = StateCommand::RuntimeMoved { user: user.to_string(), runtime: m.target };
        let persist = async {
            match &m.runtime_container {
                // A new container: the row (and its `runtimes` row) now describe it.
                Some(name) => {
                    let new_row = WorkspaceRow {
                        runtime_host: m.host.to_string(),
                        runtime_port: m.port,
                        runtime_container: Some(name.clone()),
                        updated_at: chrono::Utc::now().timestamp(),
                        ..row.clone()
                    };
                    db.upsert_workspace(&new_row).await
                }
                None => db.set_runtime(user, m.host, m.port).await,
            }
        };
        self.state.commit(moved, persist).await?;
        let notify_start = Instant::now();
        let body = serde_json::json!({"port": m.port, "host": m.host}).to_string();
        let notified = match resolve(&row.editor_host, row.editor_port) {
            Some(e) => notify_editor(e, &body, limits.notify_timeout).await,
            None => Err(anyhow::anyhow!("editor address does not resolve")),
        };
        let notify_ms = notify_start.elapsed().as_millis() as u64;
        let editor_error = notified.err().map(|e| format!("{e:#}"));
        let rec = MoveRecord {
            user_id: user.to_string(),
            from: from.clone(),
            to: to.clone(),
            status: match &editor_error {
                None => "completed".into(),
                Some(e) => format!("completed; editor not told: {e}"),
            },
            probe_ms: probe_ms as i64,
            notify_ms: notify_ms as i64,
            started_at: started_unix,
            completed_at: chrono::Utc::now().timestamp(),
        };
        if let Err(e) = db.record_move(&rec).await {
            tracing::warn!("cannot record the move: {e:#}");
        }
        if let Some(e) = &editor_error {
            tracing::warn!(user, "runtime moved but the editor was not told: {e}");
        }
        tracing::info!(user, %from, %to, probe_ms, notify_ms, ms = started.elapsed().as_millis() as u64, "runtime moved");
        Ok(MoveOutcome {
            ok: true,
            user_id: user.to_string(),
            from,
            to,
            probe_ms,
            editor_notified: editor_error.is_none(),
            editor_error,
            notify_ms,
        })
    }

    /// Probes configured services concurrently; a `disable_route` follows its check.
    async fn health_loop(self: Arc<Self>) {
        loop {
            let checks = self.config.load().health_checks.clone();
            let interval = checks.iter().map(|c| c.interval).min().unwrap_or(Duration::from_secs(3600));
            let results = futures_util::future::join_all(checks.iter().map(|c| async move {
                let ok = matches!(
                    http_client::call(c.addr, "GET", &c.path, None, c.timeout).await,
                    Ok(r) if (200..300).contains(&r.status)
                );
                (c.clone(), ok)
            }))
            .await;
            let old = self.health.load_full();
            let mut states = BTreeMap::new();
            let now = chrono::Utc::now().timestamp();
            // The health holds the checks want now: (route, holder).
            let mut wanted = std::collections::BTreeSet::new();
            for (check, ok) in results {
                let changed = old.get(&check.name) != Some(&ok);
                if changed && ok {
                    tracing::info!(service = %check.name, "health check passes");
                } else if changed {
                    tracing::warn!(service = %check.name, "health check fails");
                }
                if let Some(route) = &check.disable_route {
                    let holder = health_holder(&check.name);
                    if !ok {
                        wanted.insert((route.clone(), holder.clone()));
                    }
                    // Only this check's hold: the operator's and other checks' holds stay.
                    let cmd = if ok {
                        StateCommand::RouteReleased { route: route.clone(), holder: holder.clone() }
                    } else {
                        StateCommand::RouteHeld { route: route.clone(), holder: holder.clone(), since: now }
                    };
                    if let Err(e) = self.state.apply(cmd) {
                        tracing::error!(route = %route, "cannot switch the route for {holder}: {e}");
                    }
                    if changed {
                        let holders = self.state.holders(route).len();
                        tracing::warn!(route = %route, held = !ok, holders, "route switched by {holder}");
                    }
                }
                states.insert(check.name.clone(), ok);
            }
            // Holds of checks a reload removed (or pointed at another route) go with them.
            for (route, holds) in self.state.holds() {
                for h in holds {
                    if h.holder.starts_with("health:") && !wanted.contains(&(route.clone(), h.holder.clone())) {
                        let _ =
                            self.state.apply(StateCommand::RouteReleased { route: route.clone(), holder: h.holder });
                    }
                }
            }
            self.health.store(Arc::new(states));
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.health_wake.notified() => {}
            }
        }
    }
}

/// Retries of an editor notification whose connection was refused or reset (an editor
/// restarting), and the waits before them.
const NOTIFY_RETRIES: [Duration; 3] = [Duration::from_millis(250), Duration::from_secs(1), Duration::from_secs(2)];

/// Tells the editor its runtime moved (`POST /api/runtime/update-port`). A refused or reset
/// connection is tried again ([`NOTIFY_RETRIES`]): the move is already stored, and an editor
/// that never hears of it talks to the old runtime. A timeout or an answer is final (the call
/// already waited, or the editor decided).
async fn notify_editor(editor: std::net::SocketAddr, body: &str, timeout: Duration) -> anyhow::Result<()> {
    let mut waits = NOTIFY_RETRIES.iter();
    loop {
        let told =
            http_client::call(editor, "POST", "/api/runtime/update-port", Some(body), timeout).await.and_then(|r| {
                if r.is_success() {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("editor answered {}", r.status))
                }
            });
        match (told, waits.next()) {
            (Err(e), Some(wait)) if refused(&e) => {
                tracing::debug!("telling the editor at {editor} failed ({e:#}); again in {wait:?}");
                tokio::time::sleep(*wait).await;
            }
            (told, _) => return told,
        }
    }
}

/// The connection was refused, reset or aborted: nothing was processed.
fn refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, status: &str) -> crate::engine::ContainerEvent {
        crate::engine::ContainerEvent { name: name.into(), status: status.into(), labels: BTreeMap::new() }
    }

    #[test]
    fn a_retired_containers_late_exit_takes_nothing_down_until_a_new_one_starts_under_its_name() {
        let retired = Retired::default();
        assert!(retired.live_exit(&event("markco-runtime-u", "died")), "an exit of a live container counts");
        retired.retire("markco-runtime-u");
        // Podman reports the removed runtime's exit after the replacement has finished.
        assert!(!retired.live_exit(&event("markco-runtime-u", "died")));
        assert!(!retired.live_exit(&event("markco-runtime-u", "died")), "a second event of the same exit");
        assert!(retired.live_exit(&event("markco-runtime-u-p5001", "died")), "its replacement's exit counts");
        assert!(retired.live_exit(&event("markco-editor-u", "died")), "the editor's exit counts");
        // The workspace is started again later under the first name.
        assert!(!retired.live_exit(&event("markco-runtime-u", "start")));
        assert!(retired.live_exit(&event("markco-runtime-u", "died")));
        assert!(!retired.live_exit(&event("markco-runtime-u", "stop")), "only `died` is an exit");
        // A name is remembered for RETIRED_FOR at most, even with no retirement after it.
        if let Some(long_ago) = Instant::now().checked_sub(RETIRED_FOR + Duration::from_secs(1)) {
            retired.0.lock().unwrap_or_else(|p| p.into_inner()).insert("markco-runtime-v".into(), long_ago);
            assert!(retired.live_exit(&event("markco-runtime-v", "died")), "an expired name hides an exit");
        }
    }

    #[test]
    fn database_errors_map_to_statuses_by_kind() {
        let status = |e: DbError| PlaneError::from(e).status();
        assert_eq!(status(DbError::AddressInUse { kind: "runtime", host: "127.0.0.1".into(), port: 1 }), 409);
        assert_eq!(status(DbError::EmailExists), 409);
        assert_eq!(status(DbError::NoWorkspace("u".into())), 404);
        assert_eq!(status(DbError::UnknownUser("u".into())), 404);
        assert_eq!(status(DbError::InvalidUserId("U".into())), 400);
        // The connection, not the query: the same call may work soon.
        assert_eq!(status(DbError::from(sqlx::Error::PoolTimedOut)), 503);
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(status(DbError::from(anyhow::Error::new(sqlx::Error::Io(refused)).context("listing"))), 503);
        assert_eq!(status(DbError::from(sqlx::Error::RowNotFound)), 500);
    }

    #[tokio::test]
    async fn a_panicking_command_answers_500_and_the_loop_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/markco.db", dir.path().display());
        let db = Db::connect(&url).await.expect("open the test database");
        db.migrate().await.expect("migrate");
        db.close().await;
        let config = PlaneConfig {
            database_url: url,
            workspaces: None,
            sessions: SessionSettings::default(),
            moves: MoveLimits::default(),
            health_checks: Vec::new(),
            cluster: None,
        };
        let (table, _reader) = TablePublisher::new(markco_proxy::table::RouteTable::empty());
        let plane = ControlPlane::new(table, config, &prometheus::Registry::new());
        let (_stop, shutdown) = watch::channel(false);
        let run = tokio::spawn(plane.clone().run(shutdown));
        let err = plane.ask(Command::Panic).await.expect_err("the handler panicked");
        assert_eq!(err.status(), 500, "{err}");
        // The same loop still answers the next call.
        let next = tokio::time::timeout(Duration::from_secs(5), plane.list_workspaces()).await;
        assert!(matches!(next, Ok(Ok(ref rows)) if rows.is_empty()), "{next:?}");
        run.abort();
    }
}
