//! The consumer loop of one worker on one channel.

use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower_service::Service;
use tracing::{Instrument, debug, error, warn};

use super::acks::{AckBook, AckOp, Settle};
use super::settle::{Settling, Shared, WorkerEntry, requeue_later};
use crate::broker::{Channel, Connection, Incoming};
use crate::error::Result;
use crate::message::{Message, Metadata};
use crate::middleware::WorkerService;
use crate::observe::{Handling, Received, Settled};
use crate::panic_message;

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

/// Where a consumer reports that it ended on its own: worker, generation, why.
pub(crate) type Exits = mpsc::UnboundedSender<(Arc<str>, u64, Exit)>;

/// A running consumer, owned by the supervisor. Dropping it aborts the consumer's task (the
/// broker then requeues its unacknowledged deliveries); [`stop`](ConsumerHandle::stop) ends it
/// gracefully.
pub(crate) struct ConsumerHandle {
    stop: Option<oneshot::Sender<Instant>>,
    task: Option<JoinHandle<Exit>>,
    pub(crate) generation: u64,
    pub(crate) started: Instant,
}

impl ConsumerHandle {
    /// Stop taking deliveries, let in-flight handlers finish until `deadline`, acknowledge,
    /// and close the channel (which returns unstarted deliveries to the queue). The stop is
    /// requested at once; the future waits for the consumer's task to end.
    pub(crate) fn stop(mut self, deadline: Instant) -> impl Future<Output = Exit> + Send + 'static {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(deadline);
        }
        let task = self.task.take();
        async move {
            match task {
                Some(task) => match task.await {
                    Ok(exit) => exit,
                    Err(e) => Exit::Lost(format!("consumer task failed: {e}")),
                },
                None => Exit::Stopped,
            }
        }
    }

    /// Whether the consumer's task has ended.
    pub(crate) fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for ConsumerHandle {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
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
    exits: Exits,
) -> Result<ConsumerHandle> {
    let channel = conn.channel().await?;
    let consumed = async {
        channel.qos(entry.subscription.prefetch).await?;
        let tag = format!("rabbitry:{}:{}", entry.name, uuid::Uuid::now_v7());
        let stream = channel.consume(&entry.name, &tag).await?;
        Ok::<_, lapin::Error>((tag, stream))
    }
    .await;
    let (tag, stream) = match consumed {
        Ok(started) => started,
        Err(e) => {
            channel.close().await;
            return Err(e.into());
        }
    };
    let (stop_tx, stop_rx) = oneshot::channel();
    let service = entry.service();
    let consumer = Consumer {
        entry,
        shared,
        channel,
        tag,
        generation,
        exits,
    };
    let task = tokio::spawn(consumer.run(service, stream, stop_rx));
    Ok(ConsumerHandle {
        stop: Some(stop_tx),
        task: Some(task),
        generation,
        started: Instant::now(),
    })
}

struct Consumer {
    entry: Arc<WorkerEntry>,
    shared: Arc<Shared>,
    channel: Channel,
    tag: String,
    generation: u64,
    exits: Exits,
}

/// How a stop request arrives: the deadline for in-flight handlers, or `None` once the
/// supervisor let go of this consumer.
struct StopSignal {
    rx: oneshot::Receiver<Instant>,
    open: bool,
}

impl StopSignal {
    /// The deadline, once a stop is requested; pending forever if it never can be.
    async fn requested(&mut self) -> Instant {
        if self.open {
            match (&mut self.rx).await {
                Ok(deadline) => return deadline,
                Err(_) => self.open = false,
            }
        }
        std::future::pending().await
    }
}

