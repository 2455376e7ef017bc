//! Which hosts get which certificate, and the loop that obtains and renews them: checked
//! periodically with jitter, renewed when the configured part of the lifetime is left, retried
//! with exponential backoff on failure while the current certificate keeps serving. Nothing here
//! ever blocks start-up: stored certificates are served at once and orders run in the background.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use instant_acme::Account;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use tokio::sync::{watch, Notify};

use crate::acme::{self, Challenge, Http01Tokens};
use crate::pem::{self, now_unix};
use crate::shared::{order_lock_key, SharedCerts};
use crate::storage::Storage;
use crate::store::{CertInfo, CertSource, CertStore, LoadedCert};

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
    /// `[cluster]`: the fleet's shared account, certificates, lock and challenges.
    shared: OnceLock<Arc<dyn SharedCerts>>,
    /// `[cluster]` without a shared store (no `secret_file`): never order alone.
    fleet_required: std::sync::atomic::AtomicBool,
    /// TLS-ALPN-01 challenges another gateway published, installed here: host → key authorization.
    fleet_alpn: Mutex<HashMap<String, String>>,
}

/// When the fleet's stored certificate is taken instead of what this gateway serves.
#[derive(Debug, Clone, Copy)]
enum AdoptIf<'a> {
    /// It is not due for renewal (before deciding to order).
    NotDue,
    /// It is not the one served when this gateway decided to order (under the order lock:
    /// another gateway ordered meanwhile).
    ChangedSince(Option<&'a str>),
    /// It is another one that lasts at least as long as the served one (NOTIFY, refresh).
    Newer,
}

impl AdoptIf<'_> {
    /// Whether to take the fleet's certificate `fleet` over the served `current`: `None` no,
    /// `Some(true)` yes and install it, `Some(false)` yes, it is already served.
    fn decide(self, current: Option<&CertInfo>, fleet: &CertInfo, now: i64, rule: RenewBefore) -> Option<bool> {
        let same = current.is_some_and(|c| c.serial == fleet.serial);
        // Another certificate than the one served, lasting at least as long.
        let newer = current.is_none_or(|c| !same && c.not_after <= fleet.not_after);
        let take = match self {
            AdoptIf::NotDue => (newer || same) && !due(fleet.not_before, fleet.not_after, now, rule),
            AdoptIf::ChangedSince(before) => before != Some(fleet.serial.as_str()) && (newer || same),
            AdoptIf::Newer => newer,
        };
        take.then_some(newer)
    }
}

