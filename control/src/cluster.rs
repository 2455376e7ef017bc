//! Several gateways on one PostgreSQL (`[cluster]`): the shared change log they follow, and the
//! node table they heartbeat into.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use markco_proxy::table::RouteTable;
use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, Registry};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::db::{Db, WorkspaceRow, WorkspaceState};
use crate::plane::{routes_of, PlaneError};
use crate::state::{Sessions, StateCommand, StateOwner};
use crate::switches::ADMIN;
use crate::workspaces::Workspaces;
use markco_proxy::table::UserRoutes;

/// `[cluster]`: this gateway's place among several sharing one PostgreSQL.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// This gateway's name, unique in the cluster (`markco_nodes.id`, the change log's `node`).
    pub node: String,
    /// The address other gateways use to reach the containers this node runs.
    pub advertise: IpAddr,
    /// How often this node writes its heartbeat and its last applied change.
    pub heartbeat: Duration,
    /// A node whose heartbeat is older than this is down.
    pub node_timeout: Duration,
    /// How often the change log is read even without a NOTIFY (a missed NOTIFY costs at most this).
    pub poll: Duration,
    /// Changes older than this are trimmed even if a node that is down has not applied them
    /// (that node rebuilds its state from the tables when it comes back).
    pub change_retention: Duration,
    /// The key file every gateway has, that encrypts the private keys of the fleet's certificates
    /// in the database.
    pub secret_file: Option<PathBuf>,
    /// Workspaces this node may run: `"*"` in all, or per plan (`users.plan`); a key not given
    /// is not limited. Empty: no limit. A gateway without `[workspaces]` runs none.
    pub capacity: BTreeMap<String, u32>,
    /// The users' data directories are on storage every node sees: a workspace whose node is down
    /// may start on another. Off: it stays down (503) until its node is back.
    pub shared_data: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node: String::new(),
            advertise: IpAddr::from([127, 0, 0, 1]),
            heartbeat: Duration::from_secs(2),
            node_timeout: Duration::from_secs(10),
            poll: Duration::from_secs(1),
            change_retention: Duration::from_secs(86_400),
            secret_file: None,
            capacity: BTreeMap::new(),
            shared_data: false,
        }
    }
}

/// Channel of the change log's NOTIFY (migrations/postgres/0005_cluster.sql); the payload is the
/// new sequence number, a hint only: a gateway always reads the log from its last applied change.
pub const CHANGES_CHANNEL: &str = "markco_changes";
/// Changes read from the log per query.
const BATCH: i64 = 500;

/// A change as the log holds it: what the triggers write (migrations/postgres/0005_cluster.sql),
/// turned into the owner's [`StateCommand`]s by [`commands`]. The log is written by PostgreSQL,
/// but a row that does not parse is skipped and counted, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// A workspace row was inserted or its live columns changed.
    Workspace {
        user_id: String,
        editor_host: String,
        editor_port: u16,
        runtime_host: String,
        runtime_port: u16,
        state: String,
        #[serde(default)]
        node: Option<String>,
    },
    WorkspaceDeleted {
        user_id: String,
    },
    RouteHeld {
        route: String,
        holder: String,
        since: i64,
    },
    RouteReleased {
        route: String,
        holder: String,
    },
    /// Every session of a user dropped (account deletion through the admin API).
    SessionsOfUser {
        user_id: String,
    },
    /// A workspace placed on `node`, which starts it.
    Placed {
        user_id: String,
        node: String,
    },
}

/// What the owner does about `change`, given the table it applies to. A workspace that only
/// changed its runtime address is a runtime move; one that is starting is not served yet (its
/// node publishes it once it runs); stopped or failed is out of the table.
pub fn commands(change: Change, table: &RouteTable) -> Vec<StateCommand> {
    match change {
        Change::Workspace { user_id, editor_host, editor_port, runtime_host, runtime_port, state, node } => {
            let state: WorkspaceState = match state.parse() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(user = %user_id, "change log: {e:#}; skipped");
                    return Vec::new();
                }
            };
            match state {
                WorkspaceState::Starting => Vec::new(),
                WorkspaceState::Stopped | WorkspaceState::Failed | WorkspaceState::Lost => {
                    vec![StateCommand::WorkspaceDown { user: user_id }]
                }
                WorkspaceState::Running => {
                    let row = WorkspaceRow {
                        user_id,
                        editor_host,
                        editor_port,
                        runtime_host,
                        runtime_port,
                        state,
                        editor_container: None,
                        runtime_container: None,
                        updated_at: 0,
                        node,
                    };
                    let Some(routes) = routes_of(&row) else {
                        tracing::warn!(user = %row.user_id, "change log: a workspace address does not resolve; skipped");
                        return Vec::new();
                    };
                    match table.user(&row.user_id) {
                        Some(cur) if cur.running && cur.editor == routes.editor && cur.runtime != routes.runtime => {
                            vec![StateCommand::RuntimeMoved { user: row.user_id, runtime: routes.runtime }]
                        }
                        Some(cur) if cur.running && cur.editor == routes.editor && cur.runtime == routes.runtime => {
                            Vec::new()
                        }
                        _ => vec![StateCommand::WorkspaceUp { user: row.user_id, routes }],
                    }
                }
            }
        }
        Change::WorkspaceDeleted { user_id } => vec![StateCommand::WorkspaceDown { user: user_id }],
        Change::RouteHeld { route, holder, since } => vec![StateCommand::RouteHeld { route, holder, since }],
        Change::RouteReleased { route, holder } => vec![StateCommand::RouteReleased { route, holder }],
        Change::SessionsOfUser { user_id } => vec![StateCommand::SessionInvalidated(Sessions::User(user_id))],
        // Not the live state: the node it names starts the workspace ([`Cluster::take_work`]).
        Change::Placed { .. } => Vec::new(),
    }
}

