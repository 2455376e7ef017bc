//! The podman engine (`markco_control::engine::podman::Podman`) against a real podman: its API
//! socket from `MARKCO_PODMAN_SOCKET` (default `/run/podman/podman.sock`; `scripts/podman-setup.sh`
//! installs podman and starts the service). The image, `localhost/markco-testupstream:test`, is
//! built here from the project's test upstream (static binary, `testupstream/Containerfile`):
//! nothing is pulled. Every test uses its own names and ports (tests run in parallel) and removes
//! its pods even when it fails. The last tests need no podman: a fake API on a unix socket checks
//! the HTTP client (chunked event stream split anywhere, errors).

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use markco_control::engine::podman::{ApiError, Podman};
use markco_control::engine::{ContainerEngine, ContainerSpec, PodSpec, LABEL_MANAGED, LABEL_ROLE, LABEL_USER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IMAGE: &str = "localhost/markco-testupstream:test";
const CONTAINER_PORT: u16 = 8080;

fn socket() -> String {
    std::env::var("MARKCO_PODMAN_SOCKET").unwrap_or_else(|_| "/run/podman/podman.sock".into())
}

fn socket_path() -> String {
    let s = socket();
    s.strip_prefix("unix://").map(str::to_owned).unwrap_or(s)
}

/// The podman CLI talking to the same service as the engine.
fn cli() -> Command {
    let mut c = Command::new("podman");
    c.arg("--url").arg(format!("unix://{}", socket_path()));
    c
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The engine, after checking that podman answers (and that the test image exists).
async fn engine() -> Podman {
    let podman = Podman::new(socket());
    if let Err(e) = podman.ping().await {
        panic!(
            "podman's API does not answer on {} ({e:#}); run scripts/podman-setup.sh (or set MARKCO_PODMAN_SOCKET)",
            socket()
        );
    }
    test_image();
    podman
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the static test upstream (its own target dir, so the main build cache is untouched)
/// and `localhost/markco-testupstream:test` from it, once per test run. The image carries the
/// binary's hash as label `markco.build` and is rebuilt only when the binary changed.
fn test_image() -> &'static str {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(e) = BUILT.get_or_init(build_test_image) {
        panic!("building {IMAGE}: {e}");
    }
    IMAGE
}

fn build_test_image() -> Result<(), String> {
    let started = Instant::now();
    let target_dir = std::env::var("MARKCO_STATIC_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| {
        if Path::new("/var/cache/markco").is_dir() {
            PathBuf::from("/var/cache/markco/static-target")
        } else {
            workspace_root().join("target").join("static")
        }
    });
    let out = Command::new("rustc").arg("-vV").output().map_err(|e| format!("rustc -vV: {e}"))?;
    let triple = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .ok_or("no host triple in rustc -vV")?;
    // --target: crt-static applies to the binary only, not to build scripts and proc macros.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "--quiet", "--release", "-p", "markco-testupstream", "--target", &triple, "--target-dir"])
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        // Build scripts track it: a test run with it set would rebuild everything.
        .env_remove("RUSTC_BOOTSTRAP")
        .output()
        .map_err(|e| format!("cargo build: {e}"))?;
    if !out.status.success() {
        return Err(format!("static build of markco-testupstream failed:\n{}", String::from_utf8_lossy(&out.stderr)));
    }
    let binary = target_dir.join(&triple).join("release").join("markco-testupstream");
    // FROM scratch has no dynamic loader: the binary must not ask for one.
    let elf = std::fs::read(&binary).map_err(|e| format!("reading {}: {e}", binary.display()))?;
    if has_interpreter(&elf).ok_or_else(|| format!("{} is not an ELF64 file", binary.display()))? {
        return Err(format!("{} is dynamically linked (has PT_INTERP); crt-static did not apply", binary.display()));
    }
    let out = Command::new("sha256sum").arg(&binary).output().map_err(|e| format!("sha256sum: {e}"))?;
    let sum: String = String::from_utf8_lossy(&out.stdout).chars().take(16).collect();
    if sum.len() != 16 {
        return Err(format!("no hash of {}", binary.display()));
    }
    let label = cli()
        .args(["image", "inspect", "--format", "{{ index .Labels \"markco.build\" }}", IMAGE])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if label == sum {
        return Ok(());
    }
    let ctx = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    std::fs::copy(&binary, ctx.path().join("markco-testupstream"))
        .map_err(|e| format!("copying {}: {e}", binary.display()))?;
    std::fs::copy(workspace_root().join("testupstream/Containerfile"), ctx.path().join("Containerfile"))
        .map_err(|e| format!("copying testupstream/Containerfile: {e}"))?;
    let out = cli()
        .args(["build", "--quiet", "--label", &format!("markco.build={sum}"), "-t", IMAGE])
        .arg(ctx.path())
        .output()
        .map_err(|e| format!("podman build: {e}"))?;
    if !out.status.success() {
        return Err(format!("podman build failed:\n{}", String::from_utf8_lossy(&out.stderr)));
    }
    eprintln!("built {IMAGE} (markco.build={sum}) in {:?}", started.elapsed());
    Ok(())
}

