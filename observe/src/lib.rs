//! Observability for [rabbitry] runtimes: Prometheus metrics, `/metrics` `/health` `/ready`
//! endpoints, W3C trace context carried through RabbitMQ headers, and JSON logs.
//!
//! Everything here is built on rabbitry's public [observer seam](rabbitry::observe): the
//! core runtime has one path whether it is observed or not, and this crate (hyper,
//! `metrics`, OpenTelemetry) stays out of programs that do not want it.
//!
//! # Metrics and endpoints
//!
//! An [`Observability`] is an [`Observer`] that counts, times
//! and follows a runtime. Give it to the builder with
//! [`RuntimeBuilderExt::observability`], and tell it where to serve:
//!
//! ```no_run
//! use rabbitry::prelude::*;
//! use rabbitry_observe::{Observability, RuntimeBuilderExt};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct OrderPlaced { id: u64 }
//! # impl Event for OrderPlaced { const TYPE: &'static str = "order.placed"; }
//! # struct Mailer;
//! # impl Worker for Mailer {
//! #     type Event = OrderPlaced;
//! #     fn subscription(&self) -> Subscription { Subscription::new("orders.email").bind("order.placed") }
//! #     async fn handle(&self, _: Delivery<OrderPlaced>, _: &Context) -> Outcome { Ok(()) }
//! # }
//!
//! # async fn run() -> rabbitry::Result<()> {
//! // RUST_LOG, RABBITRY_LOG_FORMAT=json, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME…
//! let _telemetry = rabbitry_observe::Telemetry::init("email-worker")?;
//! let observability = Observability::new().http("127.0.0.1:9464".parse().unwrap());
//! let runtime = Runtime::builder()
//!     .worker(Mailer)
//!     .observability(&observability)
//!     .start()
//!     .await?;
//! // GET http://127.0.0.1:9464/metrics, /health, /ready
//! runtime.shutdown_on_signal().await;
//! # Ok(()) }
//! ```
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `rabbitry_deliveries_total` | counter | `worker`, `event_type`, `outcome` (`handled`, `skipped`, `retried`, `dead_lettered`, `requeued`, `deferred`) |
//! | `rabbitry_handler_duration_seconds` | histogram ([buckets](DURATION_BUCKETS) 1 ms … 120 s) | `worker`, `event_type` |
//! | `rabbitry_in_flight` | gauge | `worker` |
//! | `rabbitry_published_total` | counter | `exchange`, `outcome` (`confirmed`, `unroutable`, `nacked`, `failed`) |
//! | `rabbitry_queue_messages` | gauge | `queue`, `state` (`ready`) — each worker queue and its DLQ |
//! | `rabbitry_consumers` | gauge | `queue` |
//! | `rabbitry_connection_up` | gauge (0/1) | — |
//! | `rabbitry_reconnects_total` | counter | — |
//!
//! `event_type` comes from the message (the AMQP `type` property, set by the producer), so
//! its values are bounded: [`MAX_EVENT_TYPES`] per worker, the rest counted as `other`.
//! Queue depths are read every 15 s by default ([`Observability::queue_depths_every`])
//! while the endpoints are served, with passive declares on short-lived channels of the
//! runtime publisher's connection.
//!
//! `GET /health` answers 200 while the process runs. `GET /ready` answers 200 when the
//! runtime is connected and every worker consuming, else 503 (a paused worker is not
//! consuming); both carry a JSON [`Readiness`] body that names each worker's state.
//! [`Observability::serve`] serves them before the runtime starts, so that `/health`
//! answers while it connects.
//!
//! # Traces
//!
//! With a `tracing-opentelemetry` layer installed ([`Telemetry::init`] installs one), every
//! publish gets a `publish` span and every delivery a `delivery` span with the
//! OpenTelemetry messaging attributes for RabbitMQ, and the publish span's context travels
//! in the W3C `traceparent` / `tracestate` headers: the delivery span is its child —
//! through retries and dead-letters, which keep the headers, and on to the follow-up
//! events a handler publishes. A message from another client that carries a `traceparent`
//! (or MassTransit's `MT-Activity-Id`) joins its trace; one without starts a new trace.
//!
//! [`Telemetry::init`] (in the example above) sets up logs and traces from the environment:
//! `RUST_LOG`, `RABBITRY_LOG_FORMAT=json`, and the OpenTelemetry layer ([`trace_layer`]).
//! Spans are exported over OTLP/HTTP only with the `otlp` feature (off by default) and
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set.
//!
//! [rabbitry]: https://docs.rs/rabbitry

