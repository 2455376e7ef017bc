//! Forwarded headers and hop-by-hop headers: what the upstream may believe about the client.

use std::cell::RefCell;
use std::net::IpAddr;

use bytes::{BufMut, BytesMut};
use http::header::{HeaderName, HeaderValue, CONNECTION, UPGRADE};
use ipnet::IpNet;
use pingora::http::{HeaderNameVariant, RequestHeader, ResponseHeader};
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

/// The request head an upstream gets, as changes to the client's head: decided once per request
/// (the gateway's route rules, then [`UpstreamHead::forwarding`] for the forwarded and hop-by-hop
/// headers), then either applied to a head ([`UpstreamHead::apply`]: Pingora's proxy loop and
/// tunnels) or written out together with the client's head ([`UpstreamHead::to_wire`]: our
/// upstream loop). The second copies neither the head nor its header maps: cloning the head,
/// removing and inserting into both of Pingora's maps and serialising the result took about
/// 12 % of markco's user time a request (benches/README.md).
#[derive(Debug, Default)]
pub struct UpstreamHead {
    /// The request target (path and query) when it is not the client's.
    target: Option<String>,
    /// Header names of the client's not sent (only names present are listed).
    drop: Vec<HeaderName>,
    /// Ours, each replacing every field the client sent under its name; sent after the client's.
    set: Vec<(&'static str, HeaderValue)>,
}

impl UpstreamHead {
    /// Sends `target` instead of the client's request target.
    pub fn target(&mut self, target: String) {
        self.target = Some(target);
    }

    /// Does not send the client's `name` fields (lowercase), if it sent any.
    pub fn drop(&mut self, req: &RequestHeader, name: &'static str) {
        if req.headers.contains_key(name) {
            self.drop.push(HeaderName::from_static(name));
        }
    }

    /// Sends `name: value` in place of any field of that name the client sent.
    pub fn set(&mut self, name: &'static str, value: HeaderValue) {
        self.set.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.set.push((name, value));
    }

    /// What the upstream may believe about the client: hop-by-hop headers out (and what a
    /// `Connection` line names), the client's forwarded claims out unless `trusted`, our
    /// `X-Forwarded-*` in. `host` is the request's host (its `Host`, or the HTTP/2 authority).
    pub fn forwarding(
        &mut self,
        req: &RequestHeader,
        host: Option<HeaderValue>,
        peer: Option<IpAddr>,
        trusted: bool,
        tls: bool,
        upgrade: bool,
    ) {
        self.drop.extend(present(&req.headers, |n| {
            HOP_BY_HOP.contains(&n)
                || (!upgrade && (n == UPGRADE.as_str() || n == CONNECTION.as_str()))
                || (!trusted && FORWARDED.contains(&n))
        }));
        // A trusted proxy's claims are kept, and we only append the hop we saw; an untrusted
        // client's went with the hop-by-hop headers above.
        let claimed = |name: &str| trusted && req.headers.contains_key(name);
        let peer_ip = ip_value(peer);
        let prev = req.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()).filter(|p| !p.trim().is_empty());
        let xff = match prev {
            Some(prev) if trusted => {
                HeaderValue::try_from(format!("{prev}, {}", peer_ip.to_str().unwrap_or_default())).unwrap_or(peer_ip)
            }
            _ => peer_ip,
        };
        self.set("X-Forwarded-For", xff);
        if !claimed("x-forwarded-proto") {
            self.set("X-Forwarded-Proto", HeaderValue::from_static(if tls { "https" } else { "http" }));
        }
        if let (false, Some(h)) = (claimed("x-forwarded-host"), host) {
            self.set("X-Forwarded-Host", h);
        }
    }

    /// Whether a client's field named `name` (any case) is not sent as it came.
    fn replaces(&self, name: &[u8]) -> bool {
        self.drop.iter().any(|d| d.as_str().as_bytes().eq_ignore_ascii_case(name))
            || self.set.iter().any(|(n, _)| n.as_bytes().eq_ignore_ascii_case(name))
    }

