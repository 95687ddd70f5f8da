//! The keeper on RabbitMQ and on the in-memory broker, into SQLite and PostgreSQL stores: every published
//! event recorded once (replayed copies not again), dead letters moved out of the DLQ with
//! their failure.

#[path = "../../tests/support/mod.rs"]
#[macro_use]
#[allow(unused_macros)]
mod support;
#[macro_use]
mod db;

use std::time::Duration;

use db::Db;
use rabbitry::prelude::*;
use rabbitry::report::REPORTS_EXCHANGE;
use rabbitry::{Registration, RetryPolicy, Runtime};
use rabbitry_store::{DeadLetterState, EventFilter, Keeper, REPLAYED_FROM};
use serde::{Deserialize, Serialize};
use support::*;

#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    id: u64,
}

impl Event for OrderPlaced {
    const TYPE: &'static str = "order.placed";
}

#[derive(Serialize, Deserialize)]
struct OrderPaid {
    id: u64,
}

impl Event for OrderPaid {
    const TYPE: &'static str = "order.paid";
}

/// The keeper's runtime on the test's exchange.
async fn keeper(env: &TestEnv, keeper: &Keeper) -> Runtime {
    let mut builder = env.builder();
    for registration in keeper.registrations() {
        env.track(registration.subscription());
        builder = builder.worker(registration);
    }
    builder.start().await.expect("the keeper starts")
}

