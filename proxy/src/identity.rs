//! Who is asking: the session token of a request, and the interfaces through which the data
//! plane asks the control plane (session lookups, the control API). The proxy never talks to a
//! database itself.

// Bytes from the network: no arithmetic that can overflow, no indexing that can panic.
#![deny(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::RequestHeader;

#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error("identity service unavailable: {0}")]
    Unavailable(String),
}

/// Maps a session token to its user.
#[async_trait]
pub trait Identity: Send + Sync {
    /// `Ok(Some(user))`: a valid session; `Ok(None)`: unknown or expired.
    async fn user_of(&self, token: &str) -> Result<Option<Arc<str>>, IdentityError>;
}

/// Used when no control plane runs: every lookup fails as unavailable.
pub struct NoIdentity;

#[async_trait]
impl Identity for NoIdentity {
    async fn user_of(&self, _token: &str) -> Result<Option<Arc<str>>, IdentityError> {
        Err(IdentityError::Unavailable("no control plane".into()))
    }
}

/// A response of the control API.
#[derive(Debug, Clone)]
pub struct ControlResponse {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Bytes,
}

/// The control API's public paths (`/health`, `/api/health`, `/api/services`).
#[async_trait]
pub trait ControlApi: Send + Sync {
    /// `authorization` is the request's `Authorization` header (the admin token unlocks more).
    async fn respond(&self, method: &http::Method, path: &str, authorization: Option<&str>) -> ControlResponse;
}

/// Why a lazy start failed (the container engine, the database...): its own error, so a failed
/// start is not reported as an identity problem.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

/// Starts a user's workspace on demand (lazy start). `Ok(Some(routes))` once it is running: the
/// user's entry in the table that was published for it, so the caller needs no second snapshot.
#[async_trait]
pub trait WorkspaceStarter: Send + Sync {
    async fn ensure_running(&self, user: &str) -> Result<Option<Arc<crate::table::UserRoutes>>, StartError>;
}

/// The session token: cookie `session_token`, then `Authorization: Bearer`, then `?token=`.
pub fn session_token(req: &RequestHeader) -> Option<String> {
    // Split as bytes: another cookie's non-ASCII value (browsers send UTF-8 as it is) must not
    // hide the session cookie, as `HeaderValue::to_str` on the whole header would.
    for v in req.headers.get_all(http::header::COOKIE).iter() {
        for pair in v.as_bytes().split(|&b| b == b';').filter_map(|p| std::str::from_utf8(p).ok()) {
            if let Some(t) = pair.trim().strip_prefix("session_token=") {
                let t = t.trim().trim_matches('"');
                if !t.is_empty() {
                    return Some(t.to_string());
                }
            }
        }
    }
    if let Some(t) = req
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
    {
        let t = t.trim();
        if !t.is_empty() {
            return Some(t.to_string());
        }
    }
    let q = req.uri.query()?;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        if k != "token" || v.is_empty() {
            return None;
        }
        Some(percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned())
    })
}

/// The query without its `token` parameters (they must not reach the upstream or its logs).
pub fn query_without_token(query: Option<&str>) -> Option<String> {
    let q = query?;
    let kept: Vec<&str> = q.split('&').filter(|kv| kv.split('=').next() != Some("token") && !kv.is_empty()).collect();
    if kept.is_empty() {
        None
    } else {
        Some(kept.join("&"))
    }
}

/// The owner in `/u/<owner>/rest` for a route prefix `/u/`: the segment right after it.
pub fn owner_segment<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(prefix)?;
    let owner = rest.split('/').next()?;
    // Compared exactly with the session's user, whose id is valid (`UserId`): any other
    // spelling names somebody else, and gets 403 like any other user's path.
    (!owner.is_empty()).then_some(owner)
}

/// Does the client want HTML (a browser navigation), so that a login redirect makes sense?
pub fn wants_html(req: &RequestHeader) -> bool {
    if req.headers.contains_key("x-requested-with") {
        return false;
    }
    match req.headers.get(http::header::ACCEPT).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(a) => a.contains("text/html") || a.contains("*/*"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", uri.as_bytes(), None).expect("request");
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).expect("header");
        }
        r
    }

    #[test]
    fn token_sources_in_order() {
        assert_eq!(session_token(&req("/", &[("Cookie", "a=1; session_token=c1")])).as_deref(), Some("c1"));
        assert_eq!(session_token(&req("/", &[("Authorization", "Bearer b1")])).as_deref(), Some("b1"));
        assert_eq!(session_token(&req("/?x=1&token=q%2B1", &[])).as_deref(), Some("q+1"));
        assert_eq!(
            session_token(&req("/?token=q", &[("Cookie", "session_token=c"), ("Authorization", "Bearer b")]))
                .as_deref(),
            Some("c")
        );
        assert_eq!(session_token(&req("/?token=q", &[("Authorization", "Bearer b")])).as_deref(), Some("b"));
        assert_eq!(session_token(&req("/?mytoken=q", &[("Cookie", "xsession_token=c")])), None);
        assert_eq!(session_token(&req("/", &[("Authorization", "Basic abc")])), None);
    }

    /// Found by the `session_token` fuzz target: a cookie header with a non-ASCII value in
    /// another cookie was skipped whole, so the user was sent to the login page.
    #[test]
    fn session_cookie_next_to_a_non_ascii_cookie() {
        let mut r = req("/", &[]);
        let value = http::HeaderValue::from_bytes("lang=fran\u{e7}ais; session_token=c1".as_bytes()).expect("header");
        r.insert_header("cookie", value).expect("header");
        assert_eq!(session_token(&r).as_deref(), Some("c1"));
    }

    #[test]
    fn token_removed_from_query() {
        assert_eq!(query_without_token(Some("token=a")), None);
        assert_eq!(query_without_token(Some("a=1&token=x&b=2")).as_deref(), Some("a=1&b=2"));
        assert_eq!(query_without_token(Some("tokens=1")).as_deref(), Some("tokens=1"));
        assert_eq!(query_without_token(None), None);
    }

    #[test]
    fn owners() {
        let alice = "3f2b9c1e-aaaa-4bbb-8ccc-0123456789ab";
        assert_eq!(owner_segment(&format!("/u/{alice}/x/y"), "/u/"), Some(alice));
        assert_eq!(owner_segment(&format!("/u/{alice}"), "/u/"), Some(alice));
        assert_eq!(owner_segment("/u/", "/u/"), None);
        assert_eq!(owner_segment("/u", "/u/"), None);
        assert_eq!(owner_segment(&format!("/tunnel/{alice}"), "/tunnel/"), Some(alice));
        assert_eq!(owner_segment("/u/al%2Fice/x", "/u/"), Some("al%2Fice"));
    }

    #[test]
    fn html_clients() {
        assert!(wants_html(&req("/", &[("Accept", "text/html,application/xhtml+xml")])));
        assert!(wants_html(&req("/", &[("Accept", "*/*")])));
        assert!(wants_html(&req("/", &[])));
        assert!(!wants_html(&req("/", &[("Accept", "application/json")])));
        assert!(!wants_html(&req("/", &[("Accept", "*/*"), ("X-Requested-With", "XMLHttpRequest")])));
    }
}