/// One node as the others see it (`GET /api/admin/cluster`, `/routes`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeStatus {
    pub id: String,
    pub advertise: String,
    /// The last change it applied.
    pub applied_seq: i64,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_s: f64,
    /// Its heartbeat is within `node_timeout`.
    pub up: bool,
    /// Running workspaces whose containers it runs.
    pub workspaces: i64,
}

/// This gateway's view of the cluster.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub node: String,
    pub applied_seq: i64,
    /// The newest change in the log (as of the last heartbeat).
    pub head_seq: i64,
    /// How long the oldest change not applied here has waited (0: caught up).
    pub lag_seconds: f64,
    pub nodes: Vec<NodeStatus>,
}

pub struct ClusterMetrics {
    pub lag: Gauge,
    pub applied: IntCounter,
    pub propagation: Histogram,
    pub skipped: IntCounter,
    pub resyncs: IntCounter,
}

impl ClusterMetrics {
    fn new(registry: &Registry) -> ClusterMetrics {
        let m = ClusterMetrics {
            lag: Gauge::new(
                "markco_cluster_lag_seconds",
                "How long the oldest change in the shared log not yet applied by this gateway has waited (0: caught up)",
            )
            .expect("static metric definition"),
            applied: IntCounter::new(
                "markco_cluster_changes_applied_total",
                "Changes from the shared change log applied by this gateway (its own included)",
            )
            .expect("static metric definition"),
            propagation: Histogram::with_opts(
                HistogramOpts::new(
                    "markco_cluster_propagation_seconds",
                    "From a change's write in the database to its application by this gateway",
                )
                .buckets(vec![0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]),
            )
            .expect("static metric definition"),
            skipped: IntCounter::new(
                "markco_cluster_changes_skipped_total",
                "Change log rows that did not parse or that the live state refused",
            )
            .expect("static metric definition"),
            resyncs: IntCounter::new(
                "markco_cluster_resyncs_total",
                "Full rebuilds from the tables because the changes this gateway missed were trimmed",
            )
            .expect("static metric definition"),
        };
        // A second plane on one registry (tests) keeps the first's; registering twice is harmless.
        let _ = registry.register(Box::new(m.lag.clone()));
        let _ = registry.register(Box::new(m.applied.clone()));
        let _ = registry.register(Box::new(m.propagation.clone()));
        let _ = registry.register(Box::new(m.skipped.clone()));
        let _ = registry.register(Box::new(m.resyncs.clone()));
        m
    }
}

/// This gateway's membership: where it is in the log, the nodes it last saw, and which users'
/// containers it runs.
pub struct Cluster {
    pub cfg: ClusterConfig,
    pub metrics: ClusterMetrics,
    /// The last change applied here.
    applied: AtomicI64,
    head: AtomicI64,
    /// Serialises log readers (the follower and a resync), so changes apply once and in order.
    reading: tokio::sync::Mutex<()>,
    nodes: ArcSwap<Vec<NodeStatus>>,
    /// Users whose workspace runs on this node: only these are probed, replaced and reconciled here.
    own: Mutex<HashSet<String>>,
    /// Wakes waiters when `applied` moves (a placement waits for its workspace to come up).
    pub progress: tokio::sync::Notify,
    /// What the log asks of this node: workspaces placed here to start, and workspaces of this
    /// node marked lost (its containers must go: another node may start them).
    work: Mutex<NodeWork>,
    /// Users whose last start failed (a waiting placement gives up at once instead of at its
    /// timeout; a new placement clears its user's first).
    failed: Mutex<HashSet<String>>,
}

/// See [`Cluster::take_work`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NodeWork {
    pub start: Vec<String>,
    pub fence: Vec<String>,
}

impl Cluster {
    pub fn new(cfg: ClusterConfig, registry: &Registry) -> Cluster {
        Cluster {
            cfg,
            metrics: ClusterMetrics::new(registry),
            applied: AtomicI64::new(0),
            head: AtomicI64::new(0),
            reading: tokio::sync::Mutex::new(()),
            nodes: ArcSwap::default(),
            own: Mutex::new(HashSet::new()),
            progress: tokio::sync::Notify::new(),
            work: Mutex::default(),
            failed: Mutex::default(),
        }
    }

    pub fn applied(&self) -> i64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Whether this node runs `user`'s containers.
    pub fn owns(&self, user: &str) -> bool {
        self.own.lock().unwrap_or_else(|p| p.into_inner()).contains(user)
    }

    fn note_owner(&self, user: &str, node: Option<&str>, running: bool) {
        let mut own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        if running && node == Some(self.cfg.node.as_str()) {
            own.insert(user.to_string());
        } else {
            own.remove(user);
        }
    }

