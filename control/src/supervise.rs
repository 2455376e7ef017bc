//! Supervision of the control plane's background loops (health checks, container events, idle
//! reaping, LISTEN): a loop that panics is restarted with backoff, counted in
//! `markco_task_restarts_total{task}`, and reported as down by `/api/health` until it runs again.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, Opts, Registry};

/// First wait before a restart; doubles per restart up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A loop that ran this long since its last restart starts again from [`FIRST_BACKOFF`].
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Which supervised tasks are down (panicked, waiting for their restart), and the restart counter.
#[derive(Clone)]
pub struct Supervisor {
    down: Arc<Mutex<BTreeMap<&'static str, String>>>,
    restarts: IntCounterVec,
}

impl Supervisor {
    pub fn new(registry: &Registry) -> Supervisor {
        let restarts = IntCounterVec::new(
            Opts::new("markco_task_restarts_total", "Control-plane background tasks restarted after a panic"),
            &["task"],
        )
        .expect("static metric definition");
        // A second plane on one registry (tests) shares the counter; registering twice is harmless.
        let _ = registry.register(Box::new(restarts.clone()));
        Supervisor { down: Arc::default(), restarts }
    }

    /// Tasks that are down now, with why.
    pub fn down(&self) -> BTreeMap<&'static str, String> {
        self.down.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn restarts(&self, task: &str) -> u64 {
        self.restarts.with_label_values(&[task]).get()
    }

    /// Runs `make()`'s future as task `name`, again after each panic (with backoff). A loop that
    /// returns normally has finished its work and is not restarted.
    pub fn spawn<F, Fut>(&self, name: &'static str, make: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let this = self.clone();
        // Known before the first panic, so a scrape shows 0 rather than nothing.
        this.restarts.with_label_values(&[name]);
        tokio::spawn(async move {
            let mut backoff = FIRST_BACKOFF;
            loop {
                let started = Instant::now();
                // Its own task: a panic unwinds that task only, and arrives here as a JoinError.
                let mut run = AbortOnDrop(tokio::spawn(make()));
                let res = (&mut run.0).await;
                let why = match res {
                    Ok(()) => return,
                    Err(e) if e.is_cancelled() => return,
                    Err(e) => panic_message(e.into_panic()),
                };
                if started.elapsed() > STABLE_AFTER {
                    backoff = FIRST_BACKOFF;
                }
                tracing::error!(task = name, "background task panicked ({why}); restarting in {backoff:?}");
                this.down.lock().unwrap_or_else(|p| p.into_inner()).insert(name, why);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                this.restarts.with_label_values(&[name]).inc();
                this.down.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
            }
        })
    }
}

/// Aborting the supervisor (shutdown) also stops the loop it runs.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The text of a panic payload (`panic!("...")` carries a `&str` or a `String`).
pub fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => match p.downcast::<&'static str>() {
            Ok(s) => (*s).to_string(),
            Err(_) => "a panic without a message".to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_panicking_loop_is_restarted_counted_and_reported_down() {
        let sup = Supervisor::new(&Registry::new());
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let task = sup.spawn("flaky", move || {
            let r = r.clone();
            async move {
                // Panics on its first two runs, then lives on.
                if r.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("boom");
                }
                std::future::pending::<()>().await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(sup.down().get("flaky").map(String::as_str), Some("boom"), "down while waiting to restart");
        // 0.5 s then 1 s of backoff.
        tokio::time::sleep(Duration::from_millis(1700)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(sup.restarts("flaky"), 2);
        assert!(sup.down().is_empty(), "{:?}", sup.down());
        task.abort();
    }

    #[tokio::test]
    async fn a_loop_that_returns_is_not_restarted() {
        let sup = Supervisor::new(&Registry::new());
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let task = sup.spawn("done", move || {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
            }
        });
        tokio::time::timeout(Duration::from_secs(2), task).await.expect("supervisor ends").expect("no panic");
        assert_eq!((runs.load(Ordering::SeqCst), sup.restarts("done")), (1, 0));
    }
}