async fn the_audit_records_every_published_event_once(env: TestEnv, db: Db) {
    let store = db.store().await;
    let keeper_rt = keeper(&env, &Keeper::new(store.clone(), &env.exchange)).await;
    let publisher = env.publisher().await;
    for id in 0..30 {
        publisher.publish(&OrderPlaced { id }).await.unwrap();
        publisher.publish(&OrderPaid { id }).await.unwrap();
    }
    // The same message twice (a producer retrying after a lost confirm): recorded once.
    for _ in 0..2 {
        publisher
            .message(&OrderPlaced { id: 99 })
            .message_id("order-99")
            .correlation_id("checkout-99")
            .header("x-tenant", "acme")
            .send()
            .await
            .unwrap();
    }
    // A replayed copy is not audited again.
    publisher
        .message(&OrderPlaced { id: 1 })
        .header(REPLAYED_FROM, "whatever")
        .send()
        .await
        .unwrap();

    // Last, an event the audit records after the replayed copy went past it (one queue,
    // batches committed in order): were the copy or a duplicate recorded, it would show.
    publisher
        .message(&OrderPaid { id: 1000 })
        .message_id("sentinel")
        .send()
        .await
        .unwrap();
    let all = EventFilter::new().limit(1_000);
    until(|| async { store.event("sentinel").await.unwrap().is_some() }).await;
    let events = store.events(&all).await.unwrap();
    assert_eq!(
        events.len(),
        62,
        "60 events, order-99 once and the sentinel"
    );
    let placed = store
        .events(&EventFilter::new().event_type("order.placed").limit(1_000))
        .await
        .unwrap();
    assert_eq!(placed.len(), 31);
    let order = store
        .event("order-99")
        .await
        .unwrap()
        .expect("order-99 recorded");
    assert_eq!(order.correlation_id(), Some("checkout-99"));
    assert_eq!(order.exchange, env.exchange);
    assert_eq!(order.routing_key, "order.placed");
    assert_eq!(order.body, br#"{"id":99}"#);
    assert!(order.published_at().is_some());
    assert_eq!(
        order
            .headers()
            .unwrap()
            .inner()
            .get("x-tenant")
            .map(|v| format!("{v:?}")),
        Some(format!(
            "{:?}",
            rabbitry::lapin::types::AMQPValue::LongString("acme".into())
        ))
    );
    publisher.close().await;
    keeper_rt.shutdown().await;
    db.done(store).await;
}

async fn dead_letters_move_from_the_dlq_into_the_store(env: TestEnv, db: Db) {
    let store = db.store().await;
    let queue = env.queue("inventory");
    let (probe, _seen) = env.probe(
        Subscription::new(&queue).bind("order.placed"),
        |seen| match seen.body["id"].as_u64() {
            Some(id) if id % 2 == 0 => Err(Failure::reject(format!(
                "order {id}: quantity must be positive"
            ))),
            _ => Ok(()),
        },
    );
    let worker_rt = env
        .builder()
        .worker(Registration::new(probe))
        .start()
        .await
        .unwrap();
    let keeper_rt = keeper(
        &env,
        &Keeper::new(store.clone(), &env.exchange).dead_letters_of(&queue),
    )
    .await;
    let publisher = env.publisher().await;
    for id in 0..6 {
        publisher.publish(&OrderPlaced { id }).await.unwrap();
    }
    until(|| async { store.dead_letters(None, None, None).await.unwrap().len() >= 3 }).await;
    let letters = store.dead_letters(Some(&queue), None, None).await.unwrap();
    assert_eq!(letters.len(), 3);
    for letter in &letters {
        assert_eq!(letter.worker, queue);
        assert_eq!(letter.state, DeadLetterState::Waiting);
        assert_eq!(letter.kind.as_deref(), Some("rejected"));
        assert!(
            letter
                .reason
                .as_deref()
                .unwrap()
                .contains("quantity must be positive")
        );
        assert_eq!(
            letter.exchange, env.exchange,
            "the original exchange, not the DLX"
        );
        assert_eq!(letter.routing_key, "order.placed");
        assert_eq!(letter.event_type, "order.placed");
    }
    // Moved, not copied: the dead-letter queue is empty.
    until(|| async { env.ready(&format!("{queue}.dlq")).await == 0 }).await;
    publisher.close().await;
    keeper_rt.shutdown().await;
    worker_rt.shutdown().await;
    db.done(store).await;
}

async fn handling_reports_tell_the_store_what_happened_to_each_message(env: TestEnv, db: Db) {
    let store = db.store().await;
    // The keeper's reports worker runs on the reports exchange (shared by every system on
    // the broker), with a queue of its own: it gets a copy of every report, and the test's
    // are told apart by their message ids.
    let keeper = Keeper::new(store.clone(), &env.exchange).reports_queue(env.queue("reports"));
    let reports_worker = keeper.handling_reports();
    env.track(reports_worker.subscription());
    let reports_rt = env
        .builder()
        .exchange(REPORTS_EXCHANGE)
        .worker(reports_worker)
        .start()
        .await
        .unwrap();
    let (email, inventory) = (env.queue("email"), env.queue("inventory"));
    let (email_probe, _e) = env.probe(Subscription::new(&email).bind("order.placed"), |_| Ok(()));
    let retry = RetryPolicy::exponential(Duration::from_millis(50)).max_attempts(3);
    let inventory_sub = Subscription::new(&inventory)
        .bind("order.placed")
        .retry(retry);
    let (inventory_probe, _i) = env.probe(inventory_sub, |seen| match seen.attempt {
        1 => Err(Failure::retry("stock service away")),
        _ => Ok(()),
    });
    let reports = rabbitry_observe::HandlingReports::start(&env.url()).unwrap();
    let workers_rt = env
        .builder()
        .observer(reports.clone())
        .worker(email_probe)
        .worker(inventory_probe)
        .start()
        .await
        .unwrap();
    let publisher = env.publisher().await;
    let id = publisher.publish(&OrderPlaced { id: 42 }).await.unwrap();

    until(|| async { store.handlings(&id).await.unwrap().len() >= 3 }).await;
    let story: Vec<(String, u32, String)> = store
        .handlings(&id)
        .await
        .unwrap()
        .into_iter()
        .map(|h| (h.worker, h.attempt, h.outcome))
        .collect();
    let mut expected = vec![
        (email.clone(), 1, "handled".to_owned()),
        (inventory.clone(), 1, "retried".to_owned()),
        (inventory.clone(), 2, "handled".to_owned()),
    ];
    let mut told = story.clone();
    told.sort();
    expected.sort();
    assert_eq!(told, expected, "{story:?}");
    let retried = store.handlings(&id).await.unwrap();
    let retried = retried.iter().find(|h| h.outcome == "retried").unwrap();
    assert_eq!(retried.reason.as_deref(), Some("stock service away"));
    assert!(retried.host.contains(':'), "host:pid");
    assert_eq!(reports.dropped(), 0);

    publisher.close().await;
    workers_rt.shutdown().await;
    reports.close().await;
    reports_rt.shutdown().await;
    db.done(store).await;
}

on_both_brokers_and_databases!(
    the_audit_records_every_published_event_once,
    dead_letters_move_from_the_dlq_into_the_store,
    handling_reports_tell_the_store_what_happened_to_each_message,
);
