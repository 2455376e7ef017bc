//! Loading and validating the config file, and turning it into a route table.

mod control;
mod error;
mod raw;
mod tls;

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ipnet::IpNet;
use markco_certs::{AcmeConfig, ManagedSite, SiteTls};
use markco_control::plane::PlaneConfig;
use markco_proxy::metrics::Metrics;
use markco_proxy::ratelimit::{RateLimiter, RateSpec};
use markco_proxy::table::{
    Action, PathPattern, ProxyAction, ProxySettings, Route, Routing, Site, StaticAction, Upstream,
};
use toml::Spanned;

pub use error::ConfigError;
use raw::{RawConfig, RawRoute};

/// The config compiled in, used when `markco run` gets no `--config`.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub admin_token: Option<String>,
    pub threads: usize,
    /// Let idle worker threads take tasks from busy ones (Pingora's `work_stealing`).
    pub work_stealing: bool,
    pub header_timeout: Duration,
    /// Open client connections allowed from one address, and in all.
    pub max_connections_per_ip: usize,
    pub max_connections: usize,
    pub grace_period: Duration,
    pub shutdown_timeout: Duration,
    pub upgrade_sock: PathBuf,
    pub pid_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: Option<LogFormat>,
    pub level: Option<String>,
}

#[derive(Debug, Clone)]
pub enum ActionSpec {
    Proxy { label: String, addr: SocketAddr, strip_prefix: Option<String> },
    Workspace,
    Runtime,
    UserService { label: String, addr: SocketAddr, strip_prefix: Option<String> },
    Control,
    Static { root: PathBuf, strip_prefix: Option<String>, index: Vec<String> },
    Redirect { to: String, status: u16 },
    Respond { status: u16, body: String, content_type: String },
}

#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub name: String,
    pub patterns: Vec<String>,
    pub action: ActionSpec,
    pub upgrades: Vec<String>,
    pub rate_limit: Option<RateSpec>,
}

#[derive(Debug, Clone)]
pub struct SiteSpec {
    pub hosts: Vec<String>,
    pub tls: SiteTls,
    pub routes: Vec<RouteSpec>,
}

/// A validated config.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSettings,
    pub proxy: ProxySettings,
    pub log: LogSettings,
    pub acme: AcmeConfig,
    pub plane: PlaneConfig,
    pub sites: Vec<SiteSpec>,
    /// Things that are allowed but probably not meant (a static root that does not exist yet).
    pub warnings: Vec<String>,
}

/// Off: each worker thread is a runtime of its own, so a connection, its HTTP/2 streams and the
/// per-thread upstream pool (`upstream.rs`) stay on one thread. Measured here (benches/README.md,
/// "Our own upstream loop"): h2 over TLS 41 -> 28 us of CPU per request, HTTP/1.1 a little
/// cheaper too. (Before the own loop, Pingora's pool woke other threads and off measured worse.)
const WORK_STEALING_DEFAULT: bool = false;

const DURATION_HELP: &str = "write a duration such as \"10s\", \"2m\", \"1h\" or \"500ms\"";

struct Ctx<'a> {
    file: &'a Path,
    src: &'a str,
}

impl Ctx<'_> {
    fn err<T>(
        &self,
        span: Range<usize>,
        msg: impl Into<String>,
        help: impl Into<Option<String>>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::at(self.file, self.src, Some(span), msg, help.into()))
    }

    fn duration(&self, v: &Option<Spanned<String>>, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => humantime::parse_duration(s.get_ref().trim()).or_else(|e| {
                self.err(s.span(), format!("`{key}` is not a duration: {e}"), Some(DURATION_HELP.to_string()))
            }),
        }
    }

    /// A duration that must be more than zero (zero would cut every connection at once).
    fn positive_duration(
        &self,
        v: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(v, key, default)?;
        if d.is_zero() {
            return self.err(
                v.as_ref().map(|s| s.span()).unwrap_or(0..0),
                format!("`{key}` must be more than 0s"),
                Some(format!("leave it out for the default ({})", humantime::format_duration(default))),
            );
        }
        Ok(d)
    }

    fn addr(&self, v: &Option<Spanned<String>>, key: &str, default: &str) -> Result<SocketAddr, ConfigError> {
        match v {
            None => default.parse().or_else(|_| self.err(0..0, format!("bad built-in default for `{key}`"), None)),
            Some(s) => s.get_ref().trim().parse().or_else(|_| {
                self.err(
                    s.span(),
                    format!("`{key}` = {:?} is not a listen address", s.get_ref()),
                    Some("write IP:port, for example \"127.0.0.1:8080\" or \"0.0.0.0:80\" or \"[::]:443\"".to_string()),
                )
            }),
        }
    }
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let src = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::whole(
            path,
            format!("cannot read the config file: {e}"),
            Some("check the path given with --config and its permissions".into()),
        )
    })?;
    parse(path, &src)
}

