//! The listener's application: our own HTTP/1 request loop on Pingora's sessions, Pingora's
//! HTTP proxy for what that loop leaves to it, and our own per-connection defences.
//!
//! - Connection limits: a connection beyond `max_connections_per_ip` or `max_connections` is
//!   closed at once, before any byte of it is read.
//! - A whole-header deadline for HTTP/1.x (Pingora's own is per read, and a fixed 60 s before
//!   the first request): see [`crate::conn::EdgeStream`].
//! - Requests without a body (nearly all traffic) are read into Pingora's HTTP/1 proxy session
//!   and handed to the gateway here, without `HttpProxy`'s per-request machinery (its modules,
//!   cache and subrequest state and the moves of its session), which measured about 2 µs of
//!   CPU a request (benches/README.md, "Floors"). Requests with a body, `CONNECT`, heads this
//!   loop does not take (see [`plain`]) go to Pingora's `HttpProxy` as before. Both HTTP/1 paths
//!   get the bytes already read as the start of Pingora's read buffer (its "pipelined prefix"),
//!   so nothing is read twice and nothing goes back into the stream.
//! - HTTP/2: Pingora's handshake and stream sessions under our own accept loop, which answers
//!   streams without a body the same way and hands the others to `HttpProxy` (see
//!   [`EdgeApp::serve_h2`]).