    /// The start position and the owned users, from what the boot read.
    pub fn restore(&self, seq: i64, rows: &[WorkspaceRow]) {
        self.applied.store(seq, Ordering::Release);
        self.head.store(seq, Ordering::Release);
        for row in rows {
            self.note_owner(&row.user_id, row.node.as_deref(), row.state == WorkspaceState::Running);
        }
    }

    /// What the changes applied so far ask this node to do (drained).
    pub fn take_work(&self) -> NodeWork {
        std::mem::take(&mut *self.work.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether the last start of `user`'s workspace failed (drained).
    pub fn take_failed(&self, user: &str) -> bool {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).remove(user)
    }

    pub fn status(&self) -> ClusterStatus {
        ClusterStatus {
            node: self.cfg.node.clone(),
            applied_seq: self.applied(),
            head_seq: self.head.load(Ordering::Acquire),
            lag_seconds: self.metrics.lag.get(),
            nodes: self.nodes.load().as_ref().clone(),
        }
    }

    /// Reads the log from the last applied change and applies what is new, in order; rebuilds from
    /// the tables instead when what it missed was trimmed. Returns how many changes it applied.
    pub async fn catch_up(&self, pool: &PgPool, state: &StateOwner) -> anyhow::Result<usize> {
        let _reading = self.reading.lock().await;
        let mut total = 0;
        loop {
            let from = self.applied();
            let rows: Vec<(i64, f64, Option<String>, serde_json::Value)> = sqlx::query_as(
                "SELECT seq, extract(epoch FROM clock_timestamp() - at)::float8, node, change FROM markco_changes \
                 WHERE seq > $1 ORDER BY seq LIMIT $2",
            )
            .bind(from)
            .bind(BATCH)
            .fetch_all(pool)
            .await
            .with_context(|| format!("reading the change log after {from}"))?;
            // Read after the rows: a trim that committed before them (so they may lack changes
            // after `from`) shows here, and the rows are not used.
            let trimmed = trimmed_upto(pool).await?;
            if trimmed > from {
                tracing::warn!(
                    applied = from,
                    trimmed,
                    "changes this gateway missed were trimmed; rebuilding from the tables"
                );
                self.resync(pool, state).await?;
                continue;
            }
            let n = rows.len();
            for (seq, age, node, body) in rows {
                if seq > from + 1 && total == 0 {
                    tracing::debug!(from, seq, "a hole in the change log (a rolled-back write); nothing missed");
                }
                self.apply_raw(state, seq, node.as_deref(), body);
                self.metrics.propagation.observe(age.max(0.0));
                self.applied.store(seq, Ordering::Release);
                self.head.fetch_max(seq, Ordering::AcqRel);
                total += 1;
            }
            if n > 0 {
                self.progress.notify_waiters();
            }
            if (n as i64) < BATCH {
                break;
            }
        }
        self.metrics.lag.set(0.0);
        Ok(total)
    }

    fn apply_raw(&self, state: &StateOwner, seq: i64, from_node: Option<&str>, body: serde_json::Value) {
        match serde_json::from_value(body) {
            Ok(change) => self.apply_one(state, seq, from_node, change),
            Err(e) => {
                self.metrics.skipped.inc();
                tracing::warn!(seq, node = ?from_node, "change log entry not understood ({e}); skipped");
            }
        }
    }

    fn apply_one(&self, state: &StateOwner, seq: i64, from_node: Option<&str>, change: Change) {
        let me = Some(self.cfg.node.as_str());
        if let Change::Workspace { user_id, node, state: s, .. } = &change {
            let was_mine = self.owns(user_id);
            self.note_owner(user_id, node.as_deref(), s == "running");
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            if s == "failed" {
                failed.insert(user_id.clone());
            } else {
                failed.remove(user_id);
            }
            drop(failed);
            // Marked lost, or stopped through another gateway: this node's containers must go
            // (the fence task checks the row again under the user's lock first).
            let lost = s == "lost" && (was_mine || node.as_deref() == me);
            let stopped_elsewhere = s == "stopped" && was_mine && from_node != me;
            if lost || stopped_elsewhere {
                self.work.lock().unwrap_or_else(|p| p.into_inner()).fence.push(user_id.clone());
            }
        }
        if let Change::WorkspaceDeleted { user_id } = &change {
            if self.owns(user_id) && from_node != me {
                self.work.lock().unwrap_or_else(|p| p.into_inner()).fence.push(user_id.clone());
            }
        }
        if let Change::Placed { user_id, node } = &change {
            if *node == self.cfg.node {
                self.work.lock().unwrap_or_else(|p| p.into_inner()).start.push(user_id.clone());
            }
        }
        if let Change::WorkspaceDeleted { user_id } = &change {
            self.note_owner(user_id, None, false);
        }
        for cmd in commands(change, &state.table()) {
            if let Err(e) = state.apply(cmd) {
                // A later change in the log settles it (the database held a valid state at every
                // commit); until then the table keeps what it had.
                self.metrics.skipped.inc();
                tracing::warn!(seq, node = ?from_node, "change log entry refused by the live state: {e}");
            }
        }
        self.metrics.applied.inc();
    }

    /// Makes the live state what the tables say, for when the changes in between were trimmed.
    async fn resync(&self, pool: &PgPool, state: &StateOwner) -> anyhow::Result<()> {
        self.metrics.resyncs.inc();
        // The position first: changes written while the tables are read are applied again after.
        let seq = head(pool).await?.max(trimmed_upto(pool).await?);
        let db = Db::Postgres(pool.clone());
        let rows = db.list_workspaces().await?;
        let holds = db.route_holds().await?;
        let table = state.table();
        let listed: HashSet<&str> = rows.iter().map(|r| r.user_id.as_str()).collect();
        for (user, _) in table.workspaces.iter() {
            if !listed.contains(&**user) {
                let _ = state.apply(StateCommand::WorkspaceDown { user: user.to_string() });
                self.note_owner(user, None, false);
            }
        }
        for row in &rows {
            let change = Change::Workspace {
                user_id: row.user_id.clone(),
                editor_host: row.editor_host.clone(),
                editor_port: row.editor_port,
                runtime_host: row.runtime_host.clone(),
                runtime_port: row.runtime_port,
                state: row.state.as_str().to_string(),
                node: row.node.clone(),
            };
            self.apply_one(state, seq, None, change);
        }
        let stored: HashSet<(String, String)> = holds.iter().map(|(r, h, _)| (r.clone(), h.clone())).collect();
        for (route, hs) in state.holds() {
            for h in hs {
                if h.holder == ADMIN && !stored.contains(&(route.clone(), h.holder.clone())) {
                    let _ = state.apply(StateCommand::RouteReleased { route: route.clone(), holder: h.holder });
                }
            }
        }
        for (route, holder, since) in holds {
            let _ = state.apply(StateCommand::RouteHeld { route, holder, since });
        }
        self.applied.store(seq, Ordering::Release);
        self.progress.notify_waiters();
        Ok(())
    }

    /// Writes this node's heartbeat and position, reads every node's, and measures the lag.
    pub async fn heartbeat(&self, pool: &PgPool, capacity: &serde_json::Value) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO markco_nodes (id, advertise, capacity, applied_seq, heartbeat) VALUES ($1, $2, $3, $4, now()) \
             ON CONFLICT (id) DO UPDATE SET advertise = excluded.advertise, capacity = excluded.capacity, \
             applied_seq = excluded.applied_seq, heartbeat = now()",
        )
        .bind(&self.cfg.node)
        .bind(self.cfg.advertise.to_string())
        .bind(capacity)
        .bind(self.applied())
        .execute(pool)
        .await
        .context("writing this node's heartbeat")?;
        let timeout = self.cfg.node_timeout.as_secs_f64();
        let nodes: Vec<(String, String, i64, f64, i64)> = sqlx::query_as(
            "SELECT n.id, n.advertise, n.applied_seq, extract(epoch FROM now() - n.heartbeat)::float8, \
             (SELECT count(*) FROM markco_workspaces w WHERE w.node = n.id AND w.state = 'running') \
             FROM markco_nodes n ORDER BY n.id",
        )
        .fetch_all(pool)
        .await
        .context("reading the cluster's nodes")?;
        self.nodes.store(Arc::new(
            nodes
                .into_iter()
                .map(|(id, advertise, applied_seq, age, workspaces)| NodeStatus {
                    id,
                    advertise,
                    applied_seq,
                    heartbeat_age_s: age,
                    up: age <= timeout,
                    workspaces,
                })
                .collect(),
        ));
        let (head, lag): (i64, Option<f64>) = sqlx::query_as(
            "SELECT (SELECT coalesce(max(seq), 0) FROM markco_changes), \
             (SELECT extract(epoch FROM clock_timestamp() - min(at))::float8 FROM markco_changes WHERE seq > $1)",
        )
        .bind(self.applied())
        .fetch_one(pool)
        .await
        .context("reading the change log's head")?;
        self.head.fetch_max(head, Ordering::AcqRel);
        self.metrics.lag.set(lag.unwrap_or(0.0).max(0.0));
        Ok(())
    }
}

