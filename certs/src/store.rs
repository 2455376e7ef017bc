//! The certificate store: host name → certificate, behind `ArcSwap`, so a new certificate takes
//! effect at the next handshake and open connections are not touched.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Serialize;

use crate::metrics::TlsMetrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertSource {
    Acme,
    File,
}

#[derive(Debug, Clone, Serialize)]
pub struct CertInfo {
    /// DNS names the certificate covers (its SANs).
    pub names: Vec<String>,
    pub issuer: String,
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub source: CertSource,
}

pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

impl std::fmt::Debug for LoadedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedCert").field("info", &self.info).finish()
    }
}

/// A row of `GET /certs`.
#[derive(Debug, Serialize)]
pub struct CertView {
    pub host: String,
    #[serde(flatten)]
    pub info: CertInfo,
}

#[derive(Debug)]
pub struct CertStore {
    by_host: ArcSwap<HashMap<String, Arc<LoadedCert>>>,
    /// TLS-ALPN-01 challenge certificates by host, served only for ALPN `acme-tls/1`.
    challenges: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
    pub metrics: TlsMetrics,
}

impl CertStore {
    pub fn new(metrics: TlsMetrics) -> CertStore {
        CertStore { by_host: ArcSwap::default(), challenges: ArcSwap::default(), metrics }
    }

    /// Serves `cert` for each of `hosts` from the next handshake on.
    pub fn install(&self, hosts: &[String], cert: Arc<LoadedCert>) {
        self.by_host.rcu(|m| {
            let mut m = HashMap::clone(m);
            for h in hosts {
                m.insert(h.clone(), cert.clone());
            }
            m
        });
        for h in hosts {
            self.metrics.expiry(h, cert.info.not_after);
        }
    }

    /// Keeps only these hosts (after a reload removed sites).
    pub fn retain_hosts(&self, keep: &[String]) {
        let old = self.by_host.load();
        for h in old.keys().filter(|h| !keep.contains(h)) {
            self.metrics.forget_host(h);
        }
        self.by_host.rcu(|m| {
            m.iter().filter(|(h, _)| keep.contains(h)).map(|(h, c)| (h.clone(), c.clone())).collect::<HashMap<_, _>>()
        });
    }

    pub fn get(&self, host: &str) -> Option<Arc<LoadedCert>> {
        let map = self.by_host.load();
        if let Some(c) = map.get(host) {
            return Some(c.clone());
        }
        // A wildcard site: "*.example.com" covers "a.example.com".
        let (_, parent) = host.split_once('.')?;
        map.get(&format!("*.{parent}")).cloned()
    }

    pub fn list(&self) -> Vec<CertView> {
        let mut v: Vec<CertView> =
            self.by_host.load().iter().map(|(h, c)| CertView { host: h.clone(), info: c.info.clone() }).collect();
        v.sort_by(|a, b| a.host.cmp(&b.host));
        v
    }

    pub fn set_challenge(&self, host: &str, key: Arc<CertifiedKey>) {
        self.challenges.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(host.to_string(), key.clone());
            m
        });
    }

    pub fn clear_challenge(&self, host: &str) {
        self.challenges.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.remove(host);
            m
        });
    }

    pub fn challenge(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        self.challenges.load().get(host).cloned()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            self.metrics.handshake("no_sni", "");
            tracing::debug!("TLS handshake without SNI refused");
            return None;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match self.get(&name) {
            Some(c) => Some(c.key.clone()),
            None => {
                self.metrics.handshake("unknown_sni", "");
                tracing::debug!(sni = %name, "TLS handshake for a host with no certificate refused");
                None
            }
        }
    }
}
