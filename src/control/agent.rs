//! The runtime's side: read the registry, obey commands, announce the workers.

use std::sync::Arc;
use std::time::Duration;

use std::panic::AssertUnwindSafe;

use futures_util::{FutureExt, StreamExt};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{
    CONTROL_EXCHANGE, Control, Controls, Counters, DesiredState, ProcessStatus, WorkerControl,
    WorkerReport, control_queue, now_ms, parse_command,
};
use crate::broker::{Channel, Connection};
use crate::error::{Error, Result};
use crate::runtime::WeakRuntime;
use crate::runtime::connect::{Settings, connect};

/// How long the broker keeps a control queue whose process is gone.
const QUEUE_EXPIRES_MS: u32 = 60_000;
/// Commands taken from the control queue at once.
const PREFETCH: u16 = 16;
/// Longest wait for the runtime's list of workers when announcing (it is busy while it
/// reconnects): the announcement is skipped, the session goes on.
const LIST_TIMEOUT: Duration = Duration::from_secs(2);

/// One controlled runtime's agent.
pub(crate) struct Agent {
    control: Control,
    pub(crate) controls: Arc<Controls>,
    pub(crate) counters: Arc<Counters>,
    process: String,
    host: String,
    exchange: String,
    started_at_ms: i64,
}

impl Agent {
    pub(crate) fn new(control: Control, exchange: &str) -> Agent {
        let host = host_name();
        let process = format!(
            "{host}:{}:{}",
            std::process::id(),
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        );
        Agent {
            control,
            controls: Arc::new(Controls::default()),
            counters: Arc::new(Counters::default()),
            process,
            host,
            exchange: exchange.to_owned(),
            started_at_ms: now_ms(),
        }
    }

    /// Read the registry (if there is one) before the workers start, retrying until
    /// `deadline`: the workers start in the states read.
    pub(crate) async fn load(&self, deadline: Instant) -> Result<()> {
        for control in self.fetch(deadline).await? {
            self.controls.offer(control.clone());
            self.controls.mark_applied(control);
        }
        Ok(())
    }

