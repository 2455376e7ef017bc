//! Plain requests (no body, no upgrade) proxied by us instead of by Pingora's proxy loop.
//!
//! Pingora's `proxy_1to1` runs the two halves of every request as two futures joined by
//! channels, and every upstream connection it releases to its pool spawns an idle-watch task on
//! a random thread that the next checkout wakes again. For a request without a body none of that
//! is needed: write the head, read the response head, copy the body until it ends. This module
//! does that on Pingora's own HTTP/1 client session (its parser, framing and keep-alive rules),
//! with a per-thread pool of idle upstream connections and no idle-watch task: a pooled
//! connection that the upstream closed meanwhile is found when it is used, and the request (it
//! has no body, so nothing was consumed) is sent again once on a new connection.
//!
//! Requests with a body still go through Pingora, whose duplex loop lets an upstream answer
//! before the body has been sent.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Version};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::http::v1::client::HttpSession as ClientSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::proxy::Session;
use pingora::ErrorType;
use tokio::net::TcpStream;

/// Idle connections kept per upstream address, per thread. An HTTP/1.1 upstream connection
/// carries one request at a time, so this is about the concurrency one thread keeps open to
/// one upstream without reconnecting (nginx's `keepalive 128` is the same idea per worker).
const MAX_IDLE_PER_ADDR: usize = 128;
/// Idle connections kept per thread, all addresses together.
const MAX_IDLE: usize = 1024;
/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(55);
/// How often a thread's pool drops connections that outlived `IDLE_TIMEOUT` (also those of
/// addresses no longer used, such as a moved runtime's).
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Informational (1xx) answers skipped before the final one; an upstream sending more is
/// broken or hostile.
const MAX_INFORMATIONAL: usize = 8;

/// An error of the upstream's (502/504 to the client, counted against the upstream).
pub(crate) fn up_err(etype: ErrorType, why: impl Into<String>) -> Box<Error> {
    let mut e = Error::explain(etype, why.into());
    e.esource = ErrorSource::Upstream;
    e
}

/// Connects to `addr` within `timeout`, with Nagle off (heads and small bodies go at once).
pub async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(up_err(ErrorType::ConnectRefused, format!("connecting to {addr}")))
        }
        Ok(Err(e)) => return Err(up_err(ErrorType::ConnectError, format!("connecting to {addr}: {e}"))),
        Err(_) => return Err(up_err(ErrorType::ConnectTimedout, format!("connecting to {addr}"))),
    };
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

struct Idle {
    stream: Stream,
    since: Instant,
}

/// One thread's idle upstream connections. Per thread, so checkout and release take no lock
/// and wake no other thread; a task that moved threads meanwhile just returns its connection
/// to the pool of the thread it is on.
#[derive(Default)]
struct Pool {
    by_addr: HashMap<SocketAddr, Vec<Idle>>,
    total: usize,
    swept: Option<Instant>,
}

impl Pool {
    /// The most recently used connection to `addr` that is not too old and still quiet.
    fn take(&mut self, addr: SocketAddr, now: Instant) -> Option<Stream> {
        self.sweep_due(now);
        let list = self.by_addr.get_mut(&addr)?;
        while let Some(mut idle) = list.pop() {
            self.total -= 1;
            if now.duration_since(idle.since) < IDLE_TIMEOUT && quiet(&mut idle.stream) {
                return Some(idle.stream);
            }
        }
        None
    }

    fn put(&mut self, addr: SocketAddr, stream: Stream, now: Instant) {
        self.sweep_due(now);
        if self.total >= MAX_IDLE {
            return; // dropped: closed
        }
        let list = self.by_addr.entry(addr).or_default();
        if list.len() >= MAX_IDLE_PER_ADDR {
            return;
        }
        list.push(Idle { stream, since: now });
        self.total += 1;
    }

    /// Drops expired connections every `SWEEP_EVERY`, whatever their address.
    fn sweep_due(&mut self, now: Instant) {
        if self.swept.is_some_and(|t| now.duration_since(t) < SWEEP_EVERY) {
            return;
        }
        self.swept = Some(now);
        let mut total = 0;
        self.by_addr.retain(|_, list| {
            // Oldest first: released in order.
            let fresh = list.iter().position(|i| now.duration_since(i.since) < IDLE_TIMEOUT).unwrap_or(list.len());
            list.drain(..fresh);
            total += list.len();
            !list.is_empty()
        });
        self.total = total;
    }
}

