//! Routing as a user sees it: the production route table, forwarded and hop-by-hop headers,
//! static files, upstream failures, redirect/respond actions and host matching. Every test starts
//! its own markco and test upstreams on loopback.

// The shared harness is not ours to edit; its one clippy finding is silenced here.
#[allow(clippy::while_let_loop)]
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The `[server]` section every test config starts with: listeners on the harness's ports, and the
/// upgrade socket and pid file inside the test's own directory.
const SERVER: &str = r#"
[server]
http = "{http}"
admin = "{admin}"
upgrade_sock = "{dir}/upgrade.sock"
pid_file = "{dir}/markco.pid"
"#;

/// A GET with an explicit `Host` header (and any extra headers).
fn get(addr: SocketAddr, host: &str, path: &str, extra: &[(&str, &str)]) -> Resp {
    let mut headers = vec![("Host", host)];
    headers.extend_from_slice(extra);
    http_get(addr, path, &headers).unwrap_or_else(|e| panic!("GET {path} (Host: {host}): {e}"))
}

/// What the test upstream's echo said: which upstream answered, the path and query it saw.
struct Echo {
    name: String,
    path: String,
    query: Option<String>,
    headers: serde_json::Map<String, Value>,
}

fn echo_of(r: &Resp, what: &str) -> Echo {
    assert_eq!(r.status, 200, "{what}: status {} body {:?}", r.status, r.body_text());
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{what}: not an upstream echo ({e}): {:?}", r.body_text()));
    Echo {
        name: v["name"].as_str().unwrap_or_default().to_string(),
        path: v["path"].as_str().unwrap_or_default().to_string(),
        query: v["query"].as_str().map(str::to_string),
        headers: v["headers"].as_object().cloned().unwrap_or_default(),
    }
}

/// A header as the upstream saw it (a string, or several values joined by ", ").
fn seen_header(e: &Echo, name: &str) -> Option<String> {
    match e.headers.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => Some(a.iter().map(|v| v.as_str().unwrap_or_default()).collect::<Vec<_>>().join(", ")),
        other => Some(other.to_string()),
    }
}

fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("create dirs");
    std::fs::write(path, bytes).expect("write file");
}

/// The production example config, pointed at test upstreams, the harness's listeners and a
/// static root inside the test directory.
fn example_template(upstreams: &[(&str, SocketAddr)]) -> String {
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/markco.example.toml"))
        .expect("read deploy/markco.example.toml");
    let mut out = String::new();
    for line in src.lines() {
        let t = line.trim_start();
        let line = if t.starts_with("http =") {
            "http = \"{http}\"".to_string()
        } else if t.starts_with("admin =") {
            "admin = \"{admin}\"".to_string()
        } else if t.starts_with("upgrade_sock =") {
            "upgrade_sock = \"{dir}/upgrade.sock\"".to_string()
        } else if t.starts_with("pid_file =") {
            "pid_file = \"{dir}/markco.pid\"".to_string()
        } else {
            line.to_string()
        };
        out.push_str(&line);
        out.push('\n');
    }
    // Quoted, so that a replaced address such as "127.0.0.1:30012" is never hit by a later one.
    for (from, to) in upstreams {
        assert!(out.contains(&format!("\"{from}\"")), "the example config no longer proxies to {from}");
        out = out.replace(&format!("\"{from}\""), &format!("\"{to}\""));
    }
    assert!(out.contains("\"/opt/markco/static\""), "the example config no longer serves /opt/markco/static");
    out = out.replace("\"/opt/markco/static\"", "\"{dir}/static-root\"");
    // Every proxy target is now a test upstream.
    for line in out.lines() {
        if let Some(target) = line.trim_start().strip_prefix("proxy =") {
            let target = target.trim().trim_matches('"');
            assert!(
                upstreams.iter().any(|(_, to)| to.to_string() == target),
                "an upstream of the example config has no test upstream: {line}"
            );
        }
    }
    out
}

const APP_JS: &[u8] = b"console.log(\"markco static\");\n";

