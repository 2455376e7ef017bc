//! `[database]`, `[sessions]`, `[runtime_moves]` and `[[health_check]]`: the control plane's part.

use std::net::ToSocketAddrs;
use std::path::Path;
use std::time::Duration;

use markco_control::plane::{HealthCheck, MoveLimits, PlaneConfig};
use markco_control::sessions::SessionSettings;
use markco_control::workspaces::{PlanLimits, WorkspaceConfig};
use toml::Spanned;

use markco_control::cluster::ClusterConfig;

use super::raw::{RawCluster, RawConfig, RawHealthCheck, RawWorkspaces};
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
            outage_grace: cx.duration(&s.outage_grace, "outage_grace", d.outage_grace)?,
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
    let workspaces = match &raw.workspaces {
        None => None,
        Some(w) => {
            let mut c = workspace_config(cx, w.get_ref(), base_dir)?;
            c.instance = markco_control::workspaces::instance_of(&url);
            c.legacy_instance = Some(markco_control::workspaces::legacy_instance_of(&url));
            Some(c)
        }
    };
    let cluster = match &raw.cluster {
        None => None,
        Some(c) => {
            if !url.starts_with("postgres") {
                return cx.err(
                    c.span(),
                    "`[cluster]` needs PostgreSQL: the gateways share their state through it",
                    Some("set [database] url = \"postgres://USER@HOST/DATABASE\", or remove [cluster]".into()),
                );
            }
            Some(cluster_config(cx, c.get_ref(), c.span(), base_dir)?)
        }
    };
    let workspaces = match (workspaces, &cluster) {
        // Several gateways share one podman in tests and may share one database in production:
        // each node labels its containers with its own instance, derived from the database and
        // the node name.
        (Some(mut w), Some(c)) => {
            w.instance = markco_control::workspaces::instance_of(&format!("{url}#node={}", c.node));
            w.legacy_instance = None;
            w.node = Some(c.node.clone());
            w.advertise = c.advertise;
            Some(w)
        }
        (w, _) => w,
    };
    Ok(PlaneConfig { database_url: url, workspaces, sessions, moves, health_checks, cluster })
}

fn cluster_config(
    cx: &Ctx<'_>,
    c: &RawCluster,
    span: std::ops::Range<usize>,
    base_dir: &Path,
) -> Result<ClusterConfig, ConfigError> {
    let d = ClusterConfig::default();
    let node = match &c.node {
        None => {
            return cx.err(
                span,
                "`[cluster]` needs `node`, this gateway's name, unique in the cluster",
                Some("node = \"gw-a\"".into()),
            )
        }
        Some(n) => {
            let v = n.get_ref().trim();
            let ok = !v.is_empty()
                && v.len() <= 63
                && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
            if !ok {
                return cx.err(
                    n.span(),
                    format!("`node` {v:?} is not a node name"),
                    Some("1 to 63 of a-z, 0-9, - and _".into()),
                );
            }
            v.to_string()
        }
    };
    let advertise = match &c.advertise {
        None => d.advertise,
        Some(a) => match a.get_ref().trim().parse::<std::net::IpAddr>() {
            Ok(ip) if !ip.is_unspecified() => ip,
            _ => {
                return cx.err(
                    a.span(),
                    format!("`advertise` {:?} is not an IP address other gateways can reach", a.get_ref()),
                    Some("the address of this host on the network the gateways share, e.g. \"10.0.0.5\"".into()),
                )
            }
        },
    };
    let heartbeat = cx.duration(&c.heartbeat, "heartbeat", d.heartbeat)?;
    if heartbeat.is_zero() {
        let s = c.heartbeat.as_ref().map_or(span.clone(), |v| v.span());
        return cx.err(s, "`heartbeat` must be above zero", Some("heartbeat = \"2s\"".into()));
    }
    let node_timeout = cx.duration(&c.node_timeout, "node_timeout", d.node_timeout)?;
    if node_timeout < heartbeat * 2 {
        let s = c.node_timeout.as_ref().map_or(span.clone(), |v| v.span());
        return cx.err(s, "`node_timeout` must be at least twice `heartbeat`", Some("a node is declared down after missing several heartbeats, e.g. heartbeat = \"2s\", node_timeout = \"10s\"".into()));
    }
    let poll = cx.duration(&c.poll, "poll", d.poll)?;
    if poll.is_zero() {
        let s = c.poll.as_ref().map_or(span.clone(), |v| v.span());
        return cx.err(s, "`poll` must be above zero", None);
    }
    let change_retention = cx.duration(&c.change_retention, "change_retention", d.change_retention)?;
    if change_retention <= node_timeout {
        let s = c.change_retention.as_ref().map_or(span.clone(), |v| v.span());
        return cx.err(
            s,
            "`change_retention` must be longer than `node_timeout`",
            Some("changes are kept at least until every live node applied them; e.g. change_retention = \"1d\"".into()),
        );
    }
    let secret_file = c.secret_file.as_ref().map(|f| base_dir.join(f.get_ref().trim()));
    let mut capacity = std::collections::BTreeMap::new();
    if let Some(cap) = &c.capacity {
        for (plan, n) in cap.get_ref() {
            match u32::try_from(*n) {
                Ok(n) => capacity.insert(plan.clone(), n),
                Err(_) => {
                    return cx.err(
                        cap.span(),
                        format!("`capacity` of {plan:?} must be a count of workspaces, 0 or more"),
                        Some(
                            "capacity = { \"*\" = 50, pro = 10 }: at most 50 workspaces, 10 of them on plan pro".into(),
                        ),
                    )
                }
            };
        }
    }
    Ok(ClusterConfig {
        node,
        advertise,
        heartbeat,
        node_timeout,
        poll,
        change_retention,
        secret_file,
        capacity,
        shared_data: c.shared_data.unwrap_or(d.shared_data),
    })
}

