//! The podman engine: podman's libpod REST API (v4) over its unix socket, with a small
//! hand-written HTTP/1.1 client (one request per connection; the event stream keeps its
//! connection and decodes chunked framing as it arrives).
//!
//! markco only touches what it labelled: starting, stopping, removing a pod and restarting a
//! container first inspect it and refuse one without `markco.managed=true`.
//!
//! Podman behaviours this relies on (checked against podman 4.3.1):
//! - a pod's labels are copied onto its infra container, so the infra container matches the
//!   `markco.managed=true` filter: [`Podman::list_managed`] and [`Podman::events`] leave it out
//!   (`IsInfra` in the list; in events, the name `<12 hex digits of the pod id>-infra`);
//! - starting a pod that runs, or stopping one that does not, answers `304 Not Modified`: success;
//! - a pod start whose container fails answers `409` with `{"Errs": [...]}` and no `message`;
//!   a container create with an unknown image or pod answers `500` with a `message`;
//! - events carry `status` (lower case) and `Action`; `Actor.Attributes` mixes the container's
//!   labels with `name`, `image`, `podId` and `containerExitCode`.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use async_trait::async_trait;
use futures_util::stream::{self, BoxStream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::{ContainerEngine, ContainerEvent, ContainerInfo, ContainerSpec, PodSpec, LABEL_MANAGED};

/// The libpod API version prefix (podman 4.x serves every 4.x version under it).
const API: &str = "/v4.0.0/libpod";
/// Bound on every call that has no better-known duration.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Starting a pod starts its infra container and every container (and may build the local
/// infra image the first time).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Restarting or force-removing waits for the containers to stop (podman's default 10 s).
const STOP_GRACE: Duration = Duration::from_secs(10);
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 64 * 1024 * 1024;
/// One event line; podman's are well under 1 KiB.
const MAX_EVENT_LINE: usize = 1024 * 1024;
/// Period of the CPU quota (µs): `cpus` 0.5 → quota 50 000 per 100 000.
const CPU_PERIOD: u64 = 100_000;

/// A non-2xx answer from podman: the call, the status and podman's `message` (or its `Errs`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("podman {call}: {status} {message}")]
pub struct ApiError {
    /// e.g. `POST /pods/create`
    pub call: String,
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn is_not_found(&self) -> bool {
        self.status == 404
    }
}

/// The engine backed by podman's API socket.
#[derive(Debug, Clone)]
pub struct Podman {
    socket: PathBuf,
}

impl Podman {
    /// `socket`: `unix:///run/podman/podman.sock` or a plain path. Nothing is connected yet.
    pub fn new(socket: impl AsRef<Path>) -> Podman {
        let path = socket.as_ref();
        let socket = match path.to_str().and_then(|s| s.strip_prefix("unix://")) {
            Some(rest) => PathBuf::from(rest),
            None => path.to_path_buf(),
        };
        Podman { socket }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// One request on its own connection, answered within `timeout`.
    async fn call(&self, method: &str, path: &str, body: Option<&Value>, timeout: Duration) -> anyhow::Result<Reply> {
        let started = Instant::now();
        let reply = tokio::time::timeout(timeout, self.call_inner(method, path, body))
            .await
            .map_err(|_| anyhow!("podman {method} {}: no answer within {timeout:?}", strip_query(path)))??;
        tracing::debug!(method, path, status = reply.status, ms = started.elapsed().as_millis() as u64, "podman call");
        Ok(reply)
    }

    async fn call_inner(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Reply> {
        let call = format!("{method} {}", strip_query(path));
        let mut conn = self.send(method, path, body).await.with_context(|| format!("podman {call}"))?;
        let head = conn.read_head().await.with_context(|| format!("podman {call}"))?;
        let body = conn.read_body(&head).await.with_context(|| format!("podman {call}: reading the answer"))?;
        Ok(Reply { status: head.status, reason: head.reason, body, call })
    }

    /// Connects and writes the request.
    async fn send(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Conn> {
        let mut stream = UnixStream::connect(&self.socket).await.with_context(|| {
            format!("connecting to podman's API socket {} (is `podman system service` running?)", self.socket.display())
        })?;
        let body = match body {
            Some(v) => serde_json::to_vec(v).context("encoding the request body")?,
            None => Vec::new(),
        };
        let mut req =
            format!("{method} {API}{path} HTTP/1.1\r\nHost: d\r\nUser-Agent: markco\r\nConnection: close\r\n");
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(&body);
        stream.write_all(&bytes).await.context("writing the request")?;
        Ok(Conn { stream, buf: Vec::new() })
    }

    /// A call whose answer must be 2xx (or 304 when `not_modified_ok`); returns the body.
    async fn expect_ok(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
        not_modified_ok: bool,
    ) -> anyhow::Result<Vec<u8>> {
        let reply = self.call(method, path, body, timeout).await?;
        if (200..300).contains(&reply.status) || (not_modified_ok && reply.status == 304) {
            return Ok(reply.body);
        }
        Err(reply.into_error().into())
    }

    async fn expect_json(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let body = self.expect_ok(method, path, body, timeout, false).await?;
        serde_json::from_slice(&body).with_context(|| {
            format!("podman {method} {}: the answer is not JSON: {}", strip_query(path), snippet(&body))
        })
    }

    /// The pod's labels, or None when there is no such pod.
    async fn pod_labels(&self, name: &str) -> anyhow::Result<Option<BTreeMap<String, String>>> {
        let path = format!("/pods/{}/json", enc(name));
        let reply = self.call("GET", &path, None, CALL_TIMEOUT).await?;
        if reply.status == 404 {
            return Ok(None);
        }
        if !(200..300).contains(&reply.status) {
            return Err(reply.into_error().into());
        }
        let v: Value = serde_json::from_slice(&reply.body)
            .with_context(|| format!("podman GET {path}: the answer is not JSON: {}", snippet(&reply.body)))?;
        Ok(Some(string_map(v.get("Labels"))))
    }

    /// Errors unless the pod exists and carries `markco.managed=true`.
    async fn ensure_managed_pod(&self, name: &str, what: &str) -> anyhow::Result<()> {
        match self.pod_labels(name).await? {
            None => Err(ApiError {
                call: format!("GET /pods/{}/json", enc(name)),
                status: 404,
                message: format!("no pod named {name}"),
            }
            .into()),
            Some(labels) if is_managed(&labels) => Ok(()),
            Some(_) => bail!("refusing to {what} pod {name}: it does not carry {LABEL_MANAGED}=true (not markco's)"),
        }
    }
}

fn is_managed(labels: &BTreeMap<String, String>) -> bool {
    labels.get(LABEL_MANAGED).map(String::as_str) == Some("true")
}

#[async_trait]
impl ContainerEngine for Podman {
    async fn ping(&self) -> anyhow::Result<String> {
        let v = self.expect_json("GET", "/version", None, CALL_TIMEOUT).await?;
        let version = v.get("Version").and_then(Value::as_str).unwrap_or("unknown");
        let api = v
            .pointer("/Components/0/Details/APIVersion")
            .and_then(Value::as_str)
            .or_else(|| v.get("ApiVersion").and_then(Value::as_str))
            .unwrap_or("unknown");
        Ok(format!("podman {version} (API {api}) on {}", self.socket.display()))
    }

    async fn create_pod(&self, spec: &PodSpec) -> anyhow::Result<()> {
        let ports: Vec<Value> = spec
            .publish
            .iter()
            .map(|&(host, container)| {
                json!({"host_ip": "127.0.0.1", "host_port": host, "container_port": container, "protocol": "tcp"})
            })
            .collect();
        let body = json!({
            "name": spec.name,
            "labels": spec.labels,
            "portmappings": ports,
            "no_infra": false,
        });
        self.expect_ok("POST", "/pods/create", Some(&body), CALL_TIMEOUT, false).await?;
        Ok(())
    }

    async fn create_container(&self, spec: &ContainerSpec) -> anyhow::Result<String> {
        let mut body = json!({
            "name": spec.name,
            "pod": spec.pod,
            "image": spec.image,
            "env": spec.env,
            "labels": spec.labels,
            "mounts": spec
                .mounts
                .iter()
                .map(|(source, destination)| {
                    json!({"destination": destination, "source": source, "type": "bind", "options": ["rbind"]})
                })
                .collect::<Vec<_>>(),
        });
        if !spec.command.is_empty() {
            body["command"] = json!(spec.command);
        }
        let mut limits = serde_json::Map::new();
        if let Some(bytes) = spec.memory_bytes {
            limits.insert("memory".into(), json!({ "limit": bytes }));
        }
        if let Some(cpus) = spec.cpus {
            if !(cpus.is_finite() && cpus > 0.0) {
                bail!("container {}: cpus must be a positive number, not {cpus}", spec.name);
            }
            let quota = ((cpus * CPU_PERIOD as f64).round() as i64).max(1000);
            limits.insert("cpu".into(), json!({ "quota": quota, "period": CPU_PERIOD }));
        }
        if !limits.is_empty() {
            body["resource_limits"] = Value::Object(limits);
        }
        let v = self.expect_json("POST", "/containers/create", Some(&body), CALL_TIMEOUT).await?;
        let id = v
            .get("Id")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("podman POST /containers/create: no Id in the answer: {v}"))?;
        if let Some(warnings) = v.get("Warnings").and_then(Value::as_array).filter(|w| !w.is_empty()) {
            tracing::warn!(container = %spec.name, ?warnings, "podman warnings creating a container");
        }
        Ok(id.to_string())
    }

    async fn start_pod(&self, name: &str) -> anyhow::Result<()> {
        self.ensure_managed_pod(name, "start").await?;
        let path = format!("/pods/{}/start", enc(name));
        let body = self.expect_ok("POST", &path, None, START_TIMEOUT, true).await?;
        check_report_errors(&format!("POST {path}"), &body, "Errs")
    }

    async fn stop_pod(&self, name: &str, timeout_secs: u32) -> anyhow::Result<()> {
        self.ensure_managed_pod(name, "stop").await?;
        let path = format!("/pods/{}/stop?t={timeout_secs}", enc(name));
        let timeout = CALL_TIMEOUT + Duration::from_secs(u64::from(timeout_secs));
        let body = self.expect_ok("POST", &path, None, timeout, true).await?;
        check_report_errors(&format!("POST {}", strip_query(&path)), &body, "Errs")
    }

    /// Inspects first and refuses a pod without `markco.managed=true`. A pod that does not exist
    /// is already removed: Ok.
    async fn remove_pod(&self, name: &str) -> anyhow::Result<()> {
        match self.pod_labels(name).await? {
            None => return Ok(()),
            Some(labels) if is_managed(&labels) => {}
            Some(_) => bail!("refusing to remove pod {name}: it does not carry {LABEL_MANAGED}=true (not markco's)"),
        }
        let path = format!("/pods/{}?force=true", enc(name));
        let reply = self.call("DELETE", &path, None, CALL_TIMEOUT + STOP_GRACE).await?;
        if reply.status == 404 {
            return Ok(());
        }
        if !(200..300).contains(&reply.status) {
            return Err(reply.into_error().into());
        }
        check_report_errors(&reply.call, &reply.body, "Err")
    }

    async fn restart_container(&self, name: &str) -> anyhow::Result<()> {
        let inspect = format!("/containers/{}/json", enc(name));
        let v = self.expect_json("GET", &inspect, None, CALL_TIMEOUT).await?;
        if !is_managed(&string_map(v.pointer("/Config/Labels"))) {
            bail!("refusing to restart container {name}: it does not carry {LABEL_MANAGED}=true (not markco's)");
        }
        let path = format!("/containers/{}/restart", enc(name));
        self.expect_ok("POST", &path, None, START_TIMEOUT + STOP_GRACE, false).await?;
        Ok(())
    }

    async fn start_container(&self, name: &str) -> anyhow::Result<()> {
        let inspect = format!("/containers/{}/json", enc(name));
        let v = self.expect_json("GET", &inspect, None, CALL_TIMEOUT).await?;
        if !is_managed(&string_map(v.pointer("/Config/Labels"))) {
            bail!("refusing to start container {name}: it does not carry {LABEL_MANAGED}=true (not markco's)");
        }
        let path = format!("/containers/{}/start", enc(name));
        self.expect_ok("POST", &path, None, START_TIMEOUT, false).await?;
        Ok(())
    }

    async fn remove_container(&self, name: &str) -> anyhow::Result<()> {
        let inspect = format!("/containers/{}/json", enc(name));
        let reply = self.call("GET", &inspect, None, CALL_TIMEOUT).await?;
        if reply.status == 404 {
            return Ok(());
        }
        if !(200..300).contains(&reply.status) {
            return Err(reply.into_error().into());
        }
        let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
        if !is_managed(&string_map(v.pointer("/Config/Labels"))) {
            bail!("refusing to remove container {name}: it does not carry {LABEL_MANAGED}=true (not markco's)");
        }
        let path = format!("/containers/{}?force=true", enc(name));
        let reply = self.call("DELETE", &path, None, CALL_TIMEOUT + STOP_GRACE).await?;
        if reply.status == 404 || (200..300).contains(&reply.status) {
            return Ok(());
        }
        Err(reply.into_error().into())
    }

    async fn list_managed(&self) -> anyhow::Result<Vec<ContainerInfo>> {
        let filters = json!({ "label": [format!("{LABEL_MANAGED}=true")] }).to_string();
        let path = format!("/containers/json?all=true&filters={}", enc(&filters));
        let body = self.expect_ok("GET", &path, None, CALL_TIMEOUT, false).await?;
        let list: Vec<ListedContainer> = serde_json::from_slice(&body)
            .with_context(|| format!("podman GET /containers/json: unexpected answer: {}", snippet(&body)))?;
        Ok(list
            .into_iter()
            .filter(|c| !c.is_infra)
            // The filter is podman's; checked again so that a podman ignoring it cannot widen
            // what markco acts on.
            .filter(|c| c.labels.as_ref().is_some_and(is_managed))
            .map(|c| ContainerInfo {
                name: c.names.into_iter().next().unwrap_or_else(|| c.id.clone()),
                id: c.id,
                pod: c.pod_name.filter(|p| !p.is_empty()),
                labels: c.labels.unwrap_or_default(),
                state: c.state,
            })
            .collect())
    }

    async fn events(&self) -> anyhow::Result<BoxStream<'static, anyhow::Result<ContainerEvent>>> {
        let filters = json!({ "type": ["container"], "label": [format!("{LABEL_MANAGED}=true")] }).to_string();
        let path = format!("/events?stream=true&filters={}", enc(&filters));
        let open = async {
            let mut conn = self.send("GET", &path, None).await?;
            let head = conn.read_head().await?;
            if head.status != 200 {
                let body = conn.read_body(&head).await.unwrap_or_default();
                let reply = Reply { status: head.status, reason: head.reason, body, call: "GET /events".into() };
                return Err(anyhow::Error::from(reply.into_error()));
            }
            anyhow::Ok((conn, head))
        };
        let (conn, head) = tokio::time::timeout(CALL_TIMEOUT, open)
            .await
            .map_err(|_| anyhow!("podman GET /events: no answer within {CALL_TIMEOUT:?}"))?
            .context("podman GET /events")?;
        let framing =
            if head.chunked { Framing::Chunked(Chunked::default()) } else { Framing::Length(head.content_length) };
        let mut events =
            EventStream { stream: conn.stream, framing, lines: Vec::new(), pending: VecDeque::new(), done: false };
        // Bytes that came with the header.
        events.absorb(&conn.buf);
        Ok(stream::unfold(events, |mut s| async move {
            let item = s.next_event().await?;
            Some((item, s))
        })
        .boxed())
    }
}

/// `{"Errs": [...]}` / `{"Err": ...}` reports that podman may return with a 2xx status.
fn check_report_errors(call: &str, body: &[u8], field: &str) -> anyhow::Result<()> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else { return Ok(()) };
    match v.get(field) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(a)) if a.is_empty() => Ok(()),
        Some(Value::String(s)) if s.is_empty() => Ok(()),
        Some(e) => bail!("podman {call}: {}", error_text(e)),
    }
}

