//! Re-reading the config and swapping the route table: atomically, or not at all.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use markco_certs::CertManager;
use markco_control::plane::ControlPlane;
use markco_control::state::StateCommand;
use markco_control::switches::health_holder;
use markco_proxy::conn::ConnLimits;
use markco_proxy::table::Routing;
use markco_proxy::{Metrics, RouteTable};

use crate::config::{self, Config};

/// A reload that went through: the generation in service, and the settings that changed in the
/// file but apply only after a restart (by config key; they keep their running values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub generation: u64,
    pub needs_restart: Vec<String>,
}

pub struct Reloader {
    path: Option<PathBuf>,
    metrics: Arc<Metrics>,
    pub certs: Arc<CertManager>,
    plane: Arc<ControlPlane>,
    /// The admin bearer token; a reload may change it.
    pub admin_token: Arc<ArcSwap<Option<String>>>,
    /// What the listeners were started with: these need a restart to change.
    started: Config,
    /// The config in service (what the next reload is compared with). The lock also makes one
    /// reload at a time, so generations are applied in order.
    applied: Mutex<Config>,
    /// The edge listener's connection limits, which a reload may change.
    conn_limits: Option<Arc<ConnLimits>>,
}

impl Reloader {
    pub fn new(
        path: Option<PathBuf>,
        metrics: Arc<Metrics>,
        certs: Arc<CertManager>,
        plane: Arc<ControlPlane>,
        admin_token: Arc<ArcSwap<Option<String>>>,
        started: Config,
    ) -> Reloader {
        Reloader {
            path,
            metrics,
            certs,
            plane,
            admin_token,
            applied: Mutex::new(started.clone()),
            started,
            conn_limits: None,
        }
    }

    pub fn with_conn_limits(mut self, limits: Arc<ConnLimits>) -> Reloader {
        self.conn_limits = Some(limits);
        self
    }

