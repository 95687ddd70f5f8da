//! Per-key ordering: messages with the same key one at a time, in order, even through
//! retries; different keys in parallel.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;
use tracing::warn;

use crate::disposition::Disposition;
use crate::lock;
use crate::message::Message;

/// Where [`OrderedLayer`] reads a message's ordering key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OrderKey {
    /// A header's text (or number) value.
    Header(String),
    /// The correlation id.
    CorrelationId,
    /// A field of the JSON payload, by JSON pointer (`/order_id`); strings and numbers.
    Field(String),
}

impl OrderKey {
    fn of(&self, message: &Message) -> Option<String> {
        let meta = message.metadata();
        match self {
            OrderKey::Header(name) => meta
                .header_str(name)
                .map(str::to_owned)
                .or_else(|| meta.header_u64(name).map(|n| n.to_string())),
            OrderKey::CorrelationId => meta.correlation_id().map(str::to_owned),
            OrderKey::Field(pointer) => {
                let payload = message.json::<serde_json::Value>().ok()?;
                match payload.pointer(pointer)? {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    _ => None,
                }
            }
        }
    }
}

/// Handles messages with the same key one at a time, in the order they arrive, while
/// messages with different keys run in parallel (up to the worker's concurrency).
///
/// **Through retries.** A broker-held retry sends a message to a delay queue, and later
/// messages would overtake it (RabbitMQ's requeue and delay queues both reorder). So when
/// a keyed message is retried, its key is *blocked*: later messages of that key are not
/// handled but deferred ([`Disposition::Defer`]: they wait in a delay queue, without
/// counting an attempt) until the retried message is back and handled — or
/// dead-lettered, after which the rest go on. They are then handled in their original
/// order. Other keys are not held up.
///
/// ```
/// use rabbitry::middleware::{OrderKey, OrderedLayer};
/// use rabbitry::Registration;
/// # use rabbitry::prelude::*;
/// # struct Ledger;
/// # impl Worker for Ledger {
/// #     type Event = serde_json::Value;
/// #     fn subscription(&self) -> Subscription { Subscription::new("ledger").bind("account.#") }
/// #     async fn handle(&self, _: Delivery<serde_json::Value>, _: &Context) -> Outcome { Ok(()) }
/// # }
///
/// // Entries of one account in order; accounts in parallel.
/// let ledger = Registration::new(Ledger).layer(OrderedLayer::new(OrderKey::Field("/account".into())));
/// # let _ = Runtime::builder().worker(ledger);
/// ```
///
/// A message without a key is handled at once, in no order. Place this layer innermost
/// of the layers that decide (after filters, validation and de-duplication), so that it
/// sees the handler's outcome.
///
/// **What holds where.** The order is kept by this process, for messages it receives.
/// With several processes consuming one queue, messages of a key are spread among them
/// and no order holds: make the worker's queue
/// [`single_active_consumer`](crate::Subscription::single_active_consumer) (one process
/// consumes, the others stand by), or shard by key over several such queues. The record
/// of blocked keys lives in memory: if the process stops while a key is blocked, its
/// waiting messages return from their delay queues to whichever process consumes next
/// and are handled as they arrive, possibly out of order among themselves.
#[derive(Debug, Clone)]
pub struct OrderedLayer {
    key: OrderKey,
    wait: Duration,
    give_up: Duration,
}

impl OrderedLayer {
    /// Order by `key`. Deferred messages wait at least a second each time; a retried
    /// message that has not come back within an hour no longer holds its key.
    pub fn new(key: OrderKey) -> OrderedLayer {
        OrderedLayer {
            key,
            wait: Duration::from_secs(1),
            give_up: Duration::from_secs(3600),
        }
    }

    /// How long a key waits for its retried message before going on without it (it was
    /// perhaps purged from its delay queue, or taken by another process). Make it longer
    /// than the worker's longest retry delay.
    pub fn give_up_after(mut self, limit: Duration) -> OrderedLayer {
        self.give_up = limit;
        self
    }

    /// How long a deferred message waits in the broker before it is looked at again, at
    /// least (it waits longer when the blocking retry is known to take longer).
    pub fn defer_for(mut self, wait: Duration) -> OrderedLayer {
        self.wait = wait.max(Duration::from_millis(1));
        self
    }
}

impl<S> Layer<S> for OrderedLayer {
    type Service = Ordered<S>;

    fn layer(&self, inner: S) -> Ordered<S> {
        Ordered {
            inner,
            key: Arc::new(self.key.clone()),
            wait: self.wait,
            give_up: self.give_up,
            lanes: Arc::default(),
        }
    }
}

