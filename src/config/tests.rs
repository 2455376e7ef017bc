use super::*;

fn parse_str(src: &str) -> Result<Config, ConfigError> {
    parse(Path::new("test.toml"), src)
}

const ISSUE_EXAMPLE: &str = r#"
[server]
http = "127.0.0.1:8080"
admin = "127.0.0.1:2019"
# admin_token_file = "/etc/markco/admin.token"

[[site]]
hosts = ["markco.dev", "www.markco.dev"]

  [[site.route]]
  match = ["/@*"]
  proxy = "127.0.0.1:3003"

  [[site.route]]
  match = ["/auth/callback/*", "/auth/email/verify"]
  proxy = "127.0.0.1:3000"

  [[site.route]]
  match = ["/auth/*"]
  proxy = "127.0.0.1:3001"

  [[site.route]]
  match = ["/static/*"]
  static = "/opt/markco/static"

  [[site.route]]
  match = ["/*"]
  proxy = "127.0.0.1:3000"
"#;

#[test]
fn accepts_the_documented_example() {
    let c = parse_str(ISSUE_EXAMPLE).expect("the example config is valid");
    assert_eq!(c.sites.len(), 1);
    assert_eq!(c.route_count(), 5);
    assert_eq!(c.server.http.to_string(), "127.0.0.1:8080");
}

#[test]
fn embedded_default_is_valid() {
    let c = Config::embedded().expect("embedded default parses");
    assert_eq!(c.server.http.to_string(), "127.0.0.1:8080");
    assert_eq!(c.server.admin.to_string(), "127.0.0.1:2019");
}

fn err_of(src: &str) -> ConfigError {
    match parse_str(src) {
        Ok(_) => panic!("config should be refused:\n{src}"),
        Err(e) => e,
    }
}

#[test]
fn errors_point_at_line_and_column() {
    let e = err_of("[server]\nhttp = \"127.0.0.1:8080\"\nadmin = \"nope\"\n");
    assert_eq!((e.line, e.column), (3, 9), "{e}");
    assert!(e.message.contains("not a listen address"), "{e}");

    let e = err_of("[[site]]\nhosts = [\"a.test\"]\n  [[site.route]]\n  match = [\"/x\"]\n  prxy = \"127.0.0.1:1\"\n");
    assert_eq!(e.line, 5, "{e}");
    assert!(e.message.contains("unknown field"), "{e}");

    let e = err_of("[[site]]\nhosts = [\"a.test\"]\n  [[site.route]]\n  match = [\"/x\"]\n  proxy = \"127.0.0.1:1\"\n  static = \"/tmp\"\n");
    assert!(e.message.contains("several actions"), "{e}");
    assert!(e.help.as_deref().unwrap_or("").contains("exactly one"), "{e}");

    let e =
        err_of("[[site]]\nhosts = [\"a.test\"]\n  [[site.route]]\n  match = [\"/a/*/b\"]\n  proxy = \"127.0.0.1:1\"\n");
    assert_eq!((e.line, e.column), (4, 12), "{e}");

    let e = err_of("[server]\nheader_timeout = \"ten seconds\"\n");
    assert!(e.help.as_deref().unwrap_or("").contains("duration"), "{e}");

    // Zero would cut every connection (or body) at once.
    for key in ["header_timeout", "client_idle_timeout"] {
        let e = err_of(&format!("[server]\n{key} = \"0s\"\n"));
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.contains(&format!("`{key}` must be more than 0s")), "{e}");
        assert!(e.help.as_deref().unwrap_or("").contains("default"), "{e}");
    }

    let e = err_of("[[site]]\nhosts = [\"a.test\"]\n[[site]]\nhosts = [\"A.test\"]\n");
    assert_eq!(e.line, 4, "{e}");
    assert!(e.message.contains("two sites"), "{e}");

    let e = err_of("[[site]]\nhosts = [\"https://a.test\"]\n");
    assert!(e.message.contains("not a host name"), "{e}");

    let e = err_of(
        "[[site]]\nhosts = [\"a.test\"]\n  [[site.route]]\n  match = [\"/x\"]\n  redirect = \"/y\"\n  status = 200\n",
    );
    assert!(e.message.contains("status 200"), "{e}");
}

#[test]
fn display_shows_file_line_snippet_and_help() {
    let e = err_of("[server]\nadmin = \"nope\"\n");
    let text = e.to_string();
    assert!(text.starts_with("error: test.toml:2:9: "), "{text}");
    assert!(text.contains("admin = \"nope\""), "{text}");
    assert!(text.contains("help: "), "{text}");
}

#[test]
fn route_names_default_and_are_unique() {
    let c = parse_str(ISSUE_EXAMPLE).expect("valid");
    assert_eq!(c.sites[0].routes[0].name, "markco.dev/@*#1");
    let e = err_of("[[site]]\nhosts = [\"a.test\"]\n  [[site.route]]\n  name = \"x\"\n  match = [\"/a\"]\n  respond = \"a\"\n  [[site.route]]\n  name = \"x\"\n  match = [\"/b\"]\n  respond = \"b\"\n");
    assert!(e.message.contains("two routes are named"), "{e}");
}

#[test]
fn outage_grace_defaults_to_ten_minutes_and_is_configurable() {
    let c = parse_str("").expect("empty config");
    assert_eq!(c.plane.sessions.outage_grace, std::time::Duration::from_secs(600));
    let c = parse_str("[sessions]\noutage_grace = \"90s\"\n").expect("valid");
    assert_eq!(c.plane.sessions.outage_grace, std::time::Duration::from_secs(90));
    let e = parse_str("[sessions]\noutage_grace = \"soon\"\n").expect_err("not a duration");
    assert!(e.to_string().contains("outage_grace"), "{e}");
}
