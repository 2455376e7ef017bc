//! An upstream's HTTP/1 response, read by us: its head (parsed by `httparse`), its framing
//! (RFC 9112 6.3) and its chunked body. Used by [`crate::upstream`] for requests without a body,
//! in place of Pingora's HTTP/1 client session, whose per-request work (a request head cloned
//! for the retry, the response head copied out, its body reader and keep-alive bookkeeping)
//! cost 2.6 to 3.1 µs of CPU a request (benches/README.md, "The upstream's answer read by us").
//!
//! Everything here parses bytes from a user's runtime or editor, which run that user's code:
//! sizes are bounded, arithmetic is checked, and each function is fuzzed
//! (`fuzz/fuzz_targets/upstream_response.rs`).

use std::mem::MaybeUninit;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderValue, Version};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::ErrorType;

/// Header lines and bytes a response head may have (Pingora's own limits, so that nothing an
/// upstream could send before is refused now).
pub const MAX_HEADERS: usize = 256;
pub const MAX_HEAD: usize = 1024 * 1024;
/// A chunk-size line (with its extensions) or the trailer section longer than this is refused.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;
/// Bytes of blank lines tolerated before the status line (httparse skips them; more is not an
/// answer).
const MAX_LEADING_BLANK: usize = 8;

fn bad(why: impl Into<String>) -> Box<Error> {
    crate::upstream::up_err(ErrorType::InvalidHTTPHeader, why)
}

/// How the body of a response ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a HEAD's answer, 204, 304.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding` ending in `chunked`.
    Chunked,
    /// Read until the upstream closes (the connection cannot be reused).
    Close,
}

/// A parsed response head.
pub struct Head {
    pub header: ResponseHeader,
    /// Bytes of `buf` the head took.
    pub len: usize,
}

/// Parses a response head at the start of `buf`: `Ok(None)` if it is not complete yet (the
/// caller reads more, up to [`MAX_HEAD`]).
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>> {
    if leading_blank(buf) > MAX_LEADING_BLANK {
        return Err(bad("blank lines before the response's status line"));
    }
    // Uninitialised: filling 256 empty headers first cost more than the parse (8 KiB of
    // stores for every response).
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    // As lenient as Pingora's client: obsolete line folding is turned into spaces below
    // (`header_value_from_raw`, RFC 9112 5.2), and a space before the colon is dropped.
    let mut config = httparse::ParserConfig::default();
    config.allow_spaces_after_header_name_in_responses(true);
    config.allow_obsolete_multiline_headers_in_responses(true);
    let len = match config.parse_response_with_uninit_headers(&mut resp, buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(bad(format!("malformed response head: {e}"))),
    };
    let code = resp.code.ok_or_else(|| bad("response head without a status"))?;
    // httparse takes any three digits; `http` refuses those below 100.
    let mut header = ResponseHeader::build(code, Some(resp.headers.len()))
        .map_err(|e| bad(format!("response status {code}: {e}")))?;
    header.set_version(if resp.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 });
    header.set_reason_phrase(resp.reason).map_err(|e| bad(format!("response reason phrase: {e}")))?;
    // One copy of the head, which every name and value shares (no allocation for each).
    let shared = Bytes::copy_from_slice(buf.get(..len).unwrap_or_default());
    for h in resp.headers.iter() {
        // Kept in the case the upstream wrote it (Pingora writes it back so); httparse checked
        // that the name is a token. Obsolete folding in a value becomes spaces.
        let (Some(case), Some(value)) = (share(&shared, buf, h.name.as_bytes()), share(&shared, buf, h.value)) else {
            return Err(bad("response header outside its head"));
        };
        let value = pingora::http::header_value_from_raw(value);
        header.append_header(case, value).map_err(|e| bad(format!("response header {:?}: {e}", h.name)))?;
    }
    Ok(Some(Head { header, len }))
}

