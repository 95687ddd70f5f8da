//! The controlling side: collect what every controlled runtime announces, send commands.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{CONTROL_EXCHANGE, ProcessStatus, WorkerControl, WorkerReport, control_queue};
use crate::broker::{Channel, Confirm, Connection, NOT_FOUND, reply_code};
use crate::error::{Error, Result};
use crate::runtime::connect::{Settings, connect};

/// Longest status accepted from a process.
const MAX_STATUS: usize = 1024 * 1024;
/// How long a command waits for the broker's confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Collects the announcements of every controlled runtime on a broker and sends them
/// commands (what `rabbitry serve` runs behind `GET /api/v1/workers` and the worker
/// controls). Cloning gives another handle to the same controller.
///
/// ```no_run
/// use rabbitry::control::{Controller, DesiredState, WorkerControl};
/// # async fn run() -> rabbitry::Result<()> {
/// let controller = Controller::start("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
/// let mut pause = WorkerControl::new("email");
/// pause.state = DesiredState::Paused;
/// pause.revision = 1; // a registry (the store) hands out revisions
/// controller.send(&pause).await?;
/// let applied = controller.wait_applied("email", 1, std::time::Duration::from_secs(2)).await;
/// println!("applied by {:?}, pending in {:?}", applied.applied, applied.pending);
/// controller.close().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("processes", &crate::lock(&self.inner.seen).len())
            .finish_non_exhaustive()
    }
}

struct Inner {
    id: String,
    seen: Mutex<HashMap<String, Seen>>,
    /// Bumped on every status received.
    version: watch::Sender<u64>,
    /// The live session's channel (in confirm mode), for commands.
    channel: Mutex<Option<Channel>>,
    /// The live session's connection, for deletions.
    conn: Mutex<Option<Connection>>,
    stop: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct Seen {
    status: ProcessStatus,
    at: Instant,
    /// The status before, for rates.
    before: Option<(ProcessStatus, Instant)>,
}

/// One worker of one process, as a [`Controller`] sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct WorkerView {
    /// The worker.
    #[serde(flatten)]
    pub report: WorkerReport,
    /// The process running it.
    pub process: String,
    /// Its host.
    pub host: String,
    /// Its operating-system process id.
    pub pid: u32,
    /// Its runtime's exchange.
    pub exchange: String,
    /// Deliveries settled per second between its last two announcements (0 until two).
    pub settled_per_second: f64,
    /// Of those, failures per second.
    pub failed_per_second: f64,
    /// When it last announced itself, in Unix milliseconds (its own clock).
    pub seen_at_ms: i64,
}

/// Which processes applied a command (see [`Controller::wait_applied`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Applied {
    /// Processes running the worker that announced the revision (or a newer one).
    pub applied: Vec<String>,
    /// Processes running the worker that had not, when the wait ended.
    pub pending: Vec<String>,
}

impl Controller {
    /// Connect to the broker at `url` (retrying for up to 30 seconds) and start collecting;
    /// asks every controlled runtime to announce itself at once. Reconnects on its own.
    pub async fn start(url: impl Into<String>) -> Result<Controller> {
        let settings = Settings {
            url: url.into(),
            connection_name: "rabbitry:controller".into(),
            grace: Duration::ZERO,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
        };
        let stop = CancellationToken::new();
        let first = connect(
            &settings,
            &stop,
            Some(Instant::now() + Duration::from_secs(30)),
        )
        .await?
        .ok_or(Error::ShutDown)?;
        let inner = Arc::new(Inner {
            id: uuid::Uuid::now_v7().simple().to_string(),
            seen: Mutex::new(HashMap::new()),
            version: watch::channel(0).0,
            channel: Mutex::new(None),
            conn: Mutex::new(None),
            stop,
            task: Mutex::new(None),
        });
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(listen(inner.clone(), settings, first, ready_tx));
        *crate::lock(&inner.task) = Some(task);
        match ready.await {
            Ok(Ok(())) => Ok(Controller { inner }),
            Ok(Err(e)) => {
                inner.stop.cancel();
                Err(e)
            }
            Err(_) => Err(Error::ShutDown),
        }
    }

    /// Every live process and its workers (a process is forgotten when it says it stops,
    /// or after three missed announcements).
    pub fn processes(&self) -> Vec<ProcessStatus> {
        let mut seen = crate::lock(&self.inner.seen);
        seen.retain(|_, s| alive(s));
        let mut processes: Vec<_> = seen.values().map(|s| s.status.clone()).collect();
        processes.sort_by(|a, b| a.process.cmp(&b.process));
        processes
    }

