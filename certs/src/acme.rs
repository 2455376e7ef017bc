//! One ACME order, start to finish, with instant-acme: answer each authorization with the chosen
//! challenge (HTTP-01 from the shared token map, TLS-ALPN-01 from the store's challenge
//! certificates), wait for validation, finalize, fetch the chain.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use arc_swap::ArcSwap;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};

use crate::shared::{account_lock_key, PendingChallenge, SharedCerts};
use crate::storage::{create_private_dir, write_atomic, Storage};
use crate::store::CertStore;

/// HTTP-01 answers: token → key authorization, read by the HTTP listener.
pub type Http01Tokens = Arc<ArcSwap<HashMap<String, String>>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Challenge {
    #[serde(rename = "http-01")]
    Http01,
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

impl Challenge {
    pub fn as_str(self) -> &'static str {
        match self {
            Challenge::Http01 => "http-01",
            Challenge::TlsAlpn01 => "tls-alpn-01",
        }
    }

    fn acme_type(self) -> ChallengeType {
        match self {
            Challenge::Http01 => ChallengeType::Http01,
            Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        }
    }
}

fn account_builder(ca_root: Option<&Path>) -> anyhow::Result<instant_acme::AccountBuilder> {
    Ok(match ca_root {
        Some(root) => {
            Account::builder_with_root(root).with_context(|| format!("loading the ACME CA root {}", root.display()))?
        }
        None => Account::builder().context("setting up the ACME HTTP client")?,
    })
}

async fn create_account(
    directory: &str,
    ca_root: Option<&Path>,
    email: Option<&str>,
) -> anyhow::Result<(Account, AccountCredentials)> {
    let contact = email.map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    account_builder(ca_root)?
        .create(
            &NewAccount { contact: &contacts, terms_of_service_agreed: true, only_return_existing: false },
            directory.to_string(),
            None,
        )
        .await
        .with_context(|| format!("creating an ACME account at {directory}"))
}

/// The fleet's one account for `directory`: restored from the shared store, or created once
/// for the whole fleet (under the fleet-wide account lock, checking again once it is held).
pub async fn shared_account(
    shared: &dyn SharedCerts,
    directory: &str,
    ca_root: Option<&Path>,
    email: Option<&str>,
    wait: Duration,
) -> anyhow::Result<Account> {
    async fn restore(
        shared: &dyn SharedCerts,
        directory: &str,
        ca_root: Option<&Path>,
    ) -> anyhow::Result<Option<Account>> {
        let Some(json) = shared.account(directory).await.context("reading the fleet's ACME account")? else {
            return Ok(None);
        };
        let creds: AccountCredentials =
            serde_json::from_slice(&json).context("the fleet's stored ACME account is unreadable")?;
        let acc =
            account_builder(ca_root)?.from_credentials(creds).await.context("restoring the fleet's ACME account")?;
        Ok(Some(acc))
    }
    if let Some(acc) = restore(shared, directory, ca_root).await? {
        return Ok(acc);
    }
    let lock = shared.lock(&account_lock_key(directory), wait).await.context("taking the fleet's account lock")?;
    let result = async {
        if let Some(acc) = restore(shared, directory, ca_root).await? {
            return Ok(acc);
        }
        let (account, creds) = create_account(directory, ca_root, email).await?;
        let json = serde_json::to_vec(&creds).context("serialising the ACME account")?;
        shared.save_account(directory, &json).await.context("storing the fleet's ACME account")?;
        tracing::info!(directory, "ACME account created for the fleet");
        Ok(account)
    }
    .await;
    lock.release().await;
    result
}

/// Restores the stored account, or creates one and stores it (0600) for next time.
pub async fn account(
    storage: &Storage,
    directory: &str,
    ca_root: Option<&Path>,
    email: Option<&str>,
) -> anyhow::Result<Account> {
    let builder = || account_builder(ca_root);
    let path = storage.account_path();
    if let Ok(text) = std::fs::read_to_string(&path) {
        match serde_json::from_str::<AccountCredentials>(&text) {
            Ok(creds) => return builder()?.from_credentials(creds).await.context("restoring the stored ACME account"),
            Err(e) => {
                tracing::warn!(file = %path.display(), "stored ACME account is unreadable ({e}); creating a new one")
            }
        }
    }
    let (account, creds) = create_account(directory, ca_root, email).await?;
    create_private_dir(storage.root())?;
    let json = serde_json::to_vec_pretty(&creds).context("serialising the ACME account")?;
    write_atomic(&path, &json, 0o600)?;
    tracing::info!(directory, "ACME account created");
    Ok(account)
}

/// A self-signed certificate with the acmeIdentifier extension, for TLS-ALPN-01 (RFC 8737).
pub fn alpn_challenge_cert(host: &str, digest: &[u8]) -> anyhow::Result<Arc<CertifiedKey>> {
    let key = rcgen::KeyPair::generate().context("generating a challenge key")?;
    let mut params =
        rcgen::CertificateParams::new(vec![host.to_string()]).context("challenge certificate parameters")?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).context("signing the challenge certificate")?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    // Not CertifiedKey::from_der: its consistency check rejects the critical acme extension.
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| anyhow!("loading the challenge key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing)))
}

