//! The supervisor: owns the consuming connection, the workers and every consumer task,
//! reconnects with backoff when the connection drops, restarts failed consumers with
//! backoff, and applies commands from handles without letting a slow stop block the rest.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::connect::{Settings, connect};
use super::consumer::{self, ConsumerHandle, Exit};
use super::settle::{Shared, WorkerEntry};
use crate::broker::Connection;
use crate::control::DesiredState;
use crate::error::{Error, Result};
use crate::observe::{Lifecycle, StopReason};
use crate::panic_message;

/// Wait before the first restart of a consumer that failed; doubled for each failure in a
/// row, up to [`RESTART_MAX`].
const RESTART_MIN: Duration = Duration::from_secs(1);
/// Longest wait between restarts of a consumer that keeps failing.
const RESTART_MAX: Duration = Duration::from_secs(60);
/// A consumer that ran this long before it ended starts its backoff afresh.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// A request from a [`Runtime`](crate::Runtime) handle.
pub(crate) enum Command {
    Add(Arc<WorkerEntry>, oneshot::Sender<Result<()>>),
    Remove(String, oneshot::Sender<Result<()>>),
    Pause(String, oneshot::Sender<Result<()>>),
    Resume(String, oneshot::Sender<Result<()>>),
    /// Declare a worker's topology (a paused worker's, whose queue may have been deleted).
    Declare(String, oneshot::Sender<Result<()>>),
    List(oneshot::Sender<Vec<WorkerStatus>>),
    /// Make the supervisor panic, to test that the runtime still shuts down cleanly.
    #[cfg(test)]
    Panic,
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
    /// Bindings an earlier version of the worker declared and this one does not, still in
    /// place (see [`Subscription::prune_bindings`](crate::Subscription::prune_bindings)).
    pub stale_bindings: Vec<String>,
    /// Its binding patterns, as changed through control across processes (see
    /// [`Control`](crate::control::Control)).
    pub bindings: Vec<String>,
    /// Its queues: the worker queue, its retry tiers, its dead-letter queue.
    pub queues: Vec<String>,
    /// The bindings its subscription declares.
    pub(crate) own_bindings: Vec<String>,
}

struct Slot {
    entry: Arc<WorkerEntry>,
    paused: bool,
    consumer: Option<ConsumerHandle>,
    last_error: Option<String>,
    /// Consumers started again after a failure or a reconnection.
    restarts: u32,
    /// Failures in a row, for the restart backoff.
    failures: u32,
    /// Stale bindings the last declaration reported.
    stale_bindings: Vec<String>,
}

type Stopping = Pin<Box<dyn Future<Output = ()> + Send>>;

pub(crate) struct Supervisor {
    settings: Settings,
    shared: Arc<Shared>,
    workers: BTreeMap<Arc<str>, Slot>,
    commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
    exits_tx: consumer::Exits,
    exits: mpsc::UnboundedReceiver<(Arc<str>, u64, Exit)>,
    /// When each failed worker is started again.
    restarts: BTreeMap<Arc<str>, Instant>,
    /// Consumers being stopped on request (pause, removal), each answering its caller.
    stopping: FuturesUnordered<Stopping>,
    /// Consumers that ended on their own and may still be finishing handlers, by worker.
    retired: Vec<(Arc<str>, ConsumerHandle)>,
    conn: Connection,
    generation: u64,
}

impl Supervisor {
    pub(crate) fn new(
        settings: Settings,
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
        conn: Connection,
    ) -> Supervisor {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        Supervisor {
            settings,
            shared,
            workers: BTreeMap::new(),
            commands,
            shutdown,
            exits_tx,
            exits,
            restarts: BTreeMap::new(),
            stopping: FuturesUnordered::new(),
            retired: Vec::new(),
            conn,
            generation: 0,
        }
    }

