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

use bytes::{Bytes, BytesMut};
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
use crate::h1;
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

/// Reads the upstream's response head ([`h1::HeadScan`]). Returns it and any bytes read past
/// it.
async fn read_head(up: &mut TcpStream, timeout: Duration) -> Result<(ResponseHeader, BytesMut)> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut scan = h1::HeadScan::default();
    loop {
        if let Some(head) = scan.head(&buf, MAX_HEAD)? {
            let rest = buf.split_off(head.len);
            return Ok((head.header, rest));
        }
        buf.reserve(4096);
        match tokio::time::timeout_at(deadline, up.read_buf(&mut buf)).await {
            Ok(Ok(0)) => {
                return Err(up_err(ErrorType::ConnectionClosed, "upstream closed before answering the upgrade"))
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(up_err(ErrorType::ReadError, format!("reading the upgrade answer: {e}"))),
            Err(_) => return Err(up_err(ErrorType::ReadTimedout, "no answer to the upgrade request")),
        }
    }
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
    let (mut resp, leftover) = read_head(&mut up, connect_timeout.max(Duration::from_secs(10))).await?;
    forwarded::clean_response(&mut resp);
    let status = resp.status.as_u16();
    if status == 101 && !switches_to_requested(req, &resp) {
        // An upstream that switches to a protocol the client did not ask for (h2c, say) would
        // get a raw tunnel for whatever it wants to speak.
        return Err(up_err(ErrorType::InvalidHTTPHeader, "upstream switched to a protocol that was not requested"));
    }
    if status != 101 {
        // The upstream refused the upgrade: relay its (short) answer as a plain response.
        let head_request = req.method == http::Method::HEAD;
        let body = refusal_body(&mut up, &mut resp, head_request, leftover).await?;
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

/// Reads a refused upgrade's body ([`h1::Body`]): whole, or an error (a cut or oversized body is
/// not relayed as if it were complete).
async fn refusal_body(
    up: &mut TcpStream,
    resp: &mut ResponseHeader,
    head_request: bool,
    mut buf: BytesMut,
) -> Result<Vec<u8>> {
    let too_large = || up_err(ErrorType::InvalidHTTPHeader, "refused upgrade's body too large");
    let framing = h1::framing(resp, head_request)?;
    if matches!(framing, h1::Framing::Length(n) if n > MAX_REFUSAL_BODY as u64) {
        return Err(too_large());
    }
    let mut body = h1::Body::new(framing);
    let mut out = Vec::new();
    // One deadline for the whole body: a trickle of bytes must not hold the request forever.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match body.next(&mut buf)? {
            h1::Step::Data(d) => {
                if out.len().saturating_add(d.len()) > MAX_REFUSAL_BODY {
                    return Err(too_large());
                }
                out.extend_from_slice(&d);
            }
            h1::Step::Done => return Ok(out),
            h1::Step::More => {
                buf.reserve(8192);
                match tokio::time::timeout_at(deadline, up.read_buf(&mut buf)).await {
                    Ok(Ok(0)) => {
                        body.closed()?;
                        return Ok(out);
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        return Err(up_err(ErrorType::ReadError, format!("reading the refused upgrade's body: {e}")))
                    }
                    Err(_) => return Err(up_err(ErrorType::ReadTimedout, "the refused upgrade's body took too long")),
                }
            }
        }
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
}
