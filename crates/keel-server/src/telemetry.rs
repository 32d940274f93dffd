//! The one place that sets up logs, traces and metrics for the process.
//!
//! - Logs: JSON lines on stdout (or a human format), each with the fields of the spans
//!   it happened in (request_id, …) and the trace_id / span_id (`log`: composed in place,
//!   written in batches by one thread from a bounded buffer).
//! - Traces: every span has a trace id and a span id. With `telemetry.otlp_endpoint` set,
//!   every span feeds an OpenTelemetry tracer and is exported over OTLP/HTTP by a
//!   background batch processor with a bounded queue — a slow or dead collector drops
//!   spans, it never slows or fails a request. Without it, no OpenTelemetry span is built
//!   (`ids` assigns the ids alone), since building spans only to drop them was the
//!   largest cost of a request's telemetry.
//! - Metrics: one Prometheus recorder per process, rendered at GET /metrics.
//!
//! Nothing else in Keel installs a subscriber, a recorder or a panic hook.

use std::sync::OnceLock;
use std::time::Duration;

use keel_core::config::{self, LogFormat};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{BatchConfigBuilder, SdkTracerProvider};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log filter does not parse.
    #[error(
        "telemetry.log_level {0:?} is not a valid filter (e.g. \"info\" or \"keel=debug,sqlx=warn\"): {1}"
    )]
    Filter(String, String),
    /// The OTLP exporter could not be built.
    #[error("cannot set up OTLP export: {0}")]
    Otlp(String),
    /// The log writer thread could not start.
    #[error("cannot start the log writer: {0}")]
    Writer(String),
    /// A global subscriber was already installed.
    #[error("logging was already initialised")]
    AlreadyInitialised,
}

/// Buckets for HTTP latency, in seconds: fine-grained below 10 ms, where Keel's own
/// overhead lives, coarse above, where upstream calls do.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// The process's Prometheus handle, installing the recorder on first use.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = match builder
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
            {
                Ok(b) => b,
                Err(_) => PrometheusBuilder::new(),
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed; Keel installs none elsewhere.
            let _ = metrics::set_global_recorder(recorder);
            describe_metrics();
            handle
        })
        .clone()
}

fn describe_metrics() {
    metrics::describe_counter!(
        "keel_http_requests_total",
        "HTTP requests served, by method, matched route and status."
    );
    metrics::describe_histogram!(
        "keel_http_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time from request received to response headers, by method, matched route and status."
    );
    metrics::describe_counter!(
        "keel_http_panics_total",
        "Handler panics caught and answered with 500."
    );
}

/// Checks a log filter the way `init` will parse it.
pub fn check_filter(filter: &str) -> Result<(), Error> {
    EnvFilter::builder()
        .parse(filter)
        .map(|_| ())
        .map_err(|e| Error::Filter(filter.to_owned(), e.to_string()))
}

mod ids;
mod log;

/// The log sink, for its count of dropped lines.
static LOG_SINK: OnceLock<log::Sink> = OnceLock::new();
/// Whether spans are exported (OpenTelemetry assigns the ids) or not ([`ids`] does).
static EXPORTING: OnceLock<bool> = OnceLock::new();

/// Whether spans go to an OTLP collector; then OpenTelemetry's layer owns trace context.
pub(crate) fn exporting() -> bool {
    EXPORTING.get().copied().unwrap_or(false)
}

/// Brings `keel_log_lines_dropped_total` up to date (called as /metrics is rendered).
pub(crate) fn record_log_drops() {
    if let Some(sink) = LOG_SINK.get() {
        metrics::counter!("keel_log_lines_dropped_total").absolute(sink.dropped());
    }
}

/// Running telemetry; call [`Telemetry::shutdown`] at exit to flush spans and logs.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
    /// Writes out what is queued and stops the log writer thread when dropped.
    _logs: log::WriterGuard,
}

/// Installs the global subscriber (logs + traces), the metrics recorder and the panic hook.
/// Must run inside a tokio runtime when an OTLP endpoint is configured.
///
/// Without an OTLP endpoint no OpenTelemetry spans are built at all (they would only be
/// dropped): a light layer gives spans their trace and span ids instead.
pub fn init(config: &config::Telemetry) -> Result<Telemetry, Error> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => env,
        _ => config.log_level.clone(),
    };
    let filter = EnvFilter::builder()
        .parse(&filter)
        .map_err(|e| Error::Filter(filter.clone(), e.to_string()))?;

    let exporting = config.otlp_endpoint.is_some();
    let _ = EXPORTING.set(exporting);
    let provider = tracer_provider(config)?;
    let otel =
        exporting.then(|| tracing_opentelemetry::layer().with_tracer(provider.tracer("keel")));
    let ids = (!exporting).then_some(ids::IdsLayer);

    // Log lines go to stdout from a dedicated thread through a bounded buffer, so a request
    // never waits on a write syscall (nor wakes that thread); if stdout stalls and the
    // buffer fills, lines are dropped and counted rather than slowing requests.
    let (sink, guard) =
        log::Sink::start(std::io::stdout()).map_err(|e| Error::Writer(e.to_string()))?;
    let _ = LOG_SINK.set(sink.clone());
    let json = matches!(config.log_format, LogFormat::Json)
        .then(|| log::JsonLayer::new(sink.clone(), exporting));
    let pretty = matches!(config.log_format, LogFormat::Pretty)
        .then(|| tracing_subscriber::fmt::layer().with_writer(sink));
    tracing_subscriber::registry()
        .with(filter)
        .with(otel)
        .with(ids)
        .with(json)
        .with(pretty)
        .try_init()
        .map_err(|_| Error::AlreadyInitialised)?;

    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(panic.message = %message, panic.location = %location, "panic");
    }));

    metrics();
    Ok(Telemetry {
        provider,
        _logs: guard,
    })
}

fn tracer_provider(config: &config::Telemetry) -> Result<SdkTracerProvider, Error> {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = &config.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint.clone())
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(config.otlp_timeout)
            .build()
            .map_err(|e| Error::Otlp(e.to_string()))?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(4096)
            .with_max_export_batch_size(512)
            .with_scheduled_delay(Duration::from_secs(1))
            .with_max_export_timeout(config.otlp_timeout)
            .build();
        let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio)
            .with_batch_config(batch)
            .build();
        builder = builder.with_span_processor(processor);
    }
    Ok(builder.build())
}

impl Telemetry {
    /// Flushes and stops span export, waiting at most `timeout`.
    pub async fn shutdown(self, timeout: Duration) {
        let provider = self.provider;
        // `shutdown` blocks its thread until the exporter is done; keep it off the runtime.
        let flush = tokio::task::spawn_blocking(move || provider.shutdown());
        if tokio::time::timeout(timeout, flush).await.is_err() {
            tracing::warn!(
                ?timeout,
                "span export did not finish before the shutdown timeout"
            );
        }
    }
}

/// The current OpenTelemetry span's trace and span ids, when it is sampled.
fn otel_ids() -> Option<(u128, u64)> {
    let cx = opentelemetry::Context::current();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        (
            u128::from_be_bytes(sc.trace_id().to_bytes()),
            u64::from_be_bytes(sc.span_id().to_bytes()),
        )
    })
}

/// The trace id of the current span (32 hex digits), if it is traced.
#[must_use]
pub fn current_trace_id() -> Option<String> {
    let span = tracing::Span::current();
    if !exporting() {
        return ids::of(&span).map(|ids| format!("{:032x}", ids.trace));
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = span.context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}
