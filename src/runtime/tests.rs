//! The runtime's ownership of its tasks, checked from inside the crate (a supervisor panic
//! can only be provoked from here), on both brokers.

use std::time::Duration;

use super::supervisor::Command;
use crate::MemoryBroker;
use crate::broker::Connection;
use crate::prelude::*;
use crate::topology::Topology;

struct Idle(String);

impl Worker for Idle {
    type Event = serde_json::Value;

    fn subscription(&self) -> Subscription {
        Subscription::new(&self.0).bind("#")
    }

    async fn handle(&self, _: Delivery<serde_json::Value>, _: &Context) -> Outcome {
        Ok(())
    }
}

/// Start a runtime on `url`, make its supervisor panic, and check that `shutdown` returns
/// with every task of the runtime ended and its consumer gone. Returns the plan, for
/// cleaning up.
async fn panic_then_shutdown(url: &str, exchange: &str, queue: &str) -> Topology {
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let builder = Runtime::builder()
        .url(url)
        .exchange(exchange)
        .worker(Idle(queue.to_owned()))
        .shutdown_grace(Duration::from_secs(1));
    let plan = builder.plan().unwrap();
    let runtime = builder.start().await.unwrap();
    assert!(
        metrics.num_alive_tasks() > before,
        "the runtime runs tasks of its own"
    );

    runtime.commands.send(Command::Panic).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), runtime.shutdown())
        .await
        .expect("shutdown completes after the supervisor panicked");
    // The AMQP client's own tasks (a heartbeat timer per connection) notice a closed
    // connection at their next tick: give them a moment.
    for _ in 0..2000 {
        if metrics.num_alive_tasks() == before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        metrics.num_alive_tasks(),
        before,
        "every task of the runtime ended"
    );
    assert!(matches!(
        runtime.workers().await,
        Err(crate::Error::ShutDown)
    ));
    // Its consumer is gone: a message for it waits in the queue.
    let publisher = crate::Publisher::builder(url)
        .exchange(exchange)
        .connect()
        .await
        .unwrap();
    publisher.publish(&Ping {}).await.unwrap();
    publisher.close().await;
    let conn = Connection::open(url, "test").await.unwrap();
    let ch = conn.channel().await.unwrap();
    assert_eq!(ch.declare_queue_passive(queue).await.unwrap(), 1);
    conn.close().await;
    plan
}

#[derive(serde::Serialize)]
struct Ping {}

impl crate::Event for Ping {
    const TYPE: &'static str = "a.b";
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_completes_after_a_supervisor_panic_in_memory() {
    let broker = MemoryBroker::new();
    panic_then_shutdown(&broker.url(), "events", "idle").await;
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_completes_after_a_supervisor_panic_on_rabbitmq() {
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| super::DEFAULT_URL.to_owned());
    // lapin's heartbeat task ends at its first tick after the connection closed.
    let separator = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{separator}heartbeat=1");
    let id = uuid::Uuid::now_v7().simple().to_string();
    let exchange = format!("t.supervisor-panic.{id}");
    let plan = panic_then_shutdown(&url, &exchange, &format!("{exchange}.idle")).await;
    // Clean up what it declared.
    let props = lapin::ConnectionProperties::default();
    let conn = lapin::Connection::connect(&url, props).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    for queue in plan.queues() {
        ch.queue_delete(queue.into(), Default::default())
            .await
            .unwrap();
    }
    for exchange in plan.exchanges() {
        ch.exchange_delete(exchange.into(), Default::default())
            .await
            .unwrap();
    }
    let _ = conn.close(200, "OK".into()).await;
}
