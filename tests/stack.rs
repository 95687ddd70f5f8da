//! The seam between the broker and the handler, on RabbitMQ and on the in-memory broker:
//! layers that see the raw message before it is decoded, runtime-wide layers, explicit
//! dispositions (ack, skip, retry with a delay, dead-letter) reported to an observer, and
//! back-pressure from a stack that is not ready.

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use lapin::BasicProperties;
use rabbitry::middleware::{self, Layer, Next, Service};
use rabbitry::observe::{Handling, PublishOutcome};
use rabbitry::prelude::*;
use rabbitry::{Disposition, FailureKind, Message, Registration, headers};
use serde_json::json;
use support::journal::Journal;
use support::*;
use tokio::sync::{Notify, mpsc};

async fn a_worker_layer_sees_the_raw_message_before_it_is_decoded(env: TestEnv) {
    let queue = env.queue("typed");
    let (tx, mut raw) = mpsc::unbounded_channel();
    // Old producers send `id`; the typed worker wants `order_id`. The layer renames it in
    // the JSON before decoding, and sees fields the event type drops.
    let rename = middleware::from_fn(move |mut message: Message, next: Next| {
        let tx = tx.clone();
        async move {
            let mut body: serde_json::Value = message.json().expect("JSON");
            let _ = tx.send((message.metadata().event_type().to_owned(), body.clone()));
            if let Some(id) = body.as_object_mut().and_then(|o| o.remove("id")) {
                body["order_id"] = id;
                message.set_body(serde_json::to_vec(&body).unwrap());
            }
            next.run(message).await
        }
    });
    let (worker, mut handled) = TypedOrders::new(&queue);
    env.track(&worker.subscription());
    let rt = env
        .builder()
        .worker(Registration::new(worker).layer(rename))
        .start()
        .await
        .unwrap();

    let legacy = json!({"id": 7, "user_id": 1, "total": 2.5, "items": [], "channel": "fax"});
    let props = BasicProperties::default().with_type("order.placed".into());
    env.publish_bare("order.placed", legacy.to_string().as_bytes(), props)
        .await;
    let (event_type, seen_raw) = raw.recv().await.unwrap();
    assert_eq!(event_type, "order.placed");
    assert_eq!(
        seen_raw["channel"], "fax",
        "the layer sees what the type drops"
    );
    let (order, body) = handled.recv().await.unwrap();
    assert_eq!(order.order_id, 7);
    // The handler can still read the exact bytes it was decoded from.
    let decoded_from: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(decoded_from["order_id"], 7);
    assert!(decoded_from.get("id").is_none());
    rt.shutdown().await;
    assert_eq!(env.ready(&queue).await, 0);
}

/// A typed worker that reports each order and the body it was decoded from.
struct TypedOrders {
    queue: String,
    handled: mpsc::UnboundedSender<(OrderPlaced, Vec<u8>)>,
}

impl TypedOrders {
    fn new(queue: &str) -> (TypedOrders, mpsc::UnboundedReceiver<(OrderPlaced, Vec<u8>)>) {
        let (handled, rx) = mpsc::unbounded_channel();
        let worker = TypedOrders {
            queue: queue.to_owned(),
            handled,
        };
        (worker, rx)
    }
}

impl Worker for TypedOrders {
    type Event = OrderPlaced;
    fn subscription(&self) -> Subscription {
        Subscription::new(&self.queue).bind("order.placed")
    }
    async fn handle(&self, order: Delivery<OrderPlaced>, _: &Context) -> Outcome {
        let body = order.body().to_vec();
        let _ = self.handled.send((order.into_payload(), body));
        Ok(())
    }
}

async fn a_runtime_layer_wraps_every_worker_also_those_added_later(env: TestEnv) {
    let counts: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let count = {
        let counts = counts.clone();
        middleware::from_fn(move |message: Message, next: Next| {
            let counts = counts.clone();
            async move {
                let worker = message.metadata().queue().to_owned();
                *counts.lock().unwrap().entry(worker).or_default() += 1;
                next.run(message).await
            }
        })
    };
    let (a, mut a_seen) = env.probe(
        Subscription::new(env.queue("a")).bind("order.*"),
        |_| Ok(()),
    );
    let (b, mut b_seen) = env.probe(
        Subscription::new(env.queue("b")).bind("order.placed"),
        |_| Ok(()),
    );
    let rt = env
        .builder()
        .layer(count)
        .worker(a)
        .worker(b)
        .start()
        .await
        .unwrap();
    let (c, mut c_seen) = env.probe(Subscription::new(env.queue("c")).bind("#"), |_| Ok(()));
    rt.add_worker(c).await.unwrap();

    let publisher = env.publisher().await;
    publisher.publish(&order(1)).await.unwrap();
    a_seen.next().await;
    b_seen.next().await;
    c_seen.next().await;
    rt.shutdown().await;
    let counts = counts.lock().unwrap().clone();
    let expected: BTreeMap<String, usize> = ["a", "b", "c"]
        .into_iter()
        .map(|w| (env.queue(w), 1))
        .collect();
    assert_eq!(counts, expected);
}