    /// Declare and start `entries`; the first error stops what was started and is returned.
    pub(crate) async fn start_all(&mut self, entries: Vec<Arc<WorkerEntry>>) -> Result<()> {
        for entry in entries {
            if let Err(e) = self.add(entry).await {
                self.finish().await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Supervise until shut down (or until every handle is gone), then stop everything.
    /// A panic in the supervisor is logged and ends the runtime the same orderly way.
    pub(crate) async fn run(mut self) {
        if let Err(panic) = AssertUnwindSafe(self.supervise()).catch_unwind().await {
            error!(
                panic = panic_message(&*panic),
                "the runtime's supervisor panicked; stopping every worker"
            );
        }
        self.finish().await;
    }

    async fn supervise(&mut self) {
        loop {
            let lost = self.conn.lost();
            tokio::pin!(lost);
            let lost = loop {
                let next_restart = self.restarts.values().min().copied();
                tokio::select! {
                    () = self.shutdown.cancelled() => break None,
                    error = &mut lost => break Some(error),
                    command = self.commands.recv() => match command {
                        Some(command) => self.apply(command).await,
                        None => {
                            warn!("every Runtime handle was dropped: stopping the workers \
                                   (keep the handle and await shutdown_on_signal() or shutdown())");
                            break None;
                        }
                    },
                    Some((name, generation, exit)) = self.exits.recv() => self.on_exit(name, generation, exit),
                    () = sleep_until_some(next_restart), if next_restart.is_some() => self.due_restarts().await,
                    Some(()) = self.stopping.next(), if !self.stopping.is_empty() => {}
                }
            };
            let Some(error) = lost else { return };
            let error = error.to_string();
            warn!(%error, "connection to RabbitMQ lost; reconnecting");
            self.shared
                .observers
                .lifecycle(&Lifecycle::ConnectionLost { error: &error });
            for (name, slot) in self.workers.iter_mut() {
                // Their channels died with the connection; they end on their own.
                if let Some(consumer) = slot.consumer.take() {
                    self.retired.push((name.clone(), consumer));
                }
            }
            self.retired.retain(|(_, c)| !c.is_finished());
            match connect(&self.settings, &self.shutdown, None).await {
                Ok(Some(conn)) => {
                    self.conn = conn;
                    self.shared.observers.lifecycle(&Lifecycle::Reconnected);
                    self.restore().await;
                }
                Ok(None) | Err(_) => return,
            }
        }
    }

    async fn apply(&mut self, command: Command) {
        match command {
            Command::Add(entry, reply) => {
                let _ = reply.send(self.add(entry).await);
            }
            Command::Remove(name, reply) => match self.workers.remove(name.as_str()) {
                Some(slot) => {
                    self.restarts.remove(name.as_str());
                    info!(worker = %name, "removing worker");
                    self.stop_then_reply(&name, slot.consumer, StopReason::Removed, reply);
                }
                None => {
                    let _ = reply.send(Err(Error::UnknownWorker(name)));
                }
            },
            Command::Pause(name, reply) => match self.workers.get_mut(name.as_str()) {
                Some(slot) => {
                    slot.paused = true;
                    let consumer = slot.consumer.take();
                    self.restarts.remove(name.as_str());
                    info!(worker = %name, "pausing worker");
                    self.stop_then_reply(&name, consumer, StopReason::Paused, reply);
                }
                None => {
                    let _ = reply.send(Err(Error::UnknownWorker(name)));
                }
            },
            Command::Resume(name, reply) => {
                let result = match self.workers.get_mut(name.as_str()) {
                    Some(slot) => {
                        slot.paused = false;
                        slot.failures = 0;
                        let activated = self.activate(&name).await.map(drop);
                        if let Err(e) = &activated {
                            // Not consuming, not paused: keep trying, with backoff.
                            let name = self
                                .workers
                                .get_key_value(name.as_str())
                                .map(|(k, _)| k.clone());
                            if let Some(name) = name {
                                self.schedule_restart(name, &e.to_string());
                            }
                        }
                        activated
                    }
                    None => Err(Error::UnknownWorker(name)),
                };
                let _ = reply.send(result);
            }
            Command::Declare(name, reply) => {
                let result = match self.workers.get_mut(name.as_str()) {
                    Some(slot) => match slot.entry.declare(&self.conn, &self.shared).await {
                        Ok(stale) => {
                            slot.stale_bindings = stale;
                            Ok(())
                        }
                        Err(e) => Err(e),
                    },
                    None => Err(Error::UnknownWorker(name)),
                };
                let _ = reply.send(result);
            }
            Command::List(reply) => {
                let statuses = self
                    .workers
                    .values()
                    .map(|s| {
                        let subscription = &s.entry.subscription;
                        let adjusted = self.shared.controls.adjust(subscription);
                        let plan = crate::Topology::new(&self.shared.exchange, [&adjusted]);
                        // Tiers declared on demand (for `retry_after` delays) are its too.
                        let tiers = format!("{}.retry.", s.entry.name);
                        let mut queues: Vec<String> = plan.queues().map(str::to_owned).collect();
                        queues.extend(
                            crate::lock(&self.shared.extra_tiers)
                                .iter()
                                .filter(|q| q.starts_with(&tiers) && !queues.contains(q))
                                .cloned()
                                .collect::<Vec<_>>(),
                        );
                        WorkerStatus {
                            name: s.entry.name.to_string(),
                            paused: s.paused,
                            consuming: s.consumer.is_some(),
                            last_error: s.last_error.clone(),
                            restarts: s.restarts,
                            stale_bindings: s.stale_bindings.clone(),
                            queues,
                            bindings: adjusted.bindings,
                            own_bindings: subscription.bindings.clone(),
                        }
                    })
                    .collect();
                let _ = reply.send(statuses);
            }
            #[cfg(test)]
            Command::Panic => panic!("a test asked the supervisor to panic"),
        }
    }

    /// Stop `consumer`, and the worker's consumers still finishing after a lost channel,
    /// in the background (other commands go on meanwhile); answer `reply` once they have
    /// stopped.
    fn stop_then_reply(
        &mut self,
        name: &str,
        consumer: Option<ConsumerHandle>,
        reason: StopReason,
        reply: oneshot::Sender<Result<()>>,
    ) {
        let deadline = Instant::now() + self.settings.grace;
        let (theirs, others) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|(worker, _)| &**worker == name);
        self.retired = others;
        let stopping: Vec<_> = consumer
            .into_iter()
            .chain(theirs.into_iter().map(|(_, c)| c))
            .map(|c| c.stop(deadline))
            .collect();
        self.shared.observers.lifecycle(&Lifecycle::Stopped {
            worker: name,
            reason,
        });
        let name = name.to_owned();
        self.stopping.push(Box::pin(async move {
            futures_util::future::join_all(stopping).await;
            info!(worker = %name, ?reason, "worker stopped");
            let _ = reply.send(Ok(()));
        }));
    }

    async fn add(&mut self, entry: Arc<WorkerEntry>) -> Result<()> {
        if self.workers.contains_key(&entry.name) {
            return Err(Error::DuplicateWorker(entry.name.to_string()));
        }
        let name = entry.name.clone();
        // A registered state (control across processes) applies from the start: a paused
        // worker's queue is declared, so that messages wait in it; a removed one is not.
        let desired = self.shared.controls.state(&name);
        if desired == DesiredState::Paused {
            entry.declare(&self.conn, &self.shared).await?;
        }
        self.workers.insert(
            name.clone(),
            Slot {
                entry,
                paused: desired != DesiredState::Running,
                consumer: None,
                last_error: None,
                restarts: 0,
                failures: 0,
                stale_bindings: Vec::new(),
            },
        );
        let result = self.activate(&name).await.map(drop);
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
    async fn activate(&mut self, name: &str) -> Result<bool> {
        let Some(slot) = self.workers.get_mut(name) else {
            return Ok(false);
        };
        if slot.paused || slot.consumer.is_some() {
            return Ok(false);
        }
        self.generation += 1;
        let started = async {
            let stale = slot.entry.declare(&self.conn, &self.shared).await?;
            let consumer = consumer::start(
                &self.conn,
                slot.entry.clone(),
                self.shared.clone(),
                self.generation,
                self.exits_tx.clone(),
            )
            .await?;
            Ok::<_, Error>((consumer, stale))
        }
        .await;
        match started {
            Ok((consumer, stale)) => {
                slot.consumer = Some(consumer);
                slot.stale_bindings = stale;
                slot.last_error = None;
                self.shared
                    .observers
                    .lifecycle(&Lifecycle::Consuming { worker: name });
                Ok(true)
            }
            Err(e) => {
                slot.last_error = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// After a reconnect: re-declare every worker's topology and resume the unpaused ones.
    async fn restore(&mut self) {
        let names: Vec<Arc<str>> = self.workers.keys().cloned().collect();
        for name in names {
            self.restarts.remove(&name);
            self.try_start(name).await;
        }
    }

    /// Start a worker's consumer (again), counting it as a restart, or schedule the next try.
    async fn try_start(&mut self, name: Arc<str>) {
        match self.activate(&name).await {
            Ok(started) => {
                if let (true, Some(slot)) = (started, self.workers.get_mut(&name)) {
                    slot.restarts += 1;
                }
            }
            Err(e) => {
                error!(worker = %name, error = %e, "cannot start the worker's consumer");
                self.schedule_restart(name, &e.to_string());
            }
        }
    }

    fn on_exit(&mut self, name: Arc<str>, generation: u64, exit: Exit) {
        let Some(slot) = self.workers.get_mut(&name) else {
            return;
        };
        if slot.consumer.as_ref().map(|c| c.generation) != Some(generation) {
            return; // an older consumer of this worker
        }
        if let Some(consumer) = slot.consumer.take() {
            if consumer.started.elapsed() >= STABLE_AFTER {
                slot.failures = 0;
            }
            // It may still be finishing handlers; it is stopped with the rest at shutdown.
            self.retired.push((name.clone(), consumer));
        }
        self.retired.retain(|(_, c)| !c.is_finished());
        // A dead connection is handled as a whole by the reconnect path.
        if self.conn.is_connected() {
            let error = exit.to_string();
            warn!(worker = %name, %error, "consumer ended");
            self.schedule_restart(name, &error);
        }
    }

    /// Try the worker again after a delay that doubles with each failure in a row.
    fn schedule_restart(&mut self, name: Arc<str>, error: &str) {
        let Some(slot) = self.workers.get_mut(&name) else {
            return;
        };
        slot.last_error = Some(error.to_owned());
        let delay = restart_delay(slot.failures);
        slot.failures = slot.failures.saturating_add(1);
        self.shared.observers.lifecycle(&Lifecycle::Failed {
            worker: &name,
            error,
            restart_in: delay,
        });
        self.restarts.insert(name, Instant::now() + delay);
    }

    async fn due_restarts(&mut self) {
        let now = Instant::now();
        let due: Vec<Arc<str>> = self
            .restarts
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            self.restarts.remove(&name);
            // Without a connection, the reconnect path restores every worker.
            if self.conn.is_connected() {
                self.try_start(name).await;
            }
        }
    }

    /// Stop every consumer gracefully against one deadline, wait for those already being
    /// stopped, close the connections, and tell the observers.
    async fn finish(&mut self) {
        let deadline = Instant::now() + self.settings.grace;
        let mut consumers: Vec<ConsumerHandle> = self
            .workers
            .values_mut()
            .filter_map(|s| s.consumer.take())
            .collect();
        consumers.extend(self.retired.drain(..).map(|(_, c)| c));
        info!(consumers = consumers.len(), grace = ?self.settings.grace, "stopping");
        let stopped: FuturesUnordered<_> =
            consumers.into_iter().map(|c| c.stop(deadline)).collect();
        let stopping = std::mem::take(&mut self.stopping);
        futures_util::future::join(stopped.collect::<Vec<_>>(), stopping.collect::<Vec<_>>()).await;
        self.conn.close().await;
        self.shared.publisher.close().await;
        for name in self.workers.keys() {
            self.shared.observers.lifecycle(&Lifecycle::Stopped {
                worker: name,
                reason: StopReason::Shutdown,
            });
        }
        self.shared.observers.lifecycle(&Lifecycle::ShutDown);
        info!("runtime stopped");
    }
}

/// The wait before restart number `failures + 1` of a worker.
fn restart_delay(failures: u32) -> Duration {
    RESTART_MIN
        .saturating_mul(1u32 << failures.min(16))
        .min(RESTART_MAX)
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_to_a_minute() {
        let delays: Vec<u64> = (0..9).map(|f| restart_delay(f).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(restart_delay(u32::MAX), RESTART_MAX);
    }
}
