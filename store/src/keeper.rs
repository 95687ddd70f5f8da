//! The keeper: workers that move what the broker carries into the store — every event
//! published (through an audit queue) and every dead letter (out of the workers' DLQs).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use rabbitry::lapin::types::AMQPValue;
use rabbitry::report::{HANDLINGS_KEY, HandlingReport, REPORTS_EXCHANGE};
use rabbitry::{
    Disposition, FailureKind, Message, Metadata, Registration, RetryPolicy, Subscription, headers,
};

use crate::batch::{Batcher, until_stored};
use crate::{DeadLetter, HandlingRecord, Store, StoredEvent};

/// Header on a replayed copy (the message id it replays): such copies are not audited again.
pub const REPLAYED_FROM: &str = "x-replayed-from";

/// Most messages one batch (one transaction) holds.
const DEFAULT_BATCH: usize = 500;
/// Longest a message waits for its batch to fill.
const DEFAULT_WAIT: Duration = Duration::from_millis(100);

/// Builds the keeper's workers for a runtime on the system's exchange:
///
/// - the audit worker consumes `<exchange>.audit` (declared, bound with `#`) and records
///   every event published to the exchange;
/// - a drainer per worker named with [`dead_letters_of`](Keeper::dead_letters_of) consumes
///   its `<worker>.dlq` (which must exist: the worker declares it) and keeps each message
///   with its failure.
///
/// Messages are acknowledged only once their batch is committed. A store that refuses a
/// batch (down, full) is tried again, with growing pauses, while the messages wait in the
/// broker; several keepers can consume the same queues (inserts are idempotent).
///
/// ```no_run
/// use rabbitry::Runtime;
/// use rabbitry_store::{Keeper, Store};
///
/// # async fn run() -> rabbitry::Result<()> {
/// let store = Store::connect("sqlite://rabbitry.db").await.expect("the store opens");
/// let keeper = Keeper::new(store, "events").dead_letters_of("orders.email");
/// let mut builder = Runtime::builder().exchange("events");
/// for worker in keeper.registrations() {
///     builder = builder.worker(worker);
/// }
/// builder.run_until_signal().await
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Keeper {
    store: Store,
    exchange: String,
    workers: Vec<String>,
    reports_queue: String,
    batch: usize,
    wait: Duration,
}

impl Keeper {
    /// A keeper of `exchange`'s events, into `store`.
    pub fn new(store: Store, exchange: impl Into<String>) -> Keeper {
        Keeper {
            store,
            exchange: exchange.into(),
            workers: Vec::new(),
            reports_queue: format!("{REPORTS_EXCHANGE}.keeper"),
            batch: DEFAULT_BATCH,
            wait: DEFAULT_WAIT,
        }
    }

    /// Also drain `worker`'s dead-letter queue (`<worker>.dlq`) into the store.
    pub fn dead_letters_of(mut self, worker: impl Into<String>) -> Keeper {
        self.workers.push(worker.into());
        self
    }

    /// Commit a batch at `max` messages (default 500, at least 1) or once its first message
    /// has waited `wait` (default 100 ms).
    pub fn batch(mut self, max: usize, wait: Duration) -> Keeper {
        self.batch = max.max(1);
        self.wait = wait;
        self
    }

    /// The queue [`handling_reports`](Keeper::handling_reports) consumes (default
    /// `rabbitry.reports.keeper`). Keepers that share a queue share the reports between
    /// them (for one store); a keeper of another store needs a queue of its own, which gets
    /// a copy of every report.
    pub fn reports_queue(mut self, queue: impl Into<String>) -> Keeper {
        self.reports_queue = queue.into();
        self
    }

    /// The audit queue's name: `<exchange>.audit`.
    pub fn audit_queue(&self) -> String {
        format!("{}.audit", self.exchange)
    }

    /// The worker that writes the runtimes' handling reports
    /// ([`HandlingReport`](rabbitry::report::HandlingReport)) to the store: register it on
    /// a runtime whose exchange is [`REPORTS_EXCHANGE`] (its queue, bound to
    /// [`HANDLINGS_KEY`], is [`reports_queue`](Keeper::reports_queue)). Each report is one
    /// transaction, acknowledged after it; a report that is not one is dead-lettered
    /// (`undecodable`).
    pub fn handling_reports(&self) -> Registration {
        let store = self.store.clone();
        let service = tower::service_fn(move |message: Message| {
            let store = store.clone();
            async move {
                let report: HandlingReport = match serde_json::from_slice(message.body()) {
                    Ok(report) => report,
                    Err(e) => {
                        let why = format!("not a handling report: {e}");
                        return Ok::<_, Infallible>(Disposition::dead_letter(
                            FailureKind::Undecodable,
                            why,
                        ));
                    }
                };
                let records: Vec<HandlingRecord> = report
                    .handlings
                    .into_iter()
                    .map(|h| {
                        let mut record = HandlingRecord::new(
                            h.id,
                            h.worker,
                            h.message_id,
                            h.attempt,
                            h.outcome,
                            h.handled_at,
                            report.host.clone(),
                        );
                        record.reason = h.reason;
                        record.duration_us = i64::try_from(h.duration_us).unwrap_or(i64::MAX);
                        record
                    })
                    .collect();
                until_stored("handling reports", || async {
                    store.record_handlings(&records).await.map(drop)
                })
                .await;
                Ok(Disposition::Ack)
            }
        });
        let subscription = self
            .subscription(self.reports_queue.clone())
            .bind(HANDLINGS_KEY);
        Registration::service(subscription, service)
    }

