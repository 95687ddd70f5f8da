//! The in-memory broker's AMQP semantics, checked directly on the seam.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::types::{AMQPValue, LongString};

use super::seam::{Channel, Connection};
use super::*;
use crate::broker::Confirm;
use crate::broker::{NOT_FOUND, PRECONDITION_FAILED, reply_code};
use lapin::BasicProperties;
use lapin::types::FieldTable;

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes()))
}

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn with_id(id: &str) -> BasicProperties {
    BasicProperties::default().with_message_id(id.into())
}

fn channel() -> (MemoryBroker, Channel) {
    let broker = MemoryBroker::new();
    let conn = Connection::open(&broker.url()).unwrap();
    let ch = conn.channel().unwrap();
    (broker, ch)
}

fn ids(messages: Vec<BrokerMessage>) -> Vec<String> {
    messages
        .into_iter()
        .map(|m| m.properties.message_id().as_ref().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn routes_by_topic_direct_fanout_and_default_exchange() {
    let (broker, ch) = channel();
    for (x, kind) in [("t", "topic"), ("d", "direct"), ("f", "fanout")] {
        ch.declare_exchange(x, kind).unwrap();
    }
    for q in ["q1", "q2", "q3"] {
        ch.declare_queue(q, FieldTable::default()).unwrap();
    }
    ch.bind("q1", "t", "order.#").unwrap();
    ch.bind("q2", "d", "order.placed").unwrap();
    ch.bind("q3", "f", "ignored").unwrap();
    for (x, key) in [
        ("t", "order.placed.eu"),
        ("d", "order.placed"),
        ("d", "order.shipped"),
        ("f", "x"),
        ("", "q3"),
    ] {
        ch.publish(x, key, b"{}", BasicProperties::default(), false)
            .unwrap();
    }
    assert_eq!(
        [broker.ready("q1"), broker.ready("q2"), broker.ready("q3")],
        [Some(1), Some(1), Some(2)]
    );
}

#[tokio::test]
async fn prefetch_bounds_deliveries_and_a_multiple_ack_frees_them() {
    let (broker, ch) = channel();
    ch.declare_queue("q", FieldTable::default()).unwrap();
    for i in 0..5 {
        ch.publish("", "q", b"{}", with_id(&i.to_string()), false)
            .unwrap();
    }
    ch.qos(2).unwrap();
    let mut deliveries = ch.consume("q", "c").unwrap();
    let first = deliveries.next().await.unwrap().unwrap();
    let second = deliveries.next().await.unwrap().unwrap();
    assert_eq!((first.tag, second.tag), (1, 2));
    assert_eq!(
        broker.ready("q"),
        Some(3),
        "only the prefetch was delivered"
    );
    ch.ack(2, true).unwrap();
    assert_eq!(broker.ready("q"), Some(1));
    let err = ch.ack(99, false).unwrap_err();
    assert_eq!(reply_code(&err), Some(PRECONDITION_FAILED));
    assert!(
        !ch.is_open(),
        "an unknown delivery tag closes the channel, as on RabbitMQ"
    );
}

#[tokio::test]
async fn a_closed_channel_gives_back_its_unacknowledged_deliveries_in_order() {
    let (broker, ch) = channel();
    ch.declare_queue("q", FieldTable::default()).unwrap();
    for id in ["a", "b", "c"] {
        ch.publish("", "q", b"{}", with_id(id), false).unwrap();
    }
    let consumer = ch.clone();
    let mut deliveries = consumer.consume("q", "c").unwrap();
    for _ in 0..3 {
        deliveries.next().await.unwrap().unwrap();
    }
    ch.nack(2, true).unwrap(); // "b" back first
    consumer.close();
    let back = broker.messages("q");
    assert_eq!(ids(back.clone()), ["a", "b", "c"]);
    assert!(back.iter().all(|m| m.redelivered));
    // The stream ends with its channel (after "b"'s redelivery, already in its buffer).
    let rest: Vec<_> = deliveries.collect().await;
    assert!(rest.len() <= 1, "{rest:?}");
}

#[tokio::test(start_paused = true)]
async fn expired_and_rejected_messages_are_dead_lettered_with_x_death() {
    let (broker, ch) = channel();
    ch.declare_exchange("dlx", "direct").unwrap();
    ch.declare_queue("dlq", FieldTable::default()).unwrap();
    ch.bind("dlq", "dlx", "work").unwrap();
    ch.declare_queue(
        "work",
        args(&[
            ("x-dead-letter-exchange", text("dlx")),
            ("x-dead-letter-routing-key", text("work")),
        ]),
    )
    .unwrap();
    let tier = args(&[
        ("x-message-ttl", AMQPValue::LongLongInt(1000)),
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text("work")),
    ]);
    ch.declare_queue("work.retry.1000", tier).unwrap();

    ch.publish("", "work.retry.1000", b"{}", with_id("r"), true)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(999)).await;
    assert_eq!(broker.ready("work"), Some(0));
    tokio::time::sleep(Duration::from_millis(1)).await;
    broker.idle().await;
    let moved = broker.messages("work");
    assert_eq!(
        ids(moved.clone()),
        ["r"],
        "expired back into the worker queue"
    );
    let Some(AMQPValue::FieldArray(deaths)) = moved[0]
        .properties
        .headers()
        .as_ref()
        .unwrap()
        .inner()
        .get("x-death")
    else {
        panic!("no x-death");
    };
    let AMQPValue::FieldTable(death) = &deaths.as_slice()[0] else {
        panic!()
    };
    assert_eq!(death.inner().get("reason"), Some(&text("expired")));
    assert_eq!(death.inner().get("queue"), Some(&text("work.retry.1000")));

    let mut deliveries = ch.consume("work", "c").unwrap();
    let d = deliveries.next().await.unwrap().unwrap();
    ch.nack(d.tag, false).unwrap();
    assert_eq!(
        ids(broker.messages("dlq")),
        ["r"],
        "rejected without requeue: dead-lettered"
    );
}