    /// Every worker of every live process, by worker name then process.
    pub fn workers(&self) -> Vec<WorkerView> {
        let mut seen = crate::lock(&self.inner.seen);
        seen.retain(|_, s| alive(s));
        let mut views = Vec::new();
        for s in seen.values() {
            for report in &s.status.workers {
                let before = s.before.as_ref().and_then(|(status, at)| {
                    let old = status.workers.iter().find(|w| w.name == report.name)?;
                    let secs = s.at.duration_since(*at).as_secs_f64();
                    (secs > 0.0).then_some((old, secs))
                });
                let rate = |now: u64, then: u64, secs: f64| now.saturating_sub(then) as f64 / secs;
                let (settled, failed) = match before {
                    Some((old, secs)) => (
                        rate(report.settled, old.settled, secs),
                        rate(report.failed, old.failed, secs),
                    ),
                    None => (0.0, 0.0),
                };
                views.push(WorkerView {
                    report: report.clone(),
                    process: s.status.process.clone(),
                    host: s.status.host.clone(),
                    pid: s.status.pid,
                    exchange: s.status.exchange.clone(),
                    settled_per_second: settled,
                    failed_per_second: failed,
                    seen_at_ms: s.status.sent_at_ms,
                });
            }
        }
        views.sort_by(|a, b| {
            (a.report.name.as_str(), a.process.as_str())
                .cmp(&(b.report.name.as_str(), b.process.as_str()))
        });
        views
    }

    /// Send `control` to every controlled runtime, confirmed by the broker. Those running
    /// the worker apply it if its revision is newer than theirs.
    pub async fn send(&self, control: &WorkerControl) -> Result<()> {
        let ch = self.channel()?;
        let body = serde_json::to_vec(control).map_err(Error::Serialize)?;
        let key = format!("command.{}", control.worker);
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let publish = async {
            ch.publish(CONTROL_EXCHANGE, &key, &body, properties, false)
                .await?
                .await
        };
        match tokio::time::timeout(CONFIRM_TIMEOUT, publish).await {
            Ok(Ok(Confirm::Ack { .. })) => Ok(()),
            Ok(Ok(Confirm::Nack)) => Err(Error::Nacked {
                exchange: CONTROL_EXCHANGE.into(),
                routing_key: key,
            }),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(Error::PublishTimeout {
                exchange: CONTROL_EXCHANGE.into(),
                routing_key: key,
                timeout: CONFIRM_TIMEOUT,
            }),
        }
    }

    /// Ask every controlled runtime to announce itself now (a process that has been silent
    /// is heard from before a decision that must not miss it).
    pub async fn ping(&self) -> Result<()> {
        ping(&self.channel()?).await
    }

    /// The live session's channel.
    fn channel(&self) -> Result<Channel> {
        let ch = crate::lock(&self.inner.channel).clone();
        ch.filter(Channel::is_open).ok_or_else(not_connected)
    }

    /// Wait until every live process running `worker` has announced `revision` (or a
    /// newer one), at most `timeout`.
    pub async fn wait_applied(&self, worker: &str, revision: i64, timeout: Duration) -> Applied {
        self.wait(worker, revision, timeout, false).await
    }

    /// As [`wait_applied`](Controller::wait_applied), and until at least one process runs
    /// `worker` (one that is being started).
    pub async fn wait_running(&self, worker: &str, revision: i64, timeout: Duration) -> Applied {
        self.wait(worker, revision, timeout, true).await
    }

