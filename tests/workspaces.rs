//! Per-user containers with real podman: lazy start on the first request, one start for many
//! concurrent first requests, whole-id names, and nothing foreign touched.
//!
//! Needs podman's API socket (`scripts/podman-setup.sh` starts it; `MARKCO_PODMAN_SOCKET`
//! overrides the path) and builds its image from the project's test upstream
//! (`scripts/build-test-image.sh`): no image is pulled.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::podman::*;
use common::*;

fn config(slot: u16) -> String {
    format!(
        r#"
[server]
http = "{{http}}"
admin = "{{admin}}"
upgrade_sock = "{{dir}}/upgrade.sock"
pid_file = "{{dir}}/markco.pid"

[database]
url = "sqlite://{{dir}}/markco.db"

{workspaces}
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
        workspaces = workspaces_section(slot, "{dir}/users"),
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
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    podman(&args).lines().filter(|n| n.starts_with("markco-")).map(str::to_owned).collect()
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
        let _ = podman_cmd(&["rm", "-f", &self.0]);
    }
}

/// Removes a user's pod whatever happens in the test.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for user in &self.0 {
            let _ = podman_cmd(&["pod", "rm", "-f", &format!("markco-ws-{user}")]);
        }
    }
}

#[test]
fn first_request_starts_both_containers_and_is_answered_through_them() {
    let m = Markco::start(&config(0));
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
    let text = podman(&["pod", "inspect", &format!("markco-ws-{user}")]);
    assert!(text.contains("127.0.0.1"), "{text}");
    assert!(
        !text.contains("\"HostIp\": \"\"") && !text.contains("0.0.0.0"),
        "a port is published beyond loopback: {text}"
    );
    // The user's plan ("free") sets the limits.
    let mem = |name: &str| podman(&["inspect", "--format", "{{.HostConfig.Memory}}", name]).trim().to_string();
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
    let m = Markco::start(&config(1));
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
    let m = Markco::start(&config(2));
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
    let r = raw_exchange_one(
        m.http,
        format!("GET /u/{a}/ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ta}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").as_bytes(),
        Duration::from_secs(10),
    )
    .expect("a complete answer to the upgrade");
    assert_eq!(r.status, 503, "{}", r.body_text());
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
    podman(&["inspect", "--format", "{{.State.StartedAt}}", name]).trim().to_string()
}

fn with_idle(cfg: String, idle: &str) -> String {
    cfg.replace("ready_timeout = \"20s\"", &format!("ready_timeout = \"20s\"\nidle_timeout = \"{idle}\""))
}

#[test]
fn a_killed_editor_is_noticed_and_the_workspace_comes_back() {
    let m = Markco::start(&config(3));
    let (user, token) = add_user(&m, "kill@example.com");
    let _c = Cleanup(vec![user.clone()]);
    let auth = format!("Bearer {token}");
    assert_eq!(http_get(m.http, &format!("/u/{user}/"), &[("Authorization", &auth)]).expect("get").status, 200);
    let editor = format!("markco-editor-{user}");
    let before = started_at(&editor);
    let killed = Instant::now();
    podman(&["kill", &editor]);
    eventually(Duration::from_secs(30), "markco notices the exit", || m.log().contains("workspace container died"));
    println!("exit noticed after {:?}", killed.elapsed());
    eventually(Duration::from_secs(15), "the workspace is back", || {
        http_get(m.http, &format!("/u/{user}/"), &[("Authorization", &auth)]).is_ok_and(|r| r.status == 200)
    });
    assert_ne!(started_at(&editor), before, "the editor was restarted");
}

#[test]
fn a_restart_of_markco_adopts_running_containers_and_removes_strays_only() {
    let cfg = config(4);
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
    let owner_env = format!("MARKCO_TEST_OWNER={}", owner());
    let run = |args: &[&str]| {
        podman(args);
    };
    run(&["run", "-d", "--name", &foreign, "-e", "PORT=8080", "-e", &owner_env, img]);
    let stray_pod = "markco-ws-00000000-dead-4000-8000-000000000000";
    // The stray carries this gateway's instance label (read off its own container).
    let instance =
        podman(&["inspect", "--format", "{{ index .Config.Labels \"markco.instance\" }}", &editor]).trim().to_string();
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
        "-e",
        &owner_env,
        img,
    ]);

    let (dir, ports) = m.stop();
    let m = Markco::start_in(dir, ports, &cfg, &[]);
    let r = http_get(m.http, &format!("/u/{user}/"), &[("Authorization", &auth)]).expect("get");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!((started_at(&editor), started_at(&runtime)), (e0, r0), "adopted, not restarted");
    assert!(m.log().contains("adopted running workspace"), "{}", m.log());
    let exists = container_exists;
    assert!(exists(&foreign), "a container markco did not create must not be touched");
    assert!(!exists("markco-editor-00000000-dead-4000-8000-000000000000"), "the stray markco container is removed");
}

