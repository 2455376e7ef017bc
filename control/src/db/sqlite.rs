//! SQLite queries. Times are INTEGER unix seconds from this process's clock; write transactions
//! start with `BEGIN IMMEDIATE` so they queue on the busy timeout instead of failing with
//! SQLITE_BUSY when they would upgrade a read lock.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use super::{
    address_conflict, ms_i32, now_unix, same_runtime, session_insert_error, user_insert_error, workspace_from_tuple,
    DbError, MoveRecord, Result, WorkspaceRow, WorkspaceTuple,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) async fn connect(url: &str) -> Result<SqlitePool> {
    let rest = url.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
    let (path, params) = rest.split_once('?').unwrap_or((rest, ""));
    let in_memory = path == ":memory:" || params.split('&').any(|p| p == "mode=memory");
    if path.is_empty() && !in_memory {
        return Err(DbError::Other(anyhow::anyhow!(
            "the SQLite URL {url:?} names no file: use sqlite://PATH (e.g. sqlite://data/markco.db)"
        )));
    }
    let options = SqliteConnectOptions::from_str(url)
        .with_context(|| format!("invalid SQLite URL {url:?}: use sqlite://PATH or sqlite::memory:"))?
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT);

    if in_memory {
        // Every connection to `:memory:` would be its own database: keep exactly one, for ever.
        return SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .context("cannot open an in-memory SQLite database")
            .map_err(DbError::from);
    }

    let options =
        options.create_if_missing(true).journal_mode(SqliteJournalMode::Wal).synchronous(SqliteSynchronous::Normal);
    let file = options.get_filename().to_path_buf();
    if let Some(dir) = file.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create the directory {} for the SQLite database: fix its permissions or choose another \
                 path in the database URL",
                dir.display()
            )
        })?;
    }
    SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .with_context(|| {
            format!("cannot open the SQLite database {}: check that it is a writable SQLite file", file.display())
        })
        .map_err(DbError::from)
}

pub(super) async fn migrate(pool: &SqlitePool) -> Result<()> {
    MIGRATOR.run(pool).await.context("running the SQLite migrations (migrations/sqlite)").map_err(DbError::from)
}

pub(super) async fn session_user(pool: &SqlitePool, token: &str) -> Result<Option<String>> {
    sqlx::query_scalar(
        "SELECT s.user_id FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.token = ?1 AND s.expires_at > ?2",
    )
    .bind(token)
    .bind(now_unix())
    .fetch_optional(pool)
    .await
    .context("looking up a session")
    .map_err(DbError::from)
}

pub(super) async fn create_user(pool: &SqlitePool, id: &str, email: &str) -> Result<()> {
    sqlx::query("INSERT INTO users (id, email, plan, created_at) VALUES (?1, ?2, 'free', ?3)")
        .bind(id)
        .bind(email)
        .bind(now_unix())
        .execute(pool)
        .await
        .map_err(|e| user_insert_error(e, email))?;
    Ok(())
}

pub(super) async fn user_by_email(pool: &SqlitePool, email: &str) -> Result<Option<String>> {
    sqlx::query_scalar("SELECT id FROM users WHERE email = ?1")
        .bind(email)
        .fetch_optional(pool)
        .await
        .with_context(|| format!("looking up user {email}"))
        .map_err(DbError::from)
}

pub(super) async fn user_plan(pool: &SqlitePool, user_id: &str) -> Result<Option<String>> {
    let plan: Option<Option<String>> = sqlx::query_scalar("SELECT plan FROM users WHERE id = ?1")
        .bind(user_id)
        .fetch_optional(pool)
        .await
        .with_context(|| format!("looking up the plan of user {user_id}"))?;
    Ok(plan.flatten())
}

pub(super) async fn create_session(
    pool: &SqlitePool,
    id: &str,
    user_id: &str,
    token: &str,
    ttl: Duration,
) -> Result<()> {
    let now = now_unix();
    let expires_at = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
    sqlx::query("INSERT INTO sessions (id, user_id, token, expires_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5)")
        .bind(id)
        .bind(user_id)
        .bind(token)
        .bind(expires_at)
        .bind(now)
        .execute(pool)
        .await
        .map_err(|e| session_insert_error(e, user_id))?;
    Ok(())
}

pub(super) async fn delete_session(pool: &SqlitePool, token: &str) -> Result<bool> {
    let done = sqlx::query("DELETE FROM sessions WHERE token = ?1")
        .bind(token)
        .execute(pool)
        .await
        .context("deleting a session")?;
    Ok(done.rows_affected() > 0)
}

const WORKSPACE_COLUMNS: &str = "user_id, editor_host, editor_port, runtime_host, runtime_port, state, \
                                 editor_container, runtime_container, updated_at, node";