/// An idle connection has nothing to read: no close, no error, and no stray bytes. Bytes that
/// came after the last response (a broken or hostile upstream's) would otherwise be read as the
/// next request's response, which may be another user's. Pingora's pool watches each idle
/// connection with a task for this; one non-blocking read at checkout does the same here.
fn quiet(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    std::pin::Pin::new(&mut **stream).poll_read(&mut cx, &mut buf).is_pending()
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

fn checkout(addr: SocketAddr) -> Option<Stream> {
    POOL.with(|p| p.borrow_mut().take(addr, Instant::now()))
}

fn release(addr: SocketAddr, stream: Stream) {
    POOL.with(|p| p.borrow_mut().put(addr, stream, Instant::now()));
}

/// Where and how long to wait.
pub struct Target {
    pub addr: SocketAddr,
    pub connect_timeout: Duration,
    /// Longest silence between upstream bytes (`None`: no limit).
    pub idle_timeout: Option<Duration>,
}

/// What ended a wait for the upstream on the client's side: it closed, or sent more than its
/// request.
fn client_gone(r: Result<Option<Bytes>>) -> Box<Error> {
    match r {
        Err(e) => e.into_down(),
        Ok(_) => {
            Error::explain(ErrorType::ConnectionClosed, "client sent data while waiting for the response").into_down()
        }
    }
}

/// A failure on a reused connection that the upstream may have closed as we sent: worth one
/// more try on a new connection, for a method that may be repeated (RFC 9110 9.2.2; Pingora
/// does not retry others either).
fn retriable(e: &Error, method: &Method) -> bool {
    e.esource() == &ErrorSource::Upstream
        && matches!(e.etype(), ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError)
        && method.is_idempotent()
}

/// Sends `req` (already rewritten for the upstream; the client sent no body) to `target` and
/// relays the response, passing its head through `filter` first. Errors before the response
/// head was written to the client are for the caller to answer (502/504).
pub async fn forward(
    session: &mut Session,
    req: RequestHeader,
    target: &Target,
    filter: impl FnOnce(&mut ResponseHeader) -> Result<()>,
) -> Result<()> {
    if let Some(stream) = checkout(target.addr) {
        match open(session, stream, req.clone(), target).await {
            Ok(up) => return relay(session, up, target, filter).await,
            // The upstream may have closed it as we sent: once more on a new connection, for a
            // request that may be repeated. A request is sent at most twice.
            Err(e) if retriable(&e, &req.method) => {
                tracing::debug!(addr = %target.addr, "pooled upstream connection was closed; retrying on a new one");
            }
            Err(e) => return Err(e),
        }
    }
    let stream = Box::new(L4Stream::from(connect_tcp(target.addr, target.connect_timeout).await?));
    let up = open(session, stream, req, target).await?;
    relay(session, up, target, filter).await
}

/// A client session on `stream` that has sent `req` and read the response head.
async fn open(session: &mut Session, stream: Stream, req: RequestHeader, target: &Target) -> Result<ClientSession> {
    let mut up = ClientSession::new(stream);
    up.read_timeout = target.idle_timeout;
    up.write_timeout = target.idle_timeout;
    send_and_read_head(session, &mut up, req).await?;
    Ok(up)
}

/// Relays the response whose head `up` has read, then pools the connection if it may be reused.
async fn relay(
    session: &mut Session,
    mut up: ClientSession,
    target: &Target,
    filter: impl FnOnce(&mut ResponseHeader) -> Result<()>,
) -> Result<()> {
    up.respect_keepalive();
    let mut resp = match up.resp_header() {
        Some(h) => h.clone(),
        None => return Err(up_err(ErrorType::InvalidHTTPHeader, "no response head")),
    };
    let mut done = up.is_body_done();
    if session.as_http1().is_some() {
        // A proxy sends its own HTTP version (RFC 9110 6.2): an HTTP/1.0 upstream's answer
        // must not end the client's keep-alive connection.
        resp.set_version(Version::HTTP_11);
        let no_body = session.req_header().method == Method::HEAD || matches!(resp.status.as_u16(), 204 | 304);
        if !done
            && !no_body
            && !resp.headers.contains_key(header::TRANSFER_ENCODING)
            && !resp.headers.contains_key(header::CONTENT_LENGTH)
        {
            // An upstream that ends its body by closing: chunk it, so the client's connection
            // can stay open.
            resp.insert_header(header::TRANSFER_ENCODING, "chunked")?;
        }
    }
    filter(&mut resp)?;
    session.write_response_header(Box::new(resp), done).await.map_err(|e| e.into_down())?;
    while !done {
        let chunk = tokio::select! {
            biased;
            r = up.read_body_bytes() => r.map_err(|e| e.into_up())?,
            r = session.read_body_or_idle(true) => return Err(client_gone(r)),
        };
        done = chunk.is_none() || up.is_body_done();
        session.write_response_body(chunk, done).await.map_err(|e| e.into_down())?;
    }
    if let Some(stream) = up.reuse().await {
        release(target.addr, stream);
    }
    Ok(())
}

/// Writes the request head and waits for the response head (informational ones skipped), or
/// for the client to go away.
async fn send_and_read_head(session: &mut Session, up: &mut ClientSession, req: RequestHeader) -> Result<()> {
    up.write_request_header(Box::new(req)).await.map_err(|e| e.into_up())?;
    for _ in 0..MAX_INFORMATIONAL {
        tokio::select! {
            biased;
            r = up.read_response() => { r.map_err(|e| e.into_up())?; }
            r = session.read_body_or_idle(true) => return Err(client_gone(r)),
        }
        match up.resp_header().map(|h| h.status.as_u16()) {
            // A plain request asked for no protocol switch.
            Some(101) => return Err(up_err(ErrorType::InvalidHTTPHeader, "101 answer to a request without Upgrade")),
            // 100 Continue, 103 Early Hints: not relayed.
            Some(s) if (100..200).contains(&s) => continue,
            _ => return Ok(()),
        }
    }
    Err(up_err(ErrorType::InvalidHTTPHeader, "too many informational responses"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A loopback connection as the pool holds it, and its far end.
    async fn pair() -> (Stream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let near = TcpStream::connect(l.local_addr().expect("addr")).await.expect("connect");
        let (far, _) = l.accept().await.expect("accept");
        (Box::new(L4Stream::from(near)), far)
    }

    #[tokio::test]
    async fn pool_returns_the_newest_and_drops_the_expired() {
        let a: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:2".parse().expect("addr");
        let (s1, _f1) = pair().await;
        let (s2, _f2) = pair().await;
        let (s3, _f3) = pair().await;
        let (s4, _f4) = pair().await;
        let t0 = Instant::now();
        let mut p = Pool::default();
        p.put(a, s1, t0);
        p.put(a, s2, t0 + Duration::from_secs(1));
        p.put(b, s3, t0);
        assert_eq!(p.total, 3);
        assert!(p.take(a, t0 + Duration::from_secs(2)).is_some());
        // The one left for `a` is older than the idle timeout by then, and the sweep that
        // checkout runs every SWEEP_EVERY drops `b`'s (expired too) with it.
        assert!(p.take(a, t0 + IDLE_TIMEOUT + Duration::from_secs(1)).is_none());
        assert_eq!(p.total, 0);
        assert!(!p.by_addr.contains_key(&b));
        p.put(a, s4, t0 + IDLE_TIMEOUT + SWEEP_EVERY);
        assert_eq!(p.total, 1);
    }

    #[tokio::test]
    async fn a_connection_closed_or_sending_while_idle_is_not_reused() {
        let a: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let t0 = Instant::now();
        let mut p = Pool::default();
        let (quiet_one, _keep) = pair().await;
        let (closed, far_closed) = pair().await;
        let (chatty, mut far_chatty) = pair().await;
        p.put(a, quiet_one, t0);
        p.put(a, closed, t0);
        p.put(a, chatty, t0);
        drop(far_closed);
        far_chatty.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Newest first: the chatty one and the closed one are dropped, the quiet one is taken.
        assert!(p.take(a, t0).is_some());
        assert_eq!(p.total, 0);
        assert!(p.take(a, t0).is_none());
    }

    #[tokio::test]
    async fn pool_is_bounded_per_address() {
        let a: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let t0 = Instant::now();
        let mut p = Pool::default();
        let mut far = Vec::new();
        for _ in 0..MAX_IDLE_PER_ADDR + 5 {
            let (s, f) = pair().await;
            far.push(f);
            p.put(a, s, t0);
        }
        assert_eq!(p.total, MAX_IDLE_PER_ADDR);
    }
}