    /// Makes `req` the head the upstream gets (for Pingora's proxy loop and tunnels, which
    /// write the head themselves).
    pub fn apply(self, req: &mut RequestHeader) -> Result<()> {
        if let Some(target) = self.target {
            let uri = http::Uri::builder()
                .path_and_query(target)
                .build()
                .or_err(ErrorType::InvalidHTTPHeader, "rebuilding the upstream URI")?;
            req.set_uri(uri);
        }
        for name in &self.drop {
            req.remove_header(name);
        }
        for (name, value) in self.set {
            req.insert_header(name, value)?;
        }
        Ok(())
    }

    /// The HTTP/1.1 request head the upstream gets, written from the client's `req` with these
    /// changes: the request line and fields that [`UpstreamHead::apply`] and Pingora's
    /// serialiser give, each client field in its own spelling (or Pingora's for a head without
    /// spellings, an HTTP/2 one), except that our fields come last and keep ours (Pingora
    /// writes them in lowercase in a head without spellings, but for the few names it knows in
    /// title case such as `Host`; names are case-insensitive, RFC 9110 5.1).
    /// `None` for a target no HTTP/1 request line can carry.
    pub fn to_wire(&self, req: &RequestHeader) -> Option<BytesMut> {
        let target = self.target.as_deref().map(str::as_bytes).unwrap_or_else(|| req.raw_path());
        // RFC 9112 3.2: no whitespace or control line breaks in a request line (Pingora checks
        // the same when it writes one).
        if target.is_empty() || target.iter().any(|&b| matches!(b, 0x00 | b'\n' | b'\r' | b' ')) {
            return None;
        }
        let mut buf = BytesMut::with_capacity(256 + req.headers.len() * 32);
        buf.put_slice(req.method.as_str().as_bytes());
        buf.put_u8(b' ');
        buf.put_slice(target);
        buf.put_slice(b" HTTP/1.1\r\n");
        let mut line = |name: &[u8], value: &HeaderValue| {
            buf.put_slice(name);
            buf.put_slice(b": ");
            buf.put_slice(value.as_bytes());
            buf.put_slice(b"\r\n");
        };
        // Pingora's own walk over its two maps (the client's spelling, or its title case).
        let _ = req.map(|name, value| {
            let name = match name {
                HeaderNameVariant::Case(c) => c.as_slice(),
                HeaderNameVariant::Titled(t) => t.as_bytes(),
            };
            if !self.replaces(name) {
                line(name, value);
            }
            Ok(())
        });
        for (name, value) in &self.set {
            line(name.as_bytes(), value);
        }
        buf.put_slice(b"\r\n");
        Some(buf)
    }
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

    /// The request line and header lines of a head on the wire, header lines sorted and their
    /// names lowercased (our fields may be spelled otherwise than Pingora's, and come last).
    fn lines(wire: &[u8]) -> (String, Vec<String>) {
        let text = std::str::from_utf8(wire).expect("ASCII head");
        let body = text.strip_suffix("\r\n\r\n").expect("a head ends with a blank line");
        let mut lines = body.split("\r\n");
        let first = lines.next().expect("a request line").to_string();
        let mut fields: Vec<String> = lines
            .map(|l| match l.split_once(':') {
                Some((name, value)) => format!("{}:{value}", name.to_ascii_lowercase()),
                None => l.to_string(),
            })
            .collect();
        fields.sort();
        (first, fields)
    }

    /// Applies `head` to `r` (Pingora's loop), and checks that our loop's bytes carry the same
    /// request line and fields (only their order may differ) as Pingora's serialiser gives for
    /// the applied head.
    fn apply_both(r: &mut RequestHeader, head: UpstreamHead) {
        let ours = head.to_wire(r).expect("a writable head");
        head.apply(r).expect("applies");
        r.set_version(http::Version::HTTP_11);
        let pingoras = pingora::protocols::http::v1::client::http_req_header_to_wire(r).expect("writable");
        assert_eq!(lines(&ours), lines(&pingoras), "our bytes and the applied head differ");
    }

