//! Sagas: state kept between events for multi-step workflows.

mod repository;

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tower_service::Service;

use crate::broker;
use crate::disposition::Disposition;
use crate::error::{Error, Result};
use crate::event::{Delivery, Event};
use crate::headers;
use crate::message::Message;
use crate::middleware::supported_version;
use crate::outcome::{FailureKind, Outcome};
use crate::publisher::{Publisher, event_properties};
use crate::registration::{Registration, decode};
use crate::worker::Subscription;

use repository::{BoxError, now_ms};
pub use repository::{MemorySagaRepository, PendingMessage, SagaRecord, SagaRepository};

/// How many applied message ids an instance remembers.
const APPLIED_KEPT: usize = 64;

/// What a saga handler works with: the instance's state, and what it decides — events to
/// publish, timeouts to send itself, a status label, completion. Nothing it decides
/// happens unless the handler returns `Ok` and the new state is saved.
pub struct Step<S> {
    /// The instance's state (`S::default()` for a new instance).
    pub state: S,
    key: String,
    status: String,
    completed: bool,
    new: bool,
    /// The message being applied: outgoing ids derive from it.
    trigger: String,
    saga: Arc<str>,
    outgoing: Vec<PendingMessage>,
}

impl<S: fmt::Debug> fmt::Debug for Step<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("state", &self.state)
            .field("key", &self.key)
            .field("status", &self.status)
            .field("completed", &self.completed)
            .field("outgoing", &self.outgoing.len())
            .finish()
    }
}

impl<S> Step<S> {
    /// The instance's correlation key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether this event starts the instance.
    pub fn is_new(&self) -> bool {
        self.new
    }

    /// The instance's status label.
    pub fn status(&self) -> &str {
        &self.status
    }

    /// Set the status label (`rabbitry sagas list --state` filters on it).
    pub fn set_status(&mut self, status: impl Into<String>) {
        self.status = status.into();
    }

    /// Mark the instance complete with a final status: later events for it are skipped.
    pub fn complete(&mut self, status: impl Into<String>) {
        self.status = status.into();
        self.completed = true;
    }

    /// Publish `event` (routing key `E::TYPE`) once this step is saved.
    pub fn publish<E: Event>(&mut self, event: &E) -> Result<()> {
        self.keep(event, None)
    }

    /// Send `event` after `delay` — typically a timeout the saga handles itself — once
    /// this step is saved. It waits in the broker (see
    /// [`Outgoing::delay`](crate::Outgoing::delay)) and cannot be withdrawn: its handler
    /// decides from the state whether it still matters.
    ///
    /// A delay over [`MAX_DELAY`](crate::MAX_DELAY) is an [`Error::Config`].
    pub fn schedule<E: Event>(&mut self, delay: Duration, event: &E) -> Result<()> {
        if delay > crate::MAX_DELAY {
            return Err(Error::Config(format!(
                "a saga timeout of {delay:?} is longer than the broker can hold ({:?})",
                crate::MAX_DELAY
            )));
        }
        let due = SystemTime::now() + delay;
        let due_ms = due
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.keep(event, Some(due_ms))
    }

    fn keep<E: Event>(&mut self, event: &E, due_ms: Option<i64>) -> Result<()> {
        let body = serde_json::to_value(event).map_err(Error::Serialize)?;
        let n = self.outgoing.len();
        let name = format!(
            "rabbitry:saga:{}:{}:{}:{n}",
            self.saga, self.key, self.trigger
        );
        let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, name.as_bytes());
        self.outgoing.push(PendingMessage {
            message_id: id.to_string(),
            routing_key: E::TYPE.to_owned(),
            version: E::VERSION,
            body,
            due_ms,
        });
        Ok(())
    }
}

/// A decoded message: its correlation key, and its handler bound to it.
type Apply<S> = Box<dyn FnOnce(&mut Step<S>) -> Outcome + Send>;
type Route<S> =
    Arc<dyn Fn(Message) -> std::result::Result<(String, Apply<S>), Disposition> + Send + Sync>;

