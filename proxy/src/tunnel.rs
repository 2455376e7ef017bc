//! Upgraded connections (websockets), relayed by us rather than by Pingora's HTTP/1 proxy loop.
//!
//! Pingora 0.9's loop can end a tunnel right after the 101 when the end of the (empty)
//! pre-upgrade request body is processed after the upstream's 101 (a scheduling race that shows
//! under load; cloudflare/pingora#946). A tunnel is simple enough to own: connect, send the
//! rewritten request, read the response head, answer the client, then copy bytes both ways until
//! either side closes or the idle timeout passes. The tunnel holds its own socket, so no route
//! swap can touch it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::proxy::Session;
use pingora::ErrorType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::drain::Drain;
use crate::forwarded;
use crate::pump;
use crate::upstream::up_err;

const MAX_HEAD: usize = 64 * 1024;
/// A refused upgrade's body is relayed up to this size (they are short error pages).
const MAX_REFUSAL_BODY: usize = 1024 * 1024;

/// How a tunnel ended, for the caller's metrics and logs.
pub struct Outcome {
    pub status: u16,
    pub upgraded: bool,
}

fn head_bytes(req: &RequestHeader) -> Vec<u8> {
    let pq = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(format!("{} {pq} HTTP/1.1\r\n", req.method).as_bytes());
    for (k, v) in req.headers.iter() {
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Reads the upstream's response head. Returns it and any bytes read past it.
async fn read_head(up: &mut TcpStream, timeout: Duration) -> Result<(ResponseHeader, Vec<u8>, Option<usize>, bool)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, up.read(&mut chunk)).await {
            Ok(Ok(0)) => {
                return Err(up_err(ErrorType::ConnectionClosed, "upstream closed before answering the upgrade"))
            }
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(up_err(ErrorType::ReadError, format!("reading the upgrade answer: {e}"))),
            Err(_) => return Err(up_err(ErrorType::ReadTimedout, "no answer to the upgrade request")),
        };
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        match parse_head(&buf) {
            Ok(Some(head)) => {
                let rest = buf.split_off(head.len.min(buf.len()));
                return Ok((head.header, rest, head.content_length, head.chunked));
            }
            Ok(None) if buf.len() < MAX_HEAD => continue,
            Ok(None) => return Err(up_err(ErrorType::InvalidHTTPHeader, "upgrade answer head too large")),
            Err(e) => return Err(up_err(ErrorType::InvalidHTTPHeader, format!("malformed upgrade answer: {e}"))),
        }
    }
}

/// A parsed response head (see [`parse_head`]).
#[derive(Debug)]
pub struct Head {
    pub header: ResponseHeader,
    /// Bytes of the head, its final CRLF included; the body starts there.
    pub len: usize,
    pub content_length: Option<usize>,
    pub chunked: bool,
}

/// Parses an upstream's response head from the bytes read so far: `Ok(None)` while it is
/// incomplete. Pure, so it can be fuzzed: the bytes come from a tenant's runtime.
pub fn parse_head(buf: &[u8]) -> std::result::Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let status = resp.code.unwrap_or(502);
    let mut header = ResponseHeader::build(status, Some(resp.headers.len())).map_err(|e| e.to_string())?;
    let mut content_length = None;
    let mut chunked = false;
    for hd in resp.headers.iter() {
        if hd.name.eq_ignore_ascii_case("content-length") {
            content_length = std::str::from_utf8(hd.value).ok().and_then(|v| v.trim().parse().ok());
        }
        if hd.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = String::from_utf8_lossy(hd.value).to_ascii_lowercase().contains("chunked");
        }
        header.append_header(hd.name.to_string(), hd.value).map_err(|e| e.to_string())?;
    }
    Ok(Some(Head { header, len, content_length, chunked }))
}

