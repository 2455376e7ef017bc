//! Which hosts get which certificate, and the loop that obtains and renews them: checked
//! periodically with jitter, renewed when the configured part of the lifetime is left, retried
//! with exponential backoff on failure while the current certificate keeps serving. Nothing here
//! ever blocks start-up: stored certificates are served at once and orders run in the background.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use instant_acme::Account;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use tokio::sync::{watch, Notify};

use crate::acme::{self, Challenge, Http01Tokens};
use crate::pem::{self, now_unix};
use crate::storage::Storage;
use crate::store::{CertSource, CertStore, LoadedCert};

#[derive(Debug, Clone, PartialEq)]
pub enum SiteTls {
    Off,
    Acme,
    Files { cert: PathBuf, key: PathBuf },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ManagedSite {
    /// The first host: names the certificate in storage and logs.
    pub name: String,
    pub hosts: Vec<String>,
    pub tls: SiteTls,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RenewBefore {
    /// Renew when less than this fraction of the lifetime is left.
    Fraction(f64),
    /// Renew when less than this much time is left.
    Remaining(Duration),
}

#[derive(Debug, Clone, PartialEq)]
pub struct AcmeConfig {
    pub email: Option<String>,
    pub directory: String,
    pub ca_root: Option<PathBuf>,
    pub storage: PathBuf,
    pub challenges: Vec<Challenge>,
    pub renew_before: RenewBefore,
    pub check_interval: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// How long one order may wait for validation and issuance.
    pub order_timeout: Duration,
}

pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig {
            email: None,
            directory: LETS_ENCRYPT.to_string(),
            ca_root: None,
            storage: PathBuf::from("data/certs"),
            challenges: vec![Challenge::TlsAlpn01, Challenge::Http01],
            renew_before: RenewBefore::Fraction(1.0 / 3.0),
            check_interval: Duration::from_secs(3600),
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(24 * 3600),
            order_timeout: Duration::from_secs(90),
        }
    }
}

/// Is a certificate due for renewal?
pub fn due(not_before: i64, not_after: i64, now: i64, rule: RenewBefore) -> bool {
    let remaining = not_after - now;
    match rule {
        RenewBefore::Fraction(f) => (remaining as f64) < ((not_after - not_before) as f64) * f,
        RenewBefore::Remaining(d) => remaining < d.as_secs() as i64,
    }
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    /// Unix seconds before which no new order is tried.
    next_try: i64,
    delay: Duration,
}

pub struct CertManager {
    pub store: Arc<CertStore>,
    pub tokens: Http01Tokens,
    settings: ArcSwap<AcmeConfig>,
    sites: ArcSwap<Vec<ManagedSite>>,
    wake: Notify,
    backoff: Mutex<HashMap<String, Backoff>>,
    account: tokio::sync::Mutex<Option<(String, Account)>>,
}

impl CertManager {
    pub fn new(store: Arc<CertStore>, settings: AcmeConfig) -> CertManager {
        CertManager {
            store,
            tokens: Http01Tokens::default(),
            settings: ArcSwap::from_pointee(settings),
            sites: ArcSwap::default(),
            wake: Notify::new(),
            backoff: Mutex::new(HashMap::new()),
            account: tokio::sync::Mutex::new(None),
        }
    }

    fn storage(&self) -> Storage {
        let s = self.settings.load();
        Storage::new(&s.storage, &s.directory)
    }

    /// Takes a (re)loaded config: loads certificate files and stored ACME certificates into the
    /// store and wakes the renewal loop. Returns one message per site it could not serve.
    pub fn apply(&self, settings: AcmeConfig, sites: Vec<ManagedSite>) -> Vec<String> {
        let mut problems = Vec::new();
        self.settings.store(Arc::new(settings));
        let storage = self.storage();
        let mut keep = Vec::new();
        for site in &sites {
            match &site.tls {
                SiteTls::Off => continue,
                SiteTls::Files { cert, key } => match pem::load_for_hosts(cert, key, &site.hosts) {
                    Ok(c) => self.store.install(&site.hosts, Arc::new(c)),
                    Err(e) => problems.push(format!("site {}: {e}", site.name)),
                },
                SiteTls::Acme => {
                    // Keep what is served if it is still for these hosts; else look on disk.
                    let current = self.store.get(&site.name).filter(|c| c.info.source == CertSource::Acme);
                    if current.is_none() {
                        if let Some((c, k)) = storage.load_cert(&site.name) {
                            match pem::parse(&c, &k, CertSource::Acme) {
                                Ok(l) if site.hosts.iter().all(|h| pem::covers(&l.info.names, h)) => {
                                    tracing::info!(site = %site.name, serial = %l.info.serial, "serving the stored certificate");
                                    self.store.install(&site.hosts, Arc::new(l));
                                }
                                Ok(_) => {
                                    tracing::info!(site = %site.name, "stored certificate does not cover the site's hosts; ordering a new one")
                                }
                                Err(e) => {
                                    tracing::warn!(site = %site.name, "stored certificate is unusable ({e}); ordering a new one")
                                }
                            }
                        }
                    }
                }
            }
            keep.extend(site.hosts.iter().cloned());
        }
        self.store.retain_hosts(&keep);
        self.sites.store(Arc::new(sites));
        self.wake.notify_one();
        problems
    }

    /// The renewal loop; returns when `shutdown` turns true.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let next_in = self.round().await;
            tokio::select! {
                _ = tokio::time::sleep(next_in) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }

    /// One pass over the ACME sites. Returns how long to sleep before the next pass.
    async fn round(&self) -> Duration {
        let settings = self.settings.load_full();
        let sites = self.sites.load_full();
        // ±10% jitter so many gateways do not hit the CA in step.
        let jitter = 0.9 + fastrand::f64() * 0.2;
        let mut sleep = settings.check_interval.mul_f64(jitter);
        for site in sites.iter().filter(|s| s.tls == SiteTls::Acme) {
            let now = now_unix();
            let current = self.store.get(&site.name).filter(|c| c.info.source == CertSource::Acme);
            let needed = match &current {
                None => true,
                Some(c) => due(c.info.not_before, c.info.not_after, now, settings.renew_before),
            };
            if !needed {
                continue;
            }
            let wait = self.backoff_of(&site.name).map(|b| b.next_try - now).unwrap_or(0);
            if wait > 0 {
                sleep = sleep.min(Duration::from_secs(wait as u64));
                continue;
            }
            match self.obtain(&settings, site).await {
                Ok(cert) => {
                    tracing::info!(site = %site.name, serial = %cert.info.serial, not_after = cert.info.not_after, "certificate obtained; serving it from the next handshake");
                    self.store.install(&site.hosts, Arc::new(cert));
                    self.store.metrics.last_renewal.set(now_unix() as f64);
                    self.backoff.lock().unwrap_or_else(|p| p.into_inner()).remove(&site.name);
                }
                Err(e) => {
                    let b = self.fail(&site.name, &settings);
                    let serving = if current.is_some() {
                        "the current certificate keeps serving"
                    } else {
                        "handshakes for its hosts fail until one is obtained"
                    };
                    tracing::error!(site = %site.name, retry_in_s = b.delay.as_secs(), "certificate order failed ({e:#}); {serving}");
                    sleep = sleep.min(b.delay);
                }
            }
        }
        sleep.max(Duration::from_millis(200))
    }

    fn backoff_of(&self, name: &str) -> Option<Backoff> {
        self.backoff.lock().unwrap_or_else(|p| p.into_inner()).get(name).copied()
    }

    /// Records a failure: the delay doubles up to the cap.
    fn fail(&self, name: &str, settings: &AcmeConfig) -> Backoff {
        let mut map = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        let delay = match map.get(name) {
            None => settings.retry_initial,
            Some(b) => (b.delay * 2).min(settings.retry_max),
        };
        let b = Backoff { next_try: now_unix() + delay.as_secs().max(1) as i64, delay };
        map.insert(name.to_string(), b);
        b
    }

    async fn account(&self, settings: &AcmeConfig) -> anyhow::Result<Account> {
        let mut cached = self.account.lock().await;
        if let Some((dir, acc)) = cached.as_ref() {
            if *dir == settings.directory {
                return Ok(acc.clone());
            }
        }
        let storage = Storage::new(&settings.storage, &settings.directory);
        let acc = acme::account(&storage, &settings.directory, settings.ca_root.as_deref(), settings.email.as_deref())
            .await?;
        *cached = Some((settings.directory.clone(), acc.clone()));
        Ok(acc)
    }

    /// Orders a certificate, trying each configured challenge in turn, and stores it.
    async fn obtain(&self, settings: &AcmeConfig, site: &ManagedSite) -> anyhow::Result<LoadedCert> {
        let account = match self.account(settings).await {
            Ok(a) => a,
            Err(e) => {
                self.store.metrics.order(false);
                return Err(e);
            }
        };
        let mut errors = Vec::new();
        for &challenge in &settings.challenges {
            tracing::info!(site = %site.name, hosts = ?site.hosts, challenge = challenge.as_str(), "ordering a certificate");
            match acme::issue(&account, &site.hosts, challenge, &self.tokens, &self.store, settings.order_timeout).await
            {
                Ok((chain, key)) => {
                    self.store.metrics.order(true);
                    let cert = pem::parse(chain.as_bytes(), key.as_bytes(), CertSource::Acme)
                        .map_err(|e| anyhow::anyhow!("the issued certificate is unusable: {e}"))?;
                    self.storage().save_cert(&site.name, chain.as_bytes(), key.as_bytes())?;
                    return Ok(cert);
                }
                Err(e) => {
                    self.store.metrics.order(false);
                    tracing::warn!(site = %site.name, challenge = challenge.as_str(), "order failed: {e:#}");
                    errors.push(format!("{}: {e:#}", challenge.as_str()));
                }
            }
        }
        anyhow::bail!("{}", errors.join("; "))
    }
}

/// Counts completed handshakes by protocol version.
pub struct HandshakeCounter {
    pub store: Arc<CertStore>,
}

#[async_trait]
impl TlsAccept for HandshakeCounter {
    async fn handshake_complete_callback(&self, tls: &TlsRef) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        self.store.metrics.handshake("ok", tls.version().unwrap_or("unknown"));
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_due() {
        let day = 86400;
        // A 90-day certificate: a third of its life is 30 days.
        assert!(!due(0, 90 * day, 59 * day, RenewBefore::Fraction(1.0 / 3.0)));
        assert!(due(0, 90 * day, 61 * day, RenewBefore::Fraction(1.0 / 3.0)));
        assert!(due(0, 90 * day, 61 * day, RenewBefore::Remaining(Duration::from_secs(30 * day as u64))));
        assert!(!due(0, 90 * day, 59 * day, RenewBefore::Remaining(Duration::from_secs(30 * day as u64))));
        // A window wider than the life: always due.
        assert!(due(0, 90 * day, 0, RenewBefore::Remaining(Duration::from_secs(100 * day as u64))));
    }
}