/// A saga: state of type `S` kept per correlation key in a [`SagaRepository`], changed by
/// a handler per event type. Built on the [`Router`](crate::Router)'s dispatch: one queue,
/// bound to every handled type.
///
/// Each handler is a plain function of the [`Step`] (the state, and what to do) and the
/// event: it changes the state, publishes events, schedules timeouts to the saga itself and
/// may complete it. Handlers do not await anything — they decide; the workers they publish
/// to do the work — so a retry can always run them again.
///
/// **Guarantees.** The new state and the events a handler decided are saved together, over
/// the version that was read (optimistic concurrency): when another process changed the
/// instance meanwhile, nothing is saved and the message is retried through the broker with
/// the fresh state — never a lost update. The events are published after the save and
/// then cleared; a crash in between publishes them on the next message for the instance
/// (or the redelivery of this one), with the same message ids. A redelivered message
/// already applied is not applied again. Messages for one instance are handled one at a
/// time in a process; instances in parallel, up to the subscription's concurrency. (A
/// message that came without a message id — from a client that sets none — gets a new id
/// at each delivery, so its redelivery cannot be recognised: publish with ids, as
/// rabbitry's publisher always does.)
///
/// ```
/// use std::time::Duration;
/// use rabbitry::prelude::*;
/// use rabbitry::{MemorySagaRepository, Saga, Step};
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct OrderPlaced { order_id: u64 }
/// impl Event for OrderPlaced { const TYPE: &'static str = "order.placed"; }
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct PaymentCaptured { order_id: u64 }
/// impl Event for PaymentCaptured { const TYPE: &'static str = "payment.captured"; }
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct OrderExpired { order_id: u64 }
/// impl Event for OrderExpired { const TYPE: &'static str = "order.expired"; }
///
/// #[derive(Default, serde::Serialize, serde::Deserialize)]
/// struct Checkout { paid: bool }
///
/// let checkout = Saga::<Checkout>::new(Subscription::new("checkout"), MemorySagaRepository::new())
///     .starts(|e: &OrderPlaced| e.order_id.to_string(), |step: &mut Step<Checkout>, e: &Delivery<OrderPlaced>| {
///         step.set_status("awaiting_payment");
///         step.schedule(Duration::from_secs(900), &OrderExpired { order_id: e.order_id })?;
///         Ok(())
///     })
///     .on(|e: &PaymentCaptured| e.order_id.to_string(), |step: &mut Step<Checkout>, _: &Delivery<PaymentCaptured>| {
///         step.state.paid = true;
///         step.complete("paid");
///         Ok(())
///     })
///     .on(|e: &OrderExpired| e.order_id.to_string(), |step: &mut Step<Checkout>, _: &Delivery<OrderExpired>| {
///         step.complete("expired");
///         Ok(())
///     });
/// let runtime = Runtime::builder().worker(checkout);
/// ```
#[must_use = "a saga does nothing until it is registered with RuntimeBuilder::worker or Runtime::add_worker"]
pub struct Saga<S> {
    subscription: Subscription,
    repository: Arc<dyn SagaRepository>,
    routes: HashMap<&'static str, (Route<S>, bool)>,
    problem: Option<String>,
    _state: PhantomData<fn() -> S>,
}

impl<S> fmt::Debug for Saga<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<_> = self.routes.keys().collect();
        types.sort();
        f.debug_struct("Saga")
            .field("queue", &self.subscription.queue())
            .field("types", &types)
            .finish_non_exhaustive()
    }
}

