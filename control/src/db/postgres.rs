//! PostgreSQL queries, on today's `markco` schema: ids are `uuid` (bound as text and cast), times
//! are `timestamptz` compared with the server's `now()` (one clock for every gateway).

use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, Context};
use futures_util::stream::{BoxStream, StreamExt};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};

use super::{
    address_conflict, ms_i32, same_runtime, session_insert_error, user_insert_error, workspace_from_tuple, DbError,
    MoveRecord, Result, WorkspaceRow, WorkspaceTuple,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// Channel of the `sessions` trigger (migrations/postgres/0003_sessions_notify.sql).
const SESSIONS_CHANNEL: &str = "markco_sessions";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a query waits for a connection. Short, so that while the database is unreachable an
/// admin call answers 503 in seconds instead of hanging (the pool retries connecting meanwhile).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest session TTL we pass to `make_interval` (100 years), far below its range limit.
const MAX_TTL_SECS: f64 = 100.0 * 365.0 * 86_400.0;

pub(super) async fn connect(url: &str, node: Option<&str>) -> Result<PgPool> {
    let mut options = PgConnectOptions::from_str(url)
        .map_err(|e| anyhow!("invalid PostgreSQL URL ({e}): use postgres://USER:PASSWORD@HOST:PORT/DATABASE"))?;
    if let Some(node) = node {
        // Read by markco_log_change() (migrations/postgres/0005_cluster.sql).
        options = options.options([("markco.node", node)]);
    }
    let target = describe(&options);

    // One connection first: the pool would retry a refused connection until its timeout and then
    // report only "timed out".
    let probe = tokio::time::timeout(CONNECT_TIMEOUT, options.connect())
        .await
        .map_err(|_| {
            anyhow!(
                "timed out after {}s connecting to PostgreSQL at {target}: is the host reachable and PostgreSQL \
                 running there?",
                CONNECT_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| explain_connect_error(e, &options))?;
    // The probe has done its job; a failure to say goodbye is no reason to fail.
    let _ = probe.close().await;

    PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options.clone())
        .await
        .map_err(|e| explain_connect_error(e, &options))
        .map_err(DbError::from)
}

/// "user@host:port/database", never the password.
fn describe(options: &PgConnectOptions) -> String {
    format!(
        "{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or(options.get_username())
    )
}

fn explain_connect_error(err: sqlx::Error, options: &PgConnectOptions) -> anyhow::Error {
    let target = describe(options);
    let hint = match &err {
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!("cannot connect to PostgreSQL at {target}: connection refused; is PostgreSQL running and listening there?")
        }
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => {
            format!("cannot connect to PostgreSQL at {target}: is the host right and PostgreSQL running there?")
        }
        sqlx::Error::Tls(_) => {
            format!("TLS with PostgreSQL at {target} failed: check sslmode/sslrootcert in the database URL")
        }
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01") | Some("28000") => format!(
                "authentication failed for PostgreSQL user {:?} at {target}: check the user and password in the \
                 database URL (and pg_hba.conf)",
                options.get_username()
            ),
            Some("3D000") => format!(
                "database {:?} does not exist at {target}: create it (createdb {0:?}) or fix the database URL",
                options.get_database().unwrap_or(options.get_username())
            ),
            Some("57P03") => format!("PostgreSQL at {target} is starting up or shutting down: try again in a moment"),
            _ => format!("cannot connect to PostgreSQL at {target}"),
        },
        _ => format!("cannot connect to PostgreSQL at {target}"),
    };
    anyhow::Error::new(err).context(hint)
}

pub(super) async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await.context("running the PostgreSQL migrations (migrations/postgres)").map_err(DbError::from)
}

pub(super) async fn session_user(pool: &PgPool, token: &str) -> Result<Option<String>> {
    sqlx::query_scalar(
        "SELECT s.user_id::text FROM sessions s JOIN users u ON u.id = s.user_id \
         WHERE s.token = $1 AND s.expires_at > now()",
    )
    .bind(token)
    .fetch_optional(pool)
    .await
    .context("looking up a session")
    .map_err(DbError::from)
}

pub(super) async fn create_user(pool: &PgPool, id: &str, email: &str) -> Result<()> {
    sqlx::query("INSERT INTO users (id, email, plan, created_at) VALUES ($1::uuid, $2, 'free', now())")
        .bind(id)
        .bind(email)
        .execute(pool)
        .await
        .map_err(|e| user_insert_error(e, email))?;
    Ok(())
}

