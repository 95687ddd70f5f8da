//! The runtime's ownership of its tasks, checked from inside the crate.

use std::time::Duration;

use super::supervisor::Command;
use crate::MemoryBroker;
use crate::prelude::*;

struct Idle;

impl Worker for Idle {
    type Event = serde_json::Value;

    fn subscription(&self) -> Subscription {
        Subscription::new("idle").bind("#")
    }

    async fn handle(&self, _: Delivery<serde_json::Value>, _: &Context) -> Outcome {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_completes_after_a_supervisor_panic_with_no_task_left_running() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let broker = MemoryBroker::new();
    let runtime = Runtime::builder()
        .url(broker.url())
        .worker(Idle)
        .shutdown_grace(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    assert!(
        metrics.num_alive_tasks() >= before + 2,
        "a supervisor and a consumer run"
    );

    runtime.commands.send(Command::Panic).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), runtime.shutdown())
        .await
        .expect("shutdown completes after the supervisor panicked");
    assert_eq!(
        metrics.num_alive_tasks(),
        before,
        "every task of the runtime ended"
    );
    assert!(matches!(
        runtime.workers().await,
        Err(crate::Error::ShutDown)
    ));
    // Its consumer is gone from the broker: a message for it waits in the queue.
    broker
        .publish("events", "a.b", b"{}", Default::default())
        .unwrap();
    assert_eq!(broker.ready("idle"), Some(1));
}
