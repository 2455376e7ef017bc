//! Workspaces on several nodes (`[cluster]` with `[workspaces]`): three gateways on one
//! PostgreSQL and the one podman here, each node with its own instance label. A workspace started
//! through one gateway is served by the others straight from its node; a full node's users are
//! placed on another; a node that stops heartbeating has its workspaces marked lost and started
//! elsewhere at their next request, or kept down with a clear 503 where its data is not shared.
//!
//! Needs PostgreSQL (`common::pg`) and podman's API socket with the test image (`common::podman`).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::*;
use common::podman::*;
use common::*;

/// A node of the cluster on the shared `data` directory.
fn template(db: &TestDb, node: &str, capacity: &str, shared: bool, data: &std::path::Path) -> String {
    format!(
        r#"
[server]
http = "{{http}}"
admin = "{{admin}}"
upgrade_sock = "{{dir}}/upgrade.sock"
pid_file = "{{dir}}/markco.pid"

[database]
url = "{db}"

[cluster]
node = "{node}"
heartbeat = "300ms"
node_timeout = "5s"
poll = "1s"
capacity = {capacity}
shared_data = {shared}

[log]
access_log = false

{workspaces}
[[site]]
hosts = ["*"]

  [[site.route]]
  match = ["/u/*"]
  workspace = true
"#,
        db = db.url,
        workspaces = workspaces_section(14, &data.display().to_string()),
    )
}

/// Removes the users' pods whatever happens in the test.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for user in &self.0 {
            let _ = podman_cmd(&["pod", "rm", "-f", &format!("markco-ws-{user}")]);
        }
    }
}

fn get(m: &Markco, user: &str, token: &str, path: &str) -> Resp {
    request(m.http, "GET", &format!("/u/{user}{path}"), &[("Authorization", &format!("Bearer {token}"))], b"")
        .expect("request through the gateway")
}

/// The node column of the user's workspace row, and its state.
fn row_of(db: &TestDb, user: &str) -> String {
    psql(
        &db.url,
        &format!("SELECT coalesce(node, '-') || ' ' || state FROM markco_workspaces WHERE user_id = '{user}'"),
    )
}

/// The `markco.node` label of the user's editor container.
fn node_label(user: &str) -> String {
    podman(&["inspect", "--format", "{{index .Config.Labels \"markco.node\"}}", &format!("markco-editor-{user}")])
        .trim()
        .to_string()
}

#[test]
fn workspaces_are_placed_on_nodes_with_room_served_by_every_gateway_and_moved_off_a_dead_node() {
    let db = TestDb::new();
    let data = tempfile::tempdir().expect("shared data dir");
    // A runs one workspace at most; C runs none and does not trust the data to be shared.
    let a = Markco::start(&template(&db, "gw-a", r#"{ "*" = 1 }"#, true, data.path()));
    let b = Markco::start(&template(&db, "gw-b", "{}", true, data.path()));
    let c = Markco::start(&template(&db, "gw-c", r#"{ "*" = 0 }"#, false, data.path()));
    let (u1, t1) = add_user(&a, "one@example.com");
    let (u2, t2) = add_user(&a, "two@example.com");
    let _cleanup = Cleanup(vec![u1.clone(), u2.clone()]);

    // Started lazily through A, on A: served by B and C within a second, from A's containers.
    let r = get(&a, &u1, &t1, "/hello");
    assert_eq!(r.status, 200, "{}\n{}", r.body_text(), a.log());
    assert_eq!(r.json()["name"], format!("editor-{u1}"));
    assert_eq!(row_of(&db, &u1), "gw-a running");
    assert_eq!(node_label(&u1), "gw-a", "the containers carry the owning node's label");
    let started = Instant::now();
    for m in [&b, &c] {
        eventually(Duration::from_secs(1), "B and C serve the workspace started through A", || {
            get(m, &u1, &t1, "/hello").status == 200
        });
    }
    println!("a workspace started through A was served by B and C after {:?}", started.elapsed());
    let containers = podman(&["ps", "--filter", &format!("label=markco.user={u1}"), "--format", "{{.Names}}"]);
    assert_eq!(containers.lines().filter(|l| l.starts_with("markco-editor-")).count(), 1, "{containers}");

    // A is full and C has no room: the second user, asked for through A, is placed on B.
    let r = get(&a, &u2, &t2, "/hello");
    assert_eq!(r.status, 200, "{}\nA:\n{}\nB:\n{}", r.body_text(), a.log(), b.log());
    assert_eq!(row_of(&db, &u2), "gw-b running");
    assert_eq!(node_label(&u2), "gw-b");
    eventually(Duration::from_secs(3), "the cluster view counts each node's workspaces", || {
        let v = http_get(b.admin, "/api/admin/cluster", &[]).expect("cluster").json();
        let n = |id: &str| {
            v["nodes"].as_array().and_then(|n| n.iter().find(|n| n["id"] == id)).map(|n| n["workspaces"].clone())
        };
        n("gw-a") == Some(1.into()) && n("gw-b") == Some(1.into()) && n("gw-c") == Some(0.into())
    });

    // Load on B and C (the second user's workspace, on B) while A stops: nobody sees a failure.
    let wrk = |m: &Markco| {
        Command::new("wrk")
            .args(["-t1", "-c4", "-d6s", "-H", &format!("Authorization: Bearer {t2}")])
            .arg(format!("http://{}/u/{u2}/load", m.http))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("wrk is installed (apt-get install wrk)")
    };
    let (wrk_b, wrk_c) = (wrk(&b), wrk(&c));
    std::thread::sleep(Duration::from_secs(1));
    let _ = a.stop();
    for (name, w) in [("B", wrk_b), ("C", wrk_c)] {
        let out = w.wait_with_output().expect("wrk output");
        let report = String::from_utf8_lossy(&out.stdout);
        println!("wrk through {name} while A stopped:\n{report}");
        assert!(out.status.success() && report.contains("requests in"), "{report}");
        assert!(!report.contains("Non-2xx"), "failed requests through {name}:\n{report}");
        assert!(!report.contains("Socket errors"), "socket errors through {name}:\n{report}");
    }

    // A's heartbeat is older than node_timeout: its workspace is marked lost.
    eventually(Duration::from_secs(20), "A's workspace is marked lost", || row_of(&db, &u1) == "gw-a lost");
    // C keeps it down: its data is not on storage C trusts to be shared.
    let r = get(&c, &u1, &t1, "/hello");
    assert_eq!(r.status, 503, "{}", r.body_text());
    assert!(r.body_text().contains("gw-a") && r.body_text().contains("down"), "{}", r.body_text());
    // B places it again at its next request, on the only node with room: B.
    let r = get(&b, &u1, &t1, "/hello");
    assert_eq!(r.status, 200, "{}\n{}", r.body_text(), b.log());
    assert_eq!(row_of(&db, &u1), "gw-b running");
    assert_eq!(node_label(&u1), "gw-b");
    eventually(Duration::from_secs(1), "C serves it from B", || get(&c, &u1, &t1, "/hello").status == 200);
}
