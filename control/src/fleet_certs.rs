//! `[cluster]` certificates on PostgreSQL (migration 0006): the fleet's one ACME account, its
//! certificates with their keys sealed by the `secret_file` key, the challenges of orders in
//! flight, and the per-name advisory lock under which one gateway orders for all.
//!
//! Three loops run on the certificate service's runtime, supervised:
//! - `certs follow`: LISTEN `markco_certs`; a site name makes this gateway serve the certificate
//!   the fleet stored for it, from its next handshake; `* challenges` re-reads the TLS-ALPN-01
//!   challenges in flight. Every [`REFRESH`] (and after a reconnect) everything is re-read, so a
//!   lost NOTIFY costs a delay, never a certificate.
//! - `certs lookups`: answers the gateway's HTTP-01 misses from `markco_acme_challenges` (the CA
//!   may validate another gateway's order through this one), one query at a time, each bounded.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use async_trait::async_trait;
use markco_certs::acme::Challenge;
use markco_certs::shared::{FleetLock, PendingChallenge, SharedCerts};
use markco_certs::{CertManager, SecretKey};
use markco_proxy::gateway::AcmeLookup;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::{mpsc, oneshot, watch};

use crate::supervise::Supervisor;

/// The NOTIFY channel: payload a site name (its certificate changed) or [`CHALLENGES_PAYLOAD`].
pub const CERTS_CHANNEL: &str = "markco_certs";
/// Not a host name (it has a space): the fleet's TLS-ALPN-01 challenges changed.
pub const CHALLENGES_PAYLOAD: &str = "* challenges";

/// `NOTIFY markco_certs, payload` within `tx`: delivered at its commit.
async fn notify(tx: &mut sqlx::PgConnection, payload: &str) -> anyhow::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CERTS_CHANNEL)
        .bind(payload)
        .execute(tx)
        .await
        .context("NOTIFY markco_certs")?;
    Ok(())
}

/// The first key of the two-key advisory locks of certificate orders ("mkc#" in ASCII); the second
/// is `hashtext` of the lock's name. Two-key locks never collide with one-key (bigint) ones.
const LOCK_CLASS: i32 = 0x6d6b_6323;
/// How often every stored certificate is re-read even without a NOTIFY.
pub const REFRESH: Duration = Duration::from_secs(30);
/// How long the gateway's request waits for a shared HTTP-01 answer.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// The lock's own connection must be up within this.
const LOCK_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Lookups waiting for the database; beyond, a lookup is answered "unknown" at once.
const LOOKUP_QUEUE: usize = 64;

/// What every gateway shares about certificates, in PostgreSQL.
pub struct PgSharedCerts {
    pool: PgPool,
    options: PgConnectOptions,
    key: SecretKey,
    node: String,
}

impl PgSharedCerts {
    /// A small pool of its own, on the calling runtime (the certificate service's).
    pub async fn connect(url: &str, key: SecretKey, node: &str) -> anyhow::Result<PgSharedCerts> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| anyhow!("invalid PostgreSQL URL ({e})"))?
            .application_name(&format!("markco certs {node}"));
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await
            .context("connecting to PostgreSQL for the fleet's certificates")?;
        Ok(PgSharedCerts { pool, options, key, node: node.to_string() })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The key authorization of a pending HTTP-01 token.
    pub async fn http01_answer(&self, token: &str) -> anyhow::Result<Option<String>> {
        sqlx::query_scalar(
            "SELECT answer FROM markco_acme_challenges WHERE token = $1 AND kind = 'http-01' AND expires_at > now()",
        )
        .bind(token)
        .fetch_optional(&self.pool)
        .await
        .context("looking up an HTTP-01 token")
    }
}

fn account_context(directory: &str) -> String {
    format!("ACME account of {directory}")
}

/// What a certificate key is sealed to (its row).
pub fn key_context(directory: &str, name: &str) -> String {
    format!("certificate key of {name} from {directory}")
}

/// A session advisory lock on a connection of its own: closing the connection (or losing it)
/// frees the lock, whatever happened to this process.
struct PgLock {
    conn: Option<PgConnection>,
    key: String,
}

