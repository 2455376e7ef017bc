//! The Pingora `ProxyHttp` implementation: one route-table snapshot per request, then the
//! route's action.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::http::ServerSession as HttpSession;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;

use crate::forwarded::{self, UpstreamHead};
use crate::identity::{self, ControlApi, Identity, IdentityError, NoIdentity, WorkspaceStarter};
use crate::metrics::{Metrics, RouteMetrics, UpstreamErrorKind};
use crate::path;
use crate::static_files;
use crate::table::{canonical_host, Action, Activity, PathPattern, ProxySettings, Route, RouteTable, TableReader};
use crate::target::{self, TargetForm};
use crate::tunnel;
use crate::upstream;

/// ACME HTTP-01 answers (token → key authorization), published by the certificate manager.
pub type AcmeTokens = Arc<ArcSwap<HashMap<String, String>>>;

/// `[cluster]`: answers an HTTP-01 token this gateway does not know (another gateway ordered)
/// from the shared database. Bounded: it answers `None` when it cannot tell in time.
#[async_trait]
pub trait AcmeLookup: Send + Sync {
    async fn answer(&self, token: &str) -> Option<String>;
}

const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Could this be an ACME token (RFC 8555: base64url, at least 128 bits of entropy)?
fn plausible_acme_token(t: &str) -> bool {
    (16..=256).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The data plane. A clone shares all its state (the edge's own loop and Pingora's `HttpProxy`
/// each hold one).
#[derive(Clone)]
pub struct Gateway {
    table: TableReader,
    metrics: Arc<Metrics>,
    acme_tokens: AcmeTokens,
    acme_lookup: Option<Arc<dyn AcmeLookup>>,
    identity: Arc<dyn Identity>,
    control: Option<Arc<dyn ControlApi>>,
    starter: Option<Arc<dyn WorkspaceStarter>>,
    /// Requests that matched no site or route.
    unrouted: RouteMetrics,
    /// Upstream labels of per-user routes, made once (a request only clones the `Arc`).
    editor_label: Arc<str>,
    runtime_label: Arc<str>,
    /// Tells websocket tunnels when a graceful shutdown is about to end them.
    drain: Option<Arc<crate::drain::Drain>>,
}

impl Gateway {
    pub fn new(table: TableReader, metrics: Arc<Metrics>, acme_tokens: AcmeTokens) -> Gateway {
        let unrouted = metrics.route("none");
        Gateway {
            table,
            metrics,
            acme_tokens,
            acme_lookup: None,
            identity: Arc::new(NoIdentity),
            control: None,
            starter: None,
            unrouted,
            editor_label: Arc::from("workspace:editor"),
            runtime_label: Arc::from("workspace:runtime"),
            drain: None,
        }
    }

    /// The longest a client may leave a request body idle (the routes' `client_idle_timeout`,
    /// as of now).
    pub fn client_idle_timeout(&self) -> Duration {
        self.table.load().settings.client_idle_timeout
    }

    /// Websockets end with a Close frame just before a graceful shutdown would cut them.
    pub fn with_drain(mut self, drain: Arc<crate::drain::Drain>) -> Gateway {
        self.drain = Some(drain);
        self
    }

    /// The control plane's session lookups.
    pub fn with_identity(mut self, identity: Arc<dyn Identity>) -> Gateway {
        self.identity = identity;
        self
    }

    /// `[cluster]`: HTTP-01 tokens of other gateways' orders, from the shared database.
    pub fn with_acme_lookup(mut self, lookup: Arc<dyn AcmeLookup>) -> Gateway {
        self.acme_lookup = Some(lookup);
        self
    }

    pub fn with_control(mut self, control: Arc<dyn ControlApi>) -> Gateway {
        self.control = Some(control);
        self
    }

    pub fn with_starter(mut self, starter: Arc<dyn WorkspaceStarter>) -> Gateway {
        self.starter = Some(starter);
        self
    }
}

/// Where a proxied request goes and how it is rewritten on the way.
struct Forward {
    addr: std::net::SocketAddr,
    /// The path to send (the normalised one, prefix stripped where the route says so).
    path: String,
    /// Remove `token` from the query (identity routes: the upstream must not see it).
    drop_token: bool,
    /// `X-User-Id` set by us (client-sent ones are always removed on identity routes).
    user_header: Option<Arc<str>>,
    /// Metrics label of the upstream (bounded: never a user id).
    label: Arc<str>,
}

/// Per-request state.
pub struct Ctx {
    start: Instant,
    table: Option<Arc<RouteTable>>,
    route: Option<Arc<Route>>,
    /// The normalised path the route was chosen on.
    path: String,
    /// Status of a response we wrote ourselves (the proxied ones are read from the session).
    status: u16,
    /// The connection was upgraded (websocket) and counted in the open gauge.
    upgraded: bool,
    trusted_peer: bool,
    /// `Strict-Transport-Security` to add to this response.
    hsts: Option<Arc<str>>,
    forward: Option<Forward>,
    /// The user's activity record, for an upgraded connection to a workspace.
    activity: Option<Arc<Activity>>,
    /// The client's address, read once (a detached tunnel leaves the session without a socket).
    client: Option<IpAddr>,
}

/// An open tunnel, counted in the websocket gauge and the user's activity record until the
/// tunnel's task drops it.
struct OpenTunnel {
    route: Option<Arc<Route>>,
    activity: Option<Arc<Activity>>,
}

impl OpenTunnel {
    fn open(route: Option<Arc<Route>>, activity: Option<Arc<Activity>>) -> OpenTunnel {
        if let Some(r) = &route {
            r.metrics.websockets.inc();
        }
        if let Some(a) = &activity {
            a.websocket_opened();
        }
        OpenTunnel { route, activity }
    }
}

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        if let Some(r) = &self.route {
            r.metrics.websockets.dec();
        }
        if let Some(a) = &self.activity {
            a.websocket_closed();
        }
    }
}