/// Relays one upgrade request to `addr`. Errors before anything was written to the client are
/// returned for the caller to answer (502/504); later ones just end the tunnel.
pub async fn relay<G: Send + 'static>(
    session: &mut Session,
    req: &RequestHeader,
    addr: SocketAddr,
    connect_timeout: Duration,
    idle: Option<Duration>,
    drain: Option<Arc<Drain>>,
    on_upgrade: impl FnOnce() -> G,
) -> Result<Outcome> {
    let mut up = crate::upstream::connect_tcp(addr, connect_timeout).await?;
    up.write_all(&head_bytes(req))
        .await
        .map_err(|e| up_err(ErrorType::WriteError, format!("sending the upgrade: {e}")))?;
    let (mut resp, leftover, content_length, chunked) =
        read_head(&mut up, connect_timeout.max(Duration::from_secs(10))).await?;
    forwarded::clean_response(&mut resp);
    let status = resp.status.as_u16();
    if status == 101 && !switches_to_requested(req, &resp) {
        // An upstream that switches to a protocol the client did not ask for (h2c, say) would
        // get a raw tunnel for whatever it wants to speak.
        return Err(up_err(ErrorType::InvalidHTTPHeader, "upstream switched to a protocol that was not requested"));
    }
    if status != 101 {
        // The upstream refused the upgrade: relay its (short) answer as a plain response.
        let body = refusal_body(&mut up, leftover, content_length, chunked)
            .await
            .map_err(|e| up_err(ErrorType::InvalidHTTPHeader, format!("refused upgrade's body: {e}")))?;
        resp.remove_header("transfer-encoding");
        resp.insert_header("Content-Length", body.len().to_string())?;
        session.write_response_header(Box::new(resp), body.is_empty()).await?;
        if !body.is_empty() {
            session.write_response_body(Some(Bytes::from(body)), true).await?;
        }
        return Ok(Outcome { status, upgraded: false });
    }
    session.write_response_header(Box::new(resp), false).await?;
    let open = on_upgrade();
    let websocket = req.headers.get("upgrade").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let (mut client, early) = detach_client(session).await?;
    let to_client = pump::Direction::starting_with(&leftover);
    let to_upstream = pump::Direction::starting_with(&early);
    drop(leftover);
    let idle = idle.unwrap_or(Duration::from_secs(365 * 24 * 3600));
    // The tunnel runs as a task of its own, holding only its two sockets: Pingora's request
    // (its session, buffers and future) ends here. It runs on the listener's runtime, so a
    // shutdown still ends it after the grace period (with a Close frame first, see `drain`).
    tokio::spawn(async move {
        let _open = open;
        let end = pump::run(&mut *client, &mut up, idle, drain.as_deref(), websocket, to_client, to_upstream).await;
        tracing::debug!(?end, "tunnel ended");
        let _ = up.shutdown().await;
        let _ = AsyncWriteExt::shutdown(&mut client).await;
    });
    Ok(Outcome { status, upgraded: true })
}

/// Takes the client's connection out of Pingora's session after the 101, leaving a stand-in
/// session (the same request, on no socket) for Pingora to log and close. Returns the stream
/// and any bytes the client sent past its request that the session had already read.
async fn detach_client(session: &mut Session) -> Result<(Stream, Vec<u8>)> {
    let early = match session.as_downstream_mut() {
        ServerSession::H1(h1) => ready_body_bytes(h1),
        _ => return Error::e_explain(ErrorType::InternalError, "an upgrade on a connection that is not HTTP/1.1"),
    };
    let mut stand_in = ServerSession::new_http1(Box::new(std::io::Cursor::new(head_bytes(session.req_header()))));
    stand_in.read_request().await?;
    stand_in.set_keepalive(None);
    let taken = std::mem::replace(&mut session.downstream_session, Box::new(stand_in));
    match *taken {
        ServerSession::H1(h1) => {
            let mut stream = h1.into_inner();
            // The 101 may still sit in the stream's write buffer.
            stream.flush().await.map_err(|e| Error::because(ErrorType::WriteError, "sending the 101", e))?;
            Ok((stream, early))
        }
        _ => Error::e_explain(ErrorType::InternalError, "an upgrade on a connection that is not HTTP/1.1"),
    }
}

/// Body bytes the session holds already (read with the request header), without waiting for
/// more: a client should wait for the 101, but none of what it sent may be lost.
fn ready_body_bytes(h1: &mut pingora::protocols::http::v1::server::HttpSession) -> Vec<u8> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let read = h1.read_body_bytes();
    let mut read = std::pin::pin!(read);
    match read.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(Ok(Some(b))) => b.to_vec(),
        _ => Vec::new(),
    }
}

