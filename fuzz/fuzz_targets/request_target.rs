//! The request-target check and the path normaliser together, on arbitrary bytes: never a
//! panic, and an accepted origin-form target always normalises to a clean absolute path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use markco_proxy::target::{classify, TargetForm};

fuzz_target!(|data: &[u8]| {
    // First byte picks the method, the rest is the target.
    let (method, raw): (&[u8], &[u8]) = match data.split_first() {
        Some((m, rest)) if m % 3 == 0 => (b"OPTIONS", rest),
        Some((m, rest)) if m % 3 == 1 => (b"CONNECT", rest),
        Some((_, rest)) => (b"GET", rest),
        None => return,
    };
    if let Ok(TargetForm::Origin) = classify(method, raw) {
        let path = raw.split(|&b| b == b'?').next().unwrap_or_default();
        let Ok(path) = std::str::from_utf8(path) else {
            panic!("classify accepted non-ASCII");
        };
        if let Ok(n) = markco_proxy::path::normalize(path) {
            assert!(n.starts_with('/'));
            assert!(!n.contains("//"));
            assert!(n.split('/').all(|seg| seg != "." && seg != ".."));
        }
    }
});
