//! Handling reports to the store's keeper: batched, through the broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rabbitry::observe::{Handling, Observer, Settled};
use rabbitry::report::{HANDLINGS_KEY, HandlingReport, REPORTS_EXCHANGE, ReportedHandling};
use rabbitry::{Publisher, Subscription, Topology};
use std::sync::Mutex;

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// Most handlings one report carries.
const REPORT_SIZE: usize = 100;
/// Longest a handling waits for its report to fill.
const REPORT_WAIT: Duration = Duration::from_millis(100);
/// Handlings waiting to be sent before new ones are dropped (and counted).
const BACKLOG: usize = 10_000;
/// Attempts to send one report before it is dropped.
const SEND_ATTEMPTS: u32 = 3;
/// Longest `close` waits for the last reports to go out.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);
/// Longest reason carried in a report.
const MAX_REASON: usize = 1024;

/// An [`Observer`] that reports every settled delivery to the store's keeper
/// ([`REPORTS_EXCHANGE`], routing key [`HANDLINGS_KEY`]): one message per 100 outcomes or
/// per 100 ms, from a publisher of its own (connected when first needed), so a worker needs
/// no database credentials. The keeper's `handling_reports` worker writes them to the store.
///
/// Reports are telemetry, not the messages themselves: when the broker cannot take them
/// (three attempts), or more than 10,000 wait, they are dropped and counted
/// ([`dropped`](HandlingReports::dropped)) — never a delivery held up.
///
/// ```no_run
/// # async fn run(builder: rabbitry::RuntimeBuilder) -> rabbitry::Result<()> {
/// let url = std::env::var("AMQP_URL").unwrap_or_else(|_| rabbitry::DEFAULT_URL.into());
/// let reports = rabbitry_observe::HandlingReports::start(&url)?;
/// let runtime = builder.url(url).observer(reports).start().await?;
/// # let _ = runtime; Ok(()) }
/// ```
#[derive(Clone)]
pub struct HandlingReports {
    tx: mpsc::Sender<ReportedHandling>,
    dropped: Arc<AtomicU64>,
    stop: Arc<Notify>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for HandlingReports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlingReports")
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl HandlingReports {
    /// Start reporting to the broker at `url` (call inside a tokio runtime: the sending task
    /// is spawned; it ends when every clone of the observer is dropped).
    pub fn start(url: &str) -> rabbitry::Result<HandlingReports> {
        let publisher = Publisher::builder(url.to_owned())
            .exchange(REPORTS_EXCHANGE)
            .connection_name("rabbitry:reports")
            .build()?;
        let (tx, rx) = mpsc::channel(BACKLOG);
        let dropped = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn(send_reports(
            rx,
            publisher,
            url.to_owned(),
            dropped.clone(),
            stop.clone(),
        ));
        Ok(HandlingReports {
            tx,
            dropped,
            stop,
            task: Arc::new(Mutex::new(Some(task))),
        })
    }

    /// Send what is waiting (for at most 5 s: a broker that is away does not hold up the
    /// process's exit; what is left is dropped), close the connection and stop reporting.
    /// Call it after the runtime has shut down, before the process ends (an open
    /// connection at exit is torn down mid-flight).
    pub async fn close(&self) {
        self.stop.notify_one();
        let task = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(mut task) = task
            && tokio::time::timeout(CLOSE_WITHIN, &mut task).await.is_err()
        {
            task.abort();
            warn!("handling reports still unsent after {CLOSE_WITHIN:?} at close: dropped");
        }
    }

    /// Handlings that were not reported (the backlog was full, or the broker refused).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Observer for HandlingReports {
    fn settled(&self, settled: &Settled<'_>) {
        let reason = match settled.handling {
            Handling::Skipped { reason } | Handling::Deferred { reason, .. } => {
                Some(reason.clone())
            }
            Handling::DeadLettered { reason, .. } => Some(reason.clone()),
            _ => settled.failure.map(ToString::to_string),
        };
        let mut handling = ReportedHandling::new(
            uuid::Uuid::now_v7().to_string(),
            settled.worker,
            settled.metadata.message_id(),
            settled.metadata.attempt(),
            settled.handling.as_str(),
            u64::try_from(settled.duration.as_micros()).unwrap_or(u64::MAX),
            now_ms(),
        );
        handling.reason = reason.map(|r| truncate(r, MAX_REASON));
        if self.tx.try_send(handling).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
    s
}

/// This process, for reports: the host name and the process id.
fn host() -> String {
    let name = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{name}:{}", std::process::id())
}

async fn send_reports(
    mut rx: mpsc::Receiver<ReportedHandling>,
    publisher: Publisher,
    url: String,
    dropped: Arc<AtomicU64>,
    stop: Arc<Notify>,
) {
    let host = host();
    let mut declared = false;
    let mut stopping = false;
    loop {
        let first = tokio::select! {
            first = rx.recv(), if !stopping => first,
            () = stop.notified(), if !stopping => {
                stopping = true;
                continue;
            }
            // Stopping: send what is left, without waiting for more.
            () = std::future::ready(()), if stopping => rx.try_recv().ok(),
        };
        let Some(first) = first else { break };
        let deadline = tokio::time::Instant::now() + REPORT_WAIT;
        let mut handlings = vec![first];
        while handlings.len() < REPORT_SIZE {
            if stopping {
                match rx.try_recv() {
                    Ok(h) => handlings.push(h),
                    Err(_) => break,
                }
                continue;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(h)) => handlings.push(h),
                Ok(None) | Err(_) => break,
            }
        }
        let count = handlings.len() as u64;
        let report = HandlingReport::new(host.clone(), handlings);
        let mut sent = false;
        for attempt in 1..=SEND_ATTEMPTS {
            if !declared {
                // The keeper declares the exchange too; whoever comes first.
                let topology = Topology::new(REPORTS_EXCHANGE, std::iter::empty::<&Subscription>());
                declared = topology.declare(&url).await.is_ok();
            }
            let published = publisher
                .message(&report)
                .routing_key(HANDLINGS_KEY)
                .allow_unroutable()
                .send()
                .await;
            match published {
                Ok(_) => {
                    sent = true;
                    break;
                }
                Err(e) => {
                    debug!(error = %e, attempt, "sending a handling report failed");
                    declared = false;
                    tokio::time::sleep(Duration::from_millis(200) * attempt).await;
                }
            }
        }
        if !sent {
            dropped.fetch_add(count, Ordering::Relaxed);
            warn!(
                handlings = count,
                "a handling report could not be sent; dropped"
            );
        }
    }
    publisher.close().await;
}
