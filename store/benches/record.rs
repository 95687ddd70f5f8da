//! What the record costs, on RabbitMQ, in one run:
//!
//! - **Keeper ingest**, into SQLite and into PostgreSQL: N events (S1's, about 200 bytes of
//!   JSON) wait in the audit queue; the keeper is started and timed until the last one is
//!   committed (`SELECT COUNT(*)`). Beside it, the two ceilings it sits between: raw lapin
//!   consuming and acknowledging (multiple-acks) the same N messages from a queue bound beside the audit
//!   queue (the broker), and `Store::record_events` writing N events in batches of 500
//!   (the database).
//! - **S1 end-to-end with the record on**: S1's worker (prefetch 300, concurrency 32, a
//!   handler that does nothing) consuming while a confirmed pipeline publishes N events;
//!   `off` is the worker alone, `handling reports` adds the reports from the worker's
//!   runtime to a keeper (into SQLite, in the same process), `audit` adds the keeper's
//!   audit instead, `audit + handling reports` both. The rate is N over the time until the
//!   worker handled the last event; beside it, the time until the store also held every
//!   event and handling.
//!
//! ```text
//! cargo bench -p rabbitry-store --bench record                 # 50 000 messages, 3 rounds
//! BENCH_MESSAGES=100000 BENCH_ROUNDS=5 cargo bench -p rabbitry-store --bench record
//! BENCH_PARTS=sqlite,s1 cargo bench -p rabbitry-store --bench record   # some of the parts
//! BENCH_KEEPER_BATCH=2000 cargo bench -p rabbitry-store --bench record  # Keeper::batch
//! ```
//!
//! PostgreSQL is the local server (`RABBITRY_TEST_POSTGRES`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`); each round creates a database and drops
//! it. Everything runs in this process on a two-thread tokio runtime, as a `rabbitry serve`
//! and a worker would on their own; the broker and the database share the machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use rabbitry::report::REPORTS_EXCHANGE;
use rabbitry::{Publisher, Runtime, RuntimeBuilder};
use rabbitry_store::{Keeper, Store, StoredEvent};
use sqlx::{AnyConnection, Connection};
use tokio::sync::Notify;

#[path = "../tests/db/mod.rs"]
mod db;
#[path = "../../benches/support/s1.rs"]
mod s1;

use db::Db;
use s1::{Counter, Tick};

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| rabbitry::DEFAULT_URL.into())
}

fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}{}", &id[id.len() - 10..])
}

