//! Lifecycle, on RabbitMQ and on the in-memory broker: reconnecting after the network drops,
//! graceful shutdown, and adding, removing, pausing and resuming workers while running.

#[macro_use]
mod support;

use std::sync::Arc;
use std::time::Duration;

use rabbitry::Error;
use rabbitry::prelude::*;
use support::*;
use tokio::sync::Semaphore;

async fn the_runtime_reconnects_after_the_connection_is_cut_and_redelivers_unacked_messages(
    env: TestEnv,
) {
    let queue = env.queue("resilient");
    let gate = Arc::new(Semaphore::new(0));
    let (probe, mut seen) = env.probe(Subscription::new(&queue).bind("order.placed"), |_| Ok(()));
    // On RabbitMQ the runtime goes through a TCP relay that can cut its connections.
    let rt = env
        .breakable_builder()
        .await
        .worker(probe.gated(gate.clone()))
        .start()
        .await
        .unwrap();
    let publisher = env.publisher().await;

    publisher.publish(&order(1)).await.unwrap();
    let first = seen.next().await; // handler running, blocked on the gate
    assert!(!first.redelivered);
    env.break_connections();
    gate.add_permits(1); // it finishes, but its acknowledgement cannot reach the broker

    // The broker gives the unacknowledged message back once the runtime has reconnected
    // by itself.
    let again = seen.next().await;
    assert_eq!(again.message_id, first.message_id);
    assert!(
        again.redelivered,
        "an unacknowledged delivery comes back as a redelivery"
    );
    gate.add_permits(1);

    publisher.publish(&order(2)).await.unwrap();
    let fresh = seen.next().await;
    gate.add_permits(1);
    assert_eq!(fresh.order_id(), 2);
    let status = rt.workers().await.unwrap();
    assert!(status[0].consuming, "{status:?}");
    assert_eq!(status[0].restarts, 1, "{status:?}");
    rt.shutdown().await;
    assert_eq!(env.ready(&queue).await, 0);
}

async fn graceful_shutdown_finishes_in_flight_work_and_returns_the_rest(env: TestEnv) {
    let queue = env.queue("busy");
    let gate = Arc::new(Semaphore::new(0));
    let (probe, mut seen) = env.probe(
        Subscription::new(&queue)
            .bind("order.placed")
            .prefetch(10)
            .concurrency(3),
        |_| Ok(()),
    );
    let rt = env
        .builder()
        .worker(probe.gated(gate.clone()))
        .start()
        .await
        .unwrap();
    let orders: Vec<_> = (0..20).map(order).collect();
    env.publisher().await.publish_batch(&orders).await.unwrap();

    // Three handlers run (the concurrency limit) while more deliveries wait unstarted in
    // the prefetch buffer; then the shutdown begins and the handlers are let go.
    let mut handled = seen.take(3).await;
    let stopping = tokio::spawn({
        let rt = rt.clone();
        async move { rt.shutdown().await }
    });
    gate.add_permits(orders.len());
    stopping.await.unwrap();
    handled.extend(seen.drain());

    // Nothing lost, nothing twice: every order was either handled (and acknowledged) or is
    // back in the queue, unstarted ones included.
    let remaining = env.ready(&queue).await as usize;
    assert_eq!(
        handled.len() + remaining,
        orders.len(),
        "handled {} + queued {remaining}",
        handled.len()
    );
    let mut ids: Vec<u64> = handled.iter().map(Seen::order_id).collect();
    let returned = env.take(&queue, remaining).await;
    ids.extend(returned.iter().map(|d| {
        serde_json::from_slice::<OrderPlaced>(&d.body)
            .unwrap()
            .order_id
    }));
    ids.sort();
    assert_eq!(ids, (0..20).collect::<Vec<_>>());
    assert!(matches!(rt.workers().await, Err(Error::ShutDown)));
}

async fn a_handler_over_the_grace_period_is_abandoned_and_its_message_returned(env: TestEnv) {
    let queue = env.queue("stuck");
    let gate = Arc::new(Semaphore::new(0)); // never opened
    let (probe, mut seen) = env.probe(Subscription::new(&queue).bind("order.placed"), |_| Ok(()));
    let rt = env
        .builder()
        .shutdown_grace(Duration::from_millis(200))
        .worker(probe.gated(gate))
        .start()
        .await
        .unwrap();
    env.publisher().await.publish(&order(1)).await.unwrap();
    seen.next().await;
    rt.shutdown().await;
    assert_eq!(
        env.ready(&queue).await,
        1,
        "the abandoned message is back in the queue"
    );
}

