//! Runtime moves with `POST /api/runtime/update-port`: under load with wrk, to a dead target,
//! rate limited, and persisted across a restart.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn config(max_moves: usize) -> String {
    format!(
        r#"
[server]
http = "{{http}}"
admin = "{{admin}}"
upgrade_sock = "{{dir}}/upgrade.sock"
pid_file = "{{dir}}/markco.pid"

[database]
url = "sqlite://{{dir}}/markco.db"

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
"#
    )
}

fn move_to(m: &Markco, user: &str, port: u16) -> Resp {
    let body = serde_json::json!({"userId": user, "port": port, "host": "127.0.0.1"}).to_string();
    request(m.admin, "POST", "/api/runtime/update-port", &[("Content-Type", "application/json")], body.as_bytes())
        .expect("update-port")
}

fn runtime_name(m: &Markco, user: &str, token: &str) -> String {
    let r =
        http_get(m.http, &format!("/r/{user}/whoami"), &[("Authorization", &format!("Bearer {token}"))]).expect("get");
    assert_eq!(r.status, 200, "{}", r.body_text());
    r.json()["name"].as_str().unwrap_or_default().to_string()
}

#[test]
fn hundred_moves_under_load_lose_no_request() {
    let m = Markco::start(&config(1000));
    let (user, token) = add_user(&m, "mover@example.com");
    let editor = Upstream::start("editor");
    let one = Upstream::start("one");
    let two = Upstream::start("two");
    put_workspace(&m, &user, editor.addr, one.addr);
    assert_eq!(runtime_name(&m, &user, &token), "one");

    // wrk keeps 16 connections busy on the runtime route while we move it back and forth.
    let url = format!("http://{}/r/{user}/load", m.http);
    let wrk = Command::new("wrk")
        .args(["-t2", "-c16", "-d12s", "-H", &format!("Authorization: Bearer {token}"), &url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("wrk is installed (apt-get install wrk)");
    // The moves start once wrk's requests are flowing through the runtime route.
    eventually(Duration::from_secs(20), "wrk's requests reach the runtime route", || {
        metric_value(&m.metrics(), "markco_http_request_duration_seconds_count", &[("route", "runtime")])
            .is_some_and(|n| n >= 50.0)
    });
    let started = Instant::now();
    for i in 0..100 {
        let (target, name) = if i % 2 == 0 { (&two, "two") } else { (&one, "one") };
        let r = move_to(&m, &user, target.addr.port());
        assert_eq!(r.status, 200, "move {i}: {}", r.body_text());
        assert_eq!(r.json()["editor_notified"], true, "move {i}: {}", r.body_text());
        // The very next request goes to the new runtime.
        assert_eq!(runtime_name(&m, &user, &token), name, "move {i}");
    }
    let moves_took = started.elapsed();
    let out = wrk.wait_with_output().expect("wrk output");
    let report = String::from_utf8_lossy(&out.stdout);
    println!("100 moves in {moves_took:?}\n{report}");
    assert!(out.status.success(), "wrk failed: {report} {}", String::from_utf8_lossy(&out.stderr));
    assert!(!report.contains("Non-2xx"), "failed requests during the moves:\n{report}");
    assert!(!report.contains("Socket errors"), "socket errors during the moves:\n{report}");
    assert!(report.contains("requests in"), "{report}");

    // The editor was told every time, in order, with the new port.
    let r = http_get(editor.addr, "/_test/runtime-updates", &[]).expect("updates");
    let updates = r.json();
    let updates = updates.as_array().expect("array");
    assert_eq!(updates.len(), 100);
    assert_eq!(updates[0]["port"], two.addr.port());
    assert_eq!(updates[99]["port"], one.addr.port());
    assert_eq!(updates[99]["host"], "127.0.0.1");
}

#[test]
fn an_editor_restarting_during_a_move_is_told_once_it_listens_again() {
    let m = Markco::start(&config(10));
    let (user, _token) = add_user(&m, "restarting-editor@example.com");
    let one = Upstream::start("one");
    let two = Upstream::start("two");
    // The editor's port is closed when the move is made (the editor is restarting), and
    // listens again 300 ms later.
    let editor_port = free_port();
    let editor_addr: std::net::SocketAddr = format!("127.0.0.1:{editor_port}").parse().expect("address");
    put_workspace(&m, &user, editor_addr, one.addr);
    let back = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        Upstream::start_on("editor", &editor_addr.to_string())
    });
    let started = Instant::now();
    let r = move_to(&m, &user, two.addr.port());
    let took = started.elapsed();
    let editor = back.join().expect("editor thread");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.json()["editor_notified"], true, "told after {took:?}: {}", r.body_text());
    let r = http_get(editor.addr, "/_test/runtime-updates", &[]).expect("updates");
    let updates = r.json();
    assert_eq!(updates.as_array().map(|a| a.len()), Some(1), "told once: {updates}");
    assert_eq!(updates[0]["port"], two.addr.port());
    println!("the editor was told {took:?} after the move began");
}

