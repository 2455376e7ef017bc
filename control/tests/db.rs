//! The database layer against real SQLite files and a real PostgreSQL server.
//!
//! PostgreSQL: the server at `MARKCO_TEST_PG_URL` (default
//! `postgres://postgres:postgres@127.0.0.1:5432/postgres`, a user allowed to CREATE DATABASE).
//! Every test makes its own `markco_test_<random>` database and drops it at the end, also when it
//! fails, so tests run in parallel. Without a server the PostgreSQL tests fail and say how to start one.

use std::time::Duration;

use futures_util::StreamExt;
use markco_control::db::{Db, DbError, MoveRecord, WorkspaceRow, WorkspaceState};
use sqlx::{Connection, Executor, PgConnection};
use tempfile::TempDir;

const DEFAULT_PG_URL: &str = "postgres://postgres:postgres@127.0.0.1:5432/postgres";

fn pg_server_url() -> String {
    std::env::var("MARKCO_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned())
}

/// `url` without its password, for messages.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// `url` pointing at database `name` instead (keeps user, password, host, port and parameters).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(base, query)| (base, Some(query)));
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..].find('/').map_or(base.len(), |i| authority + i);
    match query {
        Some(query) => format!("{}/{name}?{query}", &base[..path]),
        None => format!("{}/{name}", &base[..path]),
    }
}

async fn admin_connection() -> PgConnection {
    let url = pg_server_url();
    match PgConnection::connect(&url).await {
        Ok(conn) => conn,
        Err(e) => panic!(
            "these tests need PostgreSQL and cannot reach it at {} ({e}).\nStart one, e.g. \
             `sudo pg_ctlcluster 15 main start` or `sudo systemctl start postgresql` (user postgres, password \
             postgres), or `docker run -d -p 5432:5432 -e POSTGRES_PASSWORD=postgres postgres:15`; or set \
             MARKCO_TEST_PG_URL to a server where the user may CREATE DATABASE.",
            redacted(&url)
        ),
    }
}

/// A fresh PostgreSQL database, dropped (WITH FORCE) when this value is dropped, panics included.
struct PgTestDb {
    name: String,
    url: String,
}

impl PgTestDb {
    async fn create() -> PgTestDb {
        let name = format!("markco_test_{:016x}", fastrand::u64(..));
        let mut admin = admin_connection().await;
        admin.execute(format!("CREATE DATABASE {name}").as_str()).await.expect("CREATE DATABASE");
        let _ = admin.close().await;
        PgTestDb { url: with_database(&pg_server_url(), &name), name }
    }

    /// A plain connection, as another service (auth-service, an operator) would have.
    async fn plain(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.expect("plain connection to the test database")
    }
}

impl Drop for PgTestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let server = pg_server_url();
        // Drop runs inside the test's runtime; do the async work on a runtime of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(&server).await {
                    let _ = admin.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str()).await;
                    let _ = admin.close().await;
                }
            });
        })
        .join();
    }
}

enum TestDb {
    Sqlite { _dir: TempDir, url: String },
    Postgres(PgTestDb),
}

impl TestDb {
    fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("markco.db").display());
        TestDb::Sqlite { _dir: dir, url }
    }

    async fn postgres() -> TestDb {
        TestDb::Postgres(PgTestDb::create().await)
    }

    fn url(&self) -> &str {
        match self {
            TestDb::Sqlite { url, .. } => url,
            TestDb::Postgres(pg) => &pg.url,
        }
    }

    /// Connects and migrates (every call migrates again: it must be idempotent).
    async fn open(&self) -> Db {
        let db = Db::connect(self.url()).await.expect("connect");
        db.migrate().await.expect("migrate");
        db
    }
}

/// Generates `<case>::sqlite` and `<case>::postgres` tests running `async fn <case>(TestDb)`.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test]
            async fn sqlite() {
                super::$case(super::TestDb::sqlite()).await
            }

            #[tokio::test]
            async fn postgres() {
                super::$case(super::TestDb::postgres().await).await
            }
        }
    )*};
}

on_both_backends!(sessions, workspaces, moves);

/// The typed error as the call sites compare it (errors are typed: nothing to downcast).
fn db_error(err: &DbError) -> Option<&DbError> {
    Some(err)
}

fn workspace(user_id: &str, editor_port: u16, runtime_port: u16) -> WorkspaceRow {
    WorkspaceRow {
        user_id: user_id.to_owned(),
        editor_host: "127.0.0.1".to_owned(),
        editor_port,
        runtime_host: "127.0.0.1".to_owned(),
        runtime_port,
        state: WorkspaceState::Running,
        editor_container: Some(format!("editor-{user_id}")),
        runtime_container: Some(format!("rt-{user_id}")),
        updated_at: 1_700_000_000,
        node: None,
    }
}

/// Inserts a session row directly, as the auth service would, expiring `expires_in_secs` from now.
async fn insert_session(db: &Db, user_id: &str, token: &str, expires_in_secs: i64) {
    let id = uuid::Uuid::new_v4().to_string();
    match db {
        Db::Sqlite(pool) => {
            sqlx::query("INSERT INTO sessions (id, user_id, token, expires_at) VALUES (?1, ?2, ?3, ?4)")
                .bind(id)
                .bind(user_id)
                .bind(token)
                .bind(chrono::Utc::now().timestamp() + expires_in_secs)
                .execute(pool)
                .await
                .expect("insert session");
        }
        Db::Postgres(pool) => {
            sqlx::query(
                "INSERT INTO sessions (user_id, token, expires_at) \
                 VALUES ($1::uuid, $2, now() + make_interval(secs => $3::float8))",
            )
            .bind(user_id)
            .bind(token)
            .bind(expires_in_secs)
            .execute(pool)
            .await
            .expect("insert session");
        }
    }
}

