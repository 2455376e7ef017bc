//! Route switches with holders, on the real binary: the operator's switch (`admin`) and a health
//! check's (`health:<check>`) each hold a route off, neither lifts the other's, the operator's
//! survives a restart, and `/routes` and `/metrics` name the holders.

mod common;

use std::time::Duration;

use common::*;

const CONFIG: &str = r#"
[server]
http = "{http}"
admin = "{admin}"
upgrade_sock = "{dir}/upgrade.sock"
pid_file = "{dir}/markco.pid"

[database]
url = "sqlite://{dir}/markco.db"

[[site]]
hosts = ["*"]

  [[site.route]]
  name = "sync"
  match = ["/sync/*"]
  user_service = "{relay}"

  [[site.route]]
  name = "control"
  match = ["/api/health"]
  control = true

[[health_check]]
name = "relay"
url = "http://{relay}/health"
interval = "200ms"
timeout = "200ms"
disable_route = "sync"
"#;

struct Fixture {
    template: String,
    relay_addr: String,
    user: String,
    auth: String,
}

fn setup(m_template: &str, relay: &Upstream) -> (Markco, Fixture) {
    let template = m_template.replace("{relay}", &relay.addr.to_string());
    let m = Markco::start(&template);
    let (user, token) = add_user(&m, "switch@example.com");
    let f = Fixture { template, relay_addr: relay.addr.to_string(), user, auth: format!("Bearer {token}") };
    (m, f)
}

/// What a user sees on the sync route.
fn sync_status(m: &Markco, f: &Fixture) -> u16 {
    http_get(m.http, &format!("/sync/{}/p/d", f.user), &[("Authorization", &f.auth)]).map_or(0, |r| r.status)
}

fn switch(m: &Markco, verb: &str) -> serde_json::Value {
    let r = request(m.admin, "POST", &format!("/api/admin/routes/sync/{verb}"), &[], b"").expect(verb);
    assert_eq!(r.status, 200, "{}", r.body_text());
    r.json()
}

/// The holders of route `sync` as `/routes` names them.
fn holders(m: &Markco) -> Vec<String> {
    let r = http_get(m.admin, "/routes", &[]).expect("routes");
    assert_eq!(r.status, 200, "{}", r.body_text());
    let view = r.json();
    let sync = view["sites"][0]["routes"].as_array().and_then(|rs| rs.iter().find(|r| r["name"] == "sync")).cloned();
    let sync = sync.unwrap_or_else(|| panic!("no route sync in {view}"));
    let holds = sync["holds"].as_array().cloned().unwrap_or_default();
    for h in &holds {
        assert!(h["since"].as_str().is_some_and(|s| !s.is_empty()), "a holder without a time: {sync}");
    }
    let names: Vec<String> =
        sync["holders"].as_array().into_iter().flatten().filter_map(|h| h.as_str().map(str::to_owned)).collect();
    let detailed: Vec<String> = holds.iter().filter_map(|h| h["holder"].as_str().map(str::to_owned)).collect();
    assert_eq!(names, detailed, "{sync}");
    names
}

fn health_is(m: &Markco, status: u16) -> bool {
    http_get(m.http, "/api/health", &[]).is_ok_and(|r| r.status == status)
}

