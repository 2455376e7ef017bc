//! `[database]`, `[sessions]`, `[runtime_moves]` and `[[health_check]]`: the control plane's part.

use std::net::ToSocketAddrs;
use std::path::Path;
use std::time::Duration;

use markco_control::plane::{HealthCheck, MoveLimits, PlaneConfig};
use markco_control::sessions::SessionSettings;
use toml::Spanned;

use super::raw::{RawConfig, RawHealthCheck};
use super::{ConfigError, Ctx};

/// The default database: a SQLite file under `data/`, next to the config (or the working
/// directory when running on the embedded default).
pub const DEFAULT_DB: &str = "sqlite://data/markco.db";

/// A relative SQLite path is taken from `base_dir`; other URLs pass through.
pub fn resolve_db_url(url: &str, base_dir: &Path) -> String {
    match url.strip_prefix("sqlite://") {
        Some(rest) if !rest.starts_with('/') && !rest.starts_with(':') && !base_dir.as_os_str().is_empty() => {
            format!("sqlite://{}", base_dir.join(rest).display())
        }
        _ => url.to_string(),
    }
}

pub(super) fn plane_config(cx: &Ctx<'_>, raw: &RawConfig, base_dir: &Path) -> Result<PlaneConfig, ConfigError> {
    let url = match raw.database.as_ref().and_then(|d| d.url.as_ref()) {
        None => resolve_db_url(DEFAULT_DB, base_dir),
        Some(u) => {
            let v = u.get_ref().trim();
            if !(v.starts_with("sqlite:") || v.starts_with("postgres://") || v.starts_with("postgresql://")) {
                return cx.err(
                    u.span(),
                    format!("unsupported database URL {v:?}"),
                    Some("use \"sqlite://data/markco.db\" (the default) or \"postgres://user@host/markco\"".into()),
                );
            }
            resolve_db_url(v, base_dir)
        }
    };
    let d = SessionSettings::default();
    let sessions = match &raw.sessions {
        None => d,
        Some(s) => SessionSettings {
            ttl: cx.duration(&s.cache_ttl, "cache_ttl", d.ttl)?,
            negative_ttl: cx.duration(&s.negative_cache_ttl, "negative_cache_ttl", d.negative_ttl)?,
            capacity: match &s.cache_capacity {
                None => d.capacity,
                Some(c) if *c.get_ref() >= 1 => *c.get_ref() as u64,
                Some(c) => return cx.err(c.span(), "`cache_capacity` must be at least 1", None),
            },
            lookup_timeout: cx.duration(&s.lookup_timeout, "lookup_timeout", d.lookup_timeout)?,
        },
    };
    let m = MoveLimits::default();
    let moves = match &raw.runtime_moves {
        None => m,
        Some(r) => MoveLimits {
            max_moves: match &r.max_moves {
                None => m.max_moves,
                Some(v) if *v.get_ref() >= 1 => *v.get_ref() as usize,
                Some(v) => return cx.err(v.span(), "`max_moves` must be at least 1", None),
            },
            window: cx.duration(&r.window, "window", m.window)?,
            probe_timeout: cx.duration(&r.probe_timeout, "probe_timeout", m.probe_timeout)?,
            notify_timeout: cx.duration(&r.notify_timeout, "notify_timeout", m.notify_timeout)?,
        },
    };
    let mut health_checks = Vec::new();
    for hc in &raw.health_checks {
        health_checks.push(health_check(cx, hc)?);
    }
    Ok(PlaneConfig { database_url: url, sessions, moves, health_checks })
}

fn health_check(cx: &Ctx<'_>, hc: &Spanned<RawHealthCheck>) -> Result<HealthCheck, ConfigError> {
    let r = hc.get_ref();
    let url = r.url.get_ref().trim();
    let help = Some("write the service's health URL, e.g. url = \"http://127.0.0.1:3001/health\"".to_string());
    let Some(rest) = url.strip_prefix("http://") else {
        return cx.err(r.url.span(), "a health check URL must start with http://", help);
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let Some(addr) = hostport.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return cx.err(r.url.span(), format!("cannot resolve {hostport:?}"), help);
    };
    Ok(HealthCheck {
        name: r.name.get_ref().clone(),
        addr,
        path: path.to_string(),
        interval: cx.duration(&r.interval, "interval", Duration::from_secs(10))?,
        timeout: cx.duration(&r.timeout, "timeout", Duration::from_secs(3))?,
        disable_route: r.disable_route.as_ref().map(|d| d.get_ref().clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_paths_follow_the_config() {
        assert_eq!(resolve_db_url("sqlite://data/m.db", Path::new("/etc/markco")), "sqlite:///etc/markco/data/m.db");
        assert_eq!(resolve_db_url("sqlite:///var/lib/m.db", Path::new("/etc/markco")), "sqlite:///var/lib/m.db");
        assert_eq!(resolve_db_url("sqlite://data/m.db", Path::new("")), "sqlite://data/m.db");
        assert_eq!(resolve_db_url("postgres://u@h/db", Path::new("/x")), "postgres://u@h/db");
    }
}
