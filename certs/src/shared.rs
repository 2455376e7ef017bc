//! What the gateways of a `[cluster]` share about certificates, behind a trait so this crate
//! stays free of the database (the control plane implements it on PostgreSQL):
//!
//! - a fleet-wide lock per name, under which one gateway orders while the others wait and then
//!   find its certificate;
//! - the ACME account, so the fleet is one account;
//! - the certificates and their keys (the implementation seals the keys);
//! - the challenges of the orders in flight, so any gateway can answer the CA.

use std::time::Duration;

use async_trait::async_trait;

use crate::acme::Challenge;

/// A held fleet-wide lock. Dropping it without [`FleetLock::release`] still frees it (the
/// implementation closes its connection), only less politely.
#[async_trait]
pub trait FleetLock: Send {
    async fn release(self: Box<Self>);
}

/// A challenge put up for validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingChallenge {
    pub kind: Challenge,
    pub token: String,
    pub host: String,
    /// The key authorization.
    pub answer: String,
}

#[async_trait]
pub trait SharedCerts: Send + Sync {
    /// Takes the fleet-wide lock named `key`, waiting at most `wait` for another holder.
    async fn lock(&self, key: &str, wait: Duration) -> anyhow::Result<Box<dyn FleetLock>>;

    /// The stored ACME account credentials (JSON) for `directory`.
    async fn account(&self, directory: &str) -> anyhow::Result<Option<Vec<u8>>>;
    async fn save_account(&self, directory: &str, credentials: &[u8]) -> anyhow::Result<()>;

    /// The stored certificate of `name`: (chain PEM, key PEM).
    async fn cert(&self, directory: &str, name: &str) -> anyhow::Result<Option<(Vec<u8>, Vec<u8>)>>;
    /// Stores a certificate and tells every gateway (they serve it from their next handshake).
    async fn save_cert(
        &self,
        directory: &str,
        name: &str,
        chain_pem: &[u8],
        key_pem: &[u8],
        not_after: i64,
    ) -> anyhow::Result<()>;

    /// Publishes a challenge for every gateway to answer, until `ttl` or removal.
    async fn put_challenge(&self, challenge: &PendingChallenge, ttl: Duration) -> anyhow::Result<()>;
    async fn remove_challenges(&self, tokens: &[String]) -> anyhow::Result<()>;
    /// The TLS-ALPN-01 challenges in flight (for a gateway that was told one changed).
    async fn alpn_challenges(&self) -> anyhow::Result<Vec<PendingChallenge>>;
}

/// The lock key of a certificate's order.
pub fn order_lock_key(directory: &str, name: &str) -> String {
    format!("order {directory} {name}")
}

/// The lock key of the account's creation.
pub fn account_lock_key(directory: &str) -> String {
    format!("account {directory}")
}