/// Trims the change log: what every live node applied, and what is older than `retention`.
/// Safe from any gateway at any time (a node that missed trimmed changes rebuilds from the tables).
pub async fn trim(pool: &PgPool, node_timeout: Duration, retention: Duration) -> anyhow::Result<u64> {
    let mut tx = pool.begin().await.context("starting a transaction")?;
    let cut: i64 = sqlx::query_scalar(
        "SELECT greatest( \
           coalesce((SELECT min(applied_seq) FROM markco_nodes WHERE heartbeat > now() - make_interval(secs => $1)), 0), \
           coalesce((SELECT max(seq) FROM markco_changes WHERE at < now() - make_interval(secs => $2)), 0))",
    )
    .bind(node_timeout.as_secs_f64())
    .bind(retention.as_secs_f64())
    .fetch_one(&mut *tx)
    .await
    .context("finding how far to trim the change log")?;
    let deleted = sqlx::query("DELETE FROM markco_changes WHERE seq <= $1")
        .bind(cut)
        .execute(&mut *tx)
        .await
        .context("trimming the change log")?
        .rows_affected();
    if deleted > 0 {
        sqlx::query("UPDATE markco_changes_trimmed SET upto = greatest(upto, $1)")
            .bind(cut)
            .execute(&mut *tx)
            .await
            .context("recording the trim")?;
    }
    tx.commit().await.context("committing the trim")?;
    Ok(deleted)
}

