//! The route table: one immutable value, built from the config and swapped whole behind an
//! `ArcSwap`. A request loads it once and keeps that snapshot for its whole life.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ipnet::IpNet;
use pingora::upstreams::peer::HttpPeer;
use rpds::{HashTrieMapSync, HashTrieSetSync};
use serde::Serialize;

use crate::metrics::RouteMetrics;

/// A path pattern of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    /// Matches this path only.
    Exact(String),
    /// `P*`: matches every path starting with `P`; when `P` ends with `/`, also `P` without it
    /// (so `/x/*` matches `/x` but not `/xy`).
    Prefix(String),
}

impl PathPattern {
    /// Parses `"/x/*"` (prefix) or `"/x"` (exact). The caller has validated the shape.
    pub fn parse(s: &str) -> PathPattern {
        match s.strip_suffix('*') {
            Some(p) => PathPattern::Prefix(p.to_string()),
            None => PathPattern::Exact(s.to_string()),
        }
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => path == p,
            PathPattern::Prefix(p) => {
                path.starts_with(p.as_str()) || (p.len() > 1 && p.ends_with('/') && path == &p[..p.len() - 1])
            }
        }
    }

    pub fn as_config(&self) -> String {
        match self {
            PathPattern::Exact(p) => p.clone(),
            PathPattern::Prefix(p) => format!("{p}*"),
        }
    }
}

/// Where a proxied request goes.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// As written in the config (used in metrics labels and logs).
    pub label: Arc<str>,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct ProxyAction {
    pub upstream: Upstream,
    /// Removed from the front of the path before forwarding.
    pub strip_prefix: Option<String>,
}

#[derive(Debug, Clone)]
pub struct StaticAction {
    pub root: PathBuf,
    pub strip_prefix: Option<String>,
    pub index: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum Action {
    Proxy(ProxyAction),
    Static(StaticAction),
    Redirect {
        to: String,
        status: u16,
    },
    Respond {
        status: u16,
        body: Bytes,
        content_type: String,
    },
    /// `/u/<userId>/...`: identity and owner check, then the user's editor, prefix stripped.
    Workspace,
    /// `/r/<userId>/...`: the same, to the user's runtime.
    Runtime,
    /// `/sync/<userId>/...`, `/tunnel/<userId>`: identity and owner check, then a shared service
    /// with `X-User-Id` set by us.
    UserService(ProxyAction),
    /// The embedded control API (`/api/health`, `/api/services`, `/health`).
    Control,
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Proxy(_) => "proxy",
            Action::Static(_) => "static",
            Action::Redirect { .. } => "redirect",
            Action::Respond { .. } => "respond",
            Action::Workspace => "workspace",
            Action::Runtime => "runtime",
            Action::UserService(_) => "user_service",
            Action::Control => "control",
        }
    }

    /// Routes that check a session and an owner (`/u/`, `/r/`, `/sync/`, `/tunnel/`).
    pub fn is_identity(&self) -> bool {
        matches!(self, Action::Workspace | Action::Runtime | Action::UserService(_))
    }
}

#[derive(Debug)]
pub struct Route {
    /// Unique within the table; a metrics label, so its set is bounded by the config.
    pub name: Arc<str>,
    pub patterns: Vec<PathPattern>,
    pub action: Action,
    pub metrics: RouteMetrics,
    /// `Upgrade` protocols tunnelled besides `websocket` (never `h2c`; checked at load).
    pub upgrades: Vec<Arc<str>>,
    /// `rate_limit` with its `burst`, per client address (per user on identity routes).
    pub rate_limit: Option<crate::ratelimit::RateLimiter>,
}

impl Route {
    /// A route with no upgrades beyond websockets and no rate limit.
    pub fn new(name: &str, patterns: Vec<PathPattern>, action: Action, metrics: RouteMetrics) -> Route {
        Route { name: name.into(), patterns, action, metrics, upgrades: Vec::new(), rate_limit: None }
    }

    pub fn matches(&self, path: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(path))
    }

    /// This route tunnels the `Upgrade` protocol `token` (`websocket` always does).
    pub fn allows_upgrade(&self, token: &str) -> bool {
        token.eq_ignore_ascii_case("websocket") || self.upgrades.iter().any(|u| u.eq_ignore_ascii_case(token))
    }
}

