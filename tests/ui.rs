//! The operator page (`GET /ui` on the admin listener) in headless Chromium, driven over the
//! DevTools protocol: what a person sees without a token and with one, a route switched off from
//! the page, a refused action shown, and hostile names kept as text.
//! Set MARKCO_UI_SCREENSHOT=FILE to save a screenshot of the page.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "ui-token-5f2a9c";
const HOSTILE: &str = r#"<img src=x onerror="window.__pwned=1">"#;

const CONFIG: &str = r#"
[server]
http = "{http}"
admin = "{admin}"
admin_token_file = "admin.token"
upgrade_sock = "{dir}/upgrade.sock"
pid_file = "{dir}/markco.pid"

[database]
url = "sqlite://{dir}/markco.db"

[[health_check]]
name = "auth"
url = "http://{auth}/health"
interval = "200ms"

[[site]]
hosts = ["markco.test"]

  [[site.route]]
  name = "api"
  match = ["/api/*"]
  proxy = "{auth}"

  [[site.route]]
  name = '{hostile}'
  match = ["/odd"]
  respond = "odd\n"

  [[site.route]]
  name = "workspace"
  match = ["/u/*"]
  workspace = true
"#;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless Chromium with one page, spoken to over the DevTools protocol.
struct Browser {
    ws: Ws,
    session: String,
    next_id: u64,
    _proc: Proc,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let bin = ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
            .expect("Chromium is needed for the operator page tests: ./scripts/setup.sh --test installs it");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new(bin)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(["--window-size=1280,1000", "about:blank"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        let stderr = child.stderr.take().expect("stderr");
        let proc = Proc { child };
        let url = BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("DevTools listening on ").map(str::to_string))
            .expect("chromium prints its DevTools address");
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("DevTools websocket");
        let mut b = Browser { ws, session: String::new(), next_id: 0, _proc: proc, _profile: profile };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"}), false).await;
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = b.call("Target.attachToTarget", json!({"targetId": target_id, "flatten": true}), false).await;
        b.session = attached["sessionId"].as_str().expect("sessionId").to_string();
        b
    }

    async fn call(&mut self, method: &str, params: Value, in_page: bool) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if in_page {
            msg["sessionId"] = json!(self.session);
        }
        self.ws.send(Message::text(msg.to_string())).await.expect("send to chromium");
        loop {
            let m = tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("chromium did not answer {method}"))
                .expect("chromium closed")
                .expect("DevTools message");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).expect("DevTools JSON");
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}), true).await;
        self.until("document.readyState === 'complete' && location.href !== 'about:blank'", "the page loads").await;
    }

    /// Evaluates `expr` in the page and returns its value.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call("Runtime.evaluate", json!({"expression": expr, "returnByValue": true, "awaitPromise": true}), true)
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Waits until `expr` is true in the page.
    async fn until(&mut self, expr: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = self.call("Runtime.evaluate", json!({"expression": expr, "returnByValue": true}), true).await;
            if r["result"]["value"] == json!(true) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The text a person sees in the element `selector`.
    async fn text(&mut self, selector: &str) -> String {
        let expr = format!("(document.querySelector({}) || {{innerText: ''}}).innerText", json!(selector));
        self.eval(&expr).await.as_str().unwrap_or_default().to_string()
    }
}

fn admin_get(m: &Markco, path: &str) -> Value {
    let bearer = format!("Bearer {TOKEN}");
    let r = http_get(m.admin, path, &[("Authorization", &bearer)]).expect("admin API");
    assert_eq!(r.status, 200, "{path}: {}", r.body_text());
    r.json()
}

fn route_disabled(m: &Markco, name: &str) -> bool {
    let v = admin_get(m, "/routes");
    v["sites"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["routes"].as_array().cloned().unwrap_or_default())
        .any(|r| r["name"] == name && r["disabled"] == true)
}

