//! WebSocket upgrade on any path, then an echo loop.

use std::sync::Arc;

use futures_util::{SinkExt as _, StreamExt as _};
use http::header::{CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, UPGRADE};
use http::{HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::bodies::{empty, RespBody};
use crate::util::{first_subprotocol, header_has_token, ws_accept_key};
use crate::{log, State};

/// Whether `req` asks for a websocket upgrade.
pub fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && header_has_token(req.headers(), UPGRADE, "websocket")
        && header_has_token(req.headers(), CONNECTION, "upgrade")
        && req.headers().contains_key(SEC_WEBSOCKET_KEY)
}

/// Answers 101 and spawns the echo loop on the upgraded connection.
pub fn upgrade(mut req: Request<Incoming>, state: Arc<State>) -> Response<RespBody> {
    let key = req.headers().get(SEC_WEBSOCKET_KEY).map(|v| v.as_bytes()).unwrap_or_default();
    let accept = ws_accept_key(key);
    let protocol = first_subprotocol(req.headers());
    let path = req.uri().path_and_query().map(|pq| pq.as_str().to_owned()).unwrap_or_else(|| "/".to_owned());

    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(v) = protocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
        h.insert(SEC_WEBSOCKET_PROTOCOL, v);
    }

    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
                if state.events_greeting && path.split('?').next().is_some_and(|p| p.ends_with("/events")) {
                    let hello = serde_json::json!({"event": "connected", "name": state.name}).to_string();
                    if ws.send(Message::text(hello)).await.is_err() {
                        return;
                    }
                }
                echo_loop(ws, &state.name, &path).await;
            }
            Err(e) => log(format_args!("websocket upgrade failed: {e}")),
        }
    });
    resp
}

async fn echo_loop<S>(mut ws: WebSocketStream<S>, name: &str, path: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(msg) = ws.next().await {
        let reply = match msg {
            Ok(Message::Text(t)) => match t.as_str() {
                "__whoami" => Message::text(name),
                "__path" => Message::text(path),
                _ => Message::Text(t),
            },
            Ok(Message::Binary(b)) => Message::Binary(b),
            // tungstenite queues the Pong itself; flushing sends it.
            Ok(Message::Ping(_)) | Ok(Message::Pong(_)) | Ok(Message::Frame(_)) => {
                if ws.flush().await.is_err() {
                    return;
                }
                continue;
            }
            // tungstenite queues a Close reply carrying the same code and
            // reason; flush it out and end.
            Ok(Message::Close(_)) => {
                let _ = ws.flush().await;
                return;
            }
            Err(_) => return,
        };
        if ws.send(reply).await.is_err() {
            return;
        }
    }
}