/// `part`, a slice httparse took from `buf`, as the same bytes of `shared` (the copy of `buf`'s
/// head): `None` if it is not inside it, which httparse never does.
fn share(shared: &Bytes, buf: &[u8], part: &[u8]) -> Option<Bytes> {
    if part.is_empty() {
        return Some(Bytes::new());
    }
    let start = (part.as_ptr() as usize).checked_sub(buf.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= shared.len()).then(|| shared.slice(start..end))
}

/// Finds the response head at the start of a buffer that grows read by read, parsing it only
/// once its end may have arrived ([`head_may_end`]).
#[derive(Debug, Default)]
pub struct HeadScan {
    /// Bytes of the buffer already searched for the end of a head.
    scanned: usize,
}

impl HeadScan {
    /// The head, once complete (the scan then starts afresh, for the answer after a 1xx);
    /// `Ok(None)`: read more. An error when it is malformed, or when `buf` holds more than
    /// `limit` bytes without one.
    pub fn head(&mut self, buf: &[u8], limit: usize) -> Result<Option<Head>> {
        if head_may_end(buf, self.scanned) {
            if let Some(head) = parse_head(buf)? {
                self.scanned = 0;
                return Ok(Some(head));
            }
        }
        if buf.len() > limit {
            return Err(bad(format!("response head over {limit} bytes")));
        }
        self.scanned = buf.len();
        Ok(None)
    }
}

/// A blank line (the end of a head) may be in `buf` from `from` on, counting the line end
/// before it. Parsing only then keeps an upstream that sends its head a byte at a time from
/// making us parse it over and over.
fn head_may_end(buf: &[u8], from: usize) -> bool {
    // Blank lines before the status line are no end: without this, a stream of them would be
    // parsed again on every read. Too many of them, and `parse_head` refuses the answer.
    let lead = leading_blank(buf);
    if lead > MAX_LEADING_BLANK {
        return true;
    }
    let mut at = from.saturating_sub(3).max(lead).min(buf.len());
    // One pass from LF to LF: a line end followed by a line end.
    while let Some(i) = buf[at..].iter().position(|&b| b == b'\n') {
        let lf = at + i;
        match buf.get(lf + 1..) {
            Some([b'\n', ..] | [b'\r', b'\n', ..]) => return true,
            _ => at = lf + 1,
        }
    }
    false
}

/// CR and LF bytes at the start of `buf`, counted up to one past the most tolerated.
fn leading_blank(buf: &[u8]) -> usize {
    buf.iter().take(MAX_LEADING_BLANK + 1).take_while(|&&b| matches!(b, b'\r' | b'\n')).count()
}

