//! rabbitry's HTTP API: publish events, read the record, and manage who may, behind scoped
//! bearer tokens. `rabbitry serve --http 127.0.0.1:8080` runs it beside the keeper.
//!
//! ```text
//! POST   /api/v1/events/{routing_key}     publish the JSON body (scope publish:<pattern>)
//! GET    /api/v1/events                   recorded events (read): ?type= &correlation_id= &since= &limit=
//! GET    /api/v1/events/{message_id}      one event and how every worker handled it (read)
//! GET    /api/v1/dead-letters             ?worker= &state=waiting|redriven|purged|all &limit= (read)
//! GET    /api/v1/dead-letters/{seq}       one dead letter (read)
//! POST   /api/v1/dead-letters/{seq}/redrive   back to its worker, fresh retry budget (admin)
//! POST   /api/v1/dead-letters/{seq}/purge     mark it purged (admin)
//! GET    /api/v1/schedules                stored cron schedules (read)
//! POST   /api/v1/schedules                keep one: {"name", "pattern", "routing_key", "body", "time_zone"?} (admin)
//! DELETE /api/v1/schedules/{name}         remove one (admin)
//! GET    /api/v1/sagas                    saga instances: ?saga= &state= &limit= (read)
//! GET    /api/v1/sagas/{key}              the instances with one key (read)
//! GET    /api/v1/tokens                   every token (admin)
//! POST   /api/v1/tokens                   make one: {"name", "scopes", "rate_per_second"?, "expires_at"?} (admin)
//! DELETE /api/v1/tokens/{id}              revoke one (admin)
//! POST   /api/v1/replay                   recorded events again: {"message_id"} or a filter, "to_worker"? (admin)
//! GET    /api/v1/workers                  every worker of every controlled process (read)
//! POST   /api/v1/workers/{name}/pause     …/resume, DELETE …[?delete_queues=true]: in every process (admin)
//! POST   /api/v1/workers/{name}/bindings  {"pattern"}; DELETE …/bindings/{pattern} (admin)
//! GET    /api/v1/webhooks                 registered webhooks, never their secrets (read)
//! POST   /api/v1/webhooks                 {"name", "url", "bindings", "retry"?}: the secret, once (admin)
//! DELETE /api/v1/webhooks/{name}          stop and forget one (admin)
//! GET    /api/v1/asyncapi.json            the AsyncAPI 3.0 document of the announced topology (read)
//! GET    /api/v1/openapi.json             the OpenAPI 3.1 document of all this, without a token
//! GET    /health, /ready, /metrics        probes and Prometheus metrics, without a token
//! ```
//!
//! **Tokens.** `Authorization: Bearer <token>`; a token is made by `rabbitry tokens create`
//! (or the API) and shown once — the store keeps its SHA-256 only, looked up by hash and
//! compared in constant time. Scopes: `publish:<pattern>` (the routing keys it may publish,
//! a topic pattern), `read`, `admin` (everything). No token, a bad one, an expired or revoked
//! one: 401, and nothing is done. A scope it lacks: 403. A token with a rate
//! (`--rate 100/s`) publishing faster: 429 with `Retry-After`.
//!
//! **Publishing.** The body is published as it came (exactly those bytes), confirmed by the
//! broker, mandatory: 202 `{"message_id"}`; 400 for a body that is not JSON or a bad routing
//! key; 413 over the size limit (1 MiB by default, [`Api::max_body`]); 422 when no queue is
//! bound for the routing key; 503 when the broker or the store is away. `Idempotency-Key`
//! becomes the message id (so a de-duplicating consumer drops a retried request), and
//! `X-Correlation-Id` the correlation id. Errors are JSON: `{"error", "message"}`. With
//! [`Api::schemas`], a body whose type (its routing key) has a registered JSON Schema must
//! match it (400 with the violations).
//!
//! **Workers across processes.** With [`Api::controller`] (a
//! [`Controller`](rabbitry::control::Controller)), a change is registered in the store at
//! the next revision and sent to every runtime built with
//! [`RuntimeBuilder::control`](rabbitry::RuntimeBuilder::control); the answer says which
//! processes running the worker applied it and which had not within 3 seconds.
//!
//! **Webhooks.** With [`Api::webhooks`] (a [`WebhookHost`]), a webhook is a worker without a
//! Rust type: each message's exact body is POSTed to its URL, signed per Standard Webhooks
//! ([`signature`]), through an [`Egress`] that refuses non-public addresses at registration
//! and at every connection.
//!
//! ```no_run
//! use rabbitry::Publisher;
//! use rabbitry_server::Api;
//! use rabbitry_store::Store;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Store::connect("sqlite://rabbitry.db").await?;
//! let publisher = Publisher::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! Api::new(store, publisher)
//!     .serve(listener, async { tokio::signal::ctrl_c().await.ok(); })
//!     .await?;
//! # Ok(()) }
//! ```

