//! Real podman for the tests: the API socket markco uses (`scripts/podman-setup.sh` starts it;
//! `MARKCO_PODMAN_SOCKET` overrides the path), the test image built from the project's test
//! upstream (`scripts/build-test-image.sh`: nothing is pulled), and clean-up of what killed test
//! runs left behind.

use std::process::Command;
use std::sync::Once;

use super::ephemeral_range;

pub fn socket() -> String {
    std::env::var("MARKCO_PODMAN_SOCKET").unwrap_or_else(|_| "/run/podman/podman.sock".into())
}

/// podman on the same API socket markco uses (not whatever `podman` alone would reach).
pub fn podman_cmd(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .arg("--url")
        .arg(format!("unix://{}", socket()))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run podman {args:?}: {e}"))
}

/// Runs podman and returns its stdout; a failure fails the test.
pub fn podman(args: &[&str]) -> String {
    let out = podman_cmd(args);
    assert!(out.status.success(), "podman {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Does a container exist? (`podman container exists`: 0 yes, 1 no, anything else an error.)
pub fn container_exists(name: &str) -> bool {
    let out = podman_cmd(&["container", "exists", name]);
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("podman container exists {name} failed: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// This test process, as `pid:start time` (the start time tells a reused pid apart). Every
/// container these tests make carries it in `MARKCO_TEST_OWNER`.
pub fn owner() -> String {
    format!("{}:{}", std::process::id(), start_time(std::process::id()).expect("own start time"))
}

pub fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22; the command name (field 2) may hold spaces, so count after its ')'.
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(19)).map(str::to_owned)
}

/// Removes the containers and pods of earlier runs of these tests that were killed before
/// their guards ran (found by `MARKCO_TEST_OWNER` of a process that is gone), so they do not
/// hold ports and memory. Containers of live test processes, and anything else, are left.
pub fn remove_leftovers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let ids = podman(&["ps", "-a", "--format", "{{.ID}}"]);
        let ids: Vec<&str> = ids.lines().filter(|l| !l.trim().is_empty()).collect();
        if ids.is_empty() {
            return;
        }
        let mut args = vec!["inspect"];
        args.extend(&ids);
        // A container removed meanwhile makes inspect fail; the next run cleans up then.
        let out = podman_cmd(&args);
        let Ok(list) = serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout) else { return };
        for c in list {
            let env = c["Config"]["Env"].as_array().cloned().unwrap_or_default();
            let Some(owner) = env.iter().filter_map(|e| e.as_str()).find_map(|e| e.strip_prefix("MARKCO_TEST_OWNER="))
            else {
                continue;
            };
            let alive = owner
                .split_once(':')
                .and_then(|(pid, start)| Some(start_time(pid.parse().ok()?)? == start))
                .unwrap_or(false);
            if alive {
                continue;
            }
            let name = c["Name"].as_str().unwrap_or_default();
            eprintln!("removing {name}, left behind by the killed test process {owner}");
            match c["Pod"].as_str().filter(|p| !p.is_empty()) {
                Some(pod) => drop(podman_cmd(&["pod", "rm", "-f", pod])),
                None => drop(podman_cmd(&["rm", "-f", name])),
            }
        }
    });
}

/// The editor and runtime port ranges (100 ports each) of test number `slot`: above the
/// kernel's ephemeral range, so no outgoing connection of this busy machine holds one when
/// podman publishes it, and apart for each test, so parallel tests never compete.
pub fn port_ranges(slot: u16) -> (u16, u16) {
    let (_, hi) = ephemeral_range();
    let base = (u32::from(hi) + 1).div_ceil(1000) * 1000;
    let editor = base + u32::from(slot) * 200;
    assert!(editor + 199 <= 65535, "no room for workspace ports above the ephemeral range ..{hi}");
    (editor as u16, editor as u16 + 100)
}

pub fn image() -> &'static str {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let out = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-test-image.sh"))
            .output()
            .expect("run scripts/build-test-image.sh");
        assert!(
            out.status.success(),
            "building the test image failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
    "localhost/markco-testupstream:test"
}

/// The `[workspaces]` section of the podman tests: the test image as editor and runtime (each
/// answering with its name, `editor-<user>` / `runtime-<user>`), the port ranges of test `slot`,
/// data under `data_dir` (a path, or a template such as `{dir}/users`), 64 MiB each. Also clears
/// what killed runs left behind.
pub fn workspaces_section(slot: u16, data_dir: &str) -> String {
    remove_leftovers();
    let (e0, r0) = port_ranges(slot);
    format!(
        r#"[workspaces]
engine = "unix://{socket}"
data_dir = "{data_dir}"
editor_image = "{image}"
runtime_image = "{image}"
editor_ports = "{e0}-{e1}"
runtime_ports = "{r0}-{r1}"
ready_timeout = "20s"
editor_command = []
runtime_command = []
editor_env = {{ PORT = "{{port}}", MARKCO_TU_NAME = "editor-{{user_id}}", MARKCO_TEST_OWNER = "{owner}" }}
runtime_env = {{ PORT = "{{port}}", MARKCO_TU_NAME = "runtime-{{user_id}}", MARKCO_TEST_OWNER = "{owner}" }}
editor_memory_mb = 64
runtime_memory_mb = 64
"#,
        socket = socket(),
        image = image(),
        e1 = e0 + 99,
        r1 = r0 + 99,
        owner = owner(),
    )
}