/// Removes what an order put up for validation, whatever way the order ends.
struct Cleanup<'a> {
    tokens: &'a Http01Tokens,
    store: &'a CertStore,
    token_keys: Vec<String>,
    alpn_hosts: Vec<String>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if !self.token_keys.is_empty() {
            self.tokens.rcu(|m| {
                let mut m = HashMap::clone(m);
                for t in &self.token_keys {
                    m.remove(t);
                }
                m
            });
        }
        for h in &self.alpn_hosts {
            self.store.clear_challenge(h);
        }
    }
}

/// How long a TLS-ALPN-01 challenge published to the fleet is given to reach every gateway
/// (a NOTIFY away) before the CA is told to validate.
const ALPN_PROPAGATION: Duration = Duration::from_millis(1500);

/// Orders a certificate for `hosts` using `challenge`. Returns (chain PEM, key PEM).
///
/// With `shared` (a `[cluster]`), each challenge is also published to the fleet before the CA is
/// told to validate, so the gateway its request reaches can answer, and withdrawn afterwards.
pub async fn issue(
    account: &Account,
    hosts: &[String],
    challenge: Challenge,
    tokens: &Http01Tokens,
    store: &CertStore,
    timeout: Duration,
    shared: Option<&dyn SharedCerts>,
) -> anyhow::Result<(String, String)> {
    let mut published = Vec::new();
    let result = issue_inner(account, hosts, challenge, tokens, store, timeout, shared, &mut published).await;
    if let (Some(shared), false) = (shared, published.is_empty()) {
        if let Err(e) = shared.remove_challenges(&published).await {
            tracing::warn!("withdrawing the fleet's challenges failed (they expire by themselves): {e:#}");
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn issue_inner(
    account: &Account,
    hosts: &[String],
    challenge: Challenge,
    tokens: &Http01Tokens,
    store: &CertStore,
    timeout: Duration,
    shared: Option<&dyn SharedCerts>,
    published: &mut Vec<String>,
) -> anyhow::Result<(String, String)> {
    let ids: Vec<Identifier> = hosts.iter().map(|h| Identifier::Dns(h.clone())).collect();
    let mut order = account.new_order(&NewOrder::new(&ids)).await.context("creating the order")?;
    let mut cleanup = Cleanup { tokens, store, token_keys: Vec::new(), alpn_hosts: Vec::new() };
    {
        let mut authzs = order.authorizations();
        while let Some(next) = authzs.next().await {
            let mut authz = next.context("fetching an authorization")?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                // Reused from an earlier order.
                AuthorizationStatus::Valid => continue,
                other => bail!("an authorization is {other:?}"),
            }
            let mut ch = authz
                .challenge(challenge.acme_type())
                .ok_or_else(|| anyhow!("the ACME server offers no {} challenge", challenge.as_str()))?;
            let ka = ch.key_authorization();
            let host = match ch.identifier().identifier {
                Identifier::Dns(h) => h.clone(),
                other => bail!("unexpected identifier {other:?}"),
            };
            match challenge {
                Challenge::Http01 => {
                    let token = ch.token.clone();
                    let answer = ka.as_str().to_string();
                    tokens.rcu(|m| {
                        let mut m = HashMap::clone(m);
                        m.insert(token.clone(), answer.clone());
                        m
                    });
                    cleanup.token_keys.push(token);
                }
                Challenge::TlsAlpn01 => {
                    store.set_challenge(&host, alpn_challenge_cert(&host, ka.digest().as_ref())?);
                    cleanup.alpn_hosts.push(host.clone());
                }
            }
            if let Some(shared) = shared {
                let pending = PendingChallenge {
                    kind: challenge,
                    token: ch.token.clone(),
                    host: host.clone(),
                    answer: ka.as_str().to_string(),
                };
                shared.put_challenge(&pending, timeout + Duration::from_secs(60)).await.with_context(|| {
                    format!("publishing the {} challenge for {host} to the fleet", challenge.as_str())
                })?;
                published.push(pending.token);
                if challenge == Challenge::TlsAlpn01 {
                    tokio::time::sleep(ALPN_PROPAGATION).await;
                }
            }
            ch.set_ready().await.with_context(|| format!("telling the server {host} is ready"))?;
        }
    }
    let retry = RetryPolicy::new().initial_delay(Duration::from_millis(250)).backoff(1.5).timeout(timeout);
    let status = order.poll_ready(&retry).await.context("waiting for validation")?;
    drop(cleanup);
    if status != OrderStatus::Ready {
        let detail = order.state().error.as_ref().map(|p| format!(": {p:?}")).unwrap_or_default();
        bail!("the order is {status:?} after validation with {}{detail}", challenge.as_str());
    }
    let key_pem = order.finalize().await.context("finalizing the order")?;
    let chain = order.poll_certificate(&retry).await.context("downloading the certificate")?;
    Ok((chain, key_pem))
}