#[test]
fn operator_switch_holds_through_a_failing_then_passing_check_and_a_restart() {
    let relay = Upstream::start("relay");
    let (m, f) = setup(CONFIG, &relay);
    eventually(Duration::from_secs(5), "check passes", || health_is(&m, 200));
    assert_eq!(sync_status(&m, &f), 200);

    let answer = switch(&m, "disable");
    assert_eq!(answer["disabled"], true, "{answer}");
    assert_eq!(sync_status(&m, &f), 503);
    assert_eq!(holders(&m), ["admin"]);

    // The relay dies: its check holds the route too.
    drop(relay);
    eventually(Duration::from_secs(5), "check holds the route", || holders(&m) == ["admin", "health:relay"]);
    let metrics = m.metrics();
    for holder in ["admin", "health:relay"] {
        let since = metric_value(&metrics, "markco_route_held_since_seconds", &[("route", "sync"), ("holder", holder)]);
        assert!(since.is_some_and(|s| s > 1.0e9), "no held-since sample for {holder}:\n{metrics}");
    }

    // It comes back: its hold goes, the operator's stays, and so does the 503.
    let relay = Upstream::start_on("relay", &f.relay_addr);
    eventually(Duration::from_secs(5), "check passes again", || health_is(&m, 200));
    eventually(Duration::from_secs(5), "check's hold lifted", || holders(&m) == ["admin"]);
    for _ in 0..5 {
        assert_eq!(sync_status(&m, &f), 503, "the health loop lifted the operator's switch");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A restart keeps the operator's switch, from the first request on.
    let (dir, ports) = m.stop();
    let m = Markco::start_in(dir, ports, &f.template, &[]);
    assert_eq!(sync_status(&m, &f), 503, "the operator's switch was lost in the restart");
    assert_eq!(holders(&m), ["admin"]);
    eventually(Duration::from_secs(5), "check passes after the restart", || health_is(&m, 200));
    assert_eq!(sync_status(&m, &f), 503);

    // Only the operator lifts it.
    let answer = switch(&m, "enable");
    assert_eq!(answer["disabled"], false, "{answer}");
    assert_eq!(sync_status(&m, &f), 200);
    assert!(holders(&m).is_empty());
    drop(relay);
}

#[test]
fn operator_enable_does_not_lift_a_failing_checks_hold() {
    let relay = Upstream::start("relay");
    let (m, f) = setup(CONFIG, &relay);
    eventually(Duration::from_secs(5), "check passes", || health_is(&m, 200));
    drop(relay);
    eventually(Duration::from_secs(5), "check holds the route", || holders(&m) == ["health:relay"]);
    assert_eq!(sync_status(&m, &f), 503);

    switch(&m, "disable");
    assert_eq!(holders(&m), ["admin", "health:relay"]);
    let answer = switch(&m, "enable");
    assert_eq!(answer["disabled"], true, "{answer}");
    assert_eq!(answer["holders"][0], "health:relay", "{answer}");
    assert_eq!(answer["holds"][0]["holder"], "health:relay", "{answer}");
    for _ in 0..5 {
        assert_eq!(sync_status(&m, &f), 503, "the operator's enable lifted a failing check's hold");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The check passes again: nothing holds the route any more.
    let _relay = Upstream::start_on("relay", &f.relay_addr);
    eventually(Duration::from_secs(5), "route back", || sync_status(&m, &f) == 200);
    assert!(holders(&m).is_empty());
}

/// The same restart on PostgreSQL (needs `MARKCO_TEST_PG_URL`'s server, as `tests/postgres.rs`).
#[test]
fn operator_switch_survives_a_restart_on_postgres() {
    let admin_url = std::env::var("MARKCO_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into());
    let name = format!("markco_sw_{}_{}", std::process::id(), free_port());
    let psql = |sql: &str| {
        let out = std::process::Command::new("psql")
            .args([admin_url.as_str(), "-v", "ON_ERROR_STOP=1", "-qAtX", "-c", sql])
            .output()
            .expect("psql is installed");
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
    };
    psql(&format!("CREATE DATABASE {name}"));
    let base = admin_url.rsplit_once('/').map_or(admin_url.as_str(), |(b, _)| b);
    let template = CONFIG.replace("sqlite://{dir}/markco.db", &format!("{base}/{name}"));
    let relay = Upstream::start("relay");
    let (m, f) = setup(&template, &relay);
    eventually(Duration::from_secs(5), "check passes", || health_is(&m, 200));
    switch(&m, "disable");
    let (dir, ports) = m.stop();
    let m = Markco::start_in(dir, ports, &f.template, &[]);
    assert_eq!(sync_status(&m, &f), 503, "the operator's switch was lost in the restart");
    assert_eq!(holders(&m), ["admin"]);
    switch(&m, "enable");
    assert_eq!(sync_status(&m, &f), 200);
    drop(m);
    psql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
}

#[test]
fn a_reload_that_drops_a_held_route_keeps_the_operators_hold_as_orphaned() {
    let relay = Upstream::start("relay");
    let (m, f) = setup(CONFIG, &relay);
    eventually(Duration::from_secs(5), "check passes", || health_is(&m, 200));
    switch(&m, "disable");
    drop(relay);
    eventually(Duration::from_secs(5), "check holds the route", || holders(&m) == ["admin", "health:relay"]);

    // The route and its check leave the config.
    let sync_route = format!(
        "  [[site.route]]\n  name = \"sync\"\n  match = [\"/sync/*\"]\n  user_service = \"{}\"\n",
        f.relay_addr
    );
    let without = f.template.replace(&sync_route, "");
    let without = &without[..without.find("[[health_check]]").expect("the template has a health check")];
    assert!(!without.contains("sync"), "{without}");
    m.write_config(without);
    let reload = |m: &Markco| {
        let r = request(m.admin, "POST", "/reload", &[], b"").expect("POST /reload");
        assert_eq!(r.status, 200, "{}", r.body_text());
    };
    reload(&m);
    // The check's hold went with the check; the operator's stays, named as orphaned.
    let orphaned = || {
        let view = http_get(m.admin, "/routes", &[]).expect("routes").json();
        let names: Vec<String> = view["orphaned_holds"]["sync"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h["holder"].as_str().map(str::to_owned))
            .collect();
        (names, view)
    };
    eventually(Duration::from_secs(5), "only the operator's hold is left", || orphaned().0 == ["admin"]);

    // The route comes back (its upstream up again): still off until the operator lifts it.
    let _relay = Upstream::start_on("relay", &f.relay_addr);
    m.write_config(&f.template);
    reload(&m);
    assert_eq!(holders(&m), ["admin"]);
    assert_eq!(sync_status(&m, &f), 503, "the operator's hold was lost in the reloads");
    let (names, view) = orphaned();
    assert!(names.is_empty(), "{view}");
    switch(&m, "enable");
    eventually(Duration::from_secs(5), "route back", || sync_status(&m, &f) == 200);
}
