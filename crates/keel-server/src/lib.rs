//! Keel's HTTP server: the `/v1` API, health probes, metrics and the OpenAPI document,
//! with one error format (RFC 9457 problem+json) and one auth mechanism.
//!
//! This is the only crate that knows HTTP. It must never hold a lock across `.await`,
//! never answer a caller's mistake with a 5xx, and never send internals to a client.
//!
//! Entry points: [`app`] builds the router (used directly by `oneshot` tests);
//! [`Server`] binds it and serves until shutdown, draining in-flight requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::serve::ListenerExt as _;
use keel_core::auth::Role;
use keel_core::config::Config;
use keel_store::Store;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub mod auth;
pub mod error;
pub mod events;
pub mod extract;
pub mod gateway;
mod generator;
pub mod middleware;
pub mod mock_llm;
pub mod nats;
pub mod runtime;
pub mod schemas;
pub mod telemetry;
pub mod usage;
pub mod webhooks;

mod routes;

/// What a server is made of.
#[derive(Debug)]
pub struct Parts {
    /// The opened, migrated store.
    pub store: Arc<dyn Store>,
    /// The effective config.
    pub config: Arc<Config>,
    /// The gateway's routing table.
    pub router: Arc<keel_llm::Router>,
    /// Where usage records go.
    pub usage: usage::Recorder,
    /// The response cache; `None` when `cache.enabled` is false.
    pub cache: Option<Arc<keel_llm::cache::ResponseCache>>,
    /// The event log.
    pub events: events::EventLog,
    /// The agent runtime.
    pub runtime: keel_runtime::Runtime,
    /// Cancelled to stop the server; readiness reports 503 from then on.
    pub shutdown: CancellationToken,
}

/// Shared state of the server; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    config: Arc<Config>,
    router: Arc<keel_llm::Router>,
    usage: usage::Recorder,
    cache: Option<Arc<keel_llm::cache::ResponseCache>>,
    key_cache: auth::KeyCache,
    metrics: PrometheusHandle,
    openapi_json: std::sync::OnceLock<axum::body::Bytes>,
    events: events::EventLog,
    runtime: keel_runtime::Runtime,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("store", &self.inner.store)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// The state of a server over its parts.
    pub fn new(parts: Parts) -> Self {
        Self {
            inner: Arc::new(Inner {
                store: parts.store,
                key_cache: auth::KeyCache::new(parts.config.server.key_cache_ttl),
                config: parts.config,
                router: parts.router,
                usage: parts.usage,
                cache: parts.cache,
                metrics: telemetry::metrics(),
                openapi_json: std::sync::OnceLock::new(),
                events: parts.events,
                runtime: parts.runtime,
                shutdown: parts.shutdown,
            }),
        }
    }

    /// The store.
    pub fn store(&self) -> &dyn Store {
        self.inner.store.as_ref()
    }

    /// The effective config.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The gateway's routing table.
    pub fn router(&self) -> &keel_llm::Router {
        &self.inner.router
    }

    pub(crate) fn cache(&self) -> Option<&keel_llm::cache::ResponseCache> {
        self.inner.cache.as_deref()
    }

    /// The cache, owned, for streams that outlive the handler.
    pub(crate) fn inner_cache(&self) -> Option<Arc<keel_llm::cache::ResponseCache>> {
        self.inner.cache.clone()
    }

    pub(crate) fn key_cache(&self) -> &auth::KeyCache {
        &self.inner.key_cache
    }

    pub(crate) fn usage(&self) -> &usage::Recorder {
        &self.inner.usage
    }

    pub(crate) fn metrics(&self) -> &PrometheusHandle {
        &self.inner.metrics
    }

    /// The event log.
    pub fn events(&self) -> &events::EventLog {
        &self.inner.events
    }

    /// The agent runtime.
    pub fn runtime(&self) -> &keel_runtime::Runtime {
        &self.inner.runtime
    }

    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    pub(crate) fn openapi_json(&self) -> axum::body::Bytes {
        self.inner.openapi_json.get().cloned().unwrap_or_default()
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Keel",
        description = "A production runtime for AI agents. Errors are RFC 9457 problem+json; every \
                       response carries `x-request-id`."
    ),
    tags(
        (name = "ops", description = "Health, readiness, metrics, API description"),
        (name = "workspaces", description = "Workspaces (tenants)"),
        (name = "keys", description = "API keys"),
        (name = "gateway", description = "OpenAI-compatible LLM gateway"),
        (name = "events", description = "The event log: live streams, history, schemas"),
        (name = "agents", description = "Agents: versioned specs and their status"),
        (name = "tasks", description = "Tasks, threads and the dead-letter queue"),
    ),
    modifiers(&BearerAuth),
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("keel_<43 characters>")
                    .description(Some("An API key from `keel keys create` or POST /v1/keys."))
                    .build(),
            ),
        );
    }
}

