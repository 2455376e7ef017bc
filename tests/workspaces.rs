//! Per-user containers with real podman: lazy start on the first request, one start for many
//! concurrent first requests, whole-id names, and nothing foreign touched.
//!
//! Needs podman's API socket (`scripts/podman-setup.sh` starts it; `MARKCO_PODMAN_SOCKET`
//! overrides the path) and builds its image from the project's test upstream
//! (`scripts/build-test-image.sh`): no image is pulled.

mod common;

use std::process::Command;
use std::sync::Once;
use std::time::{Duration, Instant};

use common::*;

fn socket() -> String {
    std::env::var("MARKCO_PODMAN_SOCKET").unwrap_or_else(|_| "/run/podman/podman.sock".into())
}

fn image() -> &'static str {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let out = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-test-image.sh"))
            .output()
            .expect("run scripts/build-test-image.sh");
        assert!(
            out.status.success(),
            "building the test image failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
    "localhost/markco-testupstream:test"
}

fn config(ports: (u16, u16)) -> String {
    format!(
        r#"
[server]
http = "{{http}}"
admin = "{{admin}}"
upgrade_sock = "{{dir}}/upgrade.sock"
pid_file = "{{dir}}/markco.pid"

[database]
url = "sqlite://{{dir}}/markco.db"

[workspaces]
engine = "unix://{socket}"
data_dir = "{{dir}}/users"
editor_image = "{image}"
runtime_image = "{image}"
editor_ports = "{e0}-{e1}"
runtime_ports = "{r0}-{r1}"
ready_timeout = "20s"
editor_command = []
runtime_command = []
editor_env = {{ PORT = "{{port}}", MARKCO_TU_NAME = "editor-{{user_id}}" }}
runtime_env = {{ PORT = "{{port}}", MARKCO_TU_NAME = "runtime-{{user_id}}" }}
editor_memory_mb = 64
runtime_memory_mb = 64

[workspaces.plans.free]
editor_memory_mb = 80
runtime_memory_mb = 96
runtime_cpus = 0.5

[[site]]
hosts = ["*"]

  [[site.route]]
  match = ["/u/*"]
  workspace = true

  [[site.route]]
  match = ["/r/*"]
  runtime = true
"#,
        socket = socket(),
        image = image(),
        e0 = ports.0,
        e1 = ports.0 + 499,
        r0 = ports.1,
        r1 = ports.1 + 499,
    )
}

/// markco's containers of a user (by its label; the pod's infra container left out), all or
/// only the running ones.
fn containers(user: &str, running_only: bool) -> Vec<String> {
    let mut args = vec!["ps".to_string()];
    if !running_only {
        args.push("-a".into());
    }
    args.extend(["--filter".into(), format!("label=markco.user={user}"), "--format".into(), "{{.Names}}".into()]);
    let out = Command::new("podman").args(&args).output().expect("podman ps");
    String::from_utf8_lossy(&out.stdout).lines().filter(|n| n.starts_with("markco-")).map(str::to_owned).collect()
}

fn containers_of(user: &str) -> Vec<String> {
    containers(user, false)
}

fn running_of(user: &str) -> Vec<String> {
    containers(user, true)
}

/// Removes a container the test made by hand, whatever happens in the test.
struct RemoveContainer(String);

impl Drop for RemoveContainer {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rm", "-f", &self.0]).output();
    }
}

/// Removes a user's pod whatever happens in the test.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for user in &self.0 {
            let _ = Command::new("podman").args(["pod", "rm", "-f", &format!("markco-ws-{user}")]).output();
        }
    }
}