/// A 101's `Upgrade` (when it names one) is one of the protocols the request offered.
fn switches_to_requested(req: &RequestHeader, resp: &ResponseHeader) -> bool {
    let Some(chosen) = resp.headers.get(http::header::UPGRADE) else {
        return true; // Some servers leave it out; the request offered only allowed protocols.
    };
    let name = |t: &str| t.split('/').next().unwrap_or("").trim().to_ascii_lowercase();
    let Ok(chosen) = chosen.to_str() else {
        return false;
    };
    let offered: Vec<String> = req
        .headers
        .get_all(http::header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(name)
        .collect();
    chosen.split(',').map(name).all(|c| offered.contains(&c))
}

/// Reads a refused upgrade's body: whole, or an error (a cut or oversized body is not relayed as
/// if it were complete).
async fn refusal_body(
    up: &mut TcpStream,
    mut body: Vec<u8>,
    content_length: Option<usize>,
    chunked: bool,
) -> std::result::Result<Vec<u8>, DechunkError> {
    // Chunked framing wins over a Content-Length; without either the body ends at the close.
    let length = if chunked { None } else { content_length };
    if length.is_some_and(|n| n > MAX_REFUSAL_BODY) {
        return Err(DechunkError::TooLarge);
    }
    let want = length.unwrap_or(MAX_REFUSAL_BODY);
    let mut chunk = [0u8; 8192];
    let done = |b: &Vec<u8>| b.len() >= want || (chunked && b.ends_with(b"0\r\n\r\n"));
    // One deadline for the whole body: a trickle of bytes must not hold the request forever.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut closed = false;
    while !done(&body) {
        match tokio::time::timeout_at(deadline, up.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => body.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Ok(Ok(_)) => {
                closed = true;
                break;
            }
            // A reset or the deadline: what was read is not the whole body.
            _ => break,
        }
    }
    if chunked {
        return dechunk(&body, MAX_REFUSAL_BODY);
    }
    match length {
        Some(n) if body.len() < n => Err(DechunkError::Truncated),
        Some(n) => {
            body.truncate(n);
            Ok(body)
        }
        None if body.len() > MAX_REFUSAL_BODY => Err(DechunkError::TooLarge),
        None if !closed && body.len() < MAX_REFUSAL_BODY => Err(DechunkError::Truncated),
        None => Ok(body),
    }
}

/// Why a chunked body could not be decoded. The bytes come from an upstream (a tenant's runtime),
/// so every malformation is an error for the caller, never a panic.
#[derive(Debug, PartialEq, Eq)]
pub enum DechunkError {
    /// A chunk-size line that is not hexadecimal, or does not fit in `usize`.
    BadSize,
    /// A chunk not followed by CRLF.
    BadFraming,
    /// The body ended (or its time ran out) before its last chunk or its announced length.
    Truncated,
    /// The decoded body would pass the caller's limit.
    TooLarge,
}

impl std::fmt::Display for DechunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DechunkError::BadSize => "bad chunk size",
            DechunkError::BadFraming => "chunk not followed by CRLF",
            DechunkError::Truncated => "body cut before its end",
            DechunkError::TooLarge => "body too large",
        })
    }
}

impl std::error::Error for DechunkError {}

/// Decodes a complete chunked body (extensions and trailers ignored) of at most `limit` bytes.
pub fn dechunk(mut b: &[u8], limit: usize) -> std::result::Result<Vec<u8>, DechunkError> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").ok_or(DechunkError::Truncated)?;
        let line = b.get(..nl).ok_or(DechunkError::Truncated)?;
        let digits = line.split(|&c| c == b';').next().unwrap_or_default();
        let digits = std::str::from_utf8(digits).map_err(|_| DechunkError::BadSize)?.trim();
        if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(DechunkError::BadSize);
        }
        let size = usize::from_str_radix(digits, 16).map_err(|_| DechunkError::BadSize)?;
        if size == 0 {
            return Ok(out);
        }
        if out.len().checked_add(size).is_none_or(|total| total > limit) {
            return Err(DechunkError::TooLarge);
        }
        let start = nl.checked_add(2).ok_or(DechunkError::BadSize)?;
        let end = start.checked_add(size).ok_or(DechunkError::BadSize)?;
        let data = b.get(start..end).ok_or(DechunkError::Truncated)?;
        match b.get(end..end.saturating_add(2)) {
            Some(b"\r\n") => {}
            Some(_) => return Err(DechunkError::BadFraming),
            None if b.len() > end => return Err(DechunkError::BadFraming),
            None => return Err(DechunkError::Truncated),
        }
        out.extend_from_slice(data);
        b = b.get(end.saturating_add(2)..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_head() {
        let mut r = RequestHeader::build("GET", b"/ws?a=1", None).expect("req");
        r.insert_header("Host", "a.test").expect("h");
        r.insert_header("Upgrade", "websocket").expect("h");
        let h = String::from_utf8(head_bytes(&r)).expect("utf8");
        assert!(h.starts_with("GET /ws?a=1 HTTP/1.1\r\n"), "{h}");
        assert!(h.contains("host: a.test\r\n") || h.contains("Host: a.test\r\n"), "{h}");
        assert!(h.ends_with("\r\n\r\n"));
    }

    #[test]
    fn chunked_refusal() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", 16), Ok(b"abcde".to_vec()));
        assert_eq!(dechunk(b"3;ext=1\r\nabc\r\n0\r\n\r\n", 16), Ok(b"abc".to_vec()));
    }

    #[test]
    fn hostile_chunked_refusals_are_errors() {
        use DechunkError::*;
        let cases: &[(&[u8], DechunkError)] = &[
            (b"ffffffffffffffff\r\nab\r\n0\r\n\r\n", TooLarge),
            (b"fffffffffffffffffffff\r\nab\r\n", BadSize),
            (b"fffffffffffffff0\r\n", TooLarge),
            (b"zz\r\nab\r\n0\r\n\r\n", BadSize),
            (b"-1\r\nab\r\n0\r\n\r\n", BadSize),
            (b"\r\n", BadSize),
            (b"2\r\nabc\r\n0\r\n\r\n", BadFraming),
            (b"5\r\nab", Truncated),
            (b"2\r\nab\r\n", Truncated),
            (b"", Truncated),
            (b"100001\r\n", TooLarge),
        ];
        for (body, want) in cases {
            assert_eq!(dechunk(body, MAX_REFUSAL_BODY).as_ref(), Err(want), "{}", String::from_utf8_lossy(body));
        }
    }
}
