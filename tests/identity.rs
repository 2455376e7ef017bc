//! Identity and per-user routing on the embedded default store (SQLite): who reaches which
//! editor, runtime and user service, and the isolation suite (requests a hostile logged-in user
//! could send, none of which may reach another user's upstreams).

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

const CONFIG: &str = r#"
[server]
http = "{http}"
admin = "{admin}"
upgrade_sock = "{dir}/upgrade.sock"
pid_file = "{dir}/markco.pid"

[database]
url = "sqlite://{dir}/markco.db"

[sessions]
cache_ttl = "30s"
negative_cache_ttl = "1s"

[[site]]
hosts = ["*"]

  [[site.route]]
  name = "workspace"
  match = ["/u/*"]
  workspace = true

  [[site.route]]
  name = "runtime"
  match = ["/r/*"]
  runtime = true

  [[site.route]]
  name = "sync"
  match = ["/sync/*", "/tunnel/*"]
  user_service = "{sync}"

  [[site.route]]
  name = "control"
  match = ["/api/health", "/api/services", "/health"]
  control = true

  [[site.route]]
  name = "fallback"
  match = ["/*"]
  respond = "fallback\n"
  status = 404
"#;

/// Bound on every websocket step: a hang fails instead of blocking the suite.
const WS_TIMEOUT: Duration = Duration::from_secs(10);

struct World {
    m: Markco,
    alice: (String, String),
    bob: (String, String),
    _ups: Vec<Upstream>,
}

/// markco with two users, each with an editor and a runtime, and a shared sync service.
fn world() -> World {
    let sync = Upstream::start("sync");
    let m = Markco::start(&CONFIG.replace("{sync}", &sync.addr.to_string()));
    let alice = add_user(&m, "alice@example.com");
    let bob = add_user(&m, "bob@example.com");
    let ea = Upstream::start("editor-alice");
    let ra = Upstream::start("runtime-alice");
    let eb = Upstream::start("editor-bob");
    let rb = Upstream::start("runtime-bob");
    put_workspace(&m, &alice.0, ea.addr, ra.addr);
    put_workspace(&m, &bob.0, eb.addr, rb.addr);
    World { m, alice, bob, _ups: vec![sync, ea, ra, eb, rb] }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Nothing of Bob's upstreams (nor the sync service, which would act for the user in the path)
/// may answer, and the status is the one the README promises for the case.
fn assert_not_bobs(what: &str, r: &Resp, want: u16) {
    let body = r.body_text();
    for marker in ["editor-bob", "runtime-bob", "\"name\":\"sync\""] {
        assert!(!body.contains(marker), "{what}: reached {marker}: {body}");
    }
    assert_eq!(r.status, want, "{what}: {body}");
}

#[test]
fn owner_reaches_own_editor_runtime_and_sync() {
    let w = world();
    let (alice, token) = &w.alice;
    let auth = bearer(token);
    let r = http_get(w.m.http, &format!("/u/{alice}/some/page?x=1&token={token}"), &[("Authorization", &auth)])
        .expect("get");
    assert_eq!(r.status, 200, "{}", r.body_text());
    let v = r.json();
    assert_eq!(v["name"], "editor-alice");
    assert_eq!(v["path"], "/some/page", "the /u/<id> prefix is stripped");
    assert_eq!(v["query"], "x=1", "the token never reaches the upstream");
    let r = http_get(w.m.http, &format!("/u/{alice}"), &[("Authorization", &auth)]).expect("get");
    assert_eq!(r.json()["path"], "/");
    let r = http_get(w.m.http, &format!("/r/{alice}/mrp/v1/x"), &[("Cookie", &format!("session_token={token}"))])
        .expect("get");
    assert_eq!(r.json()["name"], "runtime-alice");
    assert_eq!(r.json()["path"], "/mrp/v1/x");
    let r = http_get(w.m.http, &format!("/sync/{alice}/proj/doc.md?token={token}"), &[("X-User-Id", &w.bob.0)])
        .expect("get");
    let v = r.json();
    assert_eq!(v["name"], "sync");
    assert_eq!(v["path"], format!("/sync/{alice}/proj/doc.md"));
    assert_eq!(v["headers"]["x-user-id"], alice.as_str(), "markco sets X-User-Id; the client's is dropped");
    // A `Connection` line cannot name markco's own headers away.
    let r = http_get(
        w.m.http,
        &format!("/sync/{alice}/proj/doc.md?token={token}"),
        &[("Connection", "x-user-id, host, x-forwarded-for")],
    )
    .expect("get");
    let v = r.json();
    assert_eq!(v["headers"]["x-user-id"], alice.as_str(), "X-User-Id survives a Connection nomination: {v}");
    assert_eq!(v["headers"]["x-forwarded-for"], "127.0.0.1", "{v}");
    assert!(v["headers"]["host"].is_string(), "Host survives a Connection nomination: {v}");
}

#[test]
fn no_or_bad_token() {
    let w = world();
    let bob = &w.bob.0;
    let r = http_get(w.m.http, &format!("/u/{bob}/"), &[("Accept", "text/html")]).expect("get");
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("/login"));
    let r = http_get(w.m.http, &format!("/u/{bob}/"), &[("Accept", "application/json")]).expect("get");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "Authentication required");
    let r =
        http_get(w.m.http, &format!("/u/{bob}/"), &[("Accept", "application/json"), ("Authorization", "Bearer nope")])
            .expect("get");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "Invalid or expired session");
}

