//! The session cache: token → user, with a short positive TTL and a shorter negative one. A miss
//! asks the control plane over a channel (the database lives on the control plane's runtime);
//! hits never leave the calling thread.
//!
//! Database outage: a session the database confirmed within the last `outage_grace` keeps being
//! served when a lookup fails (the database is unreachable or the control plane is busy), so users
//! who were working go on working; a token never seen gets 503 as before. While lookups fail, such
//! sessions are answered at once (no wait for `lookup_timeout`) and revalidated in the background,
//! which is also how the cache notices that the database is back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use markco_proxy::identity::{Identity, IdentityError};
use moka::sync::Cache;
use moka::Expiry;
use tokio::sync::{mpsc, oneshot};

/// An answer: the user, or `None` for "no such valid session".
type Answer = Option<Arc<str>>;

/// A cached answer and how long it may be used without asking again.
#[derive(Clone)]
struct Cached {
    user: Answer,
    ttl: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct SessionSettings {
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub capacity: u64,
    /// How long a request waits for the control plane on a miss.
    pub lookup_timeout: Duration,
    /// How long after its last successful validation a session is still served while lookups
    /// fail (database outage). Zero: never.
    pub outage_grace: Duration,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
            capacity: 100_000,
            lookup_timeout: Duration::from_secs(2),
            outage_grace: Duration::from_secs(600),
        }
    }
}

/// A lookup the control plane answers from the database.
pub struct Lookup {
    pub token: String,
    pub reply: oneshot::Sender<anyhow::Result<Option<String>>>,
}

struct TtlPolicy;

impl Expiry<String, Cached> for TtlPolicy {
    fn expire_after_create(&self, _k: &String, v: &Cached, _now: Instant) -> Option<Duration> {
        Some(v.ttl)
    }
}

pub struct SessionCache {
    cache: Cache<String, Cached>,
    /// Sessions the database confirmed, with when; entries leave `outage_grace` after that.
    confirmed: Cache<String, (Arc<str>, Instant)>,
    lookups: mpsc::Sender<Lookup>,
    settings: SessionSettings,
    /// The last lookup failed (the database is likely down); the next success clears it.
    failing: Arc<AtomicBool>,
}

impl SessionCache {
    /// The cache and the receiving end the control plane serves.
    pub fn new(settings: SessionSettings) -> (Arc<SessionCache>, mpsc::Receiver<Lookup>) {
        let (tx, rx) = mpsc::channel(1024);
        let cache = Cache::builder()
            .max_capacity(settings.capacity)
            .expire_after(TtlPolicy)
            .support_invalidation_closures()
            .build();
        let confirmed = Cache::builder()
            .max_capacity(settings.capacity)
            // moka refuses a zero TTL and one beyond 1000 years; a zero grace is checked in
            // `grace_user` instead.
            .time_to_live(settings.outage_grace.clamp(Duration::from_millis(1), Duration::from_secs(365 * 86_400)))
            .support_invalidation_closures()
            .build();
        let cache = SessionCache { cache, confirmed, lookups: tx, settings, failing: Arc::default() };
        (Arc::new(cache), rx)
    }

    /// Forgets one token (its session row changed or was deleted).
    pub fn invalidate_token(&self, token: &str) {
        self.cache.invalidate(token);
        self.confirmed.invalidate(token);
    }

    /// Forgets every cached session of a user (logout everywhere, account deletion).
    pub fn invalidate_user(&self, user: &str) {
        let user: Arc<str> = Arc::from(user);
        // Only errors when closures are not enabled, which they are.
        let u = user.clone();
        let _ = self.cache.invalidate_entries_if(move |_, v| v.user.as_deref() == Some(&*u));
        let _ = self.confirmed.invalidate_entries_if(move |_, v| *v.0 == *user);
        self.cache.run_pending_tasks();
        self.confirmed.run_pending_tasks();
    }

    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Asks the control plane (the database) about a token.
    async fn lookup(&self, token: &str) -> Result<Answer, IdentityError> {
        let (reply, rx) = oneshot::channel();
        self.lookups
            .try_send(Lookup { token: token.to_string(), reply })
            .map_err(|e| IdentityError::Unavailable(format!("control plane busy or stopped: {e}")))?;
        match tokio::time::timeout(self.settings.lookup_timeout, rx).await {
            Ok(Ok(Ok(user))) => Ok(user.map(Arc::<str>::from)),
            Ok(Ok(Err(e))) => Err(IdentityError::Unavailable(format!("{e:#}"))),
            Ok(Err(_)) => Err(IdentityError::Unavailable("control plane stopped".into())),
            Err(_) => Err(IdentityError::Unavailable("session lookup timed out".into())),
        }
    }

    /// Caches the database's answer (and, for a valid session, restarts its outage grace).
    fn remember(&self, token: &str, answer: &Answer) {
        self.failing.store(false, Ordering::Relaxed);
        let ttl = if answer.is_some() { self.settings.ttl } else { self.settings.negative_ttl };
        self.cache.insert(token.to_string(), Cached { user: answer.clone(), ttl });
        match answer {
            Some(user) if !self.settings.outage_grace.is_zero() => {
                self.confirmed.insert(token.to_string(), (user.clone(), Instant::now()))
            }
            _ => self.confirmed.invalidate(token),
        }
    }