/// Validates config text; `path` is used for messages and to resolve relative paths.
pub fn parse(path: &Path, src: &str) -> Result<Config, ConfigError> {
    let cx = Ctx { file: path, src };
    let raw: RawConfig = toml::from_str(src).map_err(|e| {
        let help = if e.message().contains("unknown field") {
            Some("check the spelling; every key is documented in deploy/markco.example.toml and the README".to_string())
        } else {
            None
        };
        ConfigError::at(path, src, e.span(), e.message().trim().to_string(), help)
    })?;
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut warnings = Vec::new();

    let s = &raw.server;
    let admin_token = match &s.admin_token_file {
        None => None,
        Some(f) => {
            let p = base_dir.join(f.get_ref());
            match std::fs::read_to_string(&p) {
                Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
                Ok(_) => {
                    return cx.err(
                        f.span(),
                        format!("the admin token file {} is empty", p.display()),
                        Some("put a long random token in it, e.g. `openssl rand -hex 32 > FILE`".to_string()),
                    )
                }
                Err(e) => {
                    return cx.err(
                        f.span(),
                        format!("cannot read the admin token file {}: {e}", p.display()),
                        Some("create it (mode 0600) or remove `admin_token_file`".to_string()),
                    )
                }
            }
        }
    };
    let threads = match &s.threads {
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
        Some(t) if (1..=256).contains(t.get_ref()) => *t.get_ref() as usize,
        Some(t) => {
            return cx.err(
                t.span(),
                "`threads` must be between 1 and 256",
                Some("use the number of cores, or leave it out".to_string()),
            )
        }
    };
    let mut trusted_proxies = Vec::new();
    for t in &s.trusted_proxies {
        let v = t.get_ref().trim();
        let net = v.parse::<IpNet>().or_else(|_| v.parse::<std::net::IpAddr>().map(IpNet::from));
        match net {
            Ok(n) => trusted_proxies.push(n),
            Err(_) => {
                return cx.err(
                    t.span(),
                    format!("{v:?} is not an IP address or CIDR range"),
                    Some("write e.g. \"10.0.0.0/8\" or \"192.0.2.7\"".to_string()),
                )
            }
        }
    }
    let max_header_bytes = match &s.max_header_bytes {
        None => 64 * 1024,
        Some(m) if (1024..=1_048_575).contains(m.get_ref()) => *m.get_ref() as usize,
        Some(m) => return cx.err(m.span(), "`max_header_bytes` must be between 1024 and 1048575", None),
    };
    let websocket_idle = cx.duration(&s.websocket_idle_timeout, "websocket_idle_timeout", Duration::from_secs(3600))?;
    let upstream_idle = cx.duration(&s.upstream_idle_timeout, "upstream_idle_timeout", Duration::from_secs(300))?;
    let https = match &s.https {
        None => None,
        some => Some(cx.addr(some, "https", "0.0.0.0:443")?),
    };
    let limit = |v: &Option<Spanned<i64>>, key: &str, default: usize| -> Result<usize, ConfigError> {
        match v {
            None => Ok(default),
            Some(n) if *n.get_ref() >= 1 => Ok(usize::try_from(*n.get_ref()).unwrap_or(usize::MAX)),
            Some(n) => cx.err(
                n.span(),
                format!("`{key}` must be at least 1"),
                Some("leave it out for the default".to_string()),
            ),
        }
    };
    let max_connections = limit(&s.max_connections, "max_connections", markco_proxy::conn::default_max_connections())?;
    let max_connections_per_ip = limit(&s.max_connections_per_ip, "max_connections_per_ip", 256)?;
    let server = ServerSettings {
        http: cx.addr(&s.http, "http", "127.0.0.1:8080")?,
        https,
        admin: cx.addr(&s.admin, "admin", "127.0.0.1:2019")?,
        admin_token,
        threads,
        work_stealing: s.work_stealing.unwrap_or(WORK_STEALING_DEFAULT),
        header_timeout: cx.positive_duration(&s.header_timeout, "header_timeout", Duration::from_secs(10))?,
        max_connections_per_ip,
        max_connections,
        grace_period: cx.duration(&s.grace_period, "grace_period", Duration::from_secs(10))?,
        shutdown_timeout: cx.duration(&s.shutdown_timeout, "shutdown_timeout", Duration::from_secs(5))?,
        upgrade_sock: s
            .upgrade_sock
            .as_ref()
            .map(|p| base_dir.join(p.get_ref()))
            .unwrap_or_else(|| PathBuf::from("/tmp/markco-upgrade.sock")),
        pid_file: s
            .pid_file
            .as_ref()
            .map(|p| base_dir.join(p.get_ref()))
            .unwrap_or_else(|| PathBuf::from("/tmp/markco.pid")),
    };
    if Some(server.http) == server.https || Some(server.admin) == server.https {
        return cx.err(
            s.https.as_ref().map(|a| a.span()).unwrap_or(0..0),
            "`https` shares its address with another listener",
            Some("give each listener its own port".to_string()),
        );
    }
    if server.http == server.admin {
        return cx.err(
            s.admin.as_ref().map(|a| a.span()).unwrap_or(0..0),
            "`admin` and `http` are the same address",
            Some("give the admin API its own port, e.g. \"127.0.0.1:2019\"".to_string()),
        );
    }
    let proxy = ProxySettings {
        trusted_proxies,
        upstream_connect_timeout: cx.duration(
            &s.upstream_connect_timeout,
            "upstream_connect_timeout",
            Duration::from_secs(1),
        )?,
        upstream_idle_timeout: (!upstream_idle.is_zero()).then_some(upstream_idle),
        client_idle_timeout: cx.positive_duration(
            &s.client_idle_timeout,
            "client_idle_timeout",
            Duration::from_secs(60),
        )?,
        websocket_idle_timeout: (!websocket_idle.is_zero()).then_some(websocket_idle),
        max_header_bytes,
        access_log: raw.log.access_log.unwrap_or(true),
        https_port: server.https.map(|a| a.port()),
        redirect_to_https: s.redirect_to_https.unwrap_or(true),
        hsts: match &s.hsts {
            None => None,
            Some(h) if h.get_ref().trim().starts_with("max-age=") => Some(h.get_ref().trim().to_string()),
            Some(h) => {
                return cx.err(
                    h.span(),
                    "`hsts` is the Strict-Transport-Security value",
                    Some("e.g. hsts = \"max-age=31536000; includeSubDomains\"".to_string()),
                )
            }
        },
    };
    let acme = tls::acme_config(&cx, raw.tls.as_ref(), &base_dir)?;
    let plane = control::plane_config(&cx, &raw, &base_dir)?;
    let log = LogSettings {
        format: match &raw.log.format {
            None => None,
            Some(f) => match f.get_ref().as_str() {
                "text" => Some(LogFormat::Text),
                "json" => Some(LogFormat::Json),
                other => {
                    return cx.err(
                        f.span(),
                        format!("unknown log format {other:?}"),
                        Some("use \"text\" or \"json\"".to_string()),
                    )
                }
            },
        },
        level: raw.log.level.as_ref().map(|l| l.get_ref().clone()),
    };

    let mut sites = Vec::new();
    let mut seen_hosts: HashMap<String, ()> = HashMap::new();
    let mut seen_names: HashMap<String, ()> = HashMap::new();
    for site in &raw.sites {
        let site_ref = site.get_ref();
        if site_ref.hosts.get_ref().is_empty() {
            return cx.err(site_ref.hosts.span(), "`hosts` is empty", Some("list the host names this site answers, e.g. [\"markco.dev\", \"www.markco.dev\"], or [\"*\"] for any host".to_string()));
        }
        let mut hosts = Vec::new();
        for h in site_ref.hosts.get_ref() {
            let host = h.get_ref().trim().trim_end_matches('.').to_ascii_lowercase();
            if !valid_host(&host) {
                return cx.err(h.span(), format!("{:?} is not a host name", h.get_ref()), Some("write a name like \"markco.dev\", a wildcard like \"*.markco.dev\", an IP address, or \"*\"; no scheme, port or path".to_string()));
            }
            if seen_hosts.insert(host.clone(), ()).is_some() {
                return cx.err(
                    h.span(),
                    format!("host {host:?} belongs to two sites"),
                    Some("each host may appear in one site only; merge the routes into one site".to_string()),
                );
            }
            hosts.push(host);
        }
        let site_tls = tls::site_tls(
            &cx,
            site_ref.tls.as_ref(),
            &hosts,
            server.https.is_some(),
            &base_dir,
            site_ref.hosts.span(),
        )?;
        let mut routes = Vec::new();
        for (i, r) in site_ref.route.iter().enumerate() {
            let route = route_spec(&cx, &base_dir, &hosts, i, r, &mut warnings)?;
            if seen_names.insert(route.name.clone(), ()).is_some() {
                let span = r.get_ref().name.as_ref().map(|n| n.span()).unwrap_or(r.span());
                return cx.err(
                    span,
                    format!("two routes are named {:?}", route.name),
                    Some("route names must be unique: they label metrics and are used by the admin API".to_string()),
                );
            }
            routes.push(route);
        }
        sites.push(SiteSpec { hosts, tls: site_tls, routes });
    }
    for hc in &raw.health_checks {
        if let Some(route) = &hc.get_ref().disable_route {
            if !seen_names.contains_key(route.get_ref()) {
                return cx.err(
                    route.span(),
                    format!("`disable_route` names no route: {:?}", route.get_ref()),
                    Some("give the route a `name = \"...\"` and use that name here".to_string()),
                );
            }
        }
    }
    tls::check_fleet_secret(&cx, &raw, &plane, &sites)?;
    Ok(Config { server, proxy, log, acme, plane, sites, warnings })
}

