//! Propagation across gateways (`[cluster]`): how long after a change commits in PostgreSQL
//! another gateway serves it, p50 and p99 over 1,000 changes, with 1 workspace and with 100,000
//! in the table; and what a change costs at 100,000 workspaces (the write with its log trigger,
//! and the bulk apply rate of a gateway following the log).
//!
//! Real parts: two release markco gateways, the project's test upstream, and the PostgreSQL of
//! the tests (`MARKCO_TEST_PG_URL`, a fresh database). Run it with
//!
//!     cargo build --release --workspace --bins && cargo bench --bench cluster
//!
//! It prints a Markdown report and writes it to `benches/results/cluster-<date>.md`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::*;
use common::*;

const CHANGES: usize = 1000;
const BIG: u32 = 100_000;

const CONFIG: &str = r#"
[server]
http = "{http}"
admin = "{admin}"
upgrade_sock = "{dir}/upgrade.sock"
pid_file = "{dir}/markco.pid"

[database]
url = "{db}"

[cluster]
node = "{node}"

[log]
access_log = false
level = "warn"

[[site]]
hosts = ["*"]

  [[site.route]]
  match = ["/r/*"]
  runtime = true
"#;

/// A psql session kept open: each statement's commit is timed without a process start.
struct Psql {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Psql {
    fn open(url: &str) -> Psql {
        let mut child = Command::new("psql")
            .args([url, "-qAtX", "-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("psql is installed");
        let out = BufReader::new(child.stdout.take().expect("psql stdout"));
        Psql { child, out }
    }

    /// Runs `sql` (autocommit) and returns once PostgreSQL confirmed it.
    fn run(&mut self, sql: &str) -> String {
        let stdin = self.child.stdin.as_mut().expect("psql stdin");
        writeln!(stdin, "{};\nSELECT 'done';", sql.trim_end_matches(';')).expect("write to psql");
        stdin.flush().expect("flush psql");
        let mut last = String::new();
        loop {
            let mut line = String::new();
            let n = self.out.read_line(&mut line).expect("read psql");
            assert!(n > 0, "psql exited");
            if line.trim() == "done" {
                return last;
            }
            last = line.trim().to_string();
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// Moves `user`'s runtime between `ports` by SQL `CHANGES` times; after each commit, polls `m`
/// until it serves the new runtime. Returns the sorted delays.
fn propagation(sql: &mut Psql, m: &Markco, user: &str, token: &str, ports: [(u16, &str); 2]) -> Vec<Duration> {
    let mut delays = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES {
        let (port, name) = ports[(i + 1) % 2];
        sql.run(&format!("UPDATE markco_workspaces SET runtime_port = {port} WHERE user_id = '{user}'"));
        let committed = Instant::now();
        loop {
            let r = http_get(m.http, &format!("/r/{user}/whoami"), &[("Authorization", &format!("Bearer {token}"))]);
            if r.is_ok_and(|r| r.status == 200 && r.json()["name"] == name) {
                break;
            }
            assert!(committed.elapsed() < Duration::from_secs(10), "change {i} not served after 10 s:\n{}", m.log());
        }
        delays.push(committed.elapsed());
    }
    delays.sort();
    delays
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing: run only as a bench.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let db = TestDb::new();
    let config = |node: &str| CONFIG.replace("{db}", &db.url).replace("{node}", node);
    let a = Markco::start(&config("gw-a"));
    let b = Markco::start(&config("gw-b"));
    let (user, token) = add_user(&a, "bench@example.com");
    let (editor, one, two) = (Upstream::start("editor"), Upstream::start("one"), Upstream::start("two"));
    put_workspace(&a, &user, editor.addr, one.addr);
    let ports = [(one.addr.port(), "one"), (two.addr.port(), "two")];
    let mut sql = Psql::open(&db.url);
    // Warm-up: connections, caches.
    for _ in 0..20 {
        sql.run(&format!("UPDATE markco_workspaces SET runtime_port = {} WHERE user_id = '{user}'", ports[0].0));
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("[bench] {CHANGES} changes with 1 workspace");
    let small = propagation(&mut sql, &b, &user, &token, ports);

    // 100,000 more workspaces in one statement: their 100,000 changes are the bulk apply test.
    let head: i64 = sql.run("SELECT coalesce(max(seq), 0) FROM markco_changes").parse().expect("head");
    let started = Instant::now();
    sql.run(&format!(
        "INSERT INTO markco_workspaces (user_id, editor_host, editor_port, runtime_host, runtime_port, state) \
         SELECT md5(i::text)::uuid::text, '10.' || (i / 60000) || '.' || (i / 250 % 240) || '.' || (i % 250), 1000, \
                '10.' || (i / 60000) || '.' || (i / 250 % 240) || '.' || (i % 250), 2000, 'running' \
         FROM generate_series(1, {BIG}) AS i"
    ));
    let inserted = started.elapsed();
    let target = head + i64::from(BIG);
    let applied = || -> i64 {
        let v = http_get(b.admin, "/api/admin/cluster", &[]).expect("cluster view").json();
        v["applied_seq"].as_i64().unwrap_or(0)
    };
    while applied() < target {
        assert!(started.elapsed() < Duration::from_secs(300), "B did not apply 100,000 changes in 300 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let bulk = started.elapsed();

    // The write with its trigger, one row among 100,000.
    let mut writes = Vec::new();
    for i in 0..200u32 {
        let t = Instant::now();
        sql.run(&format!(
            "UPDATE markco_workspaces SET runtime_port = {} WHERE user_id = md5('{}')::uuid::text",
            3000 + i,
            i + 1
        ));
        writes.push(t.elapsed());
    }
    writes.sort();
    eprintln!("[bench] {CHANGES} changes with {BIG} workspaces");
    let large = propagation(&mut sql, &b, &user, &token, ports);
    let rss = b.rss_kib();

    // The same under load: wrk keeps B busy on the user's runtime route meanwhile.
    eprintln!("[bench] {CHANGES} changes with {BIG} workspaces, B under wrk load");
    let wrk = Command::new("wrk")
        .args(["-t1", "-c16", "-d600s", "-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("http://{}/r/{user}/load", b.http))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("wrk is installed");
    std::thread::sleep(Duration::from_secs(1));
    let loaded = propagation(&mut sql, &b, &user, &token, ports);
    common::signal(wrk.id(), libc::SIGINT);
    let out = wrk.wait_with_output().expect("wrk output");
    let wrk_report = String::from_utf8_lossy(&out.stdout);
    let wrk_rate = wrk_report
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .map(|r| r.trim().to_string())
        .unwrap_or_else(|| "?".into());

    let date = std::process::Command::new("date").arg("+%Y-%m-%d-%H%M%S").output().expect("date");
    let date = String::from_utf8_lossy(&date.stdout).trim().to_string();
    let report = format!(
        "# Cluster propagation ({date})\n\n\
         `cargo bench --bench cluster`: two release gateways on one PostgreSQL ({pg}); a change is an \
         UPDATE of a workspace's runtime port committed through a kept-open psql; the delay runs from \
         the commit's confirmation to the first request that gateway B answers from the new runtime \
         (B polled over fresh connections).\n\n\
         | workspaces in the table | changes | p50 ms | p99 ms | max ms |\n|---:|---:|---:|---:|---:|\n\
         | 1 | {CHANGES} | {s50} | {s99} | {smax} |\n\
         | {BIG} | {CHANGES} | {l50} | {l99} | {lmax} |\n\
         | {BIG}, B under wrk load ({wrk_rate} req/s) | {CHANGES} | {o50} | {o99} | {omax} |\n\n\
         Cost of a change at {BIG} workspaces:\n\n\
         - the write with its change-log trigger (UPDATE of one row among {BIG}, commit included, as psql \
           sees it): p50 {w50} ms, p99 {w99} ms over 200;\n\
         - {BIG} changes in one INSERT took {ins:.2} s to commit; gateway B had applied all of them \
           {bulk:.2} s after the INSERT began ({rate:.0} changes/s, the route table's update included); \
           B's RSS afterwards {rss} KiB.\n",
        pg = psql(&db.url, "SHOW server_version"),
        s50 = ms(percentile(&small, 0.5)),
        s99 = ms(percentile(&small, 0.99)),
        smax = ms(*small.last().expect("delays")),
        l50 = ms(percentile(&large, 0.5)),
        l99 = ms(percentile(&large, 0.99)),
        lmax = ms(*large.last().expect("delays")),
        o50 = ms(percentile(&loaded, 0.5)),
        o99 = ms(percentile(&loaded, 0.99)),
        omax = ms(*loaded.last().expect("delays")),
        w50 = ms(percentile(&writes, 0.5)),
        w99 = ms(percentile(&writes, 0.99)),
        ins = inserted.as_secs_f64(),
        bulk = bulk.as_secs_f64(),
        rate = f64::from(BIG) / bulk.as_secs_f64(),
    );
    println!("{report}");
    let path = format!("{}/benches/results/cluster-{date}.md", env!("CARGO_MANIFEST_DIR"));
    std::fs::write(&path, &report).expect("write the report");
    eprintln!("[bench] written to {path}");
}
