//! One delivery, start to finish: checks, decoding, the handler run (with timeout and panic
//! catching), and turning the outcome into an acknowledgement, a retry or a dead-letter.

use std::any::Any;
use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use lapin::BasicProperties;
use lapin::types::AMQPValue;
use tracing::{Instrument, error, info_span, warn};

use super::acks::Settle;
use crate::broker::{Connection, Incoming};
use crate::context::Context;
use crate::error::Error;
use crate::event::{Delivery, Envelope};
use crate::headers;
use crate::outcome::{Action, Failure, FailureKind, Outcome};
use crate::publisher::Publisher;
use crate::retry::tier_for_delay;
use crate::testing::{Handling, Recorder};
use crate::topology::{self, Topology, dlx_name, retry_queue_name};
use crate::worker::{Subscription, Worker};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Pause before requeueing a message whose retry or dead-letter copy could not be stored.
const REQUEUE_DELAY: Duration = Duration::from_secs(1);

/// A worker with its event type erased, so the runtime can hold workers of many types.
pub(crate) trait ErasedWorker: Send + Sync + 'static {
    /// Decode `body` and run the handler. `Err` means the body did not decode.
    fn run<'a>(
        &'a self,
        body: &'a [u8],
        envelope: Arc<Envelope>,
        ctx: &'a Context,
    ) -> BoxFuture<'a, Result<Outcome, serde_json::Error>>;
}

impl<W: Worker> ErasedWorker for W {
    fn run<'a>(
        &'a self,
        body: &'a [u8],
        envelope: Arc<Envelope>,
        ctx: &'a Context,
    ) -> BoxFuture<'a, Result<Outcome, serde_json::Error>> {
        match serde_json::from_slice::<W::Event>(body) {
            Ok(event) => {
                Box::pin(async move { Ok(self.handle(Delivery::new(event, envelope), ctx).await) })
            }
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }
}

/// A registered worker and everything derived from its subscription.
pub(crate) struct WorkerEntry {
    pub(crate) name: Arc<str>,
    pub(crate) subscription: Subscription,
    pub(crate) worker: Box<dyn ErasedWorker>,
    pub(crate) handler: &'static str,
    pub(crate) event_type: &'static str,
}

impl WorkerEntry {
    pub(crate) fn new<W: Worker>(worker: W) -> Result<WorkerEntry, Error> {
        let subscription = worker.subscription();
        subscription.validate()?;
        Ok(WorkerEntry {
            name: subscription.queue.as_str().into(),
            subscription,
            worker: Box::new(worker),
            handler: std::any::type_name::<W>(),
            event_type: std::any::type_name::<W::Event>(),
        })
    }

    /// Declare this worker's part of the topology (idempotent).
    pub(crate) async fn declare(&self, conn: &Connection, exchange: &str) -> Result<(), Error> {
        Topology::new(exchange, [&self.subscription])
            .declare(conn)
            .await
    }
}

/// What every delivery of a runtime shares.
pub(crate) struct Shared {
    pub(crate) exchange: String,
    pub(crate) publisher: Publisher,
    pub(crate) max_body: usize,
    /// Retry tiers declared on demand for `retry_after` delays.
    pub(crate) extra_tiers: Mutex<HashSet<String>>,
    /// Told how each delivery ended (the testing harness).
    pub(crate) recorder: Option<Arc<Recorder>>,
}

/// Handle one delivery and say how to settle it. `slot` is dropped as soon as the handler
/// has finished, before any retry or dead-letter copy is stored.
pub(crate) async fn process(
    entry: &WorkerEntry,
    shared: &Shared,
    msg: Incoming,
    slot: impl Send,
) -> Settle {
    let Incoming {
        exchange,
        routing_key,
        redelivered,
        properties,
        body,
        ..
    } = msg;
    let envelope = Arc::new(Envelope::new(
        entry.name.clone(),
        exchange,
        routing_key,
        redelivered,
        properties,
    ));
    let span = info_span!(
        "delivery",
        worker = %entry.name,
        event_type = %envelope.event_type(),
        message_id = %envelope.message_id(),
        attempt = envelope.attempt(),
    );
    async {
        let failure = match check(&envelope, &body, shared.max_body) {
            Ok(()) => run(entry, shared, &envelope, &body).await,
            Err(failure) => Some(failure),
        };
        drop(slot);
        let (settle, handling) = match failure {
            None => (Settle::Ack, Handling::Handled),
            Some(failure) => fail(entry, shared, &envelope, &body, failure).await,
        };
        if let Some(recorder) = &shared.recorder {
            recorder.record(&entry.name, &envelope, handling);
        }
        settle
    }
    .instrument(span)
    .await
}

