//! Small pure helpers: query parsing, status parsing, websocket accept key.

use base64::Engine as _;
use http::HeaderMap;

/// The GUID appended to `Sec-WebSocket-Key` (RFC 6455, section 1.3).
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Computes `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn ws_accept_key(key: &[u8]) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key);
    sha.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes())
}

/// Looks up `name` in a `k=v&k2=v2` query string (first occurrence wins).
/// No percent-decoding: the test endpoints only take plain numbers.
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// Parses query parameter `name` as a `u64`, falling back to `default` when
/// it is absent or not a number, and clamping the result to `max`.
pub fn query_u64(query: Option<&str>, name: &str, default: u64, max: u64) -> u64 {
    query_param(query, name).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(default).min(max)
}

/// Parses the `NNN` of `/status/NNN`; `None` when it is not a final status
/// code (200..=599).
pub fn parse_status(s: &str) -> Option<u16> {
    if s.len() != 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let code: u16 = s.parse().ok()?;
    (200..=599).contains(&code).then_some(code)
}

/// Whether a comma-separated header (e.g. `Connection`) contains `token`,
/// case-insensitively, in any of its occurrences.
pub fn header_has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| v.to_str().map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))).unwrap_or(false))
}

/// The first subprotocol offered in `Sec-WebSocket-Protocol`, if any.
pub fn first_subprotocol(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .find(|t| !t.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{CONNECTION, SEC_WEBSOCKET_PROTOCOL};
    use http::HeaderValue;

    #[test]
    fn accept_key_rfc6455_example() {
        assert_eq!(ws_accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn query_lookup() {
        let q = Some("n=3&interval_ms=50&flag&empty=");
        assert_eq!(query_param(q, "n"), Some("3"));
        assert_eq!(query_param(q, "interval_ms"), Some("50"));
        assert_eq!(query_param(q, "flag"), Some(""));
        assert_eq!(query_param(q, "empty"), Some(""));
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(query_param(None, "n"), None);
        assert_eq!(query_param(Some(""), "n"), None);
        assert_eq!(query_param(Some("a=1&a=2"), "a"), Some("1"));
        assert_eq!(query_param(Some("a=b=c"), "a"), Some("b=c"));
    }

    #[test]
    fn query_numbers() {
        assert_eq!(query_u64(Some("n=7"), "n", 5, 100), 7);
        assert_eq!(query_u64(Some("n=abc"), "n", 5, 100), 5);
        assert_eq!(query_u64(Some("n=-1"), "n", 5, 100), 5);
        assert_eq!(query_u64(Some("n="), "n", 5, 100), 5);
        assert_eq!(query_u64(None, "n", 5, 100), 5);
        assert_eq!(query_u64(Some("n=1000"), "n", 5, 100), 100);
        assert_eq!(query_u64(Some("n=99999999999999999999999"), "n", 5, 100), 5);
    }

    #[test]
    fn status_codes() {
        assert_eq!(parse_status("200"), Some(200));
        assert_eq!(parse_status("503"), Some(503));
        assert_eq!(parse_status("599"), Some(599));
        assert_eq!(parse_status("204"), Some(204));
        assert_eq!(parse_status("101"), None);
        assert_eq!(parse_status("100"), None);
        assert_eq!(parse_status("600"), None);
        assert_eq!(parse_status("099"), None);
        assert_eq!(parse_status("abc"), None);
        assert_eq!(parse_status("+20"), None);
        assert_eq!(parse_status("2000"), None);
        assert_eq!(parse_status(""), None);
    }

    #[test]
    fn header_tokens() {
        let mut h = HeaderMap::new();
        h.append(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(header_has_token(&h, CONNECTION, "upgrade"));
        assert!(!header_has_token(&h, CONNECTION, "close"));
        h.append(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(" , chat, superchat"));
        h.append(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("other"));
        assert_eq!(first_subprotocol(&h).as_deref(), Some("chat"));
        assert_eq!(first_subprotocol(&HeaderMap::new()), None);
    }
}