pub(super) async fn user_by_email(pool: &PgPool, email: &str) -> Result<Option<String>> {
    sqlx::query_scalar("SELECT id::text FROM users WHERE email = $1")
        .bind(email)
        .fetch_optional(pool)
        .await
        .with_context(|| format!("looking up user {email}"))
        .map_err(DbError::from)
}

pub(super) async fn user_plan(pool: &PgPool, user_id: &str) -> Result<Option<String>> {
    let plan: Option<Option<String>> = sqlx::query_scalar("SELECT plan FROM users WHERE id::text = $1")
        .bind(user_id)
        .fetch_optional(pool)
        .await
        .with_context(|| format!("looking up the plan of user {user_id}"))?;
    Ok(plan.flatten())
}

pub(super) async fn create_session(pool: &PgPool, id: &str, user_id: &str, token: &str, ttl: Duration) -> Result<()> {
    sqlx::query(
        "INSERT INTO sessions (id, user_id, token, expires_at, created_at) \
         VALUES ($1::uuid, $2::uuid, $3, now() + make_interval(secs => $4), now())",
    )
    .bind(id)
    .bind(user_id)
    .bind(token)
    .bind(ttl.as_secs_f64().min(MAX_TTL_SECS))
    .execute(pool)
    .await
    .map_err(|e| session_insert_error(e, user_id))?;
    Ok(())
}

pub(super) async fn delete_session(pool: &PgPool, token: &str) -> Result<bool> {
    let done = sqlx::query("DELETE FROM sessions WHERE token = $1")
        .bind(token)
        .execute(pool)
        .await
        .context("deleting a session")?;
    Ok(done.rows_affected() > 0)
}

const WORKSPACE_COLUMNS: &str = "user_id, editor_host, editor_port::int8, runtime_host, runtime_port::int8, state, \
                                 editor_container, runtime_container, floor(extract(epoch FROM updated_at))::int8, node";

pub(super) async fn list_workspaces(pool: &PgPool) -> Result<Vec<WorkspaceRow>> {
    let rows: Vec<WorkspaceTuple> =
        sqlx::query_as(&format!("SELECT {WORKSPACE_COLUMNS} FROM markco_workspaces ORDER BY user_id"))
            .fetch_all(pool)
            .await
            .context("listing workspaces")?;
    rows.into_iter().map(workspace_from_tuple).collect()
}

pub(super) async fn get_workspace(pool: &PgPool, user_id: &str) -> Result<Option<WorkspaceRow>> {
    let row: Option<WorkspaceTuple> =
        sqlx::query_as(&format!("SELECT {WORKSPACE_COLUMNS} FROM markco_workspaces WHERE user_id = $1"))
            .bind(user_id)
            .fetch_optional(pool)
            .await
            .with_context(|| format!("reading the workspace of user {user_id}"))?;
    row.map(workspace_from_tuple).transpose()
}

