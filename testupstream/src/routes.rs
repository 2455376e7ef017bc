//! The HTTP endpoints.

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};

use crate::bodies::{cut_short, empty, full, ticking, LargeBody, RespBody};
use crate::util::{parse_status, query_u64};
use crate::{ws, State};

/// Upper bound of `/large?bytes=`.
const MAX_LARGE: u64 = 10 * 1024 * 1024 * 1024;
/// Upper bound of every `ms` / `interval_ms` parameter (one hour).
const MAX_MS: u64 = 3_600_000;
/// Upper bound of `n` / `chunks`.
const MAX_COUNT: u64 = 1_000_000;
/// Upper bound of a JSON body kept in memory (runtime updates).
const MAX_JSON: usize = 1024 * 1024;

pub async fn handle(req: Request<Incoming>, state: Arc<State>, peer: SocketAddr) -> Response<RespBody> {
    if ws::is_upgrade(&req) {
        return ws::upgrade(req, state);
    }
    let query = req.uri().query();
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    let is_post = req.method() == Method::POST;
    match req.uri().path() {
        "/health" if get => json_resp(StatusCode::OK, &json!({"status": "ok", "name": state.name})),
        "/mrp/v1/capabilities" if get => {
            json_resp(StatusCode::OK, &json!({"name": state.name, "protocol": "mrp/v1", "capabilities": {}}))
        }
        "/api/runtime/update-port" if is_post => runtime_update(req, &state).await,
        "/_test/runtime-updates" if get => {
            let updates = state.updates.lock().unwrap_or_else(PoisonError::into_inner).clone();
            json_resp(StatusCode::OK, &Value::Array(updates))
        }
        "/sse" if get => {
            let n = query_u64(query, "n", 5, MAX_COUNT);
            let interval = Duration::from_millis(query_u64(query, "interval_ms", 200, MAX_MS));
            let mut resp = Response::new(ticking(n, interval, |i| format!("data: event {i}\n\n")));
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            resp
        }
        "/slow" if get => {
            let ms = query_u64(query, "ms", 2000, MAX_MS);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            text_resp(StatusCode::OK, "slow done")
        }
        "/large" if get => {
            let n = query_u64(query, "bytes", 0, MAX_LARGE);
            let mut resp = Response::new(RespBody::new(LargeBody::new(n)));
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            h.insert(CONTENT_LENGTH, HeaderValue::from(n));
            resp
        }
        // POST too: a long answer to a request with a body (tests/h2.rs).
        "/drip" if get || is_post => {
            let n = query_u64(query, "chunks", 5, MAX_COUNT);
            let interval = Duration::from_millis(query_u64(query, "interval_ms", 100, MAX_MS));
            let mut resp = Response::new(ticking(n, interval, |i| format!("chunk {i}\n")));
            resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            resp
        }
        "/die" if get => {
            // Declares `of` bytes, sends `bytes`, waits `ms`, then drops the connection.
            let sent = query_u64(query, "bytes", 1000, MAX_JSON as u64);
            let of = query_u64(query, "of", sent * 2, MAX_LARGE).max(sent + 1);
            let wait = Duration::from_millis(query_u64(query, "ms", 200, MAX_MS));
            let mut resp = Response::new(cut_short(sent, wait));
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            h.insert(CONTENT_LENGTH, HeaderValue::from(of));
            resp
        }
        "/upload" if is_post || req.method() == Method::PUT => upload(req).await,
        p if p.starts_with("/status/") => status(&p["/status/".len()..]),
        _ => echo(req, &state, peer).await,
    }
}

fn json_resp(status: StatusCode, v: &Value) -> Response<RespBody> {
    let mut resp = Response::new(full(v.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn text_resp(status: StatusCode, body: impl Into<Bytes>) -> Response<RespBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

fn bad_request(msg: impl std::fmt::Display) -> Response<RespBody> {
    json_resp(StatusCode::BAD_REQUEST, &json!({"error": msg.to_string()}))
}

fn status(code: &str) -> Response<RespBody> {
    let Some(code) = parse_status(code) else {
        return text_resp(StatusCode::BAD_REQUEST, "invalid status code");
    };
    let Ok(status) = StatusCode::from_u16(code) else {
        return text_resp(StatusCode::BAD_REQUEST, "invalid status code");
    };
    if matches!(code, 204 | 304) {
        let mut resp = Response::new(empty());
        *resp.status_mut() = status;
        return resp;
    }
    text_resp(status, format!("status {code}"))
}

async fn runtime_update(req: Request<Incoming>, state: &State) -> Response<RespBody> {
    let body = match Limited::new(req.into_body(), MAX_JSON).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return bad_request(format_args!("reading body: {e}")),
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request(format_args!("invalid JSON: {e}")),
    };
    state.updates.lock().unwrap_or_else(PoisonError::into_inner).push(value);
    json_resp(StatusCode::OK, &json!({"ok": true}))
}

/// Reads `body` to its end, frame by frame, calling `f` on each data chunk.
async fn drain(mut body: Incoming, mut f: impl FnMut(&[u8])) -> Result<(), hyper::Error> {
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            f(data);
        }
    }
    Ok(())
}

async fn upload(req: Request<Incoming>) -> Response<RespBody> {
    let (mut bytes, mut checksum) = (0u64, 0u64);
    let res = drain(req.into_body(), |d| {
        bytes += d.len() as u64;
        checksum = d.iter().fold(checksum, |acc, b| acc.wrapping_add(u64::from(*b)));
    })
    .await;
    if let Err(e) = res {
        return bad_request(format_args!("reading body: {e}"));
    }
    json_resp(StatusCode::OK, &json!({"bytes": bytes, "checksum": checksum}))
}

async fn echo(req: Request<Incoming>, state: &State, peer: SocketAddr) -> Response<RespBody> {
    let (parts, body) = req.into_parts();
    let mut headers = Map::new();
    for name in parts.headers.keys() {
        let mut values: Vec<Value> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let v = if values.len() == 1 { values.pop().unwrap_or(Value::Null) } else { Value::Array(values) };
        headers.insert(name.as_str().to_owned(), v);
    }
    let mut body_bytes = 0u64;
    if let Err(e) = drain(body, |d| body_bytes += d.len() as u64).await {
        return bad_request(format_args!("reading body: {e}"));
    }
    json_resp(
        StatusCode::OK,
        &json!({
            "name": state.name,
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "version": format!("{:?}", parts.version),
            "authority": parts.uri.authority().map(|a| a.as_str()),
            "remote_addr": peer.to_string(),
            "headers": headers,
            "body_bytes": body_bytes,
        }),
    )
}
