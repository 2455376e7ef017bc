//! Several gateways on one PostgreSQL (`[cluster]`): a change made through one is served by the
//! others within a second, under load, after a restart, across a lost NOTIFY and a trimmed log.
//! Three real markco processes on loopback ports share one real PostgreSQL database (a fresh one
//! per test, see `common::pg`), with the project's test upstream as editors and runtimes.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::*;
use common::*;

/// A gateway of the cluster; `{db}`, `{node}` and `{max_moves}` are filled in by [`start`].
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
heartbeat = "300ms"
node_timeout = "2s"
poll = "1s"

[runtime_moves]
max_moves = {max_moves}
window = "10m"
probe_timeout = "1s"

[log]
access_log = false

[[site]]
hosts = ["*"]

  [[site.route]]
  name = "runtime"
  match = ["/r/*"]
  runtime = true

  [[site.route]]
  name = "workspace"
  match = ["/u/*"]
  workspace = true
"#;

fn template(db: &TestDb, node: &str, max_moves: usize) -> String {
    CONFIG.replace("{db}", &db.url).replace("{node}", node).replace("{max_moves}", &max_moves.to_string())
}

fn start(db: &TestDb, node: &str, max_moves: usize) -> Markco {
    Markco::start(&template(db, node, max_moves))
}

/// What `/r/<user>/whoami` answers on `m`: the runtime's name, or the status.
fn runtime_of(m: &Markco, user: &str, token: &str) -> String {
    match http_get(m.http, &format!("/r/{user}/whoami"), &[("Authorization", &format!("Bearer {token}"))]) {
        Ok(r) if r.status == 200 => r.json()["name"].as_str().unwrap_or_default().to_string(),
        Ok(r) => format!("status {}", r.status),
        Err(e) => format!("error {e}"),
    }
}