#[test]
fn isolation_suite() {
    let w = world();
    let (alice, at) = (&w.alice.0, &w.alice.1);
    let bob = &w.bob.0;
    let auth = bearer(at);
    let cookie = format!("session_token={at}");
    let upper = bob.to_uppercase();
    let enc_first = format!("%{:02X}{}", bob.as_bytes()[0], &bob[1..]);
    let cases: Vec<(String, Vec<(&str, String)>)> = vec![
        (format!("/u/{bob}/"), vec![]),
        (format!("/u/{bob}"), vec![]),
        (format!("/u/{bob}/index.html"), vec![]),
        (format!("/u/{alice}/../{bob}/"), vec![]),
        (format!("/u/{alice}/%2e%2e/{bob}/"), vec![]),
        (format!("/u/{alice}/%2E%2E/{bob}/"), vec![]),
        (format!("/u/{alice}/./../{bob}/x"), vec![]),
        (format!("/u/{alice}/../../u/{bob}/"), vec![]),
        (format!("/u/{enc_first}/"), vec![]),
        (format!("//u//{bob}//"), vec![]),
        (format!("/u/./{bob}/"), vec![]),
        (format!("/u/{upper}/"), vec![]),
        (format!("/U/{bob}/"), vec![]),
        (format!("/u/{bob}%2F/"), vec![]),
        (format!("/u/{alice}%2F..%2F{bob}/"), vec![]),
        (format!("/u/{bob}%00/"), vec![]),
        (format!("/u/{bob}x/"), vec![]),
        (format!("/u/{bob};/"), vec![]),
        (format!("/u/{bob}/..;/"), vec![]),
        (format!("/u%2F{bob}/"), vec![]),
        (format!("/r/{bob}/"), vec![]),
        (format!("/r/{alice}/../{bob}/"), vec![]),
        (format!("/sync/{bob}/proj/doc.md"), vec![]),
        (format!("/sync/{alice}/../{bob}/doc"), vec![]),
        (format!("/tunnel/{bob}?role=provider"), vec![]),
        (format!("/tunnel/{bob}"), vec![("X-User-Id", bob.clone())]),
        (format!("/sync/{bob}/p/d"), vec![("X-User-Id", bob.clone())]),
        (format!("/u/{bob}/?token={at}"), vec![]),
        (format!("/u/{bob}/"), vec![("X-Forwarded-For", "127.0.0.1".into()), ("X-User-Id", bob.clone())]),
        (format!("/u/{bob}/"), vec![("Cookie", format!("session_token={at}; session_token=x"))]),
    ];
    assert!(cases.len() >= 30);
    for (path, extra) in &cases {
        for how in ["bearer", "cookie", "query"] {
            let mut headers: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let path = match how {
                "bearer" => {
                    headers.push(("Authorization", &auth));
                    path.clone()
                }
                "cookie" => {
                    headers.push(("Cookie", &cookie));
                    path.clone()
                }
                _ => format!("{path}{}token={at}", if path.contains('?') { "&" } else { "?" }),
            };
            let r = http_get(w.m.http, &path, &headers).expect("get");
            // Paths that no per-user route matches fall through to the 404 catch-all; every
            // other one names a user who is not Alice, so Alice's valid token gets 403.
            let want = if path.starts_with("/U/") || path.starts_with("/u%2F") { 404 } else { 403 };
            assert_not_bobs(&format!("{path} ({how})"), &r, want);
        }
    }
    // A websocket upgrade with Alice's token to Bob's editor, runtime and tunnel: refused.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        for path in [format!("/u/{bob}/events"), format!("/r/{bob}/ws"), format!("/tunnel/{bob}?role=consumer")] {
            for with_query in [false, true] {
                let sep = if path.contains('?') { '&' } else { '?' };
                let url = if with_query {
                    format!("ws://{}{path}{sep}token={at}", w.m.http)
                } else {
                    format!("ws://{}{path}", w.m.http)
                };
                let mut req = url.as_str().into_client_request().expect("request");
                if !with_query {
                    req.headers_mut().insert("Cookie", cookie.parse().expect("header"));
                }
                let Ok(answer) = tokio::time::timeout(WS_TIMEOUT, tokio_tungstenite::connect_async(req)).await else {
                    panic!("websocket {url}: no answer in time")
                };
                match answer {
                    Ok(_) => panic!("websocket {url} to Bob's upstream was accepted"),
                    Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                        assert_eq!(resp.status().as_u16(), 403, "{url}")
                    }
                    Err(e) => panic!("{url}: unexpected error {e}"),
                }
            }
        }
        // Alice's own websocket works and reaches her editor.
        let mut req = format!("ws://{}/u/{alice}/events", w.m.http).into_client_request().expect("request");
        req.headers_mut().insert("Cookie", cookie.parse().expect("header"));
        let (mut ws, _) = tokio::time::timeout(WS_TIMEOUT, tokio_tungstenite::connect_async(req))
            .await
            .expect("own websocket handshake in time")
            .expect("own websocket");
        ws.send(Message::Text("__whoami".into())).await.expect("send");
        let msg =
            tokio::time::timeout(WS_TIMEOUT, ws.next()).await.expect("reply in time").expect("reply").expect("message");
        assert_eq!(msg.into_text().expect("text").as_str(), "editor-alice");
    });
}

