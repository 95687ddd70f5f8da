//! Settling one delivery: the stack's [`Disposition`] becomes an acknowledgement, or a
//! retry or dead-letter copy that is confirmed before the original is acknowledged.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::AMQPValue;
use tracing::{debug, error, warn};

use super::acks::Settle;
use crate::broker::Connection;
use crate::disposition::Disposition;
use crate::error::Error;
use crate::headers;
use crate::message::Metadata;
use crate::middleware::WorkerService;
use crate::observe::{Handling, Observers, Settled};
use crate::outcome::Failure;
use crate::publisher::Publisher;
use crate::registration::{BoxLayer, Parts, Registration};
use crate::retry::tier_for_delay;
use crate::topology::{self, Publishing, Topology, dlx_name, retry_queue_name};
use crate::worker::Subscription;

/// Write the outcome on the delivery's span (the current one): `outcome`, and for a failure
/// `error.type` (its kind) and an error status.
fn record_on_span(handling: &Handling, failure: Option<&Failure>) {
    let span = tracing::Span::current();
    if span.is_disabled() {
        return;
    }
    span.record("outcome", handling.as_str());
    if let Some(failure) = failure {
        span.record("error.type", failure.kind().as_str());
        span.record("otel.status_code", "ERROR");
    }
}

/// Pause before requeueing a message whose retry or dead-letter copy could not be stored.
pub(crate) const REQUEUE_DELAY: Duration = Duration::from_secs(1);

/// A registered worker: its subscription and its built service stack.
pub(crate) struct WorkerEntry {
    pub(crate) name: Arc<str>,
    pub(crate) subscription: Subscription,
    pub(crate) handler: &'static str,
    /// Cloned for each consumer the worker gets.
    service: Mutex<WorkerService>,
}

impl WorkerEntry {
    /// Build `registration`'s stack with what the runtime lends it.
    pub(crate) fn build(registration: Registration, shared: &Shared) -> WorkerEntry {
        let name: Arc<str> = registration.subscription.queue().into();
        let subscription = registration.subscription.clone();
        let handler = registration.handler;
        let service = registration.into_service(&Parts {
            publisher: &shared.publisher,
            max_body: shared.max_body,
            layers: &shared.layers,
        });
        WorkerEntry {
            name,
            subscription,
            handler,
            service: Mutex::new(service),
        }
    }

    /// A fresh handle on the worker's stack, for one consumer.
    pub(crate) fn service(&self) -> WorkerService {
        crate::lock(&self.service).clone()
    }

    /// Declare this worker's part of the topology on `conn` (idempotent), reconciling what
    /// an earlier declaration left behind; what publishing that takes goes through the
    /// runtime's publisher. Returns the stale bindings left in place.
    pub(crate) async fn declare(
        &self,
        conn: &Connection,
        shared: &Shared,
    ) -> Result<Vec<String>, Error> {
        let publishing = Publishing::Publisher(&shared.publisher);
        // The bindings as registered through control across processes, if changed.
        let subscription = shared.controls.adjust(&self.subscription);
        let stale = Topology::new(&shared.exchange, [&subscription])
            .declare_on(conn, publishing)
            .await?;
        if let Some(control) = shared.controls.get(&subscription.queue)
            && !subscription.existing
            && !control.bindings_removed.is_empty()
        {
            conn.on_channel(async |ch| {
                for pattern in &control.bindings_removed {
                    ch.unbind(&subscription.queue, &shared.exchange, pattern)
                        .await?;
                }
                Ok::<_, Error>(())
            })
            .await?;
        }
        Ok(stale.into_iter().flat_map(|(_, s)| s).collect())
    }
}

/// What every delivery of a runtime shares.
pub(crate) struct Shared {
    pub(crate) exchange: String,
    pub(crate) publisher: Publisher,
    pub(crate) max_body: usize,
    /// The runtime's layers, outermost first, for workers added later.
    pub(crate) layers: Vec<BoxLayer>,
    /// Retry tiers declared on demand for `retry_after` delays.
    pub(crate) extra_tiers: Mutex<HashSet<String>>,
    pub(crate) observers: Observers,
    /// Worker states registered through control across processes (empty without it).
    pub(crate) controls: Arc<crate::control::Controls>,
    /// Tasks beside the supervisor, joined by `shutdown`.
    pub(crate) beside: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// One delivery as it is settled.
pub(crate) struct Settling<'a> {
    pub(crate) entry: &'a WorkerEntry,
    pub(crate) shared: &'a Shared,
    pub(crate) metadata: &'a Metadata,
    /// The body as received: what a retry or dead-letter copy carries.
    pub(crate) body: &'a Bytes,
    /// Time spent in the stack.
    pub(crate) duration: Duration,
}

