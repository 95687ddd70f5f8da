//! The consumer loop of one worker on one channel.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
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
        let mut tasks: JoinSet<(u64, Settle)> = JoinSet::new();
        let mut flush_at: Option<Instant> = None;
        // A dropped stop sender means the supervisor let go of this consumer (its connection
        // died): keep going until the stream ends rather than abandoning handlers.
        let mut stoppable = true;
        let deadline = loop {
            tokio::select! {
                biased;
                deadline = &mut stop, if stoppable => match deadline {
                    Ok(deadline) => break deadline,
                    Err(_) => stoppable = false,
                },
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    // Tasks catch their own panics; a join error means the task was aborted.
                    if let Ok((tag, settle)) = joined {
                        book.settled(tag, settle);
                    }
                    if book.ready() >= batch {
                        flush_at = None;
                        if let Err(e) = self.flush(&mut book, false).await {
                            return self.lost(tasks, e);
                        }
                    } else if flush_at.is_none() && book.ready() > 0 {
                        flush_at = Some(Instant::now() + ACK_DELAY);
                    }
                }
                () = sleep_until(flush_at), if flush_at.is_some() => {
                    flush_at = None;
                    if let Err(e) = self.flush(&mut book, false).await {
                        return self.lost(tasks, e);
                    }
                }
                next = stream.next(), if tasks.len() < sub.concurrency => match next {
                    Some(Ok(msg)) => {
                        book.delivered(msg.tag);
                        let (entry, shared) = (self.entry.clone(), self.shared.clone());
                        tasks.spawn(async move {
                            let tag = msg.tag;
                            let settled = AssertUnwindSafe(process(&entry, &shared, msg)).catch_unwind().await;
                            (tag, settled.unwrap_or(Settle::Requeue))
                        });
                    }
                    Some(Err(e)) => return self.lost(tasks, e.to_string()),
                    None => {
                        warn!(worker = %self.entry.name, "the broker cancelled the consumer (was the queue deleted?)");
                        tasks.detach_all();
                        return Exit::Cancelled;
                    }
                }
            }
        };
        self.stop(stream, tasks, book, deadline).await
    }

    async fn stop(
        self,
        stream: impl Stream<Item = lapin::Result<Incoming>> + Unpin,
        mut tasks: JoinSet<(u64, Settle)>,
        mut book: AckBook,
        deadline: Instant,
    ) -> Exit {
        // No new deliveries; whatever the broker already sent stays unacknowledged and goes
        // back to the queue when the channel closes.
        let _ = self.channel.cancel(&self.tag).await;
        drop(stream);
        loop {
            tokio::select! {
                joined = tasks.join_next() => match joined {
                    Some(Ok((tag, settle))) => book.settled(tag, settle),
                    Some(Err(_)) => {}
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => {
                    warn!(
                        worker = %self.entry.name,
                        in_flight = tasks.len(),
                        "shutdown grace period over; abandoning in-flight handlers (their messages return to the queue)"
                    );
                    tasks.abort_all();
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

    /// The channel died: in-flight handlers finish on their own (their deliveries will be
    /// redelivered, since they can no longer be acknowledged on this channel).
    fn lost(&self, mut tasks: JoinSet<(u64, Settle)>, error: String) -> Exit {
        warn!(worker = %self.entry.name, %error, in_flight = tasks.len(), "consumer channel lost");
        tasks.detach_all();
        Exit::Lost(error)
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