#[test]
fn dead_target_is_refused_and_nothing_changes_and_moves_survive_restart() {
    let m = Markco::start(&config(3));
    let (user, token) = add_user(&m, "stay@example.com");
    let editor = Upstream::start("editor");
    let one = Upstream::start("one");
    let two = Upstream::start("two");
    put_workspace(&m, &user, editor.addr, one.addr);

    let dead = free_port();
    let r = move_to(&m, &user, dead);
    assert_eq!(r.status, 409, "{}", r.body_text());
    assert!(r.json()["error"].as_str().unwrap_or("").contains("stays on"), "{}", r.body_text());
    assert_eq!(runtime_name(&m, &user, &token), "one", "a failed probe leaves the user where they were");
    let r = http_get(editor.addr, "/_test/runtime-updates", &[]).expect("updates");
    assert_eq!(r.json().as_array().map(|a| a.len()), Some(0), "the editor is not told about a refused move");

    let r = move_to(&m, &user, two.addr.port());
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(runtime_name(&m, &user, &token), "two");

    // Unknown user, bad body.
    let body =
        serde_json::json!({"userId": "00000000-0000-4000-8000-000000000000", "port": two.addr.port()}).to_string();
    let r = request(m.admin, "POST", "/api/runtime/update-port", &[], body.as_bytes()).expect("post");
    assert_eq!(r.status, 404, "{}", r.body_text());
    let r = request(m.admin, "POST", "/api/runtime/update-port", &[], b"{not json").expect("post");
    assert_eq!(r.status, 400);

    // Rate limit: 3 moves per window here; one was done, two more pass, the next gets 429.
    assert_eq!(move_to(&m, &user, one.addr.port()).status, 200);
    assert_eq!(move_to(&m, &user, two.addr.port()).status, 200);
    let r = move_to(&m, &user, one.addr.port());
    assert_eq!(r.status, 429, "{}", r.body_text());
    assert_eq!(runtime_name(&m, &user, &token), "two");

    // A restart keeps the last move.
    let (dir, ports) = m.stop();
    let m = Markco::start_in(dir, ports, &config(3), &[]);
    assert_eq!(runtime_name(&m, &user, &token), "two", "the moved runtime is where the restart finds it");
    let r = http_get(m.admin, &format!("/api/admin/workspaces/{user}"), &[]).expect("get");
    assert_eq!(r.json()["runtime_port"], two.addr.port());
}