/// Does this little-endian ELF64 file have a PT_INTERP program header (a dynamic loader)?
fn has_interpreter(elf: &[u8]) -> Option<bool> {
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let phoff = usize::try_from(u64::from_le_bytes(elf.get(0x20..0x28)?.try_into().ok()?)).ok()?;
    let (phentsize, phnum) = (u16_at(0x36)?, u16_at(0x38)?);
    (0..phnum).try_fold(false, |found, i| {
        let at = phoff + i * phentsize;
        Some(found || u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?) == 3)
    })
}

/// A unique name per test (tests run in parallel, and a failed run may leave pods behind).
fn unique(what: &str) -> String {
    format!("markco-t-{what}-{:08x}", fastrand::u32(..))
}

/// Removes the pod with the CLI when the test ends, whatever happened.
struct PodGuard(String);

impl Drop for PodGuard {
    fn drop(&mut self) {
        let _ = cli().args(["pod", "rm", "-f", "-t", "0", &self.0]).output();
    }
}

fn pod_exists(name: &str) -> bool {
    cli().args(["pod", "exists", name]).status().is_ok_and(|s| s.success())
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// `GET http://127.0.0.1:{port}{path}` → (status, body), or None when nothing answers yet.
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(2), fetch).await.ok().flatten()
}

