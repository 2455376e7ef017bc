//! The control plane's database: SQLite as the embedded default, PostgreSQL for production and for
//! several gateways sharing state (it adopts today's `markco` database, see `migrations/postgres`).
//!
//! A [`Db`] belongs to the control plane's tokio runtime; nothing on a request's path calls it.
//!
//! Representation decisions, the same on both backends as seen through this API:
//! - ids are uuid v4 strings (canonical lowercase); PostgreSQL stores them as `uuid` (today's
//!   columns), SQLite as TEXT. User ids that reach `runtimes` must therefore be UUIDs.
//! - times cross this API as unix seconds (`i64`). PostgreSQL stores `timestamptz` and compares
//!   with the server's `now()`; SQLite stores INTEGER unix seconds and compares with this
//!   process's clock.
//! - ports are `u16` here, `integer` in the database.

mod postgres;
mod sqlite;

use std::time::Duration;

use anyhow::anyhow;
use base64::Engine as _;
use futures_util::stream::BoxStream;
use markco_proxy::user_id::UserId;
use serde::{Deserialize, Serialize};

/// A handle on the control plane's database. Cheap to clone (it is a connection pool).
#[derive(Debug, Clone)]
pub enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// One user's workspace: where its editor and runtime listen. The routing table is rebuilt from
/// these rows after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceRow {
    pub user_id: String,
    pub editor_host: String,
    pub editor_port: u16,
    pub runtime_host: String,
    pub runtime_port: u16,
    /// Copied to the `runtimes` row.
    pub state: WorkspaceState,
    pub editor_container: Option<String>,
    pub runtime_container: Option<String>,
    /// Unix seconds.
    pub updated_at: i64,
    /// The `[cluster]` node whose podman runs the containers; `None`: a single gateway, or a
    /// workspace registered through the admin API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Where a workspace is in its life. Stored as text in `markco_workspaces.state` and
/// `runtimes.state`; [`WorkspaceState::as_str`] and its `FromStr` are the only mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkspaceState {
    Starting,
    Running,
    Stopped,
    Failed,
    /// `[cluster]`: its node stopped heartbeating; placed again at the next request.
    Lost,
}

impl WorkspaceState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkspaceState::Starting => "starting",
            WorkspaceState::Running => "running",
            WorkspaceState::Stopped => "stopped",
            WorkspaceState::Failed => "failed",
            WorkspaceState::Lost => "lost",
        }
    }
}

impl std::str::FromStr for WorkspaceState {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<WorkspaceState, anyhow::Error> {
        Ok(match s {
            "starting" => WorkspaceState::Starting,
            "running" => WorkspaceState::Running,
            "stopped" => WorkspaceState::Stopped,
            "failed" => WorkspaceState::Failed,
            "lost" => WorkspaceState::Lost,
            other => anyhow::bail!("unknown workspace state {other:?} (starting, running, stopped, failed, lost)"),
        })
    }
}

impl std::fmt::Display for WorkspaceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A runtime move (`update-port`) to record in today's `migrations` table.
#[derive(Debug, Clone)]
pub struct MoveRecord {
    pub user_id: String,
    /// "host:port" before the move.
    pub from: String,
    /// "host:port" after the move.
    pub to: String,
    /// "completed" or "failed: <why>".
    pub status: String,
    /// Time to probe the new target (stored as `checkpoint_ms`).
    pub probe_ms: i64,
    /// Time to tell the editor (stored as `restore_ms`).
    pub notify_ms: i64,
    /// Unix seconds.
    pub started_at: i64,
    /// Unix seconds.
    pub completed_at: i64,
}

/// A recorded runtime move as the operator sees it (`GET /api/admin/moves`): one row of today's
/// `migrations` table, markco's (`update-port`) and compute-manager's alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MoveRow {
    /// Unix seconds: when it completed, else when it started.
    pub at: Option<i64>,
    /// The user of the moved runtime (none if the runtime row is gone).
    pub user_id: Option<String>,
    pub from: String,
    pub to: String,
    pub status: Option<String>,
}

