//! Skip a message that was handled before.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;
use tracing::warn;

use crate::disposition::Disposition;
use crate::message::Message;

/// The header a producer can set to name what makes two messages the same (it wins over
/// the message id).
pub const IDEMPOTENCY_KEY: &str = "x-idempotency-key";

type BoxError = Box<dyn StdError + Send + Sync>;

/// Where [`DedupLayer`] remembers what was handled. [`MemoryDedup`] keeps it in the process;
/// a store shared by several processes (a database table with a unique key) implements
/// the same methods.
///
/// A key is *claimed* before the handler runs. When the handler succeeds (or a layer below
/// skips the message) the claim is *completed* and stays; when it fails (retry,
/// dead-letter, defer) it is *released*, so that the retry is not taken for a duplicate.
///
/// A shared store should tell a claim in progress from a completed one: a process that
/// dies mid-handling leaves its claim behind, and the broker's redelivery of that message
/// must not be skipped as a duplicate. Such a store answers a claim held by someone else
/// with the error [`ClaimHeld`] (the message is deferred, not retried, and comes back to
/// find the claim completed, released or expired).
pub trait DedupStore: Send + Sync + 'static {
    /// Record `key` if it is new: `Ok(true)` when this caller claimed it, `Ok(false)` when
    /// it was claimed and completed before (a duplicate). [`ClaimHeld`] defers the
    /// message; any other error retries it.
    fn claim<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, BoxError>>;

    /// Mark this caller's claim of `key` done: its message was handled. `None` (the
    /// default) when the store has nothing to do, as for a store whose claims are final.
    fn complete<'a>(&'a self, key: &'a str) -> Option<BoxFuture<'a, Result<(), BoxError>>> {
        let _ = key;
        None
    }

    /// Forget `key`: its message failed and will come back.
    fn release<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), BoxError>>;

    /// Claim `key` at once, without waiting, if this store can: `Some` as `claim` would
    /// answer. An in-memory store answers here and spares the boxed future; the default
    /// (`None`) means "ask [`claim`](DedupStore::claim)".
    fn claim_now(&self, key: &str) -> Option<bool> {
        let _ = key;
        None
    }
}

/// A claim another consumer holds and has not completed (it may be handling a copy right
/// now, or may have died doing so): the message is deferred for `retry_after`, without
/// counting an attempt, and tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimHeld {
    /// When to try again: about when the holder's lease ends.
    pub retry_after: Duration,
}

impl fmt::Display for ClaimHeld {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "another consumer holds this message's de-duplication claim and has not finished; trying again in {:?}",
            self.retry_after
        )
    }
}

impl StdError for ClaimHeld {}

/// The in-process [`DedupStore`]: the last `capacity` keys, each kept for `ttl`.
///
/// A duplicate is caught if it arrives within `ttl` of the first and fewer than `capacity`
/// other messages came between. Only this process sees it: with several processes on one
/// queue, use a shared store.
///
/// Keys are kept as 128-bit hashes (SipHash with two random keys per store, so a producer
/// cannot craft a collision), about 100 bytes per key in all.
pub struct MemoryDedup {
    capacity: usize,
    ttl: Duration,
    hashers: (RandomState, RandomState),
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    keys: HashMap<u128, Instant>,
    order: VecDeque<(u128, Instant)>,
}

impl MemoryDedup {
    /// Remember up to `capacity` keys for `ttl` each.
    pub fn new(capacity: usize, ttl: Duration) -> MemoryDedup {
        MemoryDedup {
            capacity: capacity.max(1),
            ttl,
            hashers: (RandomState::new(), RandomState::new()),
            seen: Mutex::new(Seen::default()),
        }
    }

    /// How many keys are remembered now.
    pub fn len(&self) -> usize {
        crate::lock(&self.seen).keys.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn hash(&self, key: &str) -> u128 {
        let (a, b) = &self.hashers;
        (u128::from(a.hash_one(key)) << 64) | u128::from(b.hash_one(key))
    }

    fn claim_at(&self, key: &str, now: Instant) -> bool {
        let key = self.hash(key);
        let mut seen = crate::lock(&self.seen);
        let Seen { keys, order } = &mut *seen;
        // Forget what expired or does not fit. `order` may hold released keys and keys
        // claimed again later: only an entry whose time matches removes its key.
        while let Some((old, at)) = order.front() {
            let fresh = now.duration_since(*at) < self.ttl;
            // Released keys leave stale entries behind: bound those too.
            if fresh && keys.len() < self.capacity && order.len() <= 2 * self.capacity {
                break;
            }
            if keys.get(old) == Some(at) {
                keys.remove(old);
            }
            order.pop_front();
        }
        if keys.contains_key(&key) {
            return false;
        }
        keys.insert(key, now);
        order.push_back((key, now));
        true
    }
}

impl Default for MemoryDedup {
    /// 100,000 keys for an hour each.
    fn default() -> Self {
        MemoryDedup::new(100_000, Duration::from_secs(3600))
    }
}

impl fmt::Debug for MemoryDedup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryDedup")
            .field("capacity", &self.capacity)
            .field("ttl", &self.ttl)
            .field("len", &self.len())
            .finish()
    }
}