pub(super) async fn list_workspaces(pool: &SqlitePool) -> Result<Vec<WorkspaceRow>> {
    let rows: Vec<WorkspaceTuple> =
        sqlx::query_as(&format!("SELECT {WORKSPACE_COLUMNS} FROM markco_workspaces ORDER BY user_id"))
            .fetch_all(pool)
            .await
            .context("listing workspaces")?;
    rows.into_iter().map(workspace_from_tuple).collect()
}

pub(super) async fn get_workspace(pool: &SqlitePool, user_id: &str) -> Result<Option<WorkspaceRow>> {
    let row: Option<WorkspaceTuple> =
        sqlx::query_as(&format!("SELECT {WORKSPACE_COLUMNS} FROM markco_workspaces WHERE user_id = ?1"))
            .bind(user_id)
            .fetch_optional(pool)
            .await
            .with_context(|| format!("reading the workspace of user {user_id}"))?;
    row.map(workspace_from_tuple).transpose()
}

pub(super) async fn upsert_workspace(pool: &SqlitePool, row: &WorkspaceRow) -> Result<()> {
    let user = &row.user_id;
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.context("starting a transaction")?;
    let runtime_id: Option<String> = sqlx::query_scalar(
        "INSERT INTO markco_workspaces (user_id, editor_host, editor_port, runtime_host, runtime_port, state, \
         editor_container, runtime_container, updated_at, node) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
         ON CONFLICT (user_id) DO UPDATE SET editor_host = excluded.editor_host, \
         editor_port = excluded.editor_port, runtime_host = excluded.runtime_host, \
         runtime_port = excluded.runtime_port, state = excluded.state, \
         editor_container = excluded.editor_container, runtime_container = excluded.runtime_container, \
         updated_at = excluded.updated_at, node = excluded.node RETURNING runtime_id",
    )
    .bind(user)
    .bind(&row.editor_host)
    .bind(row.editor_port)
    .bind(&row.runtime_host)
    .bind(row.runtime_port)
    .bind(row.state.as_str())
    .bind(&row.editor_container)
    .bind(&row.runtime_container)
    .bind(row.updated_at)
    .bind(&row.node)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| {
        address_conflict(
            e,
            Some((&row.editor_host, row.editor_port)),
            (&row.runtime_host, row.runtime_port),
            format!("saving the workspace of user {user}"),
        )
    })?;

    let now = now_unix();
    let container = row.runtime_container.as_deref().unwrap_or("");
    let current: Option<(String, String)> = match runtime_id {
        Some(id) => sqlx::query_as("SELECT id, container_name FROM runtimes WHERE id = ?1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .context("reading the workspace's runtime")?,
        None => None,
    };
    match current {
        Some((id, old)) if same_runtime(&old, container) => {
            sqlx::query(
                "UPDATE runtimes SET container_name = CASE WHEN ?2 = '' THEN container_name ELSE ?2 END, \
                 host = ?3, port = ?4, state = ?5, updated_at = ?6 WHERE id = ?1",
            )
            .bind(id)
            .bind(container)
            .bind(&row.runtime_host)
            .bind(row.runtime_port)
            .bind(row.state.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await
            .context("updating the workspace's runtime")?;
        }
        replaced => {
            if let Some((old_id, _)) = replaced {
                sqlx::query("UPDATE runtimes SET state = 'stopped', updated_at = ?2 WHERE id = ?1")
                    .bind(old_id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .context("marking the replaced runtime stopped")?;
            }
            let id = super::new_id();
            sqlx::query(
                "INSERT INTO runtimes (id, user_id, container_name, instance_type, host, port, state, created_at, \
                 updated_at) VALUES (?1, ?2, ?3, 'local', ?4, ?5, ?6, ?7, ?7)",
            )
            .bind(&id)
            .bind(user)
            .bind(container)
            .bind(&row.runtime_host)
            .bind(row.runtime_port)
            .bind(row.state.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await
            .context("recording the workspace's runtime")?;
            sqlx::query("UPDATE markco_workspaces SET runtime_id = ?2 WHERE user_id = ?1")
                .bind(user)
                .bind(&id)
                .execute(&mut *tx)
                .await
                .context("linking the workspace to its runtime")?;
        }
    }
    tx.commit().await.context("committing the workspace").map_err(DbError::from)
}

pub(super) async fn delete_workspace(pool: &SqlitePool, user_id: &str) -> Result<bool> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.context("starting a transaction")?;
    let deleted: Option<Option<String>> =
        sqlx::query_scalar("DELETE FROM markco_workspaces WHERE user_id = ?1 RETURNING runtime_id")
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await
            .with_context(|| format!("deleting the workspace of user {user_id}"))?;
    if let Some(Some(runtime_id)) = &deleted {
        sqlx::query("UPDATE runtimes SET state = 'stopped', updated_at = ?2 WHERE id = ?1")
            .bind(runtime_id)
            .bind(now_unix())
            .execute(&mut *tx)
            .await
            .context("marking the workspace's runtime stopped")?;
    }
    tx.commit().await.context("committing the workspace deletion")?;
    Ok(deleted.is_some())
}

pub(super) async fn set_runtime(pool: &SqlitePool, user_id: &str, host: &str, port: u16) -> Result<()> {
    let now = now_unix();
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.context("starting a transaction")?;
    let runtime_id: Option<Option<String>> = sqlx::query_scalar(
        "UPDATE markco_workspaces SET runtime_host = ?2, runtime_port = ?3, updated_at = ?4 WHERE user_id = ?1 \
         RETURNING runtime_id",
    )
    .bind(user_id)
    .bind(host)
    .bind(port)
    .bind(now)
    .fetch_optional(&mut *tx)
    .await
    .map_err(|e| address_conflict(e, None, (host, port), format!("moving the runtime of user {user_id}")))?;
    let Some(runtime_id) = runtime_id else {
        return Err(DbError::NoWorkspace(user_id.to_owned()));
    };
    if let Some(runtime_id) = runtime_id {
        sqlx::query("UPDATE runtimes SET host = ?2, port = ?3, updated_at = ?4 WHERE id = ?1")
            .bind(runtime_id)
            .bind(host)
            .bind(port)
            .bind(now)
            .execute(&mut *tx)
            .await
            .context("moving the runtime row")?;
    }
    tx.commit().await.context("committing the runtime move").map_err(DbError::from)
}

pub(super) async fn record_move(pool: &SqlitePool, id: &str, m: &MoveRecord) -> Result<()> {
    let done = sqlx::query(
        "INSERT INTO migrations (id, runtime_id, from_instance, to_instance, from_type, to_type, strategy, status, \
         checkpoint_ms, transfer_ms, restore_ms, started_at, completed_at) \
         SELECT ?1, w.runtime_id, ?3, ?4, 'local', 'local', 'update-port', ?5, ?6, 0, ?7, ?8, ?9 \
         FROM markco_workspaces w WHERE w.user_id = ?2 AND w.runtime_id IS NOT NULL",
    )
    .bind(id)
    .bind(&m.user_id)
    .bind(&m.from)
    .bind(&m.to)
    .bind(&m.status)
    .bind(ms_i32(m.probe_ms))
    .bind(ms_i32(m.notify_ms))
    .bind(m.started_at)
    .bind(m.completed_at)
    .execute(pool)
    .await
    .with_context(|| format!("recording a runtime move of user {}", m.user_id))?;
    if done.rows_affected() == 0 {
        return Err(DbError::NoWorkspace(m.user_id.clone()));
    }
    Ok(())
}

pub(super) async fn count_moves(pool: &SqlitePool, user_id: &str) -> Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM migrations m JOIN runtimes r ON r.id = m.runtime_id WHERE r.user_id = ?1")
        .bind(user_id)
        .fetch_one(pool)
        .await
        .with_context(|| format!("counting the runtime moves of user {user_id}"))
        .map_err(DbError::from)
}

pub(super) async fn recent_moves(pool: &SqlitePool, limit: i64) -> Result<Vec<super::MoveTuple>> {
    sqlx::query_as(
        "SELECT coalesce(m.completed_at, m.started_at), r.user_id, m.from_instance, m.to_instance, m.status \
         FROM migrations m LEFT JOIN runtimes r ON r.id = m.runtime_id \
         ORDER BY coalesce(m.completed_at, m.started_at) DESC, m.rowid DESC LIMIT ?1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("listing the latest runtime moves")
    .map_err(DbError::from)
}

pub(super) async fn hold_route(pool: &SqlitePool, route: &str, holder: &str, since: i64) -> Result<()> {
    // A hold already there keeps its first `since`.
    sqlx::query("INSERT INTO markco_route_holds (route, holder, since) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING")
        .bind(route)
        .bind(holder)
        .bind(since)
        .execute(pool)
        .await
        .with_context(|| format!("storing the {holder} hold of route {route}"))?;
    Ok(())
}

pub(super) async fn release_route(pool: &SqlitePool, route: &str, holder: &str) -> Result<bool> {
    let done = sqlx::query("DELETE FROM markco_route_holds WHERE route = ?1 AND holder = ?2")
        .bind(route)
        .bind(holder)
        .execute(pool)
        .await
        .with_context(|| format!("removing the {holder} hold of route {route}"))?;
    Ok(done.rows_affected() > 0)
}

pub(super) async fn route_holds(pool: &SqlitePool) -> Result<Vec<(String, String, i64)>> {
    sqlx::query_as("SELECT route, holder, since FROM markco_route_holds ORDER BY route, holder")
        .fetch_all(pool)
        .await
        .context("reading the route holds")
        .map_err(DbError::from)
}