mod actions;
mod asyncapi;
mod auth;
mod cache;
mod error;
mod limits;
mod openapi;
mod publish;
mod records;
mod tokens;
mod webhook;
mod webhooks;
mod workers;

use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use rabbitry::Publisher;
use rabbitry_store::Store;

pub use asyncapi::document as asyncapi_document;
pub use auth::Caller;
pub use error::ApiError;
pub use ipnet::IpNet;
pub use webhook::{Egress, EgressError, WebhookHost, signature, webhook_queue};

/// The default limit on a request body.
const DEFAULT_MAX_BODY: usize = 1024 * 1024;

/// Renders the metrics `GET /metrics` answers (Prometheus text format).
type Metrics = Arc<dyn Fn() -> String + Send + Sync>;

/// What every handler reaches.
#[derive(Clone)]
pub(crate) struct AppState {
    store: Store,
    publisher: Publisher,
    limits: Arc<limits::Limits>,
    max_body: usize,
    metrics: Option<Metrics>,
    tokens: Arc<cache::TokenCache>,
    controller: Option<rabbitry::control::Controller>,
    webhooks: Option<Arc<WebhookHost>>,
    schemas: Arc<rabbitry::Schemas>,
}

/// The HTTP API over a store and a publisher.
#[must_use = "the API does nothing until .serve(…) or .router()"]
pub struct Api {
    state: AppState,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("store", &self.state.store)
            .field("publisher", &self.state.publisher)
            .field("max_body", &self.state.max_body)
            .finish()
    }
}

impl Api {
    /// The API over `store` (tokens, the record) publishing with `publisher` (to its
    /// exchange).
    pub fn new(store: Store, publisher: Publisher) -> Api {
        Api {
            state: AppState {
                store,
                publisher,
                limits: Arc::default(),
                max_body: DEFAULT_MAX_BODY,
                metrics: None,
                tokens: Arc::default(),
                controller: None,
                webhooks: None,
                schemas: Arc::default(),
            },
        }
    }

    /// Refuse request bodies over `bytes` with 413 (default 1 MiB).
    pub fn max_body(mut self, bytes: usize) -> Api {
        self.state.max_body = bytes;
        self
    }

    /// Answer `GET /metrics` (no token, as for any scrape target) with what `render` makes:
    /// Prometheus text, e.g. `rabbitry_observe::Observability::render` of the runtimes the
    /// process runs. Without it, `/metrics` is 404.
    pub fn metrics(mut self, render: impl Fn() -> String + Send + Sync + 'static) -> Api {
        self.state.metrics = Some(Arc::new(render));
        self
    }

    /// Control workers across processes with `controller`: `GET /api/v1/workers` lists
    /// what every controlled runtime announces, and pause, resume, removal and binding
    /// changes are registered in the store and sent to every process. Without it, those
    /// endpoints answer 404.
    pub fn controller(mut self, controller: rabbitry::control::Controller) -> Api {
        self.state.controller = Some(controller);
        self
    }

    /// Check the body of every event published through the API against the schema
    /// registered for its type (its routing key), answering 400 with the violations.
    /// Types without a schema take any JSON.
    pub fn schemas(mut self, schemas: rabbitry::Schemas) -> Api {
        self.state.schemas = Arc::new(schemas);
        self
    }

