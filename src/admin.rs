//! The admin API (loopback by default): health, metrics, the live route table, certificates,
//! reload, and the control plane's operator calls (workspaces, runtime moves, kill switches).

use std::sync::Arc;

use markco_control::api::same_token;
use markco_control::db::WorkspaceRow;
use markco_control::plane::{ControlPlane, PlaneError};
use markco_proxy::user_id::UserId;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::reload::Reloader;

pub struct AdminApp {
    pub reloader: Arc<Reloader>,
    pub plane: Arc<ControlPlane>,
}

const MAX_BODY: usize = 64 * 1024;

/// Reads a small JSON body.
async fn read_json(session: &mut ServerSession) -> Result<serde_json::Value, String> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                if body.len() > MAX_BODY {
                    return Err(format!("body larger than {MAX_BODY} bytes"));
                }
            }
            Ok(None) => break,
            Err(e) => return Err(format!("reading the body: {e}")),
        }
    }
    serde_json::from_slice(&body).map_err(|e| format!("the body is not valid JSON: {e}"))
}

fn plane_error(e: PlaneError) -> Response<Vec<u8>> {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(status, serde_json::json!({"error": e.to_string()}))
}

fn bad_request(msg: impl Into<String>) -> Response<Vec<u8>> {
    json(StatusCode::BAD_REQUEST, serde_json::json!({"error": msg.into()}))
}

/// "host:port" → (host, port).
fn host_port(v: &serde_json::Value, key: &str) -> Result<(String, u16), String> {
    let s = v.get(key).and_then(|x| x.as_str()).ok_or_else(|| format!("`{key}` is required, as \"host:port\""))?;
    let (h, p) = s.rsplit_once(':').ok_or_else(|| format!("`{key}` must be \"host:port\""))?;
    let port = p.parse::<u16>().map_err(|_| format!("`{key}` has a bad port {p:?}"))?;
    if h.is_empty() || port == 0 {
        return Err(format!("`{key}` must be \"host:port\""));
    }
    Ok((h.trim_matches(|c| c == '[' || c == ']').to_string(), port))
}

/// A user id in a path: what the auth service issues (UUIDs) and nothing that could be a path trick.
/// A route's holders as `/routes` and the switch calls show them: `holders`, their names (what
/// `markco routes` and the operator page list), and `holds`, each with since when.
fn holders_json(holds: Vec<markco_control::switches::Hold>) -> (serde_json::Value, serde_json::Value) {
    let names: Vec<&str> = holds.iter().map(|h| h.holder.as_str()).collect();
    (serde_json::json!(names), serde_json::to_value(&holds).unwrap_or_default())
}

/// The same rule as the gateway's and the database's ([`UserId`]).
fn valid_user_id(id: &str) -> bool {
    UserId::is_valid(id)
}