use std::io;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, BytesMut};
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::prelude::{Error, ErrorType};
use pingora::protocols::http::v2::server::{self as h2_server, H2Accept, HttpSession as H2Session};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Digest, GetProxyDigest, GetSocketDigest, GetTimingDigest, Ssl, Stream, ALPN};
use pingora::proxy::{HttpProxy, ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;

use crate::conn::{self, ConnLimits, EdgeStream};
use crate::drain::Drain;
use crate::Gateway;

/// A request head this loop reads before it knows who serves it: longer ones go to Pingora's
/// reader (which has its own limit, and the gateway its `max_header_bytes`).
const LOOK_LIMIT: usize = 64 * 1024;
/// Header lines the look parses; a request with more goes to Pingora's reader.
const LOOK_HEADERS: usize = 96;

pub struct EdgeApp {
    inner: Arc<HttpProxy<Gateway>>,
    /// The same gateway as `inner`'s (a clone: all its state is shared), for the requests this
    /// loop serves itself.
    gateway: Gateway,
    header_timeout: Duration,
    limits: Arc<ConnLimits>,
    header_timeouts: prometheus::IntCounter,
    drain: Option<Arc<Drain>>,
    /// Set when the listener's cleanup begins: idle kept-alive connections close, as Pingora's
    /// own wait for a request does.
    closing: tokio::sync::watch::Sender<bool>,
}

/// What the look at a request head found.
enum Head {
    /// A complete head of a request without a body: served by this loop.
    Plain,
    /// Anything else: Pingora's `HttpProxy` parses it from the bytes read, reads what follows,
    /// and serves (or refuses) it.
    Other,
    /// The client closed the connection before a request (or the head cannot be served).
    Closed,
}

impl EdgeApp {
    pub fn new(
        gateway: Gateway,
        conf: &Arc<ServerConf>,
        header_timeout: Duration,
        limits: Arc<ConnLimits>,
        header_timeouts: prometheus::IntCounter,
    ) -> EdgeApp {
        let inner = Arc::new(pingora::proxy::http_proxy(conf, gateway.clone()));
        let (closing, _) = tokio::sync::watch::channel(false);
        EdgeApp { inner, gateway, header_timeout, limits, header_timeouts, drain: None, closing }
    }

    /// Started when this listener stops accepting (the same `Drain` as the gateway's).
    pub fn with_drain(mut self, drain: Arc<Drain>) -> EdgeApp {
        self.drain = Some(drain);
        self
    }

    /// Pingora's own per-read timer for the heads its reader finishes (those past the look), set
    /// a second past ours so that ours, which can answer 408, fires first.
    fn pingora_keepalive_secs(&self) -> u64 {
        self.header_timeout.as_secs().saturating_add(1).max(1)
    }

    /// Serves one request without a body, whose head (and whatever followed it) is in `read`.
    /// Returns the stream when the connection may carry another request.
    async fn serve_plain(
        &self,
        edge: Box<EdgeStream>,
        read: BytesMut,
        shutdown: &ShutdownWatch,
    ) -> Option<Box<EdgeStream>> {
        let mut session = Session::new_h1(edge);
        // Pingora's reader parses these bytes as the start of its buffer. Bytes past the head
        // are the next request's (pipelining): Pingora then does not reuse the connection.
        session.downstream_session.set_pipelined_prefix(read);
        match session.downstream_session.read_request().await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                // The look accepted what Pingora's parser refuses: answer as HttpProxy does.
                tracing::debug!("request head refused: {e}");
                if matches!(e.etype(), ErrorType::InvalidHTTPHeader) {
                    let _ = session.downstream_session.respond_error(400).await;
                }
                session.downstream_session.shutdown().await;
                return None;
            }
        }
        // Reading the request set keep-alive from its version and `Connection` header.
        if *shutdown.borrow() {
            session.set_keepalive(None);
        }
        if !self.answer(&mut session).await {
            session.downstream_session.shutdown().await;
            return None;
        }
        // Pipelining is not enabled on the session, so Pingora gives back no bytes of a next
        // request: it closes instead.
        let (stream, _) = session.downstream_session.finish().await.ok().flatten()?.into_parts();
        downcast(stream)
    }

    /// Has the gateway answer a request without a body, read into `session`, as `HttpProxy`
    /// would: its filter, then its error answer and log. Returns whether the client's
    /// connection (or HTTP/2 stream) may go on.
    async fn answer(&self, session: &mut Session) -> bool {
        let gw = &self.gateway;
        let mut ctx = gw.new_ctx();
        let outcome = match gw.request_filter(session, &mut ctx).await {
            Ok(true) => Ok(()),
            // The gateway answers every request without a body itself (only a body goes to
            // Pingora's proxy loop); anything else is a bug, answered 500 rather than dropped.
            Ok(false) => Err(Error::explain(ErrorType::InternalError, "a request without a body was not answered")),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                gw.logging(session, None, &mut ctx).await;
                true
            }
            Err(e) => {
                let failed = gw.fail_to_proxy(session, &e, &mut ctx).await;
                if !gw.suppress_error_log(session, &ctx, &e) {
                    tracing::error!(
                        status = failed.error_code,
                        "request failed: {e}, {}",
                        gw.request_summary(session, &ctx)
                    );
                }
                gw.logging(session, Some(&e), &mut ctx).await;
                failed.can_reuse_downstream
            }
        }
    }

    /// Serves one request, whose first bytes are in `read`, on Pingora's `HttpProxy`.
    async fn serve_other(
        &self,
        edge: Box<EdgeStream>,
        read: BytesMut,
        shutdown: &ShutdownWatch,
    ) -> Option<Box<EdgeStream>> {
        let mut session = ServerSession::new_http1(edge);
        // Its reader goes on from these bytes (the header clock has seen them).
        session.set_pipelined_prefix(read);
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(self.pingora_keepalive_secs()) });
        let (stream, _settings) = self.inner.process_new_http(session, shutdown).await?.consume();
        downcast(stream)
    }
}