/// Waits for `/health` to answer `{"status":"ok",...}`; returns the body.
async fn wait_health(port: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut last = None;
    while Instant::now() < deadline {
        match http_get(port, "/health").await {
            Some((200, body)) => {
                let v: serde_json::Value =
                    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/health body {body:?}: {e}"));
                assert_eq!(v["status"], "ok", "/health answered {body}");
                return body;
            }
            other => last = other,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("GET http://127.0.0.1:{port}/health did not answer ok within {within:?} (last: {last:?})");
}

/// A labelled pod publishing `host_port`, with one test upstream container in it.
struct Fixture {
    pod: String,
    container: String,
    user: String,
    host_port: u16,
}

fn pod_spec(f: &Fixture) -> PodSpec {
    PodSpec {
        name: f.pod.clone(),
        labels: labels(&[(LABEL_MANAGED, "true"), (LABEL_USER, &f.user)]),
        host_ip: std::net::IpAddr::from([127, 0, 0, 1]),
        publish: vec![(f.host_port, CONTAINER_PORT)],
    }
}

fn container_spec(f: &Fixture) -> ContainerSpec {
    ContainerSpec {
        name: f.container.clone(),
        pod: f.pod.clone(),
        image: IMAGE.into(),
        command: Vec::new(),
        env: labels(&[("PORT", &CONTAINER_PORT.to_string()), ("MARKCO_TU_NAME", "editor-under-test")]),
        labels: labels(&[(LABEL_MANAGED, "true"), (LABEL_USER, &f.user), (LABEL_ROLE, "editor")]),
        mounts: Vec::new(),
        memory_bytes: None,
        cpus: None,
    }
}

fn fixture(what: &str) -> (Fixture, PodGuard) {
    let pod = unique(what);
    let f = Fixture { container: format!("{pod}-editor"), user: format!("user-{pod}"), pod, host_port: free_port() };
    let guard = PodGuard(f.pod.clone());
    (f, guard)
}

#[tokio::test]
async fn ping_names_the_version() {
    let podman = engine().await;
    let version = podman.ping().await.expect("ping");
    assert!(version.starts_with("podman 4."), "{version}");
    // The URL form and the plain path are the same socket.
    let plain = Podman::new(socket_path());
    assert!(plain.ping().await.is_ok());
    assert_eq!(Podman::new(format!("unix://{}", socket_path())).socket(), Path::new(&socket_path()));
}

#[tokio::test]
async fn pod_serves_health_is_listed_and_is_removed() {
    let podman = engine().await;
    let (f, _guard) = fixture("life");
    let data = tempfile::tempdir().expect("tempdir");
    let mut spec = container_spec(&f);
    spec.mounts = vec![(data.path().display().to_string(), "/data".into())];
    spec.memory_bytes = Some(64 * 1024 * 1024);
    spec.cpus = Some(0.5);

    let started = Instant::now();
    podman.create_pod(&pod_spec(&f)).await.expect("create_pod");
    let id = podman.create_container(&spec).await.expect("create_container");
    assert_eq!(id.len(), 64, "container id {id:?}");
    podman.start_pod(&f.pod).await.expect("start_pod");
    let started_at = started.elapsed();
    let body = wait_health(f.host_port, Duration::from_secs(10)).await;
    eprintln!(
        "pod+container: create+start {:?}, to /health ok {:?} (127.0.0.1:{})",
        started_at,
        started.elapsed(),
        f.host_port
    );
    assert!(body.contains("editor-under-test"), "env reached the container: {body}");

    // What podman made of the spec: limits, bind mount, published port on 127.0.0.1 only.
    let out = run(cli().args([
        "container",
        "inspect",
        "--format",
        "{{.HostConfig.Memory}} {{.HostConfig.CpuQuota}} {{.HostConfig.CpuPeriod}} {{range .Mounts}}{{.Source}}:{{.Destination}}{{end}}",
        &f.container,
    ]));
    let inspect = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(inspect, format!("67108864 50000 100000 {}:/data", data.path().display()));
    let out = run(cli().args(["pod", "inspect", "--format", "{{json .InfraConfig.PortBindings}}", &f.pod]));
    let bindings = String::from_utf8_lossy(&out.stdout);
    assert!(
        bindings.contains(r#""HostIp":"127.0.0.1""#) && bindings.contains(&format!(r#""HostPort":"{}""#, f.host_port))
    );

    // Listed with its labels, running; the pod's infra container is not listed.
    let listed = podman.list_managed().await.expect("list_managed");
    let mine: Vec<_> = listed.iter().filter(|c| c.labels.get(LABEL_USER) == Some(&f.user)).collect();
    assert_eq!(mine.len(), 1, "only the container, not the infra container: {mine:?}");
    let c = mine[0];
    assert_eq!((c.id.as_str(), c.name.as_str(), c.pod.as_deref()), (id.as_str(), f.container.as_str(), Some(&*f.pod)));
    assert_eq!(c.state, "running");
    assert_eq!(c.labels.get(LABEL_ROLE).map(String::as_str), Some("editor"));
    assert_eq!(c.labels.get(LABEL_MANAGED).map(String::as_str), Some("true"));

    let t = Instant::now();
    podman.stop_pod(&f.pod, 5).await.expect("stop_pod");
    eprintln!("stop_pod: {:?}", t.elapsed());
    assert!(http_get(f.host_port, "/health").await.is_none(), "nothing answers once stopped");
    let listed = podman.list_managed().await.expect("list_managed");
    let c = listed.iter().find(|c| c.name == f.container).expect("still listed when stopped");
    assert_eq!(c.state, "exited");
    // Stopping a stopped pod (podman: 304) is fine.
    podman.stop_pod(&f.pod, 5).await.expect("stop_pod again");

    podman.remove_pod(&f.pod).await.expect("remove_pod");
    assert!(!pod_exists(&f.pod));
    let listed = podman.list_managed().await.expect("list_managed");
    assert!(listed.iter().all(|c| c.name != f.container), "removed with its pod");
    // Removing what is gone is not an error.
    podman.remove_pod(&f.pod).await.expect("remove_pod of a removed pod");
}

#[tokio::test]
async fn died_event_after_kill_then_restart() {
    let podman = engine().await;
    let (f, _guard) = fixture("died");
    let mut spec = container_spec(&f);
    // The command replaces the image's arguments (its entrypoint stays).
    spec.command =
        ["--listen", &format!("0.0.0.0:{CONTAINER_PORT}"), "--name", "from-command"].map(String::from).to_vec();
    spec.env.clear();
    podman.create_pod(&pod_spec(&f)).await.expect("create_pod");
    podman.create_container(&spec).await.expect("create_container");
    podman.start_pod(&f.pod).await.expect("start_pod");
    // Starting a running pod (podman: 304) is fine.
    podman.start_pod(&f.pod).await.expect("start_pod again");
    let body = wait_health(f.host_port, Duration::from_secs(10)).await;
    assert!(body.contains("from-command"), "{body}");

    let mut events = podman.events().await.expect("events");
    let killed = Instant::now();
    run(cli().args(["kill", &f.container]));
    let kill_took = killed.elapsed();
    let died = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match events.next().await {
                Some(Ok(e)) if e.name == f.container && e.status == "died" => return e,
                Some(Ok(e)) => assert!(!e.name.ends_with("-infra"), "infra container event: {e:?}"),
                Some(Err(e)) => panic!("event stream error: {e:#}"),
                None => panic!("event stream ended"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no died event for {} within 2 s of podman kill", f.container));
    eprintln!("died event {:?} after podman kill started (the CLI took {kill_took:?})", killed.elapsed());
    assert_eq!(died.labels.get(LABEL_USER), Some(&f.user));
    assert_eq!(died.labels.get(LABEL_ROLE).map(String::as_str), Some("editor"));
    let state = podman.list_managed().await.expect("list").into_iter().find(|c| c.name == f.container).expect("listed");
    assert_ne!(state.state, "running");

    let t = Instant::now();
    podman.restart_container(&f.container).await.expect("restart_container");
    wait_health(f.host_port, Duration::from_secs(10)).await;
    eprintln!("restart_container to /health ok: {:?}", t.elapsed());
    let started = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match events.next().await {
                Some(Ok(e)) if e.name == f.container && e.status == "start" => return,
                Some(Ok(_)) => {}
                other => panic!("event stream: {other:?}"),
            }
        }
    })
    .await;
    assert!(started.is_ok(), "a start event after the restart");
    let state = podman.list_managed().await.expect("list").into_iter().find(|c| c.name == f.container).expect("listed");
    assert_eq!(state.state, "running");

    podman.stop_pod(&f.pod, 5).await.expect("stop_pod");
    podman.remove_pod(&f.pod).await.expect("remove_pod");
    assert!(!pod_exists(&f.pod));
}

#[tokio::test]
async fn a_pod_without_markcos_label_is_refused() {
    let podman = engine().await;
    let pod = unique("foreign");
    let _guard = PodGuard(pod.clone());
    // Made by hand, labelled, but not as markco's.
    run(cli().args(["pod", "create", "--name", &pod, "--label", "markco.managed=false", "--label", "owner=someone"]));
    run(cli().args(["create", "--name", &format!("{pod}-c"), "--pod", &pod, "--label", "markco.managed=false", IMAGE]));

    let err = podman.remove_pod(&pod).await.expect_err("remove_pod must refuse");
    assert!(format!("{err:#}").contains("refusing to remove pod"), "{err:#}");
    assert!(pod_exists(&pod), "the pod is still there");
    let err = podman.start_pod(&pod).await.expect_err("start_pod must refuse");
    assert!(format!("{err:#}").contains("refusing"), "{err:#}");
    let err = podman.stop_pod(&pod, 1).await.expect_err("stop_pod must refuse");
    assert!(format!("{err:#}").contains("refusing"), "{err:#}");
    let err = podman.restart_container(&format!("{pod}-c")).await.expect_err("restart_container must refuse");
    assert!(format!("{err:#}").contains("refusing"), "{err:#}");
    assert!(pod_exists(&pod));
    let listed = podman.list_managed().await.expect("list_managed");
    assert!(listed.iter().all(|c| c.pod.as_deref() != Some(&*pod)), "not markco's: not listed");

    run(cli().args(["pod", "rm", "-f", "-t", "0", &pod]));
    assert!(!pod_exists(&pod));
}

#[tokio::test]
async fn podman_errors_carry_the_call_and_podmans_message() {
    let podman = engine().await;
    let (f, _guard) = fixture("errs");
    podman.create_pod(&pod_spec(&f)).await.expect("create_pod");

    let err = podman.create_pod(&pod_spec(&f)).await.expect_err("a second pod of the same name");
    let api = err.downcast_ref::<ApiError>().expect("an ApiError");
    assert_eq!((api.call.as_str(), api.status), ("POST /pods/create", 409));
    assert!(api.message.contains("already exists") || api.message.contains("in use"), "{api}");

    let mut spec = container_spec(&f);
    spec.image = "localhost/markco-no-such-image:none".into();
    let err = podman.create_container(&spec).await.expect_err("an unknown image");
    assert!(
        format!("{err:#}").contains("POST /containers/create") && format!("{err:#}").contains("image not known"),
        "{err:#}"
    );

    let mut spec = container_spec(&f);
    spec.pod = unique("no-such-pod");
    let err = podman.create_container(&spec).await.expect_err("an unknown pod");
    assert!(format!("{err:#}").contains("no pod with name or ID"), "{err:#}");

    let err = podman.restart_container(&unique("no-such-container")).await.expect_err("an unknown container");
    assert!(err.downcast_ref::<ApiError>().is_some_and(ApiError::is_not_found), "{err:#}");
    let err = podman.start_pod(&unique("no-such-pod")).await.expect_err("an unknown pod");
    assert!(err.downcast_ref::<ApiError>().is_some_and(ApiError::is_not_found), "{err:#}");

    // A bind mount whose source is missing: podman refuses the container (500, "statfs ...").
    let mut spec = container_spec(&f);
    spec.mounts = vec![("/nonexistent/markco-test".into(), "/data".into())];
    let err = podman.create_container(&spec).await.expect_err("a missing mount source");
    assert!(format!("{err:#}").contains("/nonexistent/markco-test"), "{err:#}");

    // A container that cannot start (its mount source vanished after the create): podman
    // answers the pod start with 409 and {"Errs": [...]}, no "message".
    let data = tempfile::tempdir().expect("tempdir");
    let mut spec = container_spec(&f);
    spec.mounts = vec![(data.path().display().to_string(), "/data".into())];
    podman.create_container(&spec).await.expect("create_container");
    drop(data);
    let err = podman.start_pod(&f.pod).await.expect_err("the container cannot start");
    let api = err.downcast_ref::<ApiError>().expect("an ApiError");
    assert_eq!(api.status, 409, "{api}");
    assert!(api.message.contains("starting container"), "podman's Errs: {api}");

    podman.remove_pod(&f.pod).await.expect("remove_pod");
    assert!(!pod_exists(&f.pod));
    podman.remove_pod(&unique("never-existed")).await.expect("removing a pod that does not exist");
}

#[tokio::test]
async fn an_unreachable_socket_is_an_error_naming_it() {
    let podman = Podman::new("unix:///nonexistent/markco/podman.sock");
    let err = podman.ping().await.expect_err("no socket");
    let text = format!("{err:#}");
    assert!(text.contains("/nonexistent/markco/podman.sock"), "{text}");
    assert!(podman.events().await.is_err());
}

#[test]
fn the_static_check_tells_a_dynamic_binary() {
    // This test binary is linked dynamically.
    let me = std::fs::read(std::env::current_exe().expect("current exe")).expect("read");
    assert_eq!(has_interpreter(&me), Some(true));
    assert_eq!(has_interpreter(b"#!/bin/sh\n"), None);
}

// ---- A fake libpod API on a unix socket: the HTTP client's framing, without podman. ----

/// Serves one connection: checks the request line with `expect`, then writes `parts` with a
/// pause between them.
async fn fake_api(parts: Vec<Vec<u8>>, expect: &'static str) -> (tempfile::TempDir, tokio::task::JoinHandle<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("api.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind unix socket");
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.expect("read request");
            assert!(n > 0, "request ended early");
            req.extend_from_slice(&buf[..n]);
        }
        let req = String::from_utf8_lossy(&req).into_owned();
        assert!(req.starts_with(expect), "request {req:?} should start with {expect:?}");
        for p in parts {
            s.write_all(&p).await.expect("write");
            s.flush().await.expect("flush");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        req
    });
    (dir, task)
}

