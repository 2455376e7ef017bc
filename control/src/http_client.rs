//! A deliberately small HTTP/1.1 client for the control plane's own calls (probing a runtime,
//! telling an editor its runtime moved, health checks): one request per connection, bounded in
//! time and size. No pooling, no TLS: these targets are local services.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_RESPONSE: usize = 1024 * 1024;

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
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
        .map_err(|_| anyhow!("{method} http://{addr}{path}: no answer within {timeout:?}"))?
}

async fn call_inner(addr: SocketAddr, method: &str, path: &str, json: Option<&str>) -> anyhow::Result<Reply> {
    let mut s = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    let body = json.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: markco\r\nConnection: close\r\n");
    if json.is_some() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).await.with_context(|| format!("writing to {addr}"))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).await.with_context(|| format!("reading from {addr}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            bail!("{addr}: response larger than {MAX_RESPONSE} bytes");
        }
    }
    parse(&buf).with_context(|| format!("{method} http://{addr}{path}"))
}

fn parse(buf: &[u8]) -> anyhow::Result<Reply> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow!("no complete response header"))?;
    let head = std::str::from_utf8(&buf[..end]).context("response header is not UTF-8")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("malformed status line"))?;
    let mut body = buf[end + 4..].to_vec();
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = markco_proxy::tunnel::dechunk(&body);
    }
    Ok(Reply { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").expect("ok");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
        let r =
            parse(b"HTTP/1.1 503 x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n").expect("ok");
        assert_eq!((r.status, r.body.as_slice()), (503, &b"abc"[..]));
        assert!(parse(b"garbage").is_err());
    }
}