impl Settling<'_> {
    /// Settle `disposition` and tell the observers.
    pub(crate) async fn settle(self, disposition: Disposition) -> Settle {
        let (settle, handling, failure) = match disposition {
            Disposition::Ack => (Settle::Ack, Handling::Handled, None),
            Disposition::Skip { reason } => {
                debug!(worker = %self.entry.name, message_id = %self.metadata.message_id(), %reason, "skipped");
                let handling = Handling::Skipped {
                    reason: reason.into_owned(),
                };
                (Settle::Ack, handling, None)
            }
            Disposition::Retry { after, failure } => {
                let (settle, handling) = self.fail(&failure, Some(after)).await;
                (settle, handling, Some(failure))
            }
            Disposition::DeadLetter { failure } => {
                let (settle, handling) = self.fail(&failure, None).await;
                (settle, handling, Some(failure))
            }
            Disposition::Defer { after, reason } => {
                let ms = tier_for_delay(after);
                debug!(worker = %self.entry.name, message_id = %self.metadata.message_id(), %reason, delay_ms = ms, "deferred");
                let handling = Handling::Deferred {
                    delay: Duration::from_millis(ms),
                    reason: reason.into_owned(),
                };
                let props =
                    copy_properties(self.entry, self.metadata, None, self.metadata.retry_count());
                let queue = retry_queue_name(&self.entry.name, ms);
                match self.store_copy("", &queue, Some(ms), props).await {
                    Ok(()) => (Settle::Ack, handling, None),
                    Err(settle) => (settle, Handling::Requeued, None),
                }
            }
        };
        record_on_span(&handling, failure.as_ref());
        if !self.shared.observers.is_empty() {
            self.shared.observers.settled(&Settled {
                worker: &self.entry.name,
                metadata: self.metadata,
                handling: &handling,
                failure: failure.as_ref(),
                duration: self.duration,
            });
        }
        settle
    }

    /// Retry (when `retry` is `Some`, with the delay asked for, if any) or dead-letter a
    /// failed delivery. The copy is confirmed before the original is acknowledged; if it
    /// cannot be, the original goes back to the queue after a pause.
    async fn fail(&self, failure: &Failure, retry: Option<Option<Duration>>) -> (Settle, Handling) {
        let (entry, shared, meta) = (self.entry, self.shared, self.metadata);
        let attempt = meta.attempt();
        let policy = &entry.subscription.retry;
        let retry_tier = match retry {
            None => None,
            Some(_) if attempt >= policy.attempts() => None,
            Some(None) => Some(policy.tier_ms(attempt)),
            Some(Some(delay)) => Some(tier_for_delay(delay)),
        };
        let (worker, id, kind) = (&entry.name, meta.message_id(), failure.kind());
        let (exchange, routing_key, handling) = match retry_tier {
            Some(ms) => {
                warn!(%worker, message_id = %id, error = %failure, %kind, delay_ms = ms, "handler failed; retrying");
                let delay = Duration::from_millis(ms);
                let queue = retry_queue_name(worker, ms);
                (String::new(), queue, Handling::Retried { delay })
            }
            None => {
                if retry.is_none() {
                    warn!(%worker, message_id = %id, error = %failure, %kind, "dead-lettering");
                } else {
                    error!(%worker, message_id = %id, error = %failure, %kind, attempts = attempt, "retries exhausted; dead-lettering");
                }
                let handling = Handling::DeadLettered {
                    kind,
                    reason: failure.to_string(),
                };
                (dlx_name(&shared.exchange), worker.to_string(), handling)
            }
        };
        let retries = match retry_tier {
            Some(_) => meta.attempt(),
            None => meta.retry_count(),
        };
        let properties = copy_properties(entry, meta, Some(failure), retries);
        match self
            .store_copy(&exchange, &routing_key, retry_tier, properties)
            .await
        {
            Ok(()) => (Settle::Ack, handling),
            Err(settle) => (settle, Handling::Requeued),
        }
    }

    /// Publish the retry, deferred or dead-letter copy (to a delay queue `tier` of this
    /// worker, declared first if its policy does not have it, or to the dead-letter
    /// exchange) and wait for the confirm. When it cannot be stored, the original goes back
    /// to its queue after a pause: the `Err` says how to settle it.
    async fn store_copy(
        &self,
        exchange: &str,
        routing_key: &str,
        tier: Option<u64>,
        properties: BasicProperties,
    ) -> Result<(), Settle> {
        let (worker, id) = (&self.entry.name, self.metadata.message_id());
        if let Some(ms) = tier
            && !self.entry.subscription.retry.tiers().contains(&ms)
            && let Err(e) = self.ensure_tier(routing_key, ms).await
        {
            error!(%worker, error = %e, queue = %routing_key, "cannot declare the delay queue; requeueing");
            return Err(requeue_later().await);
        }
        let publisher = &self.shared.publisher;
        let mut result = publisher
            .send_raw(exchange, routing_key, self.body, properties.clone())
            .await;
        if let Err(Error::Unroutable { .. }) = result {
            // Someone deleted a retry queue or the dead-letter queue: put the topology back.
            warn!(%worker, "retry or dead-letter queue is missing; re-declaring the worker's topology");
            result = match self.redeclare().await {
                Ok(()) => {
                    publisher
                        .send_raw(exchange, routing_key, self.body, properties)
                        .await
                }
                Err(e) => Err(e),
            };
        }
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                error!(%worker, message_id = %id, error = %e, "could not store the retry, deferred or dead-letter copy; requeueing the message");
                Err(requeue_later().await)
            }
        }
    }

    async fn ensure_tier(&self, name: &str, ms: u64) -> Result<(), Error> {
        let shared = self.shared;
        let known = crate::lock(&shared.extra_tiers).contains(name);
        if !known {
            let conn = shared.publisher.connection().await?;
            conn.on_channel(async |ch| {
                topology::declare_retry_tier(ch, &self.entry.name, ms).await
            })
            .await?;
            crate::lock(&shared.extra_tiers).insert(name.to_owned());
        }
        Ok(())
    }

    async fn redeclare(&self) -> Result<(), Error> {
        let conn = self.shared.publisher.connection().await?;
        self.entry.declare(&conn, self.shared).await?;
        crate::lock(&self.shared.extra_tiers).clear();
        Ok(())
    }
}

