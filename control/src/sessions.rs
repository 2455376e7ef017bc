//! The session cache: token → user, with a short positive TTL and a shorter negative one. A miss
//! asks the control plane over a channel (the database lives on the control plane's runtime);
//! hits never leave the calling thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use markco_proxy::identity::{Identity, IdentityError};
use moka::sync::Cache;
use moka::Expiry;
use tokio::sync::{mpsc, oneshot};

/// A cached answer: the user, or `None` for "no such valid session".
type Answer = Option<Arc<str>>;

#[derive(Debug, Clone, Copy)]
pub struct SessionSettings {
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub capacity: u64,
    /// How long a request waits for the control plane on a miss.
    pub lookup_timeout: Duration,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
            capacity: 100_000,
            lookup_timeout: Duration::from_secs(2),
        }
    }
}

/// A lookup the control plane answers from the database.
pub struct Lookup {
    pub token: String,
    pub reply: oneshot::Sender<anyhow::Result<Option<String>>>,
}

struct TtlPolicy {
    positive: Duration,
    negative: Duration,
}

impl Expiry<String, Answer> for TtlPolicy {
    fn expire_after_create(&self, _k: &String, v: &Answer, _now: Instant) -> Option<Duration> {
        Some(if v.is_some() { self.positive } else { self.negative })
    }
}

pub struct SessionCache {
    cache: Cache<String, Answer>,
    lookups: mpsc::Sender<Lookup>,
    timeout: Duration,
}

impl SessionCache {
    /// The cache and the receiving end the control plane serves.
    pub fn new(settings: SessionSettings) -> (Arc<SessionCache>, mpsc::Receiver<Lookup>) {
        let (tx, rx) = mpsc::channel(1024);
        let cache = Cache::builder()
            .max_capacity(settings.capacity)
            .expire_after(TtlPolicy { positive: settings.ttl, negative: settings.negative_ttl })
            .support_invalidation_closures()
            .build();
        (Arc::new(SessionCache { cache, lookups: tx, timeout: settings.lookup_timeout }), rx)
    }

    /// Forgets one token (its session row changed or was deleted).
    pub fn invalidate_token(&self, token: &str) {
        self.cache.invalidate(token);
    }

    /// Forgets every cached session of a user (logout everywhere, account deletion).
    pub fn invalidate_user(&self, user: &str) {
        let user: Arc<str> = Arc::from(user);
        // Only errors when closures are not enabled, which they are.
        let _ = self.cache.invalidate_entries_if(move |_, v| v.as_deref() == Some(&*user));
        self.cache.run_pending_tasks();
    }

    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }
}

#[async_trait]
impl Identity for SessionCache {
    async fn user_of(&self, token: &str) -> Result<Option<Arc<str>>, IdentityError> {
        // Absurd tokens are not worth a database round trip or a cache slot.
        if token.len() > 512 {
            return Ok(None);
        }
        if let Some(hit) = self.cache.get(token) {
            return Ok(hit);
        }
        let (reply, rx) = oneshot::channel();
        self.lookups
            .try_send(Lookup { token: token.to_string(), reply })
            .map_err(|e| IdentityError::Unavailable(format!("control plane busy or stopped: {e}")))?;
        let answer = match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(Ok(user))) => user.map(Arc::<str>::from),
            Ok(Ok(Err(e))) => return Err(IdentityError::Unavailable(format!("{e:#}"))),
            Ok(Err(_)) => return Err(IdentityError::Unavailable("control plane stopped".into())),
            Err(_) => return Err(IdentityError::Unavailable("session lookup timed out".into())),
        };
        self.cache.insert(token.to_string(), answer.clone());
        Ok(answer)
    }
}
