//! Trace and span ids for every span when no spans are exported.
//!
//! Logs and events carry a `trace_id` (and logs a `span_id`) whether or not an OTLP
//! collector is configured. Without one, building OpenTelemetry spans only to drop them
//! costs more than the rest of a request's logging, so this layer gives each span its ids
//! and nothing else: a root span starts a trace (continuing the W3C `traceparent` recorded
//! in its [`TRACEPARENT_FIELD`] field, when there is one), a child span inherits its
//! parent's trace. With export configured, OpenTelemetry's layer does this instead.

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Span, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// A span field holding an incoming W3C `traceparent` header to continue; not logged.
pub(crate) const TRACEPARENT_FIELD: &str = "traceparent";

/// A span's ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TraceIds {
    pub(crate) trace: u128,
    pub(crate) span: u64,
}

/// The layer that assigns [`TraceIds`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct IdsLayer;

impl<S> tracing_subscriber::Layer<S> for IdsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let inherited = span
            .parent()
            .and_then(|p| p.extensions().get::<TraceIds>().map(|t| t.trace));
        let trace = inherited
            .or_else(|| {
                let mut remote = Remote(None);
                attrs.record(&mut remote);
                remote.0
            })
            .unwrap_or_else(|| fastrand::u128(1..));
        span.extensions_mut().insert(TraceIds {
            trace,
            span: fastrand::u64(1..),
        });
    }
}

/// Finds a valid `traceparent` field and keeps its trace id.
struct Remote(Option<u128>);

impl Visit for Remote {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == TRACEPARENT_FIELD {
            self.0 = parse_traceparent(value);
        }
    }
    fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if it is valid:
/// a known layout, and neither id all zeros.
pub(crate) fn parse_traceparent(value: &str) -> Option<u128> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(version, 2) || version.eq_ignore_ascii_case("ff") || !hex(flags, 2) {
        return None;
    }
    // Version 00 has exactly four parts; later versions may add more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if !hex(trace, 32) || !hex(parent, 16) {
        return None;
    }
    let trace = u128::from_str_radix(trace, 16).ok()?;
    let parent = u64::from_str_radix(parent, 16).ok()?;
    (trace != 0 && parent != 0).then_some(trace)
}

/// The ids of `span`, if this layer is installed and the span is enabled.
pub(crate) fn of(span: &Span) -> Option<TraceIds> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
        let span = registry.span(id)?;
        span.extensions().get::<TraceIds>().copied()
    })
    .flatten()
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn traceparents_are_parsed_strictly() {
        assert_eq!(
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736)
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn children_share_their_root_trace_and_roots_differ() {
        let subscriber = tracing_subscriber::registry().with(IdsLayer);
        tracing::subscriber::with_default(subscriber, || {
            let root = tracing::info_span!("root");
            let child = root.in_scope(|| tracing::info_span!("child"));
            let (r, c) = (of(&root).unwrap(), of(&child).unwrap());
            assert_eq!(r.trace, c.trace);
            assert_ne!(r.span, c.span);
            let other = tracing::info_span!(parent: None, "other");
            assert_ne!(of(&other).unwrap().trace, r.trace);
            let continued = tracing::info_span!(
                parent: None,
                "continued",
                traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            );
            assert_eq!(
                of(&continued).unwrap().trace,
                0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c
            );
        });
    }
}
