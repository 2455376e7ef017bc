//! `deploy/smoke.sh` against a local markco: every step passes on a healthy deployment, and with
//! the user's editor stopped the script fails, at the `/u/` step.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use common::*;

const CONFIG: &str = r#"
[server]
http = "{http}"
admin = "{admin}"
upgrade_sock = "{dir}/upgrade.sock"
pid_file = "{dir}/markco.pid"

[database]
url = "sqlite://{dir}/markco.db"

[[health_check]]
name = "orchestrator"
url = "http://{orch}/health"
interval = "200ms"

[[site]]
hosts = ["markco.test"]

  [[site.route]]
  name = "control"
  match = ["/api/health", "/api/services"]
  control = true

  [[site.route]]
  name = "static"
  match = ["/static/*"]
  static = "{dir}/www"

  [[site.route]]
  name = "workspace"
  match = ["/u/*"]
  workspace = true

  [[site.route]]
  name = "fallback"
  match = ["/*"]
  proxy = "{orch}"
"#;

/// An editor that greets websockets on `/events` as mrmd-server does.
fn start_editor(name: &str) -> Upstream {
    let mut child = Command::new(upstream_bin())
        .args(["--listen", "127.0.0.1:0", "--name", name])
        .env("MARKCO_TU_EVENTS_GREETING", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the editor upstream");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("banner");
    let addr = line.trim().strip_prefix("listening on ").expect("banner").parse().expect("address");
    Upstream { addr, name: name.to_string(), proc: Proc { child } }
}

fn smoke(args: &[&str]) -> (Output, String) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/smoke.sh");
    let out = Command::new("bash").arg(script).args(args).output().expect("run deploy/smoke.sh");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, text)
}