#[test]
fn services_hide_users_without_the_admin_token() {
    let w = world();
    let r = http_get(w.m.http, "/api/services", &[]).expect("get");
    assert_eq!(r.status, 200);
    let body = r.body_text();
    for secret in [&w.alice.0, &w.bob.0] {
        assert!(!body.contains(secret.as_str()), "user id leaked: {body}");
    }
    assert!(!body.contains("editors"), "{body}");
    let r = http_get(w.m.http, "/api/health", &[]).expect("get");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.json()["status"], "ok");
}

#[test]
fn deleted_session_and_admin_invalidation() {
    let w = world();
    let (alice, token) = &w.alice;
    let auth = bearer(token);
    let path = format!("/u/{alice}/");
    assert_eq!(http_get(w.m.http, &path, &[("Authorization", &auth)]).expect("get").status, 200);
    // Logout in the auth service deletes the row; on SQLite the admin call drops the cache entry.
    let db = w.m.dir.path().join("markco.db");
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('delete from sessions where token=?', (sys.argv[2],)); c.commit()")
        .arg(&db)
        .arg(token)
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = request(w.m.admin, "POST", &format!("/api/admin/users/{alice}/invalidate"), &[], b"").expect("invalidate");
    assert_eq!(r.status, 200);
    let r = http_get(w.m.http, &path, &[("Authorization", &auth), ("Accept", "application/json")]).expect("get");
    assert_eq!(r.status, 401, "a deleted session is refused right after invalidation");
}

#[test]
fn missing_workspace_and_disabled_route_answer_503() {
    let sync = Upstream::start("sync");
    let m = Markco::start(&CONFIG.replace("{sync}", &sync.addr.to_string()));
    let (carol, token) = add_user(&m, "carol@example.com");
    let auth = bearer(&token);
    let r = http_get(m.http, &format!("/u/{carol}/"), &[("Authorization", &auth)]).expect("get");
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    // The kill switch: sync disabled, then enabled again.
    let r = request(m.admin, "POST", "/api/admin/routes/sync/disable", &[], b"").expect("disable");
    assert_eq!(r.status, 200, "{}", r.body_text());
    let r = http_get(m.http, &format!("/sync/{carol}/p/d"), &[("Authorization", &auth)]).expect("get");
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    let r = request(m.admin, "POST", "/api/admin/routes/sync/enable", &[], b"").expect("enable");
    assert_eq!(r.status, 200);
    let r = http_get(m.http, &format!("/sync/{carol}/p/d"), &[("Authorization", &auth)]).expect("get");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["name"], "sync");
    let r = request(m.admin, "POST", "/api/admin/routes/nosuch/disable", &[], b"").expect("disable");
    assert_eq!(r.status, 404);
}