/// The user's `runtimes` rows: (container_name, host, port, state), oldest first.
async fn runtime_rows(db: &Db, user_id: &str) -> Vec<(String, String, Option<i64>, Option<String>)> {
    match db {
        Db::Sqlite(pool) => sqlx::query_as(
            "SELECT container_name, host, port, state FROM runtimes WHERE user_id = ?1 ORDER BY created_at, rowid",
        )
        .bind(user_id)
        .fetch_all(pool)
        .await
        .expect("runtimes rows"),
        Db::Postgres(pool) => sqlx::query_as(
            "SELECT container_name, host, port::int8, state FROM runtimes WHERE user_id = $1::uuid \
             ORDER BY created_at, state DESC",
        )
        .bind(user_id)
        .fetch_all(pool)
        .await
        .expect("runtimes rows"),
    }
}

async fn sessions(t: TestDb) {
    let db = t.open().await;
    let user = db.create_user("alice@example.com").await.expect("create_user");
    assert!(uuid::Uuid::parse_str(&user).is_ok(), "user id {user:?} is a uuid");
    assert_eq!(db.user_by_email("alice@example.com").await.expect("user_by_email"), Some(user.clone()));
    assert_eq!(db.user_by_email("nobody@example.com").await.expect("user_by_email"), None);

    let err = db.create_user("alice@example.com").await.expect_err("a second user with the same email");
    assert_eq!(db_error(&err), Some(&DbError::EmailExists));
    assert_eq!(err.to_string(), "a user with this email exists");

    let token = db.create_session(&user, Duration::from_secs(3600)).await.expect("create_session");
    assert_eq!(token.len(), 43, "32 bytes in unpadded base64url");
    assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{token}");
    let other = db.create_session(&user, Duration::from_secs(3600)).await.expect("create_session");
    assert_ne!(token, other);
    assert_eq!(db.session_user(&token).await.expect("session_user"), Some(user.clone()));
    assert_eq!(db.session_user(&other).await.expect("session_user"), Some(user.clone()));

    insert_session(&db, &user, "expired-token", -60).await;
    assert_eq!(db.session_user("expired-token").await.expect("session_user"), None, "expired session");
    insert_session(&db, &user, "valid-token", 60).await;
    assert_eq!(db.session_user("valid-token").await.expect("session_user"), Some(user.clone()));
    assert_eq!(db.session_user("no-such-token").await.expect("session_user"), None);
    assert_eq!(db.session_user("").await.expect("session_user"), None);

    assert!(db.delete_session(&token).await.expect("delete_session"));
    assert_eq!(db.session_user(&token).await.expect("session_user"), None, "deleted session");
    assert!(!db.delete_session(&token).await.expect("delete_session"), "already deleted");
    assert_eq!(db.session_user(&other).await.expect("session_user"), Some(user.clone()), "other session intact");

    let stranger = uuid::Uuid::new_v4().to_string();
    let err = db.create_session(&stranger, Duration::from_secs(60)).await.expect_err("session of an unknown user");
    assert_eq!(db_error(&err), Some(&DbError::UnknownUser(stranger)));
    let err = db.create_session("alice", Duration::from_secs(60)).await.expect_err("non-uuid user id");
    assert_eq!(db_error(&err), Some(&DbError::InvalidUserId("alice".to_owned())));
}