mod http;
mod metrics;
mod propagation;
mod ready;
mod report;
mod telemetry;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rabbitry::observe::{Lifecycle, Observer, Received, Sending, Settled};
use rabbitry::{Runtime, RuntimeBuilder, WeakRuntime};
use tokio::sync::watch;
use tracing::debug;

pub use metrics::{
    CONNECTION_UP, CONSUMERS, DELIVERIES, DURATION_BUCKETS, HANDLER_DURATION, IN_FLIGHT,
    MAX_EVENT_TYPES, PUBLISHED, QUEUE_MESSAGES, RECONNECTS,
};
pub use propagation::{TRACEPARENT, TRACESTATE};
pub use ready::{Readiness, WorkerReadiness};
pub use report::HandlingReports;
pub use telemetry::{LOG_FORMAT_VAR, LogFormat, Telemetry, trace_layer};

/// The environment variable the worker binaries read the endpoints' address from.
pub const HTTP_ADDR_VAR: &str = "RABBITRY_HTTP_ADDR";

/// How often queue depths are read unless told otherwise.
const DEFAULT_DEPTH_INTERVAL: Duration = Duration::from_secs(15);
/// Longest one reading of the queue depths may take (the broker may be away).
const DEPTH_TIMEOUT: Duration = Duration::from_secs(10);

/// Metrics, readiness and trace propagation for one runtime (or publisher). Cheap to clone:
/// clones share everything.
#[derive(Clone)]
pub struct Observability {
    shared: Arc<Shared>,
    http: Option<SocketAddr>,
    depth_interval: Duration,
}

/// What the observer, the endpoints and the poller share.
pub(crate) struct Shared {
    metrics: metrics::Metrics,
    ready: Mutex<ready::State>,
    /// The endpoints' bound address and the switch that stops them, while they are served.
    server: Mutex<Option<(SocketAddr, watch::Sender<bool>)>>,
}

impl Shared {
    fn readiness(&self) -> Readiness {
        self.ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .report()
    }
}

impl std::fmt::Debug for Observability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observability")
            .field("http", &self.http)
            .field("depth_interval", &self.depth_interval)
            .finish_non_exhaustive()
    }
}

impl Default for Observability {
    fn default() -> Self {
        Observability::new()
    }
}

impl Observability {
    /// Metrics, readiness and trace propagation, without an HTTP endpoint.
    pub fn new() -> Observability {
        Observability {
            shared: Arc::new(Shared {
                metrics: metrics::Metrics::new(),
                ready: Mutex::default(),
                server: Mutex::default(),
            }),
            http: None,
            depth_interval: DEFAULT_DEPTH_INTERVAL,
        }
    }

    /// As [`new`](Observability::new), serving the endpoints on the address in
    /// `RABBITRY_HTTP_ADDR` when it is set (e.g. `0.0.0.0:9464`). An address that does not
    /// parse is an error that names it.
    pub fn from_env() -> rabbitry::Result<Observability> {
        let observability = Observability::new();
        match std::env::var(HTTP_ADDR_VAR) {
            Ok(addr) if !addr.trim().is_empty() => {
                let parsed = addr.trim().parse().map_err(|e| {
                    rabbitry::Error::Config(format!(
                        "{HTTP_ADDR_VAR}={addr:?} is not an address like 127.0.0.1:9464: {e}"
                    ))
                })?;
                Ok(observability.http(parsed))
            }
            _ => Ok(observability),
        }
    }

    /// Serve `GET /metrics`, `GET /health` and `GET /ready` on `addr` (port 0: any free
    /// port, see [`local_addr`](Observability::local_addr)), from [`serve`](Observability::serve)
    /// or the runtime's start — whichever comes first — until the runtime stops. An address
    /// in use fails `serve` (and the start). While they are served, the queue depths are
    /// read (on the runtime publisher's connection).
    pub fn http(mut self, addr: SocketAddr) -> Observability {
        self.http = Some(addr);
        self
    }

    /// Read the queue depths this often (default 15 s; at least 1 s).
    pub fn queue_depths_every(mut self, interval: Duration) -> Observability {
        self.depth_interval = interval.max(Duration::from_secs(1));
        self
    }

    /// Every metric, in the Prometheus text format (what `GET /metrics` answers).
    pub fn render(&self) -> String {
        self.shared.metrics.render()
    }

    /// Whether the runtime is ready (what `GET /ready` answers).
    pub fn readiness(&self) -> Readiness {
        self.shared.readiness()
    }