impl<S> Saga<S>
where
    S: Serialize + DeserializeOwned + Default + Send + 'static,
{
    /// A saga consuming `subscription`'s queue, whose name also names the saga in the
    /// repository (keep it stable), keeping its instances in `repository`.
    pub fn new(subscription: Subscription, repository: impl SagaRepository) -> Saga<S> {
        Saga::with_repository(subscription, Arc::new(repository))
    }

    /// [`new`](Saga::new) with a shared repository.
    pub fn with_repository(
        subscription: Subscription,
        repository: Arc<dyn SagaRepository>,
    ) -> Saga<S> {
        Saga {
            subscription,
            repository,
            routes: HashMap::new(),
            problem: None,
            _state: PhantomData,
        }
    }

    /// Handle `E` for the instance `key(event)` names, starting a new instance when there
    /// is none.
    pub fn starts<E, K, H>(self, key: K, handler: H) -> Saga<S>
    where
        E: Event + DeserializeOwned + Send + Sync + 'static,
        K: Fn(&E) -> String + Send + Sync + 'static,
        H: Fn(&mut Step<S>, &Delivery<E>) -> Outcome + Send + Sync + 'static,
    {
        self.route(key, handler, true)
    }

    /// Handle `E` for the instance `key(event)` names; an `E` for no instance is skipped.
    pub fn on<E, K, H>(self, key: K, handler: H) -> Saga<S>
    where
        E: Event + DeserializeOwned + Send + Sync + 'static,
        K: Fn(&E) -> String + Send + Sync + 'static,
        H: Fn(&mut Step<S>, &Delivery<E>) -> Outcome + Send + Sync + 'static,
    {
        self.route(key, handler, false)
    }

    fn route<E, K, H>(mut self, key: K, handler: H, starts: bool) -> Saga<S>
    where
        E: Event + DeserializeOwned + Send + Sync + 'static,
        K: Fn(&E) -> String + Send + Sync + 'static,
        H: Fn(&mut Step<S>, &Delivery<E>) -> Outcome + Send + Sync + 'static,
    {
        let handler = Arc::new(handler);
        let route: Route<S> = Arc::new(move |message: Message| {
            if let Err(reason) = supported_version(message.metadata(), E::TYPE, E::VERSION) {
                return Err(Disposition::dead_letter(
                    FailureKind::UnsupportedVersion,
                    reason,
                ));
            }
            let delivery = decode::<E>(message, E::TYPE)?;
            let key = key(&delivery);
            if key.contains('\0') {
                return Err(Disposition::dead_letter(
                    FailureKind::Invalid,
                    format!("a {} gives a saga key with a NUL character", E::TYPE),
                ));
            }
            if key.is_empty() || key.len() > 200 {
                return Err(Disposition::dead_letter(
                    FailureKind::Invalid,
                    format!(
                        "a {} gives a saga key of {} bytes; keys are 1 to 200 bytes",
                        E::TYPE,
                        key.len()
                    ),
                ));
            }
            let handler = handler.clone();
            let apply: Apply<S> = Box::new(move |step: &mut Step<S>| handler(step, &delivery));
            Ok((key, apply))
        });
        if self.routes.insert(E::TYPE, (route, starts)).is_some() {
            self.problem = Some(format!("two handlers for event type '{}'", E::TYPE));
        }
        self
    }
}

impl<S> From<Saga<S>> for Registration
where
    S: Serialize + DeserializeOwned + Default + Send + 'static,
{
    fn from(saga: Saga<S>) -> Registration {
        let Saga {
            mut subscription,
            repository,
            routes,
            mut problem,
            ..
        } = saga;
        let mut types: Vec<&'static str> = routes.keys().copied().collect();
        types.sort_unstable();
        if !routes.values().any(|(_, starts)| *starts) {
            problem.get_or_insert_with(|| {
                "the saga has no handler that starts an instance: add one with .starts(…)".into()
            });
        }
        if subscription.bindings().is_empty() && !subscription.existing {
            for t in &types {
                subscription = subscription.bind(*t);
            }
        }
        let name: Arc<str> = subscription.queue().into();
        let shared = Arc::new(Shared {
            name,
            repository,
            routes,
            locks: Mutex::default(),
        });
        Registration::innermost(subscription, "rabbitry::Saga", move |publisher| Dispatch {
            shared,
            publisher: publisher.clone(),
        })
        .problem(problem)
    }
}