#[test]
fn a_move_lets_the_slow_response_and_the_websocket_in_flight_finish_on_the_old_runtime() {
    use futures_util::{SinkExt, StreamExt};
    use std::io::{Read, Write};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

    let m = Markco::start(&config(10));
    let (user, token) = add_user(&m, "inflight@example.com");
    let editor = Upstream::start("editor");
    let one = Upstream::start("one");
    let two = Upstream::start("two");
    put_workspace(&m, &user, editor.addr, one.addr);
    let step = Duration::from_secs(20);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let whoami = |ws: &mut tokio_tungstenite::WebSocketStream<_>| {
        rt.block_on(async {
            ws.send(Message::text("__whoami")).await.expect("send");
            match tokio::time::timeout(step, ws.next()).await.expect("a reply in time") {
                Some(Ok(Message::Text(t))) => t.as_str().to_string(),
                other => panic!("expected a text reply, got {other:?}"),
            }
        })
    };

    // A websocket to the runtime, and a slow response from it (6 chunks 1 s apart).
    let mut req = format!("ws://{}/r/{user}/ws", m.http).into_client_request().expect("request");
    req.headers_mut().insert("Authorization", format!("Bearer {token}").parse().expect("header"));
    let (mut ws, _) = rt
        .block_on(async { tokio::time::timeout(step, tokio_tungstenite::connect_async(req)).await })
        .expect("websocket handshake in time")
        .expect("websocket to the runtime");
    assert_eq!(whoami(&mut ws), "one");
    let mut s = std::net::TcpStream::connect(m.http).expect("connect");
    s.set_read_timeout(Some(step)).expect("timeout");
    let sent = Instant::now();
    write!(
        s,
        "GET /r/{user}/drip?chunks=6&interval_ms=1000 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(8).any(|w| w == b"chunk 0\n") {
        let n = s.read(&mut buf).expect("the first chunk");
        assert!(n > 0, "closed before the first chunk: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }

    // The move: new requests reach "two" at once...
    let r = move_to(&m, &user, two.addr.port());
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(runtime_name(&m, &user, &token), "two");
    assert!(sent.elapsed() < Duration::from_secs(5), "the move came after the response ended: nothing was tested");

    // ...the response in flight finishes whole on "one", and the websocket still reaches "one".
    got.extend(read_to_close(&mut s).expect("the rest of the response"));
    let r = parse_response(&got)
        .unwrap_or_else(|| panic!("the response across the move is incomplete: {:?}", String::from_utf8_lossy(&got)));
    assert_eq!(r.status, 200);
    assert_eq!(r.body_text(), (0..6).map(|i| format!("chunk {i}\n")).collect::<String>());
    assert_eq!(whoami(&mut ws), "one", "an open websocket keeps the runtime it was opened on");
    rt.block_on(async {
        let _ = ws.close(None).await;
    });
}

/// `GET /api/admin/moves` (the operator page's "runtime moves"): the recorded moves, newest
/// first, each with when, whose, from and to; for the admin token only.
#[test]
fn admin_lists_the_latest_moves_newest_first() {
    let secrets = tempfile::tempdir().expect("tempdir for the token");
    let admin_token = "moves-t0ken-for-markco-tests-0123456789abcdef";
    let token_path = secrets.path().join("admin.token");
    std::fs::write(&token_path, format!("{admin_token}\n")).expect("write token file");
    let cfg = config(5).replace(
        "pid_file = \"{dir}/markco.pid\"\n",
        &format!("pid_file = \"{{dir}}/markco.pid\"\nadmin_token_file = \"{}\"\n", token_path.display()),
    );
    assert!(cfg.contains("admin_token_file"));
    let m = Markco::start(&cfg);
    let bearer = format!("Bearer {admin_token}");
    let auth = [("Authorization", bearer.as_str()), ("Content-Type", "application/json")];
    let moves = || {
        let r = http_get(m.admin, "/api/admin/moves", &auth).expect("GET moves");
        assert_eq!(r.status, 200, "{}", r.body_text());
        r.json()["moves"].as_array().cloned().expect("a moves array")
    };
    let (user, _) = add_user(&m, "mover@example.com");
    let editor = Upstream::start("editor");
    let one = Upstream::start("one");
    let two = Upstream::start("two");
    let body = serde_json::json!({"editor": editor.addr.to_string(), "runtime": one.addr.to_string()}).to_string();
    let r = request(m.admin, "PUT", &format!("/api/admin/workspaces/{user}"), &auth, body.as_bytes()).expect("PUT");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(moves(), Vec::<serde_json::Value>::new(), "no moves yet");
    let r = http_get(m.admin, "/api/admin/moves", &[]).expect("GET moves without the token");
    assert_eq!(r.status, 401, "{}", r.body_text());

    let before = unix_now();
    for target in [&two, &one] {
        let body = serde_json::json!({"userId": user, "port": target.addr.port(), "host": "127.0.0.1"}).to_string();
        let r = request(m.admin, "POST", "/api/runtime/update-port", &auth, body.as_bytes()).expect("update-port");
        assert_eq!(r.status, 200, "{}", r.body_text());
    }
    let list = moves();
    println!("moves: {list:?}");
    assert_eq!(list.len(), 2, "{list:?}");
    let (one, two) = (one.addr.to_string(), two.addr.to_string());
    assert_eq!(
        (list[0]["from"].as_str(), list[0]["to"].as_str()),
        (Some(two.as_str()), Some(one.as_str())),
        "newest first"
    );
    assert_eq!((list[1]["from"].as_str(), list[1]["to"].as_str()), (Some(one.as_str()), Some(two.as_str())));
    for mv in &list {
        assert_eq!(mv["user_id"].as_str(), Some(user.as_str()));
        assert_eq!(mv["status"].as_str(), Some("completed"));
        let at = mv["at"].as_i64().expect("at, unix seconds");
        assert!((before - 1..=unix_now() + 1).contains(&at), "at {at}");
    }
}

fn unix_now() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
}

#[test]
fn another_users_address_is_refused_with_409_and_nobody_moves() {
    let m = Markco::start(&config(10));
    let (a, token_a) = add_user(&m, "owner-a@example.com");
    let (b, token_b) = add_user(&m, "owner-b@example.com");
    let (c, _) = add_user(&m, "owner-c@example.com");
    let (editor_a, editor_b) = (Upstream::start("editor-a"), Upstream::start("editor-b"));
    let (runtime_a, runtime_b) = (Upstream::start("runtime-a"), Upstream::start("runtime-b"));
    put_workspace(&m, &a, editor_a.addr, runtime_a.addr);
    put_workspace(&m, &b, editor_b.addr, runtime_b.addr);

    // A third workspace on a's editor address: refused, and not registered.
    let body = serde_json::json!({"editor": editor_a.addr.to_string(), "runtime": "127.0.0.1:1"}).to_string();
    let r = request(m.admin, "PUT", &format!("/api/admin/workspaces/{c}"), &[], body.as_bytes()).expect("PUT");
    assert_eq!(r.status, 409, "{}", r.body_text());
    assert!(r.json()["error"].as_str().unwrap_or("").contains(&editor_a.addr.to_string()), "{}", r.body_text());
    let r = http_get(m.admin, &format!("/api/admin/workspaces/{c}"), &[]).expect("GET");
    assert_eq!(r.status, 404, "{}", r.body_text());

    // b's runtime onto a's (which answers the probe): refused before anything moves.
    let r = move_to(&m, &b, runtime_a.addr.port());
    assert_eq!(r.status, 409, "{}", r.body_text());
    assert!(r.json()["error"].as_str().unwrap_or("").contains("already used"), "{}", r.body_text());
    assert_eq!(runtime_name(&m, &b, &token_b), "runtime-b");
    assert_eq!(runtime_name(&m, &a, &token_a), "runtime-a");
    let r = http_get(editor_b.addr, "/_test/runtime-updates", &[]).expect("updates");
    assert_eq!(r.json().as_array().map(|u| u.len()), Some(0), "b's editor is not told about a refused move");
}