    async fn wait(
        &self,
        worker: &str,
        revision: i64,
        timeout: Duration,
        somewhere: bool,
    ) -> Applied {
        let mut changes = self.inner.version.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            let mut applied = Applied::default();
            for view in self
                .workers()
                .into_iter()
                .filter(|v| v.report.name == worker)
            {
                match view.report.revision >= revision {
                    true => applied.applied.push(view.process),
                    false => applied.pending.push(view.process),
                }
            }
            if applied.pending.is_empty() && (!somewhere || !applied.applied.is_empty()) {
                return applied;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return applied,
            }
        }
    }

    /// Delete `queues` with their messages (a queue that does not exist counts as
    /// deleted); returns how many messages each held.
    pub async fn delete_queues(&self, queues: &[String]) -> Result<Vec<(String, u32)>> {
        let conn = crate::lock(&self.inner.conn).clone();
        let Some(conn) = conn.filter(Connection::is_connected) else {
            return Err(not_connected());
        };
        let mut deleted = Vec::with_capacity(queues.len());
        for queue in queues {
            let messages = conn
                .on_channel(async |ch| match ch.delete_queue(queue).await {
                    Ok(n) => Ok(n),
                    Err(e) if reply_code(&e) == Some(NOT_FOUND) => Ok(0),
                    Err(e) => Err(Error::from(e)),
                })
                .await?;
            deleted.push((queue.clone(), messages));
        }
        Ok(deleted)
    }

    /// Stop collecting and close the connection.
    pub async fn close(&self) {
        self.inner.stop.cancel();
        let task = crate::lock(&self.inner.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

fn not_connected() -> Error {
    Error::Control(
        "the controller is not connected to the broker (it reconnects on its own); try again"
            .into(),
    )
}

/// Ask every controlled runtime to announce itself (not confirmed: a lost ping costs a
/// heartbeat's wait).
async fn ping(ch: &Channel) -> Result<()> {
    let unconfirmed = ch
        .publish(
            CONTROL_EXCHANGE,
            "ping",
            b"{}",
            BasicProperties::default(),
            false,
        )
        .await?;
    drop(unconfirmed);
    Ok(())
}

fn alive(seen: &Seen) -> bool {
    let beat = Duration::from_millis(seen.status.heartbeat_ms.clamp(100, 3_600_000));
    seen.at.elapsed() <= beat * 3 + Duration::from_secs(1)
}

async fn listen(
    inner: Arc<Inner>,
    settings: Settings,
    first: Connection,
    ready: tokio::sync::oneshot::Sender<Result<()>>,
) {
    let mut ready = Some(ready);
    let mut conn = Some(first);
    let mut pause = settings.reconnect_min;
    loop {
        let c = match conn.take() {
            Some(c) => c,
            None => match connect(&settings, &inner.stop, None).await {
                Ok(Some(c)) => c,
                Ok(None) | Err(_) => break,
            },
        };
        let started = Instant::now();
        let ended = session(&inner, &c, &mut ready).await;
        *crate::lock(&inner.channel) = None;
        *crate::lock(&inner.conn) = None;
        c.close().await;
        match ended {
            Ok(()) => break,
            Err(e) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(e));
                    return;
                }
                pause = match started.elapsed() > Duration::from_secs(30) {
                    true => settings.reconnect_min,
                    false => (pause * 2).min(settings.reconnect_max),
                };
                warn!(error = %e, retry_in = ?pause, "the controller's session ended; reconnecting");
                tokio::select! {
                    () = inner.stop.cancelled() => break,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

async fn session(
    inner: &Inner,
    conn: &Connection,
    ready: &mut Option<tokio::sync::oneshot::Sender<Result<()>>>,
) -> Result<()> {
    let ch = conn.channel().await?;
    ch.confirm_select().await?;
    ch.declare_exchange(CONTROL_EXCHANGE, "topic").await?;
    let queue = control_queue(&format!("controller.{}", inner.id));
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongUInt(60_000));
    ch.declare_queue(&queue, args).await?;
    ch.bind(&queue, CONTROL_EXCHANGE, "status.*").await?;
    ch.qos(64).await?;
    let tag = format!("rabbitry-controller-{}", inner.id);
    let mut statuses = ch.consume(&queue, &tag).await?;
    *crate::lock(&inner.channel) = Some(ch.clone());
    *crate::lock(&inner.conn) = Some(conn.clone());
    // Every controlled runtime announces itself at once.
    ping(&ch).await?;
    if let Some(ready) = ready.take() {
        let _ = ready.send(Ok(()));
    }
    let lost = conn.lost();
    tokio::pin!(lost);
    loop {
        tokio::select! {
            () = inner.stop.cancelled() => {
                let _ = ch.delete_queue(&queue).await;
                ch.close().await;
                return Ok(());
            }
            e = &mut lost => return Err(Error::Broker(e)),
            status = statuses.next() => match status {
                Some(Ok(delivery)) => {
                    ch.ack_one(delivery.tag).await?;
                    take(inner, &delivery.body);
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err(Error::QueueNotFound { queue }),
            },
        }
    }
}

/// Keep one announced status (a malformed one is logged and dropped).
fn take(inner: &Inner, body: &[u8]) {
    if body.len() > MAX_STATUS {
        warn!(bytes = body.len(), "ignoring an oversized process status");
        return;
    }
    let status: ProcessStatus = match serde_json::from_slice(body) {
        Ok(status) => status,
        Err(e) => {
            warn!(error = %e, "ignoring a malformed process status");
            return;
        }
    };
    {
        let mut seen = crate::lock(&inner.seen);
        if status.gone {
            seen.remove(&status.process);
        } else {
            let now = Instant::now();
            // Rates over at least a second: announcements after changes come close together.
            let before = seen.remove(&status.process).and_then(|s| {
                match now.duration_since(s.at) >= Duration::from_secs(1) {
                    true => Some((s.status, s.at)),
                    false => s.before,
                }
            });
            seen.insert(
                status.process.clone(),
                Seen {
                    status,
                    at: now,
                    before,
                },
            );
        }
    }
    inner.version.send_modify(|v| *v += 1);
}
