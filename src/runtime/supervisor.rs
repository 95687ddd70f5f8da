//! The connection supervisor: owns the consuming connection and the set of workers,
//! reconnects with backoff when the connection drops, and applies commands from handles.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::consumer::{self, ConsumerHandle, Exit};
use super::dispatch::{Shared, WorkerEntry};
use crate::broker::{Connection, redact_url};
use crate::error::{Error, Result};

/// Wait before restarting a consumer that ended while the connection stayed up.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// A request from a [`Runtime`](crate::Runtime) handle.
pub(crate) enum Command {
    Add(Arc<WorkerEntry>, oneshot::Sender<Result<()>>),
    Remove(String, oneshot::Sender<Result<()>>),
    Pause(String, oneshot::Sender<Result<()>>),
    Resume(String, oneshot::Sender<Result<()>>),
    List(oneshot::Sender<Vec<WorkerStatus>>),
}

/// What a runtime knows about one of its workers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStatus {
    /// The worker's name (its queue).
    pub name: String,
    /// Paused by [`Runtime::pause`](crate::Runtime::pause).
    pub paused: bool,
    /// Has a live consumer on the broker.
    pub consuming: bool,
    /// Why the worker is not consuming, if something went wrong.
    pub last_error: Option<String>,
    /// How often its consumer was started again after a failure or a reconnection.
    pub restarts: u32,
}

/// Connection settings of the supervisor. (No `Debug`: the URL holds the password.)
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) url: String,
    pub(crate) connection_name: String,
    pub(crate) grace: Duration,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
}

struct Slot {
    entry: Arc<WorkerEntry>,
    paused: bool,
    consumer: Option<ConsumerHandle>,
    last_error: Option<String>,
    /// Consumers started again after a failure or a reconnection.
    restarts: u32,
}

pub(crate) struct Supervisor {
    settings: Settings,
    shared: Arc<Shared>,
    workers: BTreeMap<Arc<str>, Slot>,
    commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
    stopped: CancellationToken,
    exits_tx: mpsc::UnboundedSender<(Arc<str>, u64, Exit)>,
    exits: mpsc::UnboundedReceiver<(Arc<str>, u64, Exit)>,
    restarts_tx: mpsc::UnboundedSender<Arc<str>>,
    restarts: mpsc::UnboundedReceiver<Arc<str>>,
    generation: u64,
}

/// Connect, retrying with exponential backoff and jitter until `deadline` (forever when
/// `None`). `Ok(None)` when shutdown was requested meanwhile.
pub(crate) async fn connect(
    settings: &Settings,
    shutdown: &CancellationToken,
    deadline: Option<Instant>,
) -> Result<Option<Connection>> {
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(settings.reconnect_min)
        .with_max_delay(settings.reconnect_max)
        .with_jitter()
        .without_max_times()
        .build();
    let url = redact_url(&settings.url);
    for attempt in 1u64.. {
        let error = match Connection::open(&settings.url, &settings.connection_name).await {
            Ok(conn) => {
                info!(%url, attempt, "connected to RabbitMQ");
                return Ok(Some(conn));
            }
            // A malformed URL will not get better by waiting.
            Err(e @ Error::Config(_)) => return Err(e),
            // Nor will refused credentials or a missing vhost while starting; a running
            // runtime keeps trying, in case they are being rotated.
            Err(e) if deadline.is_some() && refused(&e) => return Err(e),
            Err(e) => e,
        };
        let delay = delays.next().unwrap_or(settings.reconnect_max);
        if deadline.is_some_and(|d| Instant::now() + delay > d) {
            return Err(error);
        }
        warn!(%error, attempt, retry_in = ?delay, "cannot connect to RabbitMQ");
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
    }
    unreachable!("the attempt counter does not run out")
}

/// ACCESS_REFUSED (bad credentials) or NOT_ALLOWED (no such vhost, or no access to it).
fn refused(error: &Error) -> bool {
    const ACCESS_REFUSED: u16 = 403;
    const NOT_ALLOWED: u16 = 530;
    matches!(error, Error::Connect { source, .. }
        if matches!(source.reply_code(), Some(ACCESS_REFUSED | NOT_ALLOWED)))
}