fn event_line(name: &str, status: &str, managed: bool) -> String {
    let managed = if managed { r#","markco.managed":"true""# } else { "" };
    format!(
        r#"{{"status":"{status}","id":"abc","Type":"container","Action":"{status}","Actor":{{"ID":"abc","Attributes":{{"containerExitCode":"0","name":"{name}","podId":"p","markco.user":"u1"{managed}}}}},"time":1}}"#
    ) + "\n"
}

#[tokio::test]
async fn event_stream_is_decoded_as_chunks_arrive_split_anywhere() {
    let lines = [
        event_line("ws-editor", "start", true),
        event_line("0123456789ab-infra", "died", true),
        event_line("not-markcos", "died", false),
        event_line("ws-editor", "died", true),
        event_line("ws-runtime", "died", true),
    ];
    let mut body = Vec::new();
    // One chunk per event except the last two, which share one chunk.
    for l in &lines[..3] {
        body.extend_from_slice(format!("{:x}\r\n{l}\r\n", l.len()).as_bytes());
    }
    let last = format!("{}{}", lines[3], lines[4]);
    body.extend_from_slice(format!("{:x};ext=1\r\n{last}\r\n", last.len()).as_bytes());
    body.extend_from_slice(b"0\r\n\r\n");
    let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    // The header and the first bytes of the body together, then pieces of 7 bytes: cut inside
    // size lines, CRLFs and JSON.
    let mut parts = vec![[head, body[..3].to_vec()].concat()];
    parts.extend(body[3..].chunks(7).map(<[u8]>::to_vec));
    let (dir, server) = fake_api(parts, "GET /v4.0.0/libpod/events?stream=true&filters=%7B").await;

    let podman = Podman::new(dir.path().join("api.sock"));
    let events: Vec<_> = podman.events().await.expect("events").collect().await;
    let req = server.await.expect("server");
    assert!(req.contains("%22markco.managed%3Dtrue%22"), "filters are encoded: {req}");
    let got: Vec<(String, String)> =
        events.iter().filter_map(|e| e.as_ref().ok()).map(|e| (e.name.clone(), e.status.clone())).collect();
    assert_eq!(
        got,
        [("ws-editor", "start"), ("ws-editor", "died"), ("ws-runtime", "died")].map(|(a, b)| (a.into(), b.into()))
    );
    let first = events[0].as_ref().expect("an event");
    assert_eq!(first.labels, labels(&[("markco.managed", "true"), ("markco.user", "u1")]));
    // The end of the stream is reported (the control plane re-subscribes).
    assert_eq!(events.len(), 4, "3 events and the end: {events:?}");
    assert!(events[3].is_err());
}

#[tokio::test]
async fn chunked_and_error_answers_of_plain_calls() {
    // A chunked /version.
    let json = r#"{"Version":"4.9.9","Components":[{"Details":{"APIVersion":"4.9.9"}}]}"#;
    let (a, b) = json.split_at(10);
    let answer = format!(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let parts = answer.as_bytes().chunks(5).map(<[u8]>::to_vec).collect();
    let (dir, server) = fake_api(parts, "GET /v4.0.0/libpod/version HTTP/1.1\r\n").await;
    let version = Podman::new(dir.path().join("api.sock")).ping().await.expect("ping");
    assert!(version.starts_with("podman 4.9.9 (API 4.9.9)"), "{version}");
    server.await.expect("server");

    // An error with podman's message, Content-Length framed.
    let body = r#"{"cause":"no such container","message":"no container with name or ID \"x\" found: no such container","response":404}"#;
    let answer = format!(
        "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (dir, server) = fake_api(vec![answer.into_bytes()], "GET /v4.0.0/libpod/containers/x/json").await;
    let err = Podman::new(dir.path().join("api.sock")).restart_container("x").await.expect_err("404");
    let api = err.downcast_ref::<ApiError>().expect("an ApiError");
    assert_eq!(
        api.to_string(),
        r#"podman GET /containers/x/json: 404 no container with name or ID "x" found: no such container"#
    );
    server.await.expect("server");
}