    /// The user of a session confirmed within the outage grace, cached again for a short while
    /// (at most `negative_cache_ttl`, never past the grace) so that the next requests are hits.
    fn grace_user(&self, token: &str) -> Option<Arc<str>> {
        let grace = self.settings.outage_grace;
        let (user, confirmed) = self.confirmed.get(token)?;
        let left = grace.checked_sub(confirmed.elapsed()).filter(|d| !d.is_zero())?;
        let ttl = self.settings.negative_ttl.min(left);
        self.cache.insert(token.to_string(), Cached { user: Some(user.clone()), ttl });
        Some(user)
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
            return Ok(hit.user);
        }
        // Lookups are failing: a confirmed session is served at once instead of waiting for the
        // lookup to time out again; a lookup still goes out in the background, and its success
        // (the database is back) ends this mode.
        if self.failing.load(Ordering::Relaxed) {
            if let Some(user) = self.grace_user(token) {
                let (reply, rx) = oneshot::channel();
                if self.lookups.try_send(Lookup { token: token.to_string(), reply }).is_ok() {
                    let (cache, confirmed) = (self.cache.clone(), self.confirmed.clone());
                    let failing = self.failing.clone();
                    let (token, ttl, negative_ttl) = (token.to_string(), self.settings.ttl, self.settings.negative_ttl);
                    tokio::spawn(async move {
                        // A database answer ends the outage; a failure keeps serving from the grace.
                        match tokio::time::timeout(Duration::from_secs(30), rx).await {
                            Ok(Ok(Ok(Some(user)))) => {
                                failing.store(false, Ordering::Relaxed);
                                let user: Arc<str> = Arc::from(user);
                                confirmed.insert(token.clone(), (user.clone(), Instant::now()));
                                cache.insert(token, Cached { user: Some(user), ttl });
                            }
                            Ok(Ok(Ok(None))) => {
                                failing.store(false, Ordering::Relaxed);
                                confirmed.invalidate(&token);
                                cache.insert(token, Cached { user: None, ttl: negative_ttl });
                            }
                            _ => {}
                        }
                    });
                }
                return Ok(Some(user));
            }
        }
        match self.lookup(token).await {
            Ok(answer) => {
                self.remember(token, &answer);
                Ok(answer)
            }
            Err(e) => {
                self.failing.store(true, Ordering::Relaxed);
                match self.grace_user(token) {
                    Some(user) => {
                        tracing::warn!(error = %e, "session lookup failed; serving a session confirmed within the outage grace");
                        Ok(Some(user))
                    }
                    None => Err(e),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A control plane whose database answers `user-1` for `t1`, nothing for others, or fails
    /// while `down` is set.
    fn serve(mut rx: mpsc::Receiver<Lookup>, down: Arc<AtomicBool>) {
        tokio::spawn(async move {
            while let Some(Lookup { token, reply }) = rx.recv().await {
                let answer = if down.load(Ordering::Relaxed) {
                    Err(anyhow::anyhow!("pool timed out"))
                } else {
                    Ok((token == "t1").then(|| "user-1".to_string()))
                };
                let _ = reply.send(answer);
            }
        });
    }

    fn settings(grace: Duration) -> SessionSettings {
        SessionSettings {
            ttl: Duration::from_millis(50),
            negative_ttl: Duration::from_millis(50),
            capacity: 100,
            lookup_timeout: Duration::from_millis(500),
            outage_grace: grace,
        }
    }

    #[tokio::test]
    async fn a_confirmed_session_outlives_a_database_outage_for_the_grace_only() {
        let (cache, rx) = SessionCache::new(settings(Duration::from_millis(600)));
        let down = Arc::new(AtomicBool::new(false));
        serve(rx, down.clone());
        assert_eq!(cache.user_of("t1").await.ok().flatten().as_deref(), Some("user-1"));
        down.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Past its TTL, the database down: still served, and without waiting for the lookup.
        let t = Instant::now();
        assert_eq!(cache.user_of("t1").await.ok().flatten().as_deref(), Some("user-1"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t2 = Instant::now();
        assert_eq!(cache.user_of("t1").await.ok().flatten().as_deref(), Some("user-1"));
        assert!(t2.elapsed() < Duration::from_millis(100), "served at once while lookups fail: {:?}", t2.elapsed());
        assert!(t.elapsed() < Duration::from_secs(1));
        // A token never confirmed: unavailable (503), not "no session" (401).
        assert!(matches!(cache.user_of("t2").await, Err(IdentityError::Unavailable(_))));
        // Past the grace: refused as unavailable.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(matches!(cache.user_of("t1").await, Err(IdentityError::Unavailable(_))));
        // The database back: served again, and a logout during the grace would have been honoured.
        down.store(false, Ordering::Relaxed);
        assert_eq!(cache.user_of("t1").await.ok().flatten().as_deref(), Some("user-1"));
        cache.invalidate_token("t1");
        down.store(true, Ordering::Relaxed);
        assert!(matches!(cache.user_of("t1").await, Err(IdentityError::Unavailable(_))), "invalidated: no grace");
    }

    #[tokio::test]
    async fn zero_grace_refuses_at_once() {
        let (cache, rx) = SessionCache::new(settings(Duration::ZERO));
        let down = Arc::new(AtomicBool::new(false));
        serve(rx, down.clone());
        assert!(cache.user_of("t1").await.is_ok_and(|u| u.is_some()));
        down.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(matches!(cache.user_of("t1").await, Err(IdentityError::Unavailable(_))));
    }
}
