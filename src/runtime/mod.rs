//! The runtime: declares the topology, consumes for every worker, and keeps it all running.

mod acks;
pub(crate) mod connect;
mod consumer;
mod settle;
mod supervisor;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::broker;
use crate::error::{Error, Result};
use crate::middleware::WorkerLayer;
use crate::observe::{Lifecycle, Observer, Observers};
use crate::publisher::Publisher;
use crate::registration::{BoxLayer, Registration};
use crate::topology::{Publishing, Topology};
use connect::Settings;
use settle::{Shared, WorkerEntry};
pub use supervisor::WorkerStatus;
use supervisor::{Command, Supervisor};

/// How long `shutdown` waits for the tasks beside the supervisor.
const BESIDE_GRACE: Duration = Duration::from_secs(5);

/// The AMQP URL used when neither [`RuntimeBuilder::url`] nor `AMQP_URL` gives one.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Configures and starts a [`Runtime`].
#[must_use = "a builder does nothing until .start() or .run_until_signal()"]
pub struct RuntimeBuilder {
    url: String,
    exchange: String,
    /// Each worker, or why its subscription is invalid (reported by `start` and `plan`).
    workers: Vec<Result<Registration, String>>,
    /// The runtime's layers, outermost first.
    layers: Vec<BoxLayer>,
    observers: Vec<Arc<dyn Observer>>,
    grace: Duration,
    startup_timeout: Duration,
    max_body: usize,
    publish_timeout: Duration,
    reconnect_min: Duration,
    reconnect_max: Duration,
    connection_name: String,
    #[cfg(feature = "schema")]
    schemas: Option<crate::schema::Schemas>,
    on_start: Vec<StartHook>,
    schedules: Vec<crate::Schedule>,
    control: Option<crate::control::Control>,
}

/// Work started with a runtime's handle once it runs (see [`RuntimeBuilder::on_start`]).
type StartHook =
    Box<dyn FnOnce(Runtime) -> futures_util::future::BoxFuture<'static, Result<()>> + Send>;

/// How many messages wait in a queue, and how many consumers it has (see
/// [`Runtime::queue_depths`], [`Publisher::queue_depth`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueDepth {
    /// The queue.
    pub queue: String,
    /// Messages ready for delivery (not counting those delivered and not yet acknowledged).
    pub ready: u32,
    /// Consumers on the queue, from every process.
    pub consumers: u32,
}

impl QueueDepth {
    pub(crate) fn new(queue: &str, ready: u32, consumers: u32) -> QueueDepth {
        QueueDepth {
            queue: queue.to_owned(),
            ready,
            consumers,
        }
    }
}