fn error_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(error_text).collect::<Vec<_>>().join("; "),
        other => other.to_string(),
    }
}

/// An entry of `GET /containers/json`.
#[derive(Debug, Deserialize)]
struct ListedContainer {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Names", default)]
    names: Vec<String>,
    #[serde(rename = "PodName", default)]
    pod_name: Option<String>,
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "State", default)]
    state: String,
    #[serde(rename = "IsInfra", default)]
    is_infra: bool,
}

/// A JSON object of strings (labels); anything else is empty.
fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string()))).collect())
        .unwrap_or_default()
}

/// `Actor.Attributes` keys that podman adds next to the container's labels.
const EVENT_ATTRIBUTES: [&str; 4] = ["name", "image", "podId", "containerExitCode"];

/// One line of podman's event stream → a markco event, or None for an event markco does not
/// report (another type, an infra container, one without markco's label).
fn parse_event(line: &[u8]) -> anyhow::Result<Option<ContainerEvent>> {
    let v: Value =
        serde_json::from_slice(line).with_context(|| format!("podman event is not JSON: {}", snippet(line)))?;
    let kind = v.get("Type").or_else(|| v.get("type")).and_then(Value::as_str).unwrap_or("container");
    if kind != "container" {
        return Ok(None);
    }
    let status = ["Action", "status", "Status"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_str).filter(|s| !s.is_empty()))
        .ok_or_else(|| anyhow!("podman event without Action/status: {}", snippet(line)))?;
    let attributes = v.pointer("/Actor/Attributes").and_then(Value::as_object);
    let name = attributes
        .and_then(|a| a.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("podman event without Actor.Attributes.name: {}", snippet(line)))?;
    if is_infra_name(name) {
        return Ok(None);
    }
    let labels: BTreeMap<String, String> = attributes
        .map(|a| {
            a.iter()
                .filter(|(k, _)| !EVENT_ATTRIBUTES.contains(&k.as_str()))
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default();
    if !is_managed(&labels) {
        return Ok(None);
    }
    Ok(Some(ContainerEvent { name: name.to_string(), status: status.to_ascii_lowercase(), labels }))
}

/// Podman names a pod's infra container `<first 12 hex digits of the pod id>-infra`.
fn is_infra_name(name: &str) -> bool {
    name.strip_suffix("-infra").is_some_and(|id| id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The open event stream: socket, body framing, the current partial line, decoded events.
struct EventStream {
    stream: UnixStream,
    framing: Framing,
    lines: Vec<u8>,
    pending: VecDeque<anyhow::Result<ContainerEvent>>,
    done: bool,
}

enum Framing {
    Chunked(Chunked),
    /// Content-Length (None: until the connection closes).
    Length(Option<usize>),
}

impl EventStream {
    async fn next_event(&mut self) -> Option<anyhow::Result<ContainerEvent>> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if self.done {
                return None;
            }
            match self.stream.read(&mut buf).await {
                Ok(0) => {
                    self.done = true;
                    return Some(Err(anyhow!("podman's event stream ended (the service stopped?)")));
                }
                Ok(n) => self.absorb(&buf[..n]),
                Err(e) => {
                    self.done = true;
                    return Some(Err(anyhow::Error::from(e).context("reading podman's event stream")));
                }
            }
        }
    }

    /// Decodes raw bytes from the socket into whole lines, and those into events.
    fn absorb(&mut self, raw: &[u8]) {
        if raw.is_empty() || self.done {
            return;
        }
        let mut end = false;
        match &mut self.framing {
            Framing::Chunked(c) => match c.feed(raw, &mut self.lines) {
                Ok(finished) => end = finished,
                Err(e) => {
                    self.pending.push_back(Err(e.context("podman's event stream")));
                    self.done = true;
                    return;
                }
            },
            Framing::Length(left) => {
                let take = left.map_or(raw.len(), |l| l.min(raw.len()));
                self.lines.extend_from_slice(&raw[..take]);
                if let Some(l) = left {
                    *l -= take;
                    end = *l == 0;
                }
            }
        }
        while let Some(pos) = self.lines.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.lines.drain(..=pos).collect();
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            match parse_event(line) {
                Ok(Some(event)) => self.pending.push_back(Ok(event)),
                Ok(None) => {}
                Err(e) => self.pending.push_back(Err(e)),
            }
        }
        if self.lines.len() > MAX_EVENT_LINE {
            self.pending.push_back(Err(anyhow!("podman event longer than {MAX_EVENT_LINE} bytes")));
            self.done = true;
        } else if end {
            self.pending.push_back(Err(anyhow!("podman's event stream ended")));
            self.done = true;
        }
    }
}