async fn workspaces(t: TestDb) {
    let db = t.open().await;
    let a = uuid::Uuid::new_v4().to_string();
    let b = uuid::Uuid::new_v4().to_string();
    let c = uuid::Uuid::new_v4().to_string();
    assert_eq!(db.list_workspaces().await.expect("list"), vec![]);
    assert_eq!(db.get_workspace(&a).await.expect("get"), None);

    let row_a = workspace(&a, 20001, 40001);
    db.upsert_workspace(&row_a).await.expect("insert a");
    assert_eq!(db.get_workspace(&a).await.expect("get a"), Some(row_a.clone()));
    assert_eq!(
        runtime_rows(&db, &a).await,
        vec![(format!("rt-{a}"), "127.0.0.1".into(), Some(40001), Some("running".into()))]
    );

    // Replace: same runtime container, so the same runtimes row follows it.
    let row_a = WorkspaceRow {
        state: WorkspaceState::Starting,
        editor_container: None,
        editor_port: 20011,
        updated_at: 1_700_000_100,
        ..row_a
    };
    db.upsert_workspace(&row_a).await.expect("replace a");
    assert_eq!(db.get_workspace(&a).await.expect("get a"), Some(row_a.clone()));
    assert_eq!(
        runtime_rows(&db, &a).await,
        vec![(format!("rt-{a}"), "127.0.0.1".into(), Some(40001), Some("starting".into()))]
    );

    let row_b = WorkspaceRow { runtime_container: None, ..workspace(&b, 20002, 40002) };
    db.upsert_workspace(&row_b).await.expect("insert b");
    let mut expected = vec![row_a.clone(), row_b.clone()];
    expected.sort_by(|x, y| x.user_id.cmp(&y.user_id));
    assert_eq!(db.list_workspaces().await.expect("list"), expected);

    // Port collisions: the DB refuses a second workspace on the same address.
    let err = db.upsert_workspace(&workspace(&c, 20011, 40003)).await.expect_err("editor address taken by a");
    assert_eq!(
        db_error(&err),
        Some(&DbError::AddressInUse { kind: "editor", host: "127.0.0.1".into(), port: 20011 }),
        "{err:#}"
    );
    let err = db.upsert_workspace(&workspace(&c, 20003, 40002)).await.expect_err("runtime address taken by b");
    assert_eq!(
        db_error(&err),
        Some(&DbError::AddressInUse { kind: "runtime", host: "127.0.0.1".into(), port: 40002 }),
        "{err:#}"
    );
    assert_eq!(db.get_workspace(&c).await.expect("get c"), None, "a refused upsert leaves nothing behind");
    assert_eq!(runtime_rows(&db, &c).await, vec![]);
    let row_c = WorkspaceRow { editor_host: "10.0.0.2".into(), ..workspace(&c, 20011, 40003) };
    db.upsert_workspace(&row_c).await.expect("same port on another host is fine");

    // A new runtime container: the old runtimes row is stopped, a new one describes the runtime.
    let row_c2 = WorkspaceRow { runtime_container: Some("rt-c-second".into()), runtime_port: 40013, ..row_c.clone() };
    db.upsert_workspace(&row_c2).await.expect("c gets a new runtime");
    assert_eq!(
        runtime_rows(&db, &c).await,
        vec![
            (format!("rt-{c}"), "127.0.0.1".into(), Some(40003), Some("stopped".into())),
            ("rt-c-second".into(), "127.0.0.1".into(), Some(40013), Some("running".into())),
        ]
    );

    // Moves.
    let before = chrono::Utc::now().timestamp();
    db.set_runtime(&a, "10.0.0.9", 41000).await.expect("move a's runtime");
    let moved = db.get_workspace(&a).await.expect("get a").expect("a exists");
    assert_eq!((moved.runtime_host.as_str(), moved.runtime_port), ("10.0.0.9", 41000));
    assert!(moved.updated_at >= before, "updated_at {} is the move's time (>= {before})", moved.updated_at);
    assert_eq!(
        WorkspaceRow {
            runtime_host: row_a.runtime_host.clone(),
            runtime_port: row_a.runtime_port,
            updated_at: row_a.updated_at,
            ..moved.clone()
        },
        row_a,
        "only the runtime address changed"
    );
    assert_eq!(
        runtime_rows(&db, &a).await,
        vec![(format!("rt-{a}"), "10.0.0.9".into(), Some(41000), Some("starting".into()))]
    );

    let err = db.set_runtime(&b, "10.0.0.9", 41000).await.expect_err("runtime address taken by a");
    assert_eq!(db_error(&err), Some(&DbError::AddressInUse { kind: "runtime", host: "10.0.0.9".into(), port: 41000 }));
    let nobody = uuid::Uuid::new_v4().to_string();
    let err = db.set_runtime(&nobody, "10.0.0.9", 42000).await.expect_err("no workspace");
    assert_eq!(db_error(&err), Some(&DbError::NoWorkspace(nobody.clone())));
    // b has no runtime container name: moving it still works.
    db.set_runtime(&b, "127.0.0.1", 40022).await.expect("move b's runtime");

    // Persisted: a new pool on the same database sees the moves.
    let all = db.list_workspaces().await.expect("list");
    db.close().await;
    let db = t.open().await;
    assert_eq!(db.list_workspaces().await.expect("list after reconnect"), all);
    let moved_again = db.get_workspace(&a).await.expect("get a").expect("a still exists");
    assert_eq!(moved_again, moved, "a's runtime is still moved after a reconnect");

    assert!(db.delete_workspace(&b).await.expect("delete b"));
    assert!(!db.delete_workspace(&b).await.expect("delete b again"));
    assert_eq!(db.get_workspace(&b).await.expect("get b"), None);
    assert_eq!(
        runtime_rows(&db, &b).await,
        vec![(String::new(), "127.0.0.1".into(), Some(40022), Some("stopped".into()))]
    );
    db.upsert_workspace(&workspace(&nobody, 20002, 40002)).await.expect("b's ports are free again");

    let err = db.upsert_workspace(&workspace("alice", 20099, 40099)).await.expect_err("non-uuid user id");
    assert_eq!(db_error(&err), Some(&DbError::InvalidUserId("alice".into())));
}

