//! The bytes of an upgraded connection (a websocket), copied both ways without a buffer per
//! connection.
//!
//! An idle tunnel is the common case (every open editor holds several websockets), so what it
//! holds while idle is what decides how many users fit on a host. A tunnel here holds its two
//! sockets and a few words of state. Reads go into one scratch buffer per thread, borrowed only
//! for the length of one poll; bytes are copied into memory of the tunnel's own only when the
//! receiving side cannot take them at once (back-pressure), and that copy is freed as soon as it
//! is written.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::drain::{close_frame, Drain, Frames, CLOSE_REPLY_WAIT};

const SCRATCH: usize = 16 * 1024;
/// Reads per direction in one poll before yielding, so one busy tunnel cannot starve the thread.
const READS_PER_POLL: usize = 8;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// One direction: bytes read from one side that the other side has not taken yet.
#[derive(Default)]
pub struct Direction {
    pending: Vec<u8>,
    written: usize,
    needs_flush: bool,
    /// The reading side ended (end of stream or an error).
    pub done: bool,
    /// Websocket frame boundaries of what went this way (for a clean close at shutdown).
    pub frames: Frames,
    /// Discard what is read (after our own Close, nothing more may go this way).
    pub discard: bool,
    /// Bytes moved this way, for the idle timer.
    pub moved: u64,
}

impl Direction {
    /// A direction that starts with `bytes` to deliver (read before the tunnel began).
    pub fn starting_with(bytes: &[u8]) -> Direction {
        let mut d = Direction::default();
        d.frames.feed(bytes);
        d.enqueue(bytes);
        d
    }

    /// Queues bytes of our own (a Close frame) after what is pending.
    pub fn enqueue(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    fn has_pending(&self) -> bool {
        self.written < self.pending.len()
    }

    /// Writes what is pending; `Ready(Ok(()))` once nothing is (and it is flushed).
    fn poll_drain<W: AsyncWrite + Unpin + ?Sized>(&mut self, cx: &mut Context<'_>, to: &mut W) -> Poll<io::Result<()>> {
        while self.has_pending() {
            let rest = self.pending.get(self.written..).unwrap_or_default();
            match Pin::new(&mut *to).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.written = self.written.saturating_add(n);
                    self.needs_flush = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        // Everything went out: give the memory back rather than keep it for the next burst.
        self.pending = Vec::new();
        self.written = 0;
        if self.needs_flush {
            match Pin::new(&mut *to).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.needs_flush = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Moves bytes from `from` to `to` until one of them has to wait. `Ready(Err)` ends the tunnel;
    /// `Ready(Ok)` means this direction has ended cleanly (end of stream, all written).
    pub fn poll_copy<R, W>(&mut self, cx: &mut Context<'_>, from: &mut R, to: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        for _ in 0..READS_PER_POLL {
            match self.poll_drain(cx, to) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            if self.done {
                return Poll::Ready(Ok(()));
            }
            let step = SCRATCH_BUF.with(|cell| {
                let mut guard = cell.borrow_mut();
                let mut rb = ReadBuf::new(&mut guard[..]);
                match Pin::new(&mut *from).poll_read(cx, &mut rb) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let data = rb.filled();
                        if data.is_empty() {
                            return Poll::Ready(Ok(0));
                        }
                        let n = data.len();
                        self.moved = self.moved.saturating_add(n as u64);
                        if self.discard {
                            return Poll::Ready(Ok(n));
                        }
                        self.frames.feed(data);
                        // Straight from the scratch buffer when the other side takes it now.
                        let sent = match Pin::new(&mut *to).poll_write(cx, data) {
                            Poll::Ready(Ok(w)) => w.min(n),
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Pending => 0,
                        };
                        if sent > 0 {
                            self.needs_flush = true;
                        }
                        if let Some(rest) = data.get(sent..) {
                            if !rest.is_empty() {
                                self.pending.extend_from_slice(rest);
                            }
                        }
                        Poll::Ready(Ok(n))
                    }
                }
            });
            match step {
                Poll::Pending => {
                    // Nothing to read: make sure what was written is on its way.
                    return match self.poll_drain(cx, to) {
                        Poll::Ready(Ok(())) => Poll::Pending,
                        other => other,
                    };
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => self.done = true,
                Poll::Ready(Ok(_)) => {}
            }
        }
        // Still busy: let other tasks run, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// How a tunnel ended, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    ClientClosed,
    UpstreamClosed,
    Error,
    Idle,
    Drained,
}

/// Copies between `client` and `upstream` until either side closes, the connection idles for
/// `idle`, or a shutdown drains it (a websocket then gets a Close frame between frames).
pub async fn run<C, U>(
    client: &mut C,
    upstream: &mut U,
    idle: Duration,
    drain: Option<&Drain>,
    websocket: bool,
    mut to_client: Direction,
    mut to_upstream: Direction,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let closing = async {
        match drain {
            Some(d) => d.closing().await,
            None => std::future::pending().await,
        }
    };
    let mut closing = std::pin::pin!(closing);
    let mut idle_timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(idle));
    let mut moved = (0u64, 0u64);
    let mut draining = false;
    let mut close_sent: Option<Instant> = None;
    let mut reply_timer: Option<Pin<Box<Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if !draining && closing.as_mut().poll(cx).is_ready() {
            if !websocket {
                return Poll::Ready(End::Drained);
            }
            draining = true;
        }
        // Draining: our Close goes to the client as soon as no upstream frame is half sent.
        if draining && close_sent.is_none() && to_client.frames.at_boundary() {
            to_client.enqueue(&close_frame(None));
            to_client.discard = true;
            let at = Instant::now();
            close_sent = Some(at);
            reply_timer = Some(Box::pin(tokio::time::sleep_until(at + CLOSE_REPLY_WAIT)));
        }
        match to_client.poll_copy(cx, upstream, client) {
            Poll::Ready(Ok(())) if !to_client.has_pending() => return Poll::Ready(End::UpstreamClosed),
            Poll::Ready(Err(_)) => return Poll::Ready(End::Error),
            _ => {}
        }
        match to_upstream.poll_copy(cx, client, upstream) {
            Poll::Ready(Ok(())) if !to_upstream.has_pending() => {
                return Poll::Ready(if close_sent.is_some() { End::Drained } else { End::ClientClosed })
            }
            Poll::Ready(Err(_)) => return Poll::Ready(End::Error),
            _ => {}
        }
        if let Some(t) = reply_timer.as_mut() {
            if t.as_mut().poll(cx).is_ready() {
                // The client did not answer our Close in time: close the upstream's side too,
                // best effort, as if the client had.
                if !to_upstream.frames.saw_close && to_upstream.frames.at_boundary() {
                    let frame = close_frame(Some(mask()));
                    let _ = Pin::new(&mut *upstream).poll_write(cx, &frame);
                    let _ = Pin::new(&mut *upstream).poll_flush(cx);
                }
                return Poll::Ready(End::Drained);
            }
        }
        let now_moved = (to_client.moved, to_upstream.moved);
        if now_moved != moved {
            moved = now_moved;
            idle_timer.as_mut().reset(Instant::now() + idle);
        }
        if idle_timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(End::Idle);
        }
        Poll::Pending
    })
    .await
}

