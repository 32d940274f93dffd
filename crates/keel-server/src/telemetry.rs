//! The one place that sets up logs, traces and metrics for the process.
//!
//! - Logs: JSON lines on stdout (or a human format), each with the fields of the spans
//!   it happened in (request_id, …) and the OpenTelemetry trace_id / span_id.
//! - Traces: every span feeds an OpenTelemetry tracer, so trace ids exist even when
//!   nothing is exported; with `telemetry.otlp_endpoint` set, spans are exported over
//!   OTLP/HTTP by a background batch processor with a bounded queue — a slow or dead
//!   collector drops spans, it never slows or fails a request.
//! - Metrics: one Prometheus recorder per process, rendered at GET /metrics.
//!
//! Nothing else in Keel installs a subscriber, a recorder or a panic hook.

use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use keel_core::config::{self, LogFormat};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{BatchConfigBuilder, SdkTracerProvider};
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
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

/// The log writer's count of lines it dropped because its buffer was full.
static LOG_DROPS: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();

/// Brings `keel_log_lines_dropped_total` up to date (called as /metrics is rendered).
pub(crate) fn record_log_drops() {
    if let Some(counter) = LOG_DROPS.get() {
        metrics::counter!("keel_log_lines_dropped_total")
            .absolute(u64::try_from(counter.dropped_lines()).unwrap_or(u64::MAX));
    }
}

/// Running telemetry; call [`Telemetry::shutdown`] at exit to flush spans and logs.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
    /// Flushes the log writer thread when dropped.
    _logs: tracing_appender::non_blocking::WorkerGuard,
}

/// Installs the global subscriber (logs + traces), the metrics recorder and the panic hook.
/// Must run inside a tokio runtime when an OTLP endpoint is configured.
pub fn init(config: &config::Telemetry) -> Result<Telemetry, Error> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => env,
        _ => config.log_level.clone(),
    };
    let filter = EnvFilter::builder()
        .parse(&filter)
        .map_err(|e| Error::Filter(filter.clone(), e.to_string()))?;

    let provider = tracer_provider(config)?;
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("keel"));

    // Log lines go to stdout from a dedicated thread through a bounded buffer, so a request
    // never waits on a write syscall; if stdout stalls and the buffer fills, lines are
    // dropped (and counted by the appender) rather than slowing requests.
    let (stdout, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(4_096)
        .lossy(true)
        .thread_name("keel-log-writer")
        .finish(std::io::stdout());
    let _ = LOG_DROPS.set(stdout.error_counter());
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let result = match config.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .fmt_fields(JsonFields::new())
                    .event_format(JsonLines)
                    .with_writer(stdout),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(tracing_subscriber::fmt::layer().with_writer(stdout))
            .try_init(),
    };
    result.map_err(|_| Error::AlreadyInitialised)?;

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

/// One JSON object per line: timestamp, level, message, target, the event's fields, the
/// fields of every enclosing span (outermost first, inner ones win), trace_id and span_id.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut obj = Map::with_capacity(12);
        let now = time::OffsetDateTime::now_utc();
        let timestamp = now
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|_| fmt::Error)?;
        obj.insert("timestamp".into(), timestamp.into());
        obj.insert("level".into(), meta.level().as_str().into());

        if let Some(scope) = ctx.event_scope() {
            let mut innermost = None;
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<FormattedFields<N>>()
                    && let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields)
                {
                    obj.extend(fields);
                }
                innermost = Some(span.name());
            }
            if let Some(name) = innermost {
                obj.insert("span".into(), name.into());
            }
        }

        let mut visitor = JsonVisitor(Map::new());
        event.record(&mut visitor);
        obj.extend(visitor.0);
        obj.insert("target".into(), meta.target().into());

        let cx = opentelemetry::Context::current();
        let span = cx.span();
        let sc = span.span_context();
        if sc.is_valid() {
            obj.insert("trace_id".into(), sc.trace_id().to_string().into());
            obj.insert("span_id".into(), sc.span_id().to_string().into());
        }

        let line = serde_json::to_string(&obj).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

struct JsonVisitor(Map<String, Value>);

impl Visit for JsonVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
}

/// The trace id of the current span (32 hex digits), if it is traced.
#[must_use]
pub fn current_trace_id() -> Option<String> {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}