/// One key's state.
#[derive(Default)]
struct Lane {
    /// Signalled (dropped) when the last message admitted to the lane is done.
    tail: Option<oneshot::Receiver<()>>,
    /// Admitted and not yet done.
    in_flight: usize,
    /// Messages of this key out in a delay queue, by id, oldest (the next to handle) first.
    out: VecDeque<String>,
    /// The same ids, to look one up without a scan (a hot key may have thousands out).
    out_ids: HashSet<String>,
    /// When the oldest is expected back, if known.
    due: Option<Instant>,
    /// Since when the oldest has been out.
    since: Option<Instant>,
}

type Lanes = Arc<Mutex<LaneMap>>;

/// Every key's lane, and how many messages were admitted (to sweep now and then).
#[derive(Default)]
struct LaneMap {
    lanes: HashMap<String, Lane>,
    admitted: u64,
}

impl LaneMap {
    /// Forget keys that hold nothing in flight and whose waiting messages were given up
    /// on: their key never came back to notice.
    fn sweep(&mut self, now: Instant, give_up: Duration) {
        self.lanes.retain(|_, lane| {
            lane.in_flight > 0 || lane.since.is_some_and(|s| now.duration_since(s) <= give_up)
        });
    }
}

/// The service of [`OrderedLayer`].
#[derive(Clone)]
pub struct Ordered<S> {
    inner: S,
    key: Arc<OrderKey>,
    wait: Duration,
    give_up: Duration,
    lanes: Lanes,
}

impl<S> fmt::Debug for Ordered<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ordered")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

enum Turn {
    Run,
    Defer(Duration),
}

/// Releases a message's place in its lane however its future ends (done or dropped).
struct Admitted {
    lanes: Lanes,
    key: String,
    _done: oneshot::Sender<()>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut map = lock(&self.lanes);
        if let Some(lane) = map.lanes.get_mut(&self.key) {
            lane.in_flight -= 1;
            if lane.in_flight == 0 && lane.out.is_empty() {
                map.lanes.remove(&self.key);
            }
        }
    }
}