async fn workers_can_be_added_paused_resumed_and_removed_while_running(env: TestEnv) {
    let (first, mut first_seen) = env.probe(
        Subscription::new(env.queue("first")).bind("order.placed"),
        |_| Ok(()),
    );
    let rt = env.builder().worker(first).start().await.unwrap();
    let publisher = env.publisher().await;

    // Add a worker on another event type: it consumes at once, no restart.
    let later_queue = env.queue("later");
    let (later, mut later_seen) =
        env.probe(Subscription::new(&later_queue).bind("user.*"), |_| Ok(()));
    rt.add_worker(later).await.unwrap();
    publisher
        .message(&order(1))
        .routing_key("user.registered")
        .send()
        .await
        .unwrap();
    assert_eq!(later_seen.next().await.order_id(), 1);

    let (dup, _) = env.probe(Subscription::new(&later_queue).bind("user.*"), |_| Ok(()));
    assert!(matches!(
        rt.add_worker(dup).await,
        Err(Error::DuplicateWorker(_))
    ));

    // Pause: messages wait in the queue.
    rt.pause(&later_queue).await.unwrap();
    publisher
        .message(&order(2))
        .routing_key("user.registered")
        .send()
        .await
        .unwrap();
    assert_eq!(env.ready(&later_queue).await, 1);
    let status = rt.workers().await.unwrap();
    let later_status = status.iter().find(|s| s.name == later_queue).unwrap();
    assert!(
        later_status.paused && !later_status.consuming,
        "{later_status:?}"
    );

    // Resume: the waiting message is handled. (A resume is not a restart.)
    rt.resume(&later_queue).await.unwrap();
    let status = rt.workers().await.unwrap();
    assert_eq!(
        status
            .iter()
            .find(|s| s.name == later_queue)
            .unwrap()
            .restarts,
        0
    );
    assert_eq!(later_seen.next().await.order_id(), 2);

    // Remove: the worker is gone; its queue keeps new messages for whoever comes next.
    rt.remove_worker(&later_queue).await.unwrap();
    assert!(
        rt.workers()
            .await
            .unwrap()
            .iter()
            .all(|s| s.name != later_queue)
    );
    publisher
        .message(&order(3))
        .routing_key("user.registered")
        .send()
        .await
        .unwrap();
    assert_eq!(env.ready(&later_queue).await, 1);
    assert!(later_seen.drain().is_empty());
    assert!(matches!(
        rt.pause("nobody").await,
        Err(Error::UnknownWorker(_))
    ));

    // The first worker was never disturbed.
    publisher.publish(&order(4)).await.unwrap();
    assert_eq!(first_seen.next().await.order_id(), 4);
    rt.shutdown().await;
}

async fn a_slow_pause_holds_up_no_other_command(env: TestEnv) {
    let stuck_queue = env.queue("stuck");
    let gate = Arc::new(Semaphore::new(0));
    let (stuck, mut stuck_seen) = env
        .probe(Subscription::new(&stuck_queue).bind("order.placed"), |_| {
            Ok(())
        });
    let (other, mut other_seen) = env
        .probe(Subscription::new(env.queue("other")).bind("user.*"), |_| {
            Ok(())
        });
    // A grace period far beyond the test's patience: a command that waited for the stuck
    // handler would fail the test.
    let rt = env
        .builder()
        .shutdown_grace(Duration::from_secs(600))
        .worker(stuck.gated(gate.clone()))
        .worker(other)
        .start()
        .await
        .unwrap();
    let publisher = env.publisher().await;
    publisher.publish(&order(1)).await.unwrap();
    stuck_seen.next().await; // its handler runs and waits on the gate

    let pausing = tokio::spawn({
        let (rt, queue) = (rt.clone(), stuck_queue.clone());
        async move { rt.pause(&queue).await }
    });
    // Meanwhile every other command is answered.
    let other_queue = env.queue("other");
    let commands = async {
        rt.pause(&other_queue).await.unwrap();
        rt.resume(&other_queue).await.unwrap();
        rt.workers().await.unwrap()
    };
    let statuses = tokio::time::timeout(PATIENCE, commands)
        .await
        .expect("commands are not held up by a pause in progress");
    let stuck_status = statuses.iter().find(|s| s.name == stuck_queue).unwrap();
    assert!(
        stuck_status.paused && !stuck_status.consuming,
        "{stuck_status:?}"
    );
    publisher
        .message(&order(2))
        .routing_key("user.registered")
        .send()
        .await
        .unwrap();
    assert_eq!(other_seen.next().await.order_id(), 2);

    // The pause completes once the stuck handler finishes; its message was acknowledged.
    assert!(!pausing.is_finished());
    gate.add_permits(1);
    pausing.await.unwrap().unwrap();
    assert_eq!(env.ready(&stuck_queue).await, 0);
    rt.shutdown().await;
}

on_both_brokers!(
    a_slow_pause_holds_up_no_other_command,
    the_runtime_reconnects_after_the_connection_is_cut_and_redelivers_unacked_messages,
    graceful_shutdown_finishes_in_flight_work_and_returns_the_rest,
    a_handler_over_the_grace_period_is_abandoned_and_its_message_returned,
    workers_can_be_added_paused_resumed_and_removed_while_running,
);
