//! A real PostgreSQL for the tests: `MARKCO_TEST_PG_URL` (default
//! `postgres://postgres:postgres@127.0.0.1:5432/postgres`; `.ci/run` starts one), a fresh database
//! per test, and `psql` to look inside.

use std::process::Command;

use super::free_port;

pub fn server_url() -> String {
    std::env::var("MARKCO_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

pub fn psql(url: &str, sql: &str) -> String {
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
pub struct TestDb {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub fn new() -> TestDb {
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
