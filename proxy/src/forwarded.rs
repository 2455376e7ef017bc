//! Forwarded headers and hop-by-hop headers: what the upstream may believe about the client.

use std::cell::RefCell;
use std::net::IpAddr;

use http::header::{HeaderName, HeaderValue, CONNECTION, UPGRADE};
use ipnet::IpNet;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;

/// Headers that describe one connection and must not be forwarded (RFC 9110 7.6.1). Framing
/// (`Transfer-Encoding`, `Content-Length`) is left to Pingora, which re-frames bodies itself.
const HOP_BY_HOP: [&str; 5] = ["keep-alive", "proxy-connection", "te", "trailer", "proxy-authorization"];

/// Headers a `Connection` line cannot remove: the host and what we say about the client.
const PROTECTED: [&str; 8] = [
    "host",
    "x-user-id",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    // The message's framing: never dropped as hop-by-hop, or the body would be misread.
    "transfer-encoding",
    "content-length",
];

const FORWARDED: [&str; 5] = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip"];

pub fn is_trusted(peer: Option<IpAddr>, trusted: &[IpNet]) -> bool {
    match peer {
        Some(ip) => trusted.iter().any(|n| n.contains(&ip)),
        None => false,
    }
}

/// The names in `headers` that `drop` picks or that a `Connection` line lists: one pass over the
/// names present, so that a message carrying none of them (the usual case) costs no lookups,
/// where removing each listed name would hash it twice (Pingora keeps a second,
/// case-preserving map).
fn present(headers: &http::HeaderMap, drop: impl Fn(&str) -> bool) -> Vec<HeaderName> {
    let tokens = connection_tokens(headers);
    headers.keys().filter(|n| drop(n.as_str()) || tokens.contains(n)).cloned().collect()
}

/// Names listed in `Connection` (besides `close`, `keep-alive`, `upgrade`), which are hop-by-hop too.
fn connection_tokens(headers: &http::HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        // Compared without a lowercased copy: nearly every `Connection` line is one of these.
        .filter(|t| !t.is_empty() && !["close", "upgrade", "keep-alive"].iter().any(|k| t.eq_ignore_ascii_case(k)))
        // A client may not name away what the upstream relies on (Pingora refuses these too).
        .filter(|t| !PROTECTED.iter().any(|p| t.eq_ignore_ascii_case(p)))
        // (`HeaderName` lowercases.)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect()
}

/// The client's address as a header value. Formatting an address costs more than the rest of
/// the forwarded headers, and a kept-alive connection sends many requests from one address: a
/// thread remembers the last one.
fn ip_value(peer: Option<IpAddr>) -> HeaderValue {
    thread_local! {
        static LAST: RefCell<Option<(IpAddr, HeaderValue)>> = const { RefCell::new(None) };
    }
    let Some(ip) = peer else { return HeaderValue::from_static("") };
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((seen, v)) = &*last {
            if *seen == ip {
                return v.clone();
            }
        }
        // An address prints as ASCII digits, dots, colons and hex: always a valid value.
        let v = HeaderValue::try_from(ip.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""));
        *last = Some((ip, v.clone()));
        v
    })
}