/// Refuse what cannot be decoded as JSON before decoding it.
fn check(envelope: &Envelope, body: &[u8], max_body: usize) -> Result<(), Failure> {
    let undecodable = |msg: String| {
        Err(Failure::new(
            Action::Reject,
            FailureKind::Undecodable,
            msg.into(),
        ))
    };
    if body.len() > max_body {
        return undecodable(format!(
            "body is {} bytes, over the limit of {max_body} bytes",
            body.len()
        ));
    }
    if let Some(encoding) = envelope.properties.content_encoding() {
        let e = encoding.as_str().trim();
        if !(e.is_empty() || e.eq_ignore_ascii_case("identity") || e.eq_ignore_ascii_case("utf-8"))
        {
            return undecodable(format!(
                "unsupported content encoding '{e}' (only plain JSON is read)"
            ));
        }
    }
    if let Some(ct) = envelope.properties.content_type() {
        let mime = ct
            .as_str()
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let json = mime.is_empty()
            || mime == "application/json"
            || mime == "text/json"
            || mime.ends_with("+json");
        if !json {
            return undecodable(format!(
                "unsupported content type '{mime}' (expected application/json)"
            ));
        }
    }
    Ok(())
}

/// Run the handler; `None` when it succeeded.
async fn run(
    entry: &WorkerEntry,
    shared: &Shared,
    envelope: &Arc<Envelope>,
    body: &[u8],
) -> Option<Failure> {
    let ctx = Context::new(shared.publisher.clone(), envelope.clone());
    // Decoding runs inside the guard too: a panicking Deserialize impl is a failure, not a crash.
    let guarded = AssertUnwindSafe(async { entry.worker.run(body, envelope.clone(), &ctx).await })
        .catch_unwind();
    let result = match entry.subscription.timeout {
        Some(limit) => match tokio::time::timeout(limit, guarded).await {
            Ok(r) => r,
            Err(_) => {
                let msg = format!("handler did not finish within {limit:?}");
                return Some(Failure::new(
                    Action::Retry,
                    FailureKind::Timeout,
                    msg.into(),
                ));
            }
        },
        None => guarded.await,
    };
    match result {
        Ok(Ok(Ok(()))) => None,
        Ok(Ok(Err(failure))) => Some(failure),
        Ok(Err(decode)) => {
            let msg = format!("cannot decode the body as {}: {decode}", entry.event_type);
            Some(Failure::new(
                Action::Reject,
                FailureKind::Undecodable,
                msg.into(),
            ))
        }
        Err(panic) => {
            let msg = format!("handler panicked: {}", panic_message(&*panic));
            Some(Failure::new(Action::Retry, FailureKind::Panic, msg.into()))
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a non-string panic payload)")
}

/// Retry or dead-letter a failed delivery. The copy is confirmed before the original is
/// acknowledged; if it cannot be, the original goes back to the queue.
async fn fail(
    entry: &WorkerEntry,
    shared: &Shared,
    envelope: &Envelope,
    body: &[u8],
    failure: Failure,
) -> (Settle, Handling) {
    let attempt = envelope.attempt();
    let policy = &entry.subscription.retry;
    let retry_tier = match failure.action() {
        Action::Reject => None,
        _ if attempt >= policy.attempts() => None,
        Action::Retry => Some(policy.tier_ms(attempt)),
        Action::RetryAfter(delay) => Some(tier_for_delay(delay)),
    };
    let (exchange, routing_key) = match retry_tier {
        Some(ms) => {
            warn!(error = %failure, kind = %failure.kind(), delay_ms = ms, "handler failed; retrying");
            (String::new(), retry_queue_name(&entry.name, ms))
        }
        None => {
            if failure.action() == Action::Reject {
                warn!(error = %failure, kind = %failure.kind(), "message rejected; dead-lettering");
            } else {
                error!(error = %failure, kind = %failure.kind(), attempts = attempt, "retries exhausted; dead-lettering");
            }
            (dlx_name(&shared.exchange), entry.name.to_string())
        }
    };
    let handling = match retry_tier {
        Some(ms) => Handling::Retried {
            delay: Duration::from_millis(ms),
        },
        None => Handling::DeadLettered {
            kind: failure.kind(),
            reason: failure.to_string(),
        },
    };
    if let Some(ms) = retry_tier
        && !policy.tiers().contains(&ms)
        && let Err(e) = ensure_tier(entry, shared, &routing_key, ms).await
    {
        error!(error = %e, queue = %routing_key, "cannot declare the retry queue; requeueing");
        return (requeue_later().await, Handling::Requeued);
    }
    let properties = failure_properties(entry, envelope, &failure, retry_tier.is_some());
    let mut result = shared
        .publisher
        .send_raw(&exchange, &routing_key, body, properties.clone())
        .await;
    if let Err(Error::Unroutable { .. }) = result {
        // Someone deleted a retry queue or the dead-letter queue: put the topology back.
        warn!(worker = %entry.name, "retry or dead-letter queue is missing; re-declaring the worker's topology");
        result = match redeclare(entry, shared).await {
            Ok(()) => {
                shared
                    .publisher
                    .send_raw(&exchange, &routing_key, body, properties)
                    .await
            }
            Err(e) => Err(e),
        };
    }
    match result {
        Ok(()) => (Settle::Ack, handling),
        Err(e) => {
            error!(error = %e, "could not store the retry or dead-letter copy; requeueing the message");
            (requeue_later().await, Handling::Requeued)
        }
    }
}

/// Give a message back to its queue after a pause, so that a failure that persists (a
/// deleted dead-letter exchange, a broker refusing messages) cannot spin the worker.
async fn requeue_later() -> Settle {
    tokio::time::sleep(REQUEUE_DELAY).await;
    Settle::Requeue
}

async fn ensure_tier(
    entry: &WorkerEntry,
    shared: &Shared,
    name: &str,
    ms: u64,
) -> Result<(), Error> {
    let known = shared
        .extra_tiers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(name);
    if !known {
        let ch = shared.publisher.declaring_channel().await?;
        topology::declare_retry_tier(&ch, &entry.name, ms).await?;
        shared
            .extra_tiers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned());
    }
    Ok(())
}