struct Shared<S> {
    name: Arc<str>,
    repository: Arc<dyn SagaRepository>,
    routes: HashMap<&'static str, (Route<S>, bool)>,
    /// One lock per instance being handled in this process.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

struct Dispatch<S> {
    shared: Arc<Shared<S>>,
    publisher: Publisher,
}

impl<S> Clone for Dispatch<S> {
    fn clone(&self) -> Self {
        Dispatch {
            shared: self.shared.clone(),
            publisher: self.publisher.clone(),
        }
    }
}

impl<S> Service<Message> for Dispatch<S>
where
    S: Serialize + DeserializeOwned + Default + Send + 'static,
{
    type Response = Disposition;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Disposition, Infallible>> + Send>>;

    fn poll_ready(
        &mut self,
        _cx: &mut TaskContext<'_>,
    ) -> Poll<std::result::Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, message: Message) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(message).await) })
    }
}

impl<S> Dispatch<S>
where
    S: Serialize + DeserializeOwned + Default + Send + 'static,
{
    async fn handle(&self, message: Message) -> Disposition {
        let shared = &self.shared;
        let event_type = message.metadata().event_type().to_owned();
        let trigger = message.metadata().message_id().to_owned();
        let Some((route, starts)) = shared.routes.get(event_type.as_str()) else {
            let mut known: Vec<_> = shared.routes.keys().copied().collect();
            known.sort_unstable();
            let reason = format!(
                "no handler for event type '{event_type}' (saga '{}' handles: {})",
                shared.name,
                known.join(", ")
            );
            return Disposition::dead_letter(FailureKind::UnknownType, reason);
        };
        let (key, apply) = match route(message) {
            Ok(decoded) => decoded,
            Err(disposition) => return disposition,
        };
        let lock = shared.lock(&key);
        let _held = lock.lock().await;
        let saga = &*shared.name;
        let loaded = match shared.repository.load(saga, &key).await {
            Ok(loaded) => loaded,
            Err(e) => return Disposition::retry(format!("cannot load saga '{saga}' '{key}': {e}")),
        };
        let mut record = match loaded {
            Some(mut record) => {
                if record.applied.contains(&trigger) {
                    return match self.flush(&mut record).await {
                        Ok(()) => {
                            Disposition::skip(format!("already applied to saga '{saga}' '{key}'"))
                        }
                        Err(e) => Disposition::retry(e),
                    };
                }
                // What the last step decided goes out first (a crash may have left it).
                if let Err(e) = self.flush(&mut record).await {
                    return Disposition::retry(e);
                }
                if record.completed {
                    return Disposition::skip(format!(
                        "saga '{saga}' '{key}' is complete ({}); {event_type} changes nothing",
                        record.status
                    ));
                }
                record
            }
            None if !starts => {
                return Disposition::skip(format!(
                    "no saga '{saga}' '{key}': {event_type} does not start one"
                ));
            }
            None => SagaRecord::new(key.clone()),
        };
        let new = record.version == 0;
        let state = match new {
            true => S::default(),
            false => match serde_json::from_value(record.state.clone()) {
                Ok(state) => state,
                Err(e) => {
                    return Disposition::dead_letter(
                        FailureKind::Undecodable,
                        format!("the stored state of saga '{saga}' '{key}' does not decode: {e}"),
                    );
                }
            },
        };
        let mut step = Step {
            state,
            key: key.clone(),
            status: record.status.clone(),
            completed: false,
            new,
            trigger: trigger.clone(),
            saga: shared.name.clone(),
            outgoing: Vec::new(),
        };
        if let Err(failure) = apply(&mut step) {
            return Err::<(), _>(failure).into();
        }
        record.state = match serde_json::to_value(&step.state) {
            Ok(state) => state,
            Err(e) => return Disposition::retry(Error::Serialize(e)),
        };
        record.status = step.status;
        record.completed = step.completed;
        record.pending = step.outgoing;
        record.applied.push(trigger);
        if record.applied.len() > APPLIED_KEPT {
            let extra = record.applied.len() - APPLIED_KEPT;
            record.applied.drain(..extra);
        }
        record.version += 1;
        record.updated_ms = now_ms();
        match shared.repository.save(saga, &record).await {
            Ok(true) => {}
            Ok(false) => {
                return Disposition::retry(format!(
                    "saga '{saga}' '{key}' was changed by another consumer since version {}; \
                     trying again with its new state",
                    record.version - 1
                ));
            }
            Err(e) => return Disposition::retry(format!("cannot save saga '{saga}' '{key}': {e}")),
        }
        match self.flush(&mut record).await {
            Ok(()) => Disposition::Ack,
            // Saved: the redelivery finds this message applied and sends what is pending.
            Err(e) => Disposition::retry(e),
        }
    }

    /// Publish what `record` has pending (confirmed), then save it without.
    async fn flush(&self, record: &mut SagaRecord) -> std::result::Result<(), BoxError> {
        if record.pending.is_empty() {
            return Ok(());
        }
        let saga = &*self.shared.name;
        for m in &record.pending {
            let mut table = lapin::types::FieldTable::default();
            headers::set(&mut table, headers::SAGA, headers::string(saga));
            let seconds = now_ms().max(0) as u64 / 1000;
            let mut properties =
                event_properties(&m.message_id, &m.routing_key, m.version, table, seconds)?;
            if let Ok(key) = broker::short("correlation id", &record.key) {
                properties = properties.with_correlation_id(key);
            }
            let body = serde_json::to_vec(&m.body).map_err(Error::Serialize)?;
            let due = m
                .due_ms
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64));
            match self
                .publisher
                .send_kept(&m.routing_key, &body, properties, due)
                .await
            {
                Ok(()) => {}
                // Published, and nobody listens for it: not worth stopping the saga for.
                Err(Error::Unroutable { routing_key, .. }) => tracing::warn!(
                    saga,
                    key = %record.key,
                    %routing_key,
                    "a saga's event reached no queue (nothing is bound for its routing key)"
                ),
                Err(e) => return Err(e.into()),
            }
        }
        record.pending.clear();
        record.version += 1;
        record.updated_ms = now_ms();
        // A conflict means another consumer saved this very flush first: version v+1 can
        // only ever be the flush of version v (same content whoever writes it), so nothing
        // is lost or overwritten either way.
        match self.shared.repository.save(saga, record).await {
            Ok(_) => Ok(()),
            Err(e) => Err(format!(
                "saga '{saga}' '{}': its events are sent but cannot be marked sent: {e}",
                record.key
            )
            .into()),
        }
    }
}

