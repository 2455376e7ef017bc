//! The listener's application: Pingora's HTTP proxy behind our own per-connection defences.
//!
//! - Connection limits: a connection beyond `max_connections_per_ip` or `max_connections` is
//!   closed at once, before any byte of it is read.
//! - A whole-header deadline for HTTP/1.x (Pingora's own is per read, and a fixed 60 s before
//!   the first request): see [`crate::conn::EdgeStream`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;

use crate::conn::{self, ConnLimits, EdgeStream};
use crate::drain::Drain;
use crate::Gateway;

pub struct EdgeApp {
    inner: Arc<HttpProxy<Gateway>>,
    header_timeout: Duration,
    limits: Arc<ConnLimits>,
    header_timeouts: prometheus::IntCounter,
    drain: Option<Arc<Drain>>,
}

impl EdgeApp {
    pub fn new(
        inner: HttpProxy<Gateway>,
        header_timeout: Duration,
        limits: Arc<ConnLimits>,
        header_timeouts: prometheus::IntCounter,
    ) -> EdgeApp {
        EdgeApp { inner: Arc::new(inner), header_timeout, limits, header_timeouts, drain: None }
    }

    /// Started when this listener stops accepting (the same `Drain` as the gateway's).
    pub fn with_drain(mut self, drain: Arc<Drain>) -> EdgeApp {
        self.drain = Some(drain);
        self
    }

    /// Pingora's own per-read timer, set a second past ours so that ours (which can answer 408)
    /// fires first; it still bounds the idle time before a kept-alive request.
    fn pingora_keepalive_secs(&self) -> u64 {
        self.header_timeout.as_secs().saturating_add(1).max(1)
    }
}

#[async_trait]
impl ServerApp for EdgeApp {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let slot = match self.limits.admit(conn::peer_ip(&stream)) {
            Ok(slot) => slot,
            Err(why) => {
                tracing::debug!(?why, "connection refused at accept: limit reached");
                return None;
            }
        };
        let h2 = stream.get_ssl_digest().is_some() && matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        let mut edge = EdgeStream::new(stream, Some(slot), Some(self.header_timeouts.clone()));
        if h2 {
            // HTTP/2 keeps Pingora's own handling; the stream still holds the connection's slot.
            return self.inner.process_new(Box::new(edge), shutdown).await;
        }
        edge.arm(self.header_timeout);
        let mut session = ServerSession::new_http1(Box::new(edge));
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(self.pingora_keepalive_secs()) });
        let mut result = self.inner.process_new_http(session, shutdown).await;
        while let Some((stream, settings)) = result.map(|r| r.consume()) {
            // The clock restarts for the next request on this connection.
            let stream: Stream = match stream.into_any().downcast::<EdgeStream>() {
                Ok(mut edge) => {
                    edge.arm(self.header_timeout);
                    edge
                }
                Err(_) => {
                    tracing::error!("a kept-alive connection lost its edge wrapper; closing it");
                    return None;
                }
            };
            let mut session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            result = self.inner.process_new_http(session, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        // The accept loop has ended (shutdown or upgrade): the grace period runs from now.
        // Pingora's cleanup drops idle kept-alive connections at once, which races with a client
        // sending its next request on one; until the grace period is nearly over, their next
        // request is answered instead (with `Connection: close`, as the shutdown has begun).
        if let Some(d) = &self.drain {
            d.begin();
            d.closing().await;
        }
        self.inner.http_cleanup().await;
    }
}
