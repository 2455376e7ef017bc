//! markco TLS: the SNI certificate store that rustls asks at every handshake, certificate files
//! and their checks, ACME issuance and renewal (HTTP-01 and TLS-ALPN-01) with instant-acme, and
//! the on-disk storage of accounts, certificates and keys.

pub mod acme;
pub mod alpn;
pub mod manager;
pub mod metrics;
pub mod pem;
pub mod sealed;
pub mod shared;
pub mod storage;
pub mod store;

pub use manager::{AcmeConfig, CertManager, ManagedSite, SiteTls};
pub use metrics::TlsMetrics;
pub use sealed::SecretKey;
pub use shared::{FleetLock, PendingChallenge, SharedCerts};
pub use store::{CertInfo, CertSource, CertStore, LoadedCert};

/// Installs ring as rustls' process-wide crypto provider (Pingora and instant-acme share it).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