pub(super) async fn upsert_workspace(pool: &PgPool, row: &WorkspaceRow) -> Result<()> {
    let user = &row.user_id;
    let mut tx = pool.begin().await.context("starting a transaction")?;
    // The upsert locks the workspace row, so concurrent upserts of one user queue here and the
    // second one sees the runtime row the first one linked.
    let runtime_id: Option<String> = sqlx::query_scalar(
        "INSERT INTO markco_workspaces (user_id, editor_host, editor_port, runtime_host, runtime_port, state, \
         editor_container, runtime_container, updated_at, node) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, to_timestamp($9::float8), $10) \
         ON CONFLICT (user_id) DO UPDATE SET editor_host = excluded.editor_host, \
         editor_port = excluded.editor_port, runtime_host = excluded.runtime_host, \
         runtime_port = excluded.runtime_port, state = excluded.state, \
         editor_container = excluded.editor_container, runtime_container = excluded.runtime_container, \
         updated_at = excluded.updated_at, node = excluded.node RETURNING runtime_id::text",
    )
    .bind(user)
    .bind(&row.editor_host)
    .bind(i32::from(row.editor_port))
    .bind(&row.runtime_host)
    .bind(i32::from(row.runtime_port))
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

    let container = row.runtime_container.as_deref().unwrap_or("");
    let current: Option<(String, String)> = match runtime_id {
        Some(id) => sqlx::query_as("SELECT id::text, container_name FROM runtimes WHERE id = $1::uuid")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .context("reading the workspace's runtime")?,
        None => None,
    };
    match current {
        Some((id, old)) if same_runtime(&old, container) => {
            sqlx::query(
                "UPDATE runtimes SET container_name = CASE WHEN $2 = '' THEN container_name ELSE $2 END, \
                 host = $3, port = $4, state = $5, updated_at = now() WHERE id = $1::uuid",
            )
            .bind(id)
            .bind(container)
            .bind(&row.runtime_host)
            .bind(i32::from(row.runtime_port))
            .bind(row.state.as_str())
            .execute(&mut *tx)
            .await
            .context("updating the workspace's runtime")?;
        }
        replaced => {
            if let Some((old_id, _)) = replaced {
                sqlx::query("UPDATE runtimes SET state = 'stopped', updated_at = now() WHERE id = $1::uuid")
                    .bind(old_id)
                    .execute(&mut *tx)
                    .await
                    .context("marking the replaced runtime stopped")?;
            }
            let id = super::new_id();
            sqlx::query(
                "INSERT INTO runtimes (id, user_id, container_name, instance_type, host, port, state, created_at, \
                 updated_at) VALUES ($1::uuid, $2::uuid, $3, 'local', $4, $5, $6, now(), now())",
            )
            .bind(&id)
            .bind(user)
            .bind(container)
            .bind(&row.runtime_host)
            .bind(i32::from(row.runtime_port))
            .bind(row.state.as_str())
            .execute(&mut *tx)
            .await
            .context("recording the workspace's runtime")?;
            sqlx::query("UPDATE markco_workspaces SET runtime_id = $2::uuid WHERE user_id = $1")
                .bind(user)
                .bind(&id)
                .execute(&mut *tx)
                .await
                .context("linking the workspace to its runtime")?;
        }
    }
    tx.commit().await.context("committing the workspace").map_err(DbError::from)
}

pub(super) async fn delete_workspace(pool: &PgPool, user_id: &str) -> Result<bool> {
    let mut tx = pool.begin().await.context("starting a transaction")?;
    let deleted: Option<Option<String>> =
        sqlx::query_scalar("DELETE FROM markco_workspaces WHERE user_id = $1 RETURNING runtime_id::text")
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await
            .with_context(|| format!("deleting the workspace of user {user_id}"))?;
    if let Some(Some(runtime_id)) = &deleted {
        sqlx::query("UPDATE runtimes SET state = 'stopped', updated_at = now() WHERE id = $1::uuid")
            .bind(runtime_id)
            .execute(&mut *tx)
            .await
            .context("marking the workspace's runtime stopped")?;
    }
    tx.commit().await.context("committing the workspace deletion")?;
    Ok(deleted.is_some())
}

pub(super) async fn set_runtime(pool: &PgPool, user_id: &str, host: &str, port: u16) -> Result<()> {
    let mut tx = pool.begin().await.context("starting a transaction")?;
    let runtime_id: Option<Option<String>> = sqlx::query_scalar(
        "UPDATE markco_workspaces SET runtime_host = $2, runtime_port = $3, updated_at = now() WHERE user_id = $1 \
         RETURNING runtime_id::text",
    )
    .bind(user_id)
    .bind(host)
    .bind(i32::from(port))
    .fetch_optional(&mut *tx)
    .await
    .map_err(|e| address_conflict(e, None, (host, port), format!("moving the runtime of user {user_id}")))?;
    let Some(runtime_id) = runtime_id else {
        return Err(DbError::NoWorkspace(user_id.to_owned()));
    };
    if let Some(runtime_id) = runtime_id {
        sqlx::query("UPDATE runtimes SET host = $2, port = $3, updated_at = now() WHERE id = $1::uuid")
            .bind(runtime_id)
            .bind(host)
            .bind(i32::from(port))
            .execute(&mut *tx)
            .await
            .context("moving the runtime row")?;
    }
    tx.commit().await.context("committing the runtime move").map_err(DbError::from)
}

