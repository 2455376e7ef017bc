//! Re-reading the config and swapping the route table: atomically, or not at all.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use markco_certs::CertManager;
use markco_control::plane::ControlPlane;
use markco_proxy::conn::ConnLimits;
use markco_proxy::{Metrics, RouteTable};

use crate::config::{self, Config};

pub struct Reloader {
    path: Option<PathBuf>,
    table: Arc<ArcSwap<RouteTable>>,
    metrics: Arc<Metrics>,
    pub certs: Arc<CertManager>,
    plane: Arc<ControlPlane>,
    generation: AtomicU64,
    /// The admin bearer token; a reload may change it.
    pub admin_token: Arc<ArcSwap<Option<String>>>,
    /// What the listeners were started with: these need a restart to change.
    started: Config,
    /// One reload at a time, so generations are applied in order.
    lock: Mutex<()>,
    /// The edge listener's connection limits, which a reload may change.
    conn_limits: Option<Arc<ConnLimits>>,
}

impl Reloader {
    pub fn new(
        path: Option<PathBuf>,
        table: Arc<ArcSwap<RouteTable>>,
        metrics: Arc<Metrics>,
        certs: Arc<CertManager>,
        plane: Arc<ControlPlane>,
        admin_token: Arc<ArcSwap<Option<String>>>,
        started: Config,
    ) -> Reloader {
        let generation = table.load().generation;
        Reloader {
            path,
            table,
            metrics,
            certs,
            plane,
            generation: AtomicU64::new(generation),
            admin_token,
            started,
            lock: Mutex::new(()),
            conn_limits: None,
        }
    }

    pub fn with_conn_limits(mut self, limits: Arc<ConnLimits>) -> Reloader {
        self.conn_limits = Some(limits);
        self
    }

    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Re-reads the config file. On success the new table is in service when this returns; on
    /// failure nothing changed and the error says why.
    pub fn reload(&self) -> Result<u64, String> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        // systemd sees RELOADING=1 now and READY=1 with the outcome when this returns.
        let mut notice = crate::systemd::Reloading::begin();
        let result = self.reload_locked();
        notice.status(match &result {
            Ok(g) => format!("serving generation {g} (reloaded)"),
            Err(e) => {
                format!("reload refused, still serving generation {}: {}", self.table().generation, first_line(e))
            }
        });
        result
    }

    fn reload_locked(&self) -> Result<u64, String> {
        let Some(path) = &self.path else {
            self.metrics.reload(false);
            return Err("markco runs on its embedded default config; start it with --config FILE to reload".into());
        };
        let cfg = match config::load(path) {
            Ok(c) => c,
            Err(e) => {
                self.metrics.reload(false);
                tracing::error!(target: "markco::reload", "config reload refused, the current routes stay in service:\n{e}");
                return Err(e.to_string());
            }
        };
        for w in &cfg.warnings {
            tracing::warn!(target: "markco::reload", "{w}");
        }
        let old = &self.started.server;
        let new = &cfg.server;
        if old.http != new.http || old.https != new.https || old.admin != new.admin || old.threads != new.threads {
            tracing::warn!(
                target: "markco::reload",
                "listen addresses and threads changed in the file but apply only after a restart or upgrade"
            );
        }
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let routing = Arc::new(cfg.build_routing(&self.metrics));
        // Certificates first: a site that gains TLS must have its certificate before its
        // plain-HTTP requests start being redirected.
        for problem in self.certs.apply(cfg.acme.clone(), cfg.tls_plan()) {
            tracing::error!(target: "markco::reload", "{problem}");
        }
        // Workspaces and kill switches carry over; only the config's part changes.
        self.table.rcu(|old| old.with_routing(generation, routing.clone()));
        self.admin_token.store(Arc::new(cfg.server.admin_token.clone()));
        if let Some(l) = &self.conn_limits {
            l.set_limits(cfg.server.max_connections_per_ip, cfg.server.max_connections);
        }
        self.plane.reconfigure(cfg.plane.clone());
        self.metrics.table_generation.set(generation as i64);
        self.metrics.reload(true);
        tracing::info!(target: "markco::reload", generation, sites = cfg.sites.len(), routes = cfg.route_count(), "config reloaded");
        Ok(generation)
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}
