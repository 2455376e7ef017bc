//! The admin API (loopback by default): health, metrics, the live route table, reload.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::reload::Reloader;

pub struct AdminApp {
    pub reloader: Arc<Reloader>,
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

/// Compares in time independent of where the first difference is.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
        if !self.authorized(session) {
            let mut r = json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "admin token required: send Authorization: Bearer <token>"}),
            );
            r.headers_mut().insert("WWW-Authenticate", http::HeaderValue::from_static("Bearer"));
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
            (Method::GET, "/routes") => {
                let view = self.reloader.table().describe();
                json(StatusCode::OK, serde_json::to_value(view).unwrap_or_default())
            }
            (Method::GET, "/certs") => {
                let list = self.reloader.certs.store.list();
                json(StatusCode::OK, serde_json::json!({"certificates": list}))
            }
            (Method::POST, "/reload") => {
                let r = self.reloader.clone();
                // Reading and resolving the config may block briefly; keep it off the reactor.
                match tokio::task::spawn_blocking(move || r.reload()).await {
                    Ok(Ok(generation)) => {
                        json(StatusCode::OK, serde_json::json!({"status": "reloaded", "generation": generation}))
                    }
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
            (_, "/metrics" | "/routes" | "/certs" | "/reload") => {
                json(StatusCode::METHOD_NOT_ALLOWED, serde_json::json!({"error": "method not allowed"}))
            }
            _ => json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not found", "endpoints": ["GET /health", "GET /metrics", "GET /routes", "GET /certs", "POST /reload"]}),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same_token;

    #[test]
    fn token_compare() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abc", b"abd"));
        assert!(!same_token(b"abc", b"abcd"));
    }
}