pub(super) async fn record_move(pool: &PgPool, id: &str, m: &MoveRecord) -> Result<()> {
    let done = sqlx::query(
        "INSERT INTO migrations (id, runtime_id, from_instance, to_instance, from_type, to_type, strategy, status, \
         checkpoint_ms, transfer_ms, restore_ms, started_at, completed_at) \
         SELECT $1::uuid, w.runtime_id, $3, $4, 'local', 'local', 'update-port', $5, $6, 0, $7, \
         to_timestamp($8::float8), to_timestamp($9::float8) \
         FROM markco_workspaces w WHERE w.user_id = $2 AND w.runtime_id IS NOT NULL",
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

pub(super) async fn count_recent_moves(pool: &PgPool, user_id: &str, window: Duration) -> Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM migrations m JOIN runtimes r ON r.id = m.runtime_id WHERE r.user_id = $1::uuid \
         AND m.strategy = 'update-port' AND m.status LIKE 'completed%' \
         AND m.started_at > now() - make_interval(secs => $2)",
    )
    .bind(user_id)
    .bind(window.as_secs_f64())
    .fetch_one(pool)
    .await
    .with_context(|| format!("counting the recent runtime moves of user {user_id}"))
    .map_err(DbError::from)
}

pub(super) async fn count_moves(pool: &PgPool, user_id: &str) -> Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM migrations m JOIN runtimes r ON r.id = m.runtime_id WHERE r.user_id = $1::uuid",
    )
    .bind(user_id)
    .fetch_one(pool)
    .await
    .with_context(|| format!("counting the runtime moves of user {user_id}"))
    .map_err(DbError::from)
}

pub(super) async fn recent_moves(pool: &PgPool, limit: i64) -> Result<Vec<super::MoveTuple>> {
    sqlx::query_as(
        "SELECT floor(extract(epoch FROM coalesce(m.completed_at, m.started_at)))::int8, r.user_id::text, \
         m.from_instance, m.to_instance, m.status \
         FROM migrations m LEFT JOIN runtimes r ON r.id = m.runtime_id \
         ORDER BY coalesce(m.completed_at, m.started_at) DESC NULLS LAST, m.id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("listing the latest runtime moves")
    .map_err(DbError::from)
}

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(SESSIONS_CHANNEL).await?;
    Ok(listener)
}

pub(super) async fn session_changes(pool: &PgPool) -> Result<BoxStream<'static, String>> {
    let listener = listen(pool).await.with_context(|| format!("LISTEN {SESSIONS_CHANNEL}"))?;
    let stream = futures_util::stream::unfold((pool.clone(), Some(listener)), |(pool, mut listener)| async move {
        loop {
            if pool.is_closed() {
                return None;
            }
            let Some(active) = listener.as_mut() else {
                match listen(&pool).await {
                    Ok(fresh) => {
                        tracing::info!(channel = SESSIONS_CHANNEL, "session change listener reconnected");
                        listener = Some(fresh);
                    }
                    Err(error) => {
                        tracing::warn!(%error, channel = SESSIONS_CHANNEL, "cannot listen for session changes; retrying in 1s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                continue;
            };
            // PgListener reconnects by itself after an I/O error on its connection; any other
            // error (e.g. the backend was terminated) drops the listener and we start a new one.
            match active.recv().await {
                Ok(notification) => return Some((notification.payload().to_owned(), (pool, listener))),
                Err(sqlx::Error::PoolClosed) => return None,
                Err(error) => {
                    tracing::warn!(%error, channel = SESSIONS_CHANNEL, "session change listener failed; reconnecting");
                    listener = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    Ok(stream.boxed())
}

pub(super) async fn hold_route(pool: &PgPool, route: &str, holder: &str, since: i64) -> Result<()> {
    // A hold already there keeps its first `since`.
    sqlx::query(
        "INSERT INTO markco_route_holds (route, holder, since) VALUES ($1, $2, to_timestamp($3::float8)) ON CONFLICT DO NOTHING",
    )
    .bind(route)
    .bind(holder)
    .bind(since as f64)
    .execute(pool)
    .await
    .with_context(|| format!("storing the {holder} hold of route {route}"))?;
    Ok(())
}

pub(super) async fn release_route(pool: &PgPool, route: &str, holder: &str) -> Result<bool> {
    let done = sqlx::query("DELETE FROM markco_route_holds WHERE route = $1 AND holder = $2")
        .bind(route)
        .bind(holder)
        .execute(pool)
        .await
        .with_context(|| format!("removing the {holder} hold of route {route}"))?;
    Ok(done.rows_affected() > 0)
}

pub(super) async fn route_holds(pool: &PgPool) -> Result<Vec<(String, String, i64)>> {
    sqlx::query_as(
        "SELECT route, holder, floor(extract(epoch FROM since))::int8 FROM markco_route_holds ORDER BY route, holder",
    )
    .fetch_all(pool)
    .await
    .context("reading the route holds")
    .map_err(DbError::from)
}