#[async_trait]
impl FleetLock for PgLock {
    async fn release(mut self: Box<Self>) {
        if let Some(mut conn) = self.conn.take() {
            let unlocked = sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
                .bind(LOCK_CLASS)
                .bind(&self.key)
                .execute(&mut conn)
                .await;
            if let Err(e) = unlocked {
                tracing::warn!(lock = %self.key, "releasing the fleet's lock failed ({e}); closing its connection frees it");
            }
            let _ = conn.close().await;
        }
    }
}

fn alpn(kind: Challenge) -> bool {
    kind == Challenge::TlsAlpn01
}

#[async_trait]
impl SharedCerts for PgSharedCerts {
    async fn lock(&self, key: &str, wait: Duration) -> anyhow::Result<Box<dyn FleetLock>> {
        let mut conn = tokio::time::timeout(LOCK_CONNECT_TIMEOUT, self.options.connect())
            .await
            .map_err(|_| {
                anyhow!("connecting to PostgreSQL for the fleet's lock timed out after {LOCK_CONNECT_TIMEOUT:?}")
            })?
            .context("connecting to PostgreSQL for the fleet's lock")?;
        let deadline = Instant::now() + wait;
        loop {
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
                .bind(LOCK_CLASS)
                .bind(key)
                .fetch_one(&mut conn)
                .await
                .with_context(|| format!("taking the fleet's lock {key:?}"))?;
            if got {
                return Ok(Box::new(PgLock { conn: Some(conn), key: key.to_string() }));
            }
            if Instant::now() >= deadline {
                let _ = conn.close().await;
                bail!("another gateway held the fleet's lock {key:?} for more than {wait:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn account(&self, directory: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let sealed: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT credentials FROM markco_acme_accounts WHERE directory = $1")
                .bind(directory)
                .fetch_optional(&self.pool)
                .await
                .context("reading markco_acme_accounts")?;
        sealed.map(|s| self.key.open(&s, &account_context(directory))).transpose()
    }

    async fn save_account(&self, directory: &str, credentials: &[u8]) -> anyhow::Result<()> {
        let sealed = self.key.seal(credentials, &account_context(directory))?;
        sqlx::query(
            "INSERT INTO markco_acme_accounts (directory, credentials, node) VALUES ($1, $2, $3) \
             ON CONFLICT (directory) DO UPDATE SET credentials = EXCLUDED.credentials, node = EXCLUDED.node, created_at = now()",
        )
        .bind(directory)
        .bind(sealed)
        .bind(&self.node)
        .execute(&self.pool)
        .await
        .context("writing markco_acme_accounts")?;
        Ok(())
    }

    async fn cert(&self, directory: &str, name: &str) -> anyhow::Result<Option<(Vec<u8>, Vec<u8>)>> {
        let row: Option<(String, Vec<u8>)> =
            sqlx::query_as("SELECT chain_pem, key_sealed FROM markco_certificates WHERE directory = $1 AND name = $2")
                .bind(directory)
                .bind(name)
                .fetch_optional(&self.pool)
                .await
                .context("reading markco_certificates")?;
        match row {
            None => Ok(None),
            Some((chain, sealed)) => {
                let key = self.key.open(&sealed, &key_context(directory, name))?;
                Ok(Some((chain.into_bytes(), key)))
            }
        }
    }

    async fn save_cert(
        &self,
        directory: &str,
        name: &str,
        chain_pem: &[u8],
        key_pem: &[u8],
        not_after: i64,
    ) -> anyhow::Result<()> {
        let chain = std::str::from_utf8(chain_pem).context("the certificate chain is not text")?;
        let sealed = self.key.seal(key_pem, &key_context(directory, name))?;
        let mut tx = self.pool.begin().await.context("storing a certificate")?;
        sqlx::query(
            "INSERT INTO markco_certificates (directory, name, chain_pem, key_sealed, not_after, node, updated_at) \
             VALUES ($1, $2, $3, $4, to_timestamp($5::float8), $6, now()) \
             ON CONFLICT (directory, name) DO UPDATE SET chain_pem = EXCLUDED.chain_pem, key_sealed = EXCLUDED.key_sealed, \
             not_after = EXCLUDED.not_after, node = EXCLUDED.node, updated_at = now()",
        )
        .bind(directory)
        .bind(name)
        .bind(chain)
        .bind(sealed)
        .bind(not_after as f64)
        .bind(&self.node)
        .execute(&mut *tx)
        .await
        .context("writing markco_certificates")?;
        // Delivered at commit, to every gateway listening (this one too, harmlessly).
        notify(&mut tx, name).await?;
        tx.commit().await.context("committing a certificate")?;
        Ok(())
    }

    async fn put_challenge(&self, c: &PendingChallenge, ttl: Duration) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await.context("publishing a challenge")?;
        sqlx::query("DELETE FROM markco_acme_challenges WHERE expires_at < now()")
            .execute(&mut *tx)
            .await
            .context("trimming markco_acme_challenges")?;
        sqlx::query(
            "INSERT INTO markco_acme_challenges (token, kind, host, answer, node, expires_at) \
             VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6::float8)) \
             ON CONFLICT (token) DO UPDATE SET kind = EXCLUDED.kind, host = EXCLUDED.host, answer = EXCLUDED.answer, \
             node = EXCLUDED.node, expires_at = EXCLUDED.expires_at",
        )
        .bind(&c.token)
        .bind(c.kind.as_str())
        .bind(&c.host)
        .bind(&c.answer)
        .bind(&self.node)
        .bind(ttl.as_secs_f64())
        .execute(&mut *tx)
        .await
        .context("writing markco_acme_challenges")?;
        if alpn(c.kind) {
            notify(&mut tx, CHALLENGES_PAYLOAD).await?;
        }
        tx.commit().await.context("committing a challenge")?;
        Ok(())
    }

    async fn remove_challenges(&self, tokens: &[String]) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await.context("withdrawing challenges")?;
        let kinds: Vec<String> =
            sqlx::query_scalar("DELETE FROM markco_acme_challenges WHERE token = ANY($1) RETURNING kind")
                .bind(tokens)
                .fetch_all(&mut *tx)
                .await
                .context("deleting from markco_acme_challenges")?;
        if kinds.iter().any(|k| k == Challenge::TlsAlpn01.as_str()) {
            notify(&mut tx, CHALLENGES_PAYLOAD).await?;
        }
        tx.commit().await.context("committing withdrawn challenges")?;
        Ok(())
    }