impl EdgeApp {
    /// An HTTP/2 connection: Pingora's handshake and streams, our accept loop. Each stream
    /// without a request body is answered by the gateway directly, as on HTTP/1 (Pingora's
    /// `HttpProxy` per-request machinery measured about 2 µs a request); the others go to
    /// `HttpProxy`. The loop is Pingora's (`accept_downstream_sessions`, not public in 0.9):
    /// a shutdown sends GOAWAY and serves the streams the client had already opened; a
    /// connection sending too many malformed streams is closed. Unlike Pingora's, it bounds
    /// the time a client may stay quiet (no stream in flight, no byte either way) by
    /// `header_timeout`, as on HTTP/1: before its preface, GOAWAY after it, and a drop once it
    /// has been told GOAWAY. Streams run on the connection's thread (Pingora's loop spread
    /// them over threads at random).
    async fn serve_h2(self: &Arc<Self>, mut edge: Box<EdgeStream>, shutdown: &ShutdownWatch) -> Option<Stream> {
        // Streams write through the codec, whose buffers may still be sending an answer after
        // the stream's task ended: the bytes moved tell a quiet connection from a busy one.
        let moved = edge.count_bytes();
        let digest = Arc::new(Digest {
            ssl_digest: edge.get_ssl_digest(),
            timing_digest: edge.get_timing_digest(),
            proxy_digest: edge.get_proxy_digest(),
            socket_digest: edge.get_socket_digest(),
        });
        let mut conn = match tokio::time::timeout(self.header_timeout, h2_server::handshake(edge, None)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!("HTTP/2 handshake: {e}");
                return None;
            }
            Err(_) => {
                tracing::debug!("HTTP/2 handshake: no client preface within the header timeout");
                return None;
            }
        };
        let active = Arc::new(InFlight { count: AtomicUsize::new(0), idle: Notify::new(), moved });
        let mut shutdown_rx = shutdown.clone();
        let stop = shutdown_rx.wait_for(|s| *s);
        tokio::pin!(stop);
        let mut draining = false;
        let mut malformed = 0usize;
        loop {
            let accepted = if draining {
                tokio::select! {
                    a = H2Session::from_h2_conn(&mut conn, digest.clone()) => a,
                    // A peer that neither opens streams nor closes after GOAWAY.
                    _ = active.quiet_for(self.header_timeout) => return None,
                }
            } else {
                tokio::select! {
                    biased;
                    _ = &mut stop => {
                        conn.graceful_shutdown();
                        draining = true;
                        continue;
                    }
                    a = H2Session::from_h2_conn(&mut conn, digest.clone()) => a,
                    _ = active.quiet_for(self.header_timeout) => {
                        conn.graceful_shutdown();
                        draining = true;
                        continue;
                    }
                }
            };
            match accepted {
                Err(e) => {
                    // Often a client that closed its socket without GOAWAY.
                    tracing::debug!("HTTP/2 connection ended: {e}");
                    return None;
                }
                Ok(None) => return None,
                // Answered or reset by Pingora; the connection goes on, within a budget.
                Ok(Some(H2Accept::Rejected)) => {
                    malformed += 1;
                    if malformed >= MAX_MALFORMED_H2_STREAMS {
                        tracing::warn!("HTTP/2 connection closed after {malformed} malformed streams");
                        return None;
                    }
                }
                Ok(Some(H2Accept::Session(h2))) => {
                    let (app, shutdown, guard) = (self.clone(), shutdown.clone(), active.start());
                    tokio::spawn(async move {
                        app.serve_h2_stream(h2, &shutdown).await;
                        drop(guard);
                    });
                }
            }
        }
    }

    async fn serve_h2_stream(&self, h2: H2Session, shutdown: &ShutdownWatch) {
        let plain = h2.req_header().method != http::Method::CONNECT && h2.is_body_empty();
        let server = ServerSession::new_http2(h2);
        if !plain {
            // Pingora's HTTP/2 session has no read timeout (`set_read_timeout` does nothing for
            // it), so a client could hold a stream, and the upstream connection behind it, by
            // never finishing its body. The gateway reports each piece of body it is handed;
            // a body idle for `client_idle_timeout` ends the stream (dropped: RST_STREAM).
            // (It also counts time the upstream takes to accept the body: Pingora reads no more
            // while its pipe to the upstream is full.)
            let progress = Arc::new(BodyProgress::new());
            let idle = self.gateway.client_idle_timeout();
            // For the log line: this request is not logged by the gateway once it is dropped.
            let what = format!("{} {}", server.req_header().method, server.req_header().uri.path());
            let serve = BODY_PROGRESS.scope(progress.clone(), self.inner.process_new_http(server, shutdown));
            tokio::select! {
                _ = serve => {}
                _ = progress.stalled(idle) => {
                    tracing::info!(request = %what, "an HTTP/2 request body was idle for {idle:?}: its stream is reset");
                }
            }
            return;
        }
        // Pingora's proxy `Session` has a public constructor for HTTP/1 only: one is made on
        // no socket, and the stream's session put in its place.
        let mut session = Session::new_h1(Box::new(std::io::Cursor::new(Vec::new())));
        *session.downstream_session = server;
        // Ends the stream if the answer did not (an empty final DATA frame). A stream that
        // cannot go on is dropped instead, which resets it (CANCEL), as HttpProxy does.
        if self.answer(&mut session).await {
            let _ = session.downstream_session.finish().await;
        }
    }
}

