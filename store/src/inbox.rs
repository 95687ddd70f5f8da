//! The persistent de-duplication inbox: claims shared by every process on the store, each
//! held under a lease until its handler finishes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rabbitry::middleware::{ClaimHeld, DedupStore};

use crate::{Store, indexed, now_ms};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a claim is held by default before another consumer may take it over.
const DEFAULT_LEASE: Duration = Duration::from_secs(120);
/// The pauses before a message whose claim is held elsewhere is tried again: the first
/// one at least as long as what is left of the lease (30 s at most). A few fixed values,
/// because each distinct delay is a delay queue on the broker.
const RETRY_STEPS: [u64; 6] = [1, 2, 4, 8, 16, 30];

fn retry_after(left_ms: i64) -> Duration {
    let left = u64::try_from(left_ms).unwrap_or(0);
    let secs = RETRY_STEPS
        .into_iter()
        .find(|s| s * 1000 >= left)
        .unwrap_or(RETRY_STEPS[RETRY_STEPS.len() - 1]);
    Duration::from_secs(secs)
}

/// A [`DedupStore`] in the store, shared by every process on it. Give it to
/// [`DedupLayer::with_store`](rabbitry::middleware::DedupLayer::with_store).
///
/// ```no_run
/// use rabbitry::middleware::DedupLayer;
/// use rabbitry_store::{Inbox, Store};
///
/// # async fn run() -> Result<(), rabbitry_store::StoreError> {
/// let store = Store::connect("postgres://postgres@127.0.0.1/rabbitry").await?;
/// let dedup = DedupLayer::with_store(std::sync::Arc::new(Inbox::new(store)));
/// # let _ = dedup; Ok(()) }
/// ```
///
/// A message's key is claimed by inserting it, under a lease (two minutes by default,
/// [`lease`](Inbox::lease)); the claim is completed when its handler succeeds, and
/// released when it fails (its retry must not look like a duplicate). A copy that arrives:
///
/// - after the claim was completed is a duplicate, and skipped;
/// - while the claim is held (a copy is being handled elsewhere, or its handler's process
///   died) is deferred — put back without counting an attempt — until about the end of
///   the lease;
/// - after the lease ran out takes the claim over: the holder is presumed dead, as when a
///   process was killed mid-handling and the broker redelivered its message. The holder's
///   late release or completion, if it was only slow, no longer touches the claim. (Within
///   one process a copy always waits for the process's own handler.)
///
/// So a crash never turns a redelivery into a skipped "duplicate"; a handler that runs
/// longer than the lease may, however, see a concurrent copy handled too: make the lease
/// longer than the handler's timeout. Leases are measured by each process's clock: clocks
/// that disagree by more than a small part of the lease shorten it. Claims are kept until
/// [`prune`](Inbox::prune) removes old ones.
#[derive(Debug, Clone)]
pub struct Inbox {
    store: Store,
    lease: Duration,
    /// This inbox's claims in progress: key → holder token, which fences its release and
    /// completion.
    holding: Arc<Mutex<HashMap<String, String>>>,
}

/// What the row of a key that could not be claimed says.
enum Held {
    /// Completed: a duplicate.
    Done,
    /// Held until this time (Unix ms).
    Until(i64),
    /// Gone (released meanwhile).
    Free,
}

impl Inbox {
    /// The inbox of `store`.
    pub fn new(store: Store) -> Inbox {
        Inbox {
            store,
            lease: DEFAULT_LEASE,
            holding: Arc::default(),
        }
    }

    /// Hold a claim for `lease` (default 2 minutes, at least 1 ms) before another consumer
    /// may take it over. Longer than the handler's timeout.
    pub fn lease(mut self, lease: Duration) -> Inbox {
        self.lease = lease.max(Duration::from_millis(1));
        self
    }