/// A [`MoveRow`] as both backends' queries return it.
type MoveTuple = (Option<i64>, Option<String>, String, String, Option<String>);

/// How many moves `GET /api/admin/moves` lists, newest first.
pub const RECENT_MOVES: i64 = 50;

/// What every [`Db`] call fails with. Callers match on it (never on an `anyhow` chain); the
/// control plane maps its kinds to HTTP statuses in one place (`PlaneError`).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Conflict: a user with this email exists (`users.email` is unique).
    #[error("a user with this email exists")]
    EmailExists,
    /// Conflict: another workspace holds this address (the unique address constraints); allocate
    /// another port.
    #[error("{kind} address {host}:{port} is already used by another workspace")]
    AddressInUse { kind: &'static str, host: String, port: u16 },
    /// Not found: no such user.
    #[error("no user {0}")]
    UnknownUser(String),
    /// Not found: the user has no workspace.
    #[error("no workspace for user {0}")]
    NoWorkspace(String),
    /// Invalid input: refused before any query.
    #[error("user id {0:?} is not a UUID in canonical form (lowercase, hyphenated)")]
    InvalidUserId(String),
    /// The database cannot be reached (stopped, restarting, network cut, pool out of connections):
    /// the same call may work again soon.
    #[error("the database is unavailable: {0:#}")]
    Unavailable(anyhow::Error),
    /// Anything else (a failed query, a corrupt row, a bad URL), with context.
    #[error(transparent)]
    Other(anyhow::Error),
}

/// The typed variants compare by value; an error that carries a cause (`Unavailable`, `Other`)
/// equals nothing, itself included.
impl PartialEq for DbError {
    fn eq(&self, other: &DbError) -> bool {
        use DbError::*;
        match (self, other) {
            (EmailExists, EmailExists) => true,
            (AddressInUse { kind: k1, host: h1, port: p1 }, AddressInUse { kind: k2, host: h2, port: p2 }) => {
                (k1, h1, p1) == (k2, h2, p2)
            }
            (UnknownUser(a), UnknownUser(b))
            | (NoWorkspace(a), NoWorkspace(b))
            | (InvalidUserId(a), InvalidUserId(b)) => a == b,
            _ => false,
        }
    }
}

/// What a caller does about a [`DbError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbErrorKind {
    Conflict,
    NotFound,
    Invalid,
    Unavailable,
    Internal,
}

impl DbError {
    pub fn kind(&self) -> DbErrorKind {
        match self {
            DbError::EmailExists | DbError::AddressInUse { .. } => DbErrorKind::Conflict,
            DbError::UnknownUser(_) | DbError::NoWorkspace(_) => DbErrorKind::NotFound,
            DbError::InvalidUserId(_) => DbErrorKind::Invalid,
            DbError::Unavailable(_) => DbErrorKind::Unavailable,
            DbError::Other(_) => DbErrorKind::Internal,
        }
    }
}

/// A failed query with its context: `Unavailable` when the cause is the connection, not the query.
/// The one place that looks into an error chain, for sqlx's own error type.
impl From<anyhow::Error> for DbError {
    fn from(e: anyhow::Error) -> DbError {
        if e.chain().any(|cause| cause.downcast_ref::<sqlx::Error>().is_some_and(is_connection_error)) {
            DbError::Unavailable(e)
        } else {
            DbError::Other(e)
        }
    }
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> DbError {
        DbError::from(anyhow::Error::new(e))
    }
}

/// The database unreachable rather than a query refused or failed.
fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed => true,
        // Class 08: connection exception; 57P01..03: the server is shutting down or starting.
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03"))
        }
        _ => false,
    }
}

/// What [`Db`] calls return.
pub type Result<T, E = DbError> = std::result::Result<T, E>;