/// Rows of `migrations` joined with their runtime: (runtime user, from, to, from_type, to_type,
/// strategy, status, checkpoint_ms, transfer_ms, restore_ms, started_at, completed_at), by start.
type MoveTuple = (
    String,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

async fn move_rows(db: &Db) -> Vec<MoveTuple> {
    match db {
        Db::Sqlite(pool) => sqlx::query_as(
            "SELECT r.user_id, m.from_instance, m.to_instance, m.from_type, m.to_type, m.strategy, m.status, \
             m.checkpoint_ms, m.transfer_ms, m.restore_ms, m.started_at, m.completed_at \
             FROM migrations m JOIN runtimes r ON r.id = m.runtime_id \
             JOIN markco_workspaces w ON w.runtime_id = m.runtime_id ORDER BY m.started_at",
        )
        .fetch_all(pool)
        .await
        .expect("migrations rows"),
        Db::Postgres(pool) => sqlx::query_as(
            "SELECT r.user_id::text, m.from_instance, m.to_instance, m.from_type, m.to_type, m.strategy, m.status, \
             m.checkpoint_ms::int8, m.transfer_ms::int8, m.restore_ms::int8, \
             extract(epoch FROM m.started_at)::int8, extract(epoch FROM m.completed_at)::int8 \
             FROM migrations m JOIN runtimes r ON r.id = m.runtime_id \
             JOIN markco_workspaces w ON w.runtime_id = m.runtime_id ORDER BY m.started_at",
        )
        .fetch_all(pool)
        .await
        .expect("migrations rows"),
    }
}

fn a_move(user_id: &str, from: &str, to: &str, status: &str, started_at: i64) -> MoveRecord {
    MoveRecord {
        user_id: user_id.to_owned(),
        from: from.to_owned(),
        to: to.to_owned(),
        status: status.to_owned(),
        probe_ms: 12,
        notify_ms: 34,
        started_at,
        completed_at: started_at + 1,
    }
}

async fn moves(t: TestDb) {
    let db = t.open().await;
    let user = db.create_user("mover@example.com").await.expect("create_user");
    db.upsert_workspace(&workspace(&user, 20001, 40010)).await.expect("workspace");
    assert_eq!(db.count_moves(&user).await.expect("count"), 0);

    let ok = a_move(&user, "127.0.0.1:40010", "127.0.0.1:40020", "completed", 1_700_000_000);
    db.record_move(&ok).await.expect("record a completed move");
    db.set_runtime(&user, "127.0.0.1", 40020).await.expect("set_runtime");
    let failed = a_move(&user, "127.0.0.1:40020", "10.0.0.5:40030", "failed: probe timed out", 1_700_000_100);
    db.record_move(&failed).await.expect("record a failed move");

    assert_eq!(db.count_moves(&user).await.expect("count"), 2);
    let row = |m: &MoveRecord| -> MoveTuple {
        (
            user.clone(),
            m.from.clone(),
            m.to.clone(),
            "local".into(),
            "local".into(),
            "update-port".into(),
            Some(m.status.clone()),
            Some(12),
            Some(0),
            Some(34),
            Some(m.started_at),
            Some(m.completed_at),
        )
    };
    assert_eq!(move_rows(&db).await, vec![row(&ok), row(&failed)], "rows reference the workspace's runtimes row");

    let other = db.create_user("still@example.com").await.expect("create_user");
    assert_eq!(db.count_moves(&other).await.expect("count"), 0);
    let err = db.record_move(&a_move(&other, "a:1", "b:2", "completed", 1)).await.expect_err("no workspace");
    assert_eq!(db_error(&err), Some(&DbError::NoWorkspace(other.clone())));
    assert_eq!(db.count_moves("not-a-uuid").await.expect("count"), 0);

    // Moves stay counted after the workspace is gone and the runtime replaced.
    db.delete_workspace(&user).await.expect("delete");
    db.upsert_workspace(&workspace(&user, 20001, 40010)).await.expect("workspace again");
    assert_eq!(db.count_moves(&user).await.expect("count"), 2);
}

#[tokio::test]
async fn sqlite_connect_creates_directories_and_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("sub").join("dir").join("markco.db");
    let db = Db::connect(&format!("sqlite://{}", file.display())).await.expect("connect");
    assert!(file.is_file(), "{} was created", file.display());
    assert_eq!(db.backend(), "sqlite");
    db.migrate().await.expect("migrate");
    db.migrate().await.expect("migrate again");
    let Db::Sqlite(pool) = &db else { panic!("sqlite URL gave {}", db.backend()) };
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(pool).await.expect("journal_mode");
    assert_eq!(journal, "wal");
    let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout").fetch_one(pool).await.expect("busy_timeout");
    assert_eq!(busy, 5000);
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys").fetch_one(pool).await.expect("foreign_keys");
    assert_eq!(fk, 1);
    assert!(db.session_changes().await.expect("session_changes").is_none(), "no change feed on SQLite");

    // The directory cannot be created under a regular file: the error names it.
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"").expect("write");
    let err = Db::connect(&format!("sqlite://{}/x/markco.db", blocker.display())).await.expect_err("blocked");
    let message = format!("{err:#}");
    assert!(message.contains("cannot create the directory") && message.contains("not-a-dir"), "{message}");
}

#[tokio::test]
async fn sqlite_in_memory_keeps_its_data() {
    let db = Db::connect("sqlite::memory:").await.expect("connect");
    db.migrate().await.expect("migrate");
    let user = db.create_user("mem@example.com").await.expect("create_user");
    let token = db.create_session(&user, Duration::from_secs(60)).await.expect("create_session");
    for _ in 0..5 {
        assert_eq!(db.session_user(&token).await.expect("session_user"), Some(user.clone()));
    }
}

#[tokio::test]
async fn connect_errors_say_what_to_fix() {
    let err = Db::connect("mysql://root@localhost/markco").await.expect_err("unsupported scheme");
    assert!(err.to_string().contains("unsupported database URL scheme \"mysql\""), "{err:#}");

    let free_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let err = Db::connect(&format!("postgres://postgres:secret@127.0.0.1:{free_port}/postgres"))
        .await
        .expect_err("nothing listens there");
    let message = format!("{err:#}");
    assert!(message.contains("is PostgreSQL running"), "{message}");
    assert!(!message.contains("secret"), "the password is not echoed: {message}");

    let server = pg_server_url();
    let _ = admin_connection().await; // fails with instructions if the server is down
    let missing = format!("markco_test_missing_{:016x}", fastrand::u64(..));
    let err = Db::connect(&with_database(&server, &missing)).await.expect_err("missing database");
    let message = format!("{err:#}");
    assert!(message.contains("does not exist") && message.contains(&missing), "{message}");

    let options: sqlx::postgres::PgConnectOptions = server.parse().expect("MARKCO_TEST_PG_URL parses");
    let wrong = format!(
        "postgres://{}:wrong-password-{}@{}:{}/{}",
        options.get_username(),
        fastrand::u32(..),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("postgres")
    );
    match Db::connect(&wrong).await {
        Err(err) => {
            let message = format!("{err:#}");
            assert!(message.contains("authentication failed"), "{message}");
            assert!(!message.contains("wrong-password"), "the password is not echoed: {message}");
        }
        // A server configured with `trust` ignores passwords; nothing to check there.
        Ok(_) => eprintln!("the PostgreSQL server does not check passwords; skipped the authentication case"),
    }
}