fn valid_host(h: &str) -> bool {
    if h == "*" {
        return true;
    }
    let name = h.strip_prefix("*.").unwrap_or(h);
    if name.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn valid_pattern(p: &str) -> Result<(), &'static str> {
    if !p.starts_with('/') {
        return Err("a path pattern must start with '/'");
    }
    if p[..p.len() - 1].contains('*') {
        return Err("'*' may only end a pattern (prefix match)");
    }
    if p.contains(['?', '#', ' ']) {
        return Err("a path pattern cannot contain '?', '#' or spaces");
    }
    // Patterns are compared with normalised paths, so they must be normal themselves.
    let base = p.trim_end_matches('*');
    match markco_proxy::path::normalize(base) {
        Ok(n) if n == base || (base.len() > 1 && !base.ends_with('/') && n == format!("{base}/")) => Ok(()),
        Ok(_) => Err("a path pattern must be in normal form (no '.', '..', '//' or escaped unreserved characters)"),
        Err(_) => Err("a path pattern has a malformed percent-escape"),
    }
}

/// An upstream "host:port" (optionally "http://host:port"), resolved once at load.
fn upstream_addr(cx: &Ctx<'_>, p: &Spanned<String>) -> Result<(String, SocketAddr), ConfigError> {
    let text = p.get_ref().trim();
    if text.starts_with("https://") {
        return cx.err(
            p.span(),
            "TLS to upstreams is not supported yet",
            Some("proxy to a plain HTTP address, e.g. \"127.0.0.1:3000\"".to_string()),
        );
    }
    let hostport = text.strip_prefix("http://").unwrap_or(text).trim_end_matches('/');
    if hostport.contains('/') {
        return cx.err(
            p.span(),
            "an upstream is an address, not a URL with a path",
            Some("write host:port; use strip_prefix to change the path".to_string()),
        );
    }
    match hostport.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => Ok((hostport.to_string(), a)),
        _ => cx.err(
            p.span(),
            format!("cannot resolve the upstream address {text:?}"),
            Some("write host:port, e.g. \"127.0.0.1:3000\" or \"localhost:3000\"".to_string()),
        ),
    }
}