/// Writes a response of our own (every reply markco makes itself goes through here): a short
/// body that names no internals, never cached, never sniffed.
pub async fn reply(
    session: &mut Session,
    status: u16,
    content_type: &str,
    body: Bytes,
    extra: &[(http::HeaderName, &str)],
) -> Result<()> {
    let mut h = ResponseHeader::build(status, Some(4 + extra.len()))?;
    h.insert_header(header::CONTENT_TYPE, content_type)?;
    h.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    h.insert_header("X-Content-Type-Options", "nosniff")?;
    h.insert_header(header::CACHE_CONTROL, "no-store")?;
    for (k, v) in extra {
        h.insert_header(k.clone(), *v)?;
    }
    let head = session.req_header().method == http::Method::HEAD || body.is_empty();
    session.write_response_header(Box::new(h), head).await?;
    if !head {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// A short plain-text response; the body names no internals.
pub async fn respond_text(session: &mut Session, status: u16, body: &'static str) -> Result<()> {
    reply(session, status, "text/plain; charset=utf-8", Bytes::from_static(body.as_bytes()), &[]).await
}

fn peer_ip(session: &Session) -> Option<IpAddr> {
    session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip())
}

fn is_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

/// The request header section is larger than `limit` (status 431).
fn header_too_large(req: &RequestHeader, limit: usize) -> bool {
    // No allocation: the request line's target is the path and query (or the whole URI).
    let mut size = req.uri.path_and_query().map(|p| p.as_str().len()).unwrap_or(0)
        + req.uri.authority().map(|a| a.as_str().len()).unwrap_or(0);
    for (k, v) in req.headers.iter() {
        size += k.as_str().len() + v.len() + 4;
        if size > limit {
            return true;
        }
    }
    size > limit
}

/// Both `Content-Length` and `Transfer-Encoding` were sent. Pingora drops the length and lets
/// chunked framing win (RFC 9112 6.3); we refuse such a request outright, since a peer that
/// sends both is either broken or probing for request smuggling.
fn has_cl_and_te(session: &Session) -> bool {
    if !session.req_header().headers.contains_key(header::TRANSFER_ENCODING) {
        return false;
    }
    match session.as_downstream() {
        HttpSession::H1(h1) => {
            let raw = h1.get_headers_raw_bytes();
            raw.split(|&b| b == b'\n')
                .any(|line| line.len() >= 15 && line[..15].eq_ignore_ascii_case(b"content-length:"))
        }
        _ => false,
    }
}

/// An upstream's response head as the client gets it: no hop-by-hop headers, our HSTS.
fn response_head(resp: &mut ResponseHeader, hsts: Option<&str>) -> Result<()> {
    forwarded::clean_response(resp);
    if let Some(v) = hsts {
        resp.insert_header("Strict-Transport-Security", v)?;
    }
    Ok(())
}

/// `?token=...` values never reach the access log.
fn redacted_uri(req: &RequestHeader) -> String {
    let path = req.uri.path();
    match req.uri.query() {
        None => path.to_string(),
        Some(q) => {
            let q: Vec<String> = q
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("token") => format!("{k}=REDACTED"),
                    _ => kv.to_string(),
                })
                .collect();
            format!("{path}?{}", q.join("&"))
        }
    }
}

/// What the upstream's head depends on besides the request and its route: the client's
/// connection.
struct ClientConn {
    peer: Option<IpAddr>,
    tls: bool,
    upgrade: bool,
    h2: bool,
}

impl ClientConn {
    fn of(session: &Session) -> ClientConn {
        ClientConn {
            peer: peer_ip(session),
            tls: is_tls(session),
            upgrade: session.is_upgrade_req(),
            h2: session.req_header().version == http::Version::HTTP_2,
        }
    }
}