impl DedupStore for MemoryDedup {
    fn claim<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, BoxError>> {
        let fresh = self.claim_at(key, Instant::now());
        Box::pin(async move { Ok(fresh) })
    }

    fn release<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), BoxError>> {
        let key = self.hash(key);
        crate::lock(&self.seen).keys.remove(&key);
        Box::pin(async { Ok(()) })
    }

    fn claim_now(&self, key: &str) -> Option<bool> {
        Some(self.claim_at(key, Instant::now()))
    }
}

/// Skips a message whose key was handled before by the same worker: recorded as skipped
/// ("duplicate"), never retried.
///
/// The key is the header `x-idempotency-key` ([`IDEMPOTENCY_KEY`]) if present, else the
/// message id, prefixed with the worker's queue (the same event handled by two workers
/// is no duplicate). A message with neither (a bare AMQP client that sets no id) is
/// handled: nothing can tell it from another. `redelivered` is not used: any reconnect
/// sets it.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use rabbitry::middleware::{DedupLayer, MemoryDedup};
/// use rabbitry::Registration;
/// # use rabbitry::prelude::*;
/// # struct Billing;
/// # impl Worker for Billing {
/// #     type Event = serde_json::Value;
/// #     fn subscription(&self) -> Subscription { Subscription::new("billing").bind("order.placed") }
/// #     async fn handle(&self, _: Delivery<serde_json::Value>, _: &Context) -> Outcome { Ok(()) }
/// # }
///
/// // The last 10,000 message ids, for ten minutes each.
/// let seen = Arc::new(MemoryDedup::new(10_000, Duration::from_secs(600)));
/// let billing = Registration::new(Billing).layer(DedupLayer::with_store(seen));
/// # let _ = Runtime::builder().worker(billing);
/// ```
#[derive(Clone)]
pub struct DedupLayer {
    store: Arc<dyn DedupStore>,
}

impl DedupLayer {
    /// De-duplicate in this process, with [`MemoryDedup::default`] (a new one for each
    /// layer value; clones share it).
    pub fn new() -> DedupLayer {
        DedupLayer::with_store(Arc::new(MemoryDedup::default()))
    }

    /// De-duplicate through `store`.
    pub fn with_store(store: Arc<dyn DedupStore>) -> DedupLayer {
        DedupLayer { store }
    }
}

impl Default for DedupLayer {
    fn default() -> Self {
        DedupLayer::new()
    }
}

impl fmt::Debug for DedupLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupLayer").finish_non_exhaustive()
    }
}

impl<S> Layer<S> for DedupLayer {
    type Service = Dedup<S>;

    fn layer(&self, inner: S) -> Dedup<S> {
        Dedup {
            inner,
            store: self.store.clone(),
        }
    }
}

/// The service of [`DedupLayer`].
#[derive(Clone)]
pub struct Dedup<S> {
    inner: S,
    store: Arc<dyn DedupStore>,
}

impl<S> fmt::Debug for Dedup<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedup").finish_non_exhaustive()
    }
}

/// The key `message` is de-duplicated by, if it has one.
fn key_of(message: &Message) -> Option<String> {
    let meta = message.metadata();
    let id = match meta.header_str(IDEMPOTENCY_KEY) {
        Some(key) if !key.is_empty() => key,
        _ if meta.has_message_id() => meta.message_id(),
        _ => return None,
    };
    Some(format!("{}/{id}", meta.queue()))
}

impl<S> Service<Message> for Dedup<S>
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
        let Some(key) = key_of(&message) else {
            return Box::pin(self.inner.call(message));
        };
        let store = self.store.clone();
        // A store that answers at once: the inner service, ready now, is called now.
        if let Some(fresh) = store.claim_now(&key) {
            if !fresh {
                return Box::pin(async { Ok(Disposition::skip("duplicate: handled before")) });
            }
            let handled = self.inner.call(message);
            return Box::pin(settle(
                handled,
                Claim {
                    store,
                    key: Some(key),
                },
            ));
        }
        let mut inner = super::take_ready(&mut self.inner);
        Box::pin(async move {
            match store.claim(&key).await {
                Ok(true) => {}
                Ok(false) => return Ok(Disposition::skip("duplicate: handled before")),
                Err(e) if e.is::<ClaimHeld>() => {
                    let after = e.downcast_ref::<ClaimHeld>().map(|h| h.retry_after);
                    let after = after.unwrap_or(Duration::from_secs(1));
                    return Ok(Disposition::defer(
                        after,
                        "a copy is being handled elsewhere",
                    ));
                }
                Err(e) => {
                    let reason = format!("the de-duplication store failed: {e}");
                    return Ok(Disposition::retry(reason));
                }
            }
            let claim = Claim {
                store,
                key: Some(key),
            };
            settle(inner.call(message), claim).await
        })
    }
}

