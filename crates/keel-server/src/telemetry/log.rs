//! JSON log lines, written cheaply: one line per event, composed straight into a reused
//! buffer (no intermediate maps or re-parsing), handed to a bounded in-memory sink that a
//! dedicated thread writes out in batches.
//!
//! What a line holds: `timestamp`, `level`, the event's fields (`message` among them), the
//! fields of every enclosing span (inner ones win, the event's win over all), `span` (the
//! innermost span's name), `target`, and `trace_id` / `span_id` when the event is inside a
//! traced span.
//!
//! The sink never makes a caller wait on I/O and never grows without bound: past
//! [`SINK_BYTES`] waiting to be written, lines are dropped and counted. The writer thread
//! sleeps while there is nothing to write, and once woken collects for [`BATCH_WINDOW`]
//! before writing, so a busy server makes about a hundred `write`s a second rather than one
//! per line, and a request never wakes another thread for its log line.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Bytes of log lines held for the writer at most; past it lines are dropped.
pub(crate) const SINK_BYTES: usize = 4 << 20;
/// How long the writer collects lines after the first one arrives.
pub(crate) const BATCH_WINDOW: Duration = Duration::from_millis(10);

/// Where log lines wait for the writer thread. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Sink {
    inner: Arc<SinkInner>,
}

#[derive(Debug)]
struct SinkInner {
    state: Mutex<SinkState>,
    wake: Condvar,
    dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct SinkState {
    buf: Vec<u8>,
    closing: bool,
}

/// Stops the writer thread when dropped, after it has written everything queued.
#[derive(Debug)]
pub(crate) struct WriterGuard {
    sink: Sink,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    /// A sink and the thread that writes it to `out`.
    pub(crate) fn start<W>(out: W) -> std::io::Result<(Self, WriterGuard)>
    where
        W: std::io::Write + Send + 'static,
    {
        let sink = Self {
            inner: Arc::new(SinkInner {
                state: Mutex::new(SinkState::default()),
                wake: Condvar::new(),
                dropped: AtomicU64::new(0),
            }),
        };
        let writer = sink.clone();
        let thread = std::thread::Builder::new()
            .name("keel-log-writer".to_owned())
            .spawn(move || writer.write_loop(out))?;
        Ok((
            sink.clone(),
            WriterGuard {
                sink,
                thread: Some(thread),
            },
        ))
    }

    fn lock(&self) -> MutexGuard<'_, SinkState> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues whole lines; drops them (counted) when the sink is full.
    pub(crate) fn push(&self, lines: &[u8]) {
        let mut state = self.lock();
        if state.buf.len() + lines.len() > SINK_BYTES {
            drop(state);
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = state.buf.is_empty();
        state.buf.extend_from_slice(lines);
        drop(state);
        if was_empty {
            self.inner.wake.notify_one();
        }
    }

    /// Lines dropped so far because the sink was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    fn write_loop<W: std::io::Write>(&self, mut out: W) {
        let mut spare = Vec::new();
        loop {
            let mut state = self.lock();
            while state.buf.is_empty() && !state.closing {
                state = self
                    .inner
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.buf.is_empty() {
                return; // closing, and everything is written
            }
            if !state.closing {
                drop(state);
                std::thread::sleep(BATCH_WINDOW);
                state = self.lock();
            }
            std::mem::swap(&mut state.buf, &mut spare);
            drop(state);
            // A failed write (stdout closed) loses these lines; there is nowhere to say so.
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            spare.clear();
            if spare.capacity() > SINK_BYTES / 4 {
                spare.shrink_to(64 * 1024);
            }
        }
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.sink.lock().closing = true;
        self.sink.inner.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The human format's writer: a line is composed here and pushed whole when dropped.
#[derive(Debug)]
pub(crate) struct LineWriter {
    sink: Sink,
    buf: Vec<u8>,
}

impl std::io::Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.sink.push(&self.buf);
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Sink {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            sink: self.clone(),
            buf: Vec::with_capacity(256),
        }
    }
}

/// A span's fields, rendered as JSON values once when recorded.
#[derive(Debug, Default)]
struct SpanFields {
    /// Every rendered value, back to back.
    text: String,
    /// Each field's name and where its value is in `text`; a field recorded again points
    /// at its new value.
    fields: Vec<(&'static str, Range<usize>)>,
}

struct SpanVisitor<'a>(&'a mut SpanFields);

impl SpanVisitor<'_> {
    fn put(&mut self, field: &Field, render: impl FnOnce(&mut String)) {
        let start = self.0.text.len();
        render(&mut self.0.text);
        let range = start..self.0.text.len();
        let name = field.name();
        match self.0.fields.iter_mut().find(|(n, _)| *n == name) {
            Some((_, r)) => *r = range,
            None => self.0.fields.push((name, range)),
        }
    }
}

impl Visit for SpanVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, |out| debug_string(out, value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, |out| json_string(out, value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, |out| {
            let _ = write!(out, "{value}");
        });
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, |out| {
            let _ = write!(out, "{value}");
        });
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, |out| {
            out.push_str(if value { "true" } else { "false" })
        });
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, |out| json_f64(out, value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, |out| debug_string(out, &format_args!("{value}")));
    }
}

