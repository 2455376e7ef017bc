//! markco on PostgreSQL: it adopts today's production schema without losing a row, serves the
//! users and sessions the auth service owns, and refuses a session deleted in the database
//! (logout) within a second through LISTEN/NOTIFY.
//!
//! Needs a PostgreSQL server: `MARKCO_TEST_PG_URL` (default
//! `postgres://postgres:postgres@127.0.0.1:5432/postgres`); `.ci/run` starts one.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn server_url() -> String {
    std::env::var("MARKCO_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-qAtX", "-c", sql])
        .output()
        .expect("psql is installed (apt-get install postgresql-client)");
    assert!(
        out.status.success(),
        "psql failed ({}): {}\nIs PostgreSQL running? .ci/run starts it; set MARKCO_TEST_PG_URL to another server.",
        sql.lines().next().unwrap_or(""),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A fresh database on the server, dropped at the end.
struct TestDb {
    admin_url: String,
    name: String,
    pub url: String,
}

impl TestDb {
    fn new() -> TestDb {
        let admin_url = server_url();
        let name = format!("markco_it_{}_{}", std::process::id(), free_port());
        psql(&admin_url, &format!("CREATE DATABASE {name}"));
        let base = admin_url.rsplit_once('/').map(|(b, _)| b.to_string()).unwrap_or_else(|| admin_url.clone());
        let url = format!("{base}/{name}");
        TestDb { admin_url, name, url }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([&self.admin_url, "-qAtX", "-c", &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)])
            .output();
    }
}

const CONFIG: &str = r#"
[server]
http = "{http}"
admin = "{admin}"
upgrade_sock = "{dir}/upgrade.sock"
pid_file = "{dir}/markco.pid"

[database]
url = "{db}"

[sessions]
cache_ttl = "60s"

[[site]]
hosts = ["*"]

  [[site.route]]
  match = ["/u/*"]
  workspace = true
"#;

const ANN: &str = "11111111-1111-4111-8111-111111111111";

#[test]
fn adopts_todays_schema_and_serves_its_users() {
    let db = TestDb::new();
    let schema = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/today_schema.sql"))
        .expect("fixture");
    psql(&db.url, &schema);
    let before: Vec<String> = ["users", "sessions", "invites", "magic_links", "runtimes", "snapshots", "migrations"]
        .iter()
        .map(|t| {
            psql(
                &db.url,
                &format!(
                    "SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '') FROM {t} t"
                ),
            )
        })
        .collect();
    let columns_before = psql(&db.url, "SELECT string_agg(table_name || '.' || column_name || ':' || data_type, ',' ORDER BY table_name, column_name) FROM information_schema.columns WHERE table_schema = 'public' AND table_name NOT LIKE 'markco_%' AND table_name <> '_sqlx_migrations'");

    // `markco migrate` twice (idempotent), then the gateway itself.
    let cfg_dir = tempfile::tempdir().expect("tempdir");
    let cfg = cfg_dir.path().join("m.toml");
    std::fs::write(&cfg, format!("[database]\nurl = \"{}\"\n", db.url)).expect("write");
    for _ in 0..2 {
        let out = Command::new(markco_bin()).args(["migrate", "--config"]).arg(&cfg).output().expect("migrate");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let after: Vec<String> = ["users", "sessions", "invites", "magic_links", "runtimes", "snapshots", "migrations"]
        .iter()
        .map(|t| {
            psql(
                &db.url,
                &format!(
                    "SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '') FROM {t} t"
                ),
            )
        })
        .collect();
    let columns_after = psql(&db.url, "SELECT string_agg(table_name || '.' || column_name || ':' || data_type, ',' ORDER BY table_name, column_name) FROM information_schema.columns WHERE table_schema = 'public' AND table_name NOT LIKE 'markco_%' AND table_name <> '_sqlx_migrations'");
    assert_eq!(before, after, "every row of today's tables is kept, unchanged");
    for col in columns_before.split(',') {
        assert!(columns_after.split(',').any(|c| c == col), "column {col} was changed or dropped");
    }

    let m = Markco::start(&CONFIG.replace("{db}", &db.url));
    let editor = Upstream::start("editor-ann");
    let runtime = Upstream::start("runtime-ann");
    put_workspace(&m, ANN, editor.addr, runtime.addr);
    // A session the auth service created works; its expired one does not; Ben cannot reach Ann.
    let r = http_get(m.http, &format!("/u/{ANN}/x"), &[("Authorization", "Bearer ann-live-token")]).expect("get");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.json()["name"], "editor-ann");
    let r = http_get(
        m.http,
        &format!("/u/{ANN}/x"),
        &[("Authorization", "Bearer ann-old-token"), ("Accept", "application/json")],
    )
    .expect("get");
    assert_eq!(r.status, 401);
    let r = http_get(m.http, &format!("/u/{ANN}/x"), &[("Authorization", "Bearer ben-live-token")]).expect("get");
    assert_eq!(r.status, 403);
    // The workspace is markco's own table; today's runtimes row for Ann is still there.
    assert_eq!(psql(&db.url, &format!("SELECT count(*) FROM markco_workspaces WHERE user_id = '{ANN}'")), "1");
    assert_eq!(
        psql(&db.url, "SELECT container_name FROM runtimes WHERE id = '33333333-3333-4333-8333-333333333333'"),
        "rt-ann-1"
    );
}

#[test]
fn logout_in_the_database_is_refused_at_once() {
    let db = TestDb::new();
    let m = Markco::start(&CONFIG.replace("{db}", &db.url));
    let (user, token) = add_user(&m, "logout@example.com");
    let editor = Upstream::start("editor");
    let runtime = Upstream::start("runtime");
    put_workspace(&m, &user, editor.addr, runtime.addr);
    let auth = format!("Bearer {token}");
    let path = format!("/u/{user}/");
    // Warm the cache (TTL 60 s here, so only the notification can make it forget).
    assert_eq!(http_get(m.http, &path, &[("Authorization", &auth)]).expect("get").status, 200);
    assert_eq!(http_get(m.http, &path, &[("Authorization", &auth)]).expect("get").status, 200);
    // The auth service's logout: delete the row.
    psql(&db.url, &format!("DELETE FROM sessions WHERE token = '{token}'"));
    let deleted = Instant::now();
    loop {
        let r = http_get(m.http, &path, &[("Authorization", &auth), ("Accept", "application/json")]).expect("get");
        if r.status == 401 {
            break;
        }
        // "At once": the NOTIFY path, not the 60 s cache TTL; 5 s leaves room for a loaded machine.
        assert!(
            deleted.elapsed() < Duration::from_secs(5),
            "a deleted session still served after {:?}",
            deleted.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("deleted session refused after {:?}", deleted.elapsed());
}