/// Waits until every gateway in `ms` answers `want`; returns how long the slowest took.
fn served_everywhere(ms: &[&Markco], user: &str, token: &str, want: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    for m in ms {
        loop {
            let got = runtime_of(m, user, token);
            if got == want {
                break;
            }
            assert!(
                started.elapsed() < limit,
                "gateway {} still answers {got:?} instead of {want:?} after {:?}; its log:\n{}",
                m.admin,
                started.elapsed(),
                m.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    started.elapsed()
}

fn admin_json(m: &Markco, method: &str, path: &str, body: &str) -> Resp {
    request(m.admin, method, path, &[("Content-Type", "application/json")], body.as_bytes()).expect("admin call")
}

fn move_to(m: &Markco, user: &str, port: u16) -> Resp {
    let body = serde_json::json!({"userId": user, "port": port, "host": "127.0.0.1"}).to_string();
    admin_json(m, "POST", "/api/runtime/update-port", &body)
}

fn cluster_view(m: &Markco) -> serde_json::Value {
    let r = http_get(m.admin, "/api/admin/cluster", &[]).expect("cluster view");
    assert_eq!(r.status, 200, "{}", r.body_text());
    r.json()
}

#[test]
fn a_workspace_and_a_route_switch_made_on_one_gateway_hold_on_every_other_within_a_second() {
    let db = TestDb::new();
    let a = start(&db, "gw-a", 5);
    let b = start(&db, "gw-b", 5);
    let c = start(&db, "gw-c", 5);
    let (user, token) = add_user(&a, "shared@example.com");
    let (editor, one) = (Upstream::start("editor"), Upstream::start("one"));
    for m in [&a, &b, &c] {
        assert!(runtime_of(m, &user, &token).starts_with("status "), "no workspace yet");
    }

    put_workspace(&a, &user, editor.addr, one.addr);
    let took = served_everywhere(&[&a, &b, &c], &user, &token, "one", Duration::from_secs(1));
    println!("a workspace registered through A was served by B and C after {took:?}");

    // The operator holds the runtime route off on A: B and C refuse it too, within a second.
    let r = admin_json(&a, "POST", "/api/admin/routes/runtime/disable", "");
    assert_eq!(r.status, 200, "{}", r.body_text());
    let took = served_everywhere(&[&b, &c], &user, &token, "status 503", Duration::from_secs(1));
    println!("a route switched off on A was off on B and C after {took:?}");

    // C restarts: the switch holds there from its first request.
    let (dir, ports) = c.stop();
    let c = Markco::start_in(dir, ports, &template(&db, "gw-c", 5), &[]);
    assert_eq!(runtime_of(&c, &user, &token), "status 503", "the switch was lost in C's restart");

    // Lifted on B this time: A and C serve again.
    let r = admin_json(&b, "POST", "/api/admin/routes/runtime/enable", "");
    assert_eq!(r.status, 200, "{}", r.body_text());
    served_everywhere(&[&a, &c], &user, &token, "one", Duration::from_secs(1));

    // Every gateway shows the three nodes up and has applied the whole log.
    eventually(Duration::from_secs(5), "every gateway has applied the head of the log", || {
        [&a, &b, &c].iter().all(|m| {
            let v = cluster_view(m);
            v["nodes"].as_array().is_some_and(|n| n.len() == 3 && n.iter().all(|n| n["up"] == true))
                && v["applied_seq"] == v["head_seq"]
                && v["lag_seconds"] == 0.0
        })
    });
    let v = cluster_view(&b);
    assert_eq!(v["node"], "gw-b");
    let applied = metric_value(&c.metrics(), "markco_cluster_changes_applied_total", &[]).unwrap_or(0.0);
    assert!(applied >= 1.0, "C counted no applied change");
    assert!(metric_value(&a.metrics(), "markco_cluster_lag_seconds", &[]).is_some());
    let routes = http_get(a.admin, "/routes", &[]).expect("routes").json();
    assert_eq!(routes["cluster"]["nodes"].as_array().map(|n| n.len()), Some(3), "{routes}");

    // Deleting it on C takes it off A and B.
    let r = admin_json(&c, "DELETE", &format!("/api/admin/workspaces/{user}"), "");
    assert_eq!(r.status, 200, "{}", r.body_text());
    served_everywhere(&[&a, &b], &user, &token, "status 503", Duration::from_secs(1));
}

#[test]
fn runtime_moves_through_b_are_followed_by_a_and_c_under_load_and_the_move_guard_counts_them_all() {
    let db = TestDb::new();
    let moves = 20;
    let a = start(&db, "gw-a", moves + 1);
    let b = start(&db, "gw-b", moves + 1);
    let c = start(&db, "gw-c", moves + 1);
    let (user, token) = add_user(&a, "mover@example.com");
    let (editor, one, two) = (Upstream::start("editor"), Upstream::start("one"), Upstream::start("two"));
    put_workspace(&b, &user, editor.addr, one.addr);
    served_everywhere(&[&a, &b, &c], &user, &token, "one", Duration::from_secs(1));

    // wrk on A and on C while B moves the runtime back and forth.
    let wrk = |m: &Markco| {
        Command::new("wrk")
            .args(["-t1", "-c8", "-d10s", "-H", &format!("Authorization: Bearer {token}")])
            .arg(format!("http://{}/r/{user}/load", m.http))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("wrk is installed (apt-get install wrk)")
    };
    let (wrk_a, wrk_c) = (wrk(&a), wrk(&c));
    std::thread::sleep(Duration::from_millis(500));
    let mut slowest = Duration::ZERO;
    for i in 0..moves {
        let (target, name) = if i % 2 == 0 { (&two, "two") } else { (&one, "one") };
        let r = move_to(&b, &user, target.addr.port());
        assert_eq!(r.status, 200, "move {i}: {}", r.body_text());
        slowest = slowest.max(served_everywhere(&[&a, &c], &user, &token, name, Duration::from_secs(1)));
    }
    println!("{moves} moves through B: A and C followed each within {slowest:?}");
    for (name, w) in [("A", wrk_a), ("C", wrk_c)] {
        let out = w.wait_with_output().expect("wrk output");
        let report = String::from_utf8_lossy(&out.stdout);
        println!("wrk through {name}:\n{report}");
        assert!(out.status.success(), "wrk failed: {report}");
        assert!(report.contains("requests in"), "{report}");
        assert!(!report.contains("Non-2xx"), "failed requests through {name} during the moves:\n{report}");
        assert!(!report.contains("Socket errors"), "socket errors through {name}:\n{report}");
    }

    // The guard allows moves + 1 within the window, counted over every gateway: one more through
    // A passes, the next through C (which made none itself) is refused.
    let r = move_to(&a, &user, two.addr.port());
    assert_eq!(r.status, 200, "{}", r.body_text());
    let r = move_to(&c, &user, one.addr.port());
    assert_eq!(r.status, 429, "C did not count the moves made through A and B: {}", r.body_text());
    assert!(r.body_text().contains("all gateways"), "{}", r.body_text());
}

#[test]
fn a_gateway_catches_up_after_being_down_after_a_lost_notify_and_after_the_log_was_trimmed() {
    let db = TestDb::new();
    let a = start(&db, "gw-a", 100);
    let b = start(&db, "gw-b", 100);
    let c = start(&db, "gw-c", 100);
    let (user, token) = add_user(&a, "late@example.com");
    let (editor, one, two) = (Upstream::start("editor"), Upstream::start("one"), Upstream::start("two"));

    // C is down while the workspace is registered, moved and its route switched off and on.
    let (c_dir, c_ports) = c.stop();
    put_workspace(&a, &user, editor.addr, one.addr);
    assert_eq!(move_to(&b, &user, two.addr.port()).status, 200);
    assert_eq!(admin_json(&a, "POST", "/api/admin/routes/workspace/disable", "").status, 200);
    let c = Markco::start_in(c_dir, c_ports, &template(&db, "gw-c", 100), &[]);
    assert_eq!(runtime_of(&c, &user, &token), "two", "C did not catch up at start");
    let u = http_get(c.http, &format!("/u/{user}/"), &[("Authorization", &format!("Bearer {token}"))]).expect("get");
    assert_eq!(u.status, 503, "the route switched off while C was down is on at C");

    // A forced hole in the sequence (a burnt number, as a rolled-back write leaves) and the
    // listening connections cut: the next change still arrives, by the next poll at the latest.
    psql(&db.url, "SELECT nextval('markco_changes_seq_seq')");
    let cut = psql(
        &db.url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query ILIKE 'LISTEN%markco_changes%'",
    );
    assert!(cut.parse::<u32>().unwrap_or(0) >= 3, "expected the three gateways' listeners, cut {cut}");
    assert_eq!(move_to(&a, &user, one.addr.port()).status, 200);
    let took = served_everywhere(&[&b, &c], &user, &token, "one", Duration::from_secs(3));
    println!("a move after a hole and cut listeners reached B and C after {took:?}");
    let head: i64 = psql(&db.url, "SELECT max(seq) FROM markco_changes").parse().expect("head");
    eventually(Duration::from_secs(3), "C reports the head of the log as applied", || {
        cluster_view(&c)["applied_seq"] == head
    });

    // C freezes past node_timeout; meanwhile the live gateways trim the log beyond what C applied
    // and a change is made. Thawed, C rebuilds from the tables and serves it.
    common::signal(c.pid(), libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(move_to(&b, &user, two.addr.port()).status, 200);
    eventually(Duration::from_secs(20), "the log is trimmed past what C applied", || {
        psql(&db.url, "SELECT upto FROM markco_changes_trimmed").parse::<i64>().unwrap_or(0) > head
    });
    common::signal(c.pid(), libc::SIGCONT);
    let took = served_everywhere(&[&c], &user, &token, "two", Duration::from_secs(3));
    println!("C, frozen while the log was trimmed, served the change {took:?} after it thawed");
    eventually(Duration::from_secs(3), "C counted a resync", || {
        metric_value(&c.metrics(), "markco_cluster_resyncs_total", &[]).unwrap_or(0.0) >= 1.0
    });
    assert_eq!(admin_json(&b, "POST", "/api/admin/routes/workspace/enable", "").status, 200);
}
