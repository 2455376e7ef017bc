//! The request target as the client wrote it (RFC 9112 3.2), checked before anything routes on
//! it. Pingora parses a target that does not start with `/` into a URI whose path is `/`, so a
//! route chosen on `uri.path()` could differ from what a lenient upstream reads in the raw
//! target (`GET admin/secret HTTP/1.1`). Only the forms a gateway serves are let through, and the
//! upstream is always sent the normalised origin-form path the route was chosen on.

use std::fmt;

/// The accepted forms of a request target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetForm {
    /// `/path?query`
    Origin,
    /// `http://host/path?query` (the authority is checked against `Host` by Pingora).
    Absolute,
    /// `*`, for `OPTIONS` only: a question about the server, answered by us.
    Asterisk,
}

/// Why a target was refused (status 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetError {
    /// Neither `/...`, `http(s)://...` nor `*` (e.g. `admin/x`, ` /x`, `\x`, `%2Fx`, `?q`).
    NotOriginForm,
    /// `*` with a method other than `OPTIONS`.
    AsteriskNotOptions,
    /// An absolute-form target with a scheme other than http or https.
    BadScheme,
    /// Bytes that a request target may not hold (controls, spaces, non-ASCII).
    BadByte,
    /// An authority-form target (`CONNECT host:port`): this is not a forward proxy.
    Connect,
}

impl TargetError {
    /// A short label for metrics (`markco_http_bad_requests_total{reason}`).
    pub fn reason(self) -> &'static str {
        match self {
            TargetError::NotOriginForm => "target_form",
            TargetError::AsteriskNotOptions => "target_asterisk",
            TargetError::BadScheme => "target_scheme",
            TargetError::BadByte => "target_byte",
            TargetError::Connect => "connect",
        }
    }
}

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetError::NotOriginForm => "the request target must start with '/' (or be an absolute http(s) URL)",
            TargetError::AsteriskNotOptions => "the request target '*' is only allowed with OPTIONS",
            TargetError::BadScheme => "an absolute request target must use http or https",
            TargetError::BadByte => "the request target holds a byte that is not allowed",
            TargetError::Connect => "CONNECT is not supported: this is not a forward proxy",
        })
    }
}

impl std::error::Error for TargetError {}

/// Classifies the raw request target `raw` of a request with method `method`.
pub fn classify(method: &[u8], raw: &[u8]) -> Result<TargetForm, TargetError> {
    if method.eq_ignore_ascii_case(b"CONNECT") {
        return Err(TargetError::Connect);
    }
    // RFC 9112 3.2: a target is visible ASCII; anything else was let through leniently by the
    // parser and is refused here.
    if raw.iter().any(|&b| !(0x21..0x7f).contains(&b)) {
        return Err(TargetError::BadByte);
    }
    match raw.first() {
        Some(b'/') => Ok(TargetForm::Origin),
        Some(b'*') if raw.len() == 1 => {
            if method == b"OPTIONS" {
                Ok(TargetForm::Asterisk)
            } else {
                Err(TargetError::AsteriskNotOptions)
            }
        }
        _ => {
            // Absolute-form: scheme "://" authority [path]. The scheme is case-insensitive.
            let Some(colon) = raw.iter().position(|&b| b == b':') else {
                return Err(TargetError::NotOriginForm);
            };
            let (scheme, rest) = raw.split_at(colon);
            if !rest.starts_with(b"://") {
                return Err(TargetError::NotOriginForm);
            }
            if scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https") {
                Ok(TargetForm::Absolute)
            } else {
                Err(TargetError::BadScheme)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(classify(b"GET", b"/admin/x"), Ok(TargetForm::Origin));
        assert_eq!(classify(b"GET", b"/"), Ok(TargetForm::Origin));
        assert_eq!(classify(b"GET", b"http://a.test/x"), Ok(TargetForm::Absolute));
        assert_eq!(classify(b"GET", b"HTTPS://a.test"), Ok(TargetForm::Absolute));
        assert_eq!(classify(b"OPTIONS", b"*"), Ok(TargetForm::Asterisk));
    }

    /// Random targets, biased towards the bytes that matter: never a panic, and a target taken
    /// as origin-form always normalises to a path that starts with `/` and has no dot segment
    /// or empty segment. (The cargo-fuzz target in `fuzz/` does the same, coverage-guided.)
    #[test]
    fn random_targets_hold_the_invariants() {
        let alphabet = b"/./..%2e%2F%5C\\?#*:ahttp://x a\x00\x7f\xc3\xa9";
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..200_000 {
            let len = (next() % 24) as usize;
            let raw: Vec<u8> = (0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]).collect();
            let method: &[u8] = if next() % 4 == 0 { b"OPTIONS" } else { b"GET" };
            if let Ok(TargetForm::Origin) = classify(method, &raw) {
                let path = raw.split(|&b| b == b'?').next().unwrap_or_default();
                let path = std::str::from_utf8(path).expect("ASCII after classify");
                if let Ok(n) = crate::path::normalize(path) {
                    assert!(n.starts_with('/'), "{path:?} -> {n:?}");
                    assert!(!n.contains("//"), "{path:?} -> {n:?}");
                    assert!(n.split('/').all(|seg| seg != "." && seg != ".."), "{path:?} -> {n:?}");
                }
            }
        }
    }

    #[test]
    fn refused() {
        for t in [
            &b"admin/secret.txt"[..],
            b" /../admin/secret.txt",
            b"x/../admin/secret.txt",
            b"*admin/x",
            b"%2Fadmin/x",
            b"./admin/x",
            b"\\admin/x",
            b"?q=1",
            b"",
            b"a.test:80",
            b"http:/x",
        ] {
            assert!(classify(b"GET", t).is_err(), "{:?}", String::from_utf8_lossy(t));
        }
        assert_eq!(classify(b"GET", b"*"), Err(TargetError::AsteriskNotOptions));
        assert_eq!(classify(b"GET", b"ftp://a.test/x"), Err(TargetError::BadScheme));
        assert_eq!(classify(b"GET", b"/a b"), Err(TargetError::BadByte));
        assert_eq!(classify(b"GET", "/é".as_bytes()), Err(TargetError::BadByte));
        assert_eq!(classify(b"CONNECT", b"a.test:443"), Err(TargetError::Connect));
    }
}