impl AdminApp {
    /// The control plane's admin calls; `None` when the path is not one of them.
    async fn control(&self, session: &mut ServerSession, method: &Method, path: &str) -> Option<Response<Vec<u8>>> {
        if path == "/api/admin/workspaces" {
            return Some(match *method {
                Method::GET => match self.plane.list_workspaces().await {
                    Ok(rows) => json(StatusCode::OK, serde_json::json!({"workspaces": rows})),
                    Err(e) => plane_error(e),
                },
                _ => json(StatusCode::METHOD_NOT_ALLOWED, serde_json::json!({"error": "method not allowed"})),
            });
        }
        if path == "/api/admin/cluster" {
            return Some(match (method == Method::GET, &self.plane.cluster) {
                (true, Some(c)) => json(StatusCode::OK, serde_json::to_value(c.status()).unwrap_or_default()),
                (true, None) => json(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"error": "this gateway has no [cluster] section: it runs alone"}),
                ),
                _ => json(StatusCode::METHOD_NOT_ALLOWED, serde_json::json!({"error": "method not allowed"})),
            });
        }
        if path == "/api/admin/moves" {
            return Some(match *method {
                Method::GET => match self.plane.recent_moves().await {
                    Ok(moves) => json(StatusCode::OK, serde_json::json!({"moves": moves})),
                    Err(e) => plane_error(e),
                },
                _ => json(StatusCode::METHOD_NOT_ALLOWED, serde_json::json!({"error": "method not allowed"})),
            });
        }
        if let Some(rest) = path.strip_prefix("/api/admin/workspaces/") {
            if let Some((user, verb)) = rest.split_once('/') {
                if *method != Method::POST {
                    return Some(json(StatusCode::METHOD_NOT_ALLOWED, serde_json::json!({"error": "POST only"})));
                }
                if !valid_user_id(user) {
                    return Some(bad_request("bad user id"));
                }
                return Some(match verb {
                    "start" => match self.plane.ensure_workspace(user).await {
                        Ok(Some(_)) => json(StatusCode::OK, serde_json::json!({"user": user, "running": true})),
                        Ok(None) => json(
                            StatusCode::CONFLICT,
                            serde_json::json!({"error": "no [workspaces] section: markco starts no containers"}),
                        ),
                        Err(e) => plane_error(e),
                    },
                    "stop" => match self.plane.stop_workspace(user).await {
                        Ok(()) => json(StatusCode::OK, serde_json::json!({"user": user, "running": false})),
                        Err(e) => plane_error(e),
                    },
                    _ => json(StatusCode::NOT_FOUND, serde_json::json!({"error": "use /start or /stop"})),
                });
            }
        }
        if let Some(user) = path.strip_prefix("/api/admin/workspaces/") {
            if !valid_user_id(user) {
                return Some(bad_request("bad user id"));
            }
            return Some(match *method {
                Method::GET => match self.plane.get_workspace(user).await {
                    Ok(Some(row)) => json(StatusCode::OK, serde_json::to_value(row).unwrap_or_default()),
                    Ok(None) => json(StatusCode::NOT_FOUND, serde_json::json!({"error": "no workspace for this user"})),
                    Err(e) => plane_error(e),
                },
                Method::PUT => {
                    let body = match read_json(session).await {
                        Ok(b) => b,
                        Err(e) => return Some(bad_request(e)),
                    };
                    let (editor, runtime) = match (host_port(&body, "editor"), host_port(&body, "runtime")) {
                        (Ok(e), Ok(r)) => (e, r),
                        (Err(e), _) | (_, Err(e)) => return Some(bad_request(e)),
                    };
                    let state = match body.get("state").and_then(|s| s.as_str()).unwrap_or("running").parse() {
                        Ok(s) => s,
                        Err(e) => return Some(bad_request(format!("{e:#}"))),
                    };
                    let row = WorkspaceRow {
                        user_id: user.to_string(),
                        editor_host: editor.0,
                        editor_port: editor.1,
                        runtime_host: runtime.0,
                        runtime_port: runtime.1,
                        state,
                        editor_container: None,
                        runtime_container: None,
                        updated_at: 0,
                        node: None,
                    };
                    match self.plane.put_workspace(row.clone()).await {
                        Ok(()) => json(StatusCode::OK, serde_json::to_value(row).unwrap_or_default()),
                        Err(e) => plane_error(e),
                    }
                }
                Method::DELETE => match self.plane.delete_workspace(user).await {
                    Ok(true) => json(StatusCode::OK, serde_json::json!({"deleted": user})),
                    Ok(false) => {
                        json(StatusCode::NOT_FOUND, serde_json::json!({"error": "no workspace for this user"}))
                    }
                    Err(e) => plane_error(e),
                },
                _ => json(StatusCode::METHOD_NOT_ALLOWED, serde_json::json!({"error": "method not allowed"})),
            });
        }
        if path == "/api/runtime/update-port" {
            if *method != Method::POST {
                return Some(json(StatusCode::METHOD_NOT_ALLOWED, serde_json::json!({"error": "POST only"})));
            }
            let body = match read_json(session).await {
                Ok(b) => b,
                Err(e) => return Some(bad_request(e)),
            };
            let Some(user) = body.get("userId").and_then(|u| u.as_str()).filter(|u| valid_user_id(u)) else {
                return Some(bad_request("`userId` is required"));
            };
            let Some(port) =
                body.get("port").and_then(|p| p.as_u64()).and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0)
            else {
                return Some(bad_request("`port` must be a port number"));
            };
            let host = body.get("host").and_then(|h| h.as_str()).map(str::to_owned);
            return Some(match self.plane.move_runtime(user, host, port).await {
                Ok(outcome) => json(StatusCode::OK, serde_json::to_value(outcome).unwrap_or_default()),
                Err(e) => plane_error(e),
            });
        }
        if let Some(rest) = path.strip_prefix("/api/admin/routes/") {
            let (name, verb) = rest.rsplit_once('/')?;
            let disable = match verb {
                "disable" => true,
                "enable" => false,
                _ => return None,
            };
            if *method != Method::POST {
                return Some(json(StatusCode::METHOD_NOT_ALLOWED, serde_json::json!({"error": "POST only"})));
            }
            let name = percent_decode(name);
            if !self.reloader.table().has_route(&name) {
                return Some(json(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"error": format!("no route named {name:?}")}),
                ));
            }
            // The operator's own hold only: a failing health check's hold stays (and the route
            // stays off) after `enable`.
            return Some(match self.plane.switch_route(&name, disable).await {
                Ok(holds) => {
                    let disabled = !holds.is_empty();
                    let (holders, holds) = holders_json(holds);
                    json(
                        StatusCode::OK,
                        serde_json::json!({"route": name, "disabled": disabled, "holders": holders, "holds": holds}),
                    )
                }
                Err(e) => plane_error(e),
            });
        }
        if let Some(user) = path.strip_prefix("/api/admin/users/").and_then(|r| r.strip_suffix("/logout")) {
            // Logout or account deletion in the auth service: sessions dropped, containers stopped.
            if *method != Method::POST {
                return Some(json(StatusCode::METHOD_NOT_ALLOWED, serde_json::json!({"error": "POST only"})));
            }
            if !valid_user_id(user) {
                return Some(bad_request("bad user id"));
            }
            if let Err(e) = self.plane.invalidate_sessions(user).await {
                return Some(plane_error(e));
            }
            let stopped = match self.plane.stop_workspace(user).await {
                Ok(()) => true,
                Err(PlaneError::Invalid(_)) => false,
                Err(e) => return Some(plane_error(e)),
            };
            return Some(json(
                StatusCode::OK,
                serde_json::json!({"user": user, "sessions_invalidated": true, "workspace_stopped": stopped}),
            ));
        }
        if let Some(user) = path.strip_prefix("/api/admin/users/").and_then(|r| r.strip_suffix("/invalidate")) {
            if *method != Method::POST {
                return Some(json(StatusCode::METHOD_NOT_ALLOWED, serde_json::json!({"error": "POST only"})));
            }
            if !valid_user_id(user) {
                return Some(bad_request("bad user id"));
            }
            return Some(match self.plane.invalidate_sessions(user).await {
                Ok(()) => json(StatusCode::OK, serde_json::json!({"invalidated": user})),
                Err(e) => plane_error(e),
            });
        }
        None
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Vec<u8>> {
    let body = body.to_string().into_bytes();
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .header("Content-Length", body.len())
        .header("Cache-Control", "no-store")
        .body(body)
        .unwrap_or_default()
}