#[test]
fn first_request_starts_both_containers_and_is_answered_through_them() {
    let m = Markco::start(&config((31000, 51000)));
    let (user, token) = add_user(&m, "first@example.com");
    let _c = Cleanup(vec![user.clone()]);
    let auth = format!("Bearer {token}");
    let started = Instant::now();
    let r = request(m.http, "GET", &format!("/u/{user}/hello"), &[("Authorization", &auth)], b"").expect("get");
    let took = started.elapsed();
    println!("first request (start to ready and answer): {took:?}");
    assert_eq!(r.status, 200, "{}\n{}", r.body_text(), m.log());
    assert_eq!(r.json()["name"], format!("editor-{user}"));
    assert_eq!(r.json()["path"], "/hello");
    let r = http_get(m.http, &format!("/r/{user}/mrp/v1/capabilities"), &[("Authorization", &auth)]).expect("get");
    assert_eq!(r.json()["name"], format!("runtime-{user}"));
    let names = running_of(&user);
    assert!(names.contains(&format!("markco-editor-{user}")), "{names:?}");
    assert!(names.contains(&format!("markco-runtime-{user}")), "{names:?}");
    // Published on 127.0.0.1 only.
    let ports =
        Command::new("podman").args(["pod", "inspect", &format!("markco-ws-{user}")]).output().expect("inspect");
    let text = String::from_utf8_lossy(&ports.stdout);
    assert!(text.contains("127.0.0.1"), "{text}");
    assert!(
        !text.contains("\"HostIp\": \"\"") && !text.contains("0.0.0.0"),
        "a port is published beyond loopback: {text}"
    );
    // The user's plan ("free") sets the limits.
    let mem = |name: &str| {
        let out = Command::new("podman")
            .args(["inspect", "--format", "{{.HostConfig.Memory}}", name])
            .output()
            .expect("inspect");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(mem(&format!("markco-runtime-{user}")), (96u64 * 1024 * 1024).to_string());
    assert_eq!(mem(&format!("markco-editor-{user}")), (80u64 * 1024 * 1024).to_string());
    // The data directory was created.
    assert!(m.dir.path().join("users").join(&user).is_dir());
    let metrics = m.metrics();
    assert_eq!(metric_value(&metrics, "markco_workspace_starts_total", &[("result", "ok")]), Some(1.0), "{metrics}");
    assert_eq!(metric_value(&metrics, "markco_workspace_start_seconds_count", &[]), Some(1.0), "{metrics}");
}

#[test]
fn twenty_concurrent_first_requests_start_one_workspace() {
    let m = Markco::start(&config((32000, 52000)));
    let (user, token) = add_user(&m, "many@example.com");
    let _c = Cleanup(vec![user.clone()]);
    let auth = format!("Bearer {token}");
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let (http, user, auth) = (m.http, user.clone(), auth.clone());
            std::thread::spawn(move || {
                request(http, "GET", &format!("/u/{user}/n{i}"), &[("Authorization", &auth)], b"").map(|r| r.status)
            })
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().expect("thread").expect("request")).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}\n{}", m.log());
    let names = containers_of(&user);
    assert_eq!(names.len(), 2, "exactly one editor and one runtime: {names:?}");
}