fn port_range(
    cx: &Ctx<'_>,
    v: &Option<Spanned<String>>,
    key: &str,
    default: (u16, u16),
) -> Result<(u16, u16), ConfigError> {
    let Some(v) = v else { return Ok(default) };
    let parsed = v
        .get_ref()
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)));
    match parsed {
        Some((a, b)) if a >= 1024 && a <= b => Ok((a, b)),
        _ => cx.err(v.span(), format!("`{key}` must be a port range like \"20000-39999\" (ports 1024 and up)"), None),
    }
}

fn workspace_config(cx: &Ctx<'_>, w: &RawWorkspaces, base_dir: &Path) -> Result<WorkspaceConfig, ConfigError> {
    let d = WorkspaceConfig::default();
    let mb = |v: &Option<Spanned<i64>>, key: &str, default: Option<u64>| -> Result<Option<u64>, ConfigError> {
        match v {
            None => Ok(default),
            Some(m) if *m.get_ref() == 0 => Ok(None),
            Some(m) if *m.get_ref() >= 16 => Ok(Some(*m.get_ref() as u64 * 1024 * 1024)),
            Some(m) => cx.err(m.span(), format!("`{key}` is in MiB: at least 16, or 0 for no limit"), None),
        }
    };
    let cfg = WorkspaceConfig {
        instance: d.instance.clone(),
        legacy_instance: None,
        node: None,
        advertise: d.advertise,
        engine_socket: match &w.engine {
            None => d.engine_socket.clone(),
            Some(e) => match e.get_ref().strip_prefix("unix://") {
                Some(p) => p.into(),
                None => {
                    return cx.err(
                        e.span(),
                        "`engine` is podman's API socket",
                        Some("e.g. engine = \"unix:///run/podman/podman.sock\"".into()),
                    )
                }
            },
        },
        data_dir: w.data_dir.as_ref().map(|p| base_dir.join(p.get_ref())).unwrap_or(d.data_dir.clone()),
        data_uid: match &w.data_uid {
            None => d.data_uid,
            Some(u) => u32::try_from(*u.get_ref()).or_else(|_| cx.err(u.span(), "`data_uid` must be a uid", None))?,
        },
        editor_image: w.editor_image.as_ref().map(|i| i.get_ref().clone()).unwrap_or(d.editor_image.clone()),
        runtime_image: w.runtime_image.as_ref().map(|i| i.get_ref().clone()).unwrap_or(d.runtime_image.clone()),
        editor_ports: port_range(cx, &w.editor_ports, "editor_ports", d.editor_ports)?,
        runtime_ports: port_range(cx, &w.runtime_ports, "runtime_ports", d.runtime_ports)?,
        ready_timeout: cx.duration(&w.ready_timeout, "ready_timeout", d.ready_timeout)?,
        idle_timeout: {
            let t = cx.duration(&w.idle_timeout, "idle_timeout", d.idle_timeout.unwrap_or_default())?;
            (!t.is_zero()).then_some(t)
        },
        editor_command: w.editor_command.clone().unwrap_or(d.editor_command.clone()),
        runtime_command: w.runtime_command.clone().unwrap_or(d.runtime_command.clone()),
        editor_env: w.editor_env.clone().unwrap_or(d.editor_env.clone()),
        runtime_env: w.runtime_env.clone().unwrap_or(d.runtime_env.clone()),
        editor_memory: mb(&w.editor_memory_mb, "editor_memory_mb", d.editor_memory)?,
        runtime_memory: mb(&w.runtime_memory_mb, "runtime_memory_mb", d.runtime_memory)?,
        health_interval: cx.duration(&w.health_interval, "health_interval", d.health_interval)?,
        plans: match &w.plans {
            None => d.plans.clone(),
            Some(plans) => {
                let mut out = std::collections::BTreeMap::new();
                for (name, p) in plans {
                    let cpus = match &p.runtime_cpus {
                        None => None,
                        Some(c) if *c.get_ref() > 0.0 => Some(*c.get_ref()),
                        Some(c) => return cx.err(c.span(), "`runtime_cpus` must be positive", None),
                    };
                    let limits = PlanLimits {
                        editor_memory: mb(&p.editor_memory_mb, "editor_memory_mb", None)?,
                        runtime_memory: mb(&p.runtime_memory_mb, "runtime_memory_mb", None)?,
                        runtime_cpus: cpus,
                    };
                    out.insert(name.clone(), limits);
                }
                out
            }
        },
        runtime_cpus: match &w.runtime_cpus {
            None => d.runtime_cpus,
            Some(c) if *c.get_ref() == 0.0 => None,
            Some(c) if *c.get_ref() > 0.0 => Some(*c.get_ref()),
            Some(c) => return cx.err(c.span(), "`runtime_cpus` must be positive (0: no limit)", None),
        },
    };
    let (e, r) = (cfg.editor_ports, cfg.runtime_ports);
    if e.0 <= r.1 && r.0 <= e.1 {
        return cx.err(
            0..0,
            "[workspaces] `editor_ports` and `runtime_ports` overlap",
            Some("give them separate ranges".into()),
        );
    }
    Ok(cfg)
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
