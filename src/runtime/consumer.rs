//! The consumer loop of one worker on one channel.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use std::future::Future;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::acks::{AckBook, AckOp, Settle};
use super::dispatch::{Shared, WorkerEntry, process};
use crate::broker::{Channel, Connection, Incoming};
use crate::error::Result;

/// Longest an outcome waits for its acknowledgement frame when fewer than a batch are ready.
const ACK_DELAY: Duration = Duration::from_millis(5);
/// Most deliveries acknowledged by one frame.
const MAX_ACK_BATCH: usize = 100;

/// Why a consumer ended.
#[derive(Debug, Clone)]
pub(crate) enum Exit {
    /// Asked to stop; everything finished was acknowledged.
    Stopped,
    /// The channel or connection failed; unacknowledged deliveries return to the queue.
    Lost(String),
    /// The broker cancelled the consumer (the queue was deleted).
    Cancelled,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Stopped => f.write_str("stopped"),
            Exit::Lost(e) => write!(f, "consumer channel lost: {e}"),
            Exit::Cancelled => {
                f.write_str("the broker cancelled the consumer (was the queue deleted?)")
            }
        }
    }
}

/// A running consumer.
pub(crate) struct ConsumerHandle {
    stop: Option<oneshot::Sender<Instant>>,
    task: tokio::task::JoinHandle<Exit>,
    pub(crate) generation: u64,
}

impl ConsumerHandle {
    /// Stop taking deliveries, let in-flight handlers finish until `deadline`, acknowledge,
    /// and close the channel (which returns unstarted deliveries to the queue).
    pub(crate) async fn stop(mut self, deadline: Instant) -> Exit {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(deadline);
        }
        match self.task.await {
            Ok(exit) => exit,
            Err(e) => Exit::Lost(format!("consumer task failed: {e}")),
        }
    }
}

/// Open a channel on `conn` and start consuming for `entry`. Errors (a missing queue, a
/// closed connection) are returned here; later ends are reported on `exits`.
pub(crate) async fn start(
    conn: &Connection,
    entry: Arc<WorkerEntry>,
    shared: Arc<Shared>,
    generation: u64,
    exits: mpsc::UnboundedSender<(Arc<str>, u64, Exit)>,
) -> Result<ConsumerHandle> {
    let channel = conn.channel().await?;
    channel.qos(entry.subscription.prefetch).await?;
    let tag = format!("rabbitry:{}:{}", entry.name, uuid::Uuid::now_v7());
    let stream = channel.consume(&entry.name, &tag).await?;
    let (stop_tx, stop_rx) = oneshot::channel();
    let name = entry.name.clone();
    let task = tokio::spawn(async move {
        let exit = Consumer {
            entry,
            shared,
            channel,
            tag,
        }
        .run(stream, stop_rx)
        .await;
        if !matches!(exit, Exit::Stopped) {
            let _ = exits.send((name, generation, exit.clone()));
        }
        exit
    });
    Ok(ConsumerHandle {
        stop: Some(stop_tx),
        task,
        generation,
    })
}

struct Consumer {
    entry: Arc<WorkerEntry>,
    shared: Arc<Shared>,
    channel: Channel,
    tag: String,
}

impl Consumer {
    async fn run(
        self,
        mut stream: impl Stream<Item = lapin::Result<Incoming>> + Unpin,
        mut stop: oneshot::Receiver<Instant>,
    ) -> Exit {
        let sub = &self.entry.subscription;
        let batch = (usize::from(sub.prefetch) / 2).clamp(1, MAX_ACK_BATCH);
        let mut book = AckBook::default();
        let mut tasks = FuturesUnordered::new();
        let slots = Arc::new(Slots::default());
        let flush_timer = tokio::time::sleep(ACK_DELAY);
        tokio::pin!(flush_timer);
        let mut flush_armed = false;
        // A dropped stop sender means the supervisor let go of this consumer (its connection
        // died): keep going until the stream ends rather than abandoning handlers.
        let mut stoppable = true;
        let deadline = loop {
            let free = slots.running() < sub.concurrency;
            tokio::select! {
                biased;
                deadline = &mut stop, if stoppable => match deadline {
                    Ok(deadline) => break deadline,
                    Err(_) => stoppable = false,
                },
                Some((tag, settle)) = tasks.next(), if !tasks.is_empty() => {
                    book.settled(tag, settle);
                    // Settle every handler that has finished meanwhile in this one turn.
                    while let Some(Some((tag, settle))) = tasks.next().now_or_never() {
                        book.settled(tag, settle);
                    }
                    if book.ready() >= batch {
                        flush_armed = false;
                        if let Err(e) = self.flush(&mut book, false).await {
                            return self.lost(tasks, e);
                        }
                    } else if !flush_armed && book.ready() > 0 {
                        flush_timer.as_mut().reset(Instant::now() + ACK_DELAY);
                        flush_armed = true;
                    }
                }
                () = &mut flush_timer, if flush_armed => {
                    flush_armed = false;
                    if let Err(e) = self.flush(&mut book, false).await {
                        return self.lost(tasks, e);
                    }
                }
                // Every handler slot is taken: wait for one to free up.
                () = slots.freed.notified(), if !free => {}
                next = stream.next(), if free => match next {
                    Some(Ok(msg)) => {
                        book.delivered(msg.tag);
                        tasks.push(delivery(self.entry.clone(), self.shared.clone(), msg, slots.take()));
                        // Take every delivery already buffered, up to the free handler slots.
                        while slots.running() < sub.concurrency {
                            match stream.next().now_or_never() {
                                Some(Some(Ok(msg))) => {
                                    book.delivered(msg.tag);
                                    tasks.push(delivery(self.entry.clone(), self.shared.clone(), msg, slots.take()));
                                }
                                Some(Some(Err(e))) => return self.lost(tasks, e.to_string()),
                                Some(None) => return self.cancelled(tasks),
                                None => break,
                            }
                        }
                    }
                    Some(Err(e)) => return self.lost(tasks, e.to_string()),
                    None => return self.cancelled(tasks),
                }
            }
        };
        self.stop(stream, tasks, book, deadline).await
    }