/// Names already written on a line, so an outer span's field of the same name is skipped.
struct Written {
    names: [&'static str; 48],
    len: usize,
}

impl Written {
    const fn new() -> Self {
        Self {
            names: [""; 48],
            len: 0,
        }
    }
    /// Whether `name` is new (and now remembered). Past the table's size every name is new:
    /// a line may then repeat a key, never lose one.
    fn first(&mut self, name: &'static str) -> bool {
        if self.names[..self.len].contains(&name) {
            return false;
        }
        if self.len < self.names.len() {
            self.names[self.len] = name;
            self.len += 1;
        }
        true
    }
}

/// An event's fields, written straight onto the line.
struct EventVisitor<'a> {
    line: &'a mut String,
    written: &'a mut Written,
}

impl EventVisitor<'_> {
    fn put(&mut self, field: &Field, render: impl FnOnce(&mut String)) {
        if !self.written.first(field.name()) {
            return;
        }
        self.line.push(',');
        json_string(self.line, field.name());
        self.line.push(':');
        render(self.line);
    }
}

impl Visit for EventVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, |out| debug_string(out, value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, |out| json_string(out, value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, |out| {
            let _ = write!(out, "{value}");
        });
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, |out| {
            let _ = write!(out, "{value}");
        });
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, |out| {
            out.push_str(if value { "true" } else { "false" })
        });
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, |out| json_f64(out, value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, |out| debug_string(out, &format_args!("{value}")));
    }
}

/// The JSON-lines layer.
#[derive(Debug)]
pub(crate) struct JsonLayer {
    sink: Sink,
    /// Trace ids come from OpenTelemetry's current context (when spans are exported)
    /// rather than from [`super::ids`].
    otel_ids: bool,
}

impl JsonLayer {
    pub(crate) fn new(sink: Sink, otel_ids: bool) -> Self {
        Self { sink, otel_ids }
    }
}

thread_local! {
    /// The line being composed, reused by every event on this thread.
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(1024));
}

impl<S> tracing_subscriber::Layer<S> for JsonLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = SpanFields {
            text: String::with_capacity(128),
            fields: Vec::with_capacity(attrs.fields().len()),
        };
        attrs.record(&mut SpanVisitor(&mut fields));
        span.extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(fields) = extensions.get_mut::<SpanFields>() {
            values.record(&mut SpanVisitor(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let compose = |line: &mut String| {
            line.clear();
            let meta = event.metadata();
            line.push_str("{\"timestamp\":\"");
            timestamp(line, time::OffsetDateTime::now_utc());
            line.push_str("\",\"level\":\"");
            line.push_str(meta.level().as_str());
            line.push('"');
            let mut written = Written::new();
            written.first("timestamp");
            written.first("level");
            written.first("target");
            written.first("span");
            written.first("trace_id");
            written.first("span_id");
            event.record(&mut EventVisitor {
                line,
                written: &mut written,
            });
            let mut innermost = None;
            let mut ids = None;
            if let Some(scope) = ctx.event_scope(event) {
                for span in scope {
                    let extensions = span.extensions();
                    if innermost.is_none() {
                        innermost = Some(span.name());
                        ids = extensions.get::<super::ids::TraceIds>().copied();
                    }
                    if let Some(fields) = extensions.get::<SpanFields>() {
                        for (name, range) in &fields.fields {
                            if *name == super::ids::TRACEPARENT_FIELD || !written.first(name) {
                                continue;
                            }
                            line.push(',');
                            json_string(line, name);
                            line.push(':');
                            line.push_str(fields.text.get(range.clone()).unwrap_or("null"));
                        }
                    }
                }
            }
            if let Some(name) = innermost {
                line.push_str(",\"span\":");
                json_string(line, name);
            }
            line.push_str(",\"target\":");
            json_string(line, meta.target());
            let ids = if self.otel_ids {
                super::otel_ids()
            } else {
                ids.map(|i| (i.trace, i.span))
            };
            if let Some((trace, span)) = ids {
                let _ = write!(
                    line,
                    ",\"trace_id\":\"{trace:032x}\",\"span_id\":\"{span:016x}\""
                );
            }
            line.push_str("}\n");
            self.sink.push(line.as_bytes());
        };
        // A log call made while composing (there is none today) gets a line of its own.
        let reused = LINE.try_with(|cell| match cell.try_borrow_mut() {
            Ok(mut line) => {
                compose(&mut line);
                if line.capacity() > 64 * 1024 {
                    *line = String::with_capacity(1024);
                }
                true
            }
            Err(_) => false,
        });
        if !matches!(reused, Ok(true)) {
            compose(&mut String::new());
        }
    }
}

/// `2026-12-02T00:59:35.872742931Z`.
fn timestamp(out: &mut String, t: time::OffsetDateTime) {
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond()
    );
}