/// Today's schema, as the auth service (auth-service/src/schema.sql, minus pgcrypto which
/// PostgreSQL 13+ does not need for gen_random_uuid), compute-manager (@9097913) and the sync relay
/// create it at their start (reference/today.md section 4).
const TODAY_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS users (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  email TEXT UNIQUE NOT NULL,
  username TEXT UNIQUE,
  name TEXT,
  avatar_url TEXT,
  github_id TEXT UNIQUE,
  google_id TEXT UNIQUE,
  plan TEXT DEFAULT 'free',
  created_at TIMESTAMPTZ DEFAULT NOW()
);
ALTER TABLE users ADD COLUMN IF NOT EXISTS username TEXT;
CREATE TABLE IF NOT EXISTS sessions (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id UUID REFERENCES users(id) ON DELETE CASCADE,
  token TEXT UNIQUE NOT NULL,
  expires_at TIMESTAMPTZ NOT NULL,
  created_at TIMESTAMPTZ DEFAULT NOW()
);
CREATE TABLE IF NOT EXISTS invites (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  project_path TEXT NOT NULL,
  token TEXT UNIQUE NOT NULL,
  role TEXT NOT NULL DEFAULT 'editor',
  expires_at TIMESTAMPTZ,
  created_by UUID REFERENCES users(id),
  created_at TIMESTAMPTZ DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_sessions_token ON sessions(token);
CREATE INDEX IF NOT EXISTS idx_sessions_user_id ON sessions(user_id);
CREATE INDEX IF NOT EXISTS idx_sessions_expires_at ON sessions(expires_at);
CREATE INDEX IF NOT EXISTS idx_invites_token ON invites(token);
CREATE UNIQUE INDEX IF NOT EXISTS idx_users_username_unique ON users(username) WHERE username IS NOT NULL;
CREATE TABLE IF NOT EXISTS magic_links (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  email TEXT NOT NULL,
  token TEXT UNIQUE NOT NULL,
  expires_at TIMESTAMPTZ NOT NULL,
  used BOOLEAN DEFAULT FALSE,
  created_at TIMESTAMPTZ DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_magic_links_token ON magic_links(token);
CREATE INDEX IF NOT EXISTS idx_magic_links_email ON magic_links(email);
CREATE TABLE IF NOT EXISTS shares (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  owner_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  project TEXT NOT NULL,
  doc_path TEXT,
  token TEXT UNIQUE NOT NULL,
  role TEXT NOT NULL DEFAULT 'editor',
  require_auth BOOLEAN DEFAULT TRUE,
  active BOOLEAN DEFAULT TRUE,
  label TEXT,
  invited_email TEXT,
  expires_at TIMESTAMPTZ,
  max_uses INTEGER,
  use_count INTEGER DEFAULT 0,
  created_at TIMESTAMPTZ DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_shares_token ON shares(token);
CREATE INDEX IF NOT EXISTS idx_shares_owner ON shares(owner_id);
CREATE TABLE IF NOT EXISTS share_members (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  share_id UUID NOT NULL REFERENCES shares(id) ON DELETE CASCADE,
  user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  joined_at TIMESTAMPTZ DEFAULT NOW(),
  UNIQUE(share_id, user_id)
);
CREATE INDEX IF NOT EXISTS idx_share_members_user ON share_members(user_id);
CREATE INDEX IF NOT EXISTS idx_share_members_share ON share_members(share_id);

CREATE TABLE IF NOT EXISTS runtimes (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id UUID NOT NULL,
  container_name TEXT NOT NULL,
  ec2_instance_id TEXT,
  instance_type TEXT NOT NULL DEFAULT 'local',
  host TEXT NOT NULL DEFAULT 'localhost',
  port INTEGER,
  state TEXT DEFAULT 'running',
  memory_limit BIGINT DEFAULT 268435456,
  memory_used BIGINT DEFAULT 0,
  cpu_limit REAL DEFAULT 0.5,
  created_at TIMESTAMPTZ DEFAULT NOW(),
  updated_at TIMESTAMPTZ DEFAULT NOW()
);
CREATE TABLE IF NOT EXISTS snapshots (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id UUID NOT NULL,
  runtime_id UUID REFERENCES runtimes(id),
  name TEXT NOT NULL,
  path TEXT NOT NULL,
  size_bytes BIGINT,
  created_at TIMESTAMPTZ DEFAULT NOW()
);
CREATE TABLE IF NOT EXISTS migrations (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  runtime_id UUID REFERENCES runtimes(id),
  from_instance TEXT NOT NULL,
  to_instance TEXT NOT NULL,
  from_type TEXT NOT NULL,
  to_type TEXT NOT NULL,
  strategy TEXT NOT NULL DEFAULT 'criu-leave-running',
  status TEXT DEFAULT 'pending',
  checkpoint_ms INTEGER,
  transfer_ms INTEGER,
  restore_ms INTEGER,
  started_at TIMESTAMPTZ,
  completed_at TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS idx_runtimes_user_id ON runtimes(user_id);
CREATE INDEX IF NOT EXISTS idx_runtimes_state ON runtimes(state);
CREATE INDEX IF NOT EXISTS idx_snapshots_user_id ON snapshots(user_id);
CREATE INDEX IF NOT EXISTS idx_migrations_runtime_id ON migrations(runtime_id);

CREATE TABLE IF NOT EXISTS documents (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id UUID NOT NULL REFERENCES users(id),
  project TEXT NOT NULL,
  doc_path TEXT NOT NULL,
  yjs_state BYTEA,
  content_text TEXT,
  content_hash TEXT,
  byte_size INTEGER DEFAULT 0,
  updated_at TIMESTAMPTZ DEFAULT NOW(),
  created_at TIMESTAMPTZ DEFAULT NOW(),
  UNIQUE(user_id, project, doc_path)
);
CREATE INDEX IF NOT EXISTS idx_documents_user_project ON documents(user_id, project);
CREATE INDEX IF NOT EXISTS idx_documents_updated ON documents(updated_at);
CREATE TABLE IF NOT EXISTS machines (
  user_id UUID NOT NULL REFERENCES users(id),
  machine_id TEXT NOT NULL,
  machine_name TEXT,
  hostname TEXT,
  capabilities TEXT[] DEFAULT '{}',
  status TEXT NOT NULL DEFAULT 'offline',
  last_seen TIMESTAMPTZ DEFAULT NOW(),
  connected_at TIMESTAMPTZ,
  PRIMARY KEY (user_id, machine_id)
);
CREATE TABLE IF NOT EXISTS catalog (
  user_id UUID NOT NULL REFERENCES users(id),
  machine_id TEXT NOT NULL,
  project TEXT NOT NULL,
  doc_path TEXT NOT NULL,
  content_hash TEXT,
  byte_size INTEGER DEFAULT 0,
  updated_at TIMESTAMPTZ DEFAULT NOW(),
  PRIMARY KEY (user_id, machine_id, project, doc_path)
);
CREATE INDEX IF NOT EXISTS idx_catalog_user ON catalog(user_id);
CREATE INDEX IF NOT EXISTS idx_catalog_user_project ON catalog(user_id, project);
"#;

const TODAY_TABLES: &[&str] = &[
    "users",
    "sessions",
    "invites",
    "magic_links",
    "shares",
    "share_members",
    "runtimes",
    "snapshots",
    "migrations",
    "documents",
    "machines",
    "catalog",
];

/// The tables markco's migrations create when they are missing.
const ADOPTED_TABLES: &[&str] = &["users", "sessions", "invites", "runtimes", "snapshots", "migrations"];

const USER_1: &str = "11111111-1111-4111-8111-111111111111";
const USER_2: &str = "22222222-2222-4222-8222-222222222222";
const RUNTIME_1: &str = "33333333-3333-4333-8333-333333333333";

/// Rows a production database would hold (2 users, 3 sessions, an invite, a runtime, a snapshot,
/// a migration, and rows of the auth service's and the relay's other tables).
const TODAY_ROWS: &str = r#"
INSERT INTO users (id, email, username, name, avatar_url, github_id, plan, created_at) VALUES
  ('11111111-1111-4111-8111-111111111111', 'ada@example.com', 'ada', 'Ada', 'https://a/x.png', '4242', 'pro', '2026-01-02 03:04:05+00');
INSERT INTO users (id, email, google_id) VALUES
  ('22222222-2222-4222-8222-222222222222', 'bob@example.com', 'g-77');
INSERT INTO sessions (user_id, token, expires_at) VALUES
  ('11111111-1111-4111-8111-111111111111', 'tok-ada-laptop', now() + interval '30 days'),
  ('11111111-1111-4111-8111-111111111111', 'tok-ada-phone', now() + interval '29 days'),
  ('22222222-2222-4222-8222-222222222222', 'tok-bob-old', now() - interval '1 day');
INSERT INTO invites (project_path, token, role, expires_at, created_by) VALUES
  ('Projects/Scratch', 'inv-1', 'viewer', now() + interval '7 days', '11111111-1111-4111-8111-111111111111');
INSERT INTO magic_links (email, token, expires_at, used) VALUES ('bob@example.com', 'ml-1', now() + interval '15 minutes', true);
INSERT INTO shares (owner_id, project, doc_path, token, label) VALUES
  ('11111111-1111-4111-8111-111111111111', 'Scratch', 'mrmd.md', 'share-1', 'notes');
INSERT INTO share_members (share_id, user_id) SELECT id, '22222222-2222-4222-8222-222222222222' FROM shares;
INSERT INTO runtimes (id, user_id, container_name, host, port, state) VALUES
  ('33333333-3333-4333-8333-333333333333', '11111111-1111-4111-8111-111111111111', 'rt-11111111-1111-4111-8111-111111111111-ab12cd34', 'localhost', 45678, 'running');
INSERT INTO snapshots (user_id, runtime_id, name, path, size_bytes) VALUES
  ('11111111-1111-4111-8111-111111111111', '33333333-3333-4333-8333-333333333333', 'idle-1', '/data/snapshots/x/idle-1.tar.gz', 5000000);
INSERT INTO migrations (runtime_id, from_instance, to_instance, from_type, to_type, status, checkpoint_ms, transfer_ms, restore_ms, started_at, completed_at) VALUES
  ('33333333-3333-4333-8333-333333333333', 'local', 'i-0abc', 'local', 't3.large', 'completed', 600, 2100, 800, now() - interval '1 hour', now() - interval '1 hour' + interval '3.5 seconds');
INSERT INTO documents (user_id, project, doc_path, yjs_state, content_text, content_hash, byte_size) VALUES
  ('11111111-1111-4111-8111-111111111111', 'Scratch', 'mrmd.md', '\x0102', '# hi', 'abc', 4);
INSERT INTO machines (user_id, machine_id, machine_name, capabilities) VALUES
  ('11111111-1111-4111-8111-111111111111', 'm1', 'laptop', '{python,r}');
INSERT INTO catalog (user_id, machine_id, project, doc_path, content_hash, byte_size) VALUES
  ('11111111-1111-4111-8111-111111111111', 'm1', 'Scratch', 'mrmd.md', 'abc', 4);
"#;

/// Every row of every table of today's schema, as JSON text.
async fn all_rows(conn: &mut PgConnection) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for table in TODAY_TABLES {
        let rows: String =
            sqlx::query_scalar(&format!("SELECT coalesce(json_agg(t ORDER BY t::text), '[]')::text FROM {table} t"))
                .fetch_one(&mut *conn)
                .await
                .expect("rows");
        out.push((table.to_string(), rows));
    }
    out
}

/// Columns (name, type, nullability, default), constraints and indexes of `tables`.
async fn shape(conn: &mut PgConnection, tables: &[&str]) -> Vec<String> {
    let tables: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
    let mut out: Vec<String> = sqlx::query_scalar(
        "SELECT format('column %s.%s %s null=%s default=%s', table_name, column_name, data_type, is_nullable, \
         coalesce(column_default, '-')) FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = ANY($1) ORDER BY table_name, column_name",
    )
    .bind(&tables)
    .fetch_all(&mut *conn)
    .await
    .expect("columns");
    let constraints: Vec<String> = sqlx::query_scalar(
        "SELECT format('constraint %s %s %s', c.conrelid::regclass, c.conname, pg_get_constraintdef(c.oid)) \
         FROM pg_constraint c WHERE c.conrelid::regclass::text = ANY($1) ORDER BY 1",
    )
    .bind(&tables)
    .fetch_all(&mut *conn)
    .await
    .expect("constraints");
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT format('index %s', indexdef) FROM pg_indexes \
         WHERE schemaname = current_schema() AND tablename = ANY($1) ORDER BY indexname",
    )
    .bind(&tables)
    .fetch_all(&mut *conn)
    .await
    .expect("indexes");
    out.extend(constraints);
    out.extend(indexes);
    out
}

#[tokio::test]
async fn postgres_adopts_todays_database() {
    let pg = PgTestDb::create().await;
    let mut conn = pg.plain().await;
    conn.execute(TODAY_SCHEMA).await.expect("today's schema");
    conn.execute(TODAY_ROWS).await.expect("today's rows");
    let rows_before = all_rows(&mut conn).await;
    let shape_before = shape(&mut conn, TODAY_TABLES).await;
    assert!(rows_before.iter().all(|(_, rows)| rows != "[]"), "every table has rows: {rows_before:?}");

    let db = Db::connect(&pg.url).await.expect("connect");
    assert_eq!(db.backend(), "postgres");
    db.migrate().await.expect("migrate today's database");
    db.migrate().await.expect("migrate again");
    let db = {
        db.close().await;
        let db = Db::connect(&pg.url).await.expect("reconnect");
        db.migrate().await.expect("migrate with a new pool");
        db
    };

    assert_eq!(all_rows(&mut conn).await, rows_before, "no existing row changed");
    assert_eq!(
        shape(&mut conn, TODAY_TABLES).await,
        shape_before,
        "today's tables keep every column, constraint and index"
    );
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut conn)
        .await
        .expect("applied");
    // Every migration in migrations/postgres applied, each once.
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations/postgres"))
        .expect("migrations/postgres")
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql")))
        .count();
    assert_eq!(applied, files as i64);
    // The services that own today's tables can still run their schema at start.
    conn.execute(TODAY_SCHEMA).await.expect("today's schema again, after markco");

    // markco works on it.
    assert_eq!(db.session_user("tok-ada-laptop").await.expect("session_user"), Some(USER_1.to_owned()));
    assert_eq!(db.session_user("tok-ada-phone").await.expect("session_user"), Some(USER_1.to_owned()));
    assert_eq!(db.session_user("tok-bob-old").await.expect("session_user"), None, "expired before markco");
    assert_eq!(db.user_by_email("bob@example.com").await.expect("user_by_email"), Some(USER_2.to_owned()));
    let err = db.create_user("ada@example.com").await.expect_err("existing email");
    assert_eq!(db_error(&err), Some(&DbError::EmailExists));
    let token = db.create_session(USER_2, Duration::from_secs(60)).await.expect("create_session");
    assert_eq!(db.session_user(&token).await.expect("session_user"), Some(USER_2.to_owned()));

    let row = workspace(USER_1, 20001, 40001);
    db.upsert_workspace(&row).await.expect("workspace of a pre-existing user");
    assert_eq!(db.get_workspace(USER_1).await.expect("get"), Some(row));
    assert_eq!(db.count_moves(USER_1).await.expect("count"), 1, "compute-manager's migration counts");
    db.record_move(&a_move(USER_1, "127.0.0.1:40001", "127.0.0.1:40002", "completed", 1_700_000_000))
        .await
        .expect("record_move");
    db.set_runtime(USER_1, "127.0.0.1", 40002).await.expect("set_runtime");
    assert_eq!(db.count_moves(USER_1).await.expect("count"), 2);
    let legacy: (String, Option<i32>, Option<String>) =
        sqlx::query_as("SELECT host, port, state FROM runtimes WHERE id = $1::uuid")
            .bind(RUNTIME_1)
            .fetch_one(&mut conn)
            .await
            .expect("legacy runtime");
    assert_eq!(legacy, ("localhost".into(), Some(45678), Some("running".into())), "compute-manager's row untouched");

    // The auth service's account deletion (DELETE /auth/account) still works next to markco's tables.
    let mut tx = conn.begin().await.expect("begin");
    for sql in [
        "UPDATE invites SET created_by = NULL WHERE created_by = $1::uuid",
        "DELETE FROM sessions WHERE user_id = $1::uuid",
        "DELETE FROM users WHERE id = $1::uuid",
    ] {
        sqlx::query(sql).bind(USER_2).execute(&mut *tx).await.expect(sql);
    }
    tx.commit().await.expect("commit");
    assert_eq!(db.session_user(&token).await.expect("session_user"), None);
}

#[tokio::test]
async fn postgres_fresh_database_gets_todays_shapes() {
    let today = PgTestDb::create().await;
    let fresh = PgTestDb::create().await;
    today.plain().await.execute(TODAY_SCHEMA).await.expect("today's schema");
    let db = Db::connect(&fresh.url).await.expect("connect");
    db.migrate().await.expect("migrate a fresh database");

    let expected = shape(&mut today.plain().await, ADOPTED_TABLES).await;
    let got: Vec<String> = shape(&mut fresh.plain().await, ADOPTED_TABLES).await;
    assert_eq!(got, expected, "markco creates today's tables exactly as the services did");
}

#[tokio::test]
async fn postgres_refuses_to_adopt_incompatible_types() {
    let pg = PgTestDb::create().await;
    let mut conn = pg.plain().await;
    conn.execute(TODAY_SCHEMA).await.expect("today's schema");
    conn.execute("ALTER TABLE runtimes ALTER COLUMN user_id TYPE text").await.expect("alter");
    let db = Db::connect(&pg.url).await.expect("connect");
    let err = db.migrate().await.expect_err("runtimes.user_id must be a uuid");
    let message = format!("{err:#}");
    assert!(message.contains("runtimes.user_id has type text, markco needs uuid"), "{message}");
    let markco_tables: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'markco_%'")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(markco_tables, 0, "a failed adoption changes nothing");
}

async fn next_change(changes: &mut futures_util::stream::BoxStream<'static, String>) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(1), changes.next()).await.expect("a session change within 1 s")
}

#[tokio::test]
async fn postgres_session_changes_arrive_within_a_second() {
    let pg = PgTestDb::create().await;
    let db = Db::connect(&pg.url).await.expect("connect");
    db.migrate().await.expect("migrate");
    let user = db.create_user("notify@example.com").await.expect("create_user");
    let deleted = db.create_session(&user, Duration::from_secs(3600)).await.expect("session");
    let updated = db.create_session(&user, Duration::from_secs(3600)).await.expect("session");
    let cascaded = db.create_session(&user, Duration::from_secs(3600)).await.expect("session");
    let mut changes = db.session_changes().await.expect("session_changes").expect("a stream on PostgreSQL");

    let mut other = pg.plain().await;

    sqlx::query("DELETE FROM sessions WHERE token = $1").bind(&deleted).execute(&mut other).await.expect("delete");
    assert_eq!(next_change(&mut changes).await, Some(deleted));

    sqlx::query("UPDATE sessions SET expires_at = now() WHERE token = $1")
        .bind(&updated)
        .execute(&mut other)
        .await
        .expect("update");
    assert_eq!(next_change(&mut changes).await, Some(updated.clone()));

    // Account deletion: sessions go through ON DELETE CASCADE.
    sqlx::query("DELETE FROM users WHERE id = $1::uuid").bind(&user).execute(&mut other).await.expect("delete user");
    let mut tokens = vec![next_change(&mut changes).await, next_change(&mut changes).await];
    tokens.sort();
    let mut expected = vec![Some(updated), Some(cascaded)];
    expected.sort();
    assert_eq!(tokens, expected);

    // Closing the pool ends the stream (which gives its connection back, letting close finish).
    let closing = tokio::spawn({
        let db = db.clone();
        async move { db.close().await }
    });
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), changes.next()).await.expect("the stream ends"), None);
    tokio::time::timeout(Duration::from_secs(5), closing).await.expect("close finishes").expect("close task");
}

