//! Server-sent events framing for upstream streams.
//!
//! Upstream bytes arrive in arbitrary pieces; [`SseFramer`] cuts them at event boundaries
//! (a blank line) so each event can be forwarded whole, inspected for usage, or translated.
//! Written here rather than taken from a crate because the hot path wants the event's
//! original bytes (zero-copy slices of one buffer) rather than re-encoded `String`s.

use bytes::{Buf, Bytes, BytesMut};

/// The longest event we accept before declaring the upstream broken: far above any real
/// chunk, small enough that a stream without separators cannot grow memory without bound.
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// Splits a byte stream into SSE events.
#[derive(Default)]
pub struct SseFramer {
    buf: BytesMut,
    /// How far `buf` has already been searched for a boundary.
    scanned: usize,
}

/// The framer gave up on a stream.
#[derive(Debug, PartialEq, Eq)]
pub struct EventTooLarge;

impl SseFramer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes received from upstream.
    ///
    /// # Errors
    /// [`EventTooLarge`] when an event grows past [`MAX_EVENT_BYTES`].
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), EventTooLarge> {
        self.buf.extend_from_slice(chunk);
        if self.buf.len() > MAX_EVENT_BYTES && self.find_boundary().is_none() {
            return Err(EventTooLarge);
        }
        Ok(())
    }

    /// The next complete event, including its terminating blank line.
    pub fn next_event(&mut self) -> Option<Bytes> {
        let end = self.find_boundary()?;
        self.scanned = 0;
        Some(self.buf.split_to(end).freeze())
    }

    /// Whatever is left when the upstream closed: a final event missing its blank line.
    pub fn finish(&mut self) -> Option<Bytes> {
        let rest = self.buf.split().freeze();
        self.scanned = 0;
        (!rest.iter().all(u8::is_ascii_whitespace)).then_some(rest)
    }

    fn find_boundary(&mut self) -> Option<usize> {
        let bytes = &self.buf[..];
        // Resume one byte back: "\n" + "\n" may straddle two pushes.
        let from = self.scanned.saturating_sub(3);
        let mut i = from;
        while let Some(pos) = memchr::memchr(b'\n', &bytes[i..]) {
            let nl = i + pos;
            let next = &bytes[nl + 1..];
            if next.first() == Some(&b'\n') {
                return Some(nl + 2);
            }
            if next.starts_with(b"\r\n") {
                return Some(nl + 3);
            }
            i = nl + 1;
        }
        self.scanned = bytes.len();
        None
    }

    /// Bytes buffered but not yet returned as an event.
    pub fn pending(&self) -> usize {
        self.buf.remaining()
    }
}

/// One parsed event: its `event:` name and its `data:` payload (lines joined by `\n`).
#[derive(Debug, PartialEq, Eq)]
pub struct Event<'a> {
    pub name: Option<&'a str>,
    pub data: std::borrow::Cow<'a, str>,
}

/// Parses the fields of one framed event. Comments (`:`) and unknown fields are skipped.
pub fn parse_event(raw: &[u8]) -> Option<Event<'_>> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut name = None;
    let mut data: Option<std::borrow::Cow<'_, str>> = None;
    for line in text.lines() {
        let (field, value) = match line.split_once(':') {
            Some(("", _)) => continue,
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => name = Some(value),
            "data" => {
                data = Some(match data {
                    None => std::borrow::Cow::Borrowed(value),
                    Some(prev) => std::borrow::Cow::Owned(format!("{prev}\n{value}")),
                })
            }
            _ => {}
        }
    }
    data.map(|data| Event { name, data })
}

/// Frames a JSON payload as one `data:` event.
pub fn data_event(json: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The OpenAI end-of-stream marker.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_pushes_are_reassembled() {
        let stream = b"data: {\"a\":1}\n\ndata: {\"b\":2}\r\n\r\nevent: x\ndata: y\n\n";
        for cut in 0..stream.len() {
            let mut framer = SseFramer::new();
            let mut events = Vec::new();
            for piece in [&stream[..cut], &stream[cut..]] {
                framer.push(piece).unwrap();
                while let Some(ev) = framer.next_event() {
                    events.push(ev);
                }
            }
            assert_eq!(events.len(), 3, "cut at {cut}");
            assert_eq!(&events[0][..], b"data: {\"a\":1}\n\n");
            let third = parse_event(&events[2]).unwrap();
            assert_eq!(third.name, Some("x"));
            assert_eq!(third.data, "y");
        }
    }

    #[test]
    fn byte_by_byte_framing() {
        let stream = b"data: one\n\n: comment\ndata: two\ndata: three\n\n";
        let mut framer = SseFramer::new();
        let mut events = Vec::new();
        for b in stream {
            framer.push(&[*b]).unwrap();
            while let Some(ev) = framer.next_event() {
                events.push(ev);
            }
        }
        assert_eq!(events.len(), 2);
        assert_eq!(parse_event(&events[1]).unwrap().data, "two\nthree");
        assert!(framer.finish().is_none());
    }

    #[test]
    fn unterminated_tail_is_returned_by_finish() {
        let mut framer = SseFramer::new();
        framer.push(b"data: [DONE]").unwrap();
        assert!(framer.next_event().is_none());
        assert_eq!(&framer.finish().unwrap()[..], b"data: [DONE]");
    }

    #[test]
    fn endless_event_is_refused() {
        let mut framer = SseFramer::new();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert_eq!(framer.push(&big), Err(EventTooLarge));
    }

    proptest::proptest! {
        /// However the upstream's bytes are cut into pieces, the same events come out,
        /// byte for byte, in order.
        #[test]
        fn framing_does_not_depend_on_how_bytes_arrive(
            payloads in proptest::collection::vec("[ -~]{0,40}", 1..12),
            crlf in proptest::bool::ANY,
            cuts in proptest::collection::vec(0usize..2000, 0..8),
        ) {
            let end: &[u8] = if crlf { b"\r\n\r\n" } else { b"\n\n" };
            let events: Vec<Vec<u8>> = payloads
                .iter()
                .map(|p| [b"data: ".as_slice(), p.as_bytes(), end].concat())
                .collect();
            let stream = events.concat();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.sort_unstable();
            let mut framer = SseFramer::new();
            let mut seen = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([stream.len()]) {
                framer.push(&stream[from..cut]).unwrap();
                from = cut;
                while let Some(ev) = framer.next_event() {
                    seen.push(ev.to_vec());
                }
            }
            proptest::prop_assert_eq!(seen, events);
            proptest::prop_assert!(framer.finish().is_none());
        }
    }
}