impl Consumer {
    /// Consume until stopped or until the channel ends; a panic in the loop is reported as
    /// a lost channel, never swallowed.
    async fn run(
        self,
        service: WorkerService,
        stream: impl Stream<Item = lapin::Result<Incoming>> + Send + Unpin + 'static,
        stop: oneshot::Receiver<Instant>,
    ) -> Exit {
        let (name, generation, exits) =
            (self.entry.name.clone(), self.generation, self.exits.clone());
        let stop = StopSignal {
            rx: stop,
            open: true,
        };
        match AssertUnwindSafe(self.consume(service, stream, stop))
            .catch_unwind()
            .await
        {
            Ok(exit) => exit,
            Err(panic) => {
                let exit = Exit::Lost(format!("consumer panicked: {}", panic_message(&*panic)));
                error!(worker = %name, %exit, "consumer ended");
                let _ = exits.send((name, generation, exit.clone()));
                exit
            }
        }
    }

    async fn consume(
        self,
        mut service: WorkerService,
        mut stream: impl Stream<Item = lapin::Result<Incoming>> + Unpin,
        mut stop: StopSignal,
    ) -> Exit {
        let sub = &self.entry.subscription;
        let (concurrency, batch) = (
            sub.concurrency,
            (usize::from(sub.prefetch) / 2).clamp(1, MAX_ACK_BATCH),
        );
        let mut book = AckBook::default();
        let mut tasks = FuturesUnordered::new();
        let slots = Arc::new(Slots::default());
        let flush_timer = tokio::time::sleep(ACK_DELAY);
        tokio::pin!(flush_timer);
        let mut flush_armed = false;
        // The stack said it can take a message (poll_ready); reset by each call.
        let mut ready = false;
        let deadline = loop {
            let free = slots.running() < concurrency;
            tokio::select! {
                biased;
                deadline = stop.requested() => break deadline,
                Some((tag, settle)) = tasks.next(), if !tasks.is_empty() => {
                    book.settled(tag, settle);
                    // Settle every handler that has finished meanwhile in this one turn.
                    while let Some(Some((tag, settle))) = tasks.next().now_or_never() {
                        book.settled(tag, settle);
                    }
                    if book.ready() >= batch {
                        flush_armed = false;
                        if let Err(e) = self.flush(&mut book, false).await {
                            return self.lost(tasks, stop, e).await;
                        }
                    } else if !flush_armed && book.ready() > 0 {
                        flush_timer.as_mut().reset(Instant::now() + ACK_DELAY);
                        flush_armed = true;
                    }
                }
                () = &mut flush_timer, if flush_armed => {
                    flush_armed = false;
                    if let Err(e) = self.flush(&mut book, false).await {
                        return self.lost(tasks, stop, e).await;
                    }
                }
                // Every handler slot is taken: wait for one to free up.
                () = slots.freed.notified(), if !free => {}
                // Take nothing until the stack can: back-pressure stays in the broker.
                _ = poll_fn(|cx| service.poll_ready(cx)), if free && !ready => ready = true,
                next = stream.next(), if free && ready => match next {
                    Some(Ok(msg)) => {
                        ready = false;
                        tasks.push(self.take(&mut service, msg, &mut book, &slots));
                        // Take every delivery already buffered, while the stack is ready
                        // and handler slots are free.
                        while slots.running() < concurrency {
                            if poll_fn(|cx| service.poll_ready(cx)).now_or_never().is_none() {
                                break;
                            }
                            ready = true;
                            match stream.next().now_or_never() {
                                Some(Some(Ok(msg))) => {
                                    ready = false;
                                    tasks.push(self.take(&mut service, msg, &mut book, &slots));
                                }
                                Some(Some(Err(e))) => return self.lost(tasks, stop, e.to_string()).await,
                                Some(None) => return self.cancelled(tasks, stop, book).await,
                                None => break,
                            }
                        }
                    }
                    Some(Err(e)) => return self.lost(tasks, stop, e.to_string()).await,
                    None => return self.cancelled(tasks, stop, book).await,
                }
            }
        };
        self.stop(stream, tasks, book, deadline).await
    }