#[tokio::test]
async fn postgres_session_changes_survive_a_lost_connection() {
    let pg = PgTestDb::create().await;
    let db = Db::connect(&pg.url).await.expect("connect");
    db.migrate().await.expect("migrate");
    let user = db.create_user("reconnect@example.com").await.expect("create_user");
    let mut changes = db.session_changes().await.expect("session_changes").expect("a stream on PostgreSQL");

    let mut other = pg.plain().await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query ILIKE 'LISTEN%') AS t",
    )
    .fetch_one(&mut other)
    .await
    .expect("terminate the listener's backend");
    assert_eq!(killed, 1, "exactly one backend listens");

    // Notifications sent while the listener reconnects are lost (the cache TTL covers them), so
    // keep deleting sessions until one arrives.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut deleted = Vec::new();
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no session change after the listener lost its connection");
        let token = db.create_session(&user, Duration::from_secs(60)).await.expect("session");
        sqlx::query("DELETE FROM sessions WHERE token = $1").bind(&token).execute(&mut other).await.expect("delete");
        deleted.push(token);
        if let Ok(Some(token)) = tokio::time::timeout(Duration::from_millis(500), changes.next()).await {
            assert!(deleted.contains(&token), "{token} is one of the deleted sessions");
            break;
        }
    }
}