tokio::task_local! {
    /// The request-body progress of the HTTP/2 stream this task serves, if any.
    static BODY_PROGRESS: Arc<BodyProgress>;
}

/// Called for every piece of a request body handed to the gateway (`end`: the last one), and
/// with `false` when the body is about to be read, so that the idle time counts from there.
/// Only an HTTP/2 stream's task watches it ([`EdgeApp::serve_h2_stream`]); HTTP/1 bodies have
/// Pingora's read timeout.
pub(crate) fn request_body_progress(end: bool) {
    let _ = BODY_PROGRESS.try_with(|p| p.seen(end));
}

/// When a request body last moved, and whether it has ended.
struct BodyProgress {
    start: tokio::time::Instant,
    /// Milliseconds from `start` to the last piece.
    last_ms: AtomicU64,
    done: AtomicBool,
}

impl BodyProgress {
    fn new() -> BodyProgress {
        BodyProgress { start: tokio::time::Instant::now(), last_ms: AtomicU64::new(0), done: AtomicBool::new(false) }
    }

    fn seen(&self, end: bool) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
        if end {
            self.done.store(true, Ordering::Relaxed);
        }
    }

    /// Completes once the body has been idle for `idle` before its end; never once it ended.
    async fn stalled(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            tokio::time::sleep_until(self.start + last + idle).await;
            if self.done.load(Ordering::Relaxed) {
                return std::future::pending().await;
            }
            if Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) == last {
                return;
            }
        }
    }
}

/// Pingora's own limit for its HTTP/2 accept loop.
const MAX_MALFORMED_H2_STREAMS: usize = 32;

/// The streams of one HTTP/2 connection being served, and its bytes moved.
struct InFlight {
    count: AtomicUsize,
    idle: Notify,
    moved: Arc<AtomicU64>,
}

/// Held by a stream's task; counts it out when dropped.
struct StreamGuard(Arc<InFlight>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_one();
        }
    }
}

impl InFlight {
    fn start(self: &Arc<Self>) -> StreamGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }

    /// Completes once the connection has been quiet for `d`: no stream in flight and no byte
    /// read or written.
    async fn quiet_for(&self, d: Duration) {
        loop {
            while self.count.load(Ordering::Acquire) != 0 {
                self.idle.notified().await;
            }
            let before = self.moved.load(Ordering::Relaxed);
            tokio::time::sleep(d).await;
            if self.count.load(Ordering::Acquire) == 0 && self.moved.load(Ordering::Relaxed) == before {
                return;
            }
        }
    }
}

fn downcast(stream: Stream) -> Option<Box<EdgeStream>> {
    match stream.into_any().downcast::<EdgeStream>() {
        Ok(edge) => Some(edge),
        Err(_) => {
            tracing::error!("a kept-alive connection lost its edge wrapper; closing it");
            None
        }
    }
}