/// A connection after the request was sent; `buf` holds bytes read but not yet used.
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

struct Head {
    status: u16,
    reason: String,
    chunked: bool,
    content_length: Option<usize>,
}

struct Reply {
    status: u16,
    reason: String,
    body: Vec<u8>,
    /// `METHOD /path` (no query) for messages.
    call: String,
}

impl Reply {
    fn into_error(self) -> ApiError {
        let message = match serde_json::from_slice::<Value>(&self.body) {
            Ok(v) => ["message", "Errs", "Err", "cause"]
                .iter()
                .filter_map(|k| v.get(*k))
                .map(error_text)
                .find(|s| !s.is_empty() && s != "null")
                .unwrap_or_else(|| snippet(&self.body)),
            Err(_) => snippet(&self.body),
        };
        let message = if message.is_empty() { self.reason } else { message };
        ApiError { call: self.call, status: self.status, message }
    }
}

impl Conn {
    async fn fill(&mut self) -> anyhow::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await.context("reading from podman's socket")?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    async fn read_head(&mut self) -> anyhow::Result<Head> {
        let end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
            if self.buf.len() > MAX_HEAD {
                bail!("response header longer than {MAX_HEAD} bytes");
            }
            if self.fill().await? == 0 {
                bail!("the connection closed before a complete response header");
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/1.") {
            bail!("not an HTTP/1.x answer: {status_line:?}");
        }
        let status: u16 =
            parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
        let reason = parts.next().unwrap_or_default().to_string();
        let (mut chunked, mut content_length) = (false, None);
        for line in lines {
            let Some((name, value)) = line.split_once(':') else { continue };
            let value = value.trim();
            if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.split(',').any(|t| t.trim().eq_ignore_ascii_case("chunked"));
            } else if name.eq_ignore_ascii_case("content-length") {
                content_length = Some(value.parse().map_err(|_| anyhow!("bad Content-Length {value:?}"))?);
            }
        }
        Ok(Head { status, reason, chunked, content_length })
    }

    async fn read_body(&mut self, head: &Head) -> anyhow::Result<Vec<u8>> {
        if matches!(head.status, 100..=199 | 204 | 304) {
            return Ok(Vec::new());
        }
        if head.chunked {
            let mut decoder = Chunked::default();
            let mut body = Vec::new();
            let mut input = std::mem::take(&mut self.buf);
            loop {
                if decoder.feed(&input, &mut body)? {
                    return Ok(body);
                }
                if body.len() > MAX_BODY {
                    bail!("response body larger than {MAX_BODY} bytes");
                }
                if self.fill().await? == 0 {
                    bail!("the connection closed in the middle of a chunked body");
                }
                input = std::mem::take(&mut self.buf);
            }
        }
        if let Some(len) = head.content_length {
            if len > MAX_BODY {
                bail!("response body of {len} bytes is larger than {MAX_BODY}");
            }
            while self.buf.len() < len {
                if self.fill().await? == 0 {
                    bail!("the connection closed after {} of {len} body bytes", self.buf.len());
                }
            }
            self.buf.truncate(len);
            return Ok(std::mem::take(&mut self.buf));
        }
        // Neither: the body ends with the connection.
        while self.fill().await? > 0 {
            if self.buf.len() > MAX_BODY {
                bail!("response body larger than {MAX_BODY} bytes");
            }
        }
        Ok(std::mem::take(&mut self.buf))
    }
}