async fn redeclare(entry: &WorkerEntry, shared: &Shared) -> Result<(), Error> {
    let conn = shared.publisher.connection().await?;
    entry.declare(&conn, &shared.exchange).await?;
    shared
        .extra_tiers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    Ok(())
}

/// The received properties with the failure headers of DESIGN.md added.
fn failure_properties(
    entry: &WorkerEntry,
    envelope: &Envelope,
    failure: &Failure,
    retrying: bool,
) -> BasicProperties {
    let now = headers::timestamp(SystemTime::now());
    let mut h = envelope.properties.headers().clone().unwrap_or_default();
    let retries = if retrying {
        envelope.attempt()
    } else {
        envelope.retry_count
    };
    headers::set(
        &mut h,
        headers::RETRY_COUNT,
        AMQPValue::LongLongInt(retries.into()),
    );
    if headers::get_str(Some(&h), headers::FIRST_FAILURE_AT).is_none() {
        headers::set(&mut h, headers::FIRST_FAILURE_AT, headers::string(&now));
    }
    headers::set(&mut h, headers::LAST_FAILURE_AT, headers::string(&now));
    let message = headers::truncate(&failure.to_string(), headers::MAX_EXCEPTION_MESSAGE);
    headers::set(
        &mut h,
        headers::EXCEPTION_MESSAGE,
        headers::string(&message),
    );
    headers::set(
        &mut h,
        headers::EXCEPTION_KIND,
        headers::string(failure.kind().as_str()),
    );
    headers::set(&mut h, headers::HANDLER, headers::string(entry.handler));
    headers::set(
        &mut h,
        headers::ORIGINAL_EXCHANGE,
        headers::string(&envelope.exchange),
    );
    headers::set(
        &mut h,
        headers::ORIGINAL_ROUTING_KEY,
        headers::string(&envelope.routing_key),
    );
    headers::set(
        &mut h,
        headers::ORIGINAL_QUEUE,
        headers::string(&entry.name),
    );
    envelope
        .properties
        .clone()
        .with_headers(h)
        .with_message_id(envelope.message_id().into())
        .with_delivery_mode(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(props: BasicProperties) -> Envelope {
        Envelope::new(
            "q".into(),
            "events".into(),
            "order.placed".into(),
            false,
            props,
        )
    }

    fn kind_of(r: Result<(), Failure>) -> Option<(FailureKind, String)> {
        r.err().map(|f| (f.kind(), f.to_string()))
    }

    #[test]
    fn json_and_missing_content_types_pass() {
        for ct in [
            "application/json",
            "application/json; charset=utf-8",
            "application/vnd.x+json",
            "text/json",
        ] {
            let e = envelope(BasicProperties::default().with_content_type(ct.into()));
            assert!(check(&e, b"{}", 10).is_ok(), "{ct}");
        }
        assert!(check(&envelope(BasicProperties::default()), b"{}", 10).is_ok());
    }

    #[test]
    fn foreign_encodings_and_oversized_bodies_are_undecodable() {
        let e = envelope(BasicProperties::default().with_content_type("text/plain".into()));
        let (kind, msg) = kind_of(check(&e, b"{}", 10)).unwrap();
        assert_eq!(kind, FailureKind::Undecodable);
        assert!(msg.contains("text/plain"), "{msg}");
        let e = envelope(BasicProperties::default().with_content_encoding("gzip".into()));
        assert!(kind_of(check(&e, b"{}", 10)).unwrap().1.contains("gzip"));
        let e = envelope(BasicProperties::default());
        assert!(
            kind_of(check(&e, &[b' '; 11], 10))
                .unwrap()
                .1
                .contains("11 bytes")
        );
    }

    #[test]
    fn panic_payloads_become_messages() {
        let p = std::panic::catch_unwind(|| panic!("boom {}", 1)).unwrap_err();
        assert_eq!(panic_message(&*p), "boom 1");
        let p = std::panic::catch_unwind(|| std::panic::panic_any(7u8)).unwrap_err();
        assert_eq!(panic_message(&*p), "(a non-string panic payload)");
    }
}