#[tokio::test]
async fn higher_priorities_are_delivered_first() {
    let (broker, ch) = channel();
    ch.declare_queue("p", args(&[("x-max-priority", AMQPValue::LongLongInt(10))]))
        .unwrap();
    for (id, priority) in [("low", 1), ("none", 0), ("high", 9), ("over", 200)] {
        ch.publish("", "p", b"{}", with_id(id).with_priority(priority), false)
            .unwrap();
    }
    assert_eq!(ids(broker.messages("p")), ["over", "high", "low", "none"]);
}

#[tokio::test]
async fn conflicts_missing_exchanges_and_unroutable_messages_answer_like_rabbitmq() {
    let (_broker, ch) = channel();
    ch.declare_queue("q", FieldTable::default()).unwrap();
    let err = ch
        .declare_queue("q", args(&[("x-max-priority", AMQPValue::LongLongInt(10))]))
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(PRECONDITION_FAILED));
    assert!(
        err.to_string().contains(
            "inequivalent arg 'x-max-priority' for queue 'q' in vhost '/': \
             received the value '10' of type 'long' but current is none"
        ),
        "{err}"
    );
    let (_broker, ch) = channel();
    ch.declare_queue(
        "q",
        args(&[("x-queue-type", AMQPValue::LongString("classic".into()))]),
    )
    .unwrap();
    let err = ch
        .declare_queue(
            "q",
            args(&[("x-queue-type", AMQPValue::LongString("quorum".into()))]),
        )
        .unwrap_err();
    assert!(
        err.to_string().contains(
            "received the value 'quorum' of type 'longstr' but current is the value 'classic' of type 'longstr'"
        ),
        "{err}"
    );

    let (_broker, ch) = channel();
    let err = ch
        .publish("nowhere", "k", b"{}", BasicProperties::default(), true)
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(NOT_FOUND));

    let (_broker, ch) = channel();
    ch.declare_exchange("t", "topic").unwrap();
    let confirm = ch
        .publish("t", "nobody", b"{}", with_id("m"), true)
        .unwrap();
    assert!(matches!(confirm, Confirm::Ack { returned: Some(Some(ref id)) } if id == "m"));
    let quorum = args(&[
        ("x-queue-type", text("quorum")),
        ("x-max-priority", AMQPValue::LongLongInt(5)),
    ]);
    let err = ch.declare_queue("qq", quorum).unwrap_err();
    assert!(
        err.to_string().contains("invalid arg 'x-max-priority'"),
        "{err}"
    );
}

