//! Request-path normalisation: the one place that decides what path a route (and later an owner
//! check) sees. Dot segments are resolved, percent-encoded unreserved characters decoded, other
//! escapes kept (upper-cased) so an encoded slash never becomes a separator, and empty segments
//! (`//`) collapsed.

// Bytes from the network: no arithmetic that can overflow, no indexing that can panic.
#![deny(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use std::fmt;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// The path does not start with `/`.
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    BadEscape,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathError::NotAbsolute => f.write_str("request path must start with '/'"),
            PathError::BadEscape => f.write_str("malformed percent-escape in request path"),
        }
    }
}

impl std::error::Error for PathError {}

/// The byte of a `%hl` escape's two hex digits.
fn unhex(h: u8, l: u8) -> Option<u8> {
    let (h, l) = (char::from(h).to_digit(16)?, char::from(l).to_digit(16)?);
    // Two hex digits: at most 0xff, so the conversion cannot fail.
    u8::try_from(h.checked_mul(16)?.checked_add(l)?).ok()
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes escapes of unreserved characters and upper-cases the others.
fn canonical_escapes(raw: &str) -> Result<String, PathError> {
    let mut bytes = raw.bytes();
    let mut out = Vec::with_capacity(raw.len());
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let (Some(h), Some(l)) = (bytes.next(), bytes.next()) else {
                return Err(PathError::BadEscape);
            };
            let decoded = unhex(h, l).ok_or(PathError::BadEscape)?;
            if is_unreserved(decoded) {
                out.push(decoded);
            } else {
                out.extend_from_slice(&[b'%', h.to_ascii_uppercase(), l.to_ascii_uppercase()]);
            }
        } else {
            // Any other byte is kept as it is (a parsed URI gives ASCII; a non-ASCII character
            // of a `&str` stays that character rather than becoming one char per byte).
            out.push(b);
        }
    }
    // Only ASCII bytes were replaced by ASCII bytes, so the UTF-8 of `raw` is intact.
    String::from_utf8(out).map_err(|_| PathError::BadEscape)
}

/// Normalises a request path (without its query).
///
/// `/a/./b/../c//d/` becomes `/a/c/d/`; `/%2e%2e/x` becomes `/x`; `/a%2fb` stays `/a%2Fb`.
/// `..` never climbs above the root.
pub fn normalize(raw: &str) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = canonical_escapes(raw)?;
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in decoded.split('/') {
        trailing_slash = false;
        match seg {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Percent-decodes one path segment completely, for file-system use. Returns `None` when the
/// result is not a plain file name (contains `/`, `\`, NUL, or is `.`/`..`) or not UTF-8.
pub fn decode_segment(seg: &str) -> Option<String> {
    let mut bytes = seg.bytes();
    let mut out = Vec::with_capacity(seg.len());
    while let Some(b) = bytes.next() {
        if b == b'%' {
            out.push(unhex(bytes.next()?, bytes.next()?)?);
        } else {
            out.push(b);
        }
    }
    let s = String::from_utf8(out).ok()?;
    if s.is_empty() || s == "." || s == ".." || s.contains(['/', '\\', '\0']) {
        return None;
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the `path_normalize` fuzz target's idempotence check catches: a non-ASCII character
    /// used to come out as one char per UTF-8 byte, so normalising twice gave another path.
    #[test]
    fn non_ascii_is_kept_and_normalising_is_idempotent() {
        let once = normalize("/caf\u{e9}/%41/\u{1f600}").expect("valid");
        assert_eq!(once, "/caf\u{e9}/A/\u{1f600}");
        assert_eq!(normalize(&once), Ok(once.clone()));
    }

    #[test]
    fn resolves_dot_segments_and_slashes() {
        let cases = [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("//a///b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/%2e%2e/x", "/x"),
            ("/a/%2E%2e/b", "/b"),
            ("/%61bc", "/abc"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2F..%2Fb", "/a%2F..%2Fb"),
            ("/u/alice/%2e%2e/bob/", "/u/bob/"),
            ("/%7euser", "/~user"),
            ("/a%20b", "/a%20b"),
            ("/a%3a", "/a%3A"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize(raw).as_deref(), Ok(want), "normalize({raw})");
        }
    }

    #[test]
    fn refuses_bad_input() {
        assert_eq!(normalize("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("/a%2"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize(""), Err(PathError::NotAbsolute));
    }

    #[test]
    fn segments_for_files() {
        assert_eq!(decode_segment("a%20b.js").as_deref(), Some("a b.js"));
        assert_eq!(decode_segment("%2e%2e"), None);
        assert_eq!(decode_segment("a%2Fb"), None);
        assert_eq!(decode_segment("a%00"), None);
        assert_eq!(decode_segment("%zz"), None);
    }
}