impl std::fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("url", &broker::redact_url(&self.url))
            .field("exchange", &self.exchange)
            .field("workers", &self.workers.len())
            .field("layers", &self.layers.len())
            .field("observers", &self.observers.len())
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

    /// Register a worker: a [`Worker`](crate::Worker), or a [`Registration`] that gives it
    /// layers of its own. Its subscription is checked when the runtime starts.
    pub fn worker(mut self, worker: impl Into<Registration>) -> Self {
        let registration = worker.into();
        let checked = match registration.validate() {
            Ok(()) => Ok(registration),
            Err(Error::Config(message)) => Err(message),
            Err(other) => Err(other.to_string()),
        };
        self.workers.push(checked);
        self
    }

    /// Wrap every worker's handler in `layer` (see [`middleware`](crate::middleware)), also
    /// workers added later with [`Runtime::add_worker`]. The first layer added is the
    /// outermost; the runtime's layers sit outside each worker's own.
    pub fn layer(mut self, layer: impl WorkerLayer) -> Self {
        self.layers.push(Arc::new(layer));
        self
    }

    /// Tell `observer` about every settled delivery, every publish of the runtime's
    /// publisher, and every change of state (see [`observe`](crate::observe)).
    pub fn observer(mut self, observer: impl Observer) -> Self {
        self.observers.push(Arc::new(observer));
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

    /// Check the events handlers publish (`ctx.publish`, the runtime's publisher) against
    /// the schema of their type, as [`PublisherBuilder::schemas`](crate::PublisherBuilder::schemas)
    /// does: an invalid follow-up is an [`Error::Invalid`] for the handler, and nothing is
    /// sent. Retry and dead-letter copies are never checked (they are what was received).
    #[cfg(feature = "schema")]
    pub fn schemas(mut self, schemas: crate::schema::Schemas) -> Self {
        self.schemas = Some(schemas);
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

    /// Run `hook` with the runtime's handle once it has started, before
    /// [`start`](RuntimeBuilder::start) returns: the place to start what runs beside the
    /// workers (an HTTP endpoint, a poller). If a hook fails, the runtime is shut down and
    /// `start` returns its error. Hooks run in the order given; keep them short and spawn
    /// what runs longer (it can end with [`Runtime::stopped`]).
    pub fn on_start<F, Fut>(mut self, hook: F) -> Self
    where
        F: FnOnce(Runtime) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<()>> + Send + 'static,
    {
        self.on_start
            .push(Box::new(move |runtime| Box::pin(hook(runtime))));
        self
    }

    /// Take part in control across processes (see [`control`](crate::control)): obey
    /// pause, resume, removal and binding changes sent by `rabbitry serve` (or any
    /// [`Controller`](crate::control::Controller)) to every process running a worker,
    /// announce the workers, and — with a [registry](crate::control::Control::registry) —
    /// start each worker in its registered state.
    ///
    /// ```no_run
    /// use rabbitry::Runtime;
    /// use rabbitry::control::Control;
    /// # async fn run() -> rabbitry::Result<()> {
    /// Runtime::builder()
    ///     .control(Control::new())
    ///     .run_until_signal()
    ///     .await
    /// # }
    /// ```
    pub fn control(mut self, control: crate::control::Control) -> Self {
        self.control = Some(control);
        self
    }

    /// Publish an event at every tick of `schedule` while the runtime runs. Every process
    /// whose runtime has the schedule competes for it and exactly one fires each tick,
    /// failing over when that one dies; see [`Scheduler`](crate::Scheduler).
    ///
    /// ```no_run
    /// use rabbitry::{Event, Runtime, Schedule};
    /// # #[derive(serde::Serialize)] struct InvoicesDue;
    /// # impl Event for InvoicesDue { const TYPE: &'static str = "invoices.due"; }
    /// # async fn run() -> rabbitry::Result<()> {
    /// Runtime::builder()
    ///     .schedule(Schedule::new("invoices", "0 0 6 * * MON-FRI", |_| InvoicesDue)?)
    ///     .run_until_signal()
    ///     .await
    /// # }
    /// ```
    pub fn schedule(mut self, schedule: crate::Schedule) -> Self {
        self.schedules.push(schedule);
        self
    }

    /// Everything the runtime would declare, without touching the broker.
    pub fn plan(&self) -> Result<Topology> {
        self.check()?;
        let subscriptions = self.workers.iter().filter_map(|w| w.as_ref().ok());
        Ok(Topology::new(
            &self.exchange,
            subscriptions.map(|r| &r.subscription),
        ))
    }

    /// Declare the topology on the broker and return, without consuming.
    pub async fn declare(&self) -> Result<()> {
        let plan = self.plan()?;
        let conn = self.connect(&CancellationToken::new()).await?;
        let declared = plan.declare_on(&conn, Publishing::Here).await;
        conn.close().await;
        declared.map(drop)
    }

    /// Check the settings and every worker; nothing is sent to the broker.
    fn check(&self) -> Result<()> {
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
        self.scheduler().check()?;
        let mut names = HashSet::new();
        for worker in &self.workers {
            let queue = worker
                .as_ref()
                .map_err(|e| Error::Config(e.clone()))?
                .subscription
                .queue();
            if !names.insert(queue) {
                return Err(Error::DuplicateWorker(queue.to_owned()));
            }
        }
        Ok(())
    }

    fn scheduler(&self) -> crate::Scheduler {
        self.schedules.iter().cloned().fold(
            crate::Scheduler::new(self.url.clone(), self.exchange.clone())
                .connection_name(format!("{}:scheduler", self.connection_name)),
            crate::Scheduler::schedule,
        )
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
        connect::connect(&self.settings(), shutdown, Some(deadline))
            .await?
            .ok_or(Error::ShutDown)
    }

    /// Connect, declare the topology, start consuming for every worker, and return a handle.
    /// The runtime runs in background tasks until [`Runtime::shutdown`] (or until every
    /// handle is dropped: keep it).
    pub async fn start(self) -> Result<Runtime> {
        self.check()?;
        let shutdown = CancellationToken::new();
        let started_at = Instant::now();
        let conn = self.connect(&shutdown).await?;
        let mut observers = self.observers.clone();
        let agent = self
            .control
            .clone()
            .map(|c| crate::control::Agent::new(c, &self.exchange));
        if let Some(agent) = &agent {
            observers.push(agent.counters.clone());
            // Registered states apply before any worker starts.
            if let Err(e) = agent.load(started_at + self.startup_timeout).await {
                conn.close().await;
                return Err(e);
            }
        }
        let observers = Observers::new(observers);
        // Its connection opens when first needed (a retry, a dead-letter, a follow-up event):
        // a worker that never publishes holds one connection, not two.
        let publisher = Publisher::builder(self.url.clone())
            .exchange(self.exchange.clone())
            .timeout(self.publish_timeout)
            .max_body_bytes(self.max_body)
            .connection_name(format!("{}:publisher", self.connection_name))
            .observers(self.observers.clone());
        #[cfg(feature = "schema")]
        let publisher = match &self.schemas {
            Some(schemas) => publisher.schemas(schemas.clone()),
            None => publisher,
        };
        let publisher = publisher.build();
        let publisher = match publisher {
            Ok(p) => p,
            Err(e) => {
                conn.close().await;
                return Err(e);
            }
        };
        info!(
            url = %broker::redact_url(&self.url),
            exchange = %self.exchange,
            workers = self.workers.len(),
            "starting runtime"
        );
        let settings = self.settings();
        let control_settings = Settings {
            connection_name: format!("{}:control", settings.connection_name),
            ..settings.clone()
        };
        let scheduler = (!self.schedules.is_empty()).then(|| self.scheduler());
        let shared = Arc::new(Shared {
            exchange: self.exchange,
            publisher,
            max_body: self.max_body,
            layers: self.layers,
            extra_tiers: Mutex::new(HashSet::new()),
            observers,
            controls: agent
                .as_ref()
                .map(|a| a.controls.clone())
                .unwrap_or_default(),
            beside: Mutex::new(Vec::new()),
        });
        let entries = self
            .workers
            .into_iter()
            .flatten()
            .map(|r| Arc::new(WorkerEntry::build(r, &shared)))
            .collect();
        let (commands, receiver) = mpsc::channel(16);
        let mut supervisor =
            Supervisor::new(settings, shared.clone(), receiver, shutdown.clone(), conn);
        supervisor.start_all(entries).await?;
        shared.observers.lifecycle(&Lifecycle::Started {
            exchange: &shared.exchange,
        });
        let stopped = CancellationToken::new();
        let guard = stopped.clone().drop_guard();
        let task = tokio::spawn(async move {
            // Cancelled however the supervisor ends, even by a panic or an abort.
            let _stopped = guard;
            supervisor.run().await;
        });
        let runtime = Runtime {
            commands,
            shared,
            shutdown,
            stopped,
            task: Arc::new(Mutex::new(Some(task))),
        };
        if let Some(agent) = agent {
            let stop = CancellationToken::new();
            let (shutdown, stopped, cancel) = (
                runtime.shutdown.clone(),
                runtime.stopped.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = stopped.cancelled() => {}
                }
                cancel.cancel();
            });
            let task = agent.spawn(control_settings, runtime.downgrade(), stop);
            crate::lock(&runtime.shared.beside).push(task);
        }
        if let Some(scheduler) = scheduler {
            let (shutdown, stopped) = (runtime.shutdown.clone(), runtime.stopped.clone());
            let stop = async move {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = stopped.cancelled() => {}
                }
            };
            tokio::spawn(async move {
                if let Err(e) = scheduler.run_until(stop).await {
                    tracing::error!(error = %e, "the runtime's scheduler stopped");
                }
            });
        }
        for hook in self.on_start {
            if let Err(e) = hook(runtime.clone()).await {
                runtime.shutdown().await;
                return Err(e);
            }
        }
        Ok(runtime)
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
/// when **every handle has been dropped** — so keep one: `let runtime = …start().await?;`
/// and then `runtime.shutdown_on_signal().await` (or [`RuntimeBuilder::run_until_signal`],
/// which does both). While the broker is unreachable, the worker commands (`add_worker`,
/// `pause`, …) wait until the runtime has reconnected.
///
/// Dropping the handle by accident is a warning at compile time (`#[must_use]`), and a
/// warning in the log when it happens:
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// # async fn run(builder: rabbitry::RuntimeBuilder) -> rabbitry::Result<()> {
/// builder.start().await?; // the handle is dropped here: the workers stop at once
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[must_use = "dropping every Runtime handle stops its workers: keep it, e.g. `runtime.shutdown_on_signal().await`"]
pub struct Runtime {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    stopped: CancellationToken,
    /// The supervisor's task, joined by the first `shutdown`.
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

/// A [`Runtime`] handle that does not keep it running (see [`Runtime::downgrade`]).
#[derive(Clone)]
pub struct WeakRuntime {
    commands: mpsc::WeakSender<Command>,
    shared: std::sync::Weak<Shared>,
    shutdown: CancellationToken,
    stopped: CancellationToken,
    task: std::sync::Weak<Mutex<Option<JoinHandle<()>>>>,
}

impl WeakRuntime {
    /// A full handle, unless every [`Runtime`] handle has been dropped or it has stopped.
    pub fn upgrade(&self) -> Option<Runtime> {
        if self.stopped.is_cancelled() {
            return None;
        }
        Some(Runtime {
            commands: self.commands.upgrade()?,
            shared: self.shared.upgrade()?,
            shutdown: self.shutdown.clone(),
            stopped: self.stopped.clone(),
            task: self.task.upgrade()?,
        })
    }