/// The values of every `name` line, split at commas, trimmed, empty ones skipped.
pub(crate) fn tokens<'a>(h: &'a ResponseHeader, name: &'a header::HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
    h.headers
        .get_all(name)
        .iter()
        .flat_map(|v: &HeaderValue| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// The body's framing (RFC 9112 6.3). `head_request`: the request was a HEAD. A 1xx is not
/// asked about (it has no body and is followed by the real answer).
///
/// The framing headers are left as the client side will read them: the client's answer is
/// re-framed by Pingora from the header we hand it, so it must say what we decoded by.
pub fn framing(h: &mut ResponseHeader, head_request: bool) -> Result<Framing> {
    match h.status.as_u16() {
        // No content, whatever the headers say (RFC 9110 15.3.5): a client that believed them
        // would read the next answer as this one's body. A 304's length describes the
        // representation, and stays.
        204 => {
            h.remove_header(&header::CONTENT_LENGTH);
            h.remove_header(&header::TRANSFER_ENCODING);
            return Ok(Framing::Empty);
        }
        304 => {
            h.remove_header(&header::TRANSFER_ENCODING);
            return Ok(Framing::Empty);
        }
        _ if head_request => return Ok(Framing::Empty),
        _ => {}
    }
    if h.headers.contains_key(header::TRANSFER_ENCODING) {
        // A length beside a transfer coding is ignored and must not be passed on (6.3 item 3).
        h.remove_header(&header::CONTENT_LENGTH);
        return transfer_coding(h);
    }
    let mut length: Option<u64> = None;
    for t in tokens(h, &header::CONTENT_LENGTH) {
        let n = parse_length(t).ok_or_else(|| bad("invalid Content-Length in the response"))?;
        // Copies that agree are one length (RFC 9110 8.6); copies that differ are an attack or
        // a broken upstream.
        if length.is_some_and(|l| l != n) {
            return Err(bad("differing Content-Length values in the response"));
        }
        length = Some(n);
    }
    let Some(n) = length else {
        if h.headers.contains_key(header::CONTENT_LENGTH) {
            return Err(bad("empty Content-Length in the response"));
        }
        return Ok(Framing::Close);
    };
    // `5, 5` or two lines are one length to us, and to the client they must be too.
    let mut lines = h.headers.get_all(header::CONTENT_LENGTH).iter();
    let canonical = matches!((lines.next(), lines.next()), (Some(v), None) if parse_length(v.as_bytes()).is_some());
    if !canonical {
        h.insert_header(header::CONTENT_LENGTH, n.to_string())?;
    }
    Ok(Framing::Length(n))
}

/// The framing a `Transfer-Encoding` gives (chunked last: chunked; else to the close), with the
/// header rewritten as one line without empty elements when it was not. Pingora's client side
/// takes the last element of the last line as it stands (`chunked,` is not chunked to it), where
/// we, as RFC 9110 5.6.1 says, skip empty ones: the two must agree.
fn transfer_coding(h: &mut ResponseHeader) -> Result<Framing> {
    let mut lines = h.headers.get_all(header::TRANSFER_ENCODING).iter();
    if let (Some(v), None) = (lines.next(), lines.next()) {
        if v.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Ok(Framing::Chunked);
        }
    }
    let mut codings = Vec::new();
    let mut chunked = false;
    for t in tokens(h, &header::TRANSFER_ENCODING) {
        if !codings.is_empty() {
            codings.extend_from_slice(b", ");
        }
        codings.extend_from_slice(t);
        chunked = t.eq_ignore_ascii_case(b"chunked");
    }
    if codings.is_empty() {
        return Err(bad("empty Transfer-Encoding in the response"));
    }
    let value = HeaderValue::from_bytes(&codings).map_err(|_| bad("invalid Transfer-Encoding in the response"))?;
    h.insert_header(header::TRANSFER_ENCODING, value)?;
    Ok(if chunked { Framing::Chunked } else { Framing::Close })
}