/// How many rows `table` of `db` holds.
async fn count(db: &Db, table: &str) -> i64 {
    let mut conn = AnyConnection::connect(&db.url).await.unwrap();
    let sql = format!("SELECT COUNT(*) FROM {table}");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// Poll until `table` of `db` holds `n` rows.
async fn until_count(db: &Db, table: &str, n: usize) {
    while count(db, table).await < n as i64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publish `n` S1 events with confirms (1000 in flight).
async fn publish(publisher: &Publisher, n: usize) {
    let mut pipeline = publisher.pipeline();
    for id in 0..n as u64 {
        pipeline.send(&Tick::new(id)).await.unwrap();
    }
    pipeline.flush().await.unwrap();
}

/// Delete every queue of `builder`'s topology (and `more`), and the exchange.
async fn cleanup(builder: &RuntimeBuilder, exchange: &str, more: &[String]) {
    let conn = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut queues: Vec<String> = more.to_vec();
    if let Ok(plan) = builder.plan() {
        for queue in plan.queues() {
            queues.push(queue.to_owned());
            queues.push(format!("{queue}.topology"));
        }
    }
    for q in queues {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    for e in [exchange.to_owned(), format!("{exchange}.dlx")] {
        let _ = ch
            .exchange_delete(e.as_str().into(), Default::default())
            .await;
    }
    let _ = conn.close(0, "done".into()).await;
}

/// Raw lapin: consume `n` messages from `queue`, acknowledging every 100th with a
/// multiple-ack (as S1's raw consumer does), prefetch 1000; messages/s.
async fn raw_consume(queue: &str, n: usize) -> f64 {
    let conn = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let started = Instant::now();
    for handled in 1..=n {
        let delivery = consumer.next().await.unwrap().unwrap();
        if handled % 100 == 0 || handled == n {
            ch.basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .unwrap();
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = conn.close(0, "done".into()).await;
    rate
}

/// `Store::record_events` writing `n` S1-sized events in batches of 500; events/s.
async fn store_write(store: &Store, n: usize) -> f64 {
    let body = serde_json::to_vec(&Tick::new(0)).unwrap();
    let events: Vec<StoredEvent> = (0..n)
        .map(|_| {
            let id = uuid::Uuid::now_v7().to_string();
            StoredEvent::new(id, "bench.tick", "direct", "bench.tick", body.clone())
        })
        .collect();
    let started = Instant::now();
    for batch in events.chunks(500) {
        store.record_events(batch).await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// One ingest measurement on `db`: (raw lapin consume/s, store writes/s, keeper ingest/s).
async fn ingest(db: Db, n: usize) -> [f64; 3] {
    let url = amqp_url();
    let store = Store::connect(&db.url).await.unwrap();
    let exchange = unique("bench.record.");
    let batch = std::env::var("BENCH_KEEPER_BATCH")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(500);
    let keeper = Keeper::new(store.clone(), &exchange).batch(batch, Duration::from_millis(100));
    let builder = || {
        keeper
            .registrations()
            .into_iter()
            .fold(Runtime::builder().url(&url).exchange(&exchange), |b, r| {
                b.worker(r)
            })
    };
    builder().declare().await.unwrap();
    // A plain queue beside the audit queue: raw lapin's copy of the same messages.
    let raw = format!("{exchange}.raw");
    {
        let conn = lapin::Connection::connect(&url, Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(raw.as_str().into(), durable, FieldTable::default())
            .await
            .unwrap();
        ch.queue_bind(
            raw.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let _ = conn.close(0, "done".into()).await;
    }
    let publisher = Publisher::builder(&url)
        .exchange(&exchange)
        .connect()
        .await
        .unwrap();
    publish(&publisher, n).await;
    publisher.close().await;

    let raw_rate = raw_consume(&raw, n).await;
    let started = Instant::now();
    let runtime = builder().start().await.unwrap();
    until_count(&db, "rabbitry_events", n).await;
    let keeper_rate = n as f64 / started.elapsed().as_secs_f64();
    runtime.shutdown().await;
    let write_rate = store_write(&store, n).await;
    store.close().await;
    cleanup(&builder(), &exchange, &[raw]).await;
    drop(db);
    [raw_rate, write_rate, keeper_rate]
}

/// What S1 runs with.
#[derive(Clone, Copy, PartialEq)]
enum Record {
    Off,
    /// Handling reports from the worker's runtime, written by the keeper.
    Reports,
    /// The audit: the keeper consuming `<exchange>.audit`.
    Audit,
    /// Both.
    On,
}

impl Record {
    const ALL: [Record; 4] = [Record::Off, Record::Reports, Record::Audit, Record::On];

    fn name(self) -> &'static str {
        match self {
            Record::Off => "off",
            Record::Reports => "handling reports",
            Record::Audit => "audit",
            Record::On => "audit + handling reports",
        }
    }

    fn reports(self) -> bool {
        matches!(self, Record::Reports | Record::On)
    }

    fn audit(self) -> bool {
        matches!(self, Record::Audit | Record::On)
    }
}

/// One S1 end-to-end measurement: (messages/s until the worker handled all, seconds from
/// the start until the store had every event and handling the configuration records).
async fn s1(record: Record, n: usize) -> (f64, f64) {
    let url = amqp_url();
    let exchange = unique("bench.s1record.");
    let queue = format!("{exchange}.q");
    let done = Arc::new((AtomicUsize::new(0), Notify::new()));
    let worker = Counter {
        queue: queue.clone(),
        done: done.clone(),
        total: n,
    };
    let db = Db::sqlite("bench_record").await;
    let store = Store::connect(&db.url).await.unwrap();
    let reports_queue = format!("{exchange}.reports");
    let keeper = Keeper::new(store.clone(), &exchange).reports_queue(&reports_queue);
    let reports = rabbitry_observe::HandlingReports::start(&url).unwrap();
    let mut workers = Runtime::builder()
        .url(&url)
        .exchange(&exchange)
        .worker(worker);
    let mut audit = Runtime::builder().url(&url).exchange(&exchange);
    let mut handlings = Runtime::builder().url(&url).exchange(REPORTS_EXCHANGE);
    if record.reports() {
        workers = workers.observer(reports.clone());
        handlings = handlings.worker(keeper.handling_reports());
    }
    if record.audit() {
        for registration in keeper.registrations() {
            audit = audit.worker(registration);
        }
    }
    let workers = workers.start().await.unwrap();
    let audit = match record.audit() {
        true => Some(audit.start().await.unwrap()),
        false => None,
    };
    let handlings = match record.reports() {
        true => Some(handlings.start().await.unwrap()),
        false => None,
    };
    let publisher = Publisher::builder(&url)
        .exchange(&exchange)
        .connect()
        .await
        .unwrap();
    let started = Instant::now();
    let notified = done.1.notified();
    let producing = {
        let publisher = publisher.clone();
        tokio::spawn(async move { publish(&publisher, n).await })
    };
    if done.0.load(Ordering::Relaxed) < n {
        notified.await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    producing.await.unwrap();
    reports.close().await;
    if record.audit() {
        until_count(&db, "rabbitry_events", n).await;
    }
    if record.reports() {
        until_count(&db, "rabbitry_handlings", n).await;
    }
    let lag = started.elapsed().as_secs_f64();
    publisher.close().await;
    workers.shutdown().await;
    for runtime in [audit, handlings].into_iter().flatten() {
        runtime.shutdown().await;
    }
    store.close().await;
    let cleanup_builder = Runtime::builder().exchange(&exchange).worker(Counter {
        queue: queue.clone(),
        done: done.clone(),
        total: n,
    });
    let keeper_queues: Vec<String> = keeper
        .registrations()
        .iter()
        .map(|r| r.subscription().queue().to_owned())
        .flat_map(|q| [format!("{q}.dlq"), format!("{q}.topology"), q])
        .chain([
            reports_queue.clone(),
            format!("{reports_queue}.dlq"),
            format!("{reports_queue}.topology"),
        ])
        .collect();
    cleanup(&cleanup_builder, &exchange, &keeper_queues).await;
    drop(db);
    (rate, lag)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

async fn run(n: usize, rounds: usize) {
    println!("{n} messages per measurement, {rounds} rounds");
    let parts = std::env::var("BENCH_PARTS").unwrap_or_else(|_| "sqlite,postgres,s1".into());
    let part = |p: &str| parts.split(',').any(|w| w == p);
    let mut ingest_results: [Vec<[f64; 3]>; 2] = Default::default();
    let mut s1_results: [Vec<(f64, f64)>; 4] = Default::default();
    for round in 0..rounds {
        for (i, name) in ["SQLite", "PostgreSQL"].into_iter().enumerate() {
            let db = match i {
                0 if part("sqlite") => Db::sqlite("bench_record").await,
                1 if part("postgres") => Db::postgres("bench_record").await,
                _ => continue,
            };
            let [raw, write, keeper] = ingest(db, n).await;
            println!(
                "round {round} ingest {name:>10}: raw lapin consume {raw:.0}/s, store writes {write:.0}/s, keeper {keeper:.0}/s"
            );
            ingest_results[i].push([raw, write, keeper]);
        }
        for (i, record) in Record::ALL.into_iter().enumerate() {
            if !part("s1") {
                continue;
            }
            let (rate, lag) = s1(record, n).await;
            println!(
                "round {round} S1 record {}: {rate:.0} msg/s, done after {lag:.2} s",
                record.name()
            );
            s1_results[i].push((rate, lag));
        }
    }
    println!();
    println!(
        "| median of {rounds} rounds, {n} events | raw lapin consume + ack, msgs/s | store writes (batches of 500), events/s | keeper ingest, events/s |"
    );
    println!("|---|---:|---:|---:|");
    for (i, name) in ["SQLite", "PostgreSQL"].into_iter().enumerate() {
        let col = |c: usize| median(ingest_results[i].iter().map(|r| r[c]).collect());
        println!("| {name} | {:.0} | {:.0} | {:.0} |", col(0), col(1), col(2));
    }
    println!();
    println!(
        "| median of {rounds} rounds, {n} events, SQLite | S1 end-to-end, msgs/s | / off | everything in the store after |"
    );
    println!("|---|---:|---:|---:|");
    let off = median(s1_results[0].iter().map(|r| r.0).collect());
    for (i, record) in Record::ALL.into_iter().enumerate() {
        let rate = median(s1_results[i].iter().map(|r| r.0).collect());
        let lag = median(s1_results[i].iter().map(|r| r.1).collect());
        println!(
            "| record {} | {rate:.0} | {:.2} | {lag:.2} s |",
            record.name(),
            rate / off
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for the list of benchmarks
    }
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (n, rounds) = (env("BENCH_MESSAGES", 50_000), env("BENCH_ROUNDS", 3));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(n, rounds));
}