/// Routes that need at least `role`, behind the one auth middleware.
fn protected(
    state: &AppState,
    role: Role,
    routes: OpenApiRouter<AppState>,
) -> OpenApiRouter<AppState> {
    routes.layer(axum::middleware::from_fn_with_state(
        (state.clone(), role),
        auth::require,
    ))
}

/// Builds the whole HTTP application over `state`.
pub fn app(state: AppState) -> Router {
    let viewer = OpenApiRouter::new()
        .routes(routes!(routes::workspaces::current))
        .routes(routes!(routes::gateway::models))
        .routes(routes!(routes::usage::usage))
        .routes(routes!(routes::events::events))
        .routes(routes!(routes::events::schemas))
        .routes(routes!(routes::ws::ws))
        .routes(routes!(routes::webhooks::list))
        .routes(routes!(routes::webhooks::get))
        .routes(routes!(routes::webhooks::deliveries))
        .routes(routes!(routes::agents::list))
        .routes(routes!(routes::agents::get))
        .routes(routes!(routes::agents::status))
        .routes(routes!(routes::tasks::list))
        .routes(routes!(routes::tasks::get))
        .routes(routes!(routes::tasks::steps))
        .routes(routes!(routes::tasks::messages))
        .routes(routes!(routes::tasks::dead_letters));
    let member = OpenApiRouter::new()
        .routes(routes!(routes::gateway::chat_completions))
        .routes(routes!(routes::gateway::embeddings))
        .routes(routes!(routes::tasks::create))
        .routes(routes!(routes::tasks::cancel))
        .routes(routes!(routes::tasks::input))
        .routes(routes!(routes::tasks::create_thread))
        .routes(routes!(routes::tasks::replay))
        .routes(routes!(routes::tasks::discard));
    let admin = OpenApiRouter::new()
        .routes(routes!(routes::keys::create, routes::keys::list))
        .routes(routes!(routes::keys::revoke))
        .routes(routes!(routes::events::ping))
        .routes(routes!(routes::webhooks::create))
        .routes(routes!(routes::webhooks::delete))
        .routes(routes!(routes::webhooks::redeliver))
        .routes(routes!(routes::agents::create))
        .routes(routes!(routes::agents::update))
        .routes(routes!(routes::agents::delete))
        .routes(routes!(routes::agents::reload));

    let (router, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(routes::system::healthz))
        .routes(routes!(routes::system::readyz))
        .routes(routes!(routes::system::metrics))
        .routes(routes!(routes::system::openapi))
        .merge(protected(&state, Role::Viewer, viewer))
        .merge(protected(&state, Role::Member, member))
        .merge(protected(&state, Role::Admin, admin))
        .split_for_parts();

    let json = serde_json::to_vec(&openapi).unwrap_or_default();
    let _ = state.inner.openapi_json.set(json.into());

    router
        .fallback(|| async {
            error::ApiError::not_found("no route matches this path; see /openapi.json")
        })
        .method_not_allowed_fallback(|| async {
            error::ApiError::method_not_allowed(
                "this route does not accept this method; see /openapi.json",
            )
        })
        .layer(DefaultBodyLimit::max(state.config().server.max_body_bytes))
        .layer(axum::middleware::from_fn(middleware::request_context))
        .with_state(state)
}

/// A bound server, ready to run.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
}

impl Server {
    /// Binds `server.listen`. `shutdown` stops the server when cancelled.
    pub async fn bind(state: AppState, shutdown: CancellationToken) -> std::io::Result<Self> {
        let listener = TcpListener::bind(state.config().server.listen).await?;
        Ok(Self {
            listener,
            state,
            shutdown,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting and lets in-flight
    /// requests finish for up to `server.drain_timeout`.
    pub async fn run(self) -> std::io::Result<()> {
        let drain = self.state.config().server.drain_timeout;
        let metrics = self.state.metrics().clone();
        let upkeep_stop = self.shutdown.clone();
        let upkeep = tokio::spawn(async move {
            // Folds histogram samples into their buckets even when nobody scrapes, so they
            // cannot pile up.
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => metrics.run_upkeep(),
                    () = upkeep_stop.cancelled() => break,
                }
            }
        });

        let shutdown = self.shutdown.clone();
        let app = app(self.state);
        // No Nagle: an SSE event or a streamed token written alone must leave at once,
        // not wait for the client's (delayed) ACK of the previous one.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY on a connection");
            }
        });
        let serve = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future();
        let mut serve = std::pin::pin!(serve);
        let result = tokio::select! {
            result = &mut serve => result,
            () = shutdown.cancelled() => {
                tracing::info!(drain_timeout = ?drain, "shutting down: no new connections, draining in-flight requests");
                match tokio::time::timeout(drain, &mut serve).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::warn!(drain_timeout = ?drain, "drain timeout elapsed; closing remaining connections");
                        Ok(())
                    }
                }
            }
        };
        shutdown.cancel();
        let _ = upkeep.await;
        result
    }
}