/// A decimal length: digits only, no sign, no overflow.
fn parse_length(t: &[u8]) -> Option<u64> {
    if t.is_empty() || t.len() > 19 {
        return None;
    }
    t.iter().try_fold(0u64, |n, &b| {
        let d = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// The upstream may keep the connection open after this response (RFC 9112 9.3): HTTP/1.1
/// unless `Connection: close`, HTTP/1.0 only with `Connection: keep-alive` and no transfer
/// coding (9112 6.1). A body read to the close, or bytes past the response, rule it out too
/// (the caller checks those).
pub fn keepalive(h: &ResponseHeader, framing: Framing) -> bool {
    if framing == Framing::Close {
        return false;
    }
    let mut close = false;
    let mut keep = false;
    for t in tokens(h, &header::CONNECTION) {
        close |= t.eq_ignore_ascii_case(b"close");
        keep |= t.eq_ignore_ascii_case(b"keep-alive");
    }
    match h.version {
        Version::HTTP_11 => !close,
        _ => keep && !close && !h.headers.contains_key(header::TRANSFER_ENCODING),
    }
}

/// How long the upstream says it keeps an idle connection open (`Keep-Alive: timeout=N`, a
/// de-facto header that Node.js and Apache send): the least `timeout` given, if any.
pub fn keepalive_timeout(h: &ResponseHeader) -> Option<Duration> {
    let name = header::HeaderName::from_static("keep-alive");
    tokens(h, &name)
        .filter_map(|param| {
            let (key, value) = param.split_at(param.iter().position(|&b| b == b'=')?);
            if !key.trim_ascii().eq_ignore_ascii_case(b"timeout") {
                return None;
            }
            let value = value.get(1..)?.trim_ascii();
            // `timeout="5"` is seen too.
            let value = value.strip_prefix(b"\"").and_then(|v| v.strip_suffix(b"\"")).unwrap_or(value);
            parse_length(value)
        })
        .min()
        .map(Duration::from_secs)
}

/// A body being read: how much of it is still to come.
#[derive(Debug)]
pub enum Body {
    Length(u64),
    Chunked(Chunked),
    Close,
    Done,
}

/// What [`Body::next`] found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Body bytes (taken from the buffer).
    Data(Bytes),
    /// Read more into the buffer (`Body::Close`: a read of 0 ends the body).
    More,
    /// The body is complete; what is left in the buffer came after it.
    Done,
}

impl Body {
    pub fn new(framing: Framing) -> Body {
        match framing {
            Framing::Empty | Framing::Length(0) => Body::Done,
            Framing::Length(n) => Body::Length(n),
            Framing::Chunked => Body::Chunked(Chunked::default()),
            Framing::Close => Body::Close,
        }
    }

    /// How much to read next at most: the rest of a known length, else `max`.
    pub fn want(&self, max: usize) -> usize {
        match self {
            Body::Length(n) => usize::try_from(*n).unwrap_or(usize::MAX).min(max),
            _ => max,
        }
    }

    /// Takes the next piece of body from `buf`.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Step> {
        match self {
            Body::Done => Ok(Step::Done),
            Body::Length(n) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let take = usize::try_from(*n).unwrap_or(usize::MAX).min(buf.len());
                let data = buf.split_to(take).freeze();
                // `take` is at most `n`.
                *n -= take as u64;
                if *n == 0 {
                    *self = Body::Done;
                }
                Ok(Step::Data(data))
            }
            Body::Close => {
                if buf.is_empty() {
                    Ok(Step::More)
                } else {
                    Ok(Step::Data(buf.split().freeze()))
                }
            }
            Body::Chunked(c) => {
                let step = c.next(buf)?;
                if step == Step::Done {
                    *self = Body::Done;
                }
                Ok(step)
            }
        }
    }

    /// The upstream closed the connection: fine for a body read to the close, an error for
    /// any other unfinished one.
    pub fn closed(&mut self) -> Result<()> {
        match self {
            Body::Close | Body::Done => {
                *self = Body::Done;
                Ok(())
            }
            _ => Err(crate::upstream::up_err(ErrorType::ConnectionClosed, "upstream closed inside its response body")),
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, Body::Done)
    }
}

/// A chunked body's decoder (RFC 9112 7.1). Extensions are skipped and trailers dropped (the
/// client's answer is re-chunked by the server side, without them).
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    trailer_bytes: usize,
    /// Bytes of the buffer already searched for the end of the current line, so that a line
    /// trickled a byte at a time is not searched again from its start on every read.
    scanned: usize,
}

#[derive(Debug, Default, Clone, Copy)]
enum ChunkState {
    /// Before a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data, this many bytes to go.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty one.
    Trailers,
}

impl Chunked {
    /// Where the current line ends (its LF), searching only what was not searched before.
    fn line_end(&mut self, buf: &[u8]) -> Option<usize> {
        let from = self.scanned.min(buf.len());
        match buf[from..].iter().position(|&b| b == b'\n') {
            Some(i) => Some(from + i),
            None => {
                self.scanned = buf.len();
                None
            }
        }
    }