impl AdminApp {
    fn authorized(&self, session: &ServerSession) -> bool {
        let token = self.reloader.admin_token.load();
        let Some(want) = token.as_deref() else {
            return true;
        };
        session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|got| same_token(got.trim().as_bytes(), want.as_bytes()))
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        if path == "/health" {
            return json(StatusCode::OK, serde_json::json!({"status": "ok"}));
        }
        // The operator page carries no data; its script calls the API below with the token.
        if let Some(page) = crate::ui::serve(&method, &path) {
            return page;
        }
        if !self.authorized(session) {
            let mut r = json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "admin token required: send Authorization: Bearer <token>"}),
            );
            r.headers_mut().insert("WWW-Authenticate", http::HeaderValue::from_static("Bearer"));
            return r;
        }
        if let Some(r) = self.control(session, &method, &path).await {
            return r;
        }
        match (method, path.as_str()) {
            (Method::GET, "/metrics") => {
                let body = self.reloader.metrics().render();
                Response::builder()
                    .status(StatusCode::OK)
                    .header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                    .header("Content-Length", body.len())
                    .body(body)
                    .unwrap_or_default()
            }
            // What `markco status` shows: version, route table generation and the health checks.
            (Method::GET, "/status") => {
                let health = self.plane.health();
                let checks: Vec<serde_json::Value> = self
                    .plane
                    .health_checks()
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "name": c.name,
                            "url": format!("http://{}{}", c.addr, c.path),
                            "passing": health.get(&c.name).copied().unwrap_or(false),
                            "disables_route": c.disable_route,
                        })
                    })
                    .collect();
                let ok = checks.iter().all(|c| c["passing"] == true);
                json(
                    StatusCode::OK,
                    serde_json::json!({
                        "status": if ok { "ok" } else { "degraded" },
                        "version": env!("CARGO_PKG_VERSION"),
                        "pid": std::process::id(),
                        "generation": self.reloader.table().generation,
                        "health_checks": checks,
                    }),
                )
            }
            (Method::GET, "/routes") => {
                let view = self.reloader.table().describe();
                let mut view = serde_json::to_value(view).unwrap_or_default();
                // Who holds each route off, and since when.
                let holds = self.plane.state.holds();
                if let Some(sites) = view.get_mut("sites").and_then(|s| s.as_array_mut()) {
                    let routes = sites.iter_mut().filter_map(|s| s.get_mut("routes")?.as_array_mut()).flatten();
                    for route in routes.filter_map(|r| r.as_object_mut()) {
                        let of_route = route.get("name").and_then(|n| n.as_str()).and_then(|n| holds.get(n)).cloned();
                        let (names, details) = holders_json(of_route.unwrap_or_default());
                        route.insert("holders".into(), names);
                        route.insert("holds".into(), details);
                    }
                }
                // Held routes the config no longer defines: their holds stay until lifted.
                let orphaned: serde_json::Map<String, serde_json::Value> = self
                    .plane
                    .state
                    .orphaned()
                    .into_iter()
                    .map(|route| {
                        let (_, details) = holders_json(holds.get(&route).cloned().unwrap_or_default());
                        (route, details)
                    })
                    .collect();
                if let Some(v) = view.as_object_mut() {
                    v.insert("orphaned_holds".into(), serde_json::Value::Object(orphaned));
                    if let Some(c) = &self.plane.cluster {
                        v.insert("cluster".into(), serde_json::to_value(c.status()).unwrap_or_default());
                    }
                }
                json(StatusCode::OK, view)
            }
            (Method::GET, "/certs") => {
                let list = self.reloader.certs.store.list();
                json(StatusCode::OK, serde_json::json!({"certificates": list}))
            }
            (Method::POST, "/reload") => {
                let r = self.reloader.clone();
                // Reading and resolving the config may block briefly; keep it off the reactor.
                match tokio::task::spawn_blocking(move || r.reload()).await {
                    // What needs a restart is named in the answer, never dropped silently.
                    Ok(Ok(r)) => json(
                        StatusCode::OK,
                        serde_json::json!({"status": "reloaded", "generation": r.generation, "needs_restart": r.needs_restart}),
                    ),
                    Ok(Err(e)) => json(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        serde_json::json!({"status": "refused", "error": e, "generation": self.reloader.table().generation}),
                    ),
                    Err(e) => json(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        serde_json::json!({"error": format!("reload task failed: {e}")}),
                    ),
                }
            }
            (_, "/metrics" | "/routes" | "/certs" | "/reload" | "/status") => {
                json(StatusCode::METHOD_NOT_ALLOWED, serde_json::json!({"error": "method not allowed"}))
            }
            _ => json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not found", "endpoints": ["GET /health", "GET /ui", "GET /status", "GET /metrics", "GET /routes", "GET /certs", "POST /reload", "GET /api/admin/workspaces", "GET /api/admin/moves", "GET /api/admin/cluster", "GET|PUT|DELETE /api/admin/workspaces/<userId>", "POST /api/runtime/update-port", "POST /api/admin/routes/<name>/disable|enable", "POST /api/admin/users/<userId>/invalidate"]}),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_and_addresses() {
        assert!(valid_user_id("3f2b9c1e-aaaa-bbbb-cccc-0123456789ab"));
        assert!(!valid_user_id("../x"));
        assert!(!valid_user_id(""));
        let v = serde_json::json!({"editor": "127.0.0.1:20001", "bad": "x", "port0": "h:0"});
        assert_eq!(host_port(&v, "editor"), Ok(("127.0.0.1".to_string(), 20001)));
        assert!(host_port(&v, "bad").is_err());
        assert!(host_port(&v, "port0").is_err());
        assert!(host_port(&v, "missing").is_err());
        assert_eq!(percent_decode("a%20b"), "a b");
    }
}
