//! Sagas kept in the store, on both brokers and both databases: two processes applying
//! events to one instance at the same moment never lose an update — the version check
//! refuses the second save, and its retry applies the event to the new state.

#[path = "../../tests/support/mod.rs"]
#[macro_use]
#[allow(unused_macros)]
mod support;
#[macro_use]
mod db;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use db::Db;
use futures_util::future::BoxFuture;
use rabbitry::prelude::*;
use rabbitry::{Saga, SagaRecord, SagaRepository, Step};
use rabbitry_store::SagaStore;
use serde::{Deserialize, Serialize};
use support::journal::Journal;
use support::*;
use tokio::sync::Barrier;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Serialize, Deserialize)]
struct Vote {
    poll: String,
    n: u32,
}

impl Event for Vote {
    const TYPE: &'static str = "poll.vote";
}

#[derive(Default, Serialize, Deserialize)]
struct Tally {
    votes: Vec<u32>,
}

/// The store, but the first two loads of each round wait for each other (at most 10 s),
/// so that two processes read the same version of the instance.
struct InStep {
    inner: SagaStore,
    loads: AtomicUsize,
    rounds: [Barrier; 2],
}

impl SagaRepository for InStep {
    fn load<'a>(
        &'a self,
        saga: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<SagaRecord>, BoxError>> {
        Box::pin(async move {
            let found = self.inner.load(saga, key).await?;
            // Loads 0 and 1 meet, then 3 and 4 (2 and 5 are the retries).
            let round = match self.loads.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Some(&self.rounds[0]),
                3 | 4 => Some(&self.rounds[1]),
                _ => None,
            };
            if let Some(barrier) = round {
                let _ = tokio::time::timeout(Duration::from_secs(10), barrier.wait()).await;
            }
            Ok(found)
        })
    }

    fn save<'a>(
        &'a self,
        saga: &'a str,
        record: &'a SagaRecord,
    ) -> BoxFuture<'a, Result<bool, BoxError>> {
        self.inner.save(saga, record)
    }
}

fn tally(queue: &str, repository: Arc<dyn SagaRepository>) -> Saga<Tally> {
    // One delivery at a time per process: the second vote goes to the other process.
    let subscription = Subscription::new(queue)
        .prefetch(1)
        .concurrency(1)
        .retry(RetryPolicy::exponential(Duration::from_millis(100)).max_attempts(5));
    Saga::with_repository(subscription, repository).starts(
        |v: &Vote| v.poll.clone(),
        |step: &mut Step<Tally>, v: &Delivery<Vote>| {
            step.state.votes.push(v.n);
            step.set_status(format!("{} votes", step.state.votes.len()));
            Ok(())
        },
    )
}

async fn two_processes_updating_one_instance_at_once_lose_no_update(env: TestEnv, db: Db) {
    let store = db.store().await;
    let queue = env.queue("tally");
    env.track(
        &Subscription::new(&queue)
            .retry(RetryPolicy::exponential(Duration::from_millis(100)).max_attempts(5)),
    );
    let repository: Arc<dyn SagaRepository> = Arc::new(InStep {
        inner: SagaStore::new(store.clone()),
        loads: AtomicUsize::new(0),
        rounds: [Barrier::new(2), Barrier::new(2)],
    });
    let journal = Arc::new(Journal::default());
    let mut runtimes = Vec::new();
    for _ in 0..2 {
        let rt = env
            .builder()
            .observer(journal.clone())
            .worker(tally(&queue, repository.clone()))
            .start()
            .await
            .unwrap();
        runtimes.push(rt);
    }
    let publisher = env.publisher().await;
    // Round 1: both votes create the instance at once; round 2: both update it at once.
    for round in [[1, 2], [3, 4]] {
        for n in round {
            publisher
                .publish(&Vote {
                    poll: "lunch".into(),
                    n,
                })
                .await
                .unwrap();
        }
        let want = round[1] as usize;
        journal
            .wait_until(&queue, |s| {
                s.iter().filter(|(_, h, _)| h.as_str() == "handled").count() >= want
            })
            .await;
    }
    for rt in runtimes {
        rt.shutdown().await;
    }
    let instance = SagaStore::new(store.clone())
        .load(&queue, "lunch")
        .await
        .unwrap()
        .unwrap();
    let mut votes: Vec<u64> =
        serde_json::from_value::<Vec<u64>>(instance.state["votes"].clone()).unwrap();
    votes.sort_unstable();
    assert_eq!(votes, [1, 2, 3, 4], "every vote counted once");
    assert_eq!(instance.version, 4);
    assert_eq!(instance.status, "4 votes");
    let retried = journal.count(&queue, "retried");
    assert_eq!(
        retried,
        2,
        "one conflict per round, each retried: {:?}",
        journal.of(&queue)
    );
    db.done(store).await;
}

on_both_brokers_and_databases!(two_processes_updating_one_instance_at_once_lose_no_update);