    async fn alpn_challenges(&self) -> anyhow::Result<Vec<PendingChallenge>> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT token, host, answer FROM markco_acme_challenges WHERE kind = 'tls-alpn-01' AND expires_at > now()",
        )
        .fetch_all(&self.pool)
        .await
        .context("reading markco_acme_challenges")?;
        Ok(rows
            .into_iter()
            .map(|(token, host, answer)| PendingChallenge { kind: Challenge::TlsAlpn01, token, host, answer })
            .collect())
    }
}

/// One HTTP-01 lookup waiting for the database.
pub struct TokenQuery {
    token: String,
    reply: oneshot::Sender<Option<String>>,
}

/// The gateway's side of the shared HTTP-01 lookups.
pub struct TokenLookups {
    tx: mpsc::Sender<TokenQuery>,
}

/// The gateway's handle and the receiving end [`join`] serves.
pub fn token_lookups() -> (Arc<TokenLookups>, mpsc::Receiver<TokenQuery>) {
    let (tx, rx) = mpsc::channel(LOOKUP_QUEUE);
    (Arc::new(TokenLookups { tx }), rx)
}

#[async_trait]
impl AcmeLookup for TokenLookups {
    async fn answer(&self, token: &str) -> Option<String> {
        let (reply, rx) = oneshot::channel();
        // Full (a flood of unknown tokens) or not served yet: unknown, at once.
        self.tx.try_send(TokenQuery { token: token.to_string(), reply }).ok()?;
        tokio::time::timeout(LOOKUP_TIMEOUT, rx).await.ok()?.ok()?
    }
}

/// What the certificate service needs to join the fleet.
pub struct FleetSetup {
    pub database_url: String,
    pub secret: SecretKey,
    pub node: String,
    pub lookups: mpsc::Receiver<TokenQuery>,
    pub supervisor: Supervisor,
}

