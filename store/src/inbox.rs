//! The persistent de-duplication inbox: claims shared by every process on the store.

use futures_util::future::BoxFuture;
use rabbitry::middleware::DedupStore;

use crate::{Store, now_ms};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A [`DedupStore`] in the store: a key is claimed by inserting it, so of several processes
/// handling copies of one message, one claims it. Give it to
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
/// Claims are kept until [`prune`](Inbox::prune) removes old ones.
#[derive(Debug, Clone)]
pub struct Inbox {
    store: Store,
}

impl Inbox {
    /// The inbox of `store`.
    pub fn new(store: Store) -> Inbox {
        Inbox { store }
    }

    /// Forget claims older than `max_age_ms` milliseconds; returns how many.
    pub async fn prune(&self, max_age_ms: i64) -> crate::Result<u64> {
        let done = sqlx::query("DELETE FROM rabbitry_inbox WHERE claimed_at < $1")
            .bind(now_ms() - max_age_ms)
            .execute(self.store.write())
            .await?;
        Ok(done.rows_affected())
    }
}

impl DedupStore for Inbox {
    fn claim<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, BoxError>> {
        Box::pin(async move {
            let done = sqlx::query(
                "INSERT INTO rabbitry_inbox (key, claimed_at) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            )
            .bind(key)
            .bind(now_ms())
            .execute(self.store.write())
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn release<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), BoxError>> {
        Box::pin(async move {
            sqlx::query("DELETE FROM rabbitry_inbox WHERE key = $1")
                .bind(key)
                .execute(self.store.write())
                .await?;
            Ok(())
        })
    }
}