async fn each_explicit_disposition_does_what_it_says_and_is_reported_to_observers(env: TestEnv) {
    // Answers as the message's `x-answer` header says; only `ack` reaches the handler.
    let answer_by_header = middleware::from_fn(|message: Message, next: Next| async move {
        let meta = message.metadata();
        match meta.header_str("x-answer") {
            Some("skip") => Disposition::skip("not for us"),
            Some("retry") if meta.attempt() == 1 => {
                Disposition::retry_after(Duration::from_millis(200), "try again shortly")
            }
            Some("dead-letter") => {
                Disposition::dead_letter(FailureKind::Rejected, "refused by a layer")
            }
            _ => next.run(message).await,
        }
    });
    let queue = env.queue("answers");
    // Declared on demand for the 200 ms retry_after: cleaned up with the rest.
    env.track_names([format!("{queue}.retry.200").as_str()]);
    let journal = Arc::new(Journal::default());
    let (probe, mut seen) = env.probe(Subscription::new(&queue).bind("order.placed"), |_| Ok(()));
    let rt = env
        .builder()
        .observer(journal.clone())
        .worker(Registration::new(probe).layer(answer_by_header))
        .start()
        .await
        .unwrap();
    let publisher = env.publisher().await;
    let mut ids = BTreeMap::new();
    for (n, answer) in ["ack", "skip", "retry", "dead-letter"]
        .into_iter()
        .enumerate()
    {
        let id = publisher
            .message(&order(n as u64))
            .header("x-answer", answer)
            .send()
            .await
            .unwrap();
        ids.insert(id, answer);
    }

    // ack, skip, retry (first attempt), dead-letter, then the retried one is acked.
    let settled = journal.wait_settled(5).await;
    let mut by_answer: BTreeMap<&str, Vec<(Handling, u32)>> = BTreeMap::new();
    for (worker, id, handling, attempt) in &settled {
        assert_eq!(worker, &queue);
        by_answer
            .entry(ids[id])
            .or_default()
            .push((handling.clone(), *attempt));
    }
    assert_eq!(by_answer["ack"], [(Handling::Handled, 1)]);
    assert_eq!(
        by_answer["skip"],
        [(
            Handling::Skipped {
                reason: "not for us".into()
            },
            1
        )]
    );
    assert_eq!(
        by_answer["retry"],
        [
            (
                Handling::Retried {
                    delay: Duration::from_millis(200)
                },
                1
            ),
            (Handling::Handled, 2)
        ]
    );
    assert_eq!(
        by_answer["dead-letter"],
        [(
            Handling::DeadLettered {
                kind: FailureKind::Rejected,
                reason: "refused by a layer".into()
            },
            1
        )]
    );
    // Only ack reached the handler: once at first, once on the retry's second attempt.
    let handled: Vec<u64> = seen.take(2).await.iter().map(Seen::order_id).collect();
    assert_eq!(handled, [0, 2]);
    rt.shutdown().await;
    assert!(seen.drain().is_empty());

    let dead = env.take(&format!("{queue}.dlq"), 1).await;
    assert_eq!(
        dead[0].header_str(headers::EXCEPTION_KIND).as_deref(),
        Some("rejected")
    );
    assert_eq!(
        dead[0].header_str(headers::EXCEPTION_MESSAGE).as_deref(),
        Some("refused by a layer")
    );
    assert_eq!(
        env.ready(&queue).await,
        0,
        "skipped and handled ones were acknowledged"
    );
    assert_eq!(
        env.ready(&format!("{queue}.dlq")).await,
        0,
        "only the dead-letter went there"
    );

    // The observer saw the copies published, and the worker's life.
    let published = journal.published.lock().unwrap().clone();
    assert!(published.contains(&(
        "".into(),
        format!("{queue}.retry.200"),
        PublishOutcome::Confirmed
    )));
    assert!(published.contains(&(
        format!("{}.dlx", env.exchange),
        queue.clone(),
        PublishOutcome::Confirmed
    )));
    let lifecycle = journal.lifecycle.lock().unwrap().clone();
    let position = |needle: &str| {
        lifecycle
            .iter()
            .position(|e| e.contains(needle))
            .unwrap_or_else(|| panic!("no {needle} in {lifecycle:?}"))
    };
    assert!(position("Consuming") < position("Started"), "{lifecycle:?}");
    assert!(position("Started") < position("ShutDown"), "{lifecycle:?}");
}