/// Reads a request head from `edge` into `buf`, parsing it once the header clock has seen its
/// end (so a client sending a byte at a time does not make us parse its head over and over).
async fn look(edge: &mut EdgeStream, buf: &mut BytesMut) -> io::Result<Head> {
    loop {
        if !buf.is_empty() && !edge.armed() {
            // Uninitialised: httparse fills only the lines it finds.
            let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; LOOK_HEADERS];
            let mut req = httparse::Request::new(&mut []);
            let parsed =
                httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, &mut headers);
            return Ok(match parsed {
                Ok(httparse::Status::Complete(_)) if plain(&req) => Head::Plain,
                // The clock saw the end, httparse did not. It cannot happen today (every byte
                // before the blank line the clock found is a line end or an httparse error),
                // but were it to, Pingora's reader would go on without the whole-header
                // deadline: refuse.
                Ok(httparse::Status::Partial) => {
                    tracing::debug!("request head ended for the header clock but not for httparse; closing");
                    Head::Closed
                }
                // A body, refused or too many lines: Pingora's reader decides, and answers
                // what it refuses.
                _ => Head::Other,
            });
        }
        let room = LOOK_LIMIT.saturating_sub(buf.len());
        if room == 0 {
            return Ok(Head::Other);
        }
        buf.reserve(room.min(4096));
        if edge.read_buf(&mut (&mut *buf).limit(room)).await? == 0 {
            return Ok(Head::Closed);
        }
    }
}

/// A request this loop serves: no body by its framing (RFC 9112 6.3: neither
/// `Transfer-Encoding` nor a `Content-Length` other than 0), no `Expect`, not `CONNECT`.
fn plain(req: &httparse::Request<'_, '_>) -> bool {
    req.method != Some("CONNECT")
        && req.headers.iter().all(|h| {
            if h.name.eq_ignore_ascii_case("content-length") {
                h.value.trim_ascii() == b"0"
            } else {
                !h.name.eq_ignore_ascii_case("transfer-encoding") && !h.name.eq_ignore_ascii_case("expect")
            }
        })
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
        let mut edge = Box::new(EdgeStream::new(stream, Some(slot), Some(self.header_timeouts.clone())));
        if h2 {
            // The stream holds the connection's slot for the whole connection.
            return self.serve_h2(edge, shutdown).await;
        }
        let mut closing = self.closing.subscribe();
        // One wait for the whole connection: made per request, its registration with the
        // channel was a measurable share of a request's cost.
        let closed = closing.wait_for(|c| *c);
        tokio::pin!(closed);
        loop {
            // The clock runs from here for this request's header.
            edge.arm(self.header_timeout);
            let mut buf = BytesMut::new();
            let head = tokio::select! {
                biased;
                r = look(&mut edge, &mut buf) => r,
                _ = &mut closed => return None,
            };
            let head = match head {
                Ok(h) => h,
                Err(e) => {
                    // A header timeout (answered 408 by the stream where it may be) or a broken
                    // connection.
                    tracing::debug!("reading a request head: {e}");
                    return None;
                }
            };
            edge = match head {
                Head::Closed => return None,
                // The clock stopped at the end of the head, before the look parsed it.
                Head::Plain => self.serve_plain(edge, buf, shutdown).await?,
                Head::Other => self.serve_other(edge, buf, shutdown).await?,
            };
        }
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
        self.closing.send_replace(true);
        self.inner.http_cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_plain(head: &[u8]) -> bool {
        let mut headers = [httparse::EMPTY_HEADER; LOOK_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        assert!(matches!(req.parse(head), Ok(httparse::Status::Complete(_))), "{head:?}");
        plain(&req)
    }

    #[test]
    fn only_requests_without_a_body_are_plain() {
        assert!(is_plain(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(is_plain(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(is_plain(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"));
        assert!(is_plain(b"POST / HTTP/1.1\r\nHost: a\r\ncontent-length:  0 \r\n\r\n"));
        // Neither a length nor a transfer coding: a request without a body (RFC 9112 6.3).
        assert!(is_plain(b"DELETE /x HTTP/1.0\r\n\r\n"));
        assert!(is_plain(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"));

        assert!(!is_plain(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"));
        assert!(!is_plain(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n"));
        assert!(!is_plain(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 00\r\n\r\n"));
        assert!(!is_plain(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"));
        assert!(!is_plain(b"GET / HTTP/1.1\r\nHost: a\r\nTRANSFER-ENCODING: identity\r\n\r\n"));
        assert!(!is_plain(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nExpect: 100-continue\r\n\r\n"));
        assert!(!is_plain(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"));
    }
}