impl Supervisor {
    pub(crate) fn new(
        settings: Settings,
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
        stopped: CancellationToken,
    ) -> Supervisor {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        let (restarts_tx, restarts) = mpsc::unbounded_channel();
        Supervisor {
            settings,
            shared,
            workers: BTreeMap::new(),
            commands,
            shutdown,
            stopped,
            exits_tx,
            exits,
            restarts_tx,
            restarts,
            generation: 0,
        }
    }

    /// Declare and start `entries` on `conn`; the first error stops what was started and
    /// is returned.
    pub(crate) async fn start_all(
        &mut self,
        conn: &Connection,
        entries: Vec<Arc<WorkerEntry>>,
    ) -> Result<()> {
        for entry in entries {
            if let Err(e) = self.add(conn, entry).await {
                self.stop_all().await;
                conn.close().await;
                self.shared.publisher.close().await;
                return Err(e);
            }
        }
        Ok(())
    }

    pub(crate) async fn run(mut self, mut conn: Connection) {
        loop {
            let lost = conn.lost();
            tokio::pin!(lost);
            let lost = loop {
                tokio::select! {
                    () = self.shutdown.cancelled() => break None,
                    error = &mut lost => break Some(error),
                    command = self.commands.recv() => match command {
                        Some(command) => self.apply(&conn, command).await,
                        // Every handle is gone: nobody can stop the runtime any more, so stop now.
                        None => break None,
                    },
                    Some((name, generation, exit)) = self.exits.recv() => self.on_exit(&conn, name, generation, exit),
                    Some(name) = self.restarts.recv() => self.restart(&conn, &name).await,
                }
            };
            let Some(error) = lost else {
                self.stop_all().await;
                conn.close().await;
                break;
            };
            warn!(%error, "connection to RabbitMQ lost; reconnecting");
            for slot in self.workers.values_mut() {
                // The consumers end on their own as their channels died with the connection.
                slot.consumer = None;
            }
            match connect(&self.settings, &self.shutdown, None).await {
                Ok(Some(new)) => {
                    conn = new;
                    self.restore(&conn).await;
                }
                Ok(None) | Err(_) => break,
            }
        }
        self.shared.publisher.close().await;
        info!("runtime stopped");
        self.stopped.cancel();
    }

