//! The podman event stream's framing and JSON decoding (podman's socket is outside markco):
//! never a panic, events independent of where the stream's bytes were cut, and every event one
//! of markco's containers, as markco reports it.
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use markco_control::engine::podman::{EventDecoder, MAX_EVENT_LINE};

fn decode(pieces: &[&[u8]]) -> (Vec<Result<String, String>>, bool) {
    let mut d = EventDecoder::default();
    let mut out = VecDeque::new();
    let mut ok = true;
    for p in pieces {
        if !d.feed(p, &mut out) {
            ok = false;
            break;
        }
        assert!(d.pending_bytes() <= MAX_EVENT_LINE);
    }
    let events = out
        .into_iter()
        .map(|e| match e {
            Ok(ev) => {
                assert_eq!(ev.status, ev.status.to_ascii_lowercase(), "status not lower-case");
                assert!(!ev.status.is_empty());
                assert_eq!(ev.labels.get("markco.managed").map(String::as_str), Some("true"), "not markco's: {ev:?}");
                for k in ["name", "image", "podId", "containerExitCode"] {
                    assert!(!ev.labels.contains_key(k), "podman's attribute {k} taken as a label");
                }
                // A pod's infra container: 12 hex digits of the pod id, then "-infra".
                let infra = ev
                    .name
                    .strip_suffix("-infra")
                    .is_some_and(|id| id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()));
                assert!(!infra, "an infra container reported: {}", ev.name);
                Ok(format!("{}|{}|{:?}", ev.name, ev.status, ev.labels))
            }
            Err(e) => Err(format!("{e:#}")),
        })
        .collect();
    (events, ok)
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else { return };
    let whole = decode(&[stream]);
    // The same bytes in two or three pieces, cut anywhere: the same events.
    let a = usize::from(cut) % (stream.len() + 1);
    let b = a + (stream.len() - a) / 2;
    let pieces = decode(&[&stream[..a], &stream[a..b], &stream[b..]]);
    assert_eq!(whole, pieces, "events depend on where the stream was cut ({a}, {b})");
    let bytewise: Vec<&[u8]> = stream.chunks(1 + usize::from(cut) % 7).collect();
    assert_eq!(whole, decode(&bytewise));
});
