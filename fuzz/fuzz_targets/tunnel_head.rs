//! The response-head parser of the websocket tunnel (a tenant's runtime answers the upgrade):
//! never a panic; a complete head is a prefix of the input that parses the same on its own, with
//! a real status and the framing its headers say.
#![no_main]

use libfuzzer_sys::fuzz_target;
use markco_proxy::tunnel::parse_head;

fuzz_target!(|data: &[u8]| {
    match parse_head(data) {
        Ok(Some(head)) => {
            assert!(head.len <= data.len());
            let status = head.header.status.as_u16();
            assert!((100..=999).contains(&status), "status {status}");
            let h = &head.header.headers;
            if head.content_length.is_some() {
                assert!(h.contains_key("content-length"));
            }
            if head.chunked {
                assert!(h.contains_key("transfer-encoding"));
            }
            // The head alone parses to the same thing: the body bytes played no part.
            let alone = parse_head(&data[..head.len]).expect("the head alone parses").expect("complete");
            assert_eq!(alone.len, head.len);
            assert_eq!(alone.header.status, head.header.status);
            assert_eq!(alone.content_length, head.content_length);
            assert_eq!(alone.chunked, head.chunked);
        }
        Ok(None) => {
            // Incomplete: so is every prefix of it (no head is found by reading less).
            if let Some(shorter) = data.len().checked_sub(1) {
                assert!(matches!(parse_head(&data[..shorter]), Ok(None)));
            }
        }
        Err(_) => {}
    }
});