    async fn apply(&mut self, conn: &Connection, command: Command) {
        match command {
            Command::Add(entry, reply) => {
                let _ = reply.send(self.add(conn, entry).await);
            }
            Command::Remove(name, reply) => {
                let _ = reply.send(self.remove(&name).await);
            }
            Command::Pause(name, reply) => {
                let _ = reply.send(self.pause(&name).await);
            }
            Command::Resume(name, reply) => {
                let result = match self.slot(&name) {
                    Ok(slot) => {
                        slot.paused = false;
                        self.activate(conn, &name).await.map(drop)
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            Command::List(reply) => {
                let statuses = self
                    .workers
                    .values()
                    .map(|s| WorkerStatus {
                        name: s.entry.name.to_string(),
                        paused: s.paused,
                        consuming: s.consumer.is_some(),
                        last_error: s.last_error.clone(),
                        restarts: s.restarts,
                    })
                    .collect();
                let _ = reply.send(statuses);
            }
        }
    }

    fn slot(&mut self, name: &str) -> Result<&mut Slot> {
        self.workers
            .get_mut(name)
            .ok_or_else(|| Error::UnknownWorker(name.to_owned()))
    }

    async fn remove(&mut self, name: &str) -> Result<()> {
        let consumer = self.slot(name)?.consumer.take();
        self.stop_slot(consumer).await;
        self.workers.remove(name);
        info!(worker = %name, "worker removed");
        Ok(())
    }

    async fn pause(&mut self, name: &str) -> Result<()> {
        let slot = self.slot(name)?;
        slot.paused = true;
        let consumer = slot.consumer.take();
        self.stop_slot(consumer).await;
        info!(worker = %name, "worker paused");
        Ok(())
    }

    async fn add(&mut self, conn: &Connection, entry: Arc<WorkerEntry>) -> Result<()> {
        if self.workers.contains_key(&entry.name) {
            return Err(Error::DuplicateWorker(entry.name.to_string()));
        }
        let name = entry.name.clone();
        self.workers.insert(
            name.clone(),
            Slot {
                entry,
                paused: false,
                consumer: None,
                last_error: None,
                restarts: 0,
            },
        );
        let result = self.activate(conn, &name).await.map(drop);
        match &result {
            Ok(()) => info!(worker = %name, "worker started"),
            Err(_) => {
                self.workers.remove(&name);
            }
        }
        result
    }

    /// Declare the worker's topology and start its consumer, unless paused or running.
    /// `Ok(true)` when a consumer was started.
    async fn activate(&mut self, conn: &Connection, name: &str) -> Result<bool> {
        let Some(slot) = self.workers.get_mut(name) else {
            return Ok(false);
        };
        if slot.paused || slot.consumer.is_some() {
            return Ok(false);
        }
        self.generation += 1;
        let started = async {
            slot.entry.declare(conn, &self.shared.exchange).await?;
            consumer::start(
                conn,
                slot.entry.clone(),
                self.shared.clone(),
                self.generation,
                self.exits_tx.clone(),
            )
            .await
        }
        .await;
        match started {
            Ok(consumer) => {
                slot.consumer = Some(consumer);
                slot.last_error = None;
                Ok(true)
            }
            Err(e) => {
                slot.last_error = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// After a reconnect: re-declare every worker's topology and resume the unpaused ones.
    async fn restore(&mut self, conn: &Connection) {
        let names: Vec<Arc<str>> = self.workers.keys().cloned().collect();
        for name in names {
            match self.activate(conn, &name).await {
                Ok(started) => self.count_restart(&name, started),
                Err(e) => {
                    error!(worker = %name, error = %e, "cannot restore the worker after reconnecting");
                    self.schedule_restart(name);
                }
            }
        }
    }

    fn on_exit(&mut self, conn: &Connection, name: Arc<str>, generation: u64, exit: Exit) {
        let Some(slot) = self.workers.get_mut(&name) else {
            return;
        };
        if slot.consumer.as_ref().map(|c| c.generation) != Some(generation) {
            return; // an older consumer of this worker
        }
        slot.consumer = None;
        slot.last_error = Some(exit.to_string());
        // A dead connection is handled as a whole by the reconnect path.
        if conn.is_connected() {
            warn!(worker = %name, %exit, "consumer ended; restarting it");
            self.schedule_restart(name);
        }
    }

    fn schedule_restart(&self, name: Arc<str>) {
        let restarts = self.restarts_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(RESTART_DELAY).await;
            let _ = restarts.send(name);
        });
    }

    async fn restart(&mut self, conn: &Connection, name: &str) {
        if !conn.is_connected() {
            return;
        }
        match self.activate(conn, name).await {
            Ok(started) => self.count_restart(name, started),
            Err(e) => {
                error!(worker = %name, error = %e, "cannot restart the worker's consumer");
                self.schedule_restart(name.into());
            }
        }
    }

    fn count_restart(&mut self, name: &str, started: bool) {
        if let (true, Some(slot)) = (started, self.workers.get_mut(name)) {
            slot.restarts += 1;
        }
    }

    async fn stop_slot(&self, consumer: Option<ConsumerHandle>) {
        if let Some(consumer) = consumer {
            consumer.stop(Instant::now() + self.settings.grace).await;
        }
    }

    /// Graceful stop of every consumer, all against the same deadline.
    async fn stop_all(&mut self) {
        let deadline = Instant::now() + self.settings.grace;
        let consumers: Vec<_> = self
            .workers
            .values_mut()
            .filter_map(|s| s.consumer.take())
            .collect();
        info!(consumers = consumers.len(), grace = ?self.settings.grace, "stopping");
        join_all(consumers.into_iter().map(|c| c.stop(deadline))).await;
    }
}