    fn next(&mut self, buf: &mut BytesMut) -> Result<Step> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(end) = self.line_end(buf) else {
                        if buf.len() >= MAX_CHUNK_LINE {
                            return Err(bad("chunk-size line too long"));
                        }
                        return Ok(Step::More);
                    };
                    // At least one hex digit (httparse reads an empty line as a last chunk).
                    if end >= MAX_CHUNK_LINE || !buf[0].is_ascii_hexdigit() {
                        return Err(bad("malformed chunk-size line"));
                    }
                    // The line alone: httparse reads past a bare LF inside an extension, which
                    // would make the outcome depend on how the reads were split.
                    match httparse::parse_chunk_size(&buf[..=end]) {
                        Ok(httparse::Status::Complete((used, size))) => {
                            buf.advance(used);
                            self.scanned = 0;
                            self.state = if size == 0 { ChunkState::Trailers } else { ChunkState::Data(size) };
                        }
                        // The line is complete, so anything else is malformed.
                        _ => return Err(bad("malformed chunk size")),
                    }
                }
                ChunkState::Data(n) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let rest = n - take as u64;
                    self.state = if rest == 0 { ChunkState::DataEnd } else { ChunkState::Data(rest) };
                    return Ok(Step::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(bad("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(end) = self.line_end(buf) else {
                        if self.trailer_bytes.saturating_add(buf.len()) > MAX_TRAILERS {
                            return Err(bad("response trailers too long"));
                        }
                        return Ok(Step::More);
                    };
                    let line = buf.split_to(end + 1);
                    self.scanned = 0;
                    self.trailer_bytes = self.trailer_bytes.saturating_add(line.len());
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err(bad("response trailers too long"));
                    }
                    match &line[..] {
                        b"\r\n" => return Ok(Step::Done),
                        // A trailer field: dropped. A bare LF or a line without a colon is not
                        // one.
                        l if l.ends_with(b"\r\n") && l.contains(&b':') => {}
                        _ => return Err(bad("malformed trailer line")),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &[u8]) -> ResponseHeader {
        parse_head(raw).expect("parses").expect("complete").header
    }

    fn frame(raw: &[u8]) -> Result<Framing> {
        framing(&mut head(raw), false)
    }

    /// The whole body of `raw` fed in pieces of `step` bytes, and what is left after it.
    fn decode(framing: Framing, raw: &[u8], step: usize) -> Result<(Vec<u8>, Vec<u8>)> {
        let mut body = Body::new(framing);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut input = raw.chunks(step);
        loop {
            match body.next(&mut buf)? {
                Step::Data(d) => out.extend_from_slice(&d),
                Step::Done => return Ok((out, buf.to_vec())),
                Step::More => match input.next() {
                    Some(piece) => buf.extend_from_slice(piece),
                    None => {
                        body.closed()?;
                        return Ok((out, buf.to_vec()));
                    }
                },
            }
        }
    }

    #[test]
    fn heads_parse_in_pieces_and_keep_their_case() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Thing: a\r\n b\r\n\r\nhi";
        for cut in 0..raw.len() - 2 {
            assert!(parse_head(&raw[..cut]).expect("no error").is_none(), "cut {cut}");
            // The end of the head is seen by the scan whatever the pieces were read in.
            assert!(head_may_end(&raw[..raw.len() - 2], cut), "cut {cut}");
        }
        assert!(!head_may_end(&raw[..raw.len() - 3], 0));
        let h = parse_head(raw).expect("parses").expect("complete");
        assert_eq!(h.len, raw.len() - 2);
        assert_eq!(h.header.status.as_u16(), 200);
        // Obsolete folding becomes spaces, never a line break passed on.
        let v = h.header.headers.get("x-thing").expect("kept").as_bytes();
        assert!(!v.contains(&b'\r') && !v.contains(&b'\n'), "{v:?}");
        let mut wire = BytesMut::new();
        h.header.header_to_h1_wire(&mut wire);
        assert!(wire.starts_with(b"Content-Length: 2\r\nX-Thing: "), "{wire:?}");
    }

    #[test]
    fn bad_heads_are_refused() {
        assert!(parse_head(b"HTTP/1.1 2000 OK\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n").is_err());
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }

    #[test]
    fn framing_follows_rfc_9112() {
        assert_eq!(frame(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n").ok(), Some(Framing::Length(5)));
        assert_eq!(
            frame(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5, 5\r\n\r\n").ok(),
            Some(Framing::Length(5))
        );
        assert!(frame(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n").is_err());
        assert!(frame(b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n").is_err());
        assert!(frame(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n").is_err());
        assert!(frame(b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n").is_err());
        assert_eq!(frame(b"HTTP/1.1 200 OK\r\n\r\n").ok(), Some(Framing::Close));
        let mut te = head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(framing(&mut te, false).ok(), Some(Framing::Chunked));
        assert!(!te.headers.contains_key(header::CONTENT_LENGTH), "the length beside a coding is dropped");
        assert_eq!(frame(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n").ok(), Some(Framing::Close));
        assert_eq!(frame(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n").ok(), Some(Framing::Empty));
        assert_eq!(
            frame(b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n").ok(),
            Some(Framing::Empty)
        );
        let mut h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(framing(&mut h, true).ok(), Some(Framing::Empty));
    }

    #[test]
    fn framing_headers_say_what_we_decode_by() {
        let te = |h: &ResponseHeader| {
            let v: Vec<_> =
                h.headers.get_all(header::TRANSFER_ENCODING).iter().map(|v| v.as_bytes().to_vec()).collect();
            v
        };
        // Empty elements are skipped by us and would not be by the client side: one clean line.
        for raw in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding:\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: , Chunked ,,\r\n\r\n",
        ] {
            let mut h = head(raw);
            assert_eq!(framing(&mut h, false).ok(), Some(Framing::Chunked));
            let v = te(&h);
            assert_eq!(v.len(), 1, "{v:?}");
            assert!(v[0].eq_ignore_ascii_case(b"chunked"), "{v:?}");
        }
        let mut h = head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked, \r\n\r\n");
        assert_eq!(framing(&mut h, false).ok(), Some(Framing::Chunked));
        assert_eq!(te(&h), vec![b"gzip, chunked".to_vec()]);
        let mut h = head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip,\r\n\r\n");
        assert_eq!(framing(&mut h, false).ok(), Some(Framing::Close));
        assert_eq!(te(&h), vec![b"chunked, gzip".to_vec()]);
        assert!(frame(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: ,\r\n\r\n").is_err());
        // Agreeing lengths become one.
        let mut h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 5,\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(framing(&mut h, false).ok(), Some(Framing::Length(5)));
        let v: Vec<_> = h.headers.get_all(header::CONTENT_LENGTH).iter().map(|v| v.as_bytes().to_vec()).collect();
        assert_eq!(v, vec![b"5".to_vec()]);
        // No content: no framing headers passed on (a 304 keeps its length).
        let mut h = head(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(framing(&mut h, false).ok(), Some(Framing::Empty));
        assert!(!h.headers.contains_key(header::CONTENT_LENGTH) && te(&h).is_empty());
        let mut h = head(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(framing(&mut h, false).ok(), Some(Framing::Empty));
        assert!(h.headers.contains_key(header::CONTENT_LENGTH) && te(&h).is_empty());
    }

    #[test]
    fn blank_lines_and_odd_statuses() {
        assert_eq!(head(b"\r\n\r\nHTTP/1.1 200 OK\r\n\r\n").status.as_u16(), 200);
        let many = [&[b'\r', b'\n'].repeat(5)[..], b"HTTP/1.1 200 OK\r\n\r\n"].concat();
        assert!(head_may_end(&many, 0), "the parser gets to refuse it");
        assert!(parse_head(&many).is_err());
        assert!(!head_may_end(b"\r\n\r\n", 0), "no end of a head yet");
        let e = parse_head(b"HTTP/1.1 099 Odd\r\n\r\n").err().expect("refused");
        assert_eq!(e.esource(), &ErrorSource::Upstream, "a 502, counted against the upstream");
    }

    #[test]
    fn keepalive_follows_version_and_connection() {
        let ka = |raw: &[u8]| {
            let mut h = head(raw);
            let f = framing(&mut h, false).expect("framing");
            keepalive(&h, f)
        };
        assert!(ka(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(!ka(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: x, Close\r\n\r\n"));
        assert!(!ka(b"HTTP/1.1 200 OK\r\n\r\n"), "a body read to the close");
        assert!(!ka(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(ka(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"));
        assert!(!ka(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn keepalive_timeout_is_the_least_given() {
        let t = |raw: &[u8]| keepalive_timeout(&head(raw));
        assert_eq!(t(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\n\r\n"), Some(Duration::from_secs(5)));
        assert_eq!(
            t(b"HTTP/1.1 200 OK\r\nKeep-Alive: max=100, Timeout = 7\r\nkeep-alive: timeout=3\r\n\r\n"),
            Some(Duration::from_secs(3))
        );
        assert_eq!(t(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=\"4\"\r\n\r\n"), Some(Duration::from_secs(4)));
        assert_eq!(t(b"HTTP/1.1 200 OK\r\n\r\n"), None);
        assert_eq!(t(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=-1, timeout, timeout=1e3, max=5\r\n\r\n"), None);
        assert_eq!(t(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=99999999999999999999\r\n\r\n"), None);
    }

    #[test]
    fn bodies_decode_whatever_the_read_sizes() {
        let chunked = b"5;ext=1\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, 100] {
            let (body, rest) = decode(Framing::Chunked, chunked, step).expect("decodes");
            assert_eq!(body, b"hello world!", "step {step}");
            // Bytes after the body stay for the caller, which then does not reuse the connection.
            assert!(b"NEXT".starts_with(&rest), "step {step}: {rest:?}");
            let (body, rest) = decode(Framing::Length(5), b"helloNEXT", step).expect("decodes");
            assert_eq!(body, b"hello");
            assert!(b"NEXT".starts_with(&rest));
            let (body, _) = decode(Framing::Close, b"to the end", step).expect("decodes");
            assert_eq!(body, b"to the end");
        }
        assert_eq!(decode(Framing::Empty, b"", 1).expect("empty").0, b"");
    }

    #[test]
    fn broken_bodies_are_errors() {
        assert!(decode(Framing::Length(10), b"short", 2).is_err(), "closed before its length");
        assert!(decode(Framing::Chunked, b"5\r\nhello\r\n", 3).is_err(), "closed before the last chunk");
        assert!(decode(Framing::Chunked, b"5\r\nhelloXX0\r\n\r\n", 3).is_err(), "no CRLF after data");
        assert!(decode(Framing::Chunked, b"zz\r\n", 3).is_err());
        assert!(decode(Framing::Chunked, b"fffffffffffffffffff\r\n", 3).is_err(), "size overflows");
        assert!(decode(Framing::Chunked, b"0\r\nno colon\r\n\r\n", 3).is_err());
        assert!(
            decode(Framing::Chunked, b"5\r\nhello\r\n\r\nT: 1\r\n\r\n", 3).is_err(),
            "an empty size line is no last chunk"
        );
        assert!(decode(Framing::Chunked, b";ext\r\n", 3).is_err());
        for step in [1, 2, 3, 5, 100] {
            assert!(
                decode(Framing::Chunked, b"5;a\nb\r\nhello\r\n0\r\n\r\n", step).is_err(),
                "a bare LF in an extension, step {step}"
            );
        }
        let long_line = [b"1;".as_slice(), &[b'a'; MAX_CHUNK_LINE], b"\r\nx\r\n0\r\n\r\n"].concat();
        assert!(decode(Framing::Chunked, &long_line, 100_000).is_err(), "a long line read at once");
        let long_ext = [b"1;".as_slice(), &[b'a'; MAX_CHUNK_LINE]].concat();
        assert!(decode(Framing::Chunked, &long_ext, 512).is_err(), "endless chunk extension");
        let long_trailer = [b"0\r\nX: ".as_slice(), &[b'a'; MAX_TRAILERS + 10]].concat();
        assert!(decode(Framing::Chunked, &long_trailer, 4096).is_err(), "endless trailer");
    }
}
