//! Plain requests (no body, no upgrade) proxied by us instead of by Pingora's proxy loop.
//!
//! Pingora's `proxy_1to1` runs the two halves of every request as two futures joined by
//! channels, and every upstream connection it releases to its pool spawns an idle-watch task on
//! a random thread that the next checkout wakes again. For a request without a body none of that
//! is needed: write the head, read the response head, copy the body until it ends. This module
//! does that with the head the gateway writes ([`crate::forwarded::UpstreamHead::to_wire`]) and
//! our own response reader ([`crate::h1`]:
//! `httparse`, RFC 9112 framing and keep-alive rules; Pingora's client session measured a
//! request-head copy, a response-head copy and its bookkeeping on every request), with a
//! per-thread pool of idle upstream connections and no idle-watch task: a pooled
//! connection that the upstream closed meanwhile is found when it is used, and the request (it
//! has no body, so nothing was consumed) is sent again once on a new connection.
//!
//! Requests with a body still go through Pingora, whose duplex loop lets an upstream answer
//! before the body has been sent.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, Method, Version};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::proxy::Session;
use pingora::ErrorType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::h1;

/// Idle connections kept per upstream address, per thread. An HTTP/1.1 upstream connection
/// carries one request at a time, so this is about the concurrency one thread keeps open to
/// one upstream without reconnecting (nginx's `keepalive 128` is the same idea per worker).
const MAX_IDLE_PER_ADDR: usize = 128;
/// Idle connections kept per thread, all addresses together.
const MAX_IDLE: usize = 1024;
/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(55);
/// An upstream's own keep-alive timeout is trusted for this much less (the request must reach
/// it before it closes).
const KEEPALIVE_MARGIN: Duration = Duration::from_secs(1);
/// How often a thread's pool drops connections past their expiry (also those of addresses no
/// longer used, such as a moved runtime's).
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
    /// Not reused from then on: `IDLE_TIMEOUT`, or sooner when the upstream said so.
    expires: Instant,
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
            if now < idle.expires && quiet(&mut idle.stream) {
                return Some(idle.stream);
            }
        }
        None
    }

    /// Keeps `stream` until `expires` (at most `IDLE_TIMEOUT` from now).
    fn put(&mut self, addr: SocketAddr, stream: Stream, now: Instant, expires: Instant) {
        self.sweep_due(now);
        let expires = expires.min(now + IDLE_TIMEOUT);
        if expires <= now {
            return;
        }
        if self.total >= MAX_IDLE {
            return; // dropped: closed
        }
        let list = self.by_addr.entry(addr).or_default();
        if list.len() >= MAX_IDLE_PER_ADDR {
            return;
        }
        list.push(Idle { stream, expires });
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
            list.retain(|i| now < i.expires);
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

fn release(addr: SocketAddr, stream: Stream, expires: Instant) {
    POOL.with(|p| p.borrow_mut().put(addr, stream, Instant::now(), expires));
}

/// How long after its answer began a connection may be reused: `None` if the upstream may close
/// it too soon to be worth keeping. An upstream that says `Keep-Alive: timeout=N` closes an
/// idle connection N seconds after it wrote its answer; a request sent on it just then fails,
/// and only a repeatable one is sent again (a `POST` would get a 502). So it is reused for at
/// most N - 1 seconds, counted from when its answer's head arrived (the last moment known to
/// come before the upstream's clock started: a slow client can hold the body for longer).
fn pool_time(resp: &ResponseHeader) -> Option<Duration> {
    match h1::keepalive_timeout(resp) {
        None => Some(IDLE_TIMEOUT),
        Some(t) => Some(t.saturating_sub(KEEPALIVE_MARGIN)).filter(|t| !t.is_zero()),
    }
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

/// Reads into the buffer from this size on (a response head, or a body of unknown length).
const READ_CHUNK: usize = 16 * 1024;
/// At most this much of a body is read (and so held) at once, as Pingora's client.
const BODY_CHUNK: usize = 64 * 1024;

/// An upstream connection with the bytes read from it that are not used yet.
struct Conn {
    stream: Stream,
    buf: BytesMut,
    idle_timeout: Option<Duration>,
}

impl Conn {
    /// One read of at most about `want` bytes into the buffer; 0 when the upstream closed.
    async fn read_more(&mut self, want: usize) -> Result<usize> {
        if self.buf.capacity() - self.buf.len() < want.min(READ_CHUNK) {
            self.buf.reserve(want.clamp(1, BODY_CHUNK));
        }
        let read = self.stream.read_buf(&mut self.buf);
        let r = match self.idle_timeout {
            Some(t) => timeout(t, read)
                .await
                .map_err(|_| up_err(ErrorType::ReadTimedout, "waiting for the upstream's response"))?,
            None => read.await,
        };
        r.map_err(|e| up_err(ErrorType::ReadError, format!("reading the upstream's response: {e}")))
    }

    async fn send(&mut self, wire: &[u8]) -> Result<()> {
        let write = async {
            self.stream.write_all(wire).await?;
            self.stream.flush().await
        };
        let r = match self.idle_timeout {
            Some(t) => {
                timeout(t, write).await.map_err(|_| up_err(ErrorType::WriteTimedout, "sending the request upstream"))?
            }
            None => write.await,
        };
        r.map_err(|e| up_err(ErrorType::WriteError, format!("sending the request upstream: {e}")))
    }
}

/// A response whose head has been read.
struct Answer {
    conn: Conn,
    header: ResponseHeader,
    framing: h1::Framing,
    /// When the head was parsed: the pool's expiry counts from here.
    at: Instant,
}

/// Why an exchange failed, and whether the request may go again on a new connection: only a
/// reused connection that failed before any byte of the answer came (the upstream closed it as
/// we sent), for a method that may be repeated (RFC 9110 9.2.2; Pingora does not retry others
/// either).
struct Failed {
    error: Box<Error>,
    retry: bool,
}

impl Failed {
    fn fatal(error: Box<Error>) -> Failed {
        Failed { error, retry: false }
    }
}

/// Sends `wire` (the request head as the upstream gets it; the client sent no body) to
/// `target` and relays the response, passing its head through `filter` first. Errors before
/// the response head was written to the client are for the caller to answer (502/504).
///
/// No copy of the request is kept for a retry but its bytes, and the response head is built
/// once.
pub async fn forward(
    session: &mut Session,
    wire: &[u8],
    target: &Target,
    filter: impl FnOnce(&mut ResponseHeader) -> Result<()>,
) -> Result<()> {
    let method = &session.req_header().method;
    let (head_request, idempotent) = (*method == Method::HEAD, method.is_idempotent());
    if let Some(stream) = checkout(target.addr) {
        match exchange(session, stream, wire, target, head_request, true).await {
            Ok(answer) => return relay(session, answer, target, filter).await,
            Err(Failed { error, retry: true }) if idempotent => {
                tracing::debug!(addr = %target.addr, "pooled upstream connection was closed ({error}); retrying on a new one");
            }
            Err(f) => return Err(f.error),
        }
    }
    let stream = Box::new(L4Stream::from(connect_tcp(target.addr, target.connect_timeout).await?));
    let answer = exchange(session, stream, wire, target, head_request, false).await.map_err(|f| f.error)?;
    relay(session, answer, target, filter).await
}

/// Writes the request on `stream` and waits for the final response head (informational ones
/// skipped), or for the client to go away.
async fn exchange(
    session: &mut Session,
    stream: Stream,
    wire: &[u8],
    target: &Target,
    head_request: bool,
    reused: bool,
) -> std::result::Result<Answer, Failed> {
    let mut conn = Conn { stream, buf: BytesMut::new(), idle_timeout: target.idle_timeout };
    // Before any byte of the answer: the upstream may have closed a reused connection as we
    // sent.
    let early = |error: Box<Error>| {
        let retry = reused
            && matches!(error.etype(), ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError);
        Failed { error, retry }
    };
    conn.send(wire).await.map_err(early)?;
    let mut informational = 0;
    let mut scan = h1::HeadScan::default();
    loop {
        if let Some(head) = scan.head(&conn.buf, h1::MAX_HEAD).map_err(Failed::fatal)? {
            conn.buf.advance(head.len);
            let mut header = head.header;
            match header.status.as_u16() {
                // A plain request asked for no protocol switch.
                101 => {
                    return Err(Failed::fatal(up_err(
                        ErrorType::InvalidHTTPHeader,
                        "101 answer to a request without Upgrade",
                    )))
                }
                // 100 Continue, 103 Early Hints: not relayed. A 1xx ends at its head.
                100..=199 => {
                    informational += 1;
                    if informational > MAX_INFORMATIONAL {
                        return Err(Failed::fatal(up_err(
                            ErrorType::InvalidHTTPHeader,
                            "too many informational responses",
                        )));
                    }
                    continue;
                }
                _ => {}
            }
            let framing = h1::framing(&mut header, head_request).map_err(Failed::fatal)?;
            return Ok(Answer { conn, header, framing, at: Instant::now() });
        }
        let nothing_yet = conn.buf.is_empty() && informational == 0;
        let read = tokio::select! {
            biased;
            r = conn.read_more(READ_CHUNK) => r,
            r = session.read_body_or_idle(true) => return Err(Failed::fatal(client_gone(r))),
        };
        match read {
            Ok(0) => {
                let error = up_err(ErrorType::ConnectionClosed, "upstream closed before its response head");
                return Err(if nothing_yet { early(error) } else { Failed::fatal(error) });
            }
            Ok(_) => {}
            Err(error) if nothing_yet => return Err(early(error)),
            Err(error) => return Err(Failed::fatal(error)),
        }
    }
}

/// How an HTTP/1 client gets a body whose length the answer does not give (no
/// `Content-Length`; its framing is chunked, or ends with the upstream's close). To HTTP/1.1:
/// chunked, so that its connection can stay open. To HTTP/1.0, which cannot read a transfer
/// coding (RFC 9112 6.1): as it is, ended by closing the connection. Only the chunked coding,
/// which the body was read by, can be taken off; a body in another one cannot reach an
/// HTTP/1.0 client (502). Pingora's server side frames the client's body from these headers.
pub(crate) fn frame_for_client(session: &mut Session, resp: &mut ResponseHeader) -> Result<()> {
    if session.as_http1().is_none() {
        return Ok(());
    }
    let te = header::TRANSFER_ENCODING;
    let status = resp.status.as_u16();
    let bodiless = status < 200 || status == 204 || status == 304 || session.req_header().method == Method::HEAD;
    let http11 = session.req_header().version >= Version::HTTP_11;
    // Whether the last transfer coding is chunked, as we read it (empty elements skipped, RFC
    // 9110 5.6.1); `None`: no `Transfer-Encoding`.
    let last_chunked = h1::tokens(resp, &te).last().map(|t| t.eq_ignore_ascii_case(b"chunked"));
    if let Some(chunked) = last_chunked {
        // Pingora's sides take the last element of the last line as it stands (`chunked,` is
        // not chunked to them). Our own loop hands on one clean line; an answer read by
        // Pingora's loop where the two disagree would be read one way and framed the other.
        let literal = resp.headers.get_all(&te).iter().next_back().is_some_and(|v| {
            let last = v.as_bytes().rsplit(|&b| b == b',').next().unwrap_or_default();
            last.trim_ascii().eq_ignore_ascii_case(b"chunked")
        });
        if literal != chunked {
            return Err(up_err(ErrorType::InvalidHTTPHeader, "an ambiguous Transfer-Encoding in the response"));
        }
        if bodiless && !http11 && status >= 200 {
            resp.remove_header(&te);
        }
    }
    if bodiless || resp.headers.contains_key(header::CONTENT_LENGTH) {
        return Ok(());
    }
    match (http11, last_chunked) {
        (true, Some(true)) => {}
        (true, None) => {
            resp.insert_header(te, "chunked")?;
        }
        // Another coding, read to the close: chunked on top of it.
        (true, Some(false)) => {
            let codings: Vec<String> = h1::tokens(resp, &te).map(|t| String::from_utf8_lossy(t).into_owned()).collect();
            resp.insert_header(te, format!("{}, chunked", codings.join(", ")))?;
        }
        (false, _) => {
            if h1::tokens(resp, &te).any(|t| !t.eq_ignore_ascii_case(b"chunked")) {
                return Err(up_err(
                    ErrorType::InvalidHTTPHeader,
                    "a transfer coding other than chunked cannot be relayed to an HTTP/1.0 client",
                ));
            }
            resp.remove_header(&te);
            session.set_keepalive(None);
        }
    }
    Ok(())
}

/// Relays the response whose head has been read, then pools the connection if it may be
/// reused.
async fn relay(
    session: &mut Session,
    answer: Answer,
    target: &Target,
    filter: impl FnOnce(&mut ResponseHeader) -> Result<()>,
) -> Result<()> {
    let Answer { mut conn, header: mut resp, framing, at } = answer;
    let expires = if h1::keepalive(&resp, framing) { pool_time(&resp).map(|keep| at + keep) } else { None };
    let mut body = h1::Body::new(framing);
    if session.as_http1().is_some() {
        // A proxy sends its own HTTP version (RFC 9110 6.2): an HTTP/1.0 upstream's answer
        // must not end the client's keep-alive connection.
        resp.set_version(Version::HTTP_11);
    }
    filter(&mut resp)?;
    frame_for_client(session, &mut resp)?;
    let mut done = body.is_done();
    session.write_response_header(Box::new(resp), done).await.map_err(|e| e.into_down())?;
    while !done {
        match body.next(&mut conn.buf)? {
            h1::Step::Data(data) => {
                done = body.is_done();
                session.write_response_body(Some(data), done).await.map_err(|e| e.into_down())?;
            }
            h1::Step::Done => {
                done = true;
                session.write_response_body(None, true).await.map_err(|e| e.into_down())?;
            }
            h1::Step::More => {
                let n = tokio::select! {
                    biased;
                    r = conn.read_more(body.want(BODY_CHUNK)) => r?,
                    r = session.read_body_or_idle(true) => return Err(client_gone(r)),
                };
                if n == 0 {
                    body.closed()?;
                    done = true;
                    session.write_response_body(None, true).await.map_err(|e| e.into_down())?;
                }
            }
        }
    }
    // Bytes past the response are a broken or hostile upstream's: never read as the next
    // request's answer.
    if let (Some(expires), true) = (expires, conn.buf.is_empty()) {
        release(target.addr, conn.stream, expires);
    }
    Ok(())
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
        p.put(a, s1, t0, t0 + IDLE_TIMEOUT);
        p.put(a, s2, t0 + Duration::from_secs(1), t0 + Duration::from_secs(1) + IDLE_TIMEOUT);
        p.put(b, s3, t0, t0 + IDLE_TIMEOUT);
        assert_eq!(p.total, 3);
        assert!(p.take(a, t0 + Duration::from_secs(2)).is_some());
        // The one left for `a` is older than the idle timeout by then, and the sweep that
        // checkout runs every SWEEP_EVERY drops `b`'s (expired too) with it.
        assert!(p.take(a, t0 + IDLE_TIMEOUT + Duration::from_secs(1)).is_none());
        assert_eq!(p.total, 0);
        assert!(!p.by_addr.contains_key(&b));
        p.put(a, s4, t0 + IDLE_TIMEOUT + SWEEP_EVERY, t0 + 2 * IDLE_TIMEOUT + SWEEP_EVERY);
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
        p.put(a, quiet_one, t0, t0 + IDLE_TIMEOUT);
        p.put(a, closed, t0, t0 + IDLE_TIMEOUT);
        p.put(a, chatty, t0, t0 + IDLE_TIMEOUT);
        drop(far_closed);
        far_chatty.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Newest first: the chatty one and the closed one are dropped, the quiet one is taken.
        assert!(p.take(a, t0).is_some());
        assert_eq!(p.total, 0);
        assert!(p.take(a, t0).is_none());
    }

    #[tokio::test]
    async fn pool_keeps_a_connection_until_its_expiry_and_never_past_the_idle_timeout() {
        let a: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let t0 = Instant::now();
        let mut p = Pool::default();
        let (past, _f1) = pair().await;
        p.put(a, past, t0, t0);
        assert_eq!(p.total, 0, "already expired: not kept");
        let (short, _f2) = pair().await;
        p.put(a, short, t0, t0 + Duration::from_secs(3));
        assert!(p.take(a, t0 + Duration::from_secs(4)).is_none(), "kept past the upstream's own timeout");
        let (long, _f3) = pair().await;
        p.put(a, long, t0, t0 + 10 * IDLE_TIMEOUT);
        assert!(p.take(a, t0 + IDLE_TIMEOUT).is_none(), "kept past IDLE_TIMEOUT");
        let (fresh, _f4) = pair().await;
        p.put(a, fresh, t0, t0 + Duration::from_secs(3));
        assert!(p.take(a, t0 + Duration::from_secs(2)).is_some());
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
            p.put(a, s, t0, t0 + IDLE_TIMEOUT);
        }
        assert_eq!(p.total, MAX_IDLE_PER_ADDR);
    }
}