#[test]
fn users_sharing_an_id_prefix_get_separate_containers_and_websockets_never_start_one() {
    let m = Markco::start(&config((33000, 53000)));
    // Two ids with the same first 8 characters (today's names kept only those, so starting one
    // user's editor replaced the other's). Inserted as the auth service would.
    let (a, b) =
        ("abcdef12-1111-4111-8111-111111111111".to_string(), "abcdef12-2222-4222-8222-222222222222".to_string());
    let (ta, tb) = ("token-prefix-a".to_string(), "token-prefix-b".to_string());
    let db = m.dir.path().join("markco.db");
    let sql = format!(
        "insert into users (id, email) values ('{a}', 'pa@example.com'), ('{b}', 'pb@example.com'); \
         insert into sessions (id, user_id, token, expires_at) values ('s1', '{a}', '{ta}', strftime('%s','now') + 3600), \
         ('s2', '{b}', '{tb}', strftime('%s','now') + 3600);"
    );
    let out = Command::new("python3")
        .args(["-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.executescript(sys.argv[2]); c.commit()"])
        .arg(&db)
        .arg(&sql)
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _c = Cleanup(vec![a.clone(), b.clone()]);
    // A websocket upgrade to a stopped workspace gets 503 and starts nothing.
    let raw = raw_exchange(
        m.http,
        format!("GET /u/{a}/ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ta}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .expect("io");
    assert_eq!(parse_response(&raw).map(|r| r.status), Some(503));
    assert!(containers_of(&a).is_empty(), "a websocket must not start a workspace");

    for (u, t) in [(&a, &ta), (&b, &tb)] {
        let r = http_get(m.http, &format!("/u/{u}/"), &[("Authorization", &format!("Bearer {t}"))]).expect("get");
        assert_eq!(r.status, 200, "{}", r.body_text());
        assert_eq!(r.json()["name"], format!("editor-{u}"));
    }
    // Both still run: starting B did not replace A's containers.
    assert_eq!(running_of(&a).len(), 2, "{:?}", containers_of(&a));
    assert_eq!(running_of(&b).len(), 2, "{:?}", containers_of(&b));
    let r = http_get(m.http, &format!("/u/{a}/"), &[("Authorization", &format!("Bearer {ta}"))]).expect("get");
    assert_eq!(r.json()["name"], format!("editor-{a}"));
}

fn started_at(name: &str) -> String {
    let out =
        Command::new("podman").args(["inspect", "--format", "{{.State.StartedAt}}", name]).output().expect("inspect");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn with_idle(cfg: String, idle: &str) -> String {
    cfg.replace("ready_timeout = \"20s\"", &format!("ready_timeout = \"20s\"\nidle_timeout = \"{idle}\""))
}

#[test]
fn a_killed_editor_is_noticed_and_the_workspace_comes_back() {
    let m = Markco::start(&config((34000, 54000)));
    let (user, token) = add_user(&m, "kill@example.com");
    let _c = Cleanup(vec![user.clone()]);
    let auth = format!("Bearer {token}");
    assert_eq!(http_get(m.http, &format!("/u/{user}/"), &[("Authorization", &auth)]).expect("get").status, 200);
    let editor = format!("markco-editor-{user}");
    let before = started_at(&editor);
    let killed = Instant::now();
    let out = Command::new("podman").args(["kill", &editor]).output().expect("podman kill");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually(Duration::from_secs(2), "markco notices the exit", || m.log().contains("workspace container died"));
    println!("exit noticed after {:?}", killed.elapsed());
    eventually(Duration::from_secs(15), "the workspace is back", || {
        http_get(m.http, &format!("/u/{user}/"), &[("Authorization", &auth)]).is_ok_and(|r| r.status == 200)
    });
    assert_ne!(started_at(&editor), before, "the editor was restarted");
}

#[test]
fn a_restart_of_markco_adopts_running_containers_and_removes_strays_only() {
    let cfg = config((35000, 55000));
    let m = Markco::start(&cfg);
    let (user, token) = add_user(&m, "adopt@example.com");
    let _c = Cleanup(vec![user.clone(), "00000000-dead-4000-8000-000000000000".into()]);
    let auth = format!("Bearer {token}");
    assert_eq!(http_get(m.http, &format!("/u/{user}/"), &[("Authorization", &auth)]).expect("get").status, 200);
    let editor = format!("markco-editor-{user}");
    let runtime = format!("markco-runtime-{user}");
    let (e0, r0) = (started_at(&editor), started_at(&runtime));
    // A container markco did not create (no label), and a markco-labelled pod of nobody.
    let foreign = format!("not-markco-{}", free_port());
    let _foreign_guard = RemoveContainer(foreign.clone());
    let img = image();
    let run = |args: &[&str]| {
        let out = Command::new("podman").args(args).output().expect("podman");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["run", "-d", "--name", &foreign, "-e", "PORT=8080", img]);
    let stray_pod = "markco-ws-00000000-dead-4000-8000-000000000000";
    // The stray carries this gateway's instance label (read off its own container).
    let out = Command::new("podman")
        .args(["inspect", "--format", "{{ index .Config.Labels \"markco.instance\" }}", &editor])
        .output()
        .expect("inspect");
    let instance = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!instance.is_empty(), "markco labels its containers with its instance");
    let (user_label, instance_label) =
        ("markco.user=00000000-dead-4000-8000-000000000000".to_string(), format!("markco.instance={instance}"));
    run(&[
        "pod",
        "create",
        "--name",
        stray_pod,
        "--label",
        "markco.managed=true",
        "--label",
        &user_label,
        "--label",
        &instance_label,
    ]);
    run(&[
        "run",
        "-d",
        "--pod",
        stray_pod,
        "--name",
        "markco-editor-00000000-dead-4000-8000-000000000000",
        "--label",
        "markco.managed=true",
        "--label",
        &user_label,
        "--label",
        &instance_label,
        "-e",
        "PORT=8080",
        img,
    ]);

    let (dir, ports) = m.stop();
    let m = Markco::start_in(dir, ports, &cfg, &[]);
    let r = http_get(m.http, &format!("/u/{user}/"), &[("Authorization", &auth)]).expect("get");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!((started_at(&editor), started_at(&runtime)), (e0, r0), "adopted, not restarted");
    assert!(m.log().contains("adopted running workspace"), "{}", m.log());
    let exists =
        |name: &str| Command::new("podman").args(["container", "exists", name]).status().is_ok_and(|s| s.success());
    assert!(exists(&foreign), "a container markco did not create must not be touched");
    assert!(!exists("markco-editor-00000000-dead-4000-8000-000000000000"), "the stray markco container is removed");
}

#[test]
fn idle_workspaces_are_reaped_and_woken_but_not_with_an_open_websocket() {
    let m = Markco::start(&with_idle(config((36000, 56000)), "2s"));
    let (a, ta) = add_user(&m, "idle@example.com");
    let (b, tb) = add_user(&m, "busy@example.com");
    let _c = Cleanup(vec![a.clone(), b.clone()]);
    for (u, t) in [(&a, &ta), (&b, &tb)] {
        assert_eq!(
            http_get(m.http, &format!("/u/{u}/"), &[("Authorization", &format!("Bearer {t}"))]).expect("get").status,
            200
        );
    }
    // B keeps a websocket open (and silent) the whole time.
    let mut ws = std::net::TcpStream::connect(m.http).expect("connect");
    use std::io::{Read, Write};
    ws.write_all(format!("GET /u/{b}/ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tb}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").as_bytes()).expect("write");
    let mut buf = [0u8; 512];
    let n = ws.read(&mut buf).expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"), "{}", String::from_utf8_lossy(&buf[..n]));

    eventually(Duration::from_secs(10), "the idle workspace is stopped", || running_of(&a).is_empty());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(running_of(&b).len(), 2, "a workspace with an open websocket is never reaped");
    // The next request wakes the idle one.
    let r = http_get(m.http, &format!("/u/{a}/again"), &[("Authorization", &format!("Bearer {ta}"))]).expect("get");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(running_of(&a).len(), 2);
    drop(ws);
}

#[test]
fn an_unresponsive_runtime_is_replaced_after_three_failed_probes_and_the_editor_is_told() {
    let cfg = config((37000, 57000))
        .replace("ready_timeout = \"20s\"", "ready_timeout = \"20s\"\nhealth_interval = \"300ms\"");
    let m = Markco::start(&cfg);
    let (user, token) = add_user(&m, "hung@example.com");
    let _c = Cleanup(vec![user.clone()]);
    let auth = format!("Bearer {token}");
    assert_eq!(http_get(m.http, &format!("/u/{user}/"), &[("Authorization", &auth)]).expect("get").status, 200);
    let row = http_get(m.admin, &format!("/api/admin/workspaces/{user}"), &[]).expect("get").json();
    let old_port = row["runtime_port"].as_u64().expect("port");
    // The runtime keeps running but stops answering.
    let out = Command::new("podman").args(["pause", &format!("markco-runtime-{user}")]).output().expect("pause");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let paused = Instant::now();
    eventually(Duration::from_secs(20), "the runtime route moves to a new runtime", || {
        http_get(m.admin, &format!("/api/admin/workspaces/{user}"), &[])
            .is_ok_and(|r| r.json()["runtime_port"].as_u64().is_some_and(|p| p != old_port))
    });
    println!("replaced {:?} after the runtime stopped answering", paused.elapsed());
    let new_port = http_get(m.admin, &format!("/api/admin/workspaces/{user}"), &[]).expect("get").json()
        ["runtime_port"]
        .as_u64()
        .expect("port");
    let r = http_get(m.http, &format!("/r/{user}/mrp/v1/capabilities"), &[("Authorization", &auth)]).expect("get");
    assert_eq!(r.status, 200, "{}", r.body_text());
    // The replacement keeps the user's plan limits ("free": 96 MiB here).
    let out = Command::new("podman")
        .args(["inspect", "--format", "{{.HostConfig.Memory}}", &format!("markco-runtime-{user}-p{new_port}")])
        .output()
        .expect("inspect");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), (96u64 * 1024 * 1024).to_string());
    // The editor was told the new port through the update-port flow.
    let r = http_get(m.http, &format!("/u/{user}/_test/runtime-updates"), &[("Authorization", &auth)]).expect("get");
    let updates = r.json();
    assert_eq!(
        updates.as_array().and_then(|a| a.last()).map(|u| u["port"].clone()),
        Some(serde_json::json!(new_port)),
        "{updates}"
    );
    assert!(m.log().contains("runtime health probe failed"), "{}", m.log());
}