/// Checks one request against the upstream that should answer it and the path and query that
/// upstream should see; returns a failure message naming the request.
fn check_upstream(m: &Markco, host: &str, path: &str, name: &str, seen: &str) -> Option<String> {
    let query = path.split_once('?').map(|(_, q)| q);
    let r = match http_get(m.http, path, &[("Host", host)]) {
        Ok(r) => r,
        Err(e) => return Some(format!("Host {host} GET {path}: request failed: {e}")),
    };
    let ok = r.status == 200
        && serde_json::from_slice::<Value>(&r.body)
            .is_ok_and(|v| v["name"] == name && v["path"] == seen && v["query"].as_str() == query);
    (!ok).then(|| {
        format!(
            "Host {host} GET {path}: want upstream {name} seeing path {seen:?} query {query:?}, \
             got {} {:?}",
            r.status,
            r.body_text()
        )
    })
}

#[test]
fn example_config_routes_go_where_they_should() {
    let orchestrator = Upstream::start("orchestrator");
    let auth = Upstream::start("auth");
    let publish = Upstream::start("publish");
    let umami = Upstream::start("umami");
    let template = example_template(&[
        ("127.0.0.1:3000", orchestrator.addr),
        ("127.0.0.1:3001", auth.addr),
        ("127.0.0.1:3003", publish.addr),
        ("127.0.0.1:3005", umami.addr),
    ]);
    let m = Markco::start(&template);
    write_file(&m.dir.path().join("static-root/static/app.js"), APP_JS);

    // (request, upstream): the upstream sees the request's own path and query.
    let routed: &[(&str, &str)] = &[
        ("/@alice/post", "publish"),
        ("/@alice", "publish"),
        ("/auth/callback/github?code=x", "orchestrator"),
        ("/auth/email/verify?token=t", "orchestrator"),
        ("/auth/login", "auth"),
        ("/auth", "auth"),
        ("/auth/", "auth"),
        ("/join/abc", "orchestrator"),
        ("/collab/abc", "orchestrator"),
        ("/script.js", "umami"),
        ("/api/send", "umami"),
        ("/api/send?x=1", "umami"),
        ("/api/sends", "orchestrator"),
        ("/api/send/x", "orchestrator"),
        ("/analytics/", "umami"),
        ("/analytics", "umami"),
        ("/analytics/websites/1", "umami"),
        ("/analytics-x", "orchestrator"),
        ("/api/logout", "orchestrator"),
        ("/login", "orchestrator"),
        ("/dashboard", "orchestrator"),
        ("/.well-known/assetlinks.json", "orchestrator"),
        ("/", "orchestrator"),
        ("/anything/else", "orchestrator"),
    ];
    // (request, upstream, path it sees): other spellings route, and are forwarded, as their
    // normal form.
    let normalised: &[(&str, &str, &str)] = &[
        ("/api/../api/send", "umami", "/api/send"),
        ("/%61pi/send", "umami", "/api/send"),
        ("//api//send", "umami", "/api/send"),
        ("/api/./send", "umami", "/api/send"),
        ("/%2e%2e/api/send", "umami", "/api/send"),
        ("/static/../@bob", "publish", "/@bob"),
    ];
    let mut failures = Vec::new();
    for host in ["markco.dev", "www.markco.dev"] {
        for (path, name) in routed {
            let seen = path.split('?').next().unwrap_or(path);
            failures.extend(check_upstream(&m, host, path, name, seen));
        }
        for (path, name, seen) in normalised {
            failures.extend(check_upstream(&m, host, path, name, seen));
        }
        let r = get(m.http, host, "/static/app.js", &[]);
        let ct = r.header("content-type").unwrap_or("");
        if r.status != 200 || r.body != APP_JS || ct != "text/javascript; charset=utf-8" {
            failures.push(format!(
                "Host {host} GET /static/app.js: want the file as text/javascript, \
                 got {} content-type {ct:?} body {:?}",
                r.status,
                r.body_text()
            ));
        }
    }
    assert!(failures.is_empty(), "{} routing failures:\n{}", failures.len(), failures.join("\n"));

    // The Host header reaches the upstream unchanged.
    let e = echo_of(&get(m.http, "www.markco.dev", "/api/send", &[]), "/api/send");
    assert_eq!(seen_header(&e, "host").as_deref(), Some("www.markco.dev"));

    // A host no site answers: 404 with a short explanation, nothing forwarded.
    for path in ["/", "/api/send", "/@alice/post"] {
        let r = get(m.http, "unknown.example", path, &[]);
        assert_eq!(r.status, 404, "Host unknown.example GET {path}: {:?}", r.body_text());
        assert!(!r.body.is_empty(), "Host unknown.example GET {path}: empty 404 body");
        assert!(
            !r.body_text().contains("\"name\""),
            "Host unknown.example GET {path} reached an upstream: {:?}",
            r.body_text()
        );
    }
}