#[derive(Debug)]
pub struct Site {
    pub hosts: Vec<String>,
    /// Served over HTTPS: plain-HTTP requests are redirected.
    pub tls: bool,
    pub routes: Vec<Arc<Route>>,
}

impl Site {
    /// First match wins.
    pub fn find(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.matches(path))
    }
}

/// Settings that a reload may change, carried in the snapshot so they swap with the routes.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub trusted_proxies: Vec<IpNet>,
    /// Idle timeout while reading a request body from the client.
    pub client_idle_timeout: Duration,
    pub websocket_idle_timeout: Option<Duration>,
    /// Requests whose header section is larger get 431.
    pub max_header_bytes: usize,
    pub access_log: bool,
    /// The HTTPS listener's port, when there is one (for redirects).
    pub https_port: Option<u16>,
    pub redirect_to_https: bool,
    /// `Strict-Transport-Security` for HTTPS responses of TLS sites.
    pub hsts: Option<String>,
    pub upstream_connect_timeout: Duration,
    /// Idle time between upstream bytes (`None`: no limit).
    pub upstream_idle_timeout: Option<Duration>,
}

impl ProxySettings {
    /// A peer for `addr` with our timeouts, for the requests Pingora's proxy loop sends (those
    /// with a body; the rest go through `upstream::forward`, websockets through `tunnel`).
    pub fn peer(&self, addr: SocketAddr) -> HttpPeer {
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(self.upstream_connect_timeout);
        peer.options.total_connection_timeout = Some(self.upstream_connect_timeout);
        peer.options.read_timeout = self.upstream_idle_timeout;
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        peer
    }
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            trusted_proxies: Vec::new(),
            client_idle_timeout: Duration::from_secs(60),
            websocket_idle_timeout: Some(Duration::from_secs(3600)),
            max_header_bytes: 64 * 1024,
            access_log: true,
            https_port: None,
            redirect_to_https: true,
            hsts: None,
            upstream_connect_timeout: Duration::from_secs(1),
            upstream_idle_timeout: Some(Duration::from_secs(300)),
        }
    }
}

/// The part of the table that comes from the config: sites, routes and settings.
#[derive(Debug)]
pub struct Routing {
    pub settings: ProxySettings,
    sites: Vec<Arc<Site>>,
    by_host: HashMap<String, Arc<Site>>,
    /// `*.example.com` entries, stored as `.example.com`.
    wildcards: Vec<(String, Arc<Site>)>,
    /// The site with host `*`, if any.
    fallback: Option<Arc<Site>>,
}