    /// Hand one delivery to the stack (which is ready); the future settles it.
    fn take(
        &self,
        service: &mut WorkerService,
        msg: Incoming,
        book: &mut AckBook,
        slots: &Arc<Slots>,
    ) -> impl Future<Output = (u64, Settle)> + Send + 'static {
        book.delivered(msg.tag);
        let metadata = Arc::new(
            Metadata::new(
                self.entry.name.clone(),
                msg.exchange,
                msg.routing_key,
                msg.redelivered,
                msg.properties,
            )
            .with_retry_policy(&self.entry.subscription.retry),
        );
        let body = Bytes::from(msg.body);
        let span = delivery_span(&metadata);
        if !self.shared.observers.is_empty() {
            self.shared.observers.received(&Received {
                worker: &self.entry.name,
                metadata: &metadata,
                span: &span,
            });
        }
        let slot = slots.take();
        let started = Instant::now();
        let handled = span.in_scope(|| service.call(Message::new(metadata.clone(), body.clone())));
        let (entry, shared, tag) = (self.entry.clone(), self.shared.clone(), msg.tag);
        // Made now, so that even a future dropped before its first poll reports the
        // delivery the observers were told about.
        let unsettled = {
            let (entry, shared, metadata) = (entry.clone(), shared.clone(), metadata.clone());
            Unsettled(Some(move || {
                shared.observers.settled(&Settled {
                    worker: &entry.name,
                    metadata: &metadata,
                    handling: &Handling::Requeued,
                    failure: None,
                    duration: started.elapsed(),
                })
            }))
        };
        let settled = async move {
            let settling = async {
                let Ok(disposition) = handled.await;
                let duration = started.elapsed();
                drop(slot);
                Settling {
                    entry: &entry,
                    shared: &shared,
                    metadata: &metadata,
                    body: &body,
                    duration,
                }
                .settle(disposition)
                .await
            };
            (tag, guarded(settling, unsettled).await)
        };
        settled.instrument(span)
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

    /// The broker cancelled the consumer; its channel is still open, so the deliveries of
    /// handlers still running are acknowledged as they finish (a queue that comes back,
    /// after a node failover say, does not redeliver them).
    async fn cancelled(
        self,
        tasks: InFlight<impl Future<Output = (u64, Settle)> + Send + 'static>,
        stop: StopSignal,
        mut book: AckBook,
    ) -> Exit {
        warn!(worker = %self.entry.name, "the broker cancelled the consumer (was the queue deleted?)");
        let exit = self
            .ended(Exit::Cancelled, tasks, stop, Some(&mut book))
            .await;
        if let Err(e) = self.flush(&mut book, true).await {
            debug!(worker = %self.entry.name, error = %e, "acknowledging after a cancel failed; the broker redelivers");
        }
        self.channel.close().await;
        exit
    }

    /// The channel died: in-flight handlers finish on their own (their deliveries will be
    /// redelivered, since they can no longer be acknowledged on this channel).
    async fn lost(
        self,
        tasks: InFlight<impl Future<Output = (u64, Settle)> + Send + 'static>,
        stop: StopSignal,
        error: String,
    ) -> Exit {
        warn!(worker = %self.entry.name, %error, in_flight = tasks.len(), "consumer channel lost");
        self.ended(Exit::Lost(error), tasks, stop, None).await
    }

    /// Report the end at once, so the supervisor can start a new consumer, then let the
    /// handlers still running finish — until the stop deadline, when one is given.
    /// Report the end at once, so the supervisor can start a new consumer, then let the
    /// handlers still running finish — until the stop deadline, when one is given —
    /// recording their outcomes in `book` when the channel can still acknowledge them.
    async fn ended(
        &self,
        exit: Exit,
        mut tasks: InFlight<impl Future<Output = (u64, Settle)> + Send + 'static>,
        mut stop: StopSignal,
        mut book: Option<&mut AckBook>,
    ) -> Exit {
        let _ = self
            .exits
            .send((self.entry.name.clone(), self.generation, exit.clone()));
        let mut deadline = None;
        loop {
            let until = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                done = tasks.next() => match done {
                    Some((tag, settle)) => {
                        if let Some(book) = book.as_deref_mut() {
                            book.settled(tag, settle);
                        }
                    }
                    None => return exit,
                },
                at = stop.requested(), if deadline.is_none() => deadline = Some(at),
                () = until => {
                    debug!(worker = %self.entry.name, "abandoning the handlers of an ended consumer at the deadline");
                    return exit;
                }
            }
        }
    }
}