fn route_spec(
    cx: &Ctx<'_>,
    base_dir: &Path,
    hosts: &[String],
    index: usize,
    r: &Spanned<RawRoute>,
    warnings: &mut Vec<String>,
) -> Result<RouteSpec, ConfigError> {
    let raw = r.get_ref();
    if raw.patterns.get_ref().is_empty() {
        return cx.err(
            raw.patterns.span(),
            "`match` is empty",
            Some("list at least one path pattern, e.g. [\"/api/*\"] or [\"/*\"] for everything".to_string()),
        );
    }
    let mut patterns = Vec::new();
    for p in raw.patterns.get_ref() {
        if let Err(why) = valid_pattern(p.get_ref()) {
            return cx.err(
                p.span(),
                format!("bad path pattern {:?}: {why}", p.get_ref()),
                Some("patterns look like \"/exact\", \"/prefix/*\" or \"/@*\"".to_string()),
            );
        }
        patterns.push(p.get_ref().clone());
    }
    let actions: Vec<&str> = [
        raw.proxy.as_ref().map(|_| "proxy"),
        raw.static_root.as_ref().map(|_| "static"),
        raw.redirect.as_ref().map(|_| "redirect"),
        raw.respond.as_ref().map(|_| "respond"),
        raw.workspace.as_ref().filter(|b| *b.get_ref()).map(|_| "workspace"),
        raw.runtime.as_ref().filter(|b| *b.get_ref()).map(|_| "runtime"),
        raw.user_service.as_ref().map(|_| "user_service"),
        raw.control.as_ref().filter(|b| *b.get_ref()).map(|_| "control"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let action_help = "give each route exactly one of: proxy = \"127.0.0.1:3000\", static = \"/var/www\", redirect = \"https://...\", respond = \"text\"".to_string();
    if actions.len() != 1 {
        let msg = if actions.is_empty() {
            "this route has no action".to_string()
        } else {
            format!("this route has several actions ({})", actions.join(", "))
        };
        return cx.err(r.span(), msg, Some(action_help));
    }
    let only_for = |present: bool, key: &str, span: Range<usize>, allowed: &[&str]| -> Result<(), ConfigError> {
        if present && !allowed.contains(&actions[0]) {
            return cx.err(
                span,
                format!("`{key}` does not apply to a `{}` route", actions[0]),
                Some(format!("`{key}` is used with: {}", allowed.join(", "))),
            );
        }
        Ok(())
    };
    only_for(
        raw.status.is_some(),
        "status",
        raw.status.as_ref().map(|s| s.span()).unwrap_or(0..0),
        &["redirect", "respond"],
    )?;
    only_for(
        raw.content_type.is_some(),
        "content_type",
        raw.content_type.as_ref().map(|s| s.span()).unwrap_or(0..0),
        &["respond"],
    )?;
    only_for(
        raw.strip_prefix.is_some(),
        "strip_prefix",
        raw.strip_prefix.as_ref().map(|s| s.span()).unwrap_or(0..0),
        &["proxy", "static"],
    )?;
    only_for(raw.index.is_some(), "index", r.span(), &["static"])?;
    let strip_prefix = match &raw.strip_prefix {
        None => None,
        Some(p) => {
            let v = p.get_ref().trim_end_matches('/');
            if !v.starts_with('/') || v.contains('*') {
                return cx.err(
                    p.span(),
                    "`strip_prefix` must be a plain path starting with '/'",
                    Some("e.g. strip_prefix = \"/static\"".to_string()),
                );
            }
            Some(v.to_string())
        }
    };
    let status = |default: u16, allowed: &dyn Fn(u16) -> bool, help: &str| -> Result<u16, ConfigError> {
        match &raw.status {
            None => Ok(default),
            Some(s) => match u16::try_from(*s.get_ref()) {
                Ok(v) if allowed(v) => Ok(v),
                _ => cx.err(s.span(), format!("status {} is not allowed here", s.get_ref()), Some(help.to_string())),
            },
        }
    };
    if matches!(actions[0], "workspace" | "runtime" | "user_service") {
        // The owner is the path segment after the prefix, so only prefix patterns make sense.
        if let Some(p) = raw.patterns.get_ref().iter().find(|p| !p.get_ref().ends_with("/*")) {
            return cx.err(
                p.span(),
                format!("a `{}` route needs prefix patterns ending in \"/*\"", actions[0]),
                Some("e.g. match = [\"/u/*\"]: the user id is the segment after the prefix".to_string()),
            );
        }
    }
    let action = if raw.workspace.as_ref().is_some_and(|b| *b.get_ref()) {
        ActionSpec::Workspace
    } else if raw.runtime.as_ref().is_some_and(|b| *b.get_ref()) {
        ActionSpec::Runtime
    } else if raw.control.as_ref().is_some_and(|b| *b.get_ref()) {
        ActionSpec::Control
    } else if let Some(p) = &raw.user_service {
        let (label, addr) = upstream_addr(cx, p)?;
        ActionSpec::UserService { label, addr, strip_prefix }
    } else if let Some(p) = &raw.proxy {
        let (label, addr) = upstream_addr(cx, p)?;
        ActionSpec::Proxy { label, addr, strip_prefix }
    } else if let Some(root) = &raw.static_root {
        let root_path = base_dir.join(root.get_ref());
        if !root_path.is_dir() {
            warnings.push(format!(
                "{}: static root {} does not exist (yet); its route answers 404 until it does",
                cx.file.display(),
                root_path.display()
            ));
        }
        ActionSpec::Static {
            root: root_path,
            strip_prefix,
            index: raw.index.clone().unwrap_or_else(|| vec!["index.html".to_string()]),
        }
    } else if let Some(to) = &raw.redirect {
        if to.get_ref().is_empty() {
            return cx.err(
                to.span(),
                "`redirect` is empty",
                Some("give a URL or a path; {uri} and {path} are replaced by the request's".to_string()),
            );
        }
        ActionSpec::Redirect {
            to: to.get_ref().clone(),
            status: status(
                308,
                &|v| matches!(v, 301 | 302 | 303 | 307 | 308),
                "a redirect status is one of 301, 302, 303, 307, 308",
            )?,
        }
    } else if let Some(body) = &raw.respond {
        ActionSpec::Respond {
            status: status(200, &|v| (200..=599).contains(&v), "use a status from 200 to 599")?,
            body: body.get_ref().clone(),
            content_type: raw
                .content_type
                .as_ref()
                .map(|c| c.get_ref().clone())
                .unwrap_or_else(|| "text/plain; charset=utf-8".to_string()),
        }
    } else {
        return cx.err(r.span(), "this route has no action", Some(action_help));
    };
    only_for(
        raw.upgrades.is_some(),
        "upgrades",
        raw.upgrades.as_ref().map(|s| s.span()).unwrap_or(0..0),
        &["proxy", "workspace", "runtime", "user_service"],
    )?;
    let mut upgrades = Vec::new();
    for u in raw.upgrades.iter().flat_map(|u| u.get_ref()) {
        let token = u.get_ref().trim();
        if token.eq_ignore_ascii_case("h2c") {
            return cx.err(
                u.span(),
                "`h2c` cannot be tunnelled",
                Some("an h2c tunnel would carry later requests past every route rule (h2c smuggling); serve HTTP/2 over TLS instead".to_string()),
            );
        }
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._/".contains(&b)) {
            return cx.err(
                u.span(),
                format!("{token:?} is not an Upgrade protocol name"),
                Some("write a token such as \"websocket\" (always allowed) or \"IRC/6.9\"".to_string()),
            );
        }
        upgrades.push(token.to_string());
    }
    if raw.burst.is_some() && raw.rate_limit.is_none() {
        let span = raw.burst.as_ref().map(|b| b.span()).unwrap_or(0..0);
        return cx.err(
            span,
            "`burst` needs a `rate_limit`",
            Some("e.g. rate_limit = \"100/s\" with burst = 20".to_string()),
        );
    }
    let burst = match &raw.burst {
        None => 0,
        Some(b) => match u32::try_from(*b.get_ref()) {
            Ok(v) => v,
            Err(_) => return cx.err(b.span(), "`burst` must be a whole number from 0", None),
        },
    };
    let rate_limit = match &raw.rate_limit {
        None => None,
        Some(r) => match RateSpec::parse(r.get_ref(), burst) {
            Ok(spec) => Some(spec),
            Err(why) => {
                return cx.err(
                    r.span(),
                    format!("bad `rate_limit`: {why}"),
                    Some("e.g. rate_limit = \"100/s\", \"600/m\" or \"5000/h\"".to_string()),
                )
            }
        },
    };
    let name = match &raw.name {
        Some(n) if !n.get_ref().trim().is_empty() => n.get_ref().trim().to_string(),
        Some(n) => return cx.err(n.span(), "`name` is empty", None),
        None => format!("{}{}#{}", hosts[0], patterns[0], index + 1),
    };
    Ok(RouteSpec { name, patterns, action, upgrades, rate_limit })
}

impl Config {
    /// The embedded default: serves the welcome page on 127.0.0.1:8080.
    pub fn embedded() -> Result<Config, ConfigError> {
        parse(Path::new("<embedded default>"), EMBEDDED_DEFAULT)
    }

    pub fn route_count(&self) -> usize {
        self.sites.iter().map(|s| s.routes.len()).sum()
    }

    /// What the certificate manager must serve.
    pub fn tls_plan(&self) -> Vec<ManagedSite> {
        self.sites
            .iter()
            .map(|s| ManagedSite { name: s.hosts[0].clone(), hosts: s.hosts.clone(), tls: s.tls.clone() })
            .collect()
    }

    /// Builds the immutable route table for this config.
    /// Builds the immutable routing (sites, routes, settings) for this config.
    pub fn build_routing(&self, metrics: &Arc<Metrics>) -> Routing {
        let proxy_action = |label: &String, addr: SocketAddr, strip_prefix: &Option<String>| ProxyAction {
            upstream: Upstream { label: label.as_str().into(), addr },
            strip_prefix: strip_prefix.clone(),
        };
        let sites = self
            .sites
            .iter()
            .map(|s| Site {
                hosts: s.hosts.clone(),
                tls: s.tls != SiteTls::Off,
                routes: s
                    .routes
                    .iter()
                    .map(|r| {
                        let action = match &r.action {
                            ActionSpec::Proxy { label, addr, strip_prefix } => {
                                Action::Proxy(proxy_action(label, *addr, strip_prefix))
                            }
                            ActionSpec::Static { root, strip_prefix, index } => Action::Static(StaticAction {
                                root: root.clone(),
                                strip_prefix: strip_prefix.clone(),
                                index: index.clone(),
                            }),
                            ActionSpec::Redirect { to, status } => Action::Redirect { to: to.clone(), status: *status },
                            ActionSpec::Respond { status, body, content_type } => Action::Respond {
                                status: *status,
                                body: Bytes::from(body.clone()),
                                content_type: content_type.clone(),
                            },
                            ActionSpec::Workspace => Action::Workspace,
                            ActionSpec::Runtime => Action::Runtime,
                            ActionSpec::Control => Action::Control,
                            ActionSpec::UserService { label, addr, strip_prefix } => {
                                Action::UserService(proxy_action(label, *addr, strip_prefix))
                            }
                        };
                        let mut route = Route::new(
                            &r.name,
                            r.patterns.iter().map(|p| PathPattern::parse(p)).collect(),
                            action,
                            metrics.route(&r.name),
                        );
                        route.upgrades = r.upgrades.iter().map(|u| Arc::from(u.as_str())).collect();
                        route.rate_limit = r.rate_limit.map(RateLimiter::new);
                        Arc::new(route)
                    })
                    .collect(),
            })
            .collect();
        Routing::new(self.proxy.clone(), sites)
    }
}

#[cfg(test)]
mod tests;
