//! The chunked decoder for a refused upgrade's body (a tenant's runtime writes it): never a
//! panic, never more than the limit, and whatever we encode it decodes back exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use markco_proxy::tunnel::{dechunk, DechunkError};

fn encode(data: &[u8], sizes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = usize::from(sizes.get(i % sizes.len().max(1)).copied().unwrap_or(7)).max(1).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        // Extensions are allowed and ignored.
        out.extend_from_slice(format!("{n:x}{}\r\n", if i % 3 == 1 { ";ext=1" } else { "" }).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
        rest = tail;
        i += 1;
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let limit = usize::from(mode) * 64;
    // Arbitrary bytes as a chunked body.
    match dechunk(rest, limit) {
        Ok(body) => {
            assert!(body.len() <= limit, "{} bytes over a limit of {limit}", body.len());
            assert!(body.len() <= rest.len());
        }
        Err(DechunkError::TooLarge) => {}
        Err(_) => {}
    }
    // A well-formed encoding of the input decodes to the input (or is too large).
    let (sizes, payload) = rest.split_at(rest.len().min(4));
    let encoded = encode(payload, sizes);
    match dechunk(&encoded, limit) {
        Ok(body) => assert_eq!(body, payload),
        Err(DechunkError::TooLarge) => assert!(payload.len() > limit),
        Err(e) => panic!("a valid encoding was refused: {e}"),
    }
    // Cut anywhere before its end, it is never accepted as complete with other content.
    if let Some(cut) = encoded.len().checked_sub(1 + usize::from(mode) % encoded.len().max(1)) {
        if let Ok(body) = dechunk(&encoded[..cut], usize::MAX) {
            assert!(payload.starts_with(&body), "a truncated body decoded to other bytes");
        }
    }
});