/// How the request the upstream gets differs from the client's `req`: our path, no `token` on
/// identity routes, our `X-User-Id`, forwarded headers, no hop-by-hop headers.
fn upstream_head(req: &RequestHeader, client: &ClientConn, f: &Forward, trusted_peer: bool) -> Result<UpstreamHead> {
    let mut head = UpstreamHead::default();
    // Identity routes: the upstream never sees the session `token`, and only we say who the
    // user is.
    let query = match req.uri.query() {
        Some(q) if f.drop_token => identity::query_without_token(Some(q)).map(std::borrow::Cow::Owned),
        q => q.map(std::borrow::Cow::Borrowed),
    };
    if f.drop_token {
        head.drop(req, "x-user-id");
    }
    // Compared with the raw target, not the parsed URI: an absolute-form target keeps its raw
    // bytes, which would otherwise go upstream as they came.
    if !is_target(req.raw_path(), &f.path, query.as_deref()) {
        head.target(match &query {
            Some(q) => format!("{}?{q}", f.path),
            None => f.path.clone(),
        });
    }
    if client.h2 {
        if let Some(cookie) = joined_cookies(req)? {
            head.set("Cookie", cookie);
        }
    }
    // HTTP/2 carries the host in `:authority`, never to be passed on with a `user@` part (RFC
    // 9113 8.3.1).
    let authority = || {
        req.uri.authority().map(|a| {
            let a = a.as_str();
            a.rsplit('@').next().unwrap_or(a)
        })
    };
    let host = match req.headers.get(header::HOST) {
        Some(v) if v.to_str().is_ok() => Some(v.clone()),
        Some(_) => authority().and_then(|a| http::HeaderValue::from_str(a).ok()),
        // The HTTP/1.1 upstream gets it as `Host`.
        None => match authority() {
            Some(a) => {
                let host = http::HeaderValue::from_str(a)
                    .or_err(ErrorType::InvalidHTTPHeader, "the request's authority as Host")?;
                head.set("Host", host.clone());
                Some(host)
            }
            None => None,
        },
    };
    head.forwarding(req, host, client.peer, trusted_peer, client.tls, client.upgrade);
    if let Some(user) = &f.user_header {
        let user = http::HeaderValue::from_str(user).or_err(ErrorType::InternalError, "the user id as X-User-Id")?;
        head.set("X-User-Id", user);
    }
    Ok(head)
}

/// `raw` (a request target) is `path`, then `?query` when there is a query.
fn is_target(raw: &[u8], path: &str, query: Option<&str>) -> bool {
    match (raw.strip_prefix(path.as_bytes()), query) {
        (Some(rest), None) => rest.is_empty(),
        (Some(rest), Some(q)) => rest.strip_prefix(b"?") == Some(q.as_bytes()),
        (None, _) => false,
    }
}

/// HTTP/2 may split `Cookie` into several fields; an HTTP/1.1 upstream must get one, joined
/// with "; " (RFC 9113 8.2.3). `None`: there is at most one.
fn joined_cookies(req: &RequestHeader) -> Result<Option<http::HeaderValue>> {
    let mut values = req.headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return Ok(None);
    };
    let mut joined = first.as_bytes().to_vec();
    for v in req.headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    http::HeaderValue::from_bytes(&joined).or_err(ErrorType::InvalidHTTPHeader, "joining cookies").map(Some)
}

/// The `Content-Length` to send when the client sent it more than once or as a list
/// (`5, 5`); Pingora has already refused copies that differ.
fn duplicate_content_length(req: &RequestHeader) -> Option<String> {
    let mut values = req.headers.get_all(header::CONTENT_LENGTH).iter();
    let first = values.next()?;
    let listed = first.as_bytes().contains(&b',');
    if values.next().is_none() && !listed {
        return None;
    }
    let text = first.to_str().ok()?;
    text.split(',').next().map(|v| v.trim().to_string())
}

/// Keeps only the `Upgrade` protocols `route` tunnels (`websocket`, and what its `upgrades`
/// lists); `h2c` never passes, since a tunnel opened by an upstream's 101 to it would carry
/// later requests past every route rule. With none left, the request goes on as a plain one,
/// without `Upgrade` and without the `upgrade` connection option.
fn restrict_upgrade(req: &mut RequestHeader, route: &Route) {
    let Some(offered) = req.headers.get(header::UPGRADE).and_then(|v| v.to_str().ok()) else {
        req.remove_header(&header::UPGRADE);
        return;
    };
    let kept: Vec<&str> = offered
        .split(',')
        .map(str::trim)
        .filter(|t| {
            let name = t.split('/').next().unwrap_or("").trim();
            !name.eq_ignore_ascii_case("h2c") && route.allows_upgrade(name)
        })
        .collect();
    if kept.len() == offered.split(',').count() {
        return;
    }
    if kept.is_empty() {
        req.remove_header(&header::UPGRADE);
        let rest: Vec<String> = req
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("upgrade"))
            .map(str::to_owned)
            .collect();
        req.remove_header(&header::CONNECTION);
        if !rest.is_empty() {
            // Still names the hop-by-hop headers (e.g. HTTP2-Settings) to drop upstream.
            let _ = req.insert_header(header::CONNECTION, rest.join(", "));
        }
    } else {
        let _ = req.insert_header(header::UPGRADE, kept.join(", "));
    }
}

/// The address a rate limit counts: the peer, or the client a trusted proxy names last.
fn client_ip(session: &Session, peer: Option<IpAddr>, trusted_peer: bool) -> Option<IpAddr> {
    if !trusted_peer {
        return peer;
    }
    session
        .req_header()
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|ip| ip.trim().parse().ok())
        .or(peer)
}

/// Any `Connection` line lists `close`.
fn wants_close(req: &RequestHeader) -> bool {
    req.headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
}

/// `path` without `prefix` (at a segment boundary), always starting with `/`.
fn strip_path(path: &str, prefix: &str) -> String {
    match path.strip_prefix(prefix) {
        Some("") => "/".to_string(),
        Some(rest) if rest.starts_with('/') => rest.to_string(),
        _ => path.to_string(),
    }
}

