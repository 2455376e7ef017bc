//! The control plane's HTTP/1.1 client for its own calls (probing a runtime, telling an editor its
//! runtime moved, health checks): one request per connection, bounded in time and size. No
//! pooling, no TLS: these targets are local services.
//!
//! Whatever answers is tenant input (a runtime runs the user's code), so the framing is left to
//! hyper's parser, the body is read through [`Limited`], and the whole call runs under one timeout.

// Bytes from the network: no arithmetic that can overflow, no indexing that can panic.
#![deny(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A reply body past this size is an error, not a reply (ours are small JSON documents).
pub const MAX_RESPONSE: usize = 1024 * 1024;

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Sends one request and reads the reply (status and body) within `timeout`.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<Reply> {
    tokio::time::timeout(timeout, call_inner(addr, method, path, json))
        .await
        .map_err(|_| anyhow!("no answer within {timeout:?}"))
        .and_then(|r| r)
        .with_context(|| format!("{method} http://{addr}{path}"))
}

async fn call_inner(addr: SocketAddr, method: &str, path: &str, json: Option<&str>) -> anyhow::Result<Reply> {
    let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await.context("handshake")?;
    // The connection is driven beside the request; it ends with the call (dropped on timeout).
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("control-plane HTTP connection ended: {e}");
        }
    });
    let _abort = AbortOnDrop(driver);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "markco")
        .header(http::header::CONNECTION, "close");
    if json.is_some() {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    let req = req.body(Full::new(Bytes::from(json.unwrap_or("").to_owned()))).context("building the request")?;
    let resp = sender.send_request(req).await.context("reading the response head")?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the response body: {e}"))?
        .to_bytes();
    Ok(Reply { status, body: body.to_vec() })
}

/// Stops the connection task when the call ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A peer that answers every connection with `reply` (after reading the request head).
    async fn peer(reply: &'static [u8]) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(reply).await;
                    // Hold the connection open: a body that never ends must be cut by our timeout.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                });
            }
        });
        addr
    }

    async fn get(reply: &'static [u8]) -> anyhow::Result<Reply> {
        call(peer(reply).await, "GET", "/x", None, Duration::from_secs(1)).await
    }

    #[tokio::test]
    async fn plain_and_chunked_replies() {
        let r = get(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.expect("plain");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
        let r = get(b"HTTP/1.1 503 x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n")
            .await
            .expect("chunked");
        assert_eq!((r.status, r.body.as_slice()), (503, &b"abc"[..]));
    }

    #[tokio::test]
    async fn hostile_replies_are_errors_not_panics() {
        let hostile: &[&'static [u8]] = &[
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nab",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-A: b\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab",
        ];
        for reply in hostile {
            let r = get(reply).await;
            assert!(r.is_err(), "{:?} gave {r:?}", String::from_utf8_lossy(reply));
        }
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
                let junk = vec![b'a'; 64 * 1024];
                while s.write_all(&junk).await.is_ok() {}
            }
        });
        let e = call(addr, "GET", "/", None, Duration::from_secs(5)).await.expect_err("too large");
        assert!(format!("{e:#}").contains("body"), "{e:#}");
    }
}