/// Headers a client tries to smuggle in as if a proxy had set them.
const SPOOFED: [(&str, &str); 5] = [
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Real-IP", "6.6.6.6"),
    ("X-Forwarded-Host", "evil"),
    ("X-Forwarded-Proto", "https"),
    ("Forwarded", "for=6.6.6.6"),
];

fn forwarding_config(upstream: SocketAddr, trusted: &str) -> String {
    format!(
        r#"{SERVER}
trusted_proxies = {trusted}

[[site]]
hosts = ["*"]

  [[site.route]]
  name = "all"
  match = ["/*"]
  proxy = "{upstream}"
"#
    )
}

#[test]
fn forwarded_headers_are_ours() {
    let up = Upstream::start("fwd");
    let untrusted = Markco::start(&forwarding_config(up.addr, "[]"));
    let trusted = Markco::start(&forwarding_config(up.addr, r#"["127.0.0.1"]"#));

    // An untrusted client's forwarding claims are replaced by what markco saw.
    let e = echo_of(&get(untrusted.http, "app.test", "/who?x=1", &SPOOFED), "untrusted");
    assert_eq!(e.name, "fwd");
    assert_eq!(e.path, "/who");
    assert_eq!(e.query.as_deref(), Some("x=1"));
    assert_eq!(seen_header(&e, "x-forwarded-for").as_deref(), Some("127.0.0.1"), "{:?}", e.headers);
    assert_eq!(seen_header(&e, "x-forwarded-proto").as_deref(), Some("http"), "{:?}", e.headers);
    assert_eq!(seen_header(&e, "x-forwarded-host").as_deref(), Some("app.test"), "{:?}", e.headers);
    assert_eq!(seen_header(&e, "host").as_deref(), Some("app.test"), "{:?}", e.headers);
    assert_eq!(seen_header(&e, "forwarded"), None, "{:?}", e.headers);
    assert_eq!(seen_header(&e, "x-real-ip"), None, "{:?}", e.headers);

    // Without any claims, the same.
    let e = echo_of(&get(untrusted.http, "app.test", "/", &[]), "untrusted, no claims");
    assert_eq!(seen_header(&e, "x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(seen_header(&e, "x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(seen_header(&e, "x-forwarded-host").as_deref(), Some("app.test"));

    // A trusted proxy's claims are kept, and the hop markco saw is appended.
    let e = echo_of(&get(trusted.http, "app.test", "/who", &SPOOFED), "trusted");
    assert_eq!(seen_header(&e, "x-forwarded-for").as_deref(), Some("6.6.6.6, 127.0.0.1"), "{:?}", e.headers);
    assert_eq!(seen_header(&e, "x-forwarded-proto").as_deref(), Some("https"), "{:?}", e.headers);
    assert_eq!(seen_header(&e, "x-forwarded-host").as_deref(), Some("evil"), "{:?}", e.headers);
    // A trusted peer that claims nothing gets markco's view.
    let e = echo_of(&get(trusted.http, "app.test", "/", &[]), "trusted, no claims");
    assert_eq!(seen_header(&e, "x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(seen_header(&e, "x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(seen_header(&e, "x-forwarded-host").as_deref(), Some("app.test"));

    // Hop-by-hop headers stay on the client's hop; ordinary ones go through. The connection
    // option is sent on its own `Connection` line here (the harness adds `Connection: close`).
    let hop = [
        ("Connection", "X-Secret"),
        ("X-Secret", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "x"),
        ("X-Ordinary", "yes"),
        ("Authorization", "Bearer t"),
        ("Accept", "application/json"),
        ("Cookie", "a=b"),
    ];
    for (which, m) in [("untrusted", &untrusted), ("trusted", &trusted)] {
        // One response is read; whether the connection is closed is checked by
        // `connection_close_on_a_second_header_line_is_honoured`; here only the headers count.
        let r =
            raw_request(m.http, "GET", "/hop", &[&[("Host", "app.test")], &hop[..]].concat(), Duration::from_secs(10));
        let e = echo_of(&r, which);
        for gone in ["x-secret", "keep-alive", "proxy-authorization"] {
            assert_eq!(seen_header(&e, gone), None, "{which}: {gone} was forwarded: {:?}", e.headers);
        }
        for (name, value) in
            [("x-ordinary", "yes"), ("authorization", "Bearer t"), ("accept", "application/json"), ("cookie", "a=b")]
        {
            assert_eq!(seen_header(&e, name).as_deref(), Some(value), "{which}: {name}: {:?}", e.headers);
        }
        // The same with the option listed next to `close` on one line.
        let mut one_line = hop;
        one_line[0] = ("Connection", "X-Secret, close");
        let e = echo_of(&get(m.http, "app.test", "/hop", &one_line), which);
        assert_eq!(seen_header(&e, "x-secret"), None, "{which}: X-Secret was forwarded: {:?}", e.headers);
        assert_eq!(seen_header(&e, "x-ordinary").as_deref(), Some("yes"), "{which}: {:?}", e.headers);
    }
}

/// Sends exactly these header lines (no `Connection: close` added) and reads until the server
/// closes or `timeout` passes.
/// A request with exactly these header lines; reads its one response.
fn raw_request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], timeout: Duration) -> Resp {
    raw_exchange_one(addr, raw_head(method, path, headers).as_bytes(), timeout)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn raw_head(method: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// RFC 9110 5.3 / RFC 9112 9.6: `Connection` is a list, and its lines combine; a server that
/// receives the `close` option must close the connection after its response, whichever
/// `Connection` line carried it.
#[test]
fn connection_close_on_a_second_header_line_is_honoured() {
    let up = Upstream::start("conn");
    let m = Markco::start(&forwarding_config(up.addr, "[]"));
    for (what, headers) in [
        ("one line", &[("Host", "app.test"), ("Connection", "X-Secret, close")][..]),
        ("two lines", &[("Host", "app.test"), ("Connection", "X-Secret"), ("Connection", "close")][..]),
        ("keep-alive, then close", &[("Host", "app.test"), ("Connection", "keep-alive"), ("Connection", "close")][..]),
    ] {
        // raw_exchange fails unless the server closes the connection; a keep-alive
        // connection would be held until its idle timeout (60 s), far past this read timeout.
        let raw = raw_exchange(m.http, raw_head("GET", "/conn", headers).as_bytes(), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{what}: {headers:?}: the server kept the connection open: {e}"));
        let r = parse_response(&raw)
            .unwrap_or_else(|| panic!("{what}: unparseable response {:?}", String::from_utf8_lossy(&raw)));
        let e = echo_of(&r, what);
        assert_eq!(e.name, "conn", "{what}");
    }
}

#[test]
fn static_files() {
    let root_dir = tempfile::tempdir().expect("tempdir");
    let root = root_dir.path().join("www");
    let s = root.join("static");
    let png: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01";
    let files: &[(&str, &[u8], &str)] = &[
        ("app.js", b"export const a = 1;\n", "text/javascript; charset=utf-8"),
        ("mod.mjs", b"export default 2;\n", "text/javascript; charset=utf-8"),
        ("site.css", b"body { color: red }\n", "text/css; charset=utf-8"),
        ("page.html", b"<!doctype html><p>hi</p>\n", "text/html; charset=utf-8"),
        ("data.json", b"{\"a\":1}\n", "application/json"),
        ("logo.svg", b"<svg xmlns=\"http://www.w3.org/2000/svg\"/>\n", "image/svg+xml"),
        ("logo.png", png, "image/png"),
        ("font.woff2", b"wOF2\0\x01\0\0", "font/woff2"),
        ("mod.wasm", b"\0asm\x01\0\0\0", "application/wasm"),
        ("app.js.map", b"{\"version\":3}\n", "application/json"),
    ];
    for (name, bytes, _) in files {
        write_file(&s.join(name), bytes);
    }
    write_file(&s.join("docs/index.html"), b"<p>docs index</p>\n");
    std::os::unix::fs::symlink("/etc", s.join("etc")).expect("symlink to /etc");
    std::os::unix::fs::symlink("/etc/passwd", s.join("pw.txt")).expect("symlink to /etc/passwd");
    std::os::unix::fs::symlink(s.join("app.js"), s.join("alias.js")).expect("symlink inside root");

    let m = Markco::start(&format!(
        r#"{SERVER}
[[site]]
hosts = ["*"]

  [[site.route]]
  name = "static"
  match = ["/static/*"]
  static = "{}"
"#,
        root.display()
    ));
    let h = "files.test";

    for (name, bytes, ctype) in files {
        let path = format!("/static/{name}");
        let r = get(m.http, h, &path, &[]);
        assert_eq!(r.status, 200, "GET {path}: {:?}", r.body_text());
        assert_eq!(r.body, *bytes, "GET {path}: body");
        assert_eq!(r.header("content-type"), Some(*ctype), "GET {path}: Content-Type");
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "GET {path}: nosniff");
        assert!(r.header("etag").is_some_and(|v| !v.is_empty()), "GET {path}: no ETag");
        assert!(r.header("last-modified").is_some_and(|v| !v.is_empty()), "GET {path}: no Last-Modified");
    }

    // Validators.
    let first = get(m.http, h, "/static/app.js", &[]);
    let etag = first.header("etag").expect("etag").to_string();
    let last_modified = first.header("last-modified").expect("last-modified").to_string();
    let r = get(m.http, h, "/static/app.js", &[("If-None-Match", &etag)]);
    assert_eq!(r.status, 304, "If-None-Match {etag}: {:?}", r.body_text());
    assert!(r.body.is_empty(), "a 304 has no body: {:?}", r.body_text());
    assert_eq!(r.header("etag"), Some(etag.as_str()), "a 304 repeats the ETag");
    let r = get(m.http, h, "/static/app.js", &[("If-None-Match", &format!("\"nope\", {etag}"))]);
    assert_eq!(r.status, 304, "If-None-Match with a list containing the ETag");
    let r = get(m.http, h, "/static/app.js", &[("If-Modified-Since", &last_modified)]);
    assert_eq!(r.status, 304, "If-Modified-Since {last_modified}: {:?}", r.body_text());
    assert!(r.body.is_empty(), "a 304 has no body: {:?}", r.body_text());
    let r = get(m.http, h, "/static/app.js", &[("If-None-Match", "\"other\"")]);
    assert_eq!(r.status, 200, "a different ETag gets the file");
    assert_eq!(r.body, first.body);
    let r = get(m.http, h, "/static/app.js", &[("If-Modified-Since", "Thu, 01 Jan 1970 00:00:00 GMT")]);
    assert_eq!(r.status, 200, "modified since 1970 gets the file");
    assert_eq!(r.body, first.body);

    // HEAD: the headers of a GET, no body.
    let r = request(m.http, "HEAD", "/static/site.css", &[("Host", h)], b"").expect("HEAD");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("20"), "HEAD Content-Length");
    assert_eq!(r.header("content-type"), Some("text/css; charset=utf-8"));
    assert!(r.body.is_empty(), "HEAD has no body: {:?}", r.body_text());

    // Missing files, directories and their index.
    let r = get(m.http, h, "/static/missing.js", &[]);
    assert_eq!(r.status, 404, "missing file: {:?}", r.body_text());
    for path in ["/static/docs/", "/static/docs"] {
        let r = get(m.http, h, path, &[]);
        assert_eq!(r.status, 200, "GET {path}: {:?}", r.body_text());
        assert_eq!(r.body, b"<p>docs index</p>\n", "GET {path}");
        assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"), "GET {path}");
    }
    let r = get(m.http, h, "/static/", &[]);
    assert_eq!(r.status, 404, "a directory without index: {:?}", r.body_text());
    // A symlink that stays inside the root is an ordinary file.
    let r = get(m.http, h, "/static/alias.js", &[]);
    assert_eq!(r.status, 200, "symlink inside the root: {:?}", r.body_text());
    assert_eq!(r.body, b"export const a = 1;\n");

    // Nothing outside the root, however the path is spelled.
    for path in [
        "/static/../../etc/passwd",
        "/static/%2e%2e/%2e%2e/etc/passwd",
        "/static/..%2f..%2fetc%2fpasswd",
        "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/static/%252e%252e/%252e%252e/etc/passwd",
        "/static/docs/..%5c..%5c..%5cetc%5cpasswd",
    ] {
        let r = get(m.http, h, path, &[]);
        assert!((400..500).contains(&r.status), "GET {path}: status {} {:?}", r.status, r.body_text());
        assert!(!r.body_text().contains("root:"), "GET {path} leaked /etc/passwd");
    }
    for path in ["/static/etc/passwd", "/static/etc/", "/static/etc", "/static/pw.txt"] {
        let r = get(m.http, h, path, &[]);
        assert!(
            r.status == 403 || r.status == 404,
            "GET {path} (symlink out of the root): status {} {:?}",
            r.status,
            r.body_text()
        );
        assert!(!r.body_text().contains("root:"), "GET {path} leaked /etc/passwd");
    }

    // Only GET and HEAD.
    for method in ["POST", "PUT", "DELETE"] {
        let r = request(m.http, method, "/static/app.js", &[("Host", h)], b"x=1").expect(method);
        assert_eq!(r.status, 405, "{method} /static/app.js: {:?}", r.body_text());
        assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method}: Allow");
    }
}

#[test]
fn upstream_down_gives_502_quickly() {
    let dead_port = free_port();
    let dead = format!("127.0.0.1:{dead_port}");
    let config = |extra: &str| {
        format!(
            r#"{SERVER}
[[site]]
hosts = ["*"]

  [[site.route]]
  name = "dead"
  match = ["/dead/*"]
  proxy = "{dead}"
{extra}"#
        )
        // A long connect timeout: a refused connection must give 502 at once, not after it.
        .replace("[server]\n", "[server]\nupstream_connect_timeout = \"30s\"\n")
    };
    let m = Markco::start(&config(""));
    let h = "down.test";

    for path in ["/dead/x", "/dead/y?z=1"] {
        let t = Instant::now();
        let r = get(m.http, h, path, &[]);
        let took = t.elapsed();
        assert_eq!(r.status, 502, "GET {path}: {:?}", r.body_text());
        assert!(took < Duration::from_secs(5), "GET {path}: 502 took {took:?}");
        let body = r.body_text();
        assert!(!body.is_empty() && body.len() < 200, "GET {path}: 502 body {body:?}");
        for secret in ["127.0.0.1", &dead_port.to_string(), "refused", "os error"] {
            assert!(!body.contains(secret), "GET {path}: 502 body names {secret:?}: {body:?}");
        }
    }

    // The server is fine: a second route to a live upstream (added by a reload) works.
    let up = Upstream::start("alive");
    m.write_config(&config(&format!(
        r#"
  [[site.route]]
  name = "alive"
  match = ["/alive/*"]
  proxy = "{}"
"#,
        up.addr
    )));
    let r = request(m.admin, "POST", "/reload", &[], b"").expect("POST /reload");
    assert_eq!(r.status, 200, "reload: {:?}", r.body_text());
    let e = echo_of(&get(m.http, h, "/alive/ok", &[]), "/alive/ok");
    assert_eq!((e.name.as_str(), e.path.as_str()), ("alive", "/alive/ok"));
    let r = get(m.http, h, "/dead/again", &[]);
    assert_eq!(r.status, 502, "still 502 for the dead route: {:?}", r.body_text());

    let metrics = m.metrics();
    let refused =
        metric_value(&metrics, "markco_upstream_errors_total", &[("upstream", &dead), ("kind", "connect_refused")]);
    assert!(
        refused.is_some_and(|v| v >= 1.0),
        "markco_upstream_errors_total{{upstream=\"{dead}\",kind=\"connect_refused\"}} = {refused:?}; metrics:\n{metrics}"
    );
}

#[test]
fn redirect_and_respond_actions() {
    let m = Markco::start(&format!(
        r#"{SERVER}
[[site]]
hosts = ["*"]

  [[site.route]]
  name = "teapot"
  match = ["/teapot"]
  respond = "hello\n"
  status = 418
  content_type = "text/plain"

  [[site.route]]
  name = "moved"
  match = ["/moved/*"]
  redirect = "/new{{path}}"
  status = 301

  [[site.route]]
  name = "canonical"
  match = ["/*"]
  redirect = "https://markco.dev{{uri}}"
"#
    ));
    let h = "old.test";

    for (path, location) in [
        ("/", "https://markco.dev/"),
        ("/a/b", "https://markco.dev/a/b"),
        ("/a/b?x=1&y=two", "https://markco.dev/a/b?x=1&y=two"),
        ("/@alice/post?utm=1", "https://markco.dev/@alice/post?utm=1"),
    ] {
        let r = get(m.http, h, path, &[]);
        assert_eq!(r.status, 308, "GET {path}: the default redirect status");
        assert_eq!(r.header("location"), Some(location), "GET {path}: Location");
    }
    let r = request(m.http, "POST", "/form?a=1", &[("Host", h)], b"x").expect("POST");
    assert_eq!(r.status, 308, "POST is redirected too");
    assert_eq!(r.header("location"), Some("https://markco.dev/form?a=1"));

    // {path} has no query; the configured status is used.
    let r = get(m.http, h, "/moved/page?q=1", &[]);
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("/new/moved/page"));

    let r = get(m.http, h, "/teapot", &[]);
    assert_eq!(r.status, 418, "{:?}", r.body_text());
    assert_eq!(r.body, b"hello\n");
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(r.header("content-length"), Some("6"));
    let r = request(m.http, "HEAD", "/teapot", &[("Host", h)], b"").expect("HEAD");
    assert_eq!(r.status, 418);
    assert!(r.body.is_empty(), "HEAD has no body: {:?}", r.body_text());
}

#[test]
fn host_matching() {
    // Sites are listed with the catch-all and the wildcard first, to show that order does not
    // decide: an exact host beats a wildcard, which beats "*".
    let m = Markco::start(&format!(
        r#"{SERVER}
[[site]]
hosts = ["*"]
  [[site.route]]
  name = "any"
  match = ["/*"]
  respond = "any\n"

[[site]]
hosts = ["*.wild.test"]
  [[site.route]]
  name = "wild"
  match = ["/*"]
  respond = "wild\n"

[[site]]
hosts = ["exact.wild.test"]
  [[site.route]]
  name = "exact"
  match = ["/*"]
  respond = "exact\n"

[[site]]
hosts = ["markco.dev", "www.markco.dev"]
  [[site.route]]
  name = "markco"
  match = ["/*"]
  respond = "markco\n"
"#
    ));
    for (host, site) in [
        ("markco.dev", "markco"),
        ("markco.dev:8080", "markco"),
        ("MARKCO.DEV", "markco"),
        ("Www.Markco.Dev", "markco"),
        ("markco.dev.", "markco"),
        ("MARKCO.DEV.:8080", "markco"),
        ("a.wild.test", "wild"),
        ("A.Wild.Test:8080", "wild"),
        ("a.wild.test.", "wild"),
        ("exact.wild.test", "exact"),
        ("EXACT.wild.test:443", "exact"),
        ("wild.test", "any"),
        ("xwild.test", "any"),
        ("other.example", "any"),
        ("127.0.0.1", "any"),
        ("notmarkco.dev", "any"),
        ("markco.dev.evil", "any"),
    ] {
        let r = get(m.http, host, "/", &[]);
        assert_eq!(r.status, 200, "Host {host}: {:?}", r.body_text());
        assert_eq!(r.body_text(), format!("{site}\n"), "Host {host} should reach site {site}");
    }
}
