//! Topology over time, on RabbitMQ and on the in-memory broker: a worker whose bindings or
//! retry policy changed, a worker on a queue it does not own, queues declared by a producer
//! before any worker runs, and publishing a stream through a pipeline.

#[macro_use]
mod support;

use std::time::Duration;

use rabbitry::prelude::*;
use rabbitry::{Error, Topology};
use support::*;

async fn a_changed_worker_reports_or_prunes_old_bindings_and_drops_empty_old_retry_queues(
    env: TestEnv,
) {
    let queue = env.queue("changing");
    let tier = |ms: u64| format!("{queue}.retry.{ms}");
    let wide = Subscription::new(&queue)
        .bind("order.placed")
        .bind("order.cancelled")
        .retry(RetryPolicy::exponential(Duration::from_secs(60)).max_attempts(3));
    let narrow = Subscription::new(&queue)
        .bind("order.placed")
        .retry(RetryPolicy::exponential(Duration::from_millis(100)).max_attempts(2));
    env.track(&wide);
    env.track(&narrow);

    let (first, _) = env.probe(wide, |_| Ok(()));
    env.builder()
        .worker(first)
        .start()
        .await
        .unwrap()
        .shutdown()
        .await;
    assert!(env.exists(&tier(60_000)).await && env.exists(&tier(120_000)).await);
    // A retry is still waiting out its two minutes in one of the old tiers.
    env.publish_to_queue(&tier(120_000), b"{}").await;

    // By default the dropped binding is reported, not removed: its events still arrive.
    let (second, mut seen) = env.probe(narrow.clone(), |_| Ok(()));
    let rt = env.builder().worker(second).start().await.unwrap();
    let status = rt.workers().await.unwrap().remove(0);
    let reported = format!("exchange '{}', key 'order.cancelled'", env.exchange);
    assert_eq!(
        status.stale_bindings,
        std::slice::from_ref(&reported),
        "{status:?}"
    );
    let publisher = env.publisher().await;
    publisher
        .message(&order(1))
        .routing_key("order.cancelled")
        .send()
        .await
        .unwrap();
    assert_eq!(seen.next().await.order_id(), 1);
    rt.shutdown().await;
    assert!(env.exists(&tier(100)).await);
    assert!(
        !env.exists(&tier(60_000)).await,
        "the empty old tier was deleted"
    );
    assert!(
        env.exists(&tier(120_000)).await,
        "the old tier holding a retry is kept"
    );
    assert_eq!(env.ready(&tier(120_000)).await, 1);

    // Reported again at the next start; pruned when the subscription asks for it.
    let (third, _) = env.probe(narrow.clone(), |_| Ok(()));
    let rt = env.builder().worker(third).start().await.unwrap();
    assert_eq!(rt.workers().await.unwrap()[0].stale_bindings, [reported]);
    rt.shutdown().await;
    let (pruning, mut seen) = env.probe(narrow.clone().prune_bindings(), |_| Ok(()));
    let rt = env.builder().worker(pruning).start().await.unwrap();
    assert!(rt.workers().await.unwrap()[0].stale_bindings.is_empty());
    let dropped = publisher
        .message(&order(2))
        .routing_key("order.cancelled")
        .send()
        .await;
    assert!(
        matches!(dropped, Err(Error::Unroutable { .. })),
        "the old binding is gone: {dropped:?}"
    );
    publisher.publish(&order(3)).await.unwrap();
    assert_eq!(seen.next().await.order_id(), 3);
    rt.shutdown().await;

    // Once the kept tier is empty, a later start removes it too.
    match env.memory() {
        Some(broker) => assert_eq!(broker.take(&tier(120_000), 1).len(), 1),
        None => assert_eq!(env.take(&tier(120_000), 1).await.len(), 1),
    }
    let (last, _) = env.probe(narrow, |_| Ok(()));
    env.builder()
        .worker(last)
        .start()
        .await
        .unwrap()
        .shutdown()
        .await;
    assert!(!env.exists(&tier(120_000)).await);
}

async fn a_worker_on_an_existing_queue_leaves_the_owners_bindings_alone(env: TestEnv) {
    let queue = env.queue("owned");
    let (owner, _) = env.probe(
        Subscription::new(&queue)
            .bind("order.placed")
            .prune_bindings(),
        |_| Ok(()),
    );
    env.builder()
        .worker(owner)
        .start()
        .await
        .unwrap()
        .shutdown()
        .await;
    // Another process only consumes it.
    let (guest, mut seen) = env.probe(
        Subscription::new(&queue).existing_queue().prune_bindings(),
        |_| Ok(()),
    );
    let rt = env.builder().worker(guest).start().await.unwrap();
    env.publisher().await.publish(&order(8)).await.unwrap();
    assert_eq!(
        seen.next().await.order_id(),
        8,
        "the owner's binding still routes"
    );
    rt.shutdown().await;
}