    /// Wait until the runtime has stopped.
    pub async fn stopped(&self) {
        self.stopped.cancelled().await;
    }
}

impl std::fmt::Debug for WeakRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeakRuntime")
            .field("stopped", &self.stopped.is_cancelled())
            .finish_non_exhaustive()
    }
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
            layers: Vec::new(),
            observers: Vec::new(),
            #[cfg(feature = "schema")]
            schemas: None,
            on_start: Vec::new(),
            schedules: Vec::new(),
            control: None,
        }
    }

    /// Declare a new worker's topology and start consuming for it, without a restart. The
    /// runtime's layers apply to it too.
    pub async fn add_worker(&self, worker: impl Into<Registration>) -> Result<()> {
        let registration = worker.into();
        registration.validate()?;
        let entry = Arc::new(WorkerEntry::build(registration, &self.shared));
        self.call(|reply| Command::Add(entry, reply)).await?
    }

    /// Stop a worker (in-flight handlers finish, unstarted deliveries return to its queue)
    /// and forget it. Its queue and messages stay on the broker. Returns once it has
    /// stopped; other commands are not held up meanwhile.
    pub async fn remove_worker(&self, name: &str) -> Result<()> {
        self.call(|reply| Command::Remove(name.to_owned(), reply))
            .await?
    }

    /// Stop consuming for a worker until [`resume`](Runtime::resume); messages wait in its
    /// queue meanwhile. Returns once its in-flight handlers have finished (or the grace
    /// period is over); other commands are not held up meanwhile.
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

    /// How many messages are ready in each worker's queue and its dead-letter queue, and how
    /// many consumers each has, read with passive declares on the publisher's connection
    /// (one short-lived channel per queue: a queue that does not exist — deleted under the
    /// runtime — is left out, and closes only its own channel). Waits, like
    /// [`workers`](Runtime::workers), while the runtime reconnects.
    pub async fn queue_depths(&self) -> Result<Vec<QueueDepth>> {
        let workers = self.workers().await?;
        let mut depths = Vec::with_capacity(workers.len() * 2);
        for worker in workers {
            for queue in [crate::topology::dlq_name(&worker.name), worker.name] {
                if let Some(depth) = self.shared.publisher.queue_depth(&queue).await? {
                    depths.push(depth);
                }
            }
        }
        depths.sort_by(|a, b| a.queue.cmp(&b.queue));
        Ok(depths)
    }

    /// The runtime's exchange.
    pub fn exchange(&self) -> &str {
        &self.shared.exchange
    }

    /// Declare a worker's topology (idempotent), paused or not.
    pub(crate) async fn declare_worker(&self, name: &str) -> Result<()> {
        self.call(|reply| Command::Declare(name.to_owned(), reply))
            .await?
    }

    /// Bind a worker's queue with every pattern of `bind` and unbind those of `unbind`, on
    /// the publisher's connection (idempotent; the supervisor keeps consuming meanwhile).
    pub(crate) async fn rebind(
        &self,
        worker: &str,
        bind: &[String],
        unbind: &[&String],
    ) -> Result<()> {
        for pattern in bind.iter().chain(unbind.iter().copied()) {
            broker::short("binding pattern", pattern)?;
        }
        let conn = self.shared.publisher.connection().await?;
        let exchange = self.shared.exchange.as_str();
        conn.on_channel(async |ch| {
            for pattern in bind {
                ch.bind(worker, exchange, pattern).await?;
            }
            for pattern in unbind {
                ch.unbind(worker, exchange, pattern).await?;
            }
            Ok::<_, Error>(())
        })
        .await
    }

    /// The runtime's publisher (its own connection, separate from the consumers').
    pub fn publisher(&self) -> &Publisher {
        &self.shared.publisher
    }

    /// Shut down gracefully and wait until done: stop taking deliveries, let in-flight
    /// handlers finish within the grace period, acknowledge, close the connections. When it
    /// returns, no task of the runtime is left running.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let task = crate::lock(&self.task).take();
        match task {
            Some(task) => {
                let _ = task.await;
                // Tasks beside the supervisor (control across processes) finish their
                // goodbyes within a bound.
                let beside = std::mem::take(&mut *crate::lock(&self.shared.beside));
                for task in beside {
                    let abort = task.abort_handle();
                    if tokio::time::timeout(BESIDE_GRACE, task).await.is_err() {
                        abort.abort();
                    }
                }
            }
            None => self.stopped.cancelled().await,
        }
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

    /// A handle that does not keep the runtime running: for tasks beside it (a poller, an
    /// HTTP endpoint) that should not stop it from ending when its owners drop theirs.
    pub fn downgrade(&self) -> WeakRuntime {
        WeakRuntime {
            commands: self.commands.downgrade(),
            shared: Arc::downgrade(&self.shared),
            shutdown: self.shutdown.clone(),
            stopped: self.stopped.clone(),
            task: Arc::downgrade(&self.task),
        }
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