#[test]
fn operator_page_shows_the_gateway_and_switches_routes() {
    let auth = Upstream::start("auth");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("admin.token"), TOKEN).expect("token");
    let hostile_toml = HOSTILE.replace('\'', "");
    let template = CONFIG.replace("{auth}", &auth.addr.to_string()).replace("{hostile}", &hostile_toml);
    let m = Markco::start_in(dir, Ports::free(), &template, &[]);
    let editor = Upstream::start("editor");
    let runtime = Upstream::start("runtime");
    let user = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
    let body = json!({"editor": editor.addr.to_string(), "runtime": runtime.addr.to_string()}).to_string();
    let bearer = format!("Bearer {TOKEN}");
    let r = request(
        m.admin,
        "PUT",
        &format!("/api/admin/workspaces/{user}"),
        &[("Authorization", &bearer), ("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .expect("PUT workspace");
    assert_eq!(r.status, 200, "{}", r.body_text());
    for _ in 0..5 {
        let _ = http_get(m.http, "/api/x", &[("Host", "markco.test")]);
    }
    eventually(Duration::from_secs(10), "the health check passes", || admin_get(&m, "/status")["status"] == "ok");

    // The page is served without the token and carries no data; its headers lock it down.
    let page = http_get(m.admin, "/ui", &[]).expect("GET /ui");
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-security-policy").is_some_and(|c| c.contains("script-src 'self'")),
        "{:?}",
        page.headers
    );
    assert_eq!(page.header("referrer-policy"), Some("no-referrer"));
    assert!(!page.body_text().contains(user) && !page.body_text().contains("auth"));

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut b = Browser::start().await;
        let base = format!("http://{}/ui", m.admin);

        // No token: the form, and no data.
        b.goto(&base).await;
        b.until("!document.getElementById('login').hidden", "the token form").await;
        assert_eq!(b.eval("document.getElementById('data').hidden").await, json!(true));
        assert_eq!(b.eval("document.querySelectorAll('#routes tbody tr').length").await, json!(0));
        let seen = b.text("body").await;
        assert!(seen.contains("Admin token") && !seen.contains("api"), "{seen}");

        // With ?token=: the data, and the token moved out of the address bar into this tab.
        b.goto(&format!("{base}?token={TOKEN}")).await;
        b.until("document.querySelectorAll('#routes tbody tr').length === 3", "the route rows").await;
        assert_eq!(b.eval("location.search").await, json!(""));
        assert_eq!(b.eval("sessionStorage.getItem('markco_admin_token')").await, json!(TOKEN));
        let routes = b.text("#routes").await;
        assert!(routes.contains("api") && routes.contains(&auth.addr.to_string()), "{routes}");
        assert!(routes.contains("workspace"), "{routes}");
        // The hostile route name is text on the page, never an element or a script.
        assert!(routes.contains(&hostile_toml), "the name is shown as written: {routes}");
        assert_eq!(b.eval("document.querySelectorAll('img').length").await, json!(0));
        assert_eq!(b.eval("typeof window.__pwned").await, json!("undefined"));
        b.until("document.querySelector('#health').innerText.includes('ok')", "the health check row").await;
        let health = b.text("#health").await;
        assert!(health.contains("auth") && health.contains(&format!("http://{}/health", auth.addr)), "{health}");
        let ws = b.text("#workspaces").await;
        assert!(ws.contains(user) && ws.contains(&editor.addr.to_string()) && ws.contains("running"), "{ws}");
        b.until("document.querySelector('#traffic').innerText.includes('api')", "traffic by route").await;
        let traffic = b.text("#traffic").await;
        assert!(traffic.contains(&hostile_toml), "metric labels are unescaped, as written: {traffic}");
        assert!(traffic.lines().any(|l| l.starts_with("api\t5")), "5 requests to api: {traffic}");
        assert!(b.text("#summary").await.contains("healthy"));

        if let Ok(file) = std::env::var("MARKCO_UI_SCREENSHOT") {
            // Let one refresh pass so that the rates show.
            tokio::time::sleep(Duration::from_millis(5500)).await;
            let shot = b.call("Page.captureScreenshot", json!({"format": "png", "captureBeyondViewport": true}), true).await;
            let png = decode_base64(shot["data"].as_str().expect("png"));
            std::fs::write(Path::new(&file), png).expect("write the screenshot");
        }

        // A switch flipped on the page shows in /routes, and on the page.
        assert!(!route_disabled(&m, "api"));
        b.eval("document.querySelector('button[data-action=\"disable\"][data-route=\"api\"]').click(); true").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !route_disabled(&m, "api") {
            assert!(Instant::now() < deadline, "the page's Disable did not reach /routes");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        b.until("document.querySelector('button[data-action=\"enable\"][data-route=\"api\"]') !== null", "the row shows Enable").await;
        assert!(b.text("#routes").await.contains("OFF"));
        assert_eq!(http_get(m.http, "/api/x", &[("Host", "markco.test")]).expect("get").status, 503);
        b.eval("document.querySelector('button[data-action=\"enable\"][data-route=\"api\"]').click(); true").await;
        b.until("document.querySelector('button[data-action=\"disable\"][data-route=\"api\"]') !== null", "switched back on").await;
        assert!(!route_disabled(&m, "api"));
        // The hostile route's switch works on its exact name.
        b.eval("document.querySelector('#routes button[data-action=\"disable\"]:not([data-route=\"api\"]):not([data-route=\"workspace\"])').click(); true").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !route_disabled(&m, &hostile_toml) {
            assert!(Instant::now() < deadline, "the hostile route was not switched by its name");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // A refused action says why on the page (this gateway manages no containers).
        b.eval(&format!("document.querySelector('button[data-action=\"stop\"][data-user=\"{user}\"]').click(); true")).await;
        b.until("document.getElementById('error').innerText.includes('[workspaces]')", "the refusal is shown").await;

        // A wrong token: the form again, with the reason, and no data.
        b.eval("sessionStorage.setItem('markco_admin_token', 'wrong'); true").await;
        b.goto(&base).await;
        b.until("document.getElementById('error').innerText.includes('refused')", "the refusal of the token").await;
        assert_eq!(b.eval("document.getElementById('data').hidden").await, json!(true));
        assert_eq!(b.eval("sessionStorage.getItem('markco_admin_token')").await, Value::Null);
    });
}

/// Standard base64 (the DevTools screenshot), without pulling a crate in for a test helper.
fn decode_base64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => 0,
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, c)| acc | (val(*c) << (18 - 6 * i)));
        let take = chunk.len() - 1;
        for i in 0..take {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}