/// How far the change log was trimmed (everything up to it is gone).
async fn trimmed_upto(pool: &PgPool) -> anyhow::Result<i64> {
    let upto: Option<i64> = sqlx::query_scalar("SELECT upto FROM markco_changes_trimmed")
        .fetch_optional(pool)
        .await
        .context("reading how far the change log was trimmed")?;
    Ok(upto.unwrap_or(0))
}

/// Logs "every session of `user` dropped" for the other gateways.
pub async fn log_sessions_of_user(pool: &PgPool, user: &str) -> Result<(), crate::db::DbError> {
    sqlx::query("SELECT markco_log_change(jsonb_build_object('kind', 'sessions_of_user', 'user_id', $1::text))")
        .bind(user)
        .execute(pool)
        .await
        .with_context(|| format!("logging the invalidation of user {user}'s sessions"))?;
    Ok(())
}

/// The change log's head, read before the tables at boot: changes after it are applied by the
/// follower (some again, which is harmless: each is the state as of its write).
pub async fn head(pool: &PgPool) -> anyhow::Result<i64> {
    sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM markco_changes")
        .fetch_one(pool)
        .await
        .context("reading the change log's head")
}

impl crate::plane::ControlPlane {
    /// Applies the shared change log as it grows: woken by the NOTIFY, and every `poll` without
    /// one (a NOTIFY lost while the listening connection was down costs at most that).
    pub(crate) async fn follow_changes(self: Arc<Self>, db: Arc<Db>) {
        let (Some(cluster), Some(pool)) = (self.cluster.clone(), db.postgres().cloned()) else { return };
        let wake = Arc::new(tokio::sync::Notify::new());
        // The listener lives in its own task so that a poll tick never cancels a read mid-message.
        let listening = AbortOnDrop(tokio::spawn(listen(pool.clone(), wake.clone())));
        loop {
            if let Err(e) = cluster.catch_up(&pool, &self.state).await {
                tracing::warn!("cannot read the change log ({e:#}); retrying");
            }
            self.node_work(&db, &cluster);
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(cluster.cfg.poll) => {}
            }
            if listening.0.is_finished() {
                // It never returns on its own; a panic there must not leave us polling only.
                panic!("the change log listener stopped");
            }
        }
    }

    /// `[cluster]` with `[workspaces]`: where the user's workspace runs, decided by [`place`],
    /// and its entry once it runs (started here, or by the node it was placed on).
    pub(crate) async fn ensure_in_cluster(
        &self,
        cluster: &Cluster,
        pool: &PgPool,
        db: &Db,
        ws: &Workspaces,
        user: &str,
    ) -> Result<Option<Arc<UserRoutes>>, PlaneError> {
        let ready = ws.cfg().ready_timeout;
        // A failure from an earlier start is not this one's.
        cluster.take_failed(user);
        let placement = place(pool, &cluster.cfg, user, ready).await.map_err(|e| {
            tracing::error!(user, "cannot place the workspace: {e:#}");
            PlaneError::Unavailable(
                "the workspace cannot be placed now (the database is unavailable); retry shortly".into(),
            )
        })?;
        tracing::debug!(user, ?placement, "workspace placement");
        match placement {
            // Ours but not running here (its container died and is not back yet): start it again,
            // as a gateway alone does.
            Placement::Running(row) if row.node.as_deref() == Some(cluster.cfg.node.as_str()) => {
                self.start_here(db, ws, user).await
            }
            Placement::Running(row) => {
                let routes = routes_of(&row).ok_or_else(|| {
                    PlaneError::Internal(anyhow::anyhow!("workspace row has an unresolvable address"))
                })?;
                let table = self.state.apply(StateCommand::WorkspaceUp { user: user.to_string(), routes })?;
                Ok(table.user(user).cloned())
            }
            Placement::Here => {
                tracing::info!(user, node = %cluster.cfg.node, "workspace placed on this node");
                let res = self.start_here(db, ws, user).await;
                if let Err(e) = placement_done(pool, &cluster.cfg.node, user).await {
                    tracing::warn!(user, "{e:#}");
                }
                res
            }
            Placement::Starting(node) => {
                tracing::info!(user, node = %node, "workspace placed on another node; waiting for it");
                let deadline = tokio::time::Instant::now() + ready + Duration::from_secs(5);
                loop {
                    let progress = cluster.progress.notified();
                    if let Some(r) = self.state.table().user(user).filter(|r| r.running) {
                        return Ok(Some(r.clone()));
                    }
                    if cluster.take_failed(user) {
                        return Err(PlaneError::Unavailable(format!(
                            "the workspace failed to start on node {node}; retry shortly"
                        )));
                    }
                    tokio::select! {
                        _ = progress => {}
                        _ = tokio::time::sleep_until(deadline) => return Ok(None),
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                }
            }
            Placement::Stranded(node) => Err(PlaneError::Unavailable(format!(
                "this workspace's host ({node}) is down and its files are only on that host \
                 ([cluster] shared_data = false); it comes back when the host does"
            ))),
            Placement::NoRoom => {
                Err(PlaneError::Unavailable("no host has room for another workspace now; retry later".into()))
            }
        }
    }

    /// Does what the log asked of this node: starts the workspaces placed here, and removes the
    /// containers of its workspaces marked lost (another node may start them).
    fn node_work(self: &Arc<Self>, db: &Arc<Db>, cluster: &Arc<Cluster>) {
        let work = cluster.take_work();
        let Some(ws) = self.workspaces.clone() else { return };
        for user in work.start {
            let (plane, db, ws, cluster) = (self.clone(), db.clone(), ws.clone(), cluster.clone());
            tokio::spawn(async move {
                let lock = ws.user_lock(&user);
                let _guard = lock.lock().await;
                let Some(pool) = db.postgres() else { return };
                // Started meanwhile by the request that placed it here (it removes the placement).
                match placement_pending(pool, &cluster.cfg.node, &user).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        tracing::warn!(user = %user, "{e:#}");
                        return;
                    }
                }
                tracing::info!(user = %user, "starting a workspace placed on this node");
                let _ = plane.start_here(&db, &ws, &user).await;
                if let Err(e) = placement_done(pool, &cluster.cfg.node, &user).await {
                    tracing::warn!(user = %user, "{e:#}");
                }
            });
        }
        for user in work.fence {
            let (ws, db, node) = (ws.clone(), db.clone(), cluster.cfg.node.clone());
            tokio::spawn(async move {
                let lock = ws.user_lock(&user);
                let _guard = lock.lock().await;
                // Still so under the lock (placed back here and started meanwhile: it stays).
                match db.get_workspace(&user).await {
                    Ok(None) => {}
                    Ok(Some(row))
                        if row.node.as_deref() == Some(node.as_str())
                            && matches!(row.state, WorkspaceState::Lost | WorkspaceState::Stopped) => {}
                    Ok(Some(_)) => return,
                    Err(e) => {
                        tracing::warn!(user = %user, "cannot check a workspace before removing its containers: {e}");
                        return;
                    }
                }
                tracing::warn!(user = %user, "this node's workspace was marked lost or stopped elsewhere; removing its containers here");
                if let Err(e) = ws.engine.remove_pod(&crate::workspaces::pod_name(&user)).await {
                    tracing::warn!(user = %user, "removing the containers of a lost workspace failed: {e:#}");
                }
            });
        }
    }

    /// Heartbeats this node, refreshes the view of the others, and marks the workspaces of nodes
    /// that stopped heartbeating lost.
    pub(crate) async fn heartbeat_loop(self: Arc<Self>, db: Arc<Db>) {
        let (Some(cluster), Some(pool)) = (self.cluster.clone(), db.postgres().cloned()) else { return };
        // A gateway without [workspaces] runs no containers: no room for any.
        let capacity = match &self.workspaces {
            Some(_) => serde_json::to_value(&cluster.cfg.capacity).unwrap_or_default(),
            None => serde_json::json!({"*": 0}),
        };
        let mut failing = false;
        // Since when this node's heartbeats have all been written. Only a node that has been
        // writing for a whole node_timeout judges others: after a database outage every
        // heartbeat is stale, and the first node back must not declare all the others down.
        let mut healthy_since: Option<tokio::time::Instant> = None;
        loop {
            match cluster.heartbeat(&pool, &capacity).await {
                Ok(()) => {
                    if failing {
                        tracing::info!(node = %cluster.cfg.node, "heartbeat written again");
                    }
                    failing = false;
                    healthy_since.get_or_insert_with(tokio::time::Instant::now);
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(node = %cluster.cfg.node, "cannot write the heartbeat ({e:#}); other gateways will see this node as down after node_timeout");
                    }
                    failing = true;
                    healthy_since = None;
                }
            }
            if healthy_since.is_some_and(|t| t.elapsed() >= cluster.cfg.node_timeout) {
                match mark_lost(&pool, cluster.cfg.node_timeout).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::warn!(workspaces = n, "workspaces of nodes that stopped heartbeating marked lost")
                    }
                    Err(e) => tracing::debug!("{e:#}"),
                }
            }
            tokio::time::sleep(cluster.cfg.heartbeat).await;
        }
    }

    /// Trims the change log now and then (on PostgreSQL, with or without `[cluster]`: the triggers
    /// log every change either way).
    pub(crate) async fn trim_loop(self: Arc<Self>, db: Arc<Db>) {
        let Some(pool) = db.postgres().cloned() else { return };
        let d = ClusterConfig::default();
        let (timeout, retention, every) = match &self.cluster {
            Some(c) => (c.cfg.node_timeout, c.cfg.change_retention, (c.cfg.heartbeat * 15).max(Duration::from_secs(5))),
            None => (d.node_timeout, d.change_retention, Duration::from_secs(600)),
        };
        loop {
            match trim(&pool, timeout, retention).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(changes = n, "change log trimmed"),
                Err(e) => tracing::warn!("cannot trim the change log ({e:#}); retrying later"),
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// Ends the task with its owner (a restarted follower starts a new listener).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// LISTENs on the change log's channel and wakes the follower on every NOTIFY and after every
/// reconnection (whatever was written meanwhile is read then).
async fn listen(pool: PgPool, wake: Arc<tokio::sync::Notify>) {
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(channel = CHANGES_CHANNEL, "cannot connect to listen for changes ({e}); retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANGES_CHANNEL).await {
            tracing::warn!(channel = CHANGES_CHANNEL, "cannot LISTEN ({e}); retrying in 1s");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        tracing::info!(channel = CHANGES_CHANNEL, "following the shared change log");
        wake.notify_one();
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => wake.notify_one(),
                // Lost and reconnected: notifications in between are gone, the log is not.
                Ok(None) => {
                    tracing::info!(channel = CHANGES_CHANNEL, "change listener reconnected");
                    wake.notify_one();
                }
                Err(e) => {
                    tracing::warn!(channel = CHANGES_CHANNEL, "change listener failed ({e}); reconnecting in 1s");
                    wake.notify_one();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
    }
}

/// Where a workspace runs, or is to run, as decided by [`place`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Running on a live node: serve it from this row.
    Running(WorkspaceRow),
    /// Being started by `node` (placed there, or starting there): wait for it.
    Starting(String),
    /// Placed on this node: start it here.
    Here,
    /// Its node (`.0`) is down and its data is on that node's disk only (`shared_data = false`).
    Stranded(String),
    /// No live node has room for it.
    NoRoom,
}

/// Decides where `user`'s workspace runs, in one transaction under the placement lock: one
/// placement at a time in the whole cluster, so two gateways never place one user twice and a
/// node's load is counted with every placement before it. A start that has not finished within
/// `ready_timeout` (its node died meanwhile) is placed again.
pub async fn place(
    pool: &PgPool,
    cfg: &ClusterConfig,
    user: &str,
    ready_timeout: Duration,
) -> anyhow::Result<Placement> {
    let db = Db::Postgres(pool.clone());
    let mut tx = pool.begin().await.context("starting the placement transaction")?;
    // 0x6d61726c ('marl'): the placement lock, held until the transaction ends.
    sqlx::query("SELECT pg_advisory_xact_lock(1835102828)")
        .execute(&mut *tx)
        .await
        .context("taking the placement lock")?;
    let timeout = cfg.node_timeout.as_secs_f64();
    let stale = ready_timeout.as_secs_f64() + 5.0;
    let current: Option<(String, Option<String>, bool, bool)> = sqlx::query_as(
        "SELECT w.state, w.node, coalesce(n.heartbeat > now() - make_interval(secs => $2), false), \
         w.updated_at > now() - make_interval(secs => $3) \
         FROM markco_workspaces w LEFT JOIN markco_nodes n ON n.id = w.node WHERE w.user_id = $1",
    )
    .bind(user)
    .bind(timeout)
    .bind(stale)
    .fetch_optional(&mut *tx)
    .await
    .with_context(|| format!("reading where the workspace of user {user} is"))?;
    if let Some((state, node, node_up, recent)) = &current {
        match (state.as_str(), node) {
            ("running", Some(_)) if *node_up => {
                if let Some(row) = db.get_workspace(user).await? {
                    return Ok(Placement::Running(row));
                }
            }
            ("starting", Some(n)) if *node_up && *recent => return Ok(Placement::Starting(n.clone())),
            _ => {}
        }
    }
    // Its data is on its node's disk only: it runs there again (room or not), or nowhere.
    let pinned = match &current {
        Some((_, Some(n), node_up, _)) if !cfg.shared_data => {
            if !*node_up {
                return Ok(Placement::Stranded(n.clone()));
            }
            Some(n.clone())
        }
        _ => None,
    };
    let pending: Option<(String, bool)> = sqlx::query_as(
        "SELECT p.node, coalesce(n.heartbeat > now() - make_interval(secs => $2), false) \
         AND p.at > now() - make_interval(secs => $3) \
         FROM markco_placements p LEFT JOIN markco_nodes n ON n.id = p.node WHERE p.user_id = $1",
    )
    .bind(user)
    .bind(timeout)
    .bind(stale)
    .fetch_optional(&mut *tx)
    .await
    .context("reading pending placements")?;
    if let Some((node, true)) = pending {
        return Ok(if node == cfg.node { Placement::Here } else { Placement::Starting(node) });
    }
    // The least loaded live node with room for one more of this user's plan; this node on a tie
    // (no hop). Load: workspaces running or starting there, and placements not started yet.
    let chosen: Option<String> = if let Some(n) = pinned {
        Some(n)
    } else {
        sqlx::query_scalar(
            "WITH placed AS ( \
           SELECT w.node, w.user_id FROM markco_workspaces w \
             WHERE w.state IN ('running', 'starting') AND w.node IS NOT NULL AND w.user_id <> $1 \
           UNION SELECT p.node, p.user_id FROM markco_placements p WHERE p.user_id <> $1), \
         load AS ( \
           SELECT x.node, count(*) AS total, \
                  count(*) FILTER (WHERE coalesce(u.plan, 'free') = $2) AS same_plan \
           FROM placed x LEFT JOIN users u ON u.id::text = x.user_id GROUP BY x.node) \
         SELECT n.id FROM markco_nodes n LEFT JOIN load l ON l.node = n.id \
         WHERE n.heartbeat > now() - make_interval(secs => $3) \
           AND coalesce(l.total, 0) < coalesce((n.capacity->>'*')::bigint, 9223372036854775807) \
           AND coalesce(l.same_plan, 0) < coalesce((n.capacity->>$2)::bigint, 9223372036854775807) \
         ORDER BY coalesce(l.total, 0), n.id = $4 DESC, n.id LIMIT 1",
        )
        .bind(user)
        .bind(db.user_plan(user).await?.unwrap_or_else(|| "free".to_string()))
        .bind(timeout)
        .bind(&cfg.node)
        .fetch_optional(&mut *tx)
        .await
        .context("choosing a node with room")?
    };
    let Some(node) = chosen else {
        return Ok(Placement::NoRoom);
    };
    sqlx::query(
        "INSERT INTO markco_placements (user_id, node, at) VALUES ($1, $2, now()) \
         ON CONFLICT (user_id) DO UPDATE SET node = excluded.node, at = now()",
    )
    .bind(user)
    .bind(&node)
    .execute(&mut *tx)
    .await
    .context("recording the placement")?;
    tx.commit().await.context("committing the placement")?;
    Ok(if node == cfg.node { Placement::Here } else { Placement::Starting(node) })
}

/// Whether `user`'s workspace is placed on `node` and not started yet.
pub async fn placement_pending(pool: &PgPool, node: &str, user: &str) -> anyhow::Result<bool> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM markco_placements WHERE user_id = $1 AND node = $2")
        .bind(user)
        .bind(node)
        .fetch_one(pool)
        .await
        .with_context(|| format!("reading the placement of user {user}"))?;
    Ok(n > 0)
}

/// A start placed on this node ended (either way): the placement goes.
pub async fn placement_done(pool: &PgPool, node: &str, user: &str) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM markco_placements WHERE user_id = $1 AND node = $2")
        .bind(user)
        .bind(node)
        .execute(pool)
        .await
        .with_context(|| format!("removing the placement of user {user}"))?;
    Ok(())
}

