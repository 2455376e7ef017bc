//! The listener's application: Pingora's HTTP proxy with a header-read timeout of our own for
//! plain HTTP/1.x connections (Pingora's built-in one is a fixed 60 s), so idle or slow clients
//! that never finish their request header are cut early.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;

use crate::drain::Drain;
use crate::Gateway;

pub struct EdgeApp {
    inner: Arc<HttpProxy<Gateway>>,
    header_timeout_secs: u64,
    drain: Option<Arc<Drain>>,
}

impl EdgeApp {
    pub fn new(inner: HttpProxy<Gateway>, header_timeout: Duration) -> EdgeApp {
        EdgeApp { inner: Arc::new(inner), header_timeout_secs: header_timeout.as_secs().max(1), drain: None }
    }

    /// Started when this listener stops accepting (the same `Drain` as the gateway's).
    pub fn with_drain(mut self, drain: Arc<Drain>) -> EdgeApp {
        self.drain = Some(drain);
        self
    }
}

#[async_trait]
impl ServerApp for EdgeApp {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let h1 = stream.get_ssl_digest().is_some() && !matches!(stream.selected_alpn_proto(), Some(ALPN::H2))
            || stream.get_ssl_digest().is_none();
        if !h1 {
            // HTTP/2 keeps Pingora's own handling.
            return self.inner.process_new(stream, shutdown).await;
        }
        let mut session = ServerSession::new_http1(stream);
        // Applies to each read while waiting for a request header, first and kept-alive alike.
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(self.header_timeout_secs) });
        let mut result = self.inner.process_new_http(session, shutdown).await;
        while let Some((stream, settings)) = result.map(|r| r.consume()) {
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
