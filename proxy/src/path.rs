//! Request-path normalisation: the one place that decides what path a route (and later an owner
//! check) sees. Dot segments are resolved, percent-encoded unreserved characters decoded, other
//! escapes kept (upper-cased) so an encoded slash never becomes a separator, and empty segments
//! (`//`) collapsed.

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

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes escapes of unreserved characters and upper-cases the others.
fn canonical_escapes(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
                return Err(PathError::BadEscape);
            };
            let (Some(hv), Some(lv)) = (hex_val(h), hex_val(l)) else {
                return Err(PathError::BadEscape);
            };
            let decoded = hv * 16 + lv;
            if is_unreserved(decoded) {
                out.push(decoded as char);
            } else {
                out.push('%');
                out.push(h.to_ascii_uppercase() as char);
                out.push(l.to_ascii_uppercase() as char);
            }
            i += 3;
        } else {
            // The path came from a parsed URI, so it is ASCII; keep any other byte as it is.
            out.push(b as char);
            i += 1;
        }
    }
    Ok(out)
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
    let bytes = seg.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hv = hex_val(*bytes.get(i + 1)?)?;
            let lv = hex_val(*bytes.get(i + 2)?)?;
            out.push(hv * 16 + lv);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
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