impl<S> Service<Message> for Ordered<S>
where
    S: Service<Message, Response = Disposition, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Disposition;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Disposition, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, message: Message) -> Self::Future {
        let mut inner = super::take_ready(&mut self.inner);
        let Some(key) = self.key.of(&message) else {
            return Box::pin(inner.call(message));
        };
        // Take a place in the lane now, in arrival order.
        let (done, signal) = oneshot::channel();
        let previous = {
            let mut map = lock(&self.lanes);
            map.admitted += 1;
            if map.admitted % 4096 == 0 {
                map.sweep(Instant::now(), self.give_up);
            }
            let lane = map.lanes.entry(key.clone()).or_default();
            lane.in_flight += 1;
            lane.tail.replace(signal)
        };
        let admitted = Admitted {
            lanes: self.lanes.clone(),
            key,
            _done: done,
        };
        let (min_wait, give_up) = (self.wait, self.give_up);
        Box::pin(async move {
            if let Some(previous) = previous {
                // Err: the previous message is done (its sender was dropped).
                let _ = previous.await;
            }
            let id = message.metadata().message_id().to_owned();
            let (lanes, key) = (&admitted.lanes, &admitted.key);
            let turn = {
                let mut map = lock(lanes);
                let lane = map.lanes.entry(key.clone()).or_default();
                let now = Instant::now();
                if lane.out.front().is_some_and(|front| *front != id)
                    && lane
                        .since
                        .is_some_and(|since| now.duration_since(since) > give_up)
                {
                    let lost = lane.out.pop_front();
                    if let Some(lost) = &lost {
                        lane.out_ids.remove(lost);
                    }
                    warn!(key = %key, message_id = ?lost, "a retried message did not come back in time; its key goes on without it");
                    lane.since = lane.out.front().map(|_| now);
                    lane.due = None;
                }
                match lane.out.front() {
                    None => Turn::Run,
                    Some(front) if *front == id => {
                        lane.out.pop_front();
                        lane.out_ids.remove(&id);
                        lane.due = None;
                        lane.since = lane.out.front().map(|_| now);
                        Turn::Run
                    }
                    Some(_) => {
                        if lane.out_ids.insert(id.clone()) {
                            lane.out.push_back(id.clone());
                        }
                        let left = lane
                            .due
                            .map_or(Duration::ZERO, |d| d.saturating_duration_since(now));
                        Turn::Defer(left.max(min_wait))
                    }
                }
            };
            let disposition = match turn {
                Turn::Defer(wait) => {
                    let reason =
                        format!("waiting for an earlier message of key '{key}' to be retried");
                    Disposition::defer(wait, reason)
                }
                Turn::Run => {
                    let last = message.metadata().is_last_attempt();
                    let policy_delay = message.metadata().next_retry();
                    let disposition = inner.call(message).await?;
                    if let Disposition::Retry { after, .. } = &disposition
                        && !last
                    {
                        // It comes back from its delay queue; the key waits for it.
                        let mut map = lock(lanes);
                        let lane = map.lanes.entry(key.clone()).or_default();
                        let now = Instant::now();
                        lane.out_ids.insert(id.clone());
                        lane.out.push_front(id);
                        lane.due = after.or(policy_delay).and_then(|a| now.checked_add(a));
                        lane.since = Some(now);
                    }
                    disposition
                }
            };
            drop(admitted);
            Ok(disposition)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Metadata;
    use lapin::BasicProperties;
    use lapin::types::FieldTable;
    use tower::ServiceExt;

    fn message(id: &str, key: &str) -> Message {
        let mut headers = FieldTable::default();
        headers.insert("k".into(), crate::headers::string(key));
        let props = BasicProperties::default()
            .with_message_id(id.into())
            .with_headers(headers);
        let meta = Metadata::new("q".into(), "e".into(), "r".into(), false, props);
        Message::new(Arc::new(meta), bytes::Bytes::from_static(b"{}"))
    }

    fn kind(d: &Disposition) -> &'static str {
        match d {
            Disposition::Ack => "ack",
            Disposition::Retry { .. } => "retry",
            Disposition::Defer { .. } => "defer",
            _ => "other",
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_waits_for_its_retried_message_then_gives_up_on_a_lost_one() {
        // "a1" fails; everything else succeeds.
        let inner = tower::service_fn(|m: Message| async move {
            Ok::<_, Infallible>(match m.metadata().message_id() {
                "a1" => Disposition::retry("busy"),
                _ => Disposition::Ack,
            })
        });
        let layer =
            OrderedLayer::new(OrderKey::Header("k".into())).give_up_after(Duration::from_secs(60));
        let mut svc = layer.layer(inner);
        let mut run = async |id: &str, key: &str| {
            let d = svc
                .ready()
                .await
                .unwrap()
                .call(message(id, key))
                .await
                .unwrap();
            kind(&d)
        };
        assert_eq!(run("a1", "a").await, "retry");
        assert_eq!(run("a2", "a").await, "defer", "a2 waits for a1");
        assert_eq!(run("b1", "b").await, "ack", "other keys go on");
        assert_eq!(run("a2", "a").await, "defer", "still a1's turn");
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(
            run("a2", "a").await,
            "ack",
            "a1 never came back: the key goes on"
        );
        assert_eq!(run("a3", "a").await, "ack");
    }

    #[tokio::test(start_paused = true)]
    async fn a_returning_head_runs_and_releases_the_rest_in_order() {
        let inner = tower::service_fn(|m: Message| async move {
            let first_try = m.metadata().attempt() == 1;
            Ok::<_, Infallible>(match (m.metadata().message_id(), first_try) {
                ("a1", true) => Disposition::retry("busy"),
                _ => Disposition::Ack,
            })
        });
        let mut svc = OrderedLayer::new(OrderKey::Header("k".into())).layer(inner);
        let mut run = async |m: Message| {
            let d = svc.ready().await.unwrap().call(m).await.unwrap();
            kind(&d)
        };
        assert_eq!(run(message("a1", "a")).await, "retry");
        assert_eq!(run(message("a2", "a")).await, "defer");
        assert_eq!(run(message("a3", "a")).await, "defer");
        // a3 comes back first: not its turn.
        assert_eq!(run(message("a3", "a")).await, "defer");
        let mut retried = message("a1", "a");
        retried.set_header(
            crate::headers::RETRY_COUNT,
            lapin::types::AMQPValue::LongLongInt(1),
        );
        // The attempt is computed on receipt: build the returning copy as the broker would.
        let (meta, body) = retried.into_parts();
        let meta = Metadata::new(
            "q".into(),
            "e".into(),
            "r".into(),
            false,
            meta.properties().clone(),
        );
        assert_eq!(run(Message::new(Arc::new(meta), body)).await, "ack");
        assert_eq!(run(message("a3", "a")).await, "defer", "a2 is next, not a3");
        assert_eq!(run(message("a2", "a")).await, "ack");
        assert_eq!(run(message("a3", "a")).await, "ack");
        assert!(
            svc.lanes.lock().unwrap().lanes.is_empty(),
            "an idle key leaves nothing behind"
        );
    }
}
