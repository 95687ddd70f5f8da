//! How late broker-held delays arrive: rabbitry's tier cascade against the naive raw-lapin
//! design (one wait queue, a per-message `expiration`, dead-lettered to the target), on the
//! same broker, in one run.
//!
//! ```text
//! cargo bench --bench delays                    # 200 messages, delays 0.1–5 s, mixed
//! BENCH_DELAYS=1000 cargo bench --bench delays
//! ```
//!
//! Every message is sent as fast as confirms allow, in an order that mixes long and short
//! delays; lateness = arrival − (start of its send + its delay). Never negative for either
//! (a message is never early); the naive design's messages wait behind longer ones ahead of
//! them (RabbitMQ expires a message only at the head of its queue).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use rabbitry::prelude::*;
use rabbitry::{DELAY_PRECISION, Topology};
use serde::{Deserialize, Serialize};

#[path = "../tests/support/cleanup.rs"]
mod cleanup;

const KEY: &str = "bench.delayed";

#[derive(Serialize, Deserialize)]
struct Delayed {
    n: usize,
}

impl Event for Delayed {
    const TYPE: &'static str = KEY;
}

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| rabbitry::DEFAULT_URL.into())
}

/// The delay of message `n`: 0.1 to 5 s, long and short ones interleaved.
fn delay_of(n: usize) -> Duration {
    Duration::from_millis(100 + (n as u64 * 37 % 50) * 100)
}

/// Consume `count` messages from `queue` on a connection of its own; each one's arrival,
/// by its `n`.
async fn arrivals(queue: String, count: usize) -> HashMap<usize, Instant> {
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut seen = HashMap::new();
    while seen.len() < count {
        let d = tokio::time::timeout(Duration::from_secs(120), consumer.next())
            .await
            .expect("delayed messages keep arriving")
            .unwrap()
            .unwrap();
        let at = Instant::now();
        let m: Delayed = serde_json::from_slice(&d.data).unwrap();
        seen.insert(m.n, at);
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    let _ = conn.close(200, "OK".into()).await;
    seen
}

fn report(name: &str, sent: &[Instant], arrived: &HashMap<usize, Instant>) {
    let mut late: Vec<Duration> = Vec::new();
    let mut early = 0;
    for (n, at) in arrived {
        let due = sent[*n] + delay_of(*n);
        match at.checked_duration_since(due) {
            Some(l) => late.push(l),
            None => early += 1,
        }
    }
    late.sort();
    let q = |p: f64| late[((late.len() - 1) as f64 * p) as usize];
    println!(
        "| {name} | {} | {early} | {:.0} | {:.0} | {:.0} | {:.0} |",
        arrived.len(),
        q(0.5).as_secs_f64() * 1000.0,
        q(0.95).as_secs_f64() * 1000.0,
        q(0.99).as_secs_f64() * 1000.0,
        late.last().unwrap().as_secs_f64() * 1000.0
    );
}

#[tokio::main]
async fn main() {
    let count: usize = std::env::var("BENCH_DELAYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let id = uuid::Uuid::now_v7().simple().to_string();
    let exchange = format!("bench.delays.{}", &id[id.len() - 8..]);
    let target = format!("{exchange}.target");
    let (naive_wait, naive_target) = (
        format!("{exchange}.naive.wait"),
        format!("{exchange}.naive.target"),
    );
    let mut queues = Topology::delay_queues(&exchange);
    queues.extend([target.clone(), naive_wait.clone(), naive_target.clone()]);
    let mut exchanges = Topology::delay_tiers(&exchange);
    exchanges.push(exchange.clone());
    let _cleanup = cleanup::DeleteOnDrop {
        url: url(),
        queues,
        exchanges,
    };

    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await
    .unwrap();
    for q in [&target, &naive_target] {
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    ch.queue_bind(
        target.as_str().into(),
        exchange.as_str().into(),
        KEY.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut wait_args = FieldTable::default();
    wait_args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    wait_args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(naive_target.as_str().into()),
    );
    ch.queue_declare(
        naive_wait.as_str().into(),
        QueueDeclareOptions::default(),
        wait_args,
    )
    .await
    .unwrap();

    println!(
        "{count} messages, delays 0.1–5 s interleaved; lateness in ms (precision {DELAY_PRECISION:?})\n"
    );
    println!("| design | arrived | early | p50 | p95 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|---:|");

    // rabbitry: the tier cascade.
    let publisher = Publisher::builder(url())
        .exchange(&exchange)
        .connect()
        .await
        .unwrap();
    // The first delayed message declares the tiers: not one of the measured ones (and
    // nothing is bound for its key when it comes due).
    let warm_up = Delayed { n: usize::MAX };
    let warm_up = publisher.message(&warm_up).routing_key("bench.warm-up");
    warm_up
        .delay(Duration::from_millis(100))
        .send()
        .await
        .unwrap();
    let consuming = tokio::spawn(arrivals(target.clone(), count));
    let mut sent = Vec::with_capacity(count);
    for n in 0..count {
        sent.push(Instant::now());
        publisher
            .message(&Delayed { n })
            .delay(delay_of(n))
            .send()
            .await
            .unwrap();
    }
    let arrived = consuming.await.unwrap();
    report("rabbitry tiers", &sent, &arrived);
    publisher.close().await;

    // Naive: one wait queue, per-message expiration.
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let consuming = tokio::spawn(arrivals(naive_target.clone(), count));
    let mut sent = Vec::with_capacity(count);
    for n in 0..count {
        sent.push(Instant::now());
        let body = serde_json::to_vec(&Delayed { n }).unwrap();
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_expiration(delay_of(n).as_millis().to_string().into());
        ch.basic_publish(
            "".into(),
            naive_wait.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let arrived = consuming.await.unwrap();
    report("raw lapin, per-message TTL", &sent, &arrived);
    let _ = conn.close(200, "OK".into()).await;
}