    /// The workers to register on a runtime whose exchange is the keeper's. Call inside a
    /// tokio runtime: each starts its committing task.
    pub fn registrations(&self) -> Vec<Registration> {
        let mut registrations = vec![self.audit()];
        registrations.extend(self.workers.iter().map(|w| self.drainer(w)));
        registrations
    }

    /// A subscription that holds a whole batch in flight and never retries or times out:
    /// a message waits for the store as long as it takes.
    fn subscription(&self, queue: String) -> Subscription {
        let in_flight = u16::try_from(self.batch * 2).unwrap_or(u16::MAX);
        Subscription::new(queue)
            .prefetch(in_flight)
            .concurrency(usize::from(in_flight))
            .retry(RetryPolicy::none())
            .no_timeout()
    }

    fn audit(&self) -> Registration {
        let store = self.store.clone();
        let batcher = Batcher::start("audit", self.batch, self.wait, move |events| {
            let store = store.clone();
            async move { store.record_events(&events).await.map(drop) }
        });
        let service = tower::service_fn(move |message: Message| {
            let batcher = batcher.clone();
            async move {
                let meta = message.metadata();
                if meta.header_str(REPLAYED_FROM).is_some() {
                    return Ok::<_, Infallible>(Disposition::skip("a replayed copy"));
                }
                let event = event_of(meta, message.body());
                Ok(match batcher.add(event).await {
                    true => Disposition::Ack,
                    false => Disposition::defer(Duration::from_secs(1), "the keeper is stopping"),
                })
            }
        });
        let subscription = self.subscription(self.audit_queue()).bind("#");
        Registration::service(subscription, service)
    }

    fn drainer(&self, worker: &str) -> Registration {
        let store = self.store.clone();
        let batcher = Batcher::start("dead letters", self.batch, self.wait, move |letters| {
            let store = store.clone();
            async move { store.record_dead_letters(&letters).await.map(drop) }
        });
        let worker: Arc<str> = worker.into();
        let queue = format!("{worker}.dlq");
        let service = tower::service_fn(move |message: Message| {
            let (batcher, worker) = (batcher.clone(), worker.clone());
            async move {
                let letter = dead_letter_of(&worker, message.metadata(), message.body());
                Ok::<_, Infallible>(match batcher.add(letter).await {
                    true => Disposition::Ack,
                    false => Disposition::defer(Duration::from_secs(1), "the keeper is stopping"),
                })
            }
        });
        Registration::service(self.subscription(queue).existing_queue(), service)
    }
}

/// What tells one dead-lettering of a message from another: the runtime's
/// `x-last-failure-at`; for a message the broker dead-lettered (a delivery limit, a TTL),
/// the time and count of its latest `x-death` entry; else the time it was redriven; else
/// nothing more (a redelivery of the same message is then recognised).
fn failure_time(meta: &Metadata) -> String {
    if let Some(at) = meta.header_str(headers::LAST_FAILURE_AT) {
        return at.to_owned();
    }
    let death = meta
        .headers()
        .and_then(|h| h.inner().get(headers::X_DEATH))
        .and_then(|v| match v {
            AMQPValue::FieldArray(deaths) => deaths.as_slice().first().cloned(),
            _ => None,
        });
    if let Some(AMQPValue::FieldTable(death)) = death {
        let time = match death.inner().get("time") {
            Some(AMQPValue::Timestamp(t)) => t.to_string(),
            _ => String::new(),
        };
        let count = match death.inner().get("count") {
            Some(AMQPValue::LongLongInt(n)) => n.to_string(),
            Some(AMQPValue::LongInt(n)) => n.to_string(),
            _ => String::new(),
        };
        return format!("x-death {time} #{count}");
    }
    match meta.header_str("x-redriven-at") {
        Some(at) => format!("redriven {at}"),
        None => "-".to_owned(),
    }
}

/// A published message as the audit records it.
fn event_of(meta: &Metadata, body: &[u8]) -> StoredEvent {
    let mut event = StoredEvent::new(
        meta.message_id(),
        meta.event_type(),
        meta.exchange(),
        meta.routing_key(),
        body,
    );
    event.properties = meta.properties().clone();
    event
}

/// A message from `worker`'s dead-letter queue, with the failure its headers tell.
fn dead_letter_of(worker: &str, meta: &Metadata, body: &[u8]) -> DeadLetter {
    let failed_at = failure_time(meta);
    let mut letter = DeadLetter::new(
        worker,
        meta.message_id(),
        failed_at,
        meta.event_type(),
        body,
    );
    letter.exchange = meta
        .header_str(headers::ORIGINAL_EXCHANGE)
        .unwrap_or(meta.exchange())
        .to_owned();
    letter.routing_key = meta
        .header_str(headers::ORIGINAL_ROUTING_KEY)
        .unwrap_or(meta.routing_key())
        .to_owned();
    letter.kind = meta.header_str(headers::EXCEPTION_KIND).map(str::to_owned);
    letter.reason = meta
        .header_str(headers::EXCEPTION_MESSAGE)
        .map(str::to_owned);
    letter.properties = meta.properties().clone();
    letter
}
