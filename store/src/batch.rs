//! Collecting single messages into batches that are committed in one transaction each.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::warn;

/// First and longest pause between attempts to commit a batch the store refused.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Hands items to a task that commits them in batches; each item's sender learns when its
/// batch is committed. Cloned by every delivery's service call.
pub(crate) struct Batcher<T> {
    tx: mpsc::Sender<(T, oneshot::Sender<()>)>,
}

impl<T> Clone for Batcher<T> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Send + Sync + 'static> Batcher<T> {
    /// Start the committing task: a batch is committed when it holds `max` items or its
    /// first item has waited `wait`. A commit that fails is tried again, with growing
    /// pauses, until it succeeds: meanwhile nothing is acknowledged, and the broker keeps
    /// the messages (within the consumer's prefetch). The task ends when every handle is
    /// dropped.
    pub(crate) fn start<F, Fut, E>(
        what: &'static str,
        max: usize,
        wait: Duration,
        commit: F,
    ) -> Self
    where
        F: Fn(Arc<Vec<T>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send,
        E: std::fmt::Display + Send,
    {
        let max = max.max(1);
        let (tx, mut rx) = mpsc::channel::<(T, oneshot::Sender<()>)>(max * 2);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let deadline = Instant::now() + wait;
                let (mut items, mut waiting) = (Vec::with_capacity(max), Vec::with_capacity(max));
                let (item, done) = first;
                items.push(item);
                waiting.push(done);
                while items.len() < max {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some((item, done))) => {
                            items.push(item);
                            waiting.push(done);
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                let items = Arc::new(items);
                until_stored(what, || commit(items.clone())).await;
                for done in waiting {
                    let _ = done.send(());
                }
            }
        });
        Batcher { tx }
    }

    /// Add `item`; resolves `true` once its batch is committed, `false` if the committing
    /// task is gone (the process is stopping: the message is not acknowledged).
    pub(crate) async fn add(&self, item: T) -> bool {
        let (done, committed) = oneshot::channel();
        if self.tx.send((item, done)).await.is_err() {
            return false;
        }
        committed.await.is_ok()
    }
}

/// Run `store` until it succeeds: a refusal is logged and tried again after a pause that
/// grows from 100 ms to 5 s. Meanwhile the caller's messages stay unacknowledged.
pub(crate) async fn until_stored<F, Fut, E>(what: &str, mut store: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut pause = RETRY_MIN;
    let mut failures = 0u32;
    loop {
        match store().await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(%what, failures, "the store took the batch after refusing it");
                }
                return;
            }
            Err(e) => {
                failures += 1;
                warn!(%what, error = %e, retry_in = ?pause, "the store refused a batch; nothing is acknowledged until it takes it");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RETRY_MAX);
            }
        }
    }
}