    async fn stop(
        self,
        stream: impl Stream<Item = lapin::Result<Incoming>> + Unpin,
        mut tasks: InFlight<impl Future<Output = (u64, Settle)> + Send + 'static>,
        mut book: AckBook,
        deadline: Instant,
    ) -> Exit {
        // No new deliveries; whatever the broker already sent stays unacknowledged and goes
        // back to the queue when the channel closes.
        let _ = self.channel.cancel(&self.tag).await;
        drop(stream);
        loop {
            tokio::select! {
                done = tasks.next() => match done {
                    Some((tag, settle)) => book.settled(tag, settle),
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => {
                    warn!(
                        worker = %self.entry.name,
                        in_flight = tasks.len(),
                        "shutdown grace period over; abandoning in-flight handlers (their messages return to the queue)"
                    );
                    drop(tasks); // cancels the abandoned handlers
                    break;
                }
            }
        }
        let exit = match self.flush(&mut book, true).await {
            Ok(()) => Exit::Stopped,
            Err(e) => Exit::Lost(e),
        };
        self.channel.close().await;
        debug!(worker = %self.entry.name, "consumer stopped");
        exit
    }

    /// Send the acknowledgements that are ready (all settled ones when `all`).
    async fn flush(&self, book: &mut AckBook, all: bool) -> Result<(), String> {
        let mut ops = Vec::new();
        if all {
            book.take_all_settled(&mut ops);
        } else {
            book.take_ready(&mut ops);
        }
        for op in ops {
            let sent = match op {
                AckOp::AckUpTo(tag) => self.channel.ack_up_to(tag).await,
                AckOp::AckOne(tag) => self.channel.ack_one(tag).await,
                AckOp::Requeue(tag) => self.channel.nack(tag, true).await,
            };
            sent.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn cancelled(
        &self,
        tasks: InFlight<impl Future<Output = (u64, Settle)> + Send + 'static>,
    ) -> Exit {
        warn!(worker = %self.entry.name, "the broker cancelled the consumer (was the queue deleted?)");
        finish_detached(tasks);
        Exit::Cancelled
    }

    /// The channel died: in-flight handlers finish on their own (their deliveries will be
    /// redelivered, since they can no longer be acknowledged on this channel).
    fn lost(
        &self,
        tasks: InFlight<impl Future<Output = (u64, Settle)> + Send + 'static>,
        error: String,
    ) -> Exit {
        warn!(worker = %self.entry.name, %error, in_flight = tasks.len(), "consumer channel lost");
        finish_detached(tasks);
        Exit::Lost(error)
    }
}

/// Handler runs of one consumer, driven by the consumer's own task: no task spawn and no
/// hop between threads per delivery. Handlers interleave on this task, so CPU-heavy work
/// inside a handler belongs in `tokio::task::spawn_blocking`.
type InFlight<F> = FuturesUnordered<F>;

/// One delivery from start to settlement; a panic anywhere in it requeues the delivery.
fn delivery(
    entry: Arc<WorkerEntry>,
    shared: Arc<Shared>,
    msg: Incoming,
    slot: SlotGuard,
) -> impl Future<Output = (u64, Settle)> + Send + 'static {
    let tag = msg.tag;
    async move {
        let settled = AssertUnwindSafe(process(&entry, &shared, msg, slot))
            .catch_unwind()
            .await;
        (tag, settled.unwrap_or(Settle::Requeue))
    }
}

/// The channel is gone, so these deliveries can no longer be acknowledged (the broker will
/// redeliver them); let their handlers run to the end anyway rather than cut them off.
fn finish_detached(mut tasks: InFlight<impl Future<Output = (u64, Settle)> + Send + 'static>) {
    if !tasks.is_empty() {
        tokio::spawn(async move { while tasks.next().await.is_some() {} });
    }
}

/// How many handlers run. The concurrency limit counts handler runs only: storing a retry or
/// dead-letter copy afterwards does not hold a slot (unsettled deliveries are bounded by the
/// prefetch anyway).
#[derive(Default)]
struct Slots {
    running: AtomicUsize,
    freed: Notify,
}

impl Slots {
    fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    fn take(self: &Arc<Self>) -> SlotGuard {
        self.running.fetch_add(1, Ordering::AcqRel);
        SlotGuard(self.clone())
    }
}

/// A handler slot, freed when dropped (also when the handler panics).
struct SlotGuard(Arc<Slots>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}
