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
use keel_core::auth::{Access, Role, Scope};
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

pub mod audit;
pub mod ratelimit;
mod routes;
pub mod session;
pub use routes::audit::{ChainCheck, verify_workspace as audit_verify};

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
    limits_cache: auth::LimitsCache,
    tokens: session::Tokens,
    limiter: ratelimit::Limiter,
    operator: tokio::sync::OnceCell<Option<keel_core::id::WorkspaceId>>,
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
    ///
    /// Access tokens are signed with `auth.jwt_secret`, or a random per-process secret
    /// when it is unset (said in a warning). Rate limits are shared through Redis when
    /// `redis.url` is set (connecting in the background), else kept in process.
    pub fn new(parts: Parts) -> Self {
        let (tokens, warning) = session::Tokens::new(&parts.config.auth);
        if let Some(warning) = warning {
            tracing::warn!("{warning}");
        }
        let limiter = match (
            &parts.config.redis.url,
            tokio::runtime::Handle::try_current(),
        ) {
            (Some(url), Ok(_)) => {
                use secrecy::ExposeSecret as _;
                ratelimit::Limiter::redis(
                    url.expose_secret(),
                    parts.config.redis.ca_file.as_deref(),
                    parts.shutdown.clone(),
                )
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "rate limits stay in process");
                    ratelimit::Limiter::local()
                })
            }
            _ => ratelimit::Limiter::local(),
        };
        Self {
            inner: Arc::new(Inner {
                store: parts.store,
                key_cache: auth::KeyCache::new(parts.config.server.key_cache_ttl),
                limits_cache: auth::LimitsCache::new(parts.config.server.key_cache_ttl, 10_000),
                tokens,
                limiter,
                operator: tokio::sync::OnceCell::new(),
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

    pub(crate) fn limits_cache(&self) -> &auth::LimitsCache {
        &self.inner.limits_cache
    }

    /// Signs and checks access tokens.
    pub fn tokens(&self) -> &session::Tokens {
        &self.inner.tokens
    }

    /// The rate limiter.
    pub fn limiter(&self) -> &ratelimit::Limiter {
        &self.inner.limiter
    }

    /// A workspace's effective limits (cached like keys, `server.key_cache_ttl`).
    pub(crate) async fn limits_for(&self, ws: keel_core::id::WorkspaceId) -> auth::ResolvedLimits {
        if let Some(l) = self.inner.limits_cache.get(&ws) {
            return l;
        }
        let stored = match self.store().workspace_limits(ws).await {
            Ok(stored) => stored,
            Err(e) => {
                // The tier default still applies: a database hiccup must not lift limits
                // nor fail the request.
                tracing::warn!(error = %e, "cannot read workspace limits; using the default tier");
                keel_store::security::WorkspaceLimits::default()
            }
        };
        let mut resolved = auth::ResolvedLimits::resolve(&self.config().limits, &stored);
        // Budgets are enforced when any exists; an unreadable list counts as some (the
        // reservation then reads them itself).
        resolved.has_budgets = self
            .store()
            .budgets(ws)
            .await
            .map_or(true, |b| !b.is_empty());
        self.inner.limits_cache.insert(ws, resolved.clone());
        resolved
    }

    /// Whether `ws` is the operator workspace (`auth.operator_workspace`).
    pub(crate) async fn is_operator(&self, ws: keel_core::id::WorkspaceId) -> bool {
        let found = self
            .inner
            .operator
            .get_or_try_init(|| async {
                let Ok(name) = keel_core::workspace::WorkspaceName::parse(
                    &self.config().auth.operator_workspace,
                ) else {
                    return Ok(None);
                };
                match self.store().workspace_by_name(&name).await {
                    Ok(w) => Ok(Some(w.id)),
                    // Not created yet: ask again next time.
                    Err(keel_store::Error::NotFound { .. }) => Err(()),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot look up the operator workspace");
                        Err(())
                    }
                }
            })
            .await;
        matches!(found, Ok(Some(id)) if *id == ws)
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

    /// A token a long-lived connection watches for shutdown: its own child of the server's,
    /// so a thousand of them checking it do not all contend for the one token's lock.
    pub(crate) fn stream_stop(&self) -> CancellationToken {
        self.inner.shutdown.child_token()
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
        (name = "auth", description = "Login sessions: access and refresh tokens"),
        (name = "members", description = "Workspace members and their roles"),
        (name = "audit", description = "The hash-chained audit log"),
        (name = "budgets", description = "Spend limits per workspace and key"),
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
        components.add_security_scheme(
            "session",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("An access token from POST /v1/auth/login."))
                    .build(),
            ),
        );
    }
}