    fn prepare_upstream_request(r: &mut RequestHeader, peer: Option<IpAddr>, trusted: bool, tls: bool, upgrade: bool) {
        let mut head = UpstreamHead::default();
        let host = r.headers.get(http::header::HOST).cloned();
        head.forwarding(r, host, peer, trusted, tls, upgrade);
        apply_both(r, head);
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
        prepare_upstream_request(&mut r, Some(ip), false, false, false);
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
        prepare_upstream_request(&mut r, Some(ip), true, false, false);
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
        prepare_upstream_request(&mut r, None, false, false, false);
        for h in ["connection", "x-secret", "keep-alive", "te", "proxy-authorization", "upgrade"] {
            assert!(get(&r, h).is_none(), "{h} must not be forwarded");
        }
    }

    #[test]
    fn websocket_upgrade_kept() {
        let mut r = req(&[("Host", "a"), ("Connection", "Upgrade"), ("Upgrade", "websocket")]);
        prepare_upstream_request(&mut r, None, false, false, true);
        assert_eq!(get(&r, "upgrade"), Some("websocket"));
        assert_eq!(get(&r, "connection"), Some("Upgrade"));
    }

    #[test]
    fn the_wire_keeps_the_clients_spelling_and_drops_what_is_replaced() {
        let mut r = req(&[
            ("hOsT", "a.example"),
            ("Connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("Accept", "*/*"),
            ("accept", "text/html"),
            ("X-User-Id", "mallory"),
        ]);
        let mut head = UpstreamHead::default();
        head.target("/rest?q=1".to_string());
        head.drop(&r, "x-user-id");
        head.drop(&r, "x-absent");
        head.forwarding(&r, Some(HeaderValue::from_static("a.example")), None, false, true, false);
        head.set("X-User-Id", HeaderValue::from_static("alice"));
        let wire = head.to_wire(&r).expect("writable");
        let text = std::str::from_utf8(&wire).expect("ASCII");
        assert!(text.starts_with("GET /rest?q=1 HTTP/1.1\r\nhOsT: a.example\r\n"), "{text}");
        // Both of the client's Accept lines, in their order and spelling.
        assert!(text.contains("Accept: */*\r\naccept: text/html\r\n"), "{text}");
        for gone in ["Connection", "x-secret", "6.6.6.6", "mallory"] {
            assert!(!text.contains(gone), "{gone} went upstream: {text}");
        }
        assert!(
            text.ends_with("X-Forwarded-Proto: https\r\nX-Forwarded-Host: a.example\r\nX-User-Id: alice\r\n\r\n"),
            "{text}"
        );
        apply_both(&mut r, head);
        assert_eq!(r.uri.path_and_query().map(|p| p.as_str()), Some("/rest?q=1"));
    }

    #[test]
    fn a_head_without_spellings_is_written_in_pingoras_title_case() {
        // An HTTP/2 request's head has no case map.
        let mut r = RequestHeader::build_no_case("GET", b"/", None).expect("valid request");
        r.append_header("cache-control", "no-cache").expect("valid");
        r.append_header("x-custom", "1").expect("valid");
        let mut head = UpstreamHead::default();
        head.set("Host", HeaderValue::from_static("a.example"));
        head.forwarding(&r, Some(HeaderValue::from_static("a.example")), None, false, true, false);
        let wire = head.to_wire(&r).expect("writable");
        let text = std::str::from_utf8(&wire).expect("ASCII");
        assert!(text.contains("Cache-Control: no-cache\r\n") && text.contains("x-custom: 1\r\n"), "{text}");
        apply_both(&mut r, head);
    }

    #[test]
    fn a_target_no_request_line_can_carry_is_refused() {
        let r = req(&[("Host", "a")]);
        for bad in ["/a b", "/a\r\nX: y", ""] {
            let mut head = UpstreamHead::default();
            head.target(bad.to_string());
            assert!(head.to_wire(&r).is_none(), "{bad:?} was written");
        }
    }
}