/// What a pass did for one site that needed a certificate.
enum Outcome {
    /// This gateway ordered it (it is served already).
    Ordered(Arc<LoadedCert>),
    /// Another gateway of the fleet had just obtained it (found under the lock).
    FromFleet,
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
            shared: OnceLock::new(),
            fleet_required: std::sync::atomic::AtomicBool::new(false),
            fleet_alpn: Mutex::new(HashMap::new()),
        }
    }

    /// Joins a fleet (`[cluster]`): from now on the account, the certificates and the challenges
    /// are shared, and each order is taken under the fleet-wide lock of its name. Call before
    /// [`CertManager::run`]; a second call is ignored.
    pub fn set_shared(&self, shared: Arc<dyn SharedCerts>) {
        let _ = self.shared.set(shared);
    }

    /// This gateway is one of a fleet but has no shared store: it orders nothing (an order of
    /// its own would break "one order per name for the fleet").
    pub fn require_fleet(&self) {
        self.fleet_required.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn shared(&self) -> Option<&dyn SharedCerts> {
        self.shared.get().map(|s| &**s)
    }

    /// Reads the fleet's certificate of `site` and, if `rule` says so, serves it from the next
    /// handshake. Returns whether the fleet's certificate is taken (it may already be served).
    /// A certificate that does not cover the site's hosts, or has expired, is never taken.
    async fn adopt_from_fleet(
        &self,
        shared: &dyn SharedCerts,
        settings: &AcmeConfig,
        site: &ManagedSite,
        rule: AdoptIf<'_>,
    ) -> anyhow::Result<bool> {
        let Some((chain, key)) = shared.cert(&settings.directory, &site.name).await? else {
            return Ok(false);
        };
        let cert = match pem::parse(&chain, &key, CertSource::Acme) {
            Ok(c) => c,
            Err(e) => {
                // As if there were none: under the lock, a new order replaces it.
                tracing::warn!(site = %site.name, "the fleet's stored certificate is unusable ({e}); ignoring it");
                return Ok(false);
            }
        };
        let now = now_unix();
        if !site.hosts.iter().all(|h| pem::covers(&cert.info.names, h)) || cert.info.not_after <= now {
            return Ok(false);
        }
        let current = self.store.get(&site.name).filter(|c| c.info.source == CertSource::Acme);
        let Some(install) = rule.decide(current.as_ref().map(|c| &c.info), &cert.info, now, settings.renew_before)
        else {
            return Ok(false);
        };
        if install {
            tracing::info!(site = %site.name, serial = %cert.info.serial, not_after = cert.info.not_after, "serving the certificate the fleet obtained, from the next handshake");
            if let Err(e) = self.storage().save_cert(&site.name, &chain, &key) {
                tracing::warn!(site = %site.name, "keeping a local copy of the fleet's certificate failed: {e:#}");
            }
            self.store.install(&site.hosts, Arc::new(cert));
            self.store.metrics.fleet("adopted");
        }
        Ok(true)
    }

    /// Serves what the fleet stored for the ACME sites (all, or the one named `only`): called on
    /// a NOTIFY from the gateway that obtained a certificate, and periodically in case one was
    /// lost. Returns one message per site whose stored certificate could not be read.
    pub async fn sync_from_fleet(&self, only: Option<&str>) -> Vec<String> {
        let Some(shared) = self.shared() else { return Vec::new() };
        let settings = self.settings.load_full();
        let sites = self.sites.load_full();
        let mut problems = Vec::new();
        for site in sites.iter().filter(|s| s.tls == SiteTls::Acme && only.is_none_or(|n| n == s.name)) {
            if let Err(e) = self.adopt_from_fleet(shared, &settings, site, AdoptIf::Newer).await {
                problems.push(format!("site {}: {e:#}", site.name));
            }
        }
        problems
    }

    /// Installs the TLS-ALPN-01 challenge certificates the fleet has in flight and removes those
    /// withdrawn, so this gateway answers a CA that validates another gateway's order.
    pub async fn sync_fleet_challenges(&self) -> anyhow::Result<()> {
        let Some(shared) = self.shared() else { return Ok(()) };
        let pending = shared.alpn_challenges().await?;
        let wanted: HashMap<String, String> = pending.into_iter().map(|c| (c.host, c.answer)).collect();
        let mut installed = self.fleet_alpn.lock().unwrap_or_else(|p| p.into_inner());
        installed.retain(|host, answer| {
            let keep = wanted.get(host) == Some(answer);
            if !keep {
                self.store.clear_challenge(host);
            }
            keep
        });
        for (host, answer) in wanted {
            if installed.contains_key(&host) {
                continue;
            }
            use sha2::Digest as _;
            let digest = sha2::Sha256::digest(answer.as_bytes());
            match acme::alpn_challenge_cert(&host, &digest) {
                Ok(key) => {
                    self.store.set_challenge(&host, key);
                    tracing::info!(%host, "answering the fleet's TLS-ALPN-01 challenge");
                    installed.insert(host, answer);
                }
                Err(e) => tracing::warn!(%host, "cannot make the fleet's TLS-ALPN-01 challenge certificate: {e:#}"),
            }
        }
        Ok(())
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
            if let Some(shared) = self.shared() {
                // Another gateway may have obtained (or renewed) it already.
                match self.adopt_from_fleet(shared, &settings, site, AdoptIf::NotDue).await {
                    Ok(true) => {
                        self.backoff.lock().unwrap_or_else(|p| p.into_inner()).remove(&site.name);
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(site = %site.name, "reading the fleet's certificate failed: {e:#}"),
                }
            }
            let wait = self.backoff_of(&site.name).map(|b| b.next_try - now).unwrap_or(0);
            if wait > 0 {
                sleep = sleep.min(Duration::from_secs(wait as u64));
                continue;
            }
            let result = match self.shared() {
                Some(shared) => {
                    let before = current.as_ref().map(|c| c.info.serial.clone());
                    self.obtain_for_fleet(shared, &settings, site, before).await
                }
                None if self.fleet_required.load(std::sync::atomic::Ordering::Relaxed) => Err(anyhow::anyhow!(
                    "this gateway is in a [cluster] without `secret_file`: it cannot share certificates, so it orders none (set secret_file and restart)"
                )),
                None => self.obtain(&settings, site).await.map(Outcome::Ordered),
            };
            match result {
                Ok(Outcome::FromFleet) => {
                    self.backoff.lock().unwrap_or_else(|p| p.into_inner()).remove(&site.name);
                }
                Ok(Outcome::Ordered(cert)) => {
                    tracing::info!(site = %site.name, serial = %cert.info.serial, not_after = cert.info.not_after, "certificate obtained; serving it from the next handshake");
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

    /// How long a gateway waits for another that holds a fleet-wide lock (it is ordering).
    fn lock_wait(settings: &AcmeConfig) -> Duration {
        settings.order_timeout * (settings.challenges.len().max(1) as u32 + 1) + Duration::from_secs(60)
    }

    /// Orders for the fleet: under the fleet-wide lock of the name, unless the fleet's stored
    /// certificate is no longer `before` (the one this gateway served when it found the
    /// certificate due): then another gateway obtained or renewed it meanwhile (it held the lock
    /// while we waited), and that one is served instead.
    async fn obtain_for_fleet(
        &self,
        shared: &dyn SharedCerts,
        settings: &AcmeConfig,
        site: &ManagedSite,
        before: Option<String>,
    ) -> anyhow::Result<Outcome> {
        let key = order_lock_key(&settings.directory, &site.name);
        let started = std::time::Instant::now();
        let lock = shared.lock(&key, Self::lock_wait(settings)).await?;
        tracing::debug!(site = %site.name, waited_ms = started.elapsed().as_millis() as u64, "holding the fleet's order lock");
        let result = async {
            if self.adopt_from_fleet(shared, settings, site, AdoptIf::ChangedSince(before.as_deref())).await? {
                return Ok(Outcome::FromFleet);
            }
            self.obtain(settings, site).await.map(Outcome::Ordered)
        }
        .await;
        lock.release().await;
        result
    }

    async fn account(&self, settings: &AcmeConfig) -> anyhow::Result<Account> {
        let mut cached = self.account.lock().await;
        if let Some((dir, acc)) = cached.as_ref() {
            if *dir == settings.directory {
                return Ok(acc.clone());
            }
        }
        let ca_root = settings.ca_root.as_deref();
        let acc = match self.shared() {
            Some(shared) => {
                let wait = Self::lock_wait(settings);
                acme::shared_account(shared, &settings.directory, ca_root, settings.email.as_deref(), wait).await?
            }
            None => {
                let storage = Storage::new(&settings.storage, &settings.directory);
                acme::account(&storage, &settings.directory, ca_root, settings.email.as_deref()).await?
            }
        };
        *cached = Some((settings.directory.clone(), acc.clone()));
        Ok(acc)
    }

    /// Orders a certificate, trying each configured challenge in turn, serves it from the next
    /// handshake, and stores it (for the fleet too, with `[cluster]`).
    async fn obtain(&self, settings: &AcmeConfig, site: &ManagedSite) -> anyhow::Result<Arc<LoadedCert>> {
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
            let shared = self.shared();
            match acme::issue(
                &account,
                &site.hosts,
                challenge,
                &self.tokens,
                &self.store,
                settings.order_timeout,
                shared,
            )
            .await
            {
                Ok((chain, key)) => {
                    self.store.metrics.order(true);
                    let cert = Arc::new(
                        pem::parse(chain.as_bytes(), key.as_bytes(), CertSource::Acme)
                            .map_err(|e| anyhow::anyhow!("the issued certificate is unusable: {e}"))?,
                    );
                    // Served before the fleet hears of it (its NOTIFY reaches this gateway too).
                    self.store.install(&site.hosts, cert.clone());
                    if let Some(shared) = shared {
                        // Before the lock is released: a gateway that waited finds it.
                        let stored = shared
                            .save_cert(
                                &settings.directory,
                                &site.name,
                                chain.as_bytes(),
                                key.as_bytes(),
                                cert.info.not_after,
                            )
                            .await;
                        if let Err(e) = stored {
                            tracing::error!(site = %site.name, "storing the certificate for the fleet failed ({e:#}); this gateway serves it, the others order their own");
                        }
                    }
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

    fn info(serial: &str, not_before: i64, not_after: i64) -> CertInfo {
        CertInfo {
            names: vec!["a.test".into()],
            issuer: "CA".into(),
            serial: serial.into(),
            not_before,
            not_after,
            source: CertSource::Acme,
        }
    }

    #[test]
    fn which_fleet_certificate_is_taken() {
        let day = 86400;
        let rule = RenewBefore::Fraction(1.0 / 3.0);
        let now = 100 * day;
        let old = info("01", 10 * day, 100 * day + 10); // due (10 s left)
        let fresh = info("02", 99 * day, 189 * day); // not due
        let fresh_but_due = info("03", 99 * day, 100 * day + 20);
        let older = info("04", 0, 90 * day); // ends before `old`

        // Before ordering: only a certificate that is not due, served already or not.
        assert_eq!(AdoptIf::NotDue.decide(None, &fresh, now, rule), Some(true));
        assert_eq!(AdoptIf::NotDue.decide(Some(&old), &fresh, now, rule), Some(true));
        assert_eq!(AdoptIf::NotDue.decide(Some(&fresh), &fresh, now, rule), Some(false));
        assert_eq!(AdoptIf::NotDue.decide(Some(&old), &fresh_but_due, now, rule), None);
        assert_eq!(AdoptIf::NotDue.decide(Some(&old), &old, now, rule), None);

        // Under the lock: anything that changed since the decision, even due, unless older.
        assert_eq!(AdoptIf::ChangedSince(Some("01")).decide(Some(&old), &fresh_but_due, now, rule), Some(true));
        assert_eq!(AdoptIf::ChangedSince(Some("01")).decide(Some(&old), &old, now, rule), None, "unchanged: order");
        assert_eq!(AdoptIf::ChangedSince(None).decide(None, &fresh, now, rule), Some(true));
        // Installed by a NOTIFY while waiting for the lock: taken, nothing to install.
        assert_eq!(AdoptIf::ChangedSince(Some("01")).decide(Some(&fresh), &fresh, now, rule), Some(false));
        assert_eq!(AdoptIf::ChangedSince(Some("01")).decide(Some(&old), &older, now, rule), None);

        // NOTIFY and re-read: only another certificate lasting at least as long.
        assert_eq!(AdoptIf::Newer.decide(Some(&old), &fresh_but_due, now, rule), Some(true));
        assert_eq!(AdoptIf::Newer.decide(Some(&fresh), &fresh, now, rule), None);
        assert_eq!(AdoptIf::Newer.decide(Some(&old), &older, now, rule), None);
        assert_eq!(AdoptIf::Newer.decide(None, &old, now, rule), Some(true));
    }

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