#[test]
fn idle_workspaces_are_reaped_and_woken_but_not_with_an_open_websocket() {
    let m = Markco::start(&with_idle(config(5), "2s"));
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
    ws.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    use std::io::{Read, Write};
    ws.write_all(format!("GET /u/{b}/ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tb}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").as_bytes()).expect("write");
    let mut buf = [0u8; 512];
    let n = ws.read(&mut buf).expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"), "{}", String::from_utf8_lossy(&buf[..n]));

    eventually(Duration::from_secs(30), "the idle workspace is stopped", || running_of(&a).is_empty());
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
    let cfg = config(6).replace("ready_timeout = \"20s\"", "ready_timeout = \"20s\"\nhealth_interval = \"300ms\"");
    let m = Markco::start(&cfg);
    let (user, token) = add_user(&m, "hung@example.com");
    let _c = Cleanup(vec![user.clone()]);
    let auth = format!("Bearer {token}");
    assert_eq!(http_get(m.http, &format!("/u/{user}/"), &[("Authorization", &auth)]).expect("get").status, 200);
    let row = http_get(m.admin, &format!("/api/admin/workspaces/{user}"), &[]).expect("get").json();
    let old_port = row["runtime_port"].as_u64().expect("port");
    // The runtime keeps running but stops answering.
    podman(&["pause", &format!("markco-runtime-{user}")]);
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
    // The editor was told the new port through the update-port flow (just after the row moved:
    // the move is stored first, then the editor is told).
    let told = || {
        let r = http_get(m.http, &format!("/u/{user}/_test/runtime-updates"), &[("Authorization", &auth)]);
        match r {
            Ok(r) if r.status == 200 => r.json(),
            Ok(r) => serde_json::json!(format!("{}: {}", r.status, r.body_text())),
            Err(e) => serde_json::json!(format!("request failed: {e}")),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = told();
    while last.as_array().and_then(|a| a.last()).map(|u| u["port"].clone()) != Some(serde_json::json!(new_port)) {
        assert!(
            Instant::now() < deadline,
            "the editor was not told the new runtime port {new_port} within 10 s; it last said {last}\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(25));
        last = told();
    }
    assert!(m.log().contains("runtime health probe failed"), "{}", m.log());
    // The old runtime's exit, which podman may report after the replacement has finished, does
    // not take the workspace down: a request then would start a new editor that never heard of
    // the move.
    std::thread::sleep(Duration::from_secs(1));
    let still = told();
    assert_eq!(
        still.as_array().and_then(|a| a.last()).map(|u| u["port"].clone()),
        Some(serde_json::json!(new_port)),
        "the editor no longer knows the new runtime: it says {still}\n{}",
        m.log()
    );
    let after = http_get(m.admin, &format!("/api/admin/workspaces/{user}"), &[]).expect("get").json();
    assert_eq!(after["editor_port"], row["editor_port"], "the workspace was restarted\n{}", m.log());
    assert_eq!(after["runtime_port"].as_u64(), Some(new_port));
    assert!(!m.log().contains("workspace container died"), "{}", m.log());
}

#[test]
fn admin_start_stop_and_logout_do_what_they_say() {
    let m = Markco::start(&config(7));
    let (user, token) = add_user(&m, "admin-calls@example.com");
    let _c = Cleanup(vec![user.clone()]);
    let auth = format!("Bearer {token}");
    let admin = |path: &str| {
        let r = request(m.admin, "POST", path, &[], b"").unwrap_or_else(|e| panic!("POST {path}: {e}"));
        assert_eq!(r.status, 200, "POST {path}: {}\n{}", r.body_text(), m.log());
        r.json()
    };

    // start: both containers run before any request, and the first request is served by them.
    let v = admin(&format!("/api/admin/workspaces/{user}/start"));
    assert_eq!(v["running"], true, "{v}");
    let names = running_of(&user);
    assert!(
        names.contains(&format!("markco-editor-{user}")) && names.contains(&format!("markco-runtime-{user}")),
        "{names:?}"
    );
    let r = http_get(m.http, &format!("/u/{user}/"), &[("Authorization", &auth)]).expect("get");
    assert_eq!((r.status, r.json()["name"].clone()), (200, serde_json::json!(format!("editor-{user}"))));

    // stop: the containers stop.
    let v = admin(&format!("/api/admin/workspaces/{user}/stop"));
    assert_eq!(v["running"], false, "{v}");
    assert!(running_of(&user).is_empty(), "stopped: {:?}", containers_of(&user));

    // A request starts it again (lazy start), then the auth service deletes the session and
    // calls logout: the cached session is refused at once and the workspace is stopped.
    let r = http_get(m.http, &format!("/u/{user}/again"), &[("Authorization", &auth)]).expect("get");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(running_of(&user).len(), 2);
    let db = m.dir.path().join("markco.db");
    let out = Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('delete from sessions where token=?', (sys.argv[2],)); c.commit()")
        .arg(&db)
        .arg(&token)
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = admin(&format!("/api/admin/users/{user}/logout"));
    assert_eq!((v["sessions_invalidated"].clone(), v["workspace_stopped"].clone()), (true.into(), true.into()), "{v}");
    let r = http_get(m.http, &format!("/u/{user}/"), &[("Authorization", &auth), ("Accept", "application/json")])
        .expect("get");
    assert_eq!(r.status, 401, "a logged-out session is refused: {}", r.body_text());
    assert!(running_of(&user).is_empty(), "logout stops the workspace: {:?}", containers_of(&user));
}

#[test]
fn an_editor_that_never_gets_ready_gives_503_after_ready_timeout() {
    // The editor listens on a port nobody publishes, so its /health never answers.
    let cfg = config(8)
        .replace("ready_timeout = \"20s\"", "ready_timeout = \"3s\"")
        .replace("editor_env = { PORT = \"{port}\"", "editor_env = { PORT = \"9\"");
    assert!(cfg.contains("PORT = \"9\""), "{cfg}");
    let m = Markco::start(&cfg);
    let (user, token) = add_user(&m, "never-ready@example.com");
    let _c = Cleanup(vec![user.clone()]);
    let started = Instant::now();
    let r = http_get(m.http, &format!("/u/{user}/"), &[("Authorization", &format!("Bearer {token}"))]).expect("get");
    let took = started.elapsed();
    println!("never-ready editor: {} after {took:?}", r.status);
    assert_eq!(r.status, 503, "{}", r.body_text());
    assert!(r.header("retry-after").is_some(), "503 with Retry-After");
    assert!(took >= Duration::from_millis(2500), "503 before ready_timeout (3 s): {took:?}");
    assert!(took < Duration::from_secs(15), "503 long after ready_timeout (3 s): {took:?}");
    let metrics = m.metrics();
    let failed = metric_value(&metrics, "markco_workspace_starts_total", &[("result", "error")]);
    assert!(failed.is_some_and(|v| v >= 1.0), "a failed start is counted: {failed:?}\n{metrics}");
}

/// A relay to podman's API socket that the test can cut: markco reaches podman only through it,
/// so "podman's API is down" can be made without stopping the shared service.
struct SocketRelay {
    path: std::path::PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::os::unix::net::UnixStream>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SocketRelay {
    fn start(path: &std::path::Path) -> SocketRelay {
        use std::os::unix::net::{UnixListener, UnixStream};
        use std::sync::atomic::Ordering;
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind the podman relay");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop2, conns2, target) = (stop.clone(), conns.clone(), socket());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let Ok(server) = UnixStream::connect(&target) else { continue };
                let _ = client.set_nonblocking(false);
                let mut list = conns2.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else { continue };
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
                list.extend([client, server]);
            }
        });
        SocketRelay { path: path.to_path_buf(), stop, conns, thread: Some(thread) }
    }

    /// podman's API goes away: the socket is removed and every relayed connection cut.
    fn cut(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        for c in self.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for SocketRelay {
    fn drop(&mut self) {
        self.cut();
    }
}

#[test]
fn podman_api_down_running_workspaces_serve_new_ones_get_503_and_it_recovers() {
    let relay_dir = tempfile::tempdir().expect("tempdir");
    let relay_path = relay_dir.path().join("podman.sock");
    let mut relay = SocketRelay::start(&relay_path);
    let cfg = config(9)
        .replace(&format!("unix://{}", socket()), &format!("unix://{}", relay_path.display()))
        .replace("ready_timeout = \"20s\"", "ready_timeout = \"5s\"");
    assert!(cfg.contains(&relay_path.display().to_string()));
    let m = Markco::start(&cfg);
    let http = m.http;
    let (a, ta) = add_user(&m, "running@example.com");
    let (b, tb) = add_user(&m, "new@example.com");
    let _c = Cleanup(vec![a.clone(), b.clone()]);
    let get = |u: &str, t: &str| {
        http_get(http, &format!("/u/{u}/"), &[("Authorization", &format!("Bearer {t}"))]).expect("get")
    };
    assert_eq!(get(&a, &ta).status, 200, "A's workspace starts");

    relay.cut();
    // A's running workspace does not need podman to be served.
    let r = get(&a, &ta);
    assert_eq!((r.status, r.json()["name"].clone()), (200, format!("editor-{a}").into()));
    // B's first request cannot start anything: 503 with Retry-After, in bounded time.
    let t = Instant::now();
    let r = get(&b, &tb);
    let took = t.elapsed();
    println!("first request with podman's API down: {} after {took:?}", r.status);
    assert_eq!(r.status, 503, "{}", r.body_text());
    assert!(r.header("retry-after").is_some());
    assert!(took < Duration::from_secs(20), "the request waited {took:?}");
    assert_eq!(http_get(m.admin, "/health", &[]).expect("markco still answers").status, 200);

    // The API comes back: B's workspace starts on the next request.
    let _back = SocketRelay::start(&relay_path);
    eventually(Duration::from_secs(60), "B's workspace starts once podman's API is back", || {
        get(&b, &tb).status == 200
    });
    assert_eq!(running_of(&b).len(), 2, "{:?}", containers_of(&b));
}

#[test]
fn a_container_that_keeps_dying_is_restarted_with_doubling_backoff() {
    let m = Markco::start(&config(10));
    let (user, token) = add_user(&m, "crashy@example.com");
    let _c = Cleanup(vec![user.clone()]);
    let auth = format!("Bearer {token}");
    assert_eq!(http_get(m.http, &format!("/u/{user}/"), &[("Authorization", &auth)]).expect("get").status, 200);
    let editor = format!("markco-editor-{user}");
    // The README's backoff: 0.5 s, doubling per restart. A restart cannot come before its delay.
    for (k, delay) in [0.5f64, 1.0, 2.0, 4.0].into_iter().enumerate() {
        let before = started_at(&editor);
        let killed = Instant::now();
        podman(&["kill", &editor]);
        eventually(Duration::from_secs(60), &format!("restart {} of the editor", k + 1), || {
            started_at(&editor) != before
        });
        let took = killed.elapsed().as_secs_f64();
        println!("restart {}: {took:.2} s after the kill (backoff {delay} s)", k + 1);
        assert!(took >= delay, "restart {} came {took:.2} s after the exit, before its {delay} s backoff", k + 1);
        assert!(took < delay + 20.0, "restart {} took {took:.2} s (backoff {delay} s)", k + 1);
        // Back in service before the next kill.
        eventually(Duration::from_secs(60), "the workspace answers again", || {
            http_get(m.http, &format!("/u/{user}/"), &[("Authorization", &auth)]).is_ok_and(|r| r.status == 200)
        });
    }
    let exits = metric_value(&m.metrics(), "markco_workspace_container_exits_total", &[]);
    assert!(exits.is_some_and(|v| v >= 4.0), "container exits counted: {exits:?}");
}

#[test]
fn a_reload_changes_the_next_start_and_names_what_needs_a_restart() {
    let cfg = config(11);
    let mut m = Markco::start(&cfg);
    let (a, token_a) = add_user(&m, "before-reload@example.com");
    let (b, token_b) = add_user(&m, "after-reload@example.com");
    let _c = Cleanup(vec![a.clone(), b.clone()]);
    let get = |user: &str, token: &str| {
        let r =
            request(m.http, "GET", &format!("/u/{user}/who"), &[("Authorization", &format!("Bearer {token}"))], b"")
                .expect("get");
        assert_eq!(r.status, 200, "{}\n{}", r.body_text(), m.log());
        r.json()["name"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(get(&a, &token_a), format!("editor-{a}"));

    // The editors' environment and the free plan's memory apply to the next start; the engine's
    // socket needs a restart (its client is made once) and is named, not dropped.
    let changed = cfg
        .replace("MARKCO_TU_NAME = \"editor-{user_id}\"", "MARKCO_TU_NAME = \"reloaded-editor-{user_id}\"")
        .replace("editor_memory_mb = 80", "editor_memory_mb = 88")
        .replace(&format!("engine = \"unix://{}\"", socket()), "engine = \"unix:///nonexistent/podman.sock\"");
    assert_ne!(changed, cfg);
    m.write_config(&changed);
    let r = request(m.admin, "POST", "/reload", &[], b"").expect("POST /reload");
    let v = r.json();
    assert_eq!(r.status, 200, "{v}");
    assert_eq!(v["needs_restart"], serde_json::json!(["workspaces.engine_socket"]), "{v}");

    // A running workspace keeps what it was started with; the next start gets the new settings
    // (on the engine markco started with).
    assert_eq!(get(&a, &token_a), format!("editor-{a}"));
    assert_eq!(get(&b, &token_b), format!("reloaded-editor-{b}"), "{}", m.log());
    let mem = |name: &str| podman(&["inspect", "--format", "{{.HostConfig.Memory}}", name]).trim().to_string();
    assert_eq!(mem(&format!("markco-editor-{a}")), (80u64 * 1024 * 1024).to_string());
    assert_eq!(mem(&format!("markco-editor-{b}")), (88u64 * 1024 * 1024).to_string());
    assert!(m.alive());
}
