//! An observer that records what the runtime reports, for tests to wait on and assert.
#![allow(dead_code)] // shared by test targets that each use part of it

use std::sync::Mutex;

use rabbitry::observe::{Handling, Lifecycle, Observer, PublishOutcome, Published, Settled};
use tokio::sync::Notify;

use super::PATIENCE;

/// Everything an observer was told, in order.
#[derive(Default)]
pub struct Journal {
    pub settled: Mutex<Vec<(String, String, Handling, u32)>>,
    pub published: Mutex<Vec<(String, String, PublishOutcome)>>,
    pub lifecycle: Mutex<Vec<String>>,
    pub changed: Notify,
}

impl Observer for Journal {
    fn settled(&self, s: &Settled<'_>) {
        let id = s.metadata.message_id().to_owned();
        let entry = (
            s.worker.to_owned(),
            id,
            s.handling.clone(),
            s.metadata.attempt(),
        );
        self.settled.lock().unwrap().push(entry);
        self.changed.notify_waiters();
    }

    fn published(&self, p: &Published<'_>) {
        let entry = (p.exchange.to_owned(), p.routing_key.to_owned(), p.outcome);
        self.published.lock().unwrap().push(entry);
    }

    fn lifecycle(&self, event: &Lifecycle<'_>) {
        self.lifecycle.lock().unwrap().push(format!("{event:?}"));
    }
}

impl Journal {
    /// Wait until `n` deliveries were settled; returns them.
    pub async fn wait_settled(&self, n: usize) -> Vec<(String, String, Handling, u32)> {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let done = self.settled.lock().unwrap().clone();
                if done.len() >= n {
                    return done;
                }
                changed.await;
            }
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .unwrap_or_else(|_| panic!("{n} settlements within {PATIENCE:?}"))
    }
}

impl Journal {
    /// The settlements of `worker` so far: (message id, handling, attempt).
    pub fn of(&self, worker: &str) -> Vec<(String, Handling, u32)> {
        self.settled
            .lock()
            .unwrap()
            .iter()
            .filter(|(w, ..)| w == worker)
            .map(|(_, id, h, a)| (id.clone(), h.clone(), *a))
            .collect()
    }

    /// How many settlements of `worker` were `name` (`handled`, `skipped`, …).
    pub fn count(&self, worker: &str, name: &str) -> usize {
        self.of(worker)
            .iter()
            .filter(|(_, h, _)| h.as_str() == name)
            .count()
    }

    /// Wait until `worker` has `n` settlements; returns them.
    pub async fn wait_for(&self, worker: &str, n: usize) -> Vec<(String, Handling, u32)> {
        self.wait_until(worker, |done| done.len() >= n).await
    }

    /// Wait until `worker`'s settlements so far meet `done`; returns them.
    pub async fn wait_until(
        &self,
        worker: &str,
        done: impl Fn(&[(String, Handling, u32)]) -> bool,
    ) -> Vec<(String, Handling, u32)> {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let so_far = self.of(worker);
                if done(&so_far) {
                    return so_far;
                }
                changed.await;
            }
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{worker}'s settlements within {PATIENCE:?}: {:?}",
                    self.of(worker)
                )
            })
    }
}