#[test]
fn failing_health_check_disables_its_route_and_api_health_says_so() {
    let relay = Upstream::start("sync");
    let port = relay.addr.port();
    let template = CONFIG.replace("{sync}", &relay.addr.to_string())
        + &format!("\n[[health_check]]\nname = \"sync-relay\"\nurl = \"http://127.0.0.1:{port}/health\"\ninterval = \"200ms\"\ntimeout = \"2s\"\ndisable_route = \"sync\"\n");
    let m = Markco::start(&template);
    let (carol, token) = add_user(&m, "carol@example.com");
    let auth = bearer(&token);
    let sync_path = format!("/sync/{carol}/p/d");
    eventually(Duration::from_secs(15), "health passes", || {
        http_get(m.http, "/api/health", &[]).is_ok_and(|r| r.status == 200)
    });
    let r = http_get(m.http, "/api/health", &[]).expect("get");
    assert_eq!(r.json()["services"]["sync-relay"], "ok");
    assert_eq!(http_get(m.http, &sync_path, &[("Authorization", &auth)]).expect("get").status, 200);

    // The relay dies: /api/health turns 503 "degraded" and the sync route answers 503 + Retry-After.
    drop(relay);
    eventually(Duration::from_secs(15), "health fails", || {
        http_get(m.http, "/api/health", &[]).is_ok_and(|r| r.status == 503)
    });
    let r = http_get(m.http, "/api/health", &[]).expect("get");
    assert_eq!(r.json()["status"], "degraded");
    assert_eq!(r.json()["services"]["sync-relay"], "down");
    eventually(Duration::from_secs(15), "sync disabled", || {
        http_get(m.http, &sync_path, &[("Authorization", &auth)])
            .is_ok_and(|r| r.status == 503 && r.header("retry-after").is_some())
    });

    // It comes back on the same port: the route is enabled again.
    let _relay = Upstream::start_on("sync", &format!("127.0.0.1:{port}"));
    eventually(Duration::from_secs(15), "sync enabled again", || {
        http_get(m.http, &sync_path, &[("Authorization", &auth)]).is_ok_and(|r| r.status == 200)
    });
    assert_eq!(http_get(m.http, "/api/health", &[]).expect("get").status, 200);
}

#[test]
fn metrics_after_traffic_from_several_users_carry_no_user_id() {
    let w = world();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    for (user, token) in [&w.alice, &w.bob] {
        let auth = bearer(token);
        for path in [format!("/u/{user}/p"), format!("/r/{user}/mrp/v1/x"), format!("/sync/{user}/doc")] {
            let r = http_get(w.m.http, &path, &[("Authorization", &auth)]).expect("get");
            assert_eq!(r.status, 200, "{path}: {}", r.body_text());
        }
        // Refused and unauthenticated requests are counted too.
        let other = if user == &w.alice.0 { &w.bob.0 } else { &w.alice.0 };
        assert_eq!(http_get(w.m.http, &format!("/u/{other}/"), &[("Authorization", &auth)]).expect("get").status, 403);
        let r = http_get(w.m.http, &format!("/u/{user}/"), &[("Accept", "application/json")]).expect("get");
        assert_eq!(r.status, 401);
        // And a websocket, open while the metrics are scraped.
        rt.block_on(async {
            let mut req = format!("ws://{}/u/{user}/events", w.m.http).into_client_request().expect("request");
            req.headers_mut().insert("Authorization", auth.parse().expect("header"));
            let (mut ws, _) = tokio::time::timeout(WS_TIMEOUT, tokio_tungstenite::connect_async(req))
                .await
                .expect("websocket handshake in time")
                .expect("websocket");
            ws.send(Message::Text("__whoami".into())).await.expect("send");
            let msg = tokio::time::timeout(WS_TIMEOUT, ws.next()).await.expect("reply in time");
            assert!(matches!(msg, Some(Ok(Message::Text(_)))), "{msg:?}");
            let text = w.m.metrics();
            assert!(!text.contains(user.as_str()), "a user id in the metrics:\n{text}");
            let _ = ws.close(None).await;
        });
    }
    let text = w.m.metrics();
    // The per-user traffic is there, under the routes' names...
    for route in ["workspace", "runtime", "sync"] {
        let n = metric_value(&text, "markco_http_request_duration_seconds_count", &[("route", route)]);
        assert!(n.is_some_and(|n| n >= 2.0), "requests on route {route}: {n:?}\n{text}");
    }
    // ...and no user id, token or email anywhere, in names, labels or values.
    for (id, token) in [&w.alice, &w.bob] {
        for secret in [id.as_str(), token.as_str()] {
            assert!(!text.contains(secret), "{secret} in the metrics:\n{text}");
        }
    }
    for email in ["alice@example.com", "bob@example.com"] {
        assert!(!text.contains(email), "{email} in the metrics:\n{text}");
    }
}