    pub fn table(&self) -> Arc<RouteTable> {
        self.plane.state.table()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Re-reads the config file. On success the new table is in service when this returns; on
    /// failure nothing changed and the error says why.
    pub fn reload(&self) -> Result<Reloaded, String> {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        // systemd sees RELOADING=1 now and READY=1 with the outcome when this returns.
        let mut notice = crate::systemd::Reloading::begin();
        let result = self.reload_locked(&mut applied);
        notice.status(match &result {
            Ok(r) if r.needs_restart.is_empty() => format!("serving generation {} (reloaded)", r.generation),
            Ok(r) => format!(
                "serving generation {} (reloaded; needs a restart: {})",
                r.generation,
                r.needs_restart.join(", ")
            ),
            Err(e) => {
                format!("reload refused, still serving generation {}: {}", self.table().generation, first_line(e))
            }
        });
        result
    }

    fn reload_locked(&self, applied: &mut Config) -> Result<Reloaded, String> {
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
        let mut needs_restart = needs_restart(&self.started, &cfg);
        let routing = Arc::new(cfg.build_routing(&self.metrics));
        // Certificates first: a site that gains TLS must have its certificate before its
        // plain-HTTP requests start being redirected.
        for problem in self.certs.apply(cfg.acme.clone(), cfg.tls_plan()) {
            tracing::error!(target: "markco::reload", "{problem}");
        }
        // Workspaces and holds carry over; only the config's part changes.
        let mut generation = self.table().generation;
        for cmd in diff(applied, &cfg, routing) {
            match self.plane.state.apply(cmd) {
                Ok(table) => generation = table.generation,
                Err(e) => {
                    self.metrics.reload(false);
                    tracing::error!(target: "markco::reload", "config reload refused: {e}");
                    return Err(e.to_string());
                }
            }
        }
        self.admin_token.store(Arc::new(cfg.server.admin_token.clone()));
        if let Some(l) = &self.conn_limits {
            l.set_limits(cfg.server.max_connections_per_ip, cfg.server.max_connections);
        }
        needs_restart.extend(self.plane.reconfigure(cfg.plane.clone()));
        self.metrics.table_generation.set(generation as i64);
        self.metrics.reload(true);
        if !needs_restart.is_empty() {
            // Named, never dropped silently: these keep their running values until a restart.
            tracing::warn!(
                target: "markco::reload",
                needs_restart = %needs_restart.join(", "),
                "changed in the file but applies only after a restart or upgrade: {}",
                needs_restart.join(", ")
            );
        }
        tracing::info!(
            target: "markco::reload",
            generation,
            sites = cfg.sites.len(),
            routes = cfg.route_count(),
            needs_restart = %needs_restart.join(", "),
            "config reloaded"
        );
        *applied = cfg;
        Ok(Reloaded { generation, needs_restart })
    }
}

/// What a new config changes in the live state, as commands for the state owner (in the spirit
/// of Sōzu's `ConfigState::diff`): the new routing under the next generation, and the release of
/// the holds of health checks the new config removed or pointed at another route (at once, not
/// at the health loop's next pass).
pub fn diff(old: &Config, new: &Config, routing: Arc<Routing>) -> Vec<StateCommand> {
    let mut commands = vec![StateCommand::ConfigReloaded { routing }];
    for check in &old.plane.health_checks {
        let Some(route) = &check.disable_route else { continue };
        let kept =
            new.plane.health_checks.iter().any(|c| c.name == check.name && c.disable_route.as_ref() == Some(route));
        if !kept {
            commands.push(StateCommand::RouteReleased { route: route.clone(), holder: health_holder(&check.name) });
        }
    }
    commands
}

/// Settings read once at start (listeners, runtime threads, process files, logging), by config
/// key, that differ between the running process and `new`.
pub fn needs_restart(started: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (&started.server, &new.server);
    let mut keys = Vec::new();
    let mut changed = |key: &str, differs: bool| {
        if differs {
            keys.push(key.to_string());
        }
    };
    changed("server.http", a.http != b.http);
    changed("server.https", a.https != b.https);
    changed("server.admin", a.admin != b.admin);
    changed("server.threads", a.threads != b.threads);
    changed("server.header_timeout", a.header_timeout != b.header_timeout);
    changed("server.grace_period", a.grace_period != b.grace_period);
    changed("server.shutdown_timeout", a.shutdown_timeout != b.shutdown_timeout);
    changed("server.upgrade_sock", a.upgrade_sock != b.upgrade_sock);
    changed("server.pid_file", a.pid_file != b.pid_file);
    changed("log.format", started.log.format != new.log.format);
    changed("log.level", started.log.level != new.log.level);
    keys
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(extra_server: &str, checks: &str) -> Config {
        let src = format!(
            "[server]\nhttp = \"127.0.0.1:8080\"\nadmin = \"127.0.0.1:2019\"\n{extra_server}\n{checks}\n\
             [[site]]\nhosts = [\"*\"]\n\n  [[site.route]]\n  name = \"sync\"\n  match = [\"/sync/*\"]\n  \
             proxy = \"127.0.0.1:3005\"\n"
        );
        config::parse(Path::new("test.toml"), &src).unwrap_or_else(|e| panic!("test config: {e}"))
    }

    const CHECK: &str =
        "[[health_check]]\nname = \"ws\"\nurl = \"http://127.0.0.1:3005/health\"\ndisable_route = \"sync\"\n";

    #[test]
    fn diff_swaps_the_routing_and_drops_the_holds_of_removed_checks() {
        let (old, new) = (config("", CHECK), config("", ""));
        let routing = Arc::new(Routing::new(Default::default(), Vec::new()));
        let commands = diff(&old, &new, routing);
        assert!(matches!(commands.first(), Some(StateCommand::ConfigReloaded { .. })), "{commands:?}");
        assert!(
            matches!(&commands[1..], [StateCommand::RouteReleased { route, holder }] if route == "sync" && holder == "health:ws"),
            "{commands:?}"
        );
        // A check that stays keeps its hold.
        let commands = diff(&old, &old, Arc::new(Routing::new(Default::default(), Vec::new())));
        assert_eq!(commands.len(), 1, "{commands:?}");
    }

    #[test]
    fn settings_read_at_start_are_named() {
        let started = config("threads = 2", "");
        assert!(needs_restart(&started, &config("threads = 2", "")).is_empty());
        let moved = config("threads = 4\nhttps = \"127.0.0.1:8443\"", "");
        assert_eq!(needs_restart(&started, &moved), ["server.https", "server.threads"]);
    }
}
