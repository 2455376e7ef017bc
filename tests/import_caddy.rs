//! `markco import-caddy`: today's Caddy JSON config (reference/today.md section 1a, HEAD) with
//! local upstreams is imported, checked, run, and probed path by path; an unknown handler is
//! reported (and the exit code says so), never dropped silently; a Caddyfile is refused with the
//! way to get JSON.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Output};

use common::*;

/// Today's pushed config, as `orchestrator/src/caddy-config.js` builds it, with the services on
/// local test upstreams and the listeners on free ports.
fn todays_caddy_json(
    http: SocketAddr,
    admin: SocketAddr,
    orch: SocketAddr,
    auth: SocketAddr,
    publish: SocketAddr,
    umami: SocketAddr,
    static_root: &str,
) -> String {
    let hosts = serde_json::json!(["markco.dev", "www.markco.dev"]);
    let proxy = |id: &str, paths: &[&str], to: SocketAddr| {
        // Caddy's `localhost:PORT` spelling, as the orchestrator writes it.
        let dial = format!("localhost:{}", to.port());
        serde_json::json!({
            "@id": id,
            "match": [{"host": hosts, "path": paths}],
            "handle": [{"handler": "reverse_proxy", "upstreams": [{"dial": dial}]}],
            "terminal": true
        })
    };
    let routes = vec![
        proxy("publish", &["/@*"], publish),
        proxy("auth-callback", &["/auth/callback/*", "/auth/email/verify"], orch),
        proxy("auth", &["/auth/*"], auth),
        proxy("join", &["/join/*", "/collab/*"], orch),
        proxy("umami-script", &["/script.js"], umami),
        proxy("umami-send", &["/api/send"], umami),
        proxy("umami-dashboard", &["/analytics/*"], umami),
        proxy("api", &["/api/*"], orch),
        proxy(
            "orchestrator-pages",
            &[
                "/login",
                "/login/*",
                "/dashboard",
                "/sandbox",
                "/logout",
                "/api/logout",
                "/.well-known/assetlinks.json",
                "/privacy",
                "/terms",
                "/account-delete",
                "/offline",
            ],
            orch,
        ),
        serde_json::json!({
            "@id": "static",
            "match": [{"host": hosts, "path": ["/static/*"]}],
            "handle": [{"handler": "file_server", "root": static_root}],
            "terminal": true
        }),
        serde_json::json!({
            "@id": "fallback",
            "match": [{"host": hosts}],
            "handle": [{"handler": "reverse_proxy", "upstreams": [{"dial": format!("localhost:{}", orch.port())}]}],
            "terminal": true
        }),
    ];
    serde_json::json!({
        "admin": {"listen": format!("localhost:{}", admin.port())},
        "apps": {"http": {"servers": {"srv0": {"listen": [format!("127.0.0.1:{}", http.port())], "routes": routes}}}}
    })
    .to_string()
}

fn import(file: &std::path::Path) -> Output {
    Command::new(markco_bin()).arg("import-caddy").arg(file).output().expect("run markco import-caddy")
}

/// The name of the test upstream that answered, or what answered instead.
fn who(m: &Markco, host: &str, path: &str) -> String {
    let r = http_get(m.http, path, &[("Host", host)]).unwrap_or_else(|e| panic!("GET {host}{path}: {e}"));
    if r.status != 200 {
        return format!("status {}", r.status);
    }
    if r.header("content-type").is_some_and(|c| c.starts_with("application/json")) {
        let v = r.json();
        assert_eq!(v["path"].as_str(), Some(path), "the upstream sees the path unchanged");
        return v["name"].as_str().unwrap_or("?").to_string();
    }
    format!("file {}", r.body_text().trim())
}