#[test]
fn smoke_passes_on_a_healthy_deployment_and_fails_at_the_workspace_step_without_an_editor() {
    let orch = Upstream::start("orchestrator");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("www/static")).expect("mkdir");
    std::fs::write(dir.path().join("www/static/app.js"), "export const x = 1;\n").expect("write");
    let m = Markco::start_in(dir, Ports::free(), &CONFIG.replace("{orch}", &orch.addr.to_string()), &[]);
    let (user, token) = add_user(&m, "alice@example.com");
    let mut editor = start_editor("editor-alice");
    let runtime = Upstream::start("runtime-alice");
    put_workspace(&m, &user, editor.addr, runtime.addr);
    // The health check must have passed once before /api/health says ok.
    eventually(std::time::Duration::from_secs(10), "/api/health ok", || {
        http_get(m.http, "/api/health", &[("Host", "markco.test")]).is_ok_and(|r| r.status == 200)
    });

    // Through --resolve, as against a real deployment addressed by name.
    let port = m.http.port().to_string();
    let url = format!("http://markco.test:{port}");
    let resolve = format!("markco.test:{port}:127.0.0.1");
    let args = ["--url", &url, "--resolve", &resolve, "--token", &token, "--user", &user, "--static", "/static/app.js"];
    let (out, text) = smoke(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "healthy deployment:\n{text}\n{err}");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("PASS") || l.starts_with("FAIL")).collect();
    let steps: Vec<&str> = lines.iter().filter_map(|l| l.split_whitespace().nth(1)).collect();
    assert_eq!(steps, ["health", "services", "dashboard", "workspace", "websocket", "static"], "{text}");
    assert!(lines.iter().all(|l| l.starts_with("PASS")), "{text}");
    assert!(text.contains(r#""event":"connected""#), "the greeting is shown: {text}");
    assert!(
        text.lines().any(|l| l.starts_with("PASS  static") && l.contains("javascript") && l.ends_with("nosniff")),
        "{text}"
    );

    // The user's editor stops: the script must fail, at the /u/ step.
    let _ = editor.proc.child.kill();
    let _ = editor.proc.child.wait();
    let (out, text) = smoke(&args);
    assert_eq!(out.status.code(), Some(1), "editor stopped:\n{text}");
    let first_fail = text.lines().find(|l| l.starts_with("FAIL")).unwrap_or_default();
    assert!(first_fail.starts_with("FAIL  workspace"), "the first failure is the /u/ step: {text}");
    assert!(first_fail.contains("HTTP 5"), "the reason says what came back: {first_fail}");
    for step in ["health", "services", "dashboard", "static"] {
        assert!(text.lines().any(|l| l.starts_with("PASS") && l.contains(step)), "{step} still passes:\n{text}");
    }
    assert!(text.contains("step(s) failed"), "{text}");
}

#[test]
fn smoke_fails_where_a_deployment_is_wrong() {
    // Something that is not markco answers: no health status, no services, JSON for a script.
    let orch = Upstream::start("leaky");
    let up = orch.addr.to_string();
    // The echo upstream answers every path with JSON that repeats the request: the user id in
    // the path comes back in the body, and the "static" file is served as application/json.
    let url = format!("http://{up}");
    let (out, text) = smoke(&["--url", &url, "--static", "/static/app.js"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.lines().any(|l| l.starts_with("FAIL  health")), "no \"status\" field: {text}");
    assert!(text.lines().any(|l| l.starts_with("FAIL  static") && l.contains("want javascript")), "{text}");
    let (out, _) = smoke(&["--url", "ftp://x"]);
    assert_eq!(out.status.code(), Some(2), "bad usage is exit 2");
}

const TLS_CONFIG: &str = r#"
[server]
http = "{http}"
https = "{https}"
admin = "{admin}"
upgrade_sock = "{dir}/upgrade.sock"
pid_file = "{dir}/markco.pid"

[database]
url = "sqlite://{dir}/markco.db"

[[site]]
hosts = ["secure.test"]
tls = { cert = "{dir}/site.pem", key = "{dir}/site.key" }

  [[site.route]]
  name = "control"
  match = ["/api/health", "/api/services"]
  control = true

  [[site.route]]
  name = "workspace"
  match = ["/u/*"]
  workspace = true

  [[site.route]]
  name = "dashboard"
  match = ["/dashboard"]
  respond = "dashboard\n"
"#;

#[test]
fn smoke_over_https_checks_the_certificate_and_the_websocket() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    // Distinct names: a leaf whose subject equals its issuer's looks self-signed to OpenSSL.
    ca_params.distinguished_name.push(DnType::CommonName, "markco smoke test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
    // Valid for 90 more days from now.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let mut params = CertificateParams::new(vec!["secure.test".to_string()]).expect("params");
    params.distinguished_name.push(DnType::CommonName, "secure.test");
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(now + 90 * 86400);
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &ca).expect("certificate");
    std::fs::write(dir.path().join("site.pem"), cert.pem()).expect("write");
    std::fs::write(dir.path().join("site.key"), key.serialize_pem()).expect("write");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write");
    let ca_arg = ca_file.display().to_string();
    let m = Markco::start_in(dir, Ports::free(), TLS_CONFIG, &[]);
    let (user, token) = add_user(&m, "tls@example.com");
    let editor = start_editor("editor-tls");
    let runtime = Upstream::start("runtime-tls");
    put_workspace(&m, &user, editor.addr, runtime.addr);

    let port = m.https.port();
    let url = format!("https://secure.test:{port}");
    let resolve = format!("secure.test:{port}:127.0.0.1");
    let full = ["--url", &url, "--resolve", &resolve, "--cacert", &ca_arg, "--token", &token, "--user", &user];
    let (out, text) = smoke(&full);
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().any(|l| l.starts_with("PASS  websocket") && l.contains("editor-tls")), "wss works: {text}");
    let cert_line = text.lines().find(|l| l.starts_with("PASS  cert")).unwrap_or_else(|| panic!("{text}"));
    assert!(cert_line.contains("(89 days)") || cert_line.contains("(90 days)"), "{cert_line}");

    // Wanting more time left than the certificate has fails the step.
    let (out, text) = smoke(&["--url", &url, "--resolve", &resolve, "--cacert", &ca_arg, "--min-days", "120"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.lines().any(|l| l.starts_with("FAIL  cert") && l.contains("want at least 120")), "{text}");

    // A certificate the client does not trust fails at the first request, with curl's reason.
    let (out, text) = smoke(&["--url", &url, "--resolve", &resolve]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.lines().any(|l| l.starts_with("FAIL  health") && l.contains("certificate")), "{text}");
}
