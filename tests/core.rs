//! Core behaviour against a real RabbitMQ: routing, acknowledgements, retries, dead-letters,
//! priority, publishing errors, topology conflicts, and interop with bare AMQP clients.

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use lapin::BasicProperties;
use rabbitry::prelude::*;
use rabbitry::{Error, QueueType, headers};
use serde_json::json;
use support::*;

async fn events_fan_out_to_every_matching_binding(env: TestEnv) {
    let sub = |name: &str, key: &str| Subscription::new(env.queue(name)).bind(key);
    let (exact, mut exact_rx) = env.probe(sub("exact", "order.placed"), |_| Ok(()));
    let (star, mut star_rx) = env.probe(sub("star", "order.*"), |_| Ok(()));
    let (hash, mut hash_rx) = env.probe(sub("all", "#"), |_| Ok(()));
    let (users, mut users_rx) = env.probe(sub("users", "user.*"), |_| Ok(()));
    let rt = env
        .builder()
        .worker(exact)
        .worker(star)
        .worker(hash)
        .worker(users)
        .start()
        .await
        .unwrap();

    let publisher = env.publisher().await;
    publisher.publish(&order(1)).await.unwrap();
    for (key, id) in [("order.shipped", 2), ("user.registered", 3)] {
        publisher
            .message(&order(id))
            .routing_key(key)
            .send()
            .await
            .unwrap();
    }

    let ids = |seen: Vec<Seen>| {
        let mut v: Vec<u64> = seen.iter().map(Seen::order_id).collect();
        v.sort();
        v
    };
    assert_eq!(ids(exact_rx.take(1).await), [1]);
    assert_eq!(ids(star_rx.take(2).await), [1, 2]);
    assert_eq!(ids(hash_rx.take(3).await), [1, 2, 3]);
    assert_eq!(ids(users_rx.take(1).await), [3]);

    rt.shutdown().await;
    // Nothing more arrived, and everything handled was acknowledged.
    for (name, rx) in [
        ("exact", &mut exact_rx),
        ("star", &mut star_rx),
        ("all", &mut hash_rx),
        ("users", &mut users_rx),
    ] {
        assert!(rx.drain().is_empty(), "{name} saw an extra delivery");
        assert_eq!(
            env.ready(&env.queue(name)).await,
            0,
            "{name} left messages unacknowledged"
        );
    }
}

async fn every_handled_message_is_acknowledged_exactly_once(env: TestEnv) {
    let queue = env.queue("acks");
    let (probe, mut seen) = env.probe(
        Subscription::new(&queue)
            .bind("order.placed")
            .prefetch(10)
            .concurrency(4),
        |_| Ok(()),
    );
    let rt = env.builder().worker(probe).start().await.unwrap();
    let orders: Vec<_> = (0..200).map(order).collect();
    let publisher = env.publisher().await;
    let ids = publisher.publish_batch(&orders).await.unwrap();
    assert_eq!(ids.len(), 200);

    let mut handled: Vec<u64> = seen.order_ids(200).await;
    rt.shutdown().await;
    handled.sort();
    assert_eq!(handled, (0..200).collect::<Vec<_>>());
    assert!(seen.drain().is_empty(), "a message was handled twice");
    // A graceful shutdown returns unacknowledged messages to the queue: none are there.
    assert_eq!(env.ready(&queue).await, 0);
}