/// Lower-cases a host, drops a port and a trailing dot. `[::1]:8080` gives `[::1]`.
pub fn canonical_host(raw: &str) -> String {
    let host = if raw.starts_with('[') {
        match raw.find(']') {
            Some(end) => &raw[..=end],
            None => raw,
        }
    } else {
        match raw.rfind(':') {
            Some(i) => &raw[..i],
            None => raw,
        }
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

impl Routing {
    pub fn new(settings: ProxySettings, sites: Vec<Site>) -> Routing {
        let mut by_host = HashMap::new();
        let mut wildcards = Vec::new();
        let mut fallback = None;
        let sites: Vec<Arc<Site>> = sites.into_iter().map(Arc::new).collect();
        for site in &sites {
            for h in &site.hosts {
                if h == "*" {
                    fallback = Some(site.clone());
                } else if let Some(suffix) = h.strip_prefix('*') {
                    wildcards.push((suffix.to_string(), site.clone()));
                } else {
                    by_host.insert(h.clone(), site.clone());
                }
            }
        }
        // Longest suffix first, so `*.a.example.com` beats `*.example.com`.
        wildcards.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        Routing { settings, sites, by_host, wildcards, fallback }
    }

    /// The site for an already canonical host.
    pub fn site(&self, host: &str) -> Option<&Arc<Site>> {
        if let Some(s) = self.by_host.get(host) {
            return Some(s);
        }
        for (suffix, site) in &self.wildcards {
            if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                return Some(site);
            }
        }
        self.fallback.as_ref()
    }

    pub fn sites(&self) -> &[Arc<Site>] {
        &self.sites
    }

    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.sites.iter().flat_map(|s| s.routes.iter())
    }

    /// A JSON view for `GET /routes`.
    pub fn describe(&self, generation: u64, disabled: &HashTrieSetSync<Arc<str>>) -> TableView {
        TableView {
            generation,
            sites: self
                .sites
                .iter()
                .map(|s| SiteView {
                    hosts: s.hosts.clone(),
                    routes: s.routes.iter().map(|r| RouteView::of(r, disabled.contains(&r.name))).collect(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TableView {
    pub generation: u64,
    pub sites: Vec<SiteView>,
}

#[derive(Debug, Serialize)]
pub struct SiteView {
    pub hosts: Vec<String>,
    pub routes: Vec<RouteView>,
}

#[derive(Debug, Serialize)]
pub struct RouteView {
    pub name: String,
    #[serde(rename = "match")]
    pub patterns: Vec<String>,
    pub action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub disabled: bool,
}

impl RouteView {
    fn of(r: &Route, disabled: bool) -> RouteView {
        let (target, status) = match &r.action {
            Action::Proxy(p) => (Some(p.upstream.label.to_string()), None),
            Action::Static(s) => (Some(s.root.display().to_string()), None),
            Action::Redirect { to, status } => (Some(to.clone()), Some(*status)),
            Action::Respond { status, .. } => (None, Some(*status)),
            Action::UserService(p) => (Some(p.upstream.label.to_string()), None),
            Action::Workspace | Action::Runtime | Action::Control => (None, None),
        };
        RouteView {
            name: r.name.to_string(),
            patterns: r.patterns.iter().map(PathPattern::as_config).collect(),
            action: r.action.kind(),
            target,
            status,
            disabled,
        }
    }
}

/// What the gateway saw of a user's traffic, for idle reaping: updated with atomics on the
/// request path, read by the control plane.
#[derive(Debug)]
pub struct Activity {
    /// Unix seconds of the last request.
    last: AtomicU64,
    open_websockets: AtomicI64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity { last: AtomicU64::new(unix_now()), open_websockets: AtomicI64::new(0) }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Activity {
    pub fn touch(&self) {
        self.last.store(unix_now(), Ordering::Relaxed);
    }

    pub fn websocket_opened(&self) {
        self.open_websockets.fetch_add(1, Ordering::Relaxed);
    }

    pub fn websocket_closed(&self) {
        self.open_websockets.fetch_sub(1, Ordering::Relaxed);
        self.touch();
    }

    pub fn open_websockets(&self) -> i64 {
        self.open_websockets.load(Ordering::Relaxed)
    }

    /// Seconds since the last request.
    pub fn idle_secs(&self) -> u64 {
        unix_now().saturating_sub(self.last.load(Ordering::Relaxed))
    }
}

/// Where one user's requests go: their editor and runtime.
#[derive(Debug, Clone, Serialize)]
pub struct UserRoutes {
    pub editor: SocketAddr,
    pub runtime: SocketAddr,
    /// Only a running workspace receives traffic; any other state answers 503 + Retry-After.
    pub running: bool,
    /// Carried over from the previous entry of the user by [`RouteTable::with_user`].
    #[serde(skip)]
    pub activity: Arc<Activity>,
}

impl UserRoutes {
    pub fn new(editor: SocketAddr, runtime: SocketAddr, running: bool) -> UserRoutes {
        UserRoutes { editor, runtime, running, activity: Arc::default() }
    }
}

impl PartialEq for UserRoutes {
    fn eq(&self, other: &Self) -> bool {
        self.editor == other.editor && self.runtime == other.runtime && self.running == other.running
    }
}

/// The live table: the config's routing plus the per-user workspace map and the route kill
/// switches. Cloning is cheap (an `Arc` and two persistent maps), so a per-user change builds a
/// new table in O(log n) without copying the other users.
#[derive(Debug, Clone)]
pub struct RouteTable {
    /// Increases with every applied config reload.
    pub generation: u64,
    pub routing: Arc<Routing>,
    pub workspaces: HashTrieMapSync<Arc<str>, Arc<UserRoutes>>,
    pub disabled: HashTrieSetSync<Arc<str>>,
}

impl std::ops::Deref for RouteTable {
    type Target = Routing;

    fn deref(&self) -> &Routing {
        &self.routing
    }
}

impl RouteTable {
    pub fn new(generation: u64, routing: Routing) -> RouteTable {
        RouteTable {
            generation,
            routing: Arc::new(routing),
            workspaces: HashTrieMapSync::new_sync(),
            disabled: HashTrieSetSync::new_sync(),
        }
    }

    /// An empty table (everything 404).
    pub fn empty() -> RouteTable {
        RouteTable::new(0, Routing::new(ProxySettings::default(), Vec::new()))
    }

    /// The same workspaces and switches under a new config.
    pub fn with_routing(&self, generation: u64, routing: Arc<Routing>) -> RouteTable {
        RouteTable { generation, routing, workspaces: self.workspaces.clone(), disabled: self.disabled.clone() }
    }

    pub fn with_user(&self, user: &str, mut routes: UserRoutes) -> RouteTable {
        let mut t = self.clone();
        if let Some(old) = t.workspaces.get(user) {
            routes.activity = old.activity.clone();
        }
        t.workspaces.insert_mut(Arc::from(user), Arc::new(routes));
        t
    }

    pub fn without_user(&self, user: &str) -> RouteTable {
        let mut t = self.clone();
        t.workspaces.remove_mut(user);
        t
    }

    pub fn user(&self, user: &str) -> Option<&Arc<UserRoutes>> {
        self.workspaces.get(user)
    }

    pub fn with_route_disabled(&self, name: &str, disabled: bool) -> RouteTable {
        let mut t = self.clone();
        if disabled {
            t.disabled.insert_mut(Arc::from(name));
        } else {
            t.disabled.remove_mut(name);
        }
        t
    }

    pub fn is_disabled(&self, name: &str) -> bool {
        !self.disabled.is_empty() && self.disabled.contains(name)
    }

    pub fn describe(&self) -> TableView {
        self.routing.describe(self.generation, &self.disabled)
    }

    pub fn has_route(&self, name: &str) -> bool {
        self.routing.routes().any(|r| &*r.name == name)
    }
}

/// The one handle that can publish a new table. Only the control plane's state owner holds it
/// (`markco_control::state`), so every change to the live table goes through one place.
pub struct TablePublisher(Arc<arc_swap::ArcSwap<RouteTable>>);

/// A read-only handle on the live table: what the data plane, the admin API and the loops hold.
#[derive(Clone)]
pub struct TableReader(Arc<arc_swap::ArcSwap<RouteTable>>);

impl TablePublisher {
    /// The publisher of `first` and a reader of everything it publishes.
    pub fn new(first: RouteTable) -> (TablePublisher, TableReader) {
        let live = Arc::new(arc_swap::ArcSwap::from_pointee(first));
        (TablePublisher(live.clone()), TableReader(live))
    }

    /// Makes `next` the snapshot every following request loads.
    pub fn publish(&self, next: Arc<RouteTable>) {
        self.0.store(next);
    }

    pub fn current(&self) -> Arc<RouteTable> {
        self.0.load_full()
    }

    pub fn reader(&self) -> TableReader {
        TableReader(self.0.clone())
    }
}

impl TableReader {
    /// The current snapshot, cheaply; a request takes it once and keeps it.
    pub fn load(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.0.load()
    }

    pub fn load_full(&self) -> Arc<RouteTable> {
        self.0.load_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_patterns() {
        let p = PathPattern::parse("/x/*");
        assert!(p.matches("/x"));
        assert!(p.matches("/x/"));
        assert!(p.matches("/x/y/z"));
        assert!(!p.matches("/xy"));
        let at = PathPattern::parse("/@*");
        assert!(at.matches("/@alice/post"));
        assert!(at.matches("/@"));
        assert!(!at.matches("/a@"));
        let all = PathPattern::parse("/*");
        assert!(all.matches("/"));
        assert!(all.matches("/anything/at/all"));
        let exact = PathPattern::parse("/api/send");
        assert!(exact.matches("/api/send"));
        assert!(!exact.matches("/api/send/"));
        assert!(!exact.matches("/api/sends"));
    }

    #[test]
    fn hosts_are_canonical() {
        assert_eq!(canonical_host("Markco.DEV:443"), "markco.dev");
        assert_eq!(canonical_host("markco.dev."), "markco.dev");
        assert_eq!(canonical_host("[::1]:8080"), "[::1]");
        assert_eq!(canonical_host("localhost"), "localhost");
    }
}
