//! An upstream's HTTP/1 response as markco reads it (`markco_proxy::h1`): the head, its framing
//! and the body, fed in pieces of any size. A tenant's runtime writes these bytes. Never a
//! panic; a complete head is a prefix that parses the same on its own; a body never yields more
//! than its framing allows or than was sent; whatever we chunk-encode decodes back exactly,
//! whatever the read sizes, with what follows it left for the caller.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use markco_proxy::h1::{self, Body, Framing, Step};

/// Decodes `raw` fed in pieces of `step` bytes: the body, what was left after it, and whether
/// the body ended (by its framing, or by the close for a body read to the close).
fn decode(framing: Framing, raw: &[u8], step: usize) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut body = Body::new(framing);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut input = raw.chunks(step.max(1));
    loop {
        match body.next(&mut buf).ok()? {
            Step::Data(d) => {
                assert!(!d.is_empty(), "an empty piece of body");
                out.extend_from_slice(&d);
            }
            Step::Done => return Some((out, buf.to_vec())),
            Step::More => match input.next() {
                Some(piece) => buf.extend_from_slice(piece),
                None => {
                    body.closed().ok()?;
                    return Some((out, buf.to_vec()));
                }
            },
        }
    }
}

fn chunk_encode(data: &[u8], sizes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = usize::from(sizes.get(i % sizes.len().max(1)).copied().unwrap_or(7)).max(1).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        // Extensions are allowed and skipped.
        out.extend_from_slice(format!("{n:x}{}\r\n", if i % 3 == 1 { ";ext=\"a b\"" } else { "" }).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
        rest = tail;
        i += 1;
    }
    out.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else { return };
    let step = usize::from(mode % 32) + 1;
    let head_request = mode & 0x80 != 0;

    // Arbitrary bytes as a response.
    if let Ok(Some(head)) = h1::parse_head(data) {
        assert!(head.len <= data.len());
        let status = head.header.status.as_u16();
        assert!((100..=999).contains(&status), "status {status}");
        // The head alone parses to the same thing: the body bytes played no part.
        let alone = h1::parse_head(&data[..head.len]).expect("the head alone parses").expect("complete");
        assert_eq!(alone.len, head.len);
        assert_eq!(alone.header.status, head.header.status);
        assert_eq!(alone.header.headers.len(), head.header.headers.len());
        // No value passed on may break the head it is written into.
        for (_, v) in head.header.headers.iter() {
            assert!(!v.as_bytes().iter().any(|b| matches!(b, b'\r' | b'\n' | 0)), "{v:?}");
        }
        let mut header = head.header;
        if let Ok(framing) = h1::framing(&mut header, head_request) {
            // The client side re-frames from these headers by the last element of the last
            // `Transfer-Encoding` line as it stands, else by a `Content-Length`: they must say
            // what we decode by.
            let te: Vec<&[u8]> = header.headers.get_all("transfer-encoding").iter().map(|v| v.as_bytes()).collect();
            let last_te = te.last().map(|v| v.rsplit(|&b| b == b',').next().unwrap_or(v).trim_ascii());
            let cl: Vec<&[u8]> = header.headers.get_all("content-length").iter().map(|v| v.as_bytes()).collect();
            match framing {
                Framing::Chunked => {
                    assert_eq!(te.len(), 1, "{te:?}");
                    assert!(last_te.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")), "{te:?}");
                    assert!(cl.is_empty());
                }
                Framing::Length(n) => {
                    assert!(te.is_empty());
                    assert_eq!(cl.len(), 1, "{cl:?}");
                    assert!(cl[0].iter().all(u8::is_ascii_digit), "{cl:?}");
                    assert_eq!(std::str::from_utf8(cl[0]).ok().and_then(|v| v.parse::<u64>().ok()), Some(n));
                }
                Framing::Close => {
                    assert!(!last_te.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")), "{te:?}");
                    assert!(cl.is_empty());
                }
                Framing::Empty if header.status.as_u16() == 204 => assert!(te.is_empty() && cl.is_empty()),
                Framing::Empty => {}
            }
            let _ = h1::keepalive(&header, framing);
            let rest = &data[head.len..];
            if let Some((body, left)) = decode(framing, rest, step) {
                assert!(body.len() + left.len() <= rest.len(), "more bytes out than in");
                match framing {
                    Framing::Empty => assert!(body.is_empty()),
                    Framing::Length(n) => assert_eq!(body.len() as u64, n, "a length body ended short"),
                    Framing::Close => assert!(left.is_empty()),
                    Framing::Chunked => {}
                }
            }
        }
    } else if let Ok(None) = h1::parse_head(data) {
        // Incomplete: so is every prefix of it.
        if let Some(shorter) = data.len().checked_sub(1) {
            assert!(matches!(h1::parse_head(&data[..shorter]), Ok(None)));
        }
    }

    // A well-formed chunked encoding of the input decodes to the input, with what follows it
    // left over, whatever the read sizes.
    let (sizes, payload) = data.split_at(data.len().min(4));
    let mut encoded = chunk_encode(payload, sizes);
    encoded.extend_from_slice(b"NEXT");
    let (body, left) = decode(Framing::Chunked, &encoded, step).expect("a valid encoding was refused");
    assert_eq!(body, payload);
    assert!(b"NEXT".starts_with(&left), "{left:?}");
    // Cut before its end, it never ends as complete.
    let cut = encoded.len() - 4 - 1 - usize::from(mode) % (encoded.len() - 4);
    assert!(decode(Framing::Chunked, &encoded[..cut], step).is_none(), "a cut body was accepted as whole");
});
