//! Where saga instances are kept: the repository trait, its record, and an in-memory one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// An error from a repository (a database's, typically).
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One saga instance as a [`SagaRepository`] keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SagaRecord {
    /// The correlation key.
    pub key: String,
    /// The saga's state, as JSON.
    pub state: serde_json::Value,
    /// The label its handlers set last (`"started"` until one does).
    pub status: String,
    /// Whether a handler marked it complete; later events for it are skipped.
    pub completed: bool,
    /// Incremented by every change: a save succeeds only over the version it read.
    pub version: i64,
    /// Events decided by the last change and not yet confirmed by the broker.
    pub pending: Vec<PendingMessage>,
    /// The ids of the latest messages applied (at most 64), so a redelivered one is not
    /// applied twice.
    pub applied: Vec<String>,
    /// When it started, in milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// When it last changed, in milliseconds since the Unix epoch.
    pub updated_ms: i64,
}

impl SagaRecord {
    /// A new instance for `key`, not yet saved (version 0).
    pub fn new(key: impl Into<String>) -> SagaRecord {
        let now = now_ms();
        SagaRecord {
            key: key.into(),
            state: serde_json::Value::Null,
            status: "started".into(),
            completed: false,
            version: 0,
            pending: Vec::new(),
            applied: Vec::new(),
            created_ms: now,
            updated_ms: now,
        }
    }
}

/// An event a saga decided to publish, kept with its state until the broker confirms it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PendingMessage {
    /// Its message id: the same on every attempt to send it.
    pub message_id: String,
    /// Its routing key and event type.
    pub routing_key: String,
    /// Its event version.
    pub version: u32,
    /// Its body.
    pub body: serde_json::Value,
    /// When it is due, for a timeout (milliseconds since the Unix epoch).
    pub due_ms: Option<i64>,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Keeps saga instances with optimistic concurrency. `rabbitry-store` implements it on
/// SQLite and PostgreSQL; [`MemorySagaRepository`] is for tests and demos.
pub trait SagaRepository: Send + Sync + 'static {
    /// The instance of saga `saga` with `key`, if there is one.
    fn load<'a>(
        &'a self,
        saga: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<SagaRecord>, BoxError>>;

    /// Save `record` if nobody changed it since it was read: insert it when its version
    /// is 1 (`Ok(false)` if an instance with its key exists), otherwise update the one at
    /// version `record.version - 1` (`Ok(false)` if it is at another version).
    fn save<'a>(
        &'a self,
        saga: &'a str,
        record: &'a SagaRecord,
    ) -> BoxFuture<'a, Result<bool, BoxError>>;
}

/// A [`SagaRepository`] in memory, with the same uniqueness and version checks as the
/// stores (a test double that forgave conflicts would hide the bugs it is there to find).
#[derive(Debug, Default)]
pub struct MemorySagaRepository {
    records: Mutex<HashMap<(String, String), SagaRecord>>,
}

impl MemorySagaRepository {
    /// An empty repository.
    pub fn new() -> MemorySagaRepository {
        MemorySagaRepository::default()
    }

    /// Every instance of saga `saga`, by key.
    pub fn records(&self, saga: &str) -> Vec<SagaRecord> {
        let records = crate::lock(&self.records);
        let mut found: Vec<SagaRecord> = records
            .iter()
            .filter(|((s, _), _)| s == saga)
            .map(|(_, r)| r.clone())
            .collect();
        found.sort_by(|a, b| a.key.cmp(&b.key));
        found
    }
}

impl SagaRepository for MemorySagaRepository {
    fn load<'a>(
        &'a self,
        saga: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<SagaRecord>, BoxError>> {
        let found = crate::lock(&self.records)
            .get(&(saga.to_owned(), key.to_owned()))
            .cloned();
        Box::pin(std::future::ready(Ok(found)))
    }

    fn save<'a>(
        &'a self,
        saga: &'a str,
        record: &'a SagaRecord,
    ) -> BoxFuture<'a, Result<bool, BoxError>> {
        let mut records = crate::lock(&self.records);
        let id = (saga.to_owned(), record.key.clone());
        let current = records.get(&id).map(|r| r.version);
        let fits = match current {
            None => record.version == 1,
            Some(v) => v == record.version - 1,
        };
        if fits {
            records.insert(id, record.clone());
        }
        Box::pin(std::future::ready(Ok(fits)))
    }
}