/// Marks `lost` the workspaces of every node whose heartbeat is older than `node_timeout`.
/// Any live gateway may run it; it is idempotent.
pub async fn mark_lost(pool: &PgPool, node_timeout: Duration) -> anyhow::Result<u64> {
    Ok(sqlx::query(
        "UPDATE markco_workspaces w SET state = 'lost', updated_at = now() FROM markco_nodes n \
         WHERE w.node = n.id AND n.heartbeat < now() - make_interval(secs => $1) \
           AND w.state IN ('running', 'starting')",
    )
    .bind(node_timeout.as_secs_f64())
    .execute(pool)
    .await
    .context("marking the workspaces of down nodes lost")?
    .rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;
    use markco_proxy::table::{RouteTable, UserRoutes};
    use std::net::SocketAddr;

    fn change(json: serde_json::Value) -> Change {
        serde_json::from_value(json).expect("a change the triggers write")
    }

    fn workspace(state: &str, runtime_port: u16) -> Change {
        change(serde_json::json!({
            "kind": "workspace", "user_id": "u", "editor_host": "127.0.0.1", "editor_port": 1000,
            "runtime_host": "127.0.0.1", "runtime_port": runtime_port, "state": state, "node": "gw-a",
        }))
    }

    #[test]
    fn changes_map_to_the_owners_commands() {
        let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let empty = RouteTable::empty();
        assert!(matches!(&commands(workspace("running", 2000), &empty)[..], [StateCommand::WorkspaceUp { .. }]));
        assert!(commands(workspace("starting", 2000), &empty).is_empty(), "a start is served once it runs");
        for s in ["stopped", "failed", "lost"] {
            assert!(matches!(&commands(workspace(s, 2000), &empty)[..], [StateCommand::WorkspaceDown { .. }]), "{s}");
        }
        assert!(commands(workspace("exploded", 2000), &empty).is_empty(), "an unknown state is skipped");

        let table = empty.with_user("u", UserRoutes::new(a(1000), a(2000), true));
        assert!(commands(workspace("running", 2000), &table).is_empty(), "the same addresses: nothing to do");
        match &commands(workspace("running", 2002), &table)[..] {
            [StateCommand::RuntimeMoved { user, runtime }] => assert_eq!((user.as_str(), *runtime), ("u", a(2002))),
            other => panic!("expected a runtime move, got {other:?}"),
        }
        let held = change(serde_json::json!({"kind": "route_held", "route": "sync", "holder": "admin", "since": 7}));
        assert!(matches!(&commands(held, &table)[..], [StateCommand::RouteHeld { since: 7, .. }]));
        let placed = change(serde_json::json!({"kind": "placed", "user_id": "u", "node": "gw-b"}));
        assert!(commands(placed, &table).is_empty(), "a placement is work for its node, not state");
    }

    #[test]
    fn a_log_row_that_does_not_parse_is_an_error_not_a_panic() {
        for bad in [
            serde_json::json!({"kind": "nonsense"}),
            serde_json::json!({"kind": "workspace", "user_id": "u"}),
            serde_json::json!({"kind": "workspace", "user_id": "u", "editor_host": "h", "editor_port": 70000,
                "runtime_host": "h", "runtime_port": 1, "state": "running"}),
            serde_json::json!([1, 2, 3]),
        ] {
            assert!(serde_json::from_value::<Change>(bad.clone()).is_err(), "{bad}");
        }
    }
}
