//! Session-token extraction (cookie, then `Authorization: Bearer`, then `?token=`) on arbitrary
//! header values and queries: never a panic, a token only from one of those places, in that
//! order, and a query rewritten for the upstream never carries a `token` parameter.
#![no_main]

use libfuzzer_sys::fuzz_target;
use markco_proxy::identity::{query_without_token, session_token};
use pingora_http::RequestHeader;

fuzz_target!(|data: &[u8]| {
    // Three parts, separated by 0xff (never in a valid header value or URI).
    let mut parts = data.split(|&b| b == 0xff);
    let (cookie, auth, query) = (parts.next().unwrap_or_default(), parts.next(), parts.next());
    let Ok(query) = std::str::from_utf8(query.unwrap_or_default()) else { return };
    let uri = if query.is_empty() { "/u/x/".to_string() } else { format!("/u/x/?{query}") };
    let Ok(mut req) = RequestHeader::build("GET", uri.as_bytes(), None) else { return };
    let has_cookie = !cookie.is_empty() && req.insert_header("cookie", cookie).is_ok();
    let has_auth = auth.is_some_and(|a| req.insert_header("authorization", a).is_ok());

    let token = session_token(&req);
    // The cookie's own answer, computed independently.
    // Each cookie pair on its own: one pair's bytes never hide another's.
    let from_cookie = has_cookie
        .then(|| {
            cookie.split(|&b| b == b';').find_map(|p| {
                let t = std::str::from_utf8(p).ok()?.trim().strip_prefix("session_token=")?.trim().trim_matches('"');
                (!t.is_empty()).then(|| t.to_string())
            })
        })
        .flatten();
    match (&token, &from_cookie) {
        (_, Some(c)) => assert_eq!(token.as_deref(), Some(c.as_str()), "the cookie comes first"),
        (Some(t), None) => {
            assert!(!t.is_empty());
            let from_auth = has_auth
                && auth.and_then(|a| std::str::from_utf8(a).ok()).is_some_and(|a| {
                    a.strip_prefix("Bearer ").or_else(|| a.strip_prefix("bearer ")).is_some_and(|v| v.trim() == t)
                });
            let from_query = req.uri.query().is_some_and(|q| q.split('&').any(|kv| kv.starts_with("token=")));
            assert!(from_auth || from_query, "token {t:?} from nowhere");
        }
        (None, None) => {}
    }
    let rewritten = query_without_token(req.uri.query());
    if let Some(q) = rewritten {
        assert!(q.split('&').all(|kv| kv.split('=').next() != Some("token")), "token kept in {q:?}");
    }
});