/// Idle timeouts only: a long response or an SSE stream is fine while bytes flow.
fn set_client_timeouts(session: &mut Session, settings: &ProxySettings) {
    if session.is_upgrade_req() {
        session.set_read_timeout(settings.websocket_idle_timeout);
    } else {
        session.set_read_timeout(Some(settings.client_idle_timeout));
    }
}

fn classify(e: &Error) -> UpstreamErrorKind {
    match e.etype() {
        ErrorType::ConnectRefused => UpstreamErrorKind::ConnectRefused,
        ErrorType::ConnectTimedout => UpstreamErrorKind::ConnectTimeout,
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => UpstreamErrorKind::ReadTimeout,
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => UpstreamErrorKind::Reset,
        _ => UpstreamErrorKind::Other,
    }
}

impl Gateway {
    /// The request's route and action (`request_filter`, for both of Pingora's loops and ours).
    async fn filter_request(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.client = peer_ip(session);
        let table = self.table.load_full();
        let settings = &table.settings;
        if has_cl_and_te(session) {
            ctx.table = Some(table);
            return self
                .refuse(
                    session,
                    ctx,
                    400,
                    "content_length_and_transfer_encoding",
                    "bad request: both Content-Length and Transfer-Encoding\n",
                )
                .await;
        }
        if header_too_large(session.req_header(), settings.max_header_bytes) {
            ctx.table = Some(table);
            return self.refuse(session, ctx, 431, "header_too_large", "request header fields too large\n").await;
        }
        // Pingora reads only the first `Connection` line; honour a `close` on any of them.
        if session.req_header().headers.get_all(header::CONNECTION).iter().count() > 1
            && wants_close(session.req_header())
        {
            session.set_keepalive(None);
        }
        let form = {
            let req = session.req_header();
            target::classify(req.method.as_str().as_bytes(), req.raw_path())
        };
        let form = match form {
            Ok(f) => f,
            Err(e) => {
                ctx.table = Some(table);
                return self.refuse(session, ctx, 400, e.reason(), "bad request: malformed request target\n").await;
            }
        };
        if session.req_header().version == http::Version::HTTP_11
            && !session.req_header().headers.contains_key(header::HOST)
        {
            // RFC 9112 3.2: a 1.1 request without Host is malformed, whatever its target.
            ctx.table = Some(table);
            return self.refuse(session, ctx, 400, "missing_host", "bad request: no Host header\n").await;
        }
        if let Some(len) = duplicate_content_length(session.req_header()) {
            // Pingora checked that the copies agree (and refuses differing ones); the upstream
            // gets exactly one.
            session.req_header_mut().insert_header(header::CONTENT_LENGTH, len)?;
        }
        if form == TargetForm::Asterisk {
            ctx.table = Some(table);
            let allow = [(header::ALLOW, "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")];
            reply(session, 200, "text/plain; charset=utf-8", Bytes::new(), &allow).await?;
            ctx.status = 200;
            return Ok(true);
        }
        ctx.trusted_peer = forwarded::is_trusted(ctx.client, &settings.trusted_proxies);
        let req = session.req_header();
        let host = req
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri.host())
            .map(canonical_host)
            .unwrap_or_default();
        let normalized = path::normalize(req.uri.path());
        let site = table.site(&host).cloned();
        ctx.table = Some(table);
        let path = match normalized {
            Ok(p) => p,
            Err(_) => return self.refuse(session, ctx, 400, "bad_path", "bad request: malformed path\n").await,
        };
        ctx.path = path;
        let tls = is_tls(session);
        if !tls && ctx.path.starts_with(ACME_CHALLENGE_PREFIX) {
            // HTTP-01 validation comes before any route or redirect.
            let token = &ctx.path[ACME_CHALLENGE_PREFIX.len()..];
            let mut answer = self.acme_tokens.load().get(token).cloned();
            if answer.is_none() && plausible_acme_token(token) {
                if let Some(lookup) = &self.acme_lookup {
                    answer = lookup.answer(token).await;
                }
            }
            if let Some(answer) = answer {
                let mut h = ResponseHeader::build(200, Some(2))?;
                h.insert_header(header::CONTENT_TYPE, "application/octet-stream")?;
                h.insert_header(header::CONTENT_LENGTH, answer.len().to_string())?;
                session.write_response_header(Box::new(h), false).await?;
                session.write_response_body(Some(Bytes::from(answer)), true).await?;
                ctx.status = 200;
                tracing::info!(token, "answered an HTTP-01 validation");
                return Ok(true);
            }
        }
        let Some(site) = site else {
            respond_text(session, 404, "no site is configured for this host\n").await?;
            ctx.status = 404;
            return Ok(true);
        };
        let settings = &ctx.table.as_ref().expect("table loaded").settings;
        if site.tls {
            if tls {
                ctx.hsts = settings.hsts.as_deref().map(Arc::from);
            } else if let (true, Some(port), false) =
                (settings.redirect_to_https, settings.https_port, ctx.path.starts_with(ACME_CHALLENGE_PREFIX))
            {
                // (An ACME challenge we do not know is not redirected: another client may be
                // validating this name through the site's own routes.)
                let req = session.req_header();
                let authority = if port == 443 { host.clone() } else { format!("{host}:{port}") };
                let pq = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                let mut h = ResponseHeader::build(308, Some(2))?;
                h.insert_header(header::LOCATION, format!("https://{authority}{pq}"))?;
                h.insert_header(header::CONTENT_LENGTH, "0")?;
                session.write_response_header(Box::new(h), true).await?;
                ctx.status = 308;
                return Ok(true);
            }
        }
        let Some(route) = site.find(&ctx.path).cloned() else {
            respond_text(session, 404, "not found\n").await?;
            ctx.status = 404;
            return Ok(true);
        };
        ctx.route = Some(route.clone());
        if ctx.table.as_ref().is_some_and(|t| t.is_disabled(&route.name)) {
            return self
                .json(session, ctx, 503, r#"{"error":"This service is temporarily disabled; retry later"}"#)
                .await;
        }
        if session.is_upgrade_req() {
            restrict_upgrade(session.req_header_mut(), &route);
        }
        if !route.action.is_identity() {
            let client = client_ip(session, ctx.client, ctx.trusted_peer);
            if self.rate_limited(session, ctx, &route, &client).await? {
                return Ok(true);
            }
        }
        self.run_action(session, ctx, &route).await
    }

