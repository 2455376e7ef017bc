//! The control API's public paths, answered in-process from snapshots (no database on the
//! request path): `/health`, `/api/health`, `/api/services`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use markco_proxy::identity::{ControlApi, ControlResponse};
use serde_json::json;

use crate::plane::ControlPlane;

pub struct PublicApi {
    pub plane: Arc<ControlPlane>,
    /// The admin token: with it `/api/services` also lists the workspaces.
    pub admin_token: Arc<ArcSwap<Option<String>>>,
}

fn reply(status: u16, v: serde_json::Value) -> ControlResponse {
    ControlResponse { status, content_type: "application/json", body: Bytes::from(v.to_string()) }
}

/// Compares in time independent of where the first difference is.
pub fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Does an `Authorization` header carry the admin token? (No token configured: nobody is admin
/// through the public listener.)
pub fn is_admin(token: &Option<String>, authorization: Option<&str>) -> bool {
    match (token, authorization.and_then(|a| a.strip_prefix("Bearer "))) {
        (Some(want), Some(got)) => same_token(got.trim().as_bytes(), want.as_bytes()),
        _ => false,
    }
}

impl PublicApi {
    fn services(&self) -> (bool, serde_json::Map<String, serde_json::Value>) {
        let health = self.plane.health();
        let mut all_ok = true;
        let mut services = serde_json::Map::new();
        services.insert("markco".into(), json!("ok"));
        for check in self.plane.health_checks() {
            let ok = health.get(&check.name).copied().unwrap_or(false);
            all_ok &= ok;
            services.insert(check.name.clone(), json!(if ok { "ok" } else { "down" }));
        }
        // A background loop of markco's own that panicked and waits for its restart.
        for (task, why) in self.plane.supervisor.down() {
            all_ok = false;
            services.insert(format!("markco:{task}"), json!({"status": "down", "error": why}));
        }
        (all_ok, services)
    }
}

#[async_trait]
impl ControlApi for PublicApi {
    async fn respond(&self, method: &http::Method, path: &str, authorization: Option<&str>) -> ControlResponse {
        if method != http::Method::GET && method != http::Method::HEAD {
            return reply(405, json!({"error": "method not allowed"}));
        }
        let now = chrono::Utc::now().to_rfc3339();
        match path {
            "/health" => reply(200, json!({"status": "ok", "service": "markco"})),
            "/api/health" => {
                let (ok, services) = self.services();
                reply(
                    if ok { 200 } else { 503 },
                    json!({"status": if ok { "ok" } else { "degraded" }, "services": services, "timestamp": now}),
                )
            }
            "/api/services" => {
                let (_, states) = self.services();
                let mut services = serde_json::Map::new();
                for check in self.plane.health_checks() {
                    services.insert(
                        check.name.clone(),
                        json!({"url": format!("http://{}{}", check.addr, check.path), "status": states.get(&check.name)}),
                    );
                }
                let mut body = json!({"services": services, "timestamp": now});
                // Who has a workspace, and on which ports, is for operators only.
                if is_admin(&self.admin_token.load(), authorization) {
                    let table = self.plane.table.load();
                    let editors: serde_json::Map<String, serde_json::Value> = table
                        .workspaces
                        .iter()
                        .map(|(user, r)| {
                            (user.to_string(), json!({"editor": r.editor.to_string(), "runtime": r.runtime.to_string(), "running": r.running}))
                        })
                        .collect();
                    body["editors"] = serde_json::Value::Object(editors);
                }
                reply(200, body)
            }
            _ => reply(404, json!({"error": "not found"})),
        }
    }
}

/// Lazy start for the data plane: a request to `/u/<id>/` of a user without a running workspace
/// asks the control plane to start one and waits for it, up to the ready timeout.
pub struct LazyStarter {
    pub plane: Arc<ControlPlane>,
    pub wait: std::time::Duration,
}

#[async_trait]
impl markco_proxy::identity::WorkspaceStarter for LazyStarter {
    async fn ensure_running(
        &self,
        user: &str,
    ) -> Result<Option<Arc<markco_proxy::table::UserRoutes>>, markco_proxy::identity::StartError> {
        match tokio::time::timeout(self.wait, self.plane.ensure_workspace(user)).await {
            Ok(Ok(running)) => Ok(running),
            // What the user may read: why it is unavailable (a down host, no room); anything else
            // stays in the log.
            Ok(Err(crate::plane::PlaneError::Unavailable(why))) => Err(markco_proxy::identity::StartError(why)),
            Ok(Err(e)) => {
                tracing::warn!(user, "workspace start failed: {e}");
                Err(markco_proxy::identity::StartError("the workspace could not start; retry shortly".into()))
            }
            // Still starting: the client gets 503 + Retry-After and the start goes on.
            Err(_) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_token_check() {
        let t = Some("s3cret".to_string());
        assert!(is_admin(&t, Some("Bearer s3cret")));
        assert!(!is_admin(&t, Some("Bearer s3cre")));
        assert!(!is_admin(&t, None));
        assert!(!is_admin(&None, Some("Bearer anything")));
    }

    #[tokio::test]
    async fn api_health_reports_a_background_task_that_is_down() {
        use crate::plane::{MoveLimits, PlaneConfig};
        let config = PlaneConfig {
            database_url: "sqlite::memory:".into(),
            workspaces: None,
            sessions: Default::default(),
            moves: MoveLimits::default(),
            health_checks: Vec::new(),
            cluster: None,
        };
        let (table, _reader) = markco_proxy::table::TablePublisher::new(markco_proxy::table::RouteTable::empty());
        let plane = ControlPlane::new(table, config, &prometheus::Registry::new());
        let api = PublicApi { plane: plane.clone(), admin_token: Arc::new(ArcSwap::from_pointee(None)) };
        let health = || api.respond(&http::Method::GET, "/api/health", None);
        assert_eq!(health().await.status, 200);
        let task = plane.supervisor.spawn("doomed", || async { panic!("always") });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let r = health().await;
        let body: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!(r.status, 503, "{body}");
        assert_eq!(body["services"]["markco:doomed"]["status"], "down", "{body}");
        task.abort();
    }
}