    /// Read the registry (if there is one), retrying until `deadline`.
    async fn fetch(&self, deadline: Instant) -> Result<Vec<WorkerControl>> {
        let Some(registry) = &self.control.registry else {
            return Ok(Vec::new());
        };
        let mut pause = Duration::from_millis(100);
        loop {
            match registry.controls().await {
                Ok(controls) => return Ok(controls),
                Err(e) if Instant::now() + pause >= deadline => {
                    return Err(Error::Control(format!(
                        "cannot read the registered worker states: {e}; the runtime does \
                         not start without them (a paused worker must stay paused): check \
                         the store it reads"
                    )));
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?pause, "cannot read the registered worker states");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Run beside the runtime until `stop`: obey commands and announce the workers.
    pub(crate) fn spawn(
        self,
        settings: Settings,
        runtime: WeakRuntime,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let agent = Arc::new(self);
        tokio::spawn(async move {
            let (apply_tx, apply_rx) = mpsc::unbounded_channel();
            let applier = tokio::spawn(apply_all(agent.clone(), runtime.clone(), apply_rx));
            let mut pause = settings.reconnect_min;
            loop {
                let conn = match connect(&settings, &stop, None).await {
                    Ok(Some(conn)) => conn,
                    Ok(None) | Err(_) => break,
                };
                let started = Instant::now();
                let ended = agent.session(&conn, &runtime, &stop, &apply_tx).await;
                conn.close().await;
                match ended {
                    Ok(()) => break,
                    Err(e) => {
                        pause = match started.elapsed() > Duration::from_secs(30) {
                            true => settings.reconnect_min,
                            false => (pause * 2).min(settings.reconnect_max),
                        };
                        warn!(error = %e, retry_in = ?pause, "the control session ended; reconnecting");
                        tokio::select! {
                            () = stop.cancelled() => break,
                            () = tokio::time::sleep(pause) => {}
                        }
                    }
                }
            }
            applier.abort();
        })
    }

    async fn session(
        &self,
        conn: &Connection,
        runtime: &WeakRuntime,
        stop: &CancellationToken,
        apply: &mpsc::UnboundedSender<WorkerControl>,
    ) -> Result<()> {
        let ch = conn.channel().await?;
        ch.declare_exchange(CONTROL_EXCHANGE, "topic").await?;
        let queue = control_queue(&self.process);
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongUInt(QUEUE_EXPIRES_MS));
        ch.declare_queue(&queue, args).await?;
        ch.bind(&queue, CONTROL_EXCHANGE, "command.#").await?;
        ch.bind(&queue, CONTROL_EXCHANGE, "ping").await?;
        // Bound before reading: a command sent meanwhile waits in the queue. A registry that
        // cannot be read now is read again at every heartbeat until it can; commands are
        // obeyed meanwhile.
        let mut unread = self.control.registry.is_some();
        self.sync(&mut unread, apply).await;
        ch.qos(PREFETCH).await?;
        let tag = format!("rabbitry-control-{}", uuid::Uuid::now_v7().simple());
        let mut commands = ch.consume(&queue, &tag).await?;
        self.announce(&ch, runtime, false).await?;
        let lost = conn.lost();
        tokio::pin!(lost);
        let mut beat = tokio::time::interval(self.control.heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        beat.reset();
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    if let Err(e) = self.announce(&ch, runtime, true).await {
                        warn!(error = %e, "cannot announce that this process stops");
                    }
                    let _ = ch.delete_queue(&queue).await;
                    ch.close().await;
                    return Ok(());
                }
                e = &mut lost => return Err(Error::Broker(e)),
                command = commands.next() => match command {
                    Some(Ok(delivery)) if delivery.routing_key == "ping" => {
                        ch.ack_one(delivery.tag).await?;
                        self.announce(&ch, runtime, false).await?;
                    }
                    Some(Ok(delivery)) => {
                        ch.ack_one(delivery.tag).await?;
                        match parse_command(&delivery.body) {
                            Ok(control) => { let _ = apply.send(control); }
                            Err(e) => warn!(error = %e, "ignoring a malformed control command"),
                        }
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(Error::QueueNotFound { queue }),
                },
                () = self.counters.changed.notified() => self.announce(&ch, runtime, false).await?,
                _ = beat.tick() => {
                    self.sync(&mut unread, apply).await;
                    // What failed to apply is tried again.
                    for control in self.controls.unapplied() {
                        let _ = apply.send(control);
                    }
                    self.announce(&ch, runtime, false).await?;
                }
            }
        }
    }

    /// Read the registry if it is still `unread`, and hand what it holds to the applier.
    async fn sync(&self, unread: &mut bool, apply: &mpsc::UnboundedSender<WorkerControl>) {
        if !*unread {
            return;
        }
        match self.fetch(Instant::now()).await {
            Ok(controls) => {
                *unread = false;
                for control in controls {
                    let _ = apply.send(control);
                }
            }
            Err(e) => {
                warn!(error = %e, "the registered worker states are read again at the next heartbeat")
            }
        }
    }

    /// Publish this process's status (without a confirm: the next one replaces it).
    async fn announce(&self, ch: &Channel, runtime: &WeakRuntime, gone: bool) -> Result<()> {
        let workers = match (gone, runtime.upgrade()) {
            (false, Some(runtime)) => {
                match tokio::time::timeout(LIST_TIMEOUT, runtime.workers()).await {
                    Ok(workers) => workers?.into_iter().map(|w| self.report(w)).collect(),
                    // Busy (reconnecting, declaring): the next announcement tells.
                    Err(_) => return Ok(()),
                }
            }
            (false, None) => return Ok(()),
            (true, _) => Vec::new(),
        };
        let status = ProcessStatus {
            process: self.process.clone(),
            host: self.host.clone(),
            pid: std::process::id(),
            exchange: self.exchange.clone(),
            started_at_ms: self.started_at_ms,
            sent_at_ms: now_ms(),
            heartbeat_ms: u64::try_from(self.control.heartbeat.as_millis()).unwrap_or(u64::MAX),
            gone,
            workers,
        };
        let body = serde_json::to_vec(&status).map_err(Error::Serialize)?;
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_expiration(
                (self.control.heartbeat.as_millis() * 3)
                    .to_string()
                    .as_str()
                    .into(),
            );
        let key = format!("status.{}", self.process);
        // Not waited for: the channel is not in confirm mode.
        let unconfirmed = ch
            .publish(CONTROL_EXCHANGE, &key, &body, properties, false)
            .await?;
        drop(unconfirmed);
        Ok(())
    }

    fn report(&self, w: crate::WorkerStatus) -> WorkerReport {
        let counts = self.counters.get(&w.name);
        let desired = self.controls.state(&w.name);
        let state = if w.consuming {
            "consuming"
        } else if w.paused && desired == DesiredState::Removed {
            "removed"
        } else if w.paused {
            "paused"
        } else if w.last_error.is_some() {
            "failed"
        } else {
            "starting"
        };
        WorkerReport {
            revision: self.controls.applied(&w.name).revision,
            in_flight: counts.received.saturating_sub(counts.settled),
            settled: counts.settled,
            failed: counts.failed,
            state: state.to_owned(),
            bindings: w.bindings,
            queues: w.queues,
            last_error: w.last_error,
            name: w.name,
        }
    }
}

/// Apply commands one at a time, in order (a pause waits for in-flight handlers, and the
/// session must go on announcing meanwhile). A state that fails to apply stays unapplied
/// and is tried again at the next heartbeat.
async fn apply_all(
    agent: Arc<Agent>,
    runtime: WeakRuntime,
    mut controls: mpsc::UnboundedReceiver<WorkerControl>,
) {
    while let Some(control) = controls.recv().await {
        let worker = control.worker.clone();
        agent.controls.offer(control);
        let (Some(desired), applied) =
            (agent.controls.get(&worker), agent.controls.applied(&worker))
        else {
            continue;
        };
        if desired.revision <= applied.revision {
            continue;
        }
        let Some(runtime) = runtime.upgrade() else {
            return;
        };
        let revision = desired.revision;
        let applying = AssertUnwindSafe(apply(&runtime, &desired, &applied)).catch_unwind();
        match applying.await {
            Ok(Ok(hosted)) => {
                agent.controls.mark_applied(desired);
                if hosted {
                    info!(%worker, revision, "applied a registered worker state");
                    agent.counters.changed.notify_one();
                }
            }
            Ok(Err(e)) => {
                warn!(%worker, revision, error = %e, "cannot apply a registered worker state; trying again at the next heartbeat")
            }
            Err(panic) => {
                error!(%worker, revision, panic = crate::panic_message(&*panic), "applying a registered worker state panicked")
            }
        }
    }
}

/// Bring a worker of this runtime from the `applied` state to the `desired` one;
/// `Ok(false)` if it does not run here.
async fn apply(
    runtime: &crate::Runtime,
    desired: &WorkerControl,
    applied: &WorkerControl,
) -> Result<bool> {
    let worker = desired.worker.as_str();
    let Some(status) = runtime
        .workers()
        .await?
        .into_iter()
        .find(|w| w.name == worker)
    else {
        return Ok(false);
    };
    match desired.state {
        // Resuming declares its topology with the bindings as registered.
        DesiredState::Running if status.paused => runtime.resume(worker).await?,
        DesiredState::Paused | DesiredState::Removed if !status.paused => {
            runtime.pause(worker).await?
        }
        _ => {}
    }
    if desired.state == DesiredState::Paused {
        // Messages wait in its queue: a worker that was removed needs it declared again.
        runtime.declare_worker(worker).await?;
    }
    if desired.state != DesiredState::Removed {
        let wanted = desired.effective_bindings(&status.own_bindings);
        let unbind: Vec<&String> = applied
            .bindings_added
            .iter()
            .chain(&desired.bindings_removed)
            .filter(|p| !wanted.contains(p))
            .collect();
        runtime.rebind(worker, &wanted, &unbind).await?;
    }
    Ok(true)
}

/// The machine's host name (or `unknown`).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}