async fn a_worker_consumes_another_workers_dead_letter_queue_without_declaring_it(env: TestEnv) {
    let queue = env.queue("origin");
    let dlq = format!("{queue}.dlq");
    let (origin, _) = env.probe(
        Subscription::new(&queue)
            .bind("order.placed")
            .retry(RetryPolicy::exponential(Duration::from_millis(50)).max_attempts(2)),
        |_| Err(Failure::retry("stock service down")),
    );
    let rt = env.builder().worker(origin).start().await.unwrap();
    let publisher = env.publisher().await;
    publisher.publish(&order(1)).await.unwrap();
    publisher.publish(&order(2)).await.unwrap();
    env.wait_until_ready(&dlq, 2).await;

    // Declaring the dead-letter queue as a worker queue conflicts with how it exists...
    let (declaring, _) = env.probe(Subscription::new(&dlq).bind("never.sent"), |_| Ok(()));
    let conflict = rt.add_worker(declaring).await;
    assert!(
        matches!(conflict, Err(Error::TopologyConflict { ref name, .. }) if *name == dlq),
        "{conflict:?}"
    );
    // ...consuming it as an existing queue works, and the retries spent in the origin
    // queue do not count in this one.
    let (redrive, mut seen) = env.probe(Subscription::new(&dlq).existing_queue(), |_| Ok(()));
    rt.add_worker(redrive).await.unwrap();
    let mut dead = seen.take(2).await;
    dead.sort_by_key(Seen::order_id);
    for (d, id) in dead.iter().zip([1, 2]) {
        assert_eq!(d.order_id(), id);
        assert_eq!(d.attempt, 1);
        assert_eq!(
            d.routing_key, "order.placed",
            "the original route is restored"
        );
        assert_eq!(d.exchange, env.exchange);
    }
    // The origin's dead-lettering still reaches its queue.
    publisher.publish(&order(3)).await.unwrap();
    assert_eq!(seen.next().await.order_id(), 3);
    rt.shutdown().await;
    assert_eq!(env.ready(&dlq).await, 0);

    let (missing, _) = env.probe(
        Subscription::new(env.queue("nobody")).existing_queue(),
        |_| Ok(()),
    );
    let err = env.builder().worker(missing).start().await.unwrap_err();
    assert!(
        matches!(err, Error::QueueNotFound { ref queue } if *queue == env.queue("nobody")),
        "{err:?}"
    );
}

async fn a_producer_declares_a_workers_queues_before_the_worker_starts(env: TestEnv) {
    let queue = env.queue("prepared");
    let subscription = Subscription::new(&queue).bind("order.placed");
    env.track(&subscription);
    Topology::new(&env.exchange, [&subscription])
        .declare(&env.url())
        .await
        .unwrap();
    // Routable before any worker runs: the message waits in the worker's queue.
    env.publisher().await.publish(&order(5)).await.unwrap();
    assert_eq!(env.ready(&queue).await, 1);

    let (worker, mut seen) = env.probe(subscription, |_| Ok(()));
    let rt = env.builder().worker(worker).start().await.unwrap();
    assert_eq!(seen.next().await.order_id(), 5);
    rt.shutdown().await;
}

async fn a_pipeline_sends_keys_per_message_and_reports_failures_by_number(env: TestEnv) {
    let (placed, mut placed_seen) = env.probe(
        Subscription::new(env.queue("placed")).bind("order.placed"),
        |_| Ok(()),
    );
    let (shipped, mut shipped_seen) = env.probe(
        Subscription::new(env.queue("shipped")).bind("order.shipped"),
        |_| Ok(()),
    );
    let rt = env
        .builder()
        .worker(placed)
        .worker(shipped)
        .start()
        .await
        .unwrap();
    let publisher = env.publisher().await;
    let mut pipeline = publisher.pipeline().window(4);
    for id in 0..10u64 {
        let key = if id % 2 == 0 {
            "order.placed"
        } else {
            "order.shipped"
        };
        pipeline
            .send_message(publisher.message(&order(id)).routing_key(key))
            .await
            .unwrap();
        assert!(pipeline.in_flight() <= 4);
    }
    assert_eq!(pipeline.flush().await.unwrap(), 10);
    let mut evens: Vec<u64> = placed_seen.order_ids(5).await;
    let mut odds: Vec<u64> = shipped_seen.order_ids(5).await;
    evens.sort();
    odds.sort();
    assert_eq!((evens, odds), (vec![0, 2, 4, 6, 8], vec![1, 3, 5, 7, 9]));

    // Numbers restart after a flush; an unroutable message is reported by its number.
    pipeline.send(&order(10)).await.unwrap();
    assert_eq!(pipeline.flush().await.unwrap(), 1);
    pipeline
        .send_message(publisher.message(&order(11)).routing_key("nobody.listens"))
        .await
        .unwrap();
    let err = pipeline.flush().await.unwrap_err();
    assert!(
        matches!(&err, Error::Batch { total: 1, failures }
            if matches!(&failures[..], [(0, Error::Unroutable { routing_key, .. })] if routing_key == "nobody.listens")),
        "{err:?}"
    );
    assert_eq!(
        pipeline.flush().await.unwrap(),
        0,
        "each failure is reported once"
    );
    assert_eq!(placed_seen.next().await.order_id(), 10);
    rt.shutdown().await;
}

on_both_brokers!(
    a_changed_worker_reports_or_prunes_old_bindings_and_drops_empty_old_retry_queues,
    a_worker_on_an_existing_queue_leaves_the_owners_bindings_alone,
    a_worker_consumes_another_workers_dead_letter_queue_without_declaring_it,
    a_producer_declares_a_workers_queues_before_the_worker_starts,
    a_pipeline_sends_keys_per_message_and_reports_failures_by_number,
);
