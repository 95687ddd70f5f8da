//! The persistent inbox under the de-duplication middleware, on both brokers and both
//! databases: a copy whose claim a dead process still holds is deferred (not skipped as a
//! duplicate) and handled once the lease is over; a copy of a completed message is skipped.

#[path = "../../tests/support/mod.rs"]
#[macro_use]
#[allow(unused_macros)]
mod support;
#[macro_use]
mod db;

use std::sync::Arc;
use std::time::Duration;

use db::Db;
use rabbitry::Registration;
use rabbitry::middleware::{DedupLayer, DedupStore};
use rabbitry::observe::Handling;
use rabbitry::prelude::*;
use rabbitry_store::Inbox;
use serde::{Deserialize, Serialize};
use support::journal::Journal;
use support::*;

#[derive(Serialize, Deserialize)]
struct PaymentMade {
    n: u32,
}

impl Event for PaymentMade {
    const TYPE: &'static str = "payment.made";
}

async fn a_claim_left_by_a_dead_process_defers_its_copy_until_the_lease_is_over(
    env: TestEnv,
    db: Db,
) {
    let store = db.store().await;
    let queue = env.queue("ledger");
    let journal = Arc::new(Journal::default());
    let (probe, mut seen) = env.probe(Subscription::new(&queue).bind("payment.made"), |_| Ok(()));
    let inbox = Arc::new(Inbox::new(store.clone()));
    let rt = env
        .builder()
        .observer(journal.clone())
        .worker(Registration::new(probe).layer(DedupLayer::with_store(inbox)))
        .start()
        .await
        .unwrap();
    let publisher = env.publisher().await;
    // A process claimed pay-1 (lease 3 s) and died before it finished: the broker
    // redelivers the message to the worker above.
    let dead = Inbox::new(store.clone()).lease(Duration::from_secs(3));
    assert!(dead.claim(&format!("{queue}/pay-1")).await.unwrap());
    for (id, n) in [("pay-1", 1), ("pay-2", 2)] {
        let event = PaymentMade { n };
        publisher
            .message(&event)
            .message_id(id)
            .send()
            .await
            .unwrap();
    }
    // pay-2 is handled at once; pay-1 waits for the lease, then is handled, once.
    let settled = journal
        .wait_until(&queue, |s| {
            s.iter()
                .any(|(id, h, _)| id == "pay-1" && h.as_str() == "handled")
        })
        .await;
    let story: Vec<(String, &str)> = settled
        .iter()
        .map(|(id, h, _)| (id.clone(), h.as_str()))
        .collect();
    assert!(
        story.contains(&("pay-1".into(), "deferred")),
        "deferred while the dead process's lease ran: {story:?}"
    );
    assert!(story.contains(&("pay-2".into(), "handled")), "{story:?}");
    let handled: Vec<String> = seen
        .take(2)
        .await
        .into_iter()
        .map(|s| s.message_id)
        .collect();
    assert_eq!(handled, ["pay-2", "pay-1"]);

    // Both completed: copies are duplicates now, across processes.
    publisher
        .message(&PaymentMade { n: 1 })
        .message_id("pay-1")
        .send()
        .await
        .unwrap();
    let settled = journal
        .wait_until(&queue, |s| {
            s.iter()
                .any(|(_, h, _)| matches!(h, Handling::Skipped { .. }))
        })
        .await;
    assert!(
        settled.iter().any(|(id, h, _)| id == "pay-1"
            && matches!(h, Handling::Skipped { reason } if reason.contains("duplicate"))),
        "{settled:?}"
    );
    assert!(seen.try_next().is_none(), "not handled again");
    publisher.close().await;
    rt.shutdown().await;
    db.done(store).await;
}

on_both_brokers_and_databases!(
    a_claim_left_by_a_dead_process_defers_its_copy_until_the_lease_is_over,
);