#[test]
fn todays_caddy_config_imports_runs_and_routes_every_path_as_caddy_did() {
    let orch = Upstream::start("orchestrator");
    let auth = Upstream::start("auth");
    let publish = Upstream::start("publish");
    let umami = Upstream::start("umami");
    let dir = tempfile::tempdir().expect("tempdir");
    // Caddy's root semantics: /static/app.js is <root>/static/app.js.
    let root = dir.path().join("www");
    std::fs::create_dir_all(root.join("static")).expect("mkdir");
    std::fs::write(root.join("static/app.js"), "console.log(1)\n").expect("write");
    let ports = Ports::free();
    let json = todays_caddy_json(
        ports.http,
        ports.admin,
        orch.addr,
        auth.addr,
        publish.addr,
        umami.addr,
        &root.display().to_string(),
    );
    let caddy = dir.path().join("caddy.json");
    std::fs::write(&caddy, json).expect("write caddy.json");

    let out = import(&caddy);
    let report = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "everything in today's config translates; report:\n{report}");
    assert!(report.contains("11 routes in 1 sites"), "the report counts what was written: {report}");
    assert!(!report.contains("NOT TRANSLATED"), "{report}");
    let toml_text = String::from_utf8(out.stdout).expect("UTF-8 TOML");

    // The generated config as written, plus only what the test harness needs per test.
    let mut cfg: toml::Value = toml::from_str(&toml_text).expect("stdout is TOML");
    assert_eq!(cfg["server"]["http"].as_str(), Some(ports.http.to_string().as_str()));
    assert_eq!(
        cfg["server"]["admin"].as_str(),
        Some(ports.admin.to_string().as_str()),
        "admin.listen is [server] admin"
    );
    assert_eq!(cfg["site"][0]["hosts"], toml::Value::try_from(["markco.dev", "www.markco.dev"]).expect("value"));
    let names: Vec<&str> =
        cfg["site"][0]["route"].as_array().expect("routes").iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "publish",
            "auth-callback",
            "auth",
            "join",
            "umami-script",
            "umami-send",
            "umami-dashboard",
            "api",
            "orchestrator-pages",
            "static",
            "fallback"
        ],
        "@ids become route names, in Caddy's order"
    );
    let server = cfg["server"].as_table_mut().expect("[server]");
    server.insert("upgrade_sock".into(), format!("{}/upgrade.sock", dir.path().display()).into());
    server.insert("pid_file".into(), format!("{}/markco.pid", dir.path().display()).into());
    let template = toml::to_string(&cfg).expect("TOML");

    // `markco check` accepts it as written.
    let imported = dir.path().join("imported.toml");
    std::fs::write(&imported, &toml_text).expect("write");
    let check = Command::new(markco_bin()).args(["check", "--config"]).arg(&imported).output().expect("check");
    assert!(check.status.success(), "markco check: {}", String::from_utf8_lossy(&check.stderr));

    let m = Markco::start_in(dir, ports, &template, &[]);
    let table = [
        ("/@alice/my-post", "publish"),
        ("/@", "publish"),
        ("/auth/callback/github", "orchestrator"),
        ("/auth/email/verify", "orchestrator"),
        ("/auth/login", "auth"),
        ("/auth/email/verify/x", "auth"),
        ("/auth/electron/success", "auth"),
        ("/join/abc", "orchestrator"),
        ("/collab/doc1", "orchestrator"),
        ("/script.js", "umami"),
        ("/api/send", "umami"),
        ("/api/sendx", "orchestrator"),
        ("/analytics/dashboard", "umami"),
        ("/analyticsx", "orchestrator"),
        ("/api/projects", "orchestrator"),
        ("/api/health", "orchestrator"),
        ("/login", "orchestrator"),
        ("/dashboard", "orchestrator"),
        ("/u/some-user/", "orchestrator"),
        ("/sync/some-user/x", "orchestrator"),
        ("/", "orchestrator"),
        ("/static/app.js", "file console.log(1)"),
        ("/static/missing.js", "status 404"),
    ];
    for host in ["markco.dev", "www.markco.dev"] {
        for (path, want) in table {
            assert_eq!(who(&m, host, path), want, "{host}{path}");
        }
    }
    let js = http_get(m.http, "/static/app.js", &[("Host", "markco.dev")]).expect("static");
    assert!(js.header("content-type").is_some_and(|c| c.contains("javascript")), "{:?}", js.headers);
    assert_eq!(js.header("x-content-type-options"), Some("nosniff"));
    // Caddy matched these hosts only: another host reaches no upstream.
    let other = http_get(m.http, "/api/projects", &[("Host", "other.example")]).expect("other host");
    assert_eq!(other.status, 404, "{}", other.body_text());
}

