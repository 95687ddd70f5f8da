//! The pipeline's layers and workers, on RabbitMQ and on the in-memory broker: filters,
//! transforms, JSON Schema validation (consume and publish), upcasting, rate limits,
//! de-duplication, routers, per-key ordering through retries, batches, priority by event
//! type and conditional routing.

#[macro_use]
mod support;

use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use rabbitry::middleware::{
    DedupLayer, FilterLayer, OrderKey, OrderedLayer, RateLimitLayer, TransformLayer, UpcastLayer,
    ValidateLayer,
};
use rabbitry::observe::Handling;
use rabbitry::prelude::*;
use rabbitry::{
    BatchLimits, BatchWorker, Condition, ContentRouter, Error, FailureKind, Rate, Registration,
    Router, Schema, Schemas, Topology, headers,
};
use serde_json::{Value, json};
use support::journal::Journal;
use support::*;
use tokio::sync::mpsc;
use tokio::time::Instant;

fn props(event_type: &str) -> BasicProperties {
    BasicProperties::default().with_type(event_type.into())
}

fn with_headers(p: BasicProperties, pairs: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut table = FieldTable::default();
    for (k, v) in pairs {
        table.insert((*k).into(), v.clone());
    }
    p.with_headers(table)
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// The value of `field` in each of the probe's deliveries, in order.
fn field(seen: &[Seen], field: &str) -> Vec<Value> {
    seen.iter().map(|s| s.body[field].clone()).collect()
}

async fn a_filter_skips_what_it_does_not_keep_and_records_why(env: TestEnv) {
    let journal = Arc::new(Journal::default());
    let queue = env.queue("fraud");
    let (probe, mut seen) = env.probe(Subscription::new(&queue).bind("order.#"), |_| Ok(()));
    let worker = Registration::new(probe)
        .layer(FilterLayer::event_types(["order.placed"]))
        .layer(FilterLayer::new(
            Condition::app_id("shop").or(Condition::header("x-source", "shop")),
        ))
        .layer(
            FilterLayer::payload(|order| order["total"].as_f64() > Some(100.0))
                .reason("small order"),
        );
    let rt = env
        .builder()
        .observer(journal.clone())
        .worker(worker)
        .start()
        .await
        .unwrap();

    let shop = || props("order.placed").with_app_id("shop".into());
    env.publish_bare("order.placed", br#"{"n": 1, "total": 500}"#, shop())
        .await;
    env.publish_bare("order.placed", br#"{"n": 2, "total": 50}"#, shop())
        .await;
    env.publish_bare(
        "order.cancelled",
        br#"{"n": 3, "total": 500}"#,
        props("order.cancelled").with_app_id("shop".into()),
    )
    .await;
    env.publish_bare(
        "order.placed",
        br#"{"n": 4, "total": 500}"#,
        props("order.placed").with_app_id("other".into()),
    )
    .await;
    let by_header = with_headers(props("order.placed"), &[("x-source", text("shop"))]);
    env.publish_bare("order.placed", br#"{"n": 5, "total": 900}"#, by_header)
        .await;

    let settled = journal.wait_for(&queue, 5).await;
    assert_eq!(field(&seen.take(2).await, "n"), [json!(1), json!(5)]);
    let skips: Vec<String> = settled
        .iter()
        .filter_map(|(_, h, _)| match h {
            Handling::Skipped { reason } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(skips.len(), 3, "{settled:?}");
    assert!(skips.iter().any(|r| r == "small order"), "{skips:?}");
    assert!(
        skips.iter().any(|r| r.contains("order.placed")),
        "{skips:?}"
    );
    assert!(skips.iter().any(|r| r.contains("shop")), "{skips:?}");
    assert_eq!(journal.count(&queue, "handled"), 2);
    assert_eq!(
        journal.count(&queue, "retried") + journal.count(&queue, "dead_lettered"),
        0
    );
    rt.shutdown().await;
    assert_eq!(env.ready(&queue).await, 0, "skips are acknowledged");
    assert_eq!(env.ready(&format!("{queue}.dlq")).await, 0);
}

async fn a_transform_rewrites_the_json_before_the_handler_sees_it(env: TestEnv) {
    let queue = env.queue("crm");
    let (probe, mut seen) = env.probe(
        Subscription::new(&queue).bind("user.registered"),
        |_| Ok(()),
    );
    let tidy = TransformLayer::new()
        .rename("/mail", "/email")
        .redact("/password")
        .set("/source", json!("legacy"))
        .when(Condition::app_id("legacy"));
    let rt = env
        .builder()
        .worker(Registration::new(probe).layer(tidy))
        .start()
        .await
        .unwrap();
    let legacy = props("user.registered").with_app_id("legacy".into());
    env.publish_bare(
        "user.registered",
        br#"{"mail": "a@b.c", "password": "hunter2"}"#,
        legacy,
    )
    .await;
    env.publish_bare(
        "user.registered",
        br#"{"mail": "x@y.z"}"#,
        props("user.registered"),
    )
    .await;
    let got = seen.take(2).await;
    assert_eq!(
        got[0].body,
        json!({"email": "a@b.c", "password": "[redacted]", "source": "legacy"})
    );
    assert_eq!(
        got[1].body,
        json!({"mail": "x@y.z"}),
        "only messages meeting the condition change"
    );
    rt.shutdown().await;
}

/// The contract of `order.placed` as the billing team writes it down.
fn order_schema() -> Schema {
    Schema::from_json(&json!({
        "type": "object",
        "required": ["order_id", "total"],
        "properties": {
            "order_id": { "type": "integer" },
            "total": { "type": "number", "minimum": 0 }
        }
    }))
    .unwrap()
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[allow(dead_code)]
struct Payment {
    order_id: u64,
    amount: f64,
}

async fn an_invalid_payload_is_dead_lettered_with_readable_reasons_and_an_invalid_publish_is_refused(
    env: TestEnv,
) {
    let journal = Arc::new(Journal::default());
    let queue = env.queue("billing");
    let payments = env.queue("payments");
    let (probe, mut seen) = env.probe(Subscription::new(&queue).bind("order.placed"), |_| Ok(()));
    let (derived, mut paid) =
        env.probe(
            Subscription::new(&payments).bind("payment.made"),
            |_| Ok(()),
        );
    let rt = env
        .builder()
        .observer(journal.clone())
        .worker(Registration::new(probe).layer(ValidateLayer::new(order_schema())))
        .worker(Registration::new(derived).layer(ValidateLayer::of::<Payment>().unwrap()))
        .start()
        .await
        .unwrap();

    env.publish_bare(
        "order.placed",
        br#"{"order_id": "seven"}"#,
        props("order.placed"),
    )
    .await;
    env.publish_bare(
        "order.placed",
        br#"{"order_id": 8, "total": 12.5}"#,
        props("order.placed"),
    )
    .await;
    env.publish_bare("payment.made", br#"{"order_id": 8}"#, props("payment.made"))
        .await;
    env.publish_bare(
        "payment.made",
        br#"{"order_id": 8, "amount": 3}"#,
        props("payment.made"),
    )
    .await;

    assert_eq!(seen.next().await.body["order_id"], 8);
    assert_eq!(paid.next().await.body["amount"], 3);
    let dead = env.take(&format!("{queue}.dlq"), 1).await;
    assert_eq!(
        dead[0].header_str(headers::EXCEPTION_KIND).as_deref(),
        Some("invalid")
    );
    let reason = dead[0].header_str(headers::EXCEPTION_MESSAGE).unwrap();
    assert!(reason.contains("schema of order.placed"), "{reason}");
    assert!(reason.contains("2 violations"), "{reason}");
    assert!(
        reason.contains("/order_id: \"seven\" is not of type \"integer\""),
        "{reason}"
    );
    assert!(
        reason.contains("\"total\" is a required property"),
        "{reason}"
    );
    let dead = env.take(&format!("{payments}.dlq"), 1).await;
    let reason = dead[0].header_str(headers::EXCEPTION_MESSAGE).unwrap();
    assert!(
        reason.contains("\"amount\" is a required property"),
        "{reason}"
    );
    let settled = journal.wait_for(&queue, 2).await;
    assert!(settled.iter().any(|(_, h, _)| matches!(
        h,
        Handling::DeadLettered {
            kind: FailureKind::Invalid,
            ..
        }
    )));
    assert_eq!(
        journal.count(&queue, "retried"),
        0,
        "invalid is never retried"
    );

    // At publish: a typed error, and nothing reaches the queue.
    let checked = Publisher::builder(env.url())
        .exchange(env.exchange.clone())
        .schemas(Schemas::new().insert("order.placed", order_schema()))
        .connect()
        .await
        .unwrap();
    let mut refund = order(9);
    refund.total = -5.0;
    let refused = checked.publish(&refund).await.unwrap_err();
    match &refused {
        Error::Invalid { event_type, reason } => {
            assert_eq!(event_type, "order.placed");
            assert!(
                reason.contains("/total: -5.0 is less than the minimum of 0"),
                "{reason}"
            );
        }
        other => panic!("expected Error::Invalid, got {other:?}"),
    }
    checked.publish(&order(10)).await.unwrap();
    assert_eq!(
        seen.next().await.body["order_id"],
        10,
        "the next valid event is the next one handled"
    );
    // In a batch, the invalid event is refused by position and the others are sent.
    let batch = [order(11), refund, order(12)];
    match checked.publish_batch(&batch).await.unwrap_err() {
        Error::Batch { total, failures } => {
            assert_eq!(total, 3);
            assert_eq!(failures.len(), 1, "{failures:?}");
            assert_eq!(failures[0].0, 1);
            assert!(
                matches!(failures[0].1, Error::Invalid { .. }),
                "{failures:?}"
            );
        }
        other => panic!("expected Error::Batch, got {other:?}"),
    }
    let mut ids: Vec<u64> = seen.take(2).await.iter().map(|s| s.order_id()).collect();
    ids.sort_unstable();
    assert_eq!(ids, [11, 12]);
    rt.shutdown().await;
    assert_eq!(env.ready(&queue).await, 0);
    assert_eq!(journal.count(&queue, "handled"), 4);
    // Nothing refused at publish reached the broker: the only dead letter is the bare one.
    assert_eq!(env.ready(&format!("{queue}.dlq")).await, 0);
    assert_eq!(journal.count(&queue, "dead_lettered"), 1);
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CustomerRegistered {
    name: String,
    email: String,
    country: String,
}

impl Event for CustomerRegistered {
    const TYPE: &'static str = "customer.registered";
    const VERSION: u32 = 3;
}

/// A worker that hands each typed delivery (with its version header) to the test.
struct Welcome {
    subscription: Subscription,
    tx: mpsc::UnboundedSender<(CustomerRegistered, Option<u32>)>,
}

impl Worker for Welcome {
    type Event = CustomerRegistered;

    fn subscription(&self) -> Subscription {
        self.subscription.clone()
    }

    async fn handle(&self, d: Delivery<CustomerRegistered>, _: &Context) -> Outcome {
        let version = d.event_version();
        let _ = self.tx.send((d.into_payload(), version));
        Ok(())
    }
}

async fn old_versions_are_upcast_for_the_handler_and_a_too_new_one_is_dead_lettered(env: TestEnv) {
    let queue = env.queue("welcome");
    let subscription = Subscription::new(&queue).bind("customer.registered");
    env.track(&subscription);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let upcast = UpcastLayer::of::<CustomerRegistered>()
        .step(1, |mut v| {
            if let Some(mail) = v.as_object_mut().and_then(|o| o.remove("mail")) {
                v["email"] = mail;
            }
            v
        })
        .step(2, |mut v| {
            v["country"] = json!("unknown");
            v
        });
    let worker = Registration::new(Welcome { subscription, tx }).layer(upcast);
    let rt = env.builder().worker(worker).start().await.unwrap();

    let version = |v: i64| {
        with_headers(
            props("customer.registered"),
            &[(headers::EVENT_VERSION, AMQPValue::LongLongInt(v))],
        )
    };
    // v1 from a client that sends no version header at all.
    env.publish_bare(
        "customer.registered",
        br#"{"name": "Ada", "mail": "ada@x"}"#,
        props("customer.registered"),
    )
    .await;
    env.publish_bare(
        "customer.registered",
        br#"{"name": "Bob", "email": "bob@x"}"#,
        version(2),
    )
    .await;
    env.publish_bare(
        "customer.registered",
        br#"{"name": "Cy", "email": "cy@x", "country": "FR"}"#,
        version(3),
    )
    .await;
    env.publish_bare(
        "customer.registered",
        br#"{"name": "Di", "email": "di@x", "country": "FR", "tier": 2}"#,
        version(4),
    )
    .await;
    env.publish_bare(
        "customer.registered",
        br#"{"name": "Ed"}"#,
        with_headers(
            props("customer.registered"),
            &[(headers::EVENT_VERSION, text("banana"))],
        ),
    )
    .await;

    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(rx.recv().await.unwrap());
    }
    let summary: Vec<_> = got
        .iter()
        .map(|(c, v)| (c.name.as_str(), c.email.as_str(), c.country.as_str(), *v))
        .collect();
    assert_eq!(
        summary,
        [
            ("Ada", "ada@x", "unknown", Some(3)),
            ("Bob", "bob@x", "unknown", Some(3)),
            ("Cy", "cy@x", "FR", Some(3)),
        ]
    );
    let dead = env.take(&format!("{queue}.dlq"), 2).await;
    for d in &dead {
        assert_eq!(
            d.header_str(headers::EXCEPTION_KIND).as_deref(),
            Some("unsupported_version")
        );
    }
    let reasons: Vec<String> = dead
        .iter()
        .map(|d| d.header_str(headers::EXCEPTION_MESSAGE).unwrap())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("version 4, newer than this worker handles (3)")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("not a version number")),
        "{reasons:?}"
    );
    rt.shutdown().await;
    assert!(
        rx.try_recv().is_err(),
        "nothing mis-decoded reached the handler"
    );
}

async fn a_rate_limit_holds_its_rate_and_loses_or_retries_nothing(env: TestEnv) {
    let journal = Arc::new(Journal::default());
    let queue = env.queue("mailer");
    let subscription = Subscription::new(&queue)
        .bind("mail.send")
        .prefetch(5)
        .concurrency(5);
    let (probe, mut seen) = env.probe(subscription.clone(), |_| Ok(()));
    Topology::new(&env.exchange, [&subscription])
        .declare(&env.url())
        .await
        .unwrap();
    let rate = Rate::per_second(20).unwrap().burst(2);
    #[derive(serde::Serialize)]
    struct Mail {
        n: u32,
    }
    impl Event for Mail {
        const TYPE: &'static str = "mail.send";
    }
    // The producer side: a limited publisher fills the queue.
    let publisher = Publisher::builder(env.url())
        .exchange(env.exchange.clone())
        .rate_limit(rate)
        .connect()
        .await
        .unwrap();
    let started = Instant::now();
    for n in 0..12 {
        publisher.publish(&Mail { n }).await.unwrap();
    }
    let published_in = started.elapsed();
    env.wait_until_ready(&queue, 12).await;
    // The worker side: it starts on a full queue, so only its own limit spaces deliveries.
    let rt = env
        .builder()
        .observer(journal.clone())
        .worker(Registration::new(probe).layer(RateLimitLayer::new(rate)))
        .start()
        .await
        .unwrap();
    let got = seen.take(12).await;
    let handled_in = got[11].at - got[0].at;
    // 12 messages at 20/s with a burst of 2: the last may go no sooner than 10 × 50 ms
    // after the first. A lower bound is what a limit promises; it is not a speed claim.
    assert!(
        published_in >= Duration::from_millis(500),
        "published 12 in {published_in:?}"
    );
    assert!(
        handled_in >= Duration::from_millis(450),
        "handled 12 in {handled_in:?}"
    );
    let mut ns: Vec<u64> = got.iter().map(|s| s.body["n"].as_u64().unwrap()).collect();
    ns.sort_unstable();
    assert_eq!(ns, (0..12).collect::<Vec<_>>());
    journal.wait_for(&queue, 12).await;
    assert_eq!(
        journal.count(&queue, "handled"),
        12,
        "none retried, none lost"
    );
    rt.shutdown().await;
    assert_eq!(env.ready(&queue).await, 0);
}

async fn duplicates_are_skipped_and_a_retried_message_is_not_a_duplicate(env: TestEnv) {
    let journal = Arc::new(Journal::default());
    let queue = env.queue("ledger");
    let subscription = Subscription::new(&queue)
        .bind("payment.made")
        .prefetch(1)
        .concurrency(1)
        .retry(RetryPolicy::exponential(Duration::from_millis(100)));
    // "flaky" fails on its first attempt, "boom" panics on its first.
    let (probe, mut seen) = env.probe(subscription, |s| match (s.body["n"].as_str(), s.attempt) {
        (Some("flaky"), 1) => Err("downstream timeout".into()),
        (Some("boom"), 1) => panic!("the handler panicked"),
        _ => Ok(()),
    });
    let rt = env
        .builder()
        .observer(journal.clone())
        .worker(Registration::new(probe).layer(DedupLayer::new()))
        .start()
        .await
        .unwrap();
    let with_id = |id: &str| props("payment.made").with_message_id(id.into());
    env.publish_bare("payment.made", br#"{"n": "a"}"#, with_id("pay-1"))
        .await;
    env.publish_bare("payment.made", br#"{"n": "flaky"}"#, with_id("pay-2"))
        .await;
    env.publish_bare("payment.made", br#"{"n": "boom"}"#, with_id("pay-4"))
        .await;
    env.publish_bare("payment.made", br#"{"n": "a again"}"#, with_id("pay-1"))
        .await;
    let keyed = with_headers(with_id("pay-3"), &[("x-idempotency-key", text("pay-1"))]);
    env.publish_bare("payment.made", br#"{"n": "same key"}"#, keyed)
        .await;
    // No id at all (a bare client): nothing can tell two apart, so both are handled.
    env.publish_bare("payment.made", br#"{"n": "anon"}"#, props("payment.made"))
        .await;
    env.publish_bare("payment.made", br#"{"n": "anon"}"#, props("payment.made"))
        .await;

    let settled = journal.wait_for(&queue, 9).await;
    let got = seen.take(7).await;
    let mut names: Vec<String> = got
        .iter()
        .map(|s| format!("{}#{}", s.body["n"].as_str().unwrap(), s.attempt))
        .collect();
    names.sort();
    // The retries of "flaky" and of "boom" (after a panic) are handled, not skipped.
    assert_eq!(
        names,
        [
            "a#1", "anon#1", "anon#1", "boom#1", "boom#2", "flaky#1", "flaky#2"
        ]
    );
    let duplicates = settled
        .iter()
        .filter(
            |(_, h, _)| matches!(h, Handling::Skipped { reason } if reason.contains("duplicate")),
        )
        .count();
    assert_eq!(duplicates, 2, "{settled:?}");
    assert_eq!(journal.count(&queue, "retried"), 2);
    rt.shutdown().await;
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Shipped {
    order_id: u64,
}
impl Event for Shipped {
    const TYPE: &'static str = "order.shipped";
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Refunded {
    order_id: u64,
    amount: f64,
}
impl Event for Refunded {
    const TYPE: &'static str = "order.refunded";
    const VERSION: u32 = 2;
}

async fn a_router_dispatches_on_the_event_type_and_dead_letters_or_skips_unknown_ones(
    env: TestEnv,
) {
    let journal = Arc::new(Journal::default());
    let queue = env.queue("status");
    let lenient = env.queue("status-lenient");
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let (shipped_tx, refunded_tx) = (tx.clone(), tx.clone());
    let router = Router::new(Subscription::new(&queue))
        .on::<Shipped>(move |d: Delivery<Shipped>, _ctx: Context| {
            let tx = shipped_tx.clone();
            async move {
                let _ = tx.send(format!("shipped {}", d.order_id));
                Ok(())
            }
        })
        .on(move |d: Delivery<Refunded>, _ctx: Context| {
            let tx = refunded_tx.clone();
            async move {
                let _ = tx.send(format!("refunded {} {}", d.order_id, d.amount));
                Ok(())
            }
        });
    let registration = Registration::from(router);
    // With no bindings of its own, the router is bound to each type it routes.
    assert_eq!(
        registration.subscription().bindings(),
        ["order.refunded", "order.shipped"]
    );
    env.track(registration.subscription());
    let skipping = Router::new(Subscription::new(&lenient).bind("order.#"))
        .on(|_: Delivery<Shipped>, _: Context| async { Ok(()) })
        .skip_unknown();
    let skipping = Registration::from(skipping);
    env.track(skipping.subscription());
    let rt = env
        .builder()
        .observer(journal.clone())
        .worker(registration)
        .worker(skipping)
        .start()
        .await
        .unwrap();

    let publisher = env.publisher().await;
    publisher.publish(&Shipped { order_id: 1 }).await.unwrap();
    publisher
        .publish(&Refunded {
            order_id: 2,
            amount: 9.5,
        })
        .await
        .unwrap();
    // An unknown type, delivered through a binding that covers it.
    env.publish_bare("order.shipped", br#"{"order_id": 3}"#, props("order.lost"))
        .await;
    // A version newer than the handler's.
    let v3 = with_headers(
        props("order.refunded"),
        &[(headers::EVENT_VERSION, AMQPValue::LongLongInt(3))],
    );
    env.publish_bare("order.refunded", br#"{"order_id": 4, "amount": 1}"#, v3)
        .await;

    let mut got = vec![rx.recv().await.unwrap(), rx.recv().await.unwrap()];
    got.sort();
    assert_eq!(got, ["refunded 2 9.5", "shipped 1"]);
    let dead = env.take(&format!("{queue}.dlq"), 2).await;
    let kinds: Vec<_> = dead
        .iter()
        .map(|d| d.header_str(headers::EXCEPTION_KIND).unwrap())
        .collect();
    assert!(
        kinds.contains(&"unknown_type".to_owned())
            && kinds.contains(&"unsupported_version".to_owned()),
        "{kinds:?}"
    );
    let unknown = dead
        .iter()
        .find(|d| d.header_str(headers::EXCEPTION_KIND).as_deref() == Some("unknown_type"))
        .unwrap();
    let reason = unknown.header_str(headers::EXCEPTION_MESSAGE).unwrap();
    assert_eq!(
        reason,
        "no handler for event type 'order.lost' (this router handles: order.refunded, order.shipped)"
    );
    // The lenient router handles shipments only: it skipped both refunds and the lost one.
    let settled = journal.wait_for(&lenient, 4).await;
    assert_eq!(journal.count(&lenient, "skipped"), 3, "{settled:?}");
    assert_eq!(journal.count(&lenient, "handled"), 1, "{settled:?}");
    rt.shutdown().await;
}

async fn per_key_order_holds_through_a_retry_while_other_keys_proceed(env: TestEnv) {
    let journal = Arc::new(Journal::default());
    let queue = env.queue("accounts");
    let subscription = Subscription::new(&queue)
        .bind("account.#")
        .prefetch(20)
        .concurrency(8)
        .retry(RetryPolicy::exponential(Duration::from_secs(2)));
    // A1 fails on its first attempt; its key must wait for it.
    let (probe, mut seen) = env.probe(subscription, |s| match (s.body["id"].as_str(), s.attempt) {
        (Some("A1"), 1) => Err("ledger locked".into()),
        _ => Ok(()),
    });
    // Deferred messages wait as long as A1's retry (its policy's 2 s tier), so no other
    // delay queue is made.
    let ordered =
        OrderedLayer::new(OrderKey::Header("x-account".into())).defer_for(Duration::from_secs(2));
    let rt = env
        .builder()
        .observer(journal.clone())
        .worker(Registration::new(probe).layer(ordered))
        .start()
        .await
        .unwrap();

    let publish = |id: &'static str| {
        let account = &id[..1];
        let p = with_headers(
            props("account.entry").with_message_id(id.into()),
            &[("x-account", text(account))],
        );
        (id, p)
    };
    let send = async |ids: &[&'static str]| {
        for id in ids {
            let (id, p) = publish(id);
            let body = json!({ "id": id }).to_string();
            env.publish_bare("account.entry", body.as_bytes(), p).await;
        }
    };
    send(&["A1", "A2"]).await;
    // A1 is out in its retry queue (2 s) and A2 waits behind it…
    journal
        .wait_until(&queue, |done| {
            let seen = |want: &str, deferred: bool| {
                done.iter().any(|(id, h, _)| {
                    id == want
                        && match deferred {
                            true => matches!(h, Handling::Deferred { .. }),
                            false => matches!(h, Handling::Retried { .. }),
                        }
                })
            };
            seen("A1", false) && seen("A2", true)
        })
        .await;
    // …while other accounts go on.
    send(&["B1", "A3", "B2", "B3"]).await;
    let got = seen.take(7).await;
    let order_of = |account: &str| -> Vec<String> {
        got.iter()
            .map(|s| format!("{}#{}", s.body["id"].as_str().unwrap(), s.attempt))
            .filter(|id| id.starts_with(account))
            .collect()
    };
    assert_eq!(order_of("A"), ["A1#1", "A1#2", "A2#1", "A3#1"]);
    assert_eq!(order_of("B"), ["B1#1", "B2#1", "B3#1"]);
    // Account B did not wait for A's retry.
    let position = |id: &str| {
        got.iter()
            .position(|s| format!("{}#{}", s.body["id"].as_str().unwrap(), s.attempt) == id)
            .unwrap()
    };
    assert!(position("B3#1") < position("A1#2"), "B waited for A");
    journal.wait_for(&queue, 7).await;
    let settled = journal.of(&queue);
    assert!(
        settled
            .iter()
            .any(|(id, h, _)| id == "A2" && matches!(h, Handling::Deferred { .. })),
        "A2 waited in the broker while A1 was retried: {settled:?}"
    );
    assert_eq!(journal.count(&queue, "retried"), 1);
    assert_eq!(journal.count(&queue, "dead_lettered"), 0);
    rt.shutdown().await;
    // Deferring never counts as an attempt.
    assert!(got.iter().all(|s| s.body["id"] == "A1" || s.attempt == 1));
}

/// A batch worker that reports each batch's ids and rejects order 3.
struct Archive {
    subscription: Subscription,
    batches: mpsc::UnboundedSender<Vec<u64>>,
}

impl BatchWorker for Archive {
    type Event = OrderPlaced;

    fn subscription(&self) -> Subscription {
        self.subscription.clone()
    }

    fn batch(&self) -> BatchLimits {
        BatchLimits::new(5, Duration::from_millis(500))
    }

    async fn handle(&self, batch: Vec<Delivery<OrderPlaced>>, _ctx: &Context) -> Vec<Outcome> {
        let _ = self
            .batches
            .send(batch.iter().map(|d| d.order_id).collect());
        batch
            .iter()
            .map(|d| match d.order_id {
                3 => Err(Failure::reject("order 3 is on hold")),
                _ => Ok(()),
            })
            .collect()
    }
}

async fn batches_fill_by_size_or_by_time_and_each_message_gets_its_own_outcome(env: TestEnv) {
    let journal = Arc::new(Journal::default());
    let queue = env.queue("archive");
    let subscription = Subscription::new(&queue).bind("order.placed");
    env.track(&subscription);
    // The twelve orders wait in the queue before the worker starts, so they arrive together.
    Topology::new(&env.exchange, [&subscription])
        .declare(&env.url())
        .await
        .unwrap();
    let publisher = env.publisher().await;
    let orders: Vec<OrderPlaced> = (1..=12).map(order).collect();
    publisher.publish_batch(&orders).await.unwrap();
    env.wait_until_ready(&queue, 12).await;

    let (tx, mut batches) = mpsc::unbounded_channel();
    let archive = Archive {
        subscription,
        batches: tx,
    };
    let rt = env
        .builder()
        .observer(journal.clone())
        .worker(Registration::batch(archive))
        .start()
        .await
        .unwrap();
    let mut sizes = Vec::new();
    let mut ids = Vec::new();
    while ids.len() < 12 {
        let batch = tokio::time::timeout(PATIENCE, batches.recv())
            .await
            .unwrap()
            .unwrap();
        sizes.push(batch.len());
        ids.extend(batch);
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=12).collect::<Vec<_>>());
    assert!(sizes.iter().all(|s| *s <= 5), "{sizes:?}");
    assert!(sizes.contains(&5), "a full batch runs at once: {sizes:?}");
    // 12 is not a multiple of 5: some batch ran short, because its time was up.
    assert!(sizes.iter().any(|s| *s < 5), "{sizes:?}");
    journal.wait_for(&queue, 12).await;
    assert_eq!(journal.count(&queue, "handled"), 11);
    let dead = env.take(&format!("{queue}.dlq"), 1).await;
    assert_eq!(
        dead[0].header_str(headers::EXCEPTION_MESSAGE).as_deref(),
        Some("order 3 is on hold")
    );
    rt.shutdown().await;
    assert_eq!(env.ready(&queue).await, 0);
}

#[derive(serde::Serialize)]
struct Report {
    n: u32,
}
impl Event for Report {
    const TYPE: &'static str = "job.report";
}

#[derive(serde::Serialize)]
struct PasswordReset {
    n: u32,
}
impl Event for PasswordReset {
    const TYPE: &'static str = "job.password-reset";
    const PRIORITY: Option<u8> = Some(8);
}

async fn a_high_priority_event_type_overtakes_waiting_low_priority_ones(env: TestEnv) {
    let queue = env.queue("jobs");
    let subscription = Subscription::new(&queue)
        .bind("job.#")
        .max_priority(10)
        .prefetch(1)
        .concurrency(1);
    let (probe, mut seen) = env.probe(subscription.clone(), |_| Ok(()));
    Topology::new(&env.exchange, [&subscription])
        .declare(&env.url())
        .await
        .unwrap();
    let publisher = env.publisher().await;
    for n in 0..5 {
        publisher.publish(&Report { n }).await.unwrap();
    }
    publisher.publish(&PasswordReset { n: 5 }).await.unwrap();
    // A message may still set its own priority.
    publisher
        .message(&PasswordReset { n: 6 })
        .priority(1)
        .send()
        .await
        .unwrap();
    env.wait_until_ready(&queue, 7).await;
    let rt = env.builder().worker(probe).start().await.unwrap();
    let got = seen.take(7).await;
    let order: Vec<(u64, Option<u8>)> = got
        .iter()
        .map(|s| (s.body["n"].as_u64().unwrap(), s.priority))
        .collect();
    assert_eq!(
        order[0],
        (5, Some(8)),
        "the password reset overtook the reports: {order:?}"
    );
    assert_eq!(order[1], (6, Some(1)));
    assert_eq!(
        order[2..].iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    rt.shutdown().await;
}

async fn conditional_routing_sends_each_event_to_the_consumers_its_rules_name(env: TestEnv) {
    let journal = Arc::new(Journal::default());
    let triage = env.queue("triage");
    let router = ContentRouter::new(
        Subscription::new(&triage)
            .bind("order.placed")
            .bind("order.review"),
    )
    .rule(Condition::field("/total").gt(500.0), "order.review")
    .rule(Condition::header("x-region", "eu"), "order.eu")
    .otherwise("order.standard");
    let router = Registration::from(router);
    env.track(router.subscription());
    let (review, mut reviewed) = env.probe(
        Subscription::new(env.queue("review")).bind("order.review"),
        |_| Ok(()),
    );
    let (eu, mut eu_seen) = env.probe(Subscription::new(env.queue("eu")).bind("order.eu"), |_| {
        Ok(())
    });
    let (standard, mut standard_seen) = env.probe(
        Subscription::new(env.queue("standard")).bind("order.standard"),
        |_| Ok(()),
    );
    let rt = env
        .builder()
        .observer(journal.clone())
        .worker(router)
        .worker(review)
        .worker(eu)
        .worker(standard)
        .start()
        .await
        .unwrap();
    let eu_header = |p: BasicProperties| with_headers(p, &[("x-region", text("eu"))]);
    let publish = |n: u64, total: f64| {
        (
            json!({ "n": n, "total": total }).to_string(),
            props("order.placed").with_message_id(format!("o{n}").into()),
        )
    };
    let (b1, p1) = publish(1, 900.0);
    env.publish_bare("order.placed", b1.as_bytes(), p1).await;
    let (b2, p2) = publish(2, 50.0);
    env.publish_bare("order.placed", b2.as_bytes(), eu_header(p2))
        .await;
    let (b3, p3) = publish(3, 700.0);
    env.publish_bare("order.placed", b3.as_bytes(), eu_header(p3))
        .await;
    let (b4, p4) = publish(4, 10.0);
    env.publish_bare("order.placed", b4.as_bytes(), p4).await;

    let mut r: Vec<u64> = reviewed
        .take(2)
        .await
        .iter()
        .map(|s| s.body["n"].as_u64().unwrap())
        .collect();
    let mut e: Vec<u64> = eu_seen
        .take(2)
        .await
        .iter()
        .map(|s| s.body["n"].as_u64().unwrap())
        .collect();
    let s = standard_seen.next().await;
    r.sort_unstable();
    e.sort_unstable();
    assert_eq!(r, [1, 3]);
    assert_eq!(e, [2, 3]);
    assert_eq!(s.body["n"], 4);
    assert_eq!(s.message_id, "o4", "the copy keeps the message id");
    assert_eq!(s.event_type, "order.placed", "and the event type");
    // The router is bound to order.review too: its own copies come back and are skipped.
    let settled = journal.wait_for(&triage, 6).await;
    assert_eq!(journal.count(&triage, "handled"), 4, "{settled:?}");
    assert_eq!(journal.count(&triage, "skipped"), 2, "{settled:?}");
    rt.shutdown().await;
    assert!(
        reviewed.drain().is_empty()
            && eu_seen.drain().is_empty()
            && standard_seen.drain().is_empty()
    );
}

async fn content_routers_that_lead_back_to_each_other_do_not_loop(env: TestEnv) {
    let journal = Arc::new(Journal::default());
    let (a, b) = (env.queue("ping"), env.queue("pong"));
    let ping = Registration::from(
        ContentRouter::new(Subscription::new(&a).bind("loop.ping")).otherwise("loop.pong"),
    );
    let pong = Registration::from(
        ContentRouter::new(Subscription::new(&b).bind("loop.pong")).otherwise("loop.ping"),
    );
    env.track(ping.subscription());
    env.track(pong.subscription());
    let rt = env
        .builder()
        .observer(journal.clone())
        .worker(ping)
        .worker(pong)
        .start()
        .await
        .unwrap();
    env.publish_bare("loop.ping", b"{}", props("loop.ping"))
        .await;
    // ping routes it to pong, pong back to ping, and ping knows it: skipped. (The copy can
    // come back before the original's settlement is reported: in either order.)
    let settled = journal.wait_for(&a, 2).await;
    let handled = settled.iter().filter(|s| s.1 == Handling::Handled).count();
    let skipped = settled
        .iter()
        .filter(
            |s| matches!(&s.1, Handling::Skipped { reason } if reason.contains("already routed")),
        )
        .count();
    assert_eq!((handled, skipped), (1, 1), "{settled:?}");
    // pong's own settlement may be reported after ping has seen the copy come back.
    let pong = journal.wait_for(&b, 1).await;
    assert_eq!(pong[0].1, Handling::Handled);
    rt.shutdown().await;
    assert_eq!(journal.count(&b, "handled"), 1);
    assert_eq!(journal.count(&a, "handled"), 1);
    assert_eq!(env.ready(&a).await + env.ready(&b).await, 0);
}

on_both_brokers!(
    content_routers_that_lead_back_to_each_other_do_not_loop,
    a_filter_skips_what_it_does_not_keep_and_records_why,
    a_transform_rewrites_the_json_before_the_handler_sees_it,
    an_invalid_payload_is_dead_lettered_with_readable_reasons_and_an_invalid_publish_is_refused,
    old_versions_are_upcast_for_the_handler_and_a_too_new_one_is_dead_lettered,
    a_rate_limit_holds_its_rate_and_loses_or_retries_nothing,
    duplicates_are_skipped_and_a_retried_message_is_not_a_duplicate,
    a_router_dispatches_on_the_event_type_and_dead_letters_or_skips_unknown_ones,
    per_key_order_holds_through_a_retry_while_other_keys_proceed,
    batches_fill_by_size_or_by_time_and_each_message_gets_its_own_outcome,
    a_high_priority_event_type_overtakes_waiting_low_priority_ones,
    conditional_routing_sends_each_event_to_the_consumers_its_rules_name,
);