/// Connects to the fleet's database (retrying until it answers or `shutdown`), gives the
/// manager its shared store, and starts the follow and lookup loops. Returns their handles (abort
/// them at shutdown), or `None` if shutdown came first.
pub async fn join(
    setup: FleetSetup,
    manager: Arc<CertManager>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Vec<tokio::task::JoinHandle<()>>> {
    let FleetSetup { database_url, secret, node, lookups, supervisor } = setup;
    let mut delay = Duration::from_secs(1);
    let shared = loop {
        match PgSharedCerts::connect(&database_url, secret.clone(), &node).await {
            Ok(s) => break Arc::new(s),
            Err(e) => {
                tracing::error!(
                    retry_in_s = delay.as_secs(),
                    "cannot reach the fleet's certificates ({e:#}); no order is made until it answers"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => return None,
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    };
    manager.set_shared(shared.clone());
    let mut handles = Vec::new();
    {
        let (manager, shared) = (manager.clone(), shared.clone());
        handles.push(supervisor.spawn("certs follow", move || follow(manager.clone(), shared.clone())));
    }
    {
        let lookups = Arc::new(tokio::sync::Mutex::new(lookups));
        let metrics = manager.store.metrics.clone();
        handles.push(
            supervisor.spawn("certs lookups", move || serve_lookups(shared.clone(), lookups.clone(), metrics.clone())),
        );
    }
    Some(handles)
}

/// Serves the fleet's certificates as they change.
async fn follow(manager: Arc<CertManager>, shared: Arc<PgSharedCerts>) {
    let sync_all = || async {
        for p in manager.sync_from_fleet(None).await {
            tracing::warn!("the fleet's certificate cannot be served: {p}");
        }
        if let Err(e) = manager.sync_fleet_challenges().await {
            tracing::warn!("reading the fleet's TLS-ALPN-01 challenges failed: {e:#}");
        }
    };
    loop {
        let mut listener = match PgListener::connect_with(shared.pool()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(
                    channel = CERTS_CHANNEL,
                    "cannot listen for the fleet's certificates ({e}); retrying in 1s"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(CERTS_CHANNEL).await {
            tracing::warn!(channel = CERTS_CHANNEL, "LISTEN failed ({e}); retrying in 1s");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // Whatever changed while nobody listened.
        sync_all().await;
        let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + REFRESH, REFRESH);
        loop {
            tokio::select! {
                n = listener.try_recv() => match n {
                    Ok(Some(n)) if n.payload() == CHALLENGES_PAYLOAD => {
                        if let Err(e) = manager.sync_fleet_challenges().await {
                            tracing::warn!("reading the fleet's TLS-ALPN-01 challenges failed: {e:#}");
                        }
                    }
                    Ok(Some(n)) => {
                        for p in manager.sync_from_fleet(Some(n.payload())).await {
                            tracing::warn!("the fleet's certificate cannot be served: {p}");
                        }
                    }
                    // The connection was lost; PgListener reconnects at the next call, and what
                    // was sent meanwhile is read again.
                    Ok(None) => {
                        tracing::info!(channel = CERTS_CHANNEL, "certificate listener reconnecting");
                        sync_all().await;
                    }
                    Err(e) => {
                        tracing::warn!(channel = CERTS_CHANNEL, "certificate listener failed ({e}); reconnecting");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                },
                _ = refresh.tick() => sync_all().await,
            }
        }
    }
}

async fn serve_lookups(
    shared: Arc<PgSharedCerts>,
    lookups: Arc<tokio::sync::Mutex<mpsc::Receiver<TokenQuery>>>,
    metrics: markco_certs::TlsMetrics,
) {
    let mut rx = lookups.lock().await;
    while let Some(q) = rx.recv().await {
        if q.reply.is_closed() {
            continue;
        }
        let answer = match tokio::time::timeout(LOOKUP_TIMEOUT, shared.http01_answer(&q.token)).await {
            Ok(Ok(Some(a))) => {
                metrics.challenge_lookup("hit");
                tracing::info!(token = %q.token, "answering an HTTP-01 validation of another gateway's order");
                Some(a)
            }
            Ok(Ok(None)) => {
                metrics.challenge_lookup("miss");
                None
            }
            Ok(Err(e)) => {
                metrics.challenge_lookup("error");
                tracing::warn!("shared HTTP-01 lookup failed: {e:#}");
                None
            }
            Err(_) => {
                metrics.challenge_lookup("error");
                tracing::warn!("shared HTTP-01 lookup timed out");
                None
            }
        };
        let _ = q.reply.send(answer);
    }
}