/// Rewrites the request going upstream: hop-by-hop headers out, X-Forwarded-* ours.
pub fn prepare_upstream_request(
    req: &mut RequestHeader,
    peer: Option<IpAddr>,
    trusted: bool,
    tls: bool,
    upgrade: bool,
) -> Result<()> {
    let doomed = present(&req.headers, |n| {
        HOP_BY_HOP.contains(&n)
            || (!upgrade && (n == UPGRADE.as_str() || n == CONNECTION.as_str()))
            || (!trusted && FORWARDED.contains(&n))
    });
    for name in &doomed {
        req.remove_header(name);
    }
    // A clone of the value (shared bytes), not a copy.
    let host = match req.headers.get(http::header::HOST).filter(|v| v.to_str().is_ok()) {
        Some(v) => Some(v.clone()),
        None => req.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    let peer_ip = ip_value(peer);
    if trusted {
        // A trusted proxy's claims are kept; we only append the hop we saw.
        match req.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) if !prev.trim().is_empty() => {
                let xff = format!("{prev}, {}", peer_ip.to_str().unwrap_or_default());
                req.insert_header("X-Forwarded-For", xff)?;
            }
            _ => req.insert_header("X-Forwarded-For", peer_ip)?,
        }
        if !req.headers.contains_key("x-forwarded-proto") {
            req.insert_header("X-Forwarded-Proto", if tls { "https" } else { "http" })?;
        }
        if !req.headers.contains_key("x-forwarded-host") {
            if let Some(h) = host {
                req.insert_header("X-Forwarded-Host", h)?;
            }
        }
    } else {
        // The client's own forwarded claims went with the hop-by-hop headers above.
        req.insert_header("X-Forwarded-For", peer_ip)?;
        req.insert_header("X-Forwarded-Proto", if tls { "https" } else { "http" })?;
        if let Some(h) = host {
            req.insert_header("X-Forwarded-Host", h)?;
        }
    }
    Ok(())
}

/// Drops hop-by-hop headers from an upstream response (keeping an upgrade's own headers).
pub fn clean_response(resp: &mut ResponseHeader) {
    let upgrade = resp.status == 101;
    let doomed = present(&resp.headers, |n| {
        matches!(n, "keep-alive" | "proxy-connection" | "trailer") || (!upgrade && n == UPGRADE.as_str())
    });
    for name in &doomed {
        resp.remove_header(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/x", None).expect("valid request");
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).expect("valid header");
        }
        r
    }

    fn get<'a>(r: &'a RequestHeader, k: &str) -> Option<&'a str> {
        r.headers.get(k).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn untrusted_peer_cannot_spoof() {
        let mut r = req(&[
            ("Host", "markco.dev"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
            ("Forwarded", "for=6.6.6.6"),
        ]);
        let ip: IpAddr = "203.0.113.9".parse().expect("ip");
        prepare_upstream_request(&mut r, Some(ip), false, false, false).expect("ok");
        assert_eq!(get(&r, "x-forwarded-for"), Some("203.0.113.9"));
        assert_eq!(get(&r, "x-forwarded-proto"), Some("http"));
        assert_eq!(get(&r, "x-forwarded-host"), Some("markco.dev"));
        assert_eq!(get(&r, "forwarded"), None);
    }

    #[test]
    fn trusted_peer_is_appended() {
        let mut r = req(&[("Host", "markco.dev"), ("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-Proto", "https")]);
        let ip: IpAddr = "10.0.0.2".parse().expect("ip");
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        assert!(is_trusted(Some(ip), &trusted));
        prepare_upstream_request(&mut r, Some(ip), true, false, false).expect("ok");
        assert_eq!(get(&r, "x-forwarded-for"), Some("198.51.100.1, 10.0.0.2"));
        assert_eq!(get(&r, "x-forwarded-proto"), Some("https"));
    }

    #[test]
    fn hop_by_hop_removed() {
        let mut r = req(&[
            ("Host", "a"),
            ("Connection", "keep-alive, X-Secret"),
            ("X-Secret", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Authorization", "Basic x"),
            ("Upgrade", "h2c"),
        ]);
        prepare_upstream_request(&mut r, None, false, false, false).expect("ok");
        for h in ["connection", "x-secret", "keep-alive", "te", "proxy-authorization", "upgrade"] {
            assert!(get(&r, h).is_none(), "{h} must not be forwarded");
        }
    }

    #[test]
    fn websocket_upgrade_kept() {
        let mut r = req(&[("Host", "a"), ("Connection", "Upgrade"), ("Upgrade", "websocket")]);
        prepare_upstream_request(&mut r, None, false, false, true).expect("ok");
        assert_eq!(get(&r, "upgrade"), Some("websocket"));
        assert_eq!(get(&r, "connection"), Some("Upgrade"));
    }
}
