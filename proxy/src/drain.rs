//! Ending upgraded connections cleanly at a graceful shutdown or upgrade.
//!
//! When the listener stops accepting, Pingora lets open connections run for the grace period and
//! then drops its runtimes, which would cut every websocket without a close frame. [`Drain`]
//! tells each tunnel when the grace period is nearly over; a websocket tunnel then sends the
//! client a Close frame (1001 "going away") at a frame boundary, relays the client's answering
//! Close to the upstream, and ends. The tunnel does not parse messages: [`Frames`] only follows
//! frame headers to know where frames end.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Time kept at the end of the grace period for the close handshake.
const CLOSE_MARGIN: Duration = Duration::from_millis(1500);
/// How long a client gets to answer our Close frame.
pub const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(1);

/// The shutdown signal shared by the listener (which starts it) and the tunnels (which wait).
pub struct Drain {
    grace: Duration,
    deadline: watch::Sender<Option<Instant>>,
}

impl Drain {
    pub fn new(grace_period: Duration) -> Drain {
        Drain { grace: grace_period, deadline: watch::Sender::new(None) }
    }

    /// The listener stopped accepting: the runtimes go in `grace` from now.
    pub fn begin(&self) {
        let at = Instant::now() + self.grace.saturating_sub(CLOSE_MARGIN);
        self.deadline.send_if_modified(|d| d.is_none() && d.replace(at).is_none());
    }

    /// Resolves when upgraded connections should start closing.
    pub async fn closing(&self) {
        let mut rx = self.deadline.subscribe();
        let at = match rx.wait_for(Option::is_some).await {
            Ok(d) => *d,
            // The sender lives as long as `self`; treat its loss as "now".
            Err(_) => None,
        };
        if let Some(at) = at {
            tokio::time::sleep_until(at).await;
        }
    }
}

/// Follows websocket frame boundaries in one direction of a byte stream (RFC 6455 5.2).
#[derive(Default)]
pub struct Frames {
    /// Header bytes of the frame being read, until the header is complete.
    head: Vec<u8>,
    /// Payload bytes still to come in the current frame.
    payload_left: u64,
    /// A Close frame went by: nothing more may follow it in this direction.
    pub saw_close: bool,
}

impl Frames {
    /// Accounts for bytes relayed in this direction.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = (self.payload_left.min(data.len() as u64)) as usize;
                self.payload_left -= n as u64;
                data = &data[n..];
                continue;
            }
            self.head.push(data[0]);
            data = &data[1..];
            if let Some(payload) = header_complete(&self.head) {
                self.saw_close |= self.head[0] & 0x0f == 0x8;
                self.head.clear();
                self.payload_left = payload;
            }
        }
    }

    /// Between two frames: a frame of our own may be sent now.
    pub fn at_boundary(&self) -> bool {
        self.head.is_empty() && self.payload_left == 0
    }
}

/// The payload length once `head` holds a whole frame header.
fn header_complete(head: &[u8]) -> Option<u64> {
    if head.len() < 2 {
        return None;
    }
    let masked = head[1] & 0x80 != 0;
    let (ext, len7) = match head[1] & 0x7f {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(n as u64)),
    };
    let total = 2 + ext + if masked { 4 } else { 0 };
    if head.len() < total {
        return None;
    }
    Some(match len7 {
        Some(n) => n,
        None => head[2..2 + ext].iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
    })
}

/// A Close frame with status 1001 (going away), as a server sends it (unmasked), or as a client
/// does (masked with `mask`).
pub fn close_frame(mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut payload = 1001u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"server restarting");
    let mut out = vec![0x88, payload.len() as u8 | if mask.is_some() { 0x80 } else { 0 }];
    if let Some(m) = mask {
        out.extend_from_slice(&m);
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    out.extend_from_slice(&payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_boundaries_across_chunks() {
        let mut f = Frames::default();
        assert!(f.at_boundary());
        // A 5-byte unmasked text frame, fed in pieces.
        f.feed(&[0x81]);
        assert!(!f.at_boundary());
        f.feed(&[0x05, b'h', b'e']);
        assert!(!f.at_boundary());
        f.feed(b"llo");
        assert!(f.at_boundary());
        // A masked 300-byte frame (16-bit length) followed by an empty ping in the same chunk.
        let mut data = vec![0x82, 0x80 | 126, 0x01, 0x2c, 1, 2, 3, 4];
        data.extend(std::iter::repeat_n(0u8, 300));
        data.extend([0x89, 0x00]);
        f.feed(&data[..100]);
        assert!(!f.at_boundary());
        f.feed(&data[100..]);
        assert!(f.at_boundary());
        // A 64-bit length.
        f.feed(&[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert!(!f.at_boundary());
        f.feed(&vec![0u8; 65536]);
        assert!(f.at_boundary());
    }

    #[test]
    fn close_frames() {
        let c = close_frame(None);
        assert_eq!(&c[..4], &[0x88, 19, 0x03, 0xe9]);
        let m = close_frame(Some([1, 2, 3, 4]));
        assert_eq!(m[1], 0x80 | 19);
        assert_eq!(m[6] ^ 1, 0x03);
        assert_eq!(m[7] ^ 2, 0xe9);
        let mut f = Frames::default();
        f.feed(&[0x81, 0x00]);
        assert!(!f.saw_close);
        f.feed(&m);
        assert!(f.at_boundary() && f.saw_close);
    }
}