/// Give a message back to its queue after a pause, so that a failure that persists (a
/// deleted dead-letter exchange, a broker refusing messages, a bug) cannot spin the worker.
pub(crate) async fn requeue_later() -> Settle {
    tokio::time::sleep(REQUEUE_DELAY).await;
    Settle::Requeue
}

/// The properties of a copy: the original's, with `x-retry-count` set to `retries`, where
/// it came from, and — for a failure — what went wrong and when.
fn copy_properties(
    entry: &WorkerEntry,
    meta: &Metadata,
    failure: Option<&Failure>,
    retries: u32,
) -> BasicProperties {
    let mut h = meta.headers().cloned().unwrap_or_default();
    headers::set(
        &mut h,
        headers::RETRY_COUNT,
        AMQPValue::LongLongInt(retries.into()),
    );
    if let Some(failure) = failure {
        let now = headers::timestamp(SystemTime::now());
        if headers::get_str(Some(&h), headers::FIRST_FAILURE_AT).is_none() {
            headers::set(&mut h, headers::FIRST_FAILURE_AT, headers::string(&now));
        }
        headers::set(&mut h, headers::LAST_FAILURE_AT, headers::string(&now));
        let message = headers::truncate(&failure.to_string(), headers::MAX_EXCEPTION_MESSAGE);
        let pairs = [
            (headers::EXCEPTION_MESSAGE, message.as_str()),
            (headers::EXCEPTION_KIND, failure.kind().as_str()),
            (headers::HANDLER, entry.handler),
        ];
        for (key, value) in pairs {
            headers::set(&mut h, key, headers::string(value));
        }
    }
    let origin = [
        (headers::ORIGINAL_EXCHANGE, meta.exchange()),
        (headers::ORIGINAL_ROUTING_KEY, meta.routing_key()),
        (headers::ORIGINAL_QUEUE, &entry.name),
    ];
    for (key, value) in origin {
        headers::set(&mut h, key, headers::string(value));
    }
    meta.properties()
        .clone()
        .with_headers(h)
        .with_message_id(meta.message_id().into())
        .with_delivery_mode(2)
}