    /// Register webhooks through the API (`/api/v1/webhooks`) and start them on `host`
    /// at once. Without it, those endpoints answer 404.
    pub fn webhooks(mut self, host: Arc<WebhookHost>) -> Api {
        self.state.webhooks = Some(host);
        self
    }

    /// The API as an axum router, to serve or to nest in an application's.
    pub fn router(self) -> axum::Router {
        let max_body = self.state.max_body;
        axum::Router::new()
            .route("/health", get(health))
            .route("/ready", get(ready))
            .route("/api/v1/openapi.json", get(openapi))
            .route("/api/v1/asyncapi.json", get(asyncapi))
            .route("/metrics", get(metrics))
            .route("/api/v1/events", get(records::events))
            .route(
                "/api/v1/events/{key}",
                get(records::event).post(publish::publish),
            )
            .route("/api/v1/replay", post(actions::replay))
            .route("/api/v1/dead-letters", get(records::dead_letters))
            .route("/api/v1/dead-letters/{seq}", get(records::dead_letter))
            .route("/api/v1/dead-letters/{seq}/redrive", post(actions::redrive))
            .route("/api/v1/dead-letters/{seq}/purge", post(actions::purge))
            .route(
                "/api/v1/schedules",
                get(records::schedules).post(actions::add_schedule),
            )
            .route("/api/v1/schedules/{name}", delete(actions::remove_schedule))
            .route("/api/v1/sagas", get(records::sagas))
            .route("/api/v1/sagas/{key}", get(records::saga))
            .route("/api/v1/tokens", get(tokens::list).post(tokens::create))
            .route("/api/v1/tokens/{id}", delete(tokens::revoke))
            .route(
                "/api/v1/webhooks",
                get(webhooks::list).post(webhooks::create),
            )
            .route("/api/v1/webhooks/{name}", delete(webhooks::delete))
            .route("/api/v1/workers", get(workers::list))
            .route("/api/v1/workers/{name}", delete(workers::remove))
            .route("/api/v1/workers/{name}/pause", post(workers::pause))
            .route("/api/v1/workers/{name}/resume", post(workers::resume))
            .route("/api/v1/workers/{name}/bindings", post(workers::bind))
            .route(
                "/api/v1/workers/{name}/bindings/{pattern}",
                delete(workers::unbind),
            )
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(DefaultBodyLimit::max(max_body))
            .with_state(self.state)
    }

    /// Serve on `listener` until `shutdown` completes (requests in progress finish).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }
}

async fn health() -> &'static str {
    "ok"
}

/// 200 when the store answers and the broker takes a connection; 503 otherwise.
async fn ready(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    state.store.schedules().await?;
    let probe = format!("{}.audit", state.publisher.exchange());
    state.publisher.queue_depth(&probe).await?;
    Ok("ready")
}

async fn metrics(
    State(state): State<AppState>,
) -> Result<([(axum::http::HeaderName, &'static str); 1], String), ApiError> {
    match &state.metrics {
        Some(render) => Ok((
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )],
            render(),
        )),
        None => Err(ApiError::not_found("no metrics are kept by this process")),
    }
}

/// `GET /api/v1/asyncapi.json` (read): the AsyncAPI 3.0 document of what the controlled
/// runtimes on this server's exchange announce.
async fn asyncapi(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require_read()?;
    let controller = state.controller.as_ref().ok_or_else(|| {
        ApiError::not_found("this server does not control workers (start it with a controller)")
    })?;
    Ok(Json(asyncapi::document(
        state.publisher.exchange(),
        &controller.workers(),
        &state.schemas,
    )))
}

async fn openapi() -> Json<serde_json::Value> {
    Json(openapi::document())
}

async fn method_not_allowed() -> (StatusCode, Json<serde_json::Value>) {
    let body = serde_json::json!({"error": "method_not_allowed", "message": "this endpoint does not take that method"});
    (StatusCode::METHOD_NOT_ALLOWED, Json(body))
}

async fn not_found() -> (StatusCode, Json<serde_json::Value>) {
    let body = serde_json::json!({"error": "not_found", "message": "no such endpoint"});
    (StatusCode::NOT_FOUND, Json(body))
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