impl<S> Shared<S> {
    /// The lock of instance `key` in this process.
    fn lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = crate::lock(&self.locks);
        if locks.len() > 10_000 {
            // Forget the locks nobody holds or waits for.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(key.to_owned()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize)]
    struct Ping;
    impl Event for Ping {
        const TYPE: &'static str = "ping";
    }

    fn step(trigger: &str) -> Step<()> {
        Step {
            state: (),
            key: "k".into(),
            status: "started".into(),
            completed: false,
            new: true,
            trigger: trigger.into(),
            saga: "s".into(),
            outgoing: Vec::new(),
        }
    }

    #[test]
    fn outgoing_ids_are_the_same_on_every_run_of_a_step() {
        let (mut a, mut b, mut c) = (step("m1"), step("m1"), step("m2"));
        for s in [&mut a, &mut b, &mut c] {
            s.publish(&Ping).unwrap();
            s.schedule(Duration::from_secs(1), &Ping).unwrap();
        }
        let ids = |s: &Step<()>| {
            s.outgoing
                .iter()
                .map(|m| m.message_id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&a), ids(&b));
        assert_ne!(ids(&a), ids(&c));
        assert_ne!(ids(&a)[0], ids(&a)[1]);
        assert!(a.outgoing[0].due_ms.is_none() && a.outgoing[1].due_ms.is_some());
    }

    #[test]
    fn a_timeout_longer_than_the_broker_holds_is_refused_to_the_handler() {
        let mut s = step("m");
        let e = s
            .schedule(crate::MAX_DELAY + Duration::from_secs(1), &Ping)
            .unwrap_err();
        assert!(
            e.to_string().contains("longer than the broker can hold"),
            "{e}"
        );
        assert!(s.schedule(Duration::MAX, &Ping).is_err());
        assert!(s.outgoing.is_empty());
    }
}
