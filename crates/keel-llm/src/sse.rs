//! A minimal server-sent-events reader: turns a byte stream into the `data` of each event.
//! Only what LLM streams use: `data:` lines (joined with `\n`), `event:` names, comments
//! and blank-line event boundaries; `\n` and `\r\n` line ends.

use bytes::{Buf, BytesMut};

/// One event: its `event:` name (if any) and its `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field.
    pub name: Option<String>,
    /// The `data:` lines, joined.
    pub data: String,
}

/// Accumulates bytes and yields complete events.
#[derive(Debug, Default)]
pub struct Reader {
    buf: BytesMut,
    name: Option<String>,
    data: Option<String>,
}

impl Reader {
    /// The most bytes one event may take before the stream is declared invalid.
    pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

    /// Adds bytes from the wire.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Whether the buffered, incomplete event is over the size limit.
    #[must_use]
    pub fn overflowed(&self) -> bool {
        self.buf.len() + self.data.as_ref().map_or(0, String::len) > Self::MAX_EVENT_BYTES
    }

    /// The next complete event, if one is buffered.
    pub fn next_event(&mut self) -> Option<Event> {
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line = &self.buf[..end];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            let line = String::from_utf8_lossy(line).into_owned();
            self.buf.advance(end + 1);
            if line.is_empty() {
                if let Some(data) = self.data.take() {
                    return Some(Event {
                        name: self.name.take(),
                        data,
                    });
                }
                self.name = None;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line.as_str(), ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "data" => match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => self.data = Some(value.to_owned()),
                },
                "event" => self.name = Some(value.to_owned()),
                _ => {}
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_that_never_ends_overflows() {
        let mut r = Reader::default();
        let line = format!("data: {}\n", "x".repeat(1024));
        for _ in 0..5000 {
            r.push(line.as_bytes());
            assert_eq!(r.next_event(), None);
        }
        assert!(
            r.overflowed(),
            "data lines without a blank line count against the limit"
        );
    }

    #[test]
    fn events_split_across_reads_are_reassembled() {
        let mut r = Reader::default();
        r.push(b": keep-alive\n\ndata: {\"a\"");
        assert_eq!(r.next_event(), None);
        r.push(b":1}\r\n\r\nevent: ping\ndata: x\ndata: y\n\ndata: [DONE]\n\n");
        assert_eq!(r.next_event().unwrap().data, "{\"a\":1}");
        let e = r.next_event().unwrap();
        assert_eq!((e.name.as_deref(), e.data.as_str()), (Some("ping"), "x\ny"));
        assert_eq!(r.next_event().unwrap().data, "[DONE]");
        assert_eq!(r.next_event(), None);
    }
}