/// A masking key for the one frame we send upstream as if from the client.
fn mask() -> [u8; 4] {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    nanos.to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_ends_when_a_side_closes() {
        let (mut client_far, mut client) = tokio::io::duplex(64);
        let (mut up_far, mut upstream) = tokio::io::duplex(64);
        let relay = tokio::spawn(async move {
            run(
                &mut client,
                &mut upstream,
                Duration::from_secs(30),
                None,
                true,
                Direction::default(),
                Direction::default(),
            )
            .await
        });
        // More than the duplex buffer, so back-pressure and the pending copy are exercised.
        let big = vec![7u8; 100_000];
        let writer = tokio::spawn(async move {
            client_far.write_all(&big).await.expect("write");
            client_far
        });
        let mut got = vec![0u8; 100_000];
        up_far.read_exact(&mut got).await.expect("read");
        assert!(got.iter().all(|&b| b == 7));
        let mut client_far = writer.await.expect("writer");
        up_far.write_all(b"pong").await.expect("write back");
        let mut back = [0u8; 4];
        client_far.read_exact(&mut back).await.expect("read back");
        assert_eq!(&back, b"pong");
        drop(up_far);
        assert_eq!(relay.await.expect("relay"), End::UpstreamClosed);
    }

    #[tokio::test]
    async fn idle_tunnel_ends_after_the_idle_time() {
        let (_client_far, mut client) = tokio::io::duplex(64);
        let (_up_far, mut upstream) = tokio::io::duplex(64);
        let start = std::time::Instant::now();
        let end = run(
            &mut client,
            &mut upstream,
            Duration::from_millis(200),
            None,
            true,
            Direction::default(),
            Direction::default(),
        )
        .await;
        assert_eq!(end, End::Idle);
        assert!(start.elapsed() >= Duration::from_millis(200));
    }
}