/// Run a delivery to its settlement; a panic on the way (a bug: the stack has its own panic
/// guard) is logged, reported through `unsettled`, and the delivery requeued after a pause,
/// so it cannot spin. A settlement abandoned half-way (the shutdown grace period is over)
/// is reported through `unsettled` when it is dropped: its message goes back to the queue
/// with the channel.
async fn guarded<F: FnOnce()>(
    settling: impl Future<Output = Settle>,
    mut unsettled: Unsettled<F>,
) -> Settle {
    match AssertUnwindSafe(settling).catch_unwind().await {
        Ok(settle) => {
            unsettled.0 = None;
            settle
        }
        Err(panic) => {
            error!(
                panic = panic_message(&*panic),
                "settling a delivery panicked; requeueing it after a pause"
            );
            if let Some(report) = unsettled.0.take() {
                report();
            }
            requeue_later().await
        }
    }
}

/// Reports a delivery whose settlement was dropped before it finished.
struct Unsettled<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for Unsettled<F> {
    fn drop(&mut self) {
        if let Some(report) = self.0.take() {
            report();
        }
    }
}

/// The span a delivery is handled and settled in, with the OpenTelemetry messaging
/// attributes for RabbitMQ. A root span: a trace context in the message's headers is made
/// its parent by an observer ([`Observer::received`](crate::observe::Observer::received)).
fn delivery_span(meta: &Metadata) -> tracing::Span {
    tracing::info_span!(
        parent: None,
        "delivery",
        otel.name = %format_args!("process {}", meta.queue()),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        worker = %meta.queue(),
        event_type = %meta.event_type(),
        attempt = meta.attempt(),
        outcome = tracing::field::Empty,
        error.type = tracing::field::Empty,
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %meta.exchange(),
        messaging.rabbitmq.destination.routing_key = %meta.routing_key(),
        messaging.message.id = %meta.message_id(),
        messaging.message.conversation_id = meta.correlation_id(),
    )
}

/// Handler runs of one consumer, driven by the consumer's own task: no task spawn and no
/// hop between threads per delivery. Handlers interleave on this task, so CPU-heavy work
/// inside a handler belongs in `tokio::task::spawn_blocking`.
type InFlight<F> = FuturesUnordered<F>;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::settle::REQUEUE_DELAY;

    #[tokio::test(start_paused = true)]
    async fn a_panic_while_settling_requeues_after_a_pause() {
        let before = Instant::now();
        let mut reported = false;
        let settle = guarded(
            async { panic!("storing the copy blew up") },
            Unsettled(Some(|| reported = true)),
        )
        .await;
        assert_eq!(settle, Settle::Requeue);
        assert!(reported, "observers hear of the requeue");
        assert_eq!(Instant::now() - before, REQUEUE_DELAY);
        assert_eq!(
            guarded(
                async { Settle::Ack },
                Unsettled(Some(|| panic!("not called")))
            )
            .await,
            Settle::Ack
        );
    }

    #[tokio::test]
    async fn an_abandoned_settlement_is_reported_as_requeued() {
        let reported = std::sync::atomic::AtomicBool::new(false);
        let report = || reported.store(true, Ordering::SeqCst);
        let settling = guarded(std::future::pending::<Settle>(), Unsettled(Some(report)));
        assert!(settling.now_or_never().is_none());
        assert!(reported.load(Ordering::SeqCst), "dropped before it settled");
        reported.store(false, Ordering::SeqCst);
        drop(guarded(
            std::future::pending::<Settle>(),
            Unsettled(Some(report)),
        ));
        assert!(
            reported.load(Ordering::SeqCst),
            "dropped before its first poll"
        );
    }
}