impl Db {
    /// Opens a pool on `url`:
    /// - `sqlite://PATH` (relative to the process's working directory; `sqlite:///abs/path` for an
    ///   absolute one): creates the file and its parent directories if missing, WAL journal,
    ///   busy timeout 5 s, foreign keys on;
    /// - `sqlite::memory:`: a private in-memory database (one connection, gone when dropped);
    /// - `postgres://USER:PASSWORD@HOST:PORT/DATABASE` (or `postgresql://`): one probe connection
    ///   first, so a failure says what to fix (server not running, authentication, missing database).
    ///
    /// Does not migrate; call [`Db::migrate`].
    pub async fn connect(url: &str) -> Result<Db> {
        Db::connect_as(url, None).await
    }

    /// [`Db::connect`] for the `[cluster]` node `node`: on PostgreSQL its connections set
    /// `markco.node`, which the change log records with each change they write.
    pub async fn connect_as(url: &str, node: Option<&str>) -> Result<Db> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Db::Postgres(postgres::connect(url, node).await?))
        } else if url.starts_with("sqlite:") {
            Ok(Db::Sqlite(sqlite::connect(url).await?))
        } else {
            let scheme = url.split_once(':').map_or("(none)", |(scheme, _)| scheme);
            Err(DbError::Other(anyhow!(
                "unsupported database URL scheme {scheme:?}: use sqlite://PATH, sqlite::memory: or \
                 postgres://USER:PASSWORD@HOST:PORT/DATABASE"
            )))
        }
    }

    /// Runs the migrations embedded for this backend (`migrations/sqlite` or `migrations/postgres`).
    /// Idempotent; several gateways may run it at once on one PostgreSQL database (sqlx takes an
    /// advisory lock).
    pub async fn migrate(&self) -> Result<()> {
        match self {
            Db::Sqlite(pool) => sqlite::migrate(pool).await,
            Db::Postgres(pool) => postgres::migrate(pool).await,
        }
    }

    /// The PostgreSQL pool, for what only PostgreSQL does (`[cluster]`).
    pub fn postgres(&self) -> Option<&sqlx::PgPool> {
        match self {
            Db::Postgres(pool) => Some(pool),
            Db::Sqlite(_) => None,
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// Closes the pool, waiting for connections in use to come back.
    pub async fn close(&self) {
        match self {
            Db::Sqlite(pool) => pool.close().await,
            Db::Postgres(pool) => pool.close().await,
        }
    }

    /// The user of a valid session: a `sessions` row with this token, `expires_at` in the future,
    /// and an existing user.
    pub async fn session_user(&self, token: &str) -> Result<Option<String>> {
        match self {
            Db::Sqlite(pool) => sqlite::session_user(pool, token).await,
            Db::Postgres(pool) => postgres::session_user(pool, token).await,
        }
    }

    /// Creates a user (id: uuid v4; plan 'free'). [`DbError::EmailExists`] if the email is taken.
    pub async fn create_user(&self, email: &str) -> Result<String> {
        let id = new_id();
        match self {
            Db::Sqlite(pool) => sqlite::create_user(pool, &id, email).await?,
            Db::Postgres(pool) => postgres::create_user(pool, &id, email).await?,
        }
        Ok(id)
    }

    pub async fn user_by_email(&self, email: &str) -> Result<Option<String>> {
        match self {
            Db::Sqlite(pool) => sqlite::user_by_email(pool, email).await,
            Db::Postgres(pool) => postgres::user_by_email(pool, email).await,
        }
    }

    /// The user's plan (`users.plan`), when the user exists and has one.
    pub async fn user_plan(&self, user_id: &str) -> Result<Option<String>> {
        match self {
            Db::Sqlite(pool) => sqlite::user_plan(pool, user_id).await,
            Db::Postgres(pool) => postgres::user_plan(pool, user_id).await,
        }
    }

    /// A new session for `user_id`, valid for `ttl`. The token is 32 random bytes from the OS's
    /// CSPRNG, base64url without padding (43 characters).
    pub async fn create_session(&self, user_id: &str, ttl: Duration) -> Result<String> {
        check_user_id(user_id)?;
        let token = new_token()?;
        let id = new_id();
        match self {
            Db::Sqlite(pool) => sqlite::create_session(pool, &id, user_id, &token, ttl).await?,
            Db::Postgres(pool) => postgres::create_session(pool, &id, user_id, &token, ttl).await?,
        }
        Ok(token)
    }

    /// Deletes a session; true if it existed. On PostgreSQL every gateway hears of it through
    /// [`Db::session_changes`].
    pub async fn delete_session(&self, token: &str) -> Result<bool> {
        match self {
            Db::Sqlite(pool) => sqlite::delete_session(pool, token).await,
            Db::Postgres(pool) => postgres::delete_session(pool, token).await,
        }
    }

    /// Every workspace, ordered by user id.
    pub async fn list_workspaces(&self) -> Result<Vec<WorkspaceRow>> {
        match self {
            Db::Sqlite(pool) => sqlite::list_workspaces(pool).await,
            Db::Postgres(pool) => postgres::list_workspaces(pool).await,
        }
    }

    pub async fn get_workspace(&self, user_id: &str) -> Result<Option<WorkspaceRow>> {
        match self {
            Db::Sqlite(pool) => sqlite::get_workspace(pool, user_id).await,
            Db::Postgres(pool) => postgres::get_workspace(pool, user_id).await,
        }
    }

    /// Inserts or replaces the user's workspace (`updated_at` stored as given), in one transaction
    /// with the `runtimes` row of its runtime: that row is updated in place (container name, host,
    /// port, state) while it describes the same container; when `runtime_container` names another
    /// container, the old row is marked 'stopped' and a new row is created, as compute-manager did.
    /// [`DbError::AddressInUse`] if another workspace holds the editor or runtime address.
    pub async fn upsert_workspace(&self, row: &WorkspaceRow) -> Result<()> {
        check_user_id(&row.user_id)?;
        match self {
            Db::Sqlite(pool) => sqlite::upsert_workspace(pool, row).await,
            Db::Postgres(pool) => postgres::upsert_workspace(pool, row).await,
        }
    }

    /// Deletes the user's workspace; true if it existed. Its `runtimes` row is kept (moves refer to
    /// it) and marked 'stopped'.
    pub async fn delete_workspace(&self, user_id: &str) -> Result<bool> {
        match self {
            Db::Sqlite(pool) => sqlite::delete_workspace(pool, user_id).await,
            Db::Postgres(pool) => postgres::delete_workspace(pool, user_id).await,
        }
    }

    /// Moves the user's runtime to `host:port` (the workspace row and its `runtimes` row; nothing
    /// else changes). Persisted, so it survives a restart. [`DbError::NoWorkspace`] if the user has
    /// no workspace, [`DbError::AddressInUse`] if another workspace's runtime is there.
    pub async fn set_runtime(&self, user_id: &str, host: &str, port: u16) -> Result<()> {
        match self {
            Db::Sqlite(pool) => sqlite::set_runtime(pool, user_id, host, port).await,
            Db::Postgres(pool) => postgres::set_runtime(pool, user_id, host, port).await,
        }
    }

    /// Records a runtime move in today's `migrations` table, referencing the workspace's `runtimes`
    /// row: from/to_instance "host:port", from/to_type "local", strategy "update-port",
    /// checkpoint_ms = probe time, transfer_ms = 0, restore_ms = editor-notify time.
    /// [`DbError::NoWorkspace`] if the user has no workspace (with a runtime row).
    pub async fn record_move(&self, m: &MoveRecord) -> Result<()> {
        let id = new_id();
        match self {
            Db::Sqlite(pool) => sqlite::record_move(pool, &id, m).await,
            Db::Postgres(pool) => postgres::record_move(pool, &id, m).await,
        }
    }

    /// How many moves (`migrations` rows) the user's runtimes have had, including the ones
    /// compute-manager recorded before markco.
    /// PostgreSQL: completed moves of the user's runtime that started within the last `window`,
    /// through any gateway (the `[cluster]` move loop guard). `None` on SQLite (one gateway: the
    /// in-memory guard is the whole truth).
    pub async fn count_recent_moves(&self, user_id: &str, window: Duration) -> Result<Option<i64>> {
        if !UserId::is_valid(user_id) {
            return Ok(Some(0));
        }
        match self {
            Db::Sqlite(_) => Ok(None),
            Db::Postgres(pool) => postgres::count_recent_moves(pool, user_id, window).await.map(Some),
        }
    }

    pub async fn count_moves(&self, user_id: &str) -> Result<i64> {
        if !UserId::is_valid(user_id) {
            return Ok(0);
        }
        match self {
            Db::Sqlite(pool) => sqlite::count_moves(pool, user_id).await,
            Db::Postgres(pool) => postgres::count_moves(pool, user_id).await,
        }
    }

    /// The latest [`RECENT_MOVES`] runtime moves, newest first.
    pub async fn recent_moves(&self) -> Result<Vec<MoveRow>> {
        let rows = match self {
            Db::Sqlite(pool) => sqlite::recent_moves(pool, RECENT_MOVES).await?,
            Db::Postgres(pool) => postgres::recent_moves(pool, RECENT_MOVES).await?,
        };
        Ok(rows.into_iter().map(|(at, user_id, from, to, status)| MoveRow { at, user_id, from, to, status }).collect())
    }

    /// Stores `holder`'s hold of `route` (unix seconds `since`); an existing hold keeps its time.
    pub async fn hold_route(&self, route: &str, holder: &str, since: i64) -> Result<()> {
        match self {
            Db::Sqlite(pool) => sqlite::hold_route(pool, route, holder, since).await,
            Db::Postgres(pool) => postgres::hold_route(pool, route, holder, since).await,
        }
    }

    /// Removes `holder`'s hold of `route`; true if there was one.
    pub async fn release_route(&self, route: &str, holder: &str) -> Result<bool> {
        match self {
            Db::Sqlite(pool) => sqlite::release_route(pool, route, holder).await,
            Db::Postgres(pool) => postgres::release_route(pool, route, holder).await,
        }
    }

    /// Every stored route hold: (route, holder, since in unix seconds).
    pub async fn route_holds(&self) -> Result<Vec<(String, String, i64)>> {
        match self {
            Db::Sqlite(pool) => sqlite::route_holds(pool).await,
            Db::Postgres(pool) => postgres::route_holds(pool).await,
        }
    }

    /// PostgreSQL only (`None` on SQLite, where this process is the only writer): the tokens of
    /// sessions deleted or updated by anyone (logout, account deletion, the auth service), from
    /// `LISTEN markco_sessions`, fed by a trigger on `sessions`.
    ///
    /// The stream holds one pooled connection for as long as it lives and ends when the pool is
    /// closed. A lost connection is re-established (by `PgListener`, or here after an error, retried
    /// every second); notifications sent while it was down are lost, which the session cache's TTL
    /// covers: a cached session outlives its deletion by at most one TTL.
    pub async fn session_changes(&self) -> Result<Option<BoxStream<'static, String>>> {
        match self {
            Db::Sqlite(_) => Ok(None),
            Db::Postgres(pool) => Ok(Some(postgres::session_changes(pool).await?)),
        }
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn new_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| DbError::Other(anyhow!("cannot get random bytes from the OS: {e}")))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The one user-id rule ([`UserId`]), also the gateway's and the admin API's.
fn check_user_id(user_id: &str) -> Result<(), DbError> {
    UserId::parse(user_id).map(|_| ()).map_err(|_| DbError::InvalidUserId(user_id.to_owned()))
}

/// Milliseconds as stored in today's `integer` columns (saturating).
fn ms_i32(ms: i64) -> i32 {
    i32::try_from(ms.max(0)).unwrap_or(i32::MAX)
}

/// Whether the workspace's existing `runtimes` row (for container `old`) still describes its
/// runtime (container `new`); an empty name means "not known".
fn same_runtime(old: &str, new: &str) -> bool {
    old == new || old.is_empty() || new.is_empty()
}

/// The columns of `markco_workspaces` as both backends select them.
type WorkspaceTuple = (String, String, i64, String, i64, String, Option<String>, Option<String>, i64, Option<String>);

fn workspace_from_tuple(t: WorkspaceTuple) -> Result<WorkspaceRow> {
    let (
        user_id,
        editor_host,
        editor_port,
        runtime_host,
        runtime_port,
        state,
        editor_container,
        runtime_container,
        updated_at,
        node,
    ) = t;
    let port = |p: i64, what: &str| {
        u16::try_from(p)
            .map_err(|_| DbError::Other(anyhow!("workspace of user {user_id} has an invalid {what} port {p}")))
    };
    let state =
        state.parse().map_err(|e: anyhow::Error| DbError::Other(e.context(format!("workspace of user {user_id}"))))?;
    Ok(WorkspaceRow {
        editor_port: port(editor_port, "editor")?,
        runtime_port: port(runtime_port, "runtime")?,
        user_id,
        editor_host,
        runtime_host,
        state,
        editor_container,
        runtime_container,
        updated_at,
        node,
    })
}

/// Maps a unique violation of `markco_workspaces`' address constraints to
/// [`DbError::AddressInUse`]; any other error gets `context`.
fn address_conflict(err: sqlx::Error, editor: Option<(&str, u16)>, runtime: (&str, u16), context: String) -> DbError {
    if let Some(db_err) = err.as_database_error() {
        if db_err.is_unique_violation() {
            // PostgreSQL names the constraint; SQLite says "UNIQUE constraint failed: t.editor_host, ...".
            let what = format!("{} {}", db_err.constraint().unwrap_or(""), db_err.message());
            let (kind, (host, port)) = match editor {
                Some(editor) if what.contains("editor") => ("editor", editor),
                _ => ("runtime", runtime),
            };
            return DbError::AddressInUse { kind, host: host.to_owned(), port };
        }
    }
    DbError::from(anyhow::Error::new(err).context(context))
}

/// Maps the unique violation of `users.email` to [`DbError::EmailExists`].
fn user_insert_error(err: sqlx::Error, email: &str) -> DbError {
    match err.as_database_error() {
        Some(db_err) if db_err.is_unique_violation() => DbError::EmailExists,
        _ => DbError::from(anyhow::Error::new(err).context(format!("creating user {email}"))),
    }
}

/// Maps a foreign-key violation on `sessions.user_id` to [`DbError::UnknownUser`].
fn session_insert_error(err: sqlx::Error, user_id: &str) -> DbError {
    match err.as_database_error() {
        Some(db_err) if db_err.is_foreign_key_violation() => DbError::UnknownUser(user_id.to_owned()),
        _ => DbError::from(anyhow::Error::new(err).context(format!("creating a session for user {user_id}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_states_map_to_one_text_each_and_back() {
        use WorkspaceState::*;
        for state in [Starting, Running, Stopped, Failed] {
            assert_eq!(state.as_str().parse::<WorkspaceState>().ok(), Some(state));
            assert_eq!(serde_json::to_value(state).ok(), Some(serde_json::json!(state.as_str())));
        }
        assert!("Running".parse::<WorkspaceState>().is_err());
        assert!("".parse::<WorkspaceState>().is_err());
    }
}