/// A layer whose `poll_ready` stays pending until the gate opens; counts the calls that
/// got through.
#[derive(Clone, Default)]
struct Gate {
    open: Arc<AtomicBool>,
    waiting: Arc<Mutex<Option<Waker>>>,
    polled: Arc<Notify>,
    calls: Arc<AtomicUsize>,
}

impl Gate {
    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        if let Some(waker) = self.waiting.lock().unwrap().take() {
            waker.wake();
        }
    }
}

impl<S> Layer<S> for Gate {
    type Service = Gated<S>;
    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            gate: self.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
struct Gated<S> {
    gate: Gate,
    inner: S,
}

impl<S> Service<Message> for Gated<S>
where
    S: Service<Message, Response = Disposition, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Disposition;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Disposition, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        self.gate.polled.notify_one();
        if !self.gate.open.load(Ordering::SeqCst) {
            *self.gate.waiting.lock().unwrap() = Some(cx.waker().clone());
            if !self.gate.open.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, message: Message) -> Self::Future {
        self.gate.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(self.inner.call(message))
    }
}

async fn a_layer_that_is_not_ready_holds_back_intake_within_the_prefetch(env: TestEnv) {
    let queue = env.queue("held");
    let gate = Gate::default();
    let (probe, mut seen) = env.probe(
        Subscription::new(&queue)
            .bind("order.placed")
            .prefetch(5)
            .concurrency(5),
        |_| Ok(()),
    );
    let rt = env
        .builder()
        .worker(Registration::new(probe).layer(gate.clone()))
        .start()
        .await
        .unwrap();
    let orders: Vec<_> = (0..20).map(order).collect();
    env.publisher().await.publish_batch(&orders).await.unwrap();

    // The consumer asked the stack and was told to wait: nothing went in, the broker sent
    // the prefetch and holds the rest.
    tokio::time::timeout(PATIENCE, gate.polled.notified())
        .await
        .expect("the consumer polls the stack");
    env.wait_until_ready(&queue, 15).await;
    assert_eq!(
        gate.calls.load(Ordering::SeqCst),
        0,
        "nothing entered a stack that was not ready"
    );
    assert!(seen.drain().is_empty());

    gate.open();
    let mut ids: Vec<u64> = seen.order_ids(20).await;
    ids.sort();
    assert_eq!(ids, (0..20).collect::<Vec<_>>());
    rt.shutdown().await;
    assert_eq!(gate.calls.load(Ordering::SeqCst), 20);
    assert_eq!(env.ready(&queue).await, 0);
}

async fn a_panicking_layer_is_a_retry_of_kind_panic_and_the_worker_goes_on(env: TestEnv) {
    let queue = env.queue("fragile");
    let boom = middleware::from_fn(|message: Message, next: Next| async move {
        if message.metadata().attempt() == 1 && message.metadata().header_str("x-boom").is_some() {
            panic!("the layer tripped");
        }
        next.run(message).await
    });
    let journal = Arc::new(Journal::default());
    let (probe, mut seen) = env.probe(
        Subscription::new(&queue)
            .bind("order.placed")
            .retry(RetryPolicy::exponential(Duration::from_millis(100)).max_attempts(2)),
        |_| Ok(()),
    );
    let rt = env
        .builder()
        .observer(journal.clone())
        .worker(Registration::new(probe).layer(boom))
        .start()
        .await
        .unwrap();
    let publisher = env.publisher().await;
    publisher
        .message(&order(1))
        .header("x-boom", "1")
        .send()
        .await
        .unwrap();
    publisher.publish(&order(2)).await.unwrap();
    let mut ids: Vec<(u64, u32)> = seen
        .take(2)
        .await
        .iter()
        .map(|s| (s.order_id(), s.attempt))
        .collect();
    ids.sort();
    assert_eq!(ids, [(1, 2), (2, 1)]);
    let settled = journal.wait_settled(3).await;
    assert!(settled.iter().any(|(_, _, h, a)| *a == 1
        && *h
            == Handling::Retried {
                delay: Duration::from_millis(100)
            }));
    rt.shutdown().await;
}

on_both_brokers!(
    a_worker_layer_sees_the_raw_message_before_it_is_decoded,
    a_runtime_layer_wraps_every_worker_also_those_added_later,
    each_explicit_disposition_does_what_it_says_and_is_reported_to_observers,
    a_layer_that_is_not_ready_holds_back_intake_within_the_prefetch,
    a_panicking_layer_is_a_retry_of_kind_panic_and_the_worker_goes_on,
);