async fn retries_follow_the_exponential_policy_then_dead_letter_with_headers(env: TestEnv) {
    let queue = env.queue("flaky");
    let policy = RetryPolicy::exponential(Duration::from_millis(100))
        .factor(2.0)
        .max_attempts(4);
    let (probe, mut seen) = env.probe(
        Subscription::new(&queue)
            .bind("order.placed")
            .retry(policy.clone()),
        |_| Err(Failure::retry("stock service unavailable")),
    );
    let rt = env.builder().worker(probe).start().await.unwrap();
    let publisher = env.publisher().await;
    let id = publisher
        .message(&order(7))
        .priority(3)
        .correlation_id("corr-7")
        .send()
        .await
        .unwrap();

    let attempts = seen.take(4).await;
    assert_eq!(
        attempts.iter().map(|s| s.attempt).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    for s in &attempts {
        assert_eq!(s.message_id, id, "the message id is stable across retries");
        assert_eq!(
            s.exchange, env.exchange,
            "the original exchange is restored"
        );
        assert_eq!(
            s.routing_key, "order.placed",
            "the original routing key is restored"
        );
        assert_eq!(s.priority, Some(3), "retries keep the priority");
        assert_eq!(s.correlation_id.as_deref(), Some("corr-7"));
    }
    // Each retry waited in the broker at least as long as the policy says.
    for (n, pair) in attempts.windows(2).enumerate() {
        let waited = pair[1].at - pair[0].at;
        let wanted = policy.delay_before_retry(n as u32 + 1);
        assert!(
            waited >= wanted,
            "retry {} came after {waited:?}, before {wanted:?}",
            n + 1
        );
    }

    let dead = env.take(&format!("{queue}.dlq"), 1).await.remove(0);
    rt.shutdown().await;
    assert!(seen.drain().is_empty(), "no attempt after the last one");
    assert_eq!(dead.properties.message_id().as_ref().unwrap().as_str(), id);
    let body: OrderPlaced = serde_json::from_slice(&dead.body).unwrap();
    assert_eq!(body, order(7), "the dead-lettered body is the original");
    assert_eq!(dead.header_int(headers::RETRY_COUNT), Some(3));
    assert_eq!(
        dead.header_str(headers::EXCEPTION_KIND).as_deref(),
        Some("transient")
    );
    assert_eq!(
        dead.header_str(headers::EXCEPTION_MESSAGE).as_deref(),
        Some("stock service unavailable")
    );
    assert!(
        dead.header_str(headers::HANDLER)
            .unwrap()
            .ends_with("Probe")
    );
    assert_eq!(
        dead.header_str(headers::ORIGINAL_EXCHANGE),
        Some(env.exchange.clone())
    );
    assert_eq!(
        dead.header_str(headers::ORIGINAL_ROUTING_KEY).as_deref(),
        Some("order.placed")
    );
    assert_eq!(
        dead.header_str(headers::ORIGINAL_QUEUE),
        Some(queue.clone())
    );
    let first = dead.header_str(headers::FIRST_FAILURE_AT).unwrap();
    let last = dead.header_str(headers::LAST_FAILURE_AT).unwrap();
    let parse = |s: &str| humantime::parse_rfc3339(s).unwrap();
    assert!(parse(&last) > parse(&first), "{first} .. {last}");
    assert_eq!(dead.header_int(headers::EVENT_VERSION), Some(2));
    assert_eq!(env.ready(&queue).await, 0);
}

async fn rejects_go_straight_to_the_dead_letter_queue(env: TestEnv) {
    let queue = env.queue("strict");
    let (probe, mut seen) = env.probe(Subscription::new(&queue).bind("order.placed"), |s| {
        Err(Failure::reject(format!(
            "order {} has no items",
            s.body["order_id"]
        )))
    });
    let rt = env.builder().worker(probe).start().await.unwrap();
    env.publisher().await.publish(&order(9)).await.unwrap();
    assert_eq!(seen.next().await.attempt, 1);
    let dead = env.take(&format!("{queue}.dlq"), 1).await.remove(0);
    rt.shutdown().await;
    assert!(seen.drain().is_empty(), "a rejected message is not retried");
    assert_eq!(
        dead.header_str(headers::EXCEPTION_KIND).as_deref(),
        Some("rejected")
    );
    assert_eq!(
        dead.header_str(headers::EXCEPTION_MESSAGE).as_deref(),
        Some("order 9 has no items")
    );
    assert_eq!(dead.header_int(headers::RETRY_COUNT), Some(0));
}

/// A worker with a typed event, to check decoding.
struct Typed {
    queue: String,
    seen: tokio::sync::mpsc::UnboundedSender<OrderPlaced>,
}

impl Worker for Typed {
    type Event = OrderPlaced;
    fn subscription(&self) -> Subscription {
        Subscription::new(&self.queue).bind("order.placed")
    }
    async fn handle(&self, order: Delivery<OrderPlaced>, _: &Context) -> Outcome {
        self.seen.send(order.into_payload()).unwrap();
        Ok(())
    }
}

async fn undecodable_payloads_are_dead_lettered_with_the_reason_and_good_ones_still_flow(
    env: TestEnv,
) {
    let queue = env.queue("typed");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let worker = Typed {
        queue: queue.clone(),
        seen: tx,
    };
    env.track(&worker.subscription());
    let rt = env.builder().worker(worker).start().await.unwrap();

    let plain = BasicProperties::default();
    env.publish_bare("order.placed", b"{not json", plain.clone())
        .await;
    env.publish_bare("order.placed", br#"{"order_id": "seven"}"#, plain.clone())
        .await;
    env.publish_bare("order.placed", br#"{"order_id":1001,"user_id":42,"total":59.9,"items":[{"sku":"BOOK-1","qty":2}],"coupon":"X"}"#, plain.clone()).await;
    env.publish_bare(
        "order.placed",
        b"<order/>",
        plain.clone().with_content_type("application/xml".into()),
    )
    .await;

    let good = tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(good.order_id, 1001, "unknown fields are ignored");
    let dead = env.take(&format!("{queue}.dlq"), 3).await;
    rt.shutdown().await;
    assert!(
        rx.try_recv().is_err(),
        "the handler never saw a bad message"
    );
    let reasons: Vec<String> = dead
        .iter()
        .map(|d| d.header_str(headers::EXCEPTION_MESSAGE).unwrap())
        .collect();
    assert!(
        dead.iter()
            .all(|d| d.header_str(headers::EXCEPTION_KIND).as_deref() == Some("undecodable"))
    );
    assert!(
        reasons[0].contains("cannot decode") && reasons[0].contains("OrderPlaced"),
        "{}",
        reasons[0]
    );
    assert!(
        reasons[1].contains("invalid type: string \"seven\""),
        "{}",
        reasons[1]
    );
    assert!(reasons[2].contains("application/xml"), "{}", reasons[2]);
    assert_eq!(dead[0].body, b"{not json", "the body is kept as received");
}

async fn a_retry_reaches_only_the_worker_that_failed(env: TestEnv) {
    let policy = RetryPolicy::exponential(Duration::from_millis(50)).max_attempts(3);
    let sub = |n: &str| {
        Subscription::new(env.queue(n))
            .bind("order.placed")
            .retry(policy.clone())
    };
    let (failing, mut failing_rx) = env.probe(sub("failing"), |s| {
        if s.attempt == 1 {
            Err(Failure::retry("first try fails"))
        } else {
            Ok(())
        }
    });
    let (healthy, mut healthy_rx) = env.probe(sub("healthy"), |_| Ok(()));
    let rt = env
        .builder()
        .worker(failing)
        .worker(healthy)
        .start()
        .await
        .unwrap();
    env.publisher().await.publish(&order(5)).await.unwrap();

    assert_eq!(
        failing_rx
            .take(2)
            .await
            .iter()
            .map(|s| s.attempt)
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(healthy_rx.next().await.attempt, 1);
    rt.shutdown().await;
    assert!(
        healthy_rx.drain().is_empty(),
        "the healthy worker got the retry too"
    );
    assert_eq!(env.ready(&env.queue("healthy")).await, 0);
}

async fn waiting_high_priority_messages_are_consumed_first(env: TestEnv) {
    let queue = env.queue("prio");
    let (probe, mut seen) = env.probe(
        Subscription::new(&queue)
            .bind("order.placed")
            .max_priority(10)
            .prefetch(1)
            .concurrency(1),
        |_| Ok(()),
    );
    let builder = env.builder().worker(probe);
    builder.declare().await.unwrap();

    let publisher = env.publisher().await;
    for id in 1..=5 {
        publisher
            .message(&order(id))
            .priority(1)
            .send()
            .await
            .unwrap();
    }
    publisher
        .message(&order(99))
        .priority(9)
        .send()
        .await
        .unwrap();

    let rt = builder.start().await.unwrap();
    let order_ids: Vec<u64> = seen.order_ids(6).await;
    rt.shutdown().await;
    assert_eq!(order_ids, [99, 1, 2, 3, 4, 5]);
}

async fn a_plain_json_message_from_a_bare_client_is_handled(env: TestEnv) {
    let queue = env.queue("bare");
    let (probe, mut seen) = env.probe(Subscription::new(&queue).bind("order.*"), |_| Ok(()));
    let rt = env.builder().worker(probe).start().await.unwrap();
    env.publish_bare(
        "order.placed",
        br#"{"order_id": 1001}"#,
        BasicProperties::default(),
    )
    .await;
    let s = seen.next().await;
    rt.shutdown().await;
    assert_eq!(s.body, json!({"order_id": 1001}));
    assert_eq!(
        s.event_type, "order.placed",
        "the routing key stands in for a missing type"
    );
    assert_eq!(s.attempt, 1);
    assert!(
        uuid::Uuid::parse_str(&s.message_id).is_ok(),
        "a missing message id is filled in"
    );
    assert_eq!(s.event_version, None);
    assert_eq!(env.ready(&queue).await, 0);
}

async fn a_panicking_handler_is_retried_and_the_worker_keeps_going(env: TestEnv) {
    let queue = env.queue("panicky");
    let policy = RetryPolicy::exponential(Duration::from_millis(50)).max_attempts(2);
    let (probe, mut seen) = env.probe(
        Subscription::new(&queue).bind("order.placed").retry(policy),
        |s| {
            if s.body["order_id"] == 1 {
                panic!("handler bug on order 1");
            }
            Ok(())
        },
    );
    let rt = env.builder().worker(probe).start().await.unwrap();
    let publisher = env.publisher().await;
    publisher.publish(&order(1)).await.unwrap();
    publisher.publish(&order(2)).await.unwrap();
    let dead = env.take(&format!("{queue}.dlq"), 1).await.remove(0);
    let seen_ids: Vec<(u64, u32)> = seen
        .take(3)
        .await
        .iter()
        .map(|s| (s.order_id(), s.attempt))
        .collect();
    rt.shutdown().await;
    assert!(
        seen_ids.contains(&(1, 1)) && seen_ids.contains(&(1, 2)) && seen_ids.contains(&(2, 1)),
        "{seen_ids:?}"
    );
    assert_eq!(
        dead.header_str(headers::EXCEPTION_KIND).as_deref(),
        Some("panic")
    );
    assert!(
        dead.header_str(headers::EXCEPTION_MESSAGE)
            .unwrap()
            .contains("handler bug on order 1")
    );
}

/// Publishes a follow-up event from its handler.
struct Relayer {
    queue: String,
}

#[derive(serde::Serialize)]
struct OrderConfirmed {
    order_id: u64,
}
impl Event for OrderConfirmed {
    const TYPE: &'static str = "order.confirmed";
}

impl Worker for Relayer {
    type Event = OrderPlaced;
    fn subscription(&self) -> Subscription {
        Subscription::new(&self.queue).bind("order.placed")
    }
    async fn handle(&self, order: Delivery<OrderPlaced>, ctx: &Context) -> Outcome {
        ctx.publish(&OrderConfirmed {
            order_id: order.order_id,
        })
        .await?;
        Ok(())
    }
}

async fn follow_up_events_carry_the_correlation_id(env: TestEnv) {
    let relayer = Relayer {
        queue: env.queue("relayer"),
    };
    env.track(&relayer.subscription());
    let (sink, mut confirmed) = env.probe(
        Subscription::new(env.queue("sink")).bind("order.confirmed"),
        |_| Ok(()),
    );
    let rt = env
        .builder()
        .worker(relayer)
        .worker(sink)
        .start()
        .await
        .unwrap();
    let publisher = env.publisher().await;

    let uncorrelated = publisher.publish(&order(1)).await.unwrap();
    let first = confirmed.next().await;
    assert_eq!(
        first.correlation_id.as_deref(),
        Some(uncorrelated.as_str()),
        "the message id seeds the chain"
    );
    publisher
        .message(&order(2))
        .correlation_id("checkout-77")
        .send()
        .await
        .unwrap();
    let second = confirmed.next().await;
    rt.shutdown().await;
    assert_eq!(second.correlation_id.as_deref(), Some("checkout-77"));
    assert_eq!(second.body, json!({"order_id": 2}));
}

async fn retry_after_waits_in_a_tier_of_the_requested_delay(env: TestEnv) {
    let queue = env.queue("limited");
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let (probe, mut seen) = env.probe(Subscription::new(&queue).bind("order.placed"), move |_| {
        if counter.fetch_add(1, Ordering::SeqCst) == 0 {
            Err(Failure::retry_after(
                Duration::from_millis(300),
                "rate limited",
            ))
        } else {
            Ok(())
        }
    });
    env.track_names([format!("{queue}.retry.300").as_str()]);
    let rt = env.builder().worker(probe).start().await.unwrap();
    env.publisher().await.publish(&order(1)).await.unwrap();
    let tries = seen.take(2).await;
    rt.shutdown().await;
    assert_eq!(tries[1].attempt, 2);
    assert!(tries[1].at - tries[0].at >= Duration::from_millis(300));
}

async fn quorum_queues_work_and_their_priority_is_refused_on_rabbitmq_3_but_works_on_4_and_in_memory(
    env: TestEnv,
) {
    let (plain, mut seen) = env.probe(
        Subscription::new(env.queue("qq"))
            .bind("order.placed")
            .queue_type(QueueType::Quorum),
        |_| Ok(()),
    );
    let rt = env.builder().worker(plain).start().await.unwrap();
    env.publisher().await.publish(&order(1)).await.unwrap();
    assert_eq!(seen.next().await.order_id(), 1);
    rt.shutdown().await;

    // Quorum queues honour priority only from RabbitMQ 4.0: either it works, or the start
    // fails with a clear error; never a silent downgrade.
    let (prio, mut prio_seen) = env.probe(
        Subscription::new(env.queue("qqp"))
            .bind("order.placed")
            .queue_type(QueueType::Quorum)
            .max_priority(10)
            .prefetch(1)
            .concurrency(1),
        |_| Ok(()),
    );
    let builder = env.builder().worker(prio);
    match builder.declare().await {
        Err(Error::Unsupported { reason, .. }) => assert!(reason.contains("4.0"), "{reason}"),
        Err(other) => panic!("unexpected error {other:?}"),
        Ok(()) => {
            let publisher = env.publisher().await;
            publisher
                .message(&order(1))
                .priority(1)
                .send()
                .await
                .unwrap();
            publisher
                .message(&order(2))
                .priority(9)
                .send()
                .await
                .unwrap();
            let rt = builder.start().await.unwrap();
            let firsts: Vec<_> = prio_seen.order_ids(2).await;
            rt.shutdown().await;
            assert_eq!(firsts, [2, 1]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_is_down_gives_a_clear_error_without_the_password() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener); // nothing listens there now
    let err = Runtime::builder()
        .url(format!("amqp://guest:hunter2@127.0.0.1:{port}/%2f"))
        .startup_timeout(Duration::from_millis(300))
        .worker(Relayer {
            queue: "never-declared".into(),
        })
        .start()
        .await
        .expect_err("start must fail");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(!text.contains("hunter2"), "the password leaked: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_to_a_broker_that_accepts_but_never_answers_fails_within_its_timeout() {
    // A port that takes the TCP connection and says nothing (a broker still starting).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let publisher =
        rabbitry::Publisher::builder(format!("amqp://guest:hunter2@127.0.0.1:{port}/%2f"))
            .exchange("events")
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
    let published = tokio::time::timeout(
        Duration::from_secs(30),
        publisher.publish(&OrderConfirmed { order_id: 1 }),
    )
    .await
    .expect("the publish ends: an error, not a hang");
    let err = published.expect_err("nothing answers there");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    silent.abort();
}

#[tokio::test(start_paused = true)]
async fn a_start_keeps_trying_until_the_startup_timeout_and_no_longer() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let started = tokio::time::Instant::now();
    let err = Runtime::builder()
        .url(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
        .startup_timeout(Duration::from_secs(30))
        .worker(Relayer {
            queue: "never-declared".into(),
        })
        .start()
        .await
        .expect_err("nothing listens there");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    // On tokio's paused clock: exactly the documented timeout, not the 15-20 s the
    // backoff alone would give.
    assert_eq!(started.elapsed(), Duration::from_secs(30));
}

/// A worker on any binding pattern.
struct Bound(&'static str, String);

impl Worker for Bound {
    type Event = serde_json::Value;
    fn subscription(&self) -> Subscription {
        Subscription::new(self.0).bind(&self.1)
    }
    async fn handle(&self, _: Delivery<serde_json::Value>, _: &Context) -> Outcome {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_is_refused_before_connecting() {
    let long_accented: String = std::iter::repeat_n('é', 200).collect();
    for (pattern, says) in [
        (long_accented.as_str(), "at most 255"),
        ("user*", "not a wildcard"),
        ("order..placed", "empty word"),
        ("order placed", "spaces"),
        ("", "empty"),
    ] {
        let err = Runtime::builder()
            .url("amqp://guest:guest@127.0.0.1:1/%2f")
            .worker(Bound("q", pattern.to_owned()))
            .start()
            .await
            .expect_err(pattern);
        assert!(
            matches!(&err, Error::Config(m) if m.contains(says) && m.contains("'q'")),
            "{pattern:?}: {err}"
        );
    }
    let cases: BTreeMap<&str, rabbitry::RuntimeBuilder> = BTreeMap::from([
        (
            "empty queue name",
            Runtime::builder().worker(Relayer {
                queue: String::new(),
            }),
        ),
        (
            "not a url",
            Runtime::builder()
                .url("http://x")
                .worker(Relayer { queue: "q".into() }),
        ),
    ]);
    for (what, builder) in cases {
        let err = builder.start().await.expect_err(what);
        assert!(matches!(err, Error::Config(_)), "{what}: {err:?}");
    }
    let dup = Runtime::builder()
        .worker(Relayer {
            queue: "same".into(),
        })
        .worker(Relayer {
            queue: "same".into(),
        })
        .plan()
        .unwrap_err();
    assert!(matches!(dup, Error::DuplicateWorker(ref n) if n == "same"));
}

async fn concurrent_unroutable_publishes_are_reported_exactly_in_memory_and_nearly_always_on_rabbitmq(
    env: TestEnv,
) {
    let queue = env.queue("routable");
    let (probe, mut seen) = env.probe(
        Subscription::new(&queue)
            .bind("order.placed")
            .prefetch(100)
            .concurrency(10),
        |_| Ok(()),
    );
    let rt = env.builder().worker(probe).start().await.unwrap();
    let publisher = env.publisher().await;
    let sends = (0..400u64).map(|i| {
        let publisher = publisher.clone();
        async move {
            let key = if i % 2 == 0 {
                "order.placed"
            } else {
                "nobody.listens"
            };
            (
                i,
                publisher.message(&order(i)).routing_key(key).send().await,
            )
        }
    });
    let results = futures_util::future::join_all(sends).await;
    let mut unroutable_reported = 0;
    for (i, result) in &results {
        match (i % 2, result) {
            (0, Ok(_)) => {}
            (1, Err(Error::Unroutable { routing_key, .. })) => {
                assert_eq!(routing_key, "nobody.listens");
                unroutable_reported += 1;
            }
            (1, Ok(_)) => {}
            other => panic!("order {i}: unexpected {other:?}"),
        }
    }
    // A routable message is never reported unroutable and nothing hangs. Detection of the
    // unroutable ones is exact except in a race inside the AMQP client (see `Publisher`).
    eprintln!("unroutable reported: {unroutable_reported}/200");
    if env.memory().is_some() {
        assert_eq!(
            unroutable_reported, 200,
            "the in-memory broker never mixes up returns"
        );
    } else {
        assert!(unroutable_reported > 0);
    }
    assert_eq!(seen.take(200).await.len(), 200);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_fail_the_start_at_once() {
    let started = std::time::Instant::now();
    let err = Runtime::builder()
        .url("amqp://guest:not-the-password@127.0.0.1:5672/%2f")
        .startup_timeout(Duration::from_secs(60))
        .worker(Relayer {
            queue: "never-declared".into(),
        })
        .start()
        .await
        .expect_err("start must fail");
    match &err {
        Error::Connect { source, .. } => assert_eq!(source.reply_code(), Some(403), "{err}"),
        other => panic!("expected Connect, got {other:?}"),
    }
    assert!(err.to_string().contains("ACCESS_REFUSED"), "{err}");
    assert!(!err.to_string().contains("not-the-password"), "{err}");
    // Not retried until the 60 s startup timeout: credentials do not fix themselves.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

/// A delayed message reaches its worker no earlier than asked, and at most the stated
/// precision plus a tolerance for a loaded machine later (the bound only catches a delay
/// that is grossly wrong; the lower bound is the guarantee).
async fn delayed_messages_arrive_no_earlier_than_asked_with_their_own_routing_key(env: TestEnv) {
    env.uses_delays();
    let (probe, mut seen) = env.probe(
        Subscription::new(env.queue("reminders")).bind("order.reminder.*"),
        |_| Ok(()),
    );
    let rt = env.builder().worker(probe).start().await.unwrap();
    let publisher = env.publisher().await;
    let tolerance = rabbitry::DELAY_PRECISION + Duration::from_secs(2);

    // Each message's lower bound counts from the start of its own send.
    let mut sent = BTreeMap::new();
    sent.insert(1, tokio::time::Instant::now());
    let late = publisher
        .message(&order(1))
        .routing_key("order.reminder.late")
        .delay(Duration::from_millis(2500))
        .send()
        .await
        .unwrap();
    // 2.4 s has bit 0 clear: it leaves the cascade through the zero-time queue.
    sent.insert(2, tokio::time::Instant::now());
    let even = publisher
        .message(&order(2))
        .routing_key("order.reminder.even")
        .delay(Duration::from_millis(2400))
        .send()
        .await
        .unwrap();
    sent.insert(3, tokio::time::Instant::now());
    let at = publisher
        .message(&order(3))
        .routing_key("order.reminder.at")
        .at(std::time::SystemTime::now() + Duration::from_millis(1200))
        .send()
        .await
        .unwrap();
    publisher
        .message(&order(4))
        .routing_key("order.reminder.now")
        .send()
        .await
        .unwrap();

    let mut arrived = BTreeMap::new();
    for _ in 0..4 {
        let s = seen.next().await;
        arrived.insert(s.order_id(), s);
    }
    assert_eq!(
        arrived.values().map(|s| s.order_id()).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    for (id, asked, message_id) in [(1, 2500, &late), (2, 2400, &even), (3, 1200, &at)] {
        let s = &arrived[&id];
        let after = s.at - sent[&id];
        let asked = Duration::from_millis(asked);
        assert!(
            after >= asked,
            "order {id} arrived after {after:?}, asked {asked:?}"
        );
        assert!(
            after <= asked + tolerance,
            "order {id} arrived after {after:?}"
        );
        assert_eq!(&s.message_id, message_id);
        assert_eq!(
            s.exchange, env.exchange,
            "delivered from the events exchange"
        );
        assert_eq!(s.attempt, 1);
    }
    assert_eq!(arrived[&1].routing_key, "order.reminder.late");
    assert_eq!(arrived[&2].routing_key, "order.reminder.even");
    // The undelayed one overtook them all.
    assert!(arrived[&4].at < arrived[&3].at);
    // Nothing waits in the tiers any more.
    for tier in rabbitry::Topology::delay_tiers(&env.exchange) {
        assert_eq!(env.ready(&tier).await, 0, "{tier}");
    }
    rt.shutdown().await;
}

/// A delay beyond what the broker can hold is refused before anything is sent.
async fn a_delay_longer_than_the_broker_holds_is_refused(env: TestEnv) {
    let publisher = env.publisher().await;
    let too_long = rabbitry::MAX_DELAY + Duration::from_secs(1);
    let err = publisher
        .message(&order(1))
        .routing_key("order.reminder")
        .delay(too_long)
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Config(ref m) if m.contains("longer than the broker can hold")),
        "{err}"
    );
}

on_both_brokers!(
    delayed_messages_arrive_no_earlier_than_asked_with_their_own_routing_key,
    a_delay_longer_than_the_broker_holds_is_refused,
    events_fan_out_to_every_matching_binding,
    every_handled_message_is_acknowledged_exactly_once,
    retries_follow_the_exponential_policy_then_dead_letter_with_headers,
    rejects_go_straight_to_the_dead_letter_queue,
    undecodable_payloads_are_dead_lettered_with_the_reason_and_good_ones_still_flow,
    a_retry_reaches_only_the_worker_that_failed,
    waiting_high_priority_messages_are_consumed_first,
    a_plain_json_message_from_a_bare_client_is_handled,
    a_panicking_handler_is_retried_and_the_worker_keeps_going,
    follow_up_events_carry_the_correlation_id,
    retry_after_waits_in_a_tier_of_the_requested_delay,
    quorum_queues_work_and_their_priority_is_refused_on_rabbitmq_3_but_works_on_4_and_in_memory,
    concurrent_unroutable_publishes_are_reported_exactly_in_memory_and_nearly_always_on_rabbitmq,
);