    async fn run_action(&self, session: &mut Session, ctx: &mut Ctx, route: &Route) -> Result<bool> {
        match &route.action {
            Action::Proxy(p) => {
                let upgrade = session.is_upgrade_req();
                let path = match &p.strip_prefix {
                    Some(prefix) => strip_path(&ctx.path, prefix),
                    None => ctx.path.clone(),
                };
                ctx.forward = Some(Forward {
                    addr: p.upstream.addr,
                    path,
                    drop_token: false,
                    user_header: None,
                    label: p.upstream.label.clone(),
                });
                set_client_timeouts(session, &ctx.table.as_ref().expect("table loaded").settings);
                self.proxy(session, ctx, upgrade).await
            }
            Action::Workspace | Action::Runtime | Action::UserService(_) => self.user_route(session, ctx, route).await,
            Action::Control => {
                let Some(control) = &self.control else {
                    return self.json(session, ctx, 503, r#"{"error":"control plane not running"}"#).await;
                };
                let req = session.req_header();
                let auth = req.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
                let r = control.respond(&req.method, &ctx.path, auth).await;
                let mut h = ResponseHeader::build(r.status, Some(3))?;
                h.insert_header(header::CONTENT_TYPE, r.content_type)?;
                h.insert_header(header::CONTENT_LENGTH, r.body.len().to_string())?;
                h.insert_header(header::CACHE_CONTROL, "no-store")?;
                session.write_response_header(Box::new(h), r.body.is_empty()).await?;
                if !r.body.is_empty() {
                    session.write_response_body(Some(r.body), true).await?;
                }
                ctx.status = r.status;
                Ok(true)
            }
            Action::Static(s) => {
                let served = static_files::serve(session, s, &ctx.path, ctx.hsts.as_deref()).await?;
                ctx.status = served.status;
                Ok(true)
            }
            Action::Redirect { to, status } => {
                let req = session.req_header();
                let uri = match req.uri.query() {
                    Some(q) => format!("{}?{q}", ctx.path),
                    None => ctx.path.clone(),
                };
                let location = to.replace("{uri}", &uri).replace("{path}", &ctx.path);
                let mut h = ResponseHeader::build(*status, Some(3))?;
                h.insert_header(header::LOCATION, location)?;
                h.insert_header(header::CONTENT_LENGTH, "0")?;
                session.write_response_header(Box::new(h), true).await?;
                ctx.status = *status;
                Ok(true)
            }
            Action::Respond { status, body, content_type } => {
                let mut h = ResponseHeader::build(*status, Some(3))?;
                h.insert_header(header::CONTENT_TYPE, content_type.as_str())?;
                h.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
                h.insert_header("X-Content-Type-Options", "nosniff")?;
                if let Some(v) = &ctx.hsts {
                    h.insert_header("Strict-Transport-Security", &**v)?;
                }
                let head = session.req_header().method == http::Method::HEAD || body.is_empty();
                session.write_response_header(Box::new(h), head).await?;
                if !head {
                    session.write_response_body(Some(body.clone()), true).await?;
                }
                ctx.status = *status;
                Ok(true)
            }
        }
    }

    /// A short JSON response.
    async fn json(&self, session: &mut Session, ctx: &mut Ctx, status: u16, body: impl Into<Bytes>) -> Result<bool> {
        let retry: &[(http::HeaderName, &str)] = if status == 503 { &[(header::RETRY_AFTER, "5")] } else { &[] };
        reply(session, status, "application/json", body.into(), retry).await?;
        ctx.status = status;
        Ok(true)
    }

    /// 429 when `key` is over the route's `rate_limit`; `Ok(false)` lets the request go on.
    async fn rate_limited<K: std::hash::Hash + Sync + ?Sized>(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        route: &Route,
        key: &K,
    ) -> Result<bool> {
        let Some(limiter) = &route.rate_limit else {
            return Ok(false);
        };
        if limiter.allow(key) {
            return Ok(false);
        }
        self.metrics.rate_limited(&route.name);
        let retry = limiter.retry_after().to_string();
        reply(
            session,
            429,
            "application/json",
            Bytes::from_static(br#"{"error":"Too many requests; retry later"}"#),
            &[(header::RETRY_AFTER, retry.as_str())],
        )
        .await?;
        ctx.status = 429;
        Ok(true)
    }

    /// `/u/<id>/`, `/r/<id>/`, `/sync/<id>/`, `/tunnel/<id>`: a valid session of `<id>` itself,
    /// then that user's upstream. The owner is read from the normalised path, so no spelling of
    /// the path reaches another user's upstream.
    async fn user_route(&self, session: &mut Session, ctx: &mut Ctx, route: &Route) -> Result<bool> {
        let prefix = route
            .patterns
            .iter()
            .find_map(|p| match p {
                PathPattern::Prefix(pre) if pre.ends_with('/') && p.matches(&ctx.path) => Some(pre.as_str()),
                _ => None,
            })
            .unwrap_or("/");
        let Some(owner) = identity::owner_segment(&ctx.path, prefix).map(str::to_owned) else {
            return self.json(session, ctx, 404, r#"{"error":"Not found"}"#).await;
        };
        let upgrade = session.is_upgrade_req();
        let token = identity::session_token(session.req_header());
        let user = match &token {
            None => None,
            Some(t) => match self.identity.user_of(t).await {
                Ok(u) => u,
                Err(IdentityError::Unavailable(why)) => {
                    tracing::warn!("session lookup failed: {why}");
                    return self.json(session, ctx, 503, r#"{"error":"Authentication service unavailable"}"#).await;
                }
            },
        };
        let Some(user) = user else {
            if !upgrade && identity::wants_html(session.req_header()) {
                let mut h = ResponseHeader::build(302, Some(2))?;
                h.insert_header(header::LOCATION, "/login")?;
                h.insert_header(header::CONTENT_LENGTH, "0")?;
                session.write_response_header(Box::new(h), true).await?;
                ctx.status = 302;
                return Ok(true);
            }
            let body = if token.is_some() {
                r#"{"error":"Invalid or expired session"}"#
            } else {
                r#"{"error":"Authentication required"}"#
            };
            return self.json(session, ctx, 401, body).await;
        };
        // User ids are compared exactly: no case folding, no decoding beyond normalisation.
        if *user != *owner {
            return self.json(session, ctx, 403, r#"{"error":"Forbidden"}"#).await;
        }
        // Identity routes are limited per user, so users behind one address do not share a budget.
        if self.rate_limited(session, ctx, route, &user).await? {
            return Ok(true);
        }
        let table = ctx.table.clone().expect("table loaded");
        let settings = &table.settings;
        let user_prefix_len = prefix.len() + owner.len();
        let (addr, label, path, user_header) = match &route.action {
            Action::UserService(p) => {
                let path = match &p.strip_prefix {
                    Some(pre) => strip_path(&ctx.path, pre),
                    None => ctx.path.clone(),
                };
                (p.upstream.addr, p.upstream.label.clone(), path, Some(user.clone()))
            }
            action => {
                let mut routes = table.user(&owner).cloned();
                if routes.as_ref().is_none_or(|r| !r.running) && !upgrade {
                    // A plain request may start the workspace; a websocket never does.
                    if let Some(starter) = &self.starter {
                        // The starter hands back the entry the state owner published, so the
                        // request never loads a second snapshot (one snapshot per request).
                        match starter.ensure_running(&owner).await {
                            Ok(Some(started)) => routes = Some(started),
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!(user = %owner, "workspace start failed: {e}");
                                let body = serde_json::json!({ "error": format!("Workspace unavailable: {}", e.0) });
                                return self.json(session, ctx, 503, body.to_string()).await;
                            }
                        }
                    }
                }
                let Some(routes) = routes.filter(|r| r.running) else {
                    return self.json(session, ctx, 503, r#"{"error":"Workspace not running; retry shortly"}"#).await;
                };
                routes.activity.touch();
                if upgrade {
                    ctx.activity = Some(routes.activity.clone());
                }
                let rest = &ctx.path[user_prefix_len.min(ctx.path.len())..];
                let path = if rest.is_empty() { "/".to_string() } else { rest.to_string() };
                match action {
                    Action::Runtime => (routes.runtime, self.runtime_label.clone(), path, None),
                    _ => (routes.editor, self.editor_label.clone(), path, None),
                }
            }
        };
        ctx.forward = Some(Forward { addr, path, drop_token: true, user_header, label });
        set_client_timeouts(session, settings);
        self.proxy(session, ctx, upgrade).await
    }

    /// Sends the request to `ctx.forward`: upgrades through [`tunnel::relay`], requests without a
    /// body through [`upstream::forward`], the rest (`Ok(false)`) through Pingora's proxy loop.
    async fn proxy(&self, session: &mut Session, ctx: &mut Ctx, upgrade: bool) -> Result<bool> {
        if upgrade {
            return self.relay_upgrade(session, ctx).await;
        }
        if !session.is_body_empty() {
            return Ok(false);
        }
        let Some(f) = &ctx.forward else {
            return Error::e_explain(ErrorType::InternalError, "proxy without a forward target");
        };
        // Written straight from the client's head: no copy of it (see `UpstreamHead`).
        let wire = upstream_head(session.req_header(), &ClientConn::of(session), f, ctx.trusted_peer)?
            .to_wire(session.req_header())
            .ok_or_else(|| Error::explain(ErrorType::InvalidHTTPHeader, "the request cannot be written upstream"))?;
        let settings = &ctx.table.as_ref().expect("table loaded").settings;
        let target = upstream::Target {
            addr: f.addr,
            connect_timeout: settings.upstream_connect_timeout,
            idle_timeout: settings.upstream_idle_timeout,
        };
        let hsts = ctx.hsts.as_deref();
        upstream::forward(session, &wire, &target, |resp| response_head(resp, hsts)).await?;
        Ok(true)
    }

    /// A websocket (or other upgrade): relayed by [`tunnel::relay`], not by Pingora's loop.
    async fn relay_upgrade(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let Some(f) = &ctx.forward else {
            return Error::e_explain(ErrorType::InternalError, "upgrade without a forward target");
        };
        let mut req = session.req_header().clone();
        upstream_head(&req, &ClientConn::of(session), f, ctx.trusted_peer)?.apply(&mut req)?;
        let settings = &ctx.table.as_ref().expect("table loaded").settings;
        let (connect, idle, addr) = (settings.upstream_connect_timeout, settings.websocket_idle_timeout, f.addr);
        let (route, activity) = (ctx.route.clone(), ctx.activity.clone());
        let on_upgrade = move || OpenTunnel::open(route, activity);
        let outcome = tunnel::relay(session, &req, addr, connect, idle, self.drain.clone(), on_upgrade).await?;
        // The tunnel's task counts itself (gauge and activity) for as long as it runs.
        ctx.status = outcome.status;
        Ok(true)
    }

    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        status: u16,
        reason: &str,
        body: &'static str,
    ) -> Result<bool> {
        self.metrics.bad_request(reason);
        // A refused request leaves the connection in an unknown state: do not reuse it.
        session.set_keepalive(None);
        respond_text(session, status, body).await?;
        ctx.status = status;
        Ok(true)
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    /// No downstream modules: Pingora adds a disabled compression module by default, which
    /// still costs every request its context and filter calls; markco does not compress.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            table: None,
            route: None,
            path: String::new(),
            status: 0,
            upgraded: false,
            trusted_peer: false,
            hsts: None,
            forward: None,
            activity: None,
            client: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let answered = self.filter_request(session, ctx).await;
        if matches!(answered, Ok(true)) {
            // Answered here: no body will be read, so an HTTP/2 stream's idle watch stops.
            crate::app::request_body_progress(true);
        }
        answered
    }

    /// Reports progress to the HTTP/2 stream's idle watch ([`crate::app::request_body_progress`]).
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        end_of_stream: bool,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        crate::app::request_body_progress(end_of_stream);
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        match &ctx.forward {
            Some(f) => Ok(Box::new(ctx.table.as_ref().expect("table loaded").settings.peer(f.addr))),
            // request_filter answers every non-proxied action itself.
            None => Error::e_explain(ErrorType::InternalError, "upstream_peer without a forward target"),
        }
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(f) = &ctx.forward else {
            return Ok(());
        };
        // The body is read from here on: an HTTP/2 stream's idle watch starts now, not while
        // the workspace started or the upstream was connected.
        crate::app::request_body_progress(false);
        upstream_head(upstream, &ClientConn::of(session), f, ctx.trusted_peer)?.apply(upstream)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        response_head(upstream_response, ctx.hsts.as_deref())?;
        crate::upstream::frame_for_client(session, upstream_response)?;
        if upstream_response.status == 101 && !ctx.upgraded {
            ctx.upgraded = true;
            if let Some(r) = &ctx.route {
                r.metrics.websockets.inc();
            }
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            _ => match e.esource() {
                ErrorSource::Upstream => {
                    if let Some(f) = &ctx.forward {
                        self.metrics.upstream_error(&f.label, classify(e));
                    }
                    if matches!(e.etype(), ErrorType::ConnectTimedout | ErrorType::ReadTimedout) {
                        504
                    } else {
                        502
                    }
                }
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    ErrorType::ReadTimedout => 408,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if code > 0 && session.response_written().is_none() {
            let body = match code {
                502 => "502 bad gateway: the upstream is unavailable\n",
                504 => "504 gateway timeout: the upstream did not answer in time\n",
                408 => "408 request timeout\n",
                400 => "400 bad request\n",
                _ => "the request could not be completed\n",
            };
            if respond_text(session, code, body).await.is_err() {
                tracing::debug!("client went away before the error response");
            }
        }
        ctx.status = code;
        FailToProxy { error_code: code, can_reuse_downstream: false }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map(|r| r.status.as_u16()).unwrap_or(ctx.status);
        let req = session.req_header();
        let metrics = ctx.route.as_ref().map(|r| &r.metrics).unwrap_or(&self.unrouted);
        let elapsed = ctx.start.elapsed();
        metrics.count(&req.method, status);
        metrics.duration.observe(elapsed.as_secs_f64());
        if ctx.upgraded {
            metrics.websockets.dec();
        }
        let access_log = ctx.table.as_ref().map(|t| t.settings.access_log).unwrap_or(true);
        if access_log {
            let upstream = ctx.forward.as_ref().map(|f| &*f.label).unwrap_or("-");
            let host = req.headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("-");
            tracing::info!(
                target: "markco::access",
                method = %req.method,
                host,
                uri = %redacted_uri(req),
                status,
                bytes = session.body_bytes_sent(),
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                route = ctx.route.as_ref().map(|r| &*r.name).unwrap_or("-"),
                upstream,
                client = %ctx.client.map(|i| i.to_string()).unwrap_or_default(),
                error = e.map(|e| e.etype().as_str()).unwrap_or(""),
                "request"
            );
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, error: &Error) -> bool {
        // Clients that hang up are routine at the edge; the access log has them.
        matches!(error.esource(), ErrorSource::Downstream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plausible_acme_tokens_are_looked_up() {
        assert!(plausible_acme_token("LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"));
        assert!(!plausible_acme_token("short"));
        assert!(!plausible_acme_token(&"a".repeat(300)));
        assert!(!plausible_acme_token("../../etc/passwd-aaaaaaaaaaaa"));
        assert!(!plausible_acme_token("token.with.dots.aaaaaaaa"));
    }

    #[test]
    fn token_is_redacted() {
        let r = RequestHeader::build("GET", b"/u/x/?a=1&token=secret&TOKEN=s2", None).expect("req");
        assert_eq!(redacted_uri(&r), "/u/x/?a=1&token=REDACTED&TOKEN=REDACTED");
    }

    #[test]
    fn header_size_limit() {
        let mut r = RequestHeader::build("GET", b"/", None).expect("req");
        r.insert_header("X-Big", "a".repeat(2000)).expect("hdr");
        assert!(header_too_large(&r, 1000));
        assert!(!header_too_large(&r, 4000));
    }

    fn forward(path: &str, identity: bool) -> Forward {
        Forward {
            addr: "127.0.0.1:9".parse().expect("addr"),
            path: path.to_string(),
            drop_token: identity,
            user_header: identity.then(|| Arc::from("alice")),
            label: Arc::from("test"),
        }
    }

    /// The upstream's head as our loop writes it.
    fn wire(req: &RequestHeader, client: &ClientConn, f: &Forward) -> String {
        let head = upstream_head(req, client, f, false).expect("a head");
        String::from_utf8(head.to_wire(req).expect("writable").to_vec()).expect("ASCII")
    }

    const PLAIN: ClientConn = ClientConn { peer: None, tls: false, upgrade: false, h2: false };

    #[test]
    fn an_http2_request_gets_one_host_without_userinfo_and_one_cookie_line() {
        // As Pingora's HTTP/2 session makes it: the URI with its authority, no spellings. (Pingora
        // itself refuses a `user@` authority before the gateway sees it; this checks that our
        // own rule holds as well.)
        let mut r = RequestHeader::build_no_case("GET", b"/a?q=1", None).expect("req");
        r.set_uri(http::Uri::from_static("https://u:pw@site.test/a?q=1"));
        r.set_version(http::Version::HTTP_2);
        r.append_header("cookie", "a=1").expect("hdr");
        r.append_header("cookie", "b=2").expect("hdr");
        let client = ClientConn { h2: true, tls: true, ..PLAIN };
        let text = wire(&r, &client, &forward("/a", false));
        assert!(text.starts_with("GET /a?q=1 HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("\r\nHost: site.test\r\n") && text.matches("\r\nHost:").count() == 1, "{text}");
        assert!(text.contains("\r\nX-Forwarded-Host: site.test\r\n"), "{text}");
        assert!(text.contains("\r\nCookie: a=1; b=2\r\n") && text.matches("ookie:").count() == 1, "{text}");
        assert!(!text.contains("pw"), "{text}");
    }

    #[test]
    fn an_identity_route_drops_the_token_and_says_who_the_user_is() {
        let mut r = RequestHeader::build("GET", b"/u/alice/x?a=1&token=secret", None).expect("req");
        r.append_header("Host", "site.test").expect("hdr");
        r.append_header("X-User-Id", "mallory").expect("hdr");
        let text = wire(&r, &PLAIN, &forward("/x", true));
        assert!(text.starts_with("GET /x?a=1 HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("\r\nX-User-Id: alice\r\n"), "{text}");
        assert!(!text.contains("mallory") && !text.contains("secret"), "{text}");
        // The editor and runtime actions send no X-User-Id, and still none of the client's.
        let editor = Forward { user_header: None, ..forward("/x", true) };
        let text = wire(&r, &PLAIN, &editor);
        assert!(!text.to_ascii_lowercase().contains("x-user-id"), "{text}");
    }

    #[test]
    fn an_unchanged_target_goes_as_the_client_wrote_it() {
        for (raw, path) in [("/x?q", "/x"), ("/x?", "/x"), ("/a%2Fb", "/a%2Fb")] {
            let mut r = RequestHeader::build("GET", raw.as_bytes(), None).expect("req");
            r.append_header("Host", "site.test").expect("hdr");
            let text = wire(&r, &PLAIN, &forward(path, false));
            assert!(text.starts_with(&format!("GET {raw} HTTP/1.1\r\n")), "{raw}: {text}");
        }
        // A path the route rewrote (a stripped prefix) keeps the query.
        let mut r = RequestHeader::build("GET", b"/api/x?q=1", None).expect("req");
        r.append_header("Host", "site.test").expect("hdr");
        assert!(wire(&r, &PLAIN, &forward("/x", false)).starts_with("GET /x?q=1 HTTP/1.1\r\n"));
    }
}