#[tokio::test]
async fn broken_connections_end_consumers_with_an_error_and_are_noticed() {
    let broker = MemoryBroker::new();
    let conn = Connection::open(&broker.url()).unwrap();
    let ch = conn.channel().unwrap();
    ch.declare_queue("q", FieldTable::default()).unwrap();
    let mut deliveries = ch.consume("q", "c").unwrap();
    let lost = conn.lost();
    broker.break_connections();
    assert!(deliveries.next().await.unwrap().is_err());
    assert!(lost.await.to_string().contains("broken"));
    assert!(!conn.is_connected());
    assert!(
        Connection::open(&broker.url()).unwrap().channel().is_ok(),
        "a new connection works"
    );
}

#[tokio::test(start_paused = true)]
async fn idle_returns_once_an_expired_message_reaches_a_queue_nobody_consumes() {
    let (broker, ch) = channel();
    ch.declare_queue("parked", FieldTable::default()).unwrap();
    let tier = args(&[
        ("x-message-ttl", AMQPValue::LongLongInt(500)),
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text("parked")),
    ]);
    ch.declare_queue("tier", tier).unwrap();
    ch.publish("", "tier", b"{}", with_id("m"), true).unwrap();
    tokio::time::timeout(Duration::from_secs(60), broker.idle())
        .await
        .expect("idle once the message has expired into a queue without consumers");
    assert_eq!(broker.ready("parked"), Some(1));
    assert_eq!(broker.ready("tier"), Some(0));
}

#[tokio::test]
async fn unbind_delete_if_empty_passive_declare_and_get_answer_like_rabbitmq() {
    let (broker, ch) = channel();
    ch.declare_exchange("t", "topic").unwrap();
    ch.declare_queue("q", FieldTable::default()).unwrap();
    ch.bind("q", "t", "a.*").unwrap();
    assert!(broker.is_bound("q", "t", "a.*"));
    ch.unbind("q", "t", "a.*").unwrap();
    assert!(!broker.is_bound("q", "t", "a.*"));
    assert_eq!(ch.declare_queue_passive("q").unwrap(), 0);

    ch.publish("", "q", b"{}", with_id("m"), false).unwrap();
    let err = ch.delete_queue("q", true).unwrap_err();
    assert_eq!(reply_code(&err), Some(PRECONDITION_FAILED));
    assert!(err.to_string().contains("is not empty"), "{err}");

    // A message fetched and not acknowledged goes back when its channel closes.
    let broker_channel = |b: &MemoryBroker| Connection::open(&b.url()).unwrap().channel().unwrap();
    let ch = broker_channel(&broker);
    let got = ch.get("q").unwrap().expect("a message");
    assert_eq!(got.properties.message_id().as_ref().unwrap().as_str(), "m");
    assert!(ch.get("q").unwrap().is_none());
    ch.close();
    let ch = broker_channel(&broker);
    let again = ch.get("q").unwrap().expect("returned on close");
    ch.ack(again.tag, false).unwrap();
    assert_eq!(ch.delete_queue("q", true).unwrap(), 0);
    let err = ch.declare_queue_passive("q").unwrap_err();
    assert_eq!(reply_code(&err), Some(NOT_FOUND));
}

#[tokio::test]
async fn queue_counts_are_ready_messages_of_every_priority_and_consumers() {
    let (broker, ch) = channel();
    ch.declare_queue("p", args(&[("x-max-priority", AMQPValue::LongLongInt(10))]))
        .unwrap();
    for (id, priority) in [("a", 1), ("b", 5), ("c", 5)] {
        let props = with_id(id).with_priority(priority);
        ch.publish("", "p", b"{}", props, false).unwrap();
    }
    assert_eq!(ch.queue_counts("p").unwrap(), (3, 0));
    assert_eq!(ch.declare_queue_passive("p").unwrap(), 3);
    let consumer = broker_consumer(&broker);
    let _deliveries = consumer.consume("p", "c1").unwrap();
    assert_eq!(ch.queue_counts("p").unwrap().1, 1);
    let err = ch.queue_counts("missing").unwrap_err();
    assert_eq!(reply_code(&err), Some(NOT_FOUND));
}

fn broker_consumer(broker: &MemoryBroker) -> Channel {
    Connection::open(&broker.url()).unwrap().channel().unwrap()
}
