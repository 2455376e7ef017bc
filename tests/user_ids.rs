//! One user-id rule (a canonical lowercase UUID): the admin API and the database refuse any other
//! spelling, and the gateway, comparing a path's owner exactly with the session's (valid) id,
//! treats another spelling as another user.

mod common;

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
  name = "workspace"
  match = ["/u/*"]
  workspace = true
"#;

#[test]
fn a_user_id_that_is_not_canonical_names_nobody() {
    let m = Markco::start(CONFIG);
    let (user, token) = add_user(&m, "ids@example.com");
    let editor = Upstream::start("editor");
    let runtime = Upstream::start("runtime");
    put_workspace(&m, &user, editor.addr, runtime.addr);
    let auth = format!("Bearer {token}");
    let own = http_get(m.http, &format!("/u/{user}/"), &[("Authorization", &auth)]).expect("get");
    assert_eq!(own.status, 200, "{}", own.body_text());
    // Other spellings of the same id are somebody else: 403 on the gateway, 400 at the admin API.
    for other in [user.to_uppercase(), user.replace('-', ""), format!("{{{user}}}"), "alice".to_string()] {
        let r = http_get(m.http, &format!("/u/{other}/"), &[("Authorization", &auth)]).expect("get");
        assert_eq!(r.status, 403, "/u/{other}/: {}", r.body_text());
        let r = http_get(m.admin, &format!("/api/admin/workspaces/{other}"), &[]).expect("get");
        assert_eq!(r.status, 400, "admin {other}: {}", r.body_text());
        let body = serde_json::json!({"userId": other, "port": runtime.addr.port()}).to_string();
        let r = request(m.admin, "POST", "/api/runtime/update-port", &[], body.as_bytes()).expect("post");
        assert_eq!(r.status, 400, "update-port {other}: {}", r.body_text());
    }
}