/// Incremental decoder of `Transfer-Encoding: chunked`: bytes go in as they arrive (split
/// anywhere), the chunks' data comes out.
#[derive(Debug, Default)]
pub(crate) struct Chunked {
    state: ChunkState,
    /// Undecoded bytes (a partial size or trailer line, a partial CRLF).
    raw: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(usize),
    DataEnd,
    Trailer,
    Done,
}

impl Chunked {
    /// Decodes `input` into `out`; true once the last chunk (and trailer) ended.
    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> anyhow::Result<bool> {
        self.raw.extend_from_slice(input);
        let mut pos = 0;
        let result = loop {
            let rest = &self.raw[pos..];
            match self.state {
                ChunkState::Done => break Ok(true),
                ChunkState::Size | ChunkState::Trailer => {
                    let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") else {
                        if rest.len() > 4096 {
                            break Err(anyhow!("chunk size or trailer line longer than 4096 bytes"));
                        }
                        break Ok(false);
                    };
                    let line = &rest[..nl];
                    pos += nl + 2;
                    if self.state == ChunkState::Trailer {
                        if line.is_empty() {
                            self.state = ChunkState::Done;
                        }
                        continue;
                    }
                    let text = std::str::from_utf8(line).unwrap_or_default();
                    let hex = text.split(';').next().unwrap_or_default().trim();
                    let Ok(size) = usize::from_str_radix(hex, 16) else {
                        break Err(anyhow!("bad chunk size line {:?}", String::from_utf8_lossy(line)));
                    };
                    self.state = if size == 0 { ChunkState::Trailer } else { ChunkState::Data(size) };
                }
                ChunkState::Data(left) => {
                    if rest.is_empty() {
                        break Ok(false);
                    }
                    let take = left.min(rest.len());
                    out.extend_from_slice(&rest[..take]);
                    pos += take;
                    self.state = if take == left { ChunkState::DataEnd } else { ChunkState::Data(left - take) };
                }
                ChunkState::DataEnd => {
                    if rest.len() < 2 {
                        break Ok(false);
                    }
                    if &rest[..2] != b"\r\n" {
                        break Err(anyhow!("chunk data not followed by CRLF"));
                    }
                    pos += 2;
                    self.state = ChunkState::Size;
                }
            }
        };
        self.raw.drain(..pos);
        result
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters (query values, path segments).
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn strip_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

/// The start of a body, for error messages.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_forms() {
        assert_eq!(Podman::new("unix:///run/podman/podman.sock").socket(), Path::new("/run/podman/podman.sock"));
        assert_eq!(Podman::new("/tmp/p.sock").socket(), Path::new("/tmp/p.sock"));
        assert_eq!(Podman::new(PathBuf::from("/tmp/p.sock")).socket(), Path::new("/tmp/p.sock"));
    }

    #[test]
    fn chunked_split_anywhere() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n world\n\r\n0\r\nX-T: 1\r\n\r\n";
        for split in 0..wire.len() {
            let mut d = Chunked::default();
            let mut out = Vec::new();
            let first = d.feed(&wire[..split], &mut out).expect("first part");
            assert!(!first || split == wire.len());
            assert!(d.feed(&wire[split..], &mut out).expect("second part"));
            assert_eq!(out, b"hello world\n", "split at {split}");
        }
        // Byte by byte.
        let mut d = Chunked::default();
        let mut out = Vec::new();
        let mut done = false;
        for b in wire {
            done = d.feed(std::slice::from_ref(b), &mut out).expect("byte");
        }
        assert!(done);
        assert_eq!(out, b"hello world\n");
    }

    #[test]
    fn chunked_rejects_garbage() {
        assert!(Chunked::default().feed(b"zz\r\n", &mut Vec::new()).is_err());
        assert!(Chunked::default().feed(b"2\r\nabXY", &mut Vec::new()).is_err());
    }

    #[test]
    fn events_from_podman_4_3() {
        let died = br#"{"status":"died","id":"95a7","from":"localhost/bbtest:latest","Type":"container","Action":"died","Actor":{"ID":"95a7","Attributes":{"containerExitCode":"137","image":"localhost/bbtest:latest","io.buildah.version":"1.28.2","markco.managed":"true","markco.role":"editor","name":"apic1","podId":""}},"scope":"local","time":1795751564,"timeNano":1795751564106159038}"#;
        let e = parse_event(died).expect("parses").expect("an event");
        assert_eq!(e.name, "apic1");
        assert_eq!(e.status, "died");
        assert_eq!(e.labels.get("markco.role").map(String::as_str), Some("editor"));
        assert!(!e.labels.contains_key("name") && !e.labels.contains_key("containerExitCode"));
        let infra = br#"{"status":"died","Type":"container","Action":"died","Actor":{"ID":"4c35","Attributes":{"markco.managed":"true","name":"277a59717951-infra"}}}"#;
        assert_eq!(parse_event(infra).expect("parses"), None);
        let foreign =
            br#"{"status":"died","Type":"container","Action":"died","Actor":{"ID":"1","Attributes":{"name":"x"}}}"#;
        assert_eq!(parse_event(foreign).expect("parses"), None);
        assert!(parse_event(b"{not json").is_err());
    }

    #[test]
    fn encoding() {
        assert_eq!(
            enc(r#"{"label":["markco.managed=true"]}"#),
            "%7B%22label%22%3A%5B%22markco.managed%3Dtrue%22%5D%7D"
        );
        assert_eq!(enc("markco-ws_1.a"), "markco-ws_1.a");
    }

    #[test]
    fn errors_use_podmans_message() {
        let reply = |body: &str| Reply {
            status: 409,
            reason: "Conflict".into(),
            body: body.as_bytes().to_vec(),
            call: "POST /pods/p/start".into(),
        };
        let e = reply(r#"{"cause":"pod already exists","message":"name \"p\" is in use","response":409}"#).into_error();
        assert_eq!(e.to_string(), r#"podman POST /pods/p/start: 409 name "p" is in use"#);
        let e = reply(r#"{"Errs":["starting container 1: boom"],"Id":"x"}"#).into_error();
        assert_eq!(e.message, "starting container 1: boom");
        assert_eq!(reply("").into_error().message, "Conflict");
    }
}
