//! The path normaliser on any UTF-8 string: a clean absolute path or an error, and normalising
//! a normalised path changes nothing (the route and the owner check see one spelling).
#![no_main]

use libfuzzer_sys::fuzz_target;
use markco_proxy::path::{normalize, PathError};

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fuzz_target!(|raw: &str| {
    match normalize(raw) {
        Ok(n) => {
            assert!(raw.starts_with('/'));
            assert!(n.starts_with('/'), "{raw:?} -> {n:?}");
            assert!(!n.contains("//"), "{raw:?} -> {n:?}");
            assert!(n.split('/').all(|seg| seg != "." && seg != ".."), "{raw:?} -> {n:?}");
            // Every escape left is upper-case hex of a byte that is not unreserved.
            let b = n.as_bytes();
            for (i, _) in n.match_indices('%') {
                let (h, l) = (b.get(i + 1).copied(), b.get(i + 2).copied());
                let (Some(h), Some(l)) = (h, l) else { panic!("dangling % in {n:?}") };
                assert!(h.is_ascii_hexdigit() && l.is_ascii_hexdigit(), "{n:?}");
                assert!(!h.is_ascii_lowercase() && !l.is_ascii_lowercase(), "{n:?}");
                let byte = u8::from_str_radix(std::str::from_utf8(&[h, l]).unwrap_or("00"), 16).unwrap_or(0);
                assert!(!unreserved(byte), "escape of an unreserved byte left in {n:?}");
            }
            assert_eq!(normalize(&n).as_deref(), Ok(n.as_str()), "not idempotent for {raw:?}");
        }
        Err(PathError::NotAbsolute) => assert!(!raw.starts_with('/')),
        Err(PathError::BadEscape) => assert!(raw.contains('%')),
    }
});
