//! Per-connection defences of the edge listener: a whole-header deadline and the connection
//! limits (per client address and in all).
//!
//! Pingora's header read timeout applies to each read, so a client that trickles one byte every
//! few seconds keeps its connection (and its buffers) forever. [`EdgeStream`] wraps the accepted
//! stream and, while it is armed, bounds the time to the end of the request header: from the
//! arming (the idle time before a request) and again from the first byte of the header. When the
//! deadline passes it answers 408 where it still can, and fails the read, so Pingora drops the
//! connection. The stream also holds the connection's slot in [`ConnLimits`], given back when
//! the connection is dropped, whatever path it took.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream, TimingDigest,
    UniqueID, UniqueIDType, ALPN,
};
use prometheus::IntCounterVec;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What a client gets when its header is not complete in time. `Connection: close`: the
/// connection is dropped right after.
const RESPONSE_408: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nContent-Length: 20\r\nConnection: close\r\n\r\n408 request timeout\n";

const SHARDS: usize = 16;

/// Counts open client connections, per address and in all. Limits can change at a reload.
pub struct ConnLimits {
    per_ip: AtomicUsize,
    total_limit: AtomicUsize,
    total: AtomicUsize,
    /// Sharded so that accepts on different threads rarely meet on one lock (taken once per
    /// connection, never per request).
    shards: [Mutex<HashMap<IpAddr, u32>>; SHARDS],
    refused: IntCounterVec,
}

impl fmt::Debug for ConnLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnLimits(open {})", self.total.load(Ordering::Relaxed))
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    PerIp,
    Total,
}

impl ConnLimits {
    pub fn new(per_ip: usize, total: usize, registry: &prometheus::Registry) -> Arc<ConnLimits> {
        let refused = IntCounterVec::new(
            prometheus::Opts::new(
                "markco_connections_refused_total",
                "Client connections closed at accept because a limit was reached, by limit (per_ip or total)",
            ),
            &["limit"],
        )
        .expect("static metric definition");
        // A second registration (tests build several) is harmless: the counter still counts.
        let _ = registry.register(Box::new(refused.clone()));
        Arc::new(ConnLimits {
            per_ip: AtomicUsize::new(per_ip),
            total_limit: AtomicUsize::new(total),
            total: AtomicUsize::new(0),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            refused,
        })
    }

    /// New limits, applied to connections accepted from now on.
    pub fn set_limits(&self, per_ip: usize, total: usize) {
        self.per_ip.store(per_ip, Ordering::Relaxed);
        self.total_limit.store(total, Ordering::Relaxed);
    }

    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, u32>> {
        let i = match ip {
            IpAddr::V4(v) => v.octets()[3] as usize,
            IpAddr::V6(v) => v.octets()[15] as usize,
        };
        &self.shards[i % SHARDS]
    }

    /// Takes a slot for a connection from `ip`, or says which limit is reached.
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<ConnSlot, Refused> {
        let total = self.total.fetch_add(1, Ordering::AcqRel);
        if total >= self.total_limit.load(Ordering::Relaxed) {
            self.total.fetch_sub(1, Ordering::AcqRel);
            self.refused.with_label_values(&["total"]).inc();
            return Err(Refused::Total);
        }
        if let Some(ip) = ip {
            let per_ip = self.per_ip.load(Ordering::Relaxed);
            // A poisoned shard only means another connection panicked while counting; the map
            // itself is still consistent (each update is one insert or remove).
            let mut map = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
            let n = map.entry(ip).or_insert(0);
            if *n as usize >= per_ip {
                drop(map);
                self.total.fetch_sub(1, Ordering::AcqRel);
                self.refused.with_label_values(&["per_ip"]).inc();
                return Err(Refused::PerIp);
            }
            *n += 1;
        }
        Ok(ConnSlot { limits: self.clone(), ip })
    }

    fn release(&self, ip: Option<IpAddr>) {
        if let Some(ip) = ip {
            let mut map = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = map.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
        self.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One admitted connection; gives its slot back when dropped.
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    ip: Option<IpAddr>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.limits.release(self.ip);
    }
}

/// The default for `max_connections`: what the open-file limit allows, keeping half of it for
/// upstream connections and some for the listeners, the database and the container engine.
pub fn default_max_connections() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass and has no other effect.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    let nofile = if ok { usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX) } else { 1024 };
    (nofile / 2).saturating_sub(256).max(64)
}

/// Finds the end of a request header across reads: a line feed that ends an empty line (a bare
/// `\n\n` counts, as httparse accepts it). Empty lines before the request line are skipped, as
/// RFC 9112 2.2 allows, so they cannot end the clock early.
#[derive(Debug, Default, Clone, Copy)]
struct HeaderEnd {
    seen_content: bool,
    at_line_start: bool,
}

impl HeaderEnd {
    /// Feeds bytes; true once the header is complete.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            match b {
                b'\n' => {
                    if self.seen_content && self.at_line_start {
                        return true;
                    }
                    self.at_line_start = true;
                }
                b'\r' => {}
                _ => {
                    self.seen_content = true;
                    self.at_line_start = false;
                }
            }
        }
        false
    }
}

struct Clock {
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    /// At least one byte of this header has arrived.
    started: bool,
    end: HeaderEnd,
    /// No request has been served on this connection yet (a 408 is still welcome).
    first: bool,
}

/// The accepted client stream with the header deadline and the connection slot.
pub struct EdgeStream {
    inner: Stream,
    clock: Option<Clock>,
    served: bool,
    _slot: Option<ConnSlot>,
    timeouts: Option<prometheus::IntCounter>,
    /// Bytes read and written, when someone asked ([`EdgeStream::count_bytes`]).
    moved: Option<Arc<AtomicU64>>,
}

