//! The podman engine: podman's libpod REST API (v4) over its unix socket, through hyper's HTTP/1
//! client connection (one request per connection; the event stream keeps its connection and
//! reads the body's frames as they arrive). Bodies are bounded in size, calls in time.
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
use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
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
const MAX_BODY: usize = 64 * 1024 * 1024;
/// One event line; podman's are well under 1 KiB.
pub const MAX_EVENT_LINE: usize = 1024 * 1024;
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
        let (resp, _conn) = self.send(method, path, body).await.with_context(|| format!("podman {call}"))?;
        let status = resp.status();
        let body =
            read_limited(resp.into_body()).await.with_context(|| format!("podman {call}: reading the answer"))?;
        let reason = status.canonical_reason().unwrap_or_default().to_string();
        Ok(Reply { status: status.as_u16(), reason, body, call })
    }

    /// Connects, sends the request and reads the answer's head. The connection lives as long as
    /// the returned guard (the answer's body is read through it).
    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(http::Response<Incoming>, Connection)> {
        let stream = UnixStream::connect(&self.socket).await.with_context(|| {
            format!("connecting to podman's API socket {} (is `podman system service` running?)", self.socket.display())
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
            .await
            .context("HTTP handshake on podman's socket")?;
        let conn = Connection(tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("podman connection ended: {e}");
            }
        }));
        let body = match body {
            Some(v) => serde_json::to_vec(v).context("encoding the request body")?,
            None => Vec::new(),
        };
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{API}{path}"))
            .header(http::header::HOST, "d")
            .header(http::header::USER_AGENT, "markco");
        if !body.is_empty() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body))).context("building the request")?;
        let resp = sender.send_request(req).await.context("reading the answer's head")?;
        Ok((resp, conn))
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
                json!({"host_ip": spec.host_ip.to_string(), "host_port": host, "container_port": container, "protocol": "tcp"})
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
            let (resp, conn) = self.send("GET", &path, None).await?;
            let status = resp.status();
            if status != http::StatusCode::OK {
                let body = read_limited(resp.into_body()).await.unwrap_or_default();
                let reason = status.canonical_reason().unwrap_or_default().to_string();
                let reply = Reply { status: status.as_u16(), reason, body, call: "GET /events".into() };
                return Err(anyhow::Error::from(reply.into_error()));
            }
            anyhow::Ok((resp, conn))
        };
        let (resp, conn) = tokio::time::timeout(CALL_TIMEOUT, open)
            .await
            .map_err(|_| anyhow!("podman GET /events: no answer within {CALL_TIMEOUT:?}"))?
            .context("podman GET /events")?;
        let events = EventStream {
            body: resp.into_body(),
            _conn: conn,
            lines: EventDecoder::default(),
            pending: VecDeque::new(),
            done: false,
        };
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

/// The open event stream: the answer's body (hyper undoes its framing), the current partial
/// line, decoded events.
struct EventStream {
    body: Incoming,
    _conn: Connection,
    lines: EventDecoder,
    pending: VecDeque<anyhow::Result<ContainerEvent>>,
    done: bool,
}

/// The framing of podman's event stream once hyper has undone the body's: one JSON object per
/// line. Pure (bytes in, events out), so it can be fuzzed; its output does not depend on where
/// the bytes were cut.
#[derive(Debug, Default)]
pub struct EventDecoder {
    /// The current partial line.
    partial: Vec<u8>,
}

impl EventDecoder {
    /// Feeds decoded body bytes: the events of the lines they complete go to `out` (a line that
    /// is not an event markco reports gives nothing, a malformed one an error). Returns false when
    /// a line grew past [`MAX_EVENT_LINE`]; the stream is then unusable.
    pub fn feed(&mut self, data: &[u8], out: &mut VecDeque<anyhow::Result<ContainerEvent>>) -> bool {
        self.partial.extend_from_slice(data);
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            match parse_event(line) {
                Ok(Some(event)) => out.push_back(Ok(event)),
                Ok(None) => {}
                Err(e) => out.push_back(Err(e)),
            }
        }
        if self.partial.len() > MAX_EVENT_LINE {
            out.push_back(Err(anyhow!("podman event longer than {MAX_EVENT_LINE} bytes")));
            return false;
        }
        true
    }

    /// Bytes of the current partial line.
    pub fn pending_bytes(&self) -> usize {
        self.partial.len()
    }
}

impl EventStream {
    async fn next_event(&mut self) -> Option<anyhow::Result<ContainerEvent>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if self.done {
                return None;
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.absorb(&data);
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(anyhow::Error::from(e).context("reading podman's event stream")));
                }
                None => {
                    self.done = true;
                    return Some(Err(anyhow!("podman's event stream ended (the service stopped?)")));
                }
            }
        }
    }

    /// Splits decoded body bytes into whole lines, and those into events.
    fn absorb(&mut self, data: &[u8]) {
        if !self.lines.feed(data, &mut self.pending) {
            self.done = true;
        }
    }
}

/// The task driving one connection to podman; stopped when the call (or stream) is dropped.
struct Connection(tokio::task::JoinHandle<()>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A whole answer body, at most `MAX_BODY` bytes.
async fn read_limited(body: Incoming) -> anyhow::Result<Vec<u8>> {
    let collected = Limited::new(body, MAX_BODY).collect().await.map_err(|e| anyhow!("{e}"))?;
    Ok(collected.to_bytes().to_vec())
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
