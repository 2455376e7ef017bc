//! TLS for test clients: certificates made by the tests, and clients that trust only them.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;

/// A rustls client (ring) that trusts only `roots` and offers `alpn` by ALPN (none: the server
/// picks HTTP/1.1).
pub fn client_config(roots: &[CertificateDer<'static>], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).expect("add a root");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// A self-signed certificate for `localhost`, written as `site.pem` and `site.key` in `dir` (a
/// site's `tls = { cert = "{dir}/site.pem", key = "{dir}/site.key" }`). Returns it, for a
/// client's roots.
pub fn write_localhost_cert(dir: &Path) -> CertificateDer<'static> {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    std::fs::write(dir.join("site.pem"), cert.pem()).expect("write cert");
    std::fs::write(dir.join("site.key"), key.serialize_pem()).expect("write key");
    cert.der().clone()
}
