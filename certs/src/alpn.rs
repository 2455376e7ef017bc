//! The pre-TLS hook of the HTTPS listener. It reads the first TLS record (with a deadline, so a
//! client that connects and stalls is cut), counts what cannot become a handshake, and answers
//! TLS-ALPN-01 validation (ALPN `acme-tls/1`, RFC 8737) itself. Every other connection gets its
//! bytes back untouched and continues into Pingora's normal handshake.
//!
//! Pingora's rustls listener cannot offer `acme-tls/1` beside h2/http1.1 (its ALPN setting takes
//! one list and rustls refuses a client whose protocols share none with it), hence this hook.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::{Error, ErrorType, Result};
use rustls::server::{Acceptor, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::store::CertStore;

const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// A record is at most 16 KiB plus its 5-byte header.
const MAX_RECORD: usize = 16 * 1024 + 5;

/// What the first record says.
#[derive(Debug, PartialEq, Eq)]
pub struct HelloFacts {
    pub acme_alpn: bool,
    /// Offers neither TLS 1.2 nor 1.3.
    pub too_old: bool,
}

fn u16_at(b: &[u8], i: usize) -> Option<usize> {
    Some(((*b.get(i)? as usize) << 8) | *b.get(i + 1)? as usize)
}

/// Parses a ClientHello record far enough to see its ALPN list and versions. `None`: not a
/// ClientHello (or cut short).
pub fn inspect_client_hello(rec: &[u8]) -> Option<HelloFacts> {
    if *rec.first()? != 0x16 || *rec.get(5)? != 0x01 {
        return None;
    }
    let mut i = 9; // record header (5) + handshake header (4)
    let client_version = u16_at(rec, i)?;
    i += 2 + 32; // version, random
    i += 1 + *rec.get(i)? as usize; // session id
    i += 2 + u16_at(rec, i)?; // cipher suites
    i += 1 + *rec.get(i)? as usize; // compression methods
    let mut facts = HelloFacts { acme_alpn: false, too_old: client_version < 0x0303 };
    let Some(ext_len) = u16_at(rec, i) else {
        return Some(facts); // no extensions at all
    };
    i += 2;
    let end = (i + ext_len).min(rec.len());
    while i + 4 <= end {
        let (ty, len) = (u16_at(rec, i)?, u16_at(rec, i + 2)?);
        let data = rec.get(i + 4..i + 4 + len)?;
        match ty {
            0x0010 => {
                // ALPN: u16 list length, then u8-prefixed protocol names.
                let mut j = 2;
                while j < data.len() {
                    let n = data[j] as usize;
                    if data.get(j + 1..j + 1 + n) == Some(ACME_TLS_ALPN) {
                        facts.acme_alpn = true;
                    }
                    j += 1 + n;
                }
            }
            0x002b => {
                // supported_versions: u8 length, then u16 versions.
                let offers_modern =
                    data.get(1..).unwrap_or(&[]).chunks(2).any(|v| v.len() == 2 && v[0] == 0x03 && v[1] >= 0x03);
                facts.too_old = !offers_modern;
            }
            _ => {}
        }
        i += 4 + len;
    }
    Some(facts)
}

pub struct PreTlsHook {
    pub store: Arc<CertStore>,
    /// How long a client may take to send its ClientHello.
    pub hello_timeout: Duration,
}

#[derive(Debug)]
struct One(Arc<CertifiedKey>);

impl ResolvesServerCert for One {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl PreTlsHook {
    async fn read_first_record(&self, stream: &mut L4Stream) -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(2048);
        let mut chunk = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + self.hello_timeout;
        loop {
            if buf.first().is_some_and(|&b| b != 0x16) {
                // Not a TLS handshake record: no need to wait for more.
                return Ok(buf);
            }
            let want = match buf.get(3..5) {
                Some(l) => 5 + (((l[0] as usize) << 8) | l[1] as usize),
                None => 5,
            };
            if buf.len() >= want.min(MAX_RECORD) {
                return Ok(buf);
            }
            let n = match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Error::e_because(ErrorType::ReadError, "reading the ClientHello", e),
                Err(_) => return Error::e_explain(ErrorType::ReadTimedout, "no ClientHello in time"),
            };
            if n == 0 {
                return Error::e_explain(ErrorType::ConnectionClosed, "closed before a ClientHello");
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn answer_challenge(&self, stream: &mut L4Stream) -> Result<()> {
        let start = tokio_rustls::LazyConfigAcceptor::new(Acceptor::default(), &mut *stream)
            .await
            .map_err(|e| Error::because(ErrorType::TLSHandshakeFailure, "acme-tls/1 ClientHello", e))?;
        let host = start.client_hello().server_name().map(|s| s.to_ascii_lowercase()).unwrap_or_default();
        let Some(cert) = self.store.challenge(&host) else {
            tracing::info!(sni = %host, "acme-tls/1 handshake for a host with no pending challenge refused");
            return Error::e_explain(ErrorType::TLSHandshakeFailure, "no pending TLS-ALPN-01 challenge");
        };
        let mut cfg =
            rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(One(cert)));
        cfg.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        let mut tls = start
            .into_stream(Arc::new(cfg))
            .await
            .map_err(|e| Error::because(ErrorType::TLSHandshakeFailure, "acme-tls/1 handshake", e))?;
        let _ = tls.shutdown().await;
        tracing::info!(sni = %host, "answered a TLS-ALPN-01 validation");
        Ok(())
    }
}

#[async_trait]
impl PreTlsProcess for PreTlsHook {
    async fn process(&self, stream: &mut L4Stream) -> Result<()> {
        let rec = match self.read_first_record(stream).await {
            Ok(r) => r,
            Err(e) => {
                self.store.metrics.handshake("no_client_hello", "");
                return Err(e);
            }
        };
        let facts = inspect_client_hello(&rec);
        stream.rewind(&rec);
        match facts {
            None => {
                self.store.metrics.handshake("not_tls", "");
                Error::e_explain(ErrorType::TLSHandshakeFailure, "the first bytes are not a TLS ClientHello")
            }
            Some(HelloFacts { acme_alpn: true, .. }) => {
                self.answer_challenge(stream).await?;
                // The connection has served its purpose; Pingora must not handshake it again.
                Error::e_explain(ErrorType::TLSHandshakeFailure, "acme-tls/1 validation answered")
            }
            Some(HelloFacts { too_old: true, .. }) => {
                // rustls refuses it with a protocol_version alert; we only count it.
                self.store.metrics.handshake("protocol_version", "");
                Ok(())
            }
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a minimal ClientHello record with the given extensions.
    fn hello(version: u16, exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&version.to_be_bytes());
        body.extend_from_slice(&[0u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut ext = Vec::new();
        for (ty, data) in exts {
            ext.extend_from_slice(&ty.to_be_bytes());
            ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext.extend_from_slice(data);
        }
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1, 0, (body.len() >> 8) as u8, body.len() as u8];
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1, (hs.len() >> 8) as u8, hs.len() as u8];
        rec.extend_from_slice(&hs);
        rec
    }

    fn alpn(protos: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for p in protos {
            list.push(p.len() as u8);
            list.extend_from_slice(p);
        }
        let mut d = (list.len() as u16).to_be_bytes().to_vec();
        d.extend_from_slice(&list);
        d
    }

    #[test]
    fn sees_acme_alpn() {
        let r = hello(0x0303, &[(0x0010, alpn(&[b"acme-tls/1"]))]);
        assert_eq!(inspect_client_hello(&r), Some(HelloFacts { acme_alpn: true, too_old: false }));
        let r = hello(0x0303, &[(0x0010, alpn(&[b"h2", b"http/1.1"]))]);
        assert_eq!(inspect_client_hello(&r), Some(HelloFacts { acme_alpn: false, too_old: false }));
    }

    #[test]
    fn sees_old_protocols() {
        let r = hello(0x0301, &[]);
        assert!(inspect_client_hello(&r).is_some_and(|f| f.too_old));
        // A TLS 1.3 client sends 0x0303 and lists 1.3 in supported_versions.
        let r = hello(0x0303, &[(0x002b, vec![2, 3, 4])]);
        assert!(inspect_client_hello(&r).is_some_and(|f| !f.too_old));
        let r = hello(0x0303, &[(0x002b, vec![2, 3, 1])]);
        assert!(inspect_client_hello(&r).is_some_and(|f| f.too_old));
    }

    #[test]
    fn garbage_is_not_a_hello() {
        assert_eq!(inspect_client_hello(b"GET / HTTP/1.1\r\n\r\n"), None);
        assert_eq!(inspect_client_hello(&[0x16, 3, 1, 0, 10, 1, 0]), None);
        assert_eq!(inspect_client_hello(&[]), None);
    }
}