/// Routes that need `access`, behind the one auth middleware. Each operation in
/// /openapi.json states what it needs: `x-required-role`, `x-required-scope` and
/// `x-operator-only`, and a line of its description.
fn protected(
    state: &AppState,
    access: Access,
    mut routes: OpenApiRouter<AppState>,
) -> OpenApiRouter<AppState> {
    use utoipa::openapi::security::SecurityRequirement;
    for item in routes.get_openapi_mut().paths.paths.values_mut() {
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in ops.into_iter().flatten() {
            let ext = op.extensions.get_or_insert_with(Default::default);
            ext.insert("x-required-role".into(), access.role.as_str().into());
            ext.insert("x-required-scope".into(), access.scope.as_str().into());
            ext.insert("x-operator-only".into(), access.operator.into());
            op.security = Some(vec![
                SecurityRequirement::new("api_key", Vec::<String>::new()),
                SecurityRequirement::new("session", Vec::<String>::new()),
            ]);
            let needs = format!(
                "Requires role {} (or higher) and, for a scoped key, scope `{}`{}.",
                access.role,
                access.scope,
                if access.operator {
                    "; operator workspace only"
                } else {
                    ""
                }
            );
            op.description = Some(match op.description.take() {
                Some(d) if !d.is_empty() => format!("{d}\n\n{needs}"),
                _ => needs,
            });
        }
    }
    routes.layer(axum::middleware::from_fn_with_state(
        (state.clone(), access),
        auth::require,
    ))
}

/// Builds the whole HTTP application over `state`.
pub fn app(state: AppState) -> Router {
    let read = OpenApiRouter::new()
        .routes(routes!(routes::workspaces::current))
        .routes(routes!(routes::limits::current))
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
    let gateway = OpenApiRouter::new()
        .routes(routes!(routes::gateway::chat_completions))
        .routes(routes!(routes::gateway::embeddings));
    let tasks = OpenApiRouter::new()
        .routes(routes!(routes::tasks::create))
        .routes(routes!(routes::tasks::cancel))
        .routes(routes!(routes::tasks::input))
        .routes(routes!(routes::tasks::create_thread))
        .routes(routes!(routes::tasks::replay))
        .routes(routes!(routes::tasks::discard));
    let agents = OpenApiRouter::new()
        .routes(routes!(routes::agents::create))
        .routes(routes!(routes::agents::update))
        .routes(routes!(routes::agents::delete));
    let admin = OpenApiRouter::new()
        .routes(routes!(routes::keys::create, routes::keys::list))
        .routes(routes!(routes::keys::revoke))
        .routes(routes!(routes::events::ping))
        .routes(routes!(routes::webhooks::create))
        .routes(routes!(routes::webhooks::delete))
        .routes(routes!(routes::webhooks::redeliver))
        .routes(routes!(routes::members::list, routes::members::add))
        .routes(routes!(routes::members::set_role, routes::members::remove))
        .routes(routes!(routes::audit::list))
        .routes(routes!(routes::audit::verify))
        .routes(routes!(
            routes::budgets::list,
            routes::budgets::set,
            routes::budgets::delete
        ));
    // Actions beyond the caller's own workspace.
    let operator = OpenApiRouter::new()
        .routes(routes!(routes::limits::get, routes::limits::set))
        .routes(routes!(routes::agents::reload));
    let public = OpenApiRouter::new()
        .routes(routes!(routes::auth::login))
        .routes(routes!(routes::auth::refresh))
        .routes(routes!(routes::auth::logout))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::auth::per_ip,
        ));

    let (router, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(routes::system::healthz))
        .routes(routes!(routes::system::readyz))
        .routes(routes!(routes::system::metrics))
        .routes(routes!(routes::system::openapi))
        .merge(public)
        .merge(protected(
            &state,
            Access::new(Role::Viewer, Scope::Read),
            read,
        ))
        .merge(protected(
            &state,
            Access::new(Role::Member, Scope::Gateway),
            gateway,
        ))
        .merge(protected(
            &state,
            Access::new(Role::Member, Scope::TasksWrite),
            tasks,
        ))
        .merge(protected(
            &state,
            Access::new(Role::Admin, Scope::AgentsWrite),
            agents,
        ))
        .merge(protected(
            &state,
            Access::new(Role::Admin, Scope::Admin),
            admin,
        ))
        .merge(protected(
            &state,
            Access {
                operator: true,
                ..Access::new(Role::Admin, Scope::Admin)
            },
            operator,
        ))
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
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            state.config().auth.request_timeout,
        ))
        // No origins (the default): no CORS layer at all, rather than one that allows none
        // and is still cloned for every request.
        .layer(tower::util::option_layer(
            (!state.config().auth.cors_origins.is_empty())
                .then(|| cors(&state.config().auth.cors_origins)),
        ))
        .layer(axum::middleware::from_fn(middleware::request_context))
        .with_state(state)
}

/// Cross-origin access for the configured origins only (none by default: a browser on
/// another origin can then read nothing).
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use axum::http::{HeaderName, HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("last-event-id"),
            HeaderName::from_static("x-request-id"),
        ])
        .expose_headers([
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("ratelimit-limit"),
            HeaderName::from_static("ratelimit-remaining"),
            HeaderName::from_static("ratelimit-reset"),
            header::RETRY_AFTER,
        ])
        .max_age(Duration::from_secs(600))
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

        // Live event streams end when the server starts stopping, so draining need not
        // wait for them; and whenever serving ends.
        let events = self.state.events().clone();
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
                events.close_streams();
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
        events.close_streams();
        let _ = upkeep.await;
        result
    }
}