#[test]
fn an_unknown_handler_is_reported_not_dropped() {
    let up = Upstream::start("app");
    let dir = tempfile::tempdir().expect("tempdir");
    let caddy = dir.path().join("caddy.json");
    let json = serde_json::json!({
        "apps": {"http": {"servers": {"srv0": {"listen": [":8080", ":8081", ":443"], "routes": [
            {"@id": "admin-area", "match": [{"host": ["a.test"], "path": ["/admin/*"]}],
             "handle": [{"handler": "authentication", "providers": {"http_basic": {}}},
                        {"handler": "reverse_proxy", "upstreams": [{"dial": up.addr.to_string()}]}]},
            {"@id": "by-method", "match": [{"host": ["a.test"], "method": ["POST"]}],
             "handle": [{"handler": "reverse_proxy", "upstreams": [{"dial": up.addr.to_string()}]}]},
            {"@id": "app", "match": [{"host": ["a.test"]}],
             "handle": [{"handler": "reverse_proxy", "upstreams": [{"dial": up.addr.to_string()}]}]}
        ]}}}}
    });
    std::fs::write(&caddy, json.to_string()).expect("write");
    let out = import(&caddy);
    let report = String::from_utf8_lossy(&out.stderr);
    let toml_text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "untranslated parts make the exit code 1; report:\n{report}");
    for (what, needle) in [
        ("the unknown handler", "handler \"authentication\" is not supported"),
        ("its route", "@id \"admin-area\""),
        ("its paths", "/admin/*"),
        ("the unsupported matcher", "the `method` matcher is not supported"),
    ] {
        assert!(report.contains(needle), "the report names {what} ({needle}):\n{report}");
        assert!(toml_text.contains(needle), "the output's header comment names {what} ({needle}):\n{toml_text}");
    }
    assert!(
        report.contains("\":8081\": markco has one HTTP and one HTTPS listener"),
        "the second plain listener is reported: {report}"
    );
    // What could be translated is still a valid config.
    let v: toml::Value = toml::from_str(&toml_text).expect("TOML");
    let routes = v["site"][0]["route"].as_array().expect("routes");
    assert_eq!(routes.len(), 1, "{toml_text}");
    assert_eq!(routes[0]["name"].as_str(), Some("app"));
    assert_eq!(v["server"]["https"].as_str(), Some("0.0.0.0:443"));
    let imported = dir.path().join("imported.toml");
    std::fs::write(&imported, toml_text.as_bytes()).expect("write");
    let check = Command::new(markco_bin()).args(["check", "--config"]).arg(&imported).output().expect("check");
    assert!(check.status.success(), "markco check: {}", String::from_utf8_lossy(&check.stderr));
}

#[test]
fn a_caddyfile_is_refused_with_the_way_to_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("Caddyfile");
    std::fs::write(&f, "{\n\tadmin localhost:2019\n}\n\nmarkco.dev {\n\treverse_proxy localhost:3000\n}\n")
        .expect("write");
    let out = import(&f);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("Caddyfile") && err.contains("caddy adapt --config Caddyfile"), "{err}");
    assert!(out.stdout.is_empty(), "nothing on stdout: {}", String::from_utf8_lossy(&out.stdout));
}