    /// Start serving the endpoints now, before the runtime starts, so that `/health`
    /// answers 200 and `/ready` 503 (`running: false`) while it connects. Does nothing
    /// without an address, or when they are already served; returns the bound address.
    pub async fn serve(&self) -> rabbitry::Result<Option<SocketAddr>> {
        let Some(addr) = self.http else {
            return Ok(None);
        };
        if let Some(bound) = self.local_addr() {
            return Ok(Some(bound));
        }
        let listener = http::bind(addr).await?;
        let bound = listener.local_addr().map_err(|e| {
            rabbitry::Error::Config(format!("the endpoints' socket on {addr}: {e}"))
        })?;
        let (stop, stopped) = watch::channel(false);
        {
            let mut server = self
                .shared
                .server
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some((other, _)) = *server {
                return Ok(Some(other)); // served meanwhile, by another call
            }
            *server = Some((bound, stop));
        }
        tracing::info!(addr = %bound, "serving /metrics, /health and /ready");
        tokio::spawn(http::serve(listener, self.shared.clone(), stopped));
        Ok(Some(bound))
    }

    /// The address the endpoints listen on, while they are served.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        let server = self
            .shared
            .server
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        server.as_ref().map(|(addr, _)| *addr)
    }

    /// Serve the endpoints (if an address was given and they are not served yet) and read
    /// the queue depths beside `runtime`, until it stops. Called by
    /// [`RuntimeBuilderExt::observability`] once the runtime has started.
    pub async fn attach(&self, runtime: &Runtime) -> rabbitry::Result<()> {
        if self.serve().await?.is_none() {
            return Ok(());
        }
        let weak = runtime.downgrade();
        tokio::spawn(poll_depths(
            self.shared.clone(),
            weak.clone(),
            self.depth_interval,
        ));
        let shared = self.shared.clone();
        tokio::spawn(async move {
            weak.stopped().await;
            let server = shared
                .server
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some((_, stop)) = server {
                let _ = stop.send(true);
            }
        });
        Ok(())
    }
}

/// Read the queue depths now and every `interval` until the runtime stops.
async fn poll_depths(shared: Arc<Shared>, runtime: WeakRuntime, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = runtime.stopped() => return,
            _ = ticks.tick() => {}
        }
        let Some(live) = runtime.upgrade() else {
            return;
        };
        let read = tokio::time::timeout(DEPTH_TIMEOUT, live.queue_depths()).await;
        drop(live);
        match read {
            Ok(Ok(depths)) => shared.metrics.queue_depths(&depths),
            Ok(Err(e)) => debug!(error = %e, "reading queue depths failed"),
            Err(_) => debug!("reading queue depths timed out"),
        }
        shared.metrics.upkeep();
    }
}

impl Observer for Observability {
    fn settled(&self, settled: &Settled<'_>) {
        self.shared.metrics.settled(
            settled.worker,
            settled.metadata.event_type(),
            settled.handling,
            settled.duration,
        );
    }

    fn published(&self, published: &rabbitry::observe::Published<'_>) {
        self.shared
            .metrics
            .published(published.exchange, published.outcome);
    }

    fn lifecycle(&self, event: &Lifecycle<'_>) {
        match event {
            Lifecycle::Started { .. } => self.shared.metrics.connection(true),
            // Its in-flight gauge exists (at 0) before its first delivery.
            Lifecycle::Consuming { worker } => self.shared.metrics.worker(worker),
            Lifecycle::Reconnected => self.shared.metrics.reconnected(),
            Lifecycle::ConnectionLost { .. } | Lifecycle::ShutDown => {
                self.shared.metrics.connection(false)
            }
            _ => {}
        }
        self.shared
            .ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .apply(event);
    }

    fn received(&self, received: &Received<'_>) {
        propagation::extract(received);
        self.shared.metrics.received(received.worker);
    }

    fn sending(&self, sending: &mut Sending<'_>) {
        propagation::inject(sending);
    }
}

/// Adds [`observability`](RuntimeBuilderExt::observability) to
/// [`RuntimeBuilder`].
pub trait RuntimeBuilderExt {
    /// Observe the runtime (metrics, readiness, trace propagation for its workers and its
    /// publisher) and, once it has started, serve the endpoints and poll the queue depths.
    fn observability(self, observability: &Observability) -> RuntimeBuilder;
}

impl RuntimeBuilderExt for RuntimeBuilder {
    fn observability(self, observability: &Observability) -> RuntimeBuilder {
        let attach = observability.clone();
        self.observer(observability.clone())
            .on_start(async move |runtime| attach.attach(&runtime).await)
    }
}