    /// Forget claims older than `max_age_ms` milliseconds (completed ones, and abandoned
    /// ones whose lease is over; never one in progress); returns how many.
    pub async fn prune(&self, max_age_ms: i64) -> crate::Result<u64> {
        let now = now_ms();
        let done = sqlx::query(
            "DELETE FROM rabbitry_inbox WHERE claimed_at < $1 \
             AND (lease_until IS NULL OR lease_until < $2)",
        )
        .bind(now.saturating_sub(max_age_ms))
        .bind(now)
        .execute(self.store.write())
        .await?;
        Ok(done.rows_affected())
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX / 2)
    }

    /// Claim `key` with `token`: a new row, or the row of a holder whose lease ran out.
    async fn try_claim(&self, key: &str, token: &str) -> crate::Result<bool> {
        let now = now_ms();
        let until = now.saturating_add(self.lease_ms());
        let inserted = sqlx::query(
            "INSERT INTO rabbitry_inbox (key, claimed_at, lease_until, holder) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO NOTHING",
        )
        .bind(&*indexed(key))
        .bind(now)
        .bind(until)
        .bind(token)
        .execute(self.store.write())
        .await?;
        if inserted.rows_affected() == 1 {
            return Ok(true);
        }
        let taken = sqlx::query(
            "UPDATE rabbitry_inbox SET claimed_at = $2, lease_until = $3, holder = $4 \
             WHERE key = $1 AND lease_until IS NOT NULL AND lease_until < $2",
        )
        .bind(&*indexed(key))
        .bind(now)
        .bind(until)
        .bind(token)
        .execute(self.store.write())
        .await?;
        Ok(taken.rows_affected() == 1)
    }

    async fn held(&self, key: &str) -> crate::Result<Held> {
        let row: Option<Option<i64>> =
            sqlx::query_scalar("SELECT lease_until FROM rabbitry_inbox WHERE key = $1")
                .bind(&*indexed(key))
                .fetch_optional(self.store.write())
                .await?;
        Ok(match row {
            None => Held::Free,
            Some(None) => Held::Done,
            Some(Some(until)) => Held::Until(until),
        })
    }

    /// Note that this inbox is claiming `key` with `token`; `false` if it holds `key`
    /// already (a copy is being handled in this process).
    fn reserve(&self, key: &str, token: &str) -> bool {
        let Ok(mut holding) = self.holding.lock() else {
            return false;
        };
        if holding.contains_key(key) {
            return false;
        }
        holding.insert(key.to_owned(), token.to_owned());
        true
    }

    /// Forget the claim of `key` with `token` (a claim that did not happen).
    fn unreserve(&self, key: &str, token: &str) {
        if let Ok(mut holding) = self.holding.lock()
            && holding.get(key).is_some_and(|t| t == token)
        {
            holding.remove(key);
        }
    }

    /// Take this inbox's token for `key` (it no longer holds the claim in memory).
    fn take(&self, key: &str) -> Option<String> {
        self.holding.lock().ok()?.remove(key)
    }

    /// Claim `key` with `token` in the store (see [`DedupStore::claim`]).
    async fn claim_in_store(&self, key: &str, token: &str) -> Result<bool, BoxError> {
        // A row released between our insert and our look is free again: claim anew.
        for _ in 0..3 {
            if self.try_claim(key, token).await? {
                return Ok(true);
            }
            match self.held(key).await? {
                Held::Done => return Ok(false),
                Held::Until(until) => {
                    let retry_after = retry_after(until.saturating_sub(now_ms()));
                    return Err(ClaimHeld { retry_after }.into());
                }
                Held::Free => continue,
            }
        }
        Err(ClaimHeld {
            retry_after: retry_after(0),
        }
        .into())
    }
}

impl DedupStore for Inbox {
    fn claim<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, BoxError>> {
        Box::pin(async move {
            let token = uuid::Uuid::now_v7().simple().to_string();
            // One claim per key per inbox: a copy of a message this process is handling
            // waits for it (and never takes over its own process's claim).
            if !self.reserve(key, &token) {
                return Err(ClaimHeld {
                    retry_after: retry_after(0),
                }
                .into());
            }
            let claimed = self.claim_in_store(key, &token).await;
            if !matches!(claimed, Ok(true)) {
                self.unreserve(key, &token);
            }
            claimed
        })
    }

    fn complete<'a>(&'a self, key: &'a str) -> Option<BoxFuture<'a, Result<(), BoxError>>> {
        // Taken out first: whatever happens below, the claim ends (done, or with its lease).
        let token = self.take(key)?;
        Some(Box::pin(async move {
            sqlx::query(
                "UPDATE rabbitry_inbox SET lease_until = NULL WHERE key = $1 AND holder = $2",
            )
            .bind(&*indexed(key))
            .bind(&token)
            .execute(self.store.write())
            .await?;
            Ok(())
        }))
    }

    fn release<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), BoxError>> {
        Box::pin(async move {
            let Some(token) = self.take(key) else {
                return Ok(());
            };
            sqlx::query("DELETE FROM rabbitry_inbox WHERE key = $1 AND holder = $2")
                .bind(&*indexed(key))
                .bind(&token)
                .execute(self.store.write())
                .await?;
            Ok(())
        })
    }
}