fn json_f64(out: &mut String, value: f64) {
    if value.is_finite() {
        let _ = write!(out, "{value}");
    } else {
        out.push_str("null");
    }
}

/// A `Debug` (or `Display` through `format_args!`) value as a JSON string.
fn debug_string(out: &mut String, value: &dyn std::fmt::Debug) {
    out.push('"');
    let _ = write!(Escaper(out), "{value:?}");
    out.push('"');
}

/// `s` as a JSON string.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    escape_into(out, s);
    out.push('"');
}

/// Escapes what formatting writes into it, piece by piece.
struct Escaper<'a>(&'a mut String);

impl std::fmt::Write for Escaper<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        escape_into(self.0, s);
        Ok(())
    }
}

/// Appends `s` escaped for a JSON string: quotes, backslashes and control characters.
fn escape_into(out: &mut String, s: &str) {
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0..=0x1f | 0x7f => None,
            _ => continue,
        };
        out.push_str(&s[start..i]);
        match escape {
            Some(e) => out.push_str(e),
            None => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_json_requires() {
        let mut out = String::new();
        json_string(&mut out, "a\"b\\c\nd\u{1}é\u{7f}");
        let back: String = serde_json::from_str(&out).unwrap();
        assert_eq!(back, "a\"b\\c\nd\u{1}é\u{7f}");
        let mut out = String::new();
        debug_string(&mut out, &format_args!("x={}", "\"q\""));
        assert_eq!(
            serde_json::from_str::<String>(&out).unwrap(),
            "x=\"q\"",
            "{out}"
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_nanoseconds() {
        let mut out = String::new();
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(1_764_636_000_000_000_042).unwrap();
        timestamp(&mut out, t);
        assert_eq!(out, "2025-12-02T00:40:00.000000042Z");
        time::OffsetDateTime::parse(&out, &time::format_description::well_known::Rfc3339).unwrap();
    }

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_carry_event_and_span_fields_inner_ones_winning() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let out = Shared::default();
        let (sink, guard) = Sink::start(out.clone()).unwrap();
        let subscriber = tracing_subscriber::registry()
            .with(super::super::ids::IdsLayer)
            .with(JsonLayer::new(sink, false));
        tracing::subscriber::with_default(subscriber, || {
            let outer = tracing::info_span!(
                "outer",
                request_id = "r1",
                shared = "outer",
                late = tracing::field::Empty,
                traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            );
            let _o = outer.enter();
            outer.record("late", 7u64);
            let inner = tracing::info_span!("inner", shared = "inner", ratio = 0.5);
            let _i = inner.enter();
            tracing::info!(shared = "event", n = -3i64, ok = true, "hello \"world\"");
        });
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["message"], "hello \"world\"");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["shared"], "event", "the event's field wins: {line}");
        assert_eq!(line["request_id"], "r1");
        assert_eq!(line["late"], 7);
        assert_eq!(line["ratio"], 0.5);
        assert_eq!(line["n"], -3);
        assert_eq!(line["ok"], true);
        assert_eq!(line["span"], "inner");
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(line["span_id"].as_str().unwrap().len(), 16);
        assert!(line.get("traceparent").is_none(), "{line}");
        assert_eq!(text.matches("\"shared\"").count(), 1, "{text}");
        assert!(line["timestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn a_full_sink_drops_and_counts_instead_of_growing() {
        // A writer that never finishes its first write holds everything after it.
        struct Stuck(std::sync::mpsc::Receiver<()>);
        impl std::io::Write for Stuck {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let _ = self.0.recv();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (release, stuck) = std::sync::mpsc::channel();
        let (sink, guard) = Sink::start(Stuck(stuck)).unwrap();
        let line = vec![b'x'; 1024];
        for _ in 0..(2 * SINK_BYTES / line.len()) + 64 {
            sink.push(&line);
        }
        assert!(sink.dropped() > 0, "a full sink drops");
        assert!(sink.lock().buf.len() <= SINK_BYTES);
        drop(release);
        drop(guard);
    }
}