impl fmt::Debug for EdgeStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EdgeStream").field("inner", &self.inner).finish()
    }
}

impl EdgeStream {
    pub fn new(inner: Stream, slot: Option<ConnSlot>, timeouts: Option<prometheus::IntCounter>) -> EdgeStream {
        EdgeStream { inner, clock: None, served: false, _slot: slot, timeouts, moved: None }
    }

    /// From now on, counts the bytes read and written in the returned counter (an HTTP/2
    /// connection's loop, whose streams write through the h2 codec, uses it to tell a quiet
    /// connection from one still sending an answer).
    pub fn count_bytes(&mut self) -> Arc<AtomicU64> {
        self.moved.get_or_insert_with(|| Arc::new(AtomicU64::new(0))).clone()
    }

    fn count(&self, n: usize) {
        if let Some(m) = &self.moved {
            m.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Starts the clock for the next request header: it must begin within `timeout` and, once
    /// begun, be complete within `timeout` of its first byte.
    pub fn arm(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let first = !self.served;
        self.served = true;
        match &mut self.clock {
            Some(c) => {
                c.timeout = timeout;
                c.sleep.as_mut().reset(deadline);
                c.started = false;
                c.end = HeaderEnd::default();
                c.first = first;
            }
            None => {
                self.clock = Some(Clock {
                    timeout,
                    sleep: Box::pin(tokio::time::sleep_until(deadline)),
                    started: false,
                    end: HeaderEnd::default(),
                    first,
                })
            }
        }
    }

    /// True while a header is being waited for: the edge loop parses a head once this is false.
    pub fn armed(&self) -> bool {
        self.clock.is_some()
    }

    /// The deadline passed: a 408 where it can still be written (a header had begun, or no
    /// request was served yet; an idle kept-alive connection is closed silently, since its
    /// client may be sending a new request at this very moment and would take the 408 as its
    /// answer), then an error that makes Pingora drop the connection.
    fn expire(&mut self, cx: &mut Context<'_>) -> io::Error {
        let answer = self.clock.as_ref().is_some_and(|c| c.started || c.first);
        self.clock = None;
        if let Some(t) = &self.timeouts {
            t.inc();
        }
        if answer {
            // Best effort, without waiting: a socket with room in its send buffer takes it now.
            if let Poll::Ready(Ok(n)) = Pin::new(&mut *self.inner).poll_write(cx, RESPONSE_408) {
                if n == RESPONSE_408.len() {
                    let _ = Pin::new(&mut *self.inner).poll_flush(cx);
                }
            }
        }
        io::Error::new(io::ErrorKind::TimedOut, "the request header was not complete in time")
    }
}

impl AsyncRead for EdgeStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(clock) = this.clock.as_mut() else {
            if this.moved.is_none() {
                return Pin::new(&mut *this.inner).poll_read(cx, buf);
            }
            let before = buf.filled().len();
            let read = Pin::new(&mut *this.inner).poll_read(cx, buf);
            this.count(buf.filled().len().saturating_sub(before));
            return read;
        };
        if clock.sleep.is_elapsed() {
            return Poll::Ready(Err(this.expire(cx)));
        }
        let before = buf.filled().len();
        match Pin::new(&mut *this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = buf.filled().get(before..).unwrap_or_default();
                if new.is_empty() {
                    return Poll::Ready(Ok(())); // end of stream
                }
                if !clock.started {
                    clock.started = true;
                    let deadline = Instant::now() + clock.timeout;
                    clock.sleep.as_mut().reset(deadline);
                }
                if clock.end.feed(new) {
                    // The header is complete: the body and the response run on their own
                    // (idle) timeouts.
                    this.clock = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match clock.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(this.expire(cx))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for EdgeStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut *this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            this.count(n);
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut *this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            this.count(n);
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for EdgeStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for EdgeStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for EdgeStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for EdgeStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for EdgeStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for EdgeStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for EdgeStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// The client's address, from the stream's socket digest.
pub fn peer_ip(stream: &Stream) -> Option<IpAddr> {
    stream.get_socket_digest().and_then(|d| d.peer_addr().cloned()).and_then(|a| match a {
        SocketAddr::Inet(a) => Some(a.ip()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_end_across_reads() {
        let mut h = HeaderEnd::default();
        assert!(!h.feed(b"GET / HTTP/1.1\r\nHost: a\r"));
        assert!(!h.feed(b"\n"));
        assert!(!h.feed(b"\r"));
        assert!(h.feed(b"\n"));
        let mut h = HeaderEnd::default();
        assert!(h.feed(b"GET / HTTP/1.1\nHost: a\n\n"));
    }

    #[test]
    fn leading_empty_lines_do_not_end_the_header() {
        let mut h = HeaderEnd::default();
        assert!(!h.feed(b"\r\n\r\n\r\n"));
        assert!(!h.feed(b"GET / HTTP/1.1\r\n"));
        assert!(h.feed(b"\r\n"));
    }

    #[test]
    fn limits_per_ip_and_total() {
        let reg = prometheus::Registry::new();
        let l = ConnLimits::new(2, 3, &reg);
        let a: IpAddr = "127.0.0.2".parse().expect("ip");
        let b: IpAddr = "127.0.0.3".parse().expect("ip");
        let s1 = l.admit(Some(a)).expect("first");
        let _s2 = l.admit(Some(a)).expect("second");
        assert_eq!(l.admit(Some(a)).err(), Some(Refused::PerIp));
        let _s3 = l.admit(Some(b)).expect("other client");
        assert_eq!(l.admit(Some(b)).err(), Some(Refused::Total));
        drop(s1);
        assert_eq!(l.open(), 2);
        let _s4 = l.admit(Some(a)).expect("slot given back");
    }
}