/// Await the handling of a claimed message and keep the claim only if it was handled or
/// skipped. Released otherwise — also when this future is dropped or unwinds half-way (a
/// panic below, the runtime stopping): the message comes back and must not be taken for
/// a duplicate.
async fn settle<F>(handled: F, mut claim: Claim) -> Result<Disposition, Infallible>
where
    F: Future<Output = Result<Disposition, Infallible>>,
{
    let disposition = handled.await?;
    if matches!(disposition, Disposition::Ack | Disposition::Skip { .. }) {
        if let Some(key) = claim.key.take()
            && let Some(completing) = claim.store.complete(&key)
            && let Err(e) = completing.await
        {
            warn!(%key, error = %e, "could not complete a de-duplication claim; a copy arriving after its lease may be handled again");
        }
    } else if let Some(key) = claim.key.take() {
        release(&*claim.store, &key).await;
    }
    Ok(disposition)
}

/// A claimed key, released when dropped still holding it.
struct Claim {
    store: Arc<dyn DedupStore>,
    key: Option<String>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(key) = self.key.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let store = self.store.clone();
            runtime.spawn(async move { release(&*store, &key).await });
        }
    }
}

async fn release(store: &dyn DedupStore, key: &str) {
    if let Err(e) = store.release(key).await {
        warn!(%key, error = %e, "could not release a de-duplication key; its retry may be skipped as a duplicate");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_expire_and_the_oldest_make_room() {
        let seen = MemoryDedup::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(seen.claim_at("a", t0));
        assert!(!seen.claim_at("a", t0));
        assert!(seen.claim_at("b", t0));
        assert!(seen.claim_at("c", t0)); // "a" makes room
        assert!(seen.claim_at("a", t0));
        let later = t0 + Duration::from_secs(61);
        assert!(seen.claim_at("c", later)); // expired
        assert!(seen.len() <= 2);
    }

    /// A shared store as seen by one consumer: `held` keys are claimed elsewhere and not
    /// completed; completions are recorded.
    #[derive(Default)]
    struct Shared {
        held: Vec<String>,
        completed: Mutex<Vec<String>>,
    }

    impl DedupStore for Shared {
        fn claim<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, BoxError>> {
            Box::pin(async move {
                match self.held.iter().any(|k| k == key) {
                    true => Err(ClaimHeld {
                        retry_after: Duration::from_secs(7),
                    }
                    .into()),
                    false => Ok(true),
                }
            })
        }

        fn release<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), BoxError>> {
            Box::pin(async { Ok(()) })
        }

        fn complete<'a>(&'a self, key: &'a str) -> Option<BoxFuture<'a, Result<(), BoxError>>> {
            self.completed.lock().unwrap().push(key.to_owned());
            Some(Box::pin(async { Ok(()) }))
        }
    }

    fn message(id: &str) -> Message {
        let props = lapin::BasicProperties::default().with_message_id(id.into());
        let meta = crate::message::Metadata::new("q".into(), "e".into(), "r".into(), false, props);
        Message::new(Arc::new(meta), bytes::Bytes::from_static(b"{}"))
    }

    #[tokio::test]
    async fn a_held_claim_defers_and_a_handled_message_completes_its_claim() {
        use tower::ServiceExt;
        let store = Arc::new(Shared {
            held: vec!["q/m1".into()],
            ..Shared::default()
        });
        let handler =
            tower::service_fn(|_: Message| async { Ok::<_, Infallible>(Disposition::Ack) });
        let dedup = DedupLayer::with_store(store.clone()).layer(handler);
        match dedup.clone().oneshot(message("m1")).await.unwrap() {
            Disposition::Defer { after, .. } => assert_eq!(after, Duration::from_secs(7)),
            other => panic!("deferred, not {other:?}"),
        }
        assert!(
            store.completed.lock().unwrap().is_empty(),
            "not handled here"
        );
        let handled = dedup.oneshot(message("m2")).await.unwrap();
        assert!(matches!(handled, Disposition::Ack));
        assert_eq!(*store.completed.lock().unwrap(), ["q/m2"]);
    }

    #[tokio::test]
    async fn a_released_key_can_be_claimed_again() {
        let seen = MemoryDedup::default();
        assert!(seen.claim("k").await.unwrap());
        seen.release("k").await.unwrap();
        assert!(seen.claim("k").await.unwrap());
        assert!(!seen.claim("k").await.unwrap());
    }
}
