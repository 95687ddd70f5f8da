//! The order-fulfilment saga on RabbitMQ with its instances in the store (SQLite and
//! PostgreSQL), its process SIGKILLed twice mid-workflow: every order ends confirmed,
//! compensated or timed out — none is left half-done — and what the stock and payment
//! services did matches (only confirmed orders keep their stock and their charge).

#[path = "../../tests/support/mod.rs"]
#[allow(unused_macros)]
mod support;
#[path = "../../store/tests/db/mod.rs"]
#[macro_use]
mod db;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::sync::Arc;

use db::Db;
use rabbitry::Registration;
use rabbitry::prelude::*;
use rabbitry_store::{SagaFilter, SagaStore, Store};
use rabbitry_workers::fulfilment::{
    PAYMENT_QUEUE, Payments, SAGA_QUEUE, STOCK_QUEUE, TIMEOUT, payment_worker, saga, stock_worker,
};
use rabbitry_workers::inventory::Stock;
use rabbitry_workers::orders::OrderPlaced;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const ORDERS: u64 = 30;

/// The saga binary, started and ready.
async fn spawn_saga(env: &TestEnv, prefix: &str, store: &str) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fulfilment-saga"))
        .env("AMQP_URL", url())
        .env("RABBITRY_EXCHANGE", &env.exchange)
        .env("RABBITRY_QUEUE_PREFIX", prefix)
        .env("RABBITRY_STORE", store)
        .env("RABBITRY_SAGA_TIMEOUT_MS", "6000")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("fulfilment-saga starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(PATIENCE, lines.next_line()).await;
    assert!(
        matches!(ready, Ok(Ok(Some(ref l))) if l == "ready"),
        "{ready:?}"
    );
    child
}

/// The saga's instances, by order id: (status, completed).
async fn instances(store: &Store, saga: &str) -> BTreeMap<u64, (String, bool)> {
    let filter = SagaFilter::new().saga(saga).limit(1000);
    store
        .sagas(&filter)
        .await
        .unwrap()
        .into_iter()
        .map(|s| {
            (
                s.record.key.parse().unwrap(),
                (s.record.status, s.record.completed),
            )
        })
        .collect()
}

async fn every_order_settles_though_the_saga_process_is_killed_twice(db: Db) {
    let env = TestEnv::rabbitmq("fulfilment");
    env.uses_delays();
    let prefix = format!("{}.", env.queue("f"));
    let store = db.store().await;
    let saga_queue = format!("{prefix}{SAGA_QUEUE}");
    // The same subscriptions as the binary's, for cleanup.
    let repository: Arc<dyn rabbitry::SagaRepository> = Arc::new(SagaStore::new(store.clone()));
    env.track(Registration::from(saga(repository, &saga_queue, TIMEOUT)).subscription());
    let stock = Stock::default();
    let payments = Payments::default();
    payments.decline_over(1000.0);
    let services = [
        Registration::from(stock_worker(
            &format!("{prefix}{STOCK_QUEUE}"),
            stock.clone(),
        )),
        Registration::from(payment_worker(
            &format!("{prefix}{PAYMENT_QUEUE}"),
            payments.clone(),
        )),
    ];
    let mut builder = env.builder();
    for service in services {
        env.track(service.subscription());
        builder = builder.worker(service);
    }
    let (outcomes, mut seen) = env.probe(
        Subscription::new(env.queue("outcomes"))
            .bind("order.confirmed")
            .bind("order.cancelled"),
        |_| Ok(()),
    );
    let services = builder.worker(outcomes).start().await.unwrap();

    // A third of the orders confirm, a third are declined (compensated), a third are
    // lost by the gateway (time out).
    let expect = |id: u64| match id % 3 {
        0 => "cancelled",
        1 => "timed_out",
        _ => "confirmed",
    };
    let mut saga_process = spawn_saga(&env, &prefix, &db.url).await;
    let publisher = env.publisher().await;
    for id in 1..=ORDERS {
        let mut order = OrderPlaced::sample(id);
        match expect(id) {
            "cancelled" => order.total = 5000.0,
            "timed_out" => payments.lose(id),
            _ => {}
        }
        publisher.publish(&order).await.unwrap();
    }
    for (kill, after) in [(1, 5), (2, 15)] {
        until(|| async {
            let done = instances(&store, &saga_queue).await;
            done.values().filter(|(_, completed)| *completed).count() >= after
        })
        .await;
        saga_process.kill().await.expect("SIGKILL delivered");
        println!("saga process SIGKILLed (kill {kill}) after {after} orders settled");
        saga_process = spawn_saga(&env, &prefix, &db.url).await;
    }
    let settled = tokio::time::timeout(PATIENCE, async {
        loop {
            let all = instances(&store, &saga_queue).await;
            if all.len() == ORDERS as usize && all.values().all(|(_, completed)| *completed) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    if settled.is_err() {
        let unsettled: Vec<_> = store
            .sagas(&SagaFilter::new().saga(&saga_queue).limit(1000))
            .await
            .unwrap()
            .into_iter()
            .filter(|s| !s.record.completed)
            .map(|s| {
                (
                    s.record.key,
                    s.record.status,
                    s.record.state,
                    s.record.pending.len(),
                )
            })
            .collect();
        panic!(
            "orders not settled: {unsettled:?}; stock reserved {:?}",
            stock.reserved()
        );
    }
    let all = instances(&store, &saga_queue).await;
    for (id, (status, _)) in &all {
        assert_eq!(status, expect(*id), "order {id}");
    }
    let confirmed: BTreeSet<u64> = (1..=ORDERS)
        .filter(|id| expect(*id) == "confirmed")
        .collect();
    // Only confirmed orders keep their stock (the others were released) and their charge.
    until(|| async { stock.reserved().into_iter().collect::<BTreeSet<_>>() == confirmed }).await;
    assert_eq!(
        payments.charged().into_iter().collect::<BTreeSet<_>>(),
        confirmed
    );
    assert!(
        payments.refunded().is_empty(),
        "nothing charged was cancelled"
    );
    // Every order announced its end; a redelivery may repeat one, with its message id.
    let mut ends: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    while ends.len() < ORDERS as usize {
        let s = seen.next().await;
        ends.entry(s.order_id())
            .or_default()
            .insert(s.message_id.clone());
    }
    assert!(ends.values().all(|ids| ids.len() == 1), "{ends:?}");
    saga_process.kill().await.unwrap();
    services.shutdown().await;
    db.done(store).await;
}

on_both_databases!(every_order_settles_though_the_saga_process_is_killed_twice);
