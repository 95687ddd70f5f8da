//! The runtime: declares the topology, consumes for every worker, and keeps it all running.

mod acks;
mod consumer;
mod dispatch;
mod supervisor;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::broker;
use crate::error::{Error, Result};
use crate::publisher::Publisher;
use crate::testing::Recorder;
use crate::topology::Topology;
use crate::worker::Worker;
use dispatch::{Shared, WorkerEntry};
pub use supervisor::WorkerStatus;
use supervisor::{Command, Settings, Supervisor};

/// The AMQP URL used when neither [`RuntimeBuilder::url`] nor `AMQP_URL` gives one.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Configures and starts a [`Runtime`].
#[must_use = "a builder does nothing until .start() or .run_until_signal()"]
pub struct RuntimeBuilder {
    url: String,
    exchange: String,
    /// Each worker, or why its subscription is invalid (reported by `start` and `plan`).
    workers: Vec<Result<Arc<WorkerEntry>, String>>,
    grace: Duration,
    startup_timeout: Duration,
    max_body: usize,
    publish_timeout: Duration,
    reconnect_min: Duration,
    reconnect_max: Duration,
    connection_name: String,
    recorder: Option<Arc<Recorder>>,
}

impl std::fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("url", &broker::redact_url(&self.url))
            .field("exchange", &self.exchange)
            .field("workers", &self.workers.len())
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl RuntimeBuilder {
    /// The broker's URL, `amqp[s]://user:password@host:port/vhost` (default: the `AMQP_URL`
    /// environment variable, else [`DEFAULT_URL`]).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// The topic exchange events are published to and consumed from (default `events`).
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// Register a worker. Its subscription is checked when the runtime starts.
    pub fn worker<W: Worker>(mut self, worker: W) -> Self {
        let entry = WorkerEntry::new(worker).map(Arc::new).map_err(|e| match e {
            Error::Config(message) => message,
            other => other.to_string(),
        });
        self.workers.push(entry);
        self
    }

    /// How long in-flight handlers may take to finish on shutdown, pause or removal
    /// (default 30 s). Handlers still running then are abandoned and their messages return
    /// to the queue.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// How long to keep trying to reach the broker at start (default 30 s).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// The largest message body handled or published, in bytes (default 16 MiB). Larger
    /// incoming messages are dead-lettered as undecodable.
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        self.max_body = max;
        self
    }

    /// How long to wait for a publisher confirm (default 10 s).
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Bounds of the exponential backoff (with jitter) between reconnection attempts
    /// (default 100 ms to 30 s).
    pub fn reconnect_delay(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max;
        self
    }

    /// The connection name shown in the management UI (default `rabbitry:<executable>`).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// Tell `recorder` how every delivery ends (used by [`TestBroker`](crate::testing::TestBroker)).
    pub(crate) fn recorder(mut self, recorder: Arc<Recorder>) -> Self {
        self.recorder = Some(recorder);
        self
    }

    /// Everything the runtime would declare, without touching the broker.
    pub fn plan(&self) -> Result<Topology> {
        let entries = self.entries()?;
        Ok(Topology::new(
            &self.exchange,
            entries.iter().map(|e| &e.subscription),
        ))
    }

    /// Declare the topology on the broker and return, without consuming.
    pub async fn declare(&self) -> Result<()> {
        let plan = self.plan()?;
        let conn = self.connect(&CancellationToken::new()).await?;
        let declared = plan.declare(&conn).await;
        conn.close().await;
        declared
    }

    fn entries(&self) -> Result<Vec<Arc<WorkerEntry>>> {
        broker::short("exchange name", &self.exchange)?;
        if self.exchange.is_empty() || self.exchange.starts_with("amq.") {
            return Err(Error::Config(format!(
                "exchange name '{}' is empty or reserved (amq.*)",
                self.exchange
            )));
        }
        if self.reconnect_min.is_zero() || self.reconnect_max < self.reconnect_min {
            return Err(Error::Config(
                "reconnect delays must satisfy 0 < min <= max".into(),
            ));
        }
        let mut names = HashSet::new();
        let mut entries = Vec::with_capacity(self.workers.len());
        for entry in &self.workers {
            let entry = entry.clone().map_err(Error::Config)?;
            if !names.insert(entry.name.clone()) {
                return Err(Error::DuplicateWorker(entry.name.to_string()));
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    fn settings(&self) -> Settings {
        Settings {
            url: self.url.clone(),
            connection_name: self.connection_name.clone(),
            grace: self.grace,
            reconnect_min: self.reconnect_min,
            reconnect_max: self.reconnect_max,
        }
    }

    async fn connect(&self, shutdown: &CancellationToken) -> Result<broker::Connection> {
        let deadline = Instant::now() + self.startup_timeout;
        supervisor::connect(&self.settings(), shutdown, Some(deadline))
            .await?
            .ok_or(Error::ShutDown)
    }

    /// Connect, declare the topology, start consuming for every worker, and return a handle.
    /// The runtime runs in background tasks until [`Runtime::shutdown`] (or until every
    /// handle is dropped).
    pub async fn start(self) -> Result<Runtime> {
        let entries = self.entries()?;
        let shutdown = CancellationToken::new();
        let stopped = CancellationToken::new();
        let conn = self.connect(&shutdown).await?;
        info!(
            url = %broker::redact_url(&self.url),
            exchange = %self.exchange,
            workers = entries.len(),
            "starting runtime"
        );
        // Its connection opens when first needed (a retry, a dead-letter, a follow-up event):
        // a worker that never publishes holds one connection, not two.
        let publisher = Publisher::builder(self.url.clone())
            .exchange(self.exchange.clone())
            .timeout(self.publish_timeout)
            .max_body_bytes(self.max_body)
            .connection_name(format!("{}:publisher", self.connection_name))
            .build();
        let publisher = match publisher {
            Ok(p) => p,
            Err(e) => {
                conn.close().await;
                return Err(e);
            }
        };
        let shared = Arc::new(Shared {
            exchange: self.exchange.clone(),
            publisher,
            max_body: self.max_body,
            extra_tiers: Mutex::new(HashSet::new()),
            recorder: self.recorder.clone(),
        });
        let (commands, receiver) = mpsc::channel(16);
        let mut supervisor = Supervisor::new(
            self.settings(),
            shared.clone(),
            receiver,
            shutdown.clone(),
            stopped.clone(),
        );
        supervisor.start_all(&conn, entries).await?;
        tokio::spawn(supervisor.run(conn));
        Ok(Runtime {
            commands,
            shared,
            shutdown,
            stopped,
        })
    }

    /// Start, run until SIGINT or SIGTERM, then shut down gracefully: stop taking
    /// deliveries, let in-flight handlers finish within the grace period, acknowledge, close.
    pub async fn run_until_signal(self) -> Result<()> {
        self.start().await?.shutdown_on_signal().await;
        Ok(())
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; waiting for SIGINT only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A running runtime: add, remove, pause and resume workers while it runs, publish, and
/// shut it down.
///
/// Cheap to clone. The runtime stops when [`shutdown`](Runtime::shutdown) is called or
/// when every handle has been dropped. While the broker is unreachable, the worker commands
/// (`add_worker`, `pause`, …) wait until the runtime has reconnected.
#[derive(Clone)]
pub struct Runtime {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    stopped: CancellationToken,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("exchange", &self.shared.exchange)
            .field("stopped", &self.stopped.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Start configuring a runtime.
    pub fn builder() -> RuntimeBuilder {
        let exe = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "app".into());
        RuntimeBuilder {
            url: std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_URL.into()),
            exchange: "events".into(),
            workers: Vec::new(),
            grace: Duration::from_secs(30),
            startup_timeout: Duration::from_secs(30),
            max_body: 16 * 1024 * 1024,
            publish_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(30),
            connection_name: format!("rabbitry:{exe}"),
            recorder: None,
        }
    }

    /// Declare a new worker's topology and start consuming for it, without a restart.
    pub async fn add_worker<W: Worker>(&self, worker: W) -> Result<()> {
        let entry = Arc::new(WorkerEntry::new(worker)?);
        self.call(|reply| Command::Add(entry, reply)).await?
    }

    /// Stop a worker (in-flight handlers finish, unstarted deliveries return to its queue)
    /// and forget it. Its queue and messages stay on the broker.
    pub async fn remove_worker(&self, name: &str) -> Result<()> {
        self.call(|reply| Command::Remove(name.to_owned(), reply))
            .await?
    }

    /// Stop consuming for a worker until [`resume`](Runtime::resume); messages wait in its
    /// queue meanwhile.
    pub async fn pause(&self, name: &str) -> Result<()> {
        self.call(|reply| Command::Pause(name.to_owned(), reply))
            .await?
    }

    /// Resume consuming for a paused worker.
    pub async fn resume(&self, name: &str) -> Result<()> {
        self.call(|reply| Command::Resume(name.to_owned(), reply))
            .await?
    }

    /// The registered workers and their state.
    pub async fn workers(&self) -> Result<Vec<WorkerStatus>> {
        self.call(Command::List).await
    }

    /// The runtime's publisher (its own connection, separate from the consumers').
    pub fn publisher(&self) -> &Publisher {
        &self.shared.publisher
    }

    /// Shut down gracefully and wait until done: stop taking deliveries, let in-flight
    /// handlers finish within the grace period, acknowledge, close the connections.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.stopped.cancelled().await;
    }

    /// Wait for SIGINT or SIGTERM, then [`shutdown`](Runtime::shutdown) gracefully.
    /// Returns early if the runtime stops for another reason.
    pub async fn shutdown_on_signal(&self) {
        tokio::select! {
            () = shutdown_signal() => info!("shutdown signal received"),
            () = self.stopped() => return,
        }
        self.shutdown().await;
    }

    /// Wait until the runtime has stopped.
    pub async fn stopped(&self) {
        self.stopped.cancelled().await;
    }

    async fn call<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| Error::ShutDown)?;
        answer.await.map_err(|_| Error::ShutDown)
    }
}
