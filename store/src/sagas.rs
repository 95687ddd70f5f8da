//! Saga instances and stored cron schedules.

use futures_util::future::BoxFuture;
use rabbitry::{SagaRecord, SagaRepository, Schedule};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{DEFAULT_LIMIT, Store, StoreError, now_ms, text};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const SAGA_COLUMNS: &str = "saga, saga_key, state, status, completed, version, pending, applied, \
                            created_at, updated_at";

/// A saga instance as stored, with the saga it belongs to. As JSON: `saga` and the
/// record's fields.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct StoredSaga {
    /// The saga (its queue's name).
    pub saga: String,
    /// The instance.
    #[serde(flatten)]
    pub record: SagaRecord,
}

/// Which saga instances [`Store::sagas`] lists.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct SagaFilter {
    /// Only this saga's.
    pub saga: Option<String>,
    /// Only those with this status label.
    pub status: Option<String>,
    /// At most this many, latest changed first (default 100).
    pub limit: Option<u32>,
}

impl SagaFilter {
    /// Every instance (the latest 100).
    pub fn new() -> SagaFilter {
        SagaFilter::default()
    }

    /// Only instances of `saga`.
    pub fn saga(mut self, saga: impl Into<String>) -> SagaFilter {
        self.saga = Some(saga.into());
        self
    }

    /// Only instances whose status label is `status`.
    pub fn status(mut self, status: impl Into<String>) -> SagaFilter {
        self.status = Some(status.into());
        self
    }

    /// At most `limit` instances.
    pub fn limit(mut self, limit: u32) -> SagaFilter {
        self.limit = Some(limit);
        self
    }
}

fn saga_of(row: &AnyRow) -> crate::Result<StoredSaga> {
    let json = |column: &str| -> crate::Result<serde_json::Value> {
        let raw: String = row.try_get(column)?;
        serde_json::from_str(&raw).map_err(|e| StoreError::Corrupt(format!("saga {column}: {e}")))
    };
    let mut record = SagaRecord::new(row.try_get::<String, _>("saga_key")?);
    record.state = json("state")?;
    record.status = row.try_get("status")?;
    record.completed = row.try_get::<i64, _>("completed")? != 0;
    record.version = row.try_get("version")?;
    record.pending = serde_json::from_value(json("pending")?)
        .map_err(|e| StoreError::Corrupt(format!("saga pending: {e}")))?;
    record.applied = serde_json::from_value(json("applied")?)
        .map_err(|e| StoreError::Corrupt(format!("saga applied: {e}")))?;
    record.created_ms = row.try_get("created_at")?;
    record.updated_ms = row.try_get("updated_at")?;
    Ok(StoredSaga {
        saga: row.try_get("saga")?,
        record,
    })
}

fn json_text(value: &impl serde::Serialize) -> crate::Result<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl Store {
    /// Saga instances `filter` selects, the latest changed first.
    pub async fn sagas(&self, filter: &SagaFilter) -> crate::Result<Vec<StoredSaga>> {
        let sql = format!(
            "SELECT {SAGA_COLUMNS} FROM rabbitry_sagas \
             WHERE ($1 IS NULL OR saga = $1) AND ($2 IS NULL OR status = $2) \
             ORDER BY updated_at DESC, saga, saga_key LIMIT $3"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(filter.saga.as_deref().map(text).as_deref())
            .bind(filter.status.as_deref().map(text).as_deref())
            .bind(i64::from(filter.limit.unwrap_or(DEFAULT_LIMIT)))
            .fetch_all(self.read())
            .await?;
        rows.iter().map(saga_of).collect()
    }

    /// The instances with correlation key `key` (one per saga that has one), optionally
    /// of `saga` only.
    pub async fn saga_instances(
        &self,
        key: &str,
        saga: Option<&str>,
    ) -> crate::Result<Vec<StoredSaga>> {
        let sql = format!(
            "SELECT {SAGA_COLUMNS} FROM rabbitry_sagas \
             WHERE saga_key = $1 AND ($2 IS NULL OR saga = $2) ORDER BY saga"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&*text(key))
            .bind(saga.map(text).as_deref())
            .fetch_all(self.read())
            .await?;
        rows.iter().map(saga_of).collect()
    }

    async fn save_saga(&self, saga: &str, record: &SagaRecord) -> crate::Result<bool> {
        let state = json_text(&record.state)?;
        let pending = json_text(&record.pending)?;
        let applied = json_text(&record.applied)?;
        let completed = i64::from(record.completed);
        let done = if record.version == 1 {
            sqlx::query(
                "INSERT INTO rabbitry_sagas (saga, saga_key, state, status, completed, version, \
                 pending, applied, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (saga, saga_key) DO NOTHING",
            )
            .bind(&*text(saga))
            .bind(&*text(&record.key))
            .bind(&state)
            .bind(&*text(&record.status))
            .bind(completed)
            .bind(record.version)
            .bind(&pending)
            .bind(&applied)
            .bind(record.created_ms)
            .bind(record.updated_ms)
            .execute(self.write())
            .await?
        } else {
            sqlx::query(
                "UPDATE rabbitry_sagas SET state = $1, status = $2, completed = $3, version = $4, \
                 pending = $5, applied = $6, updated_at = $7 \
                 WHERE saga = $8 AND saga_key = $9 AND version = $10",
            )
            .bind(&state)
            .bind(&*text(&record.status))
            .bind(completed)
            .bind(record.version)
            .bind(&pending)
            .bind(&applied)
            .bind(record.updated_ms)
            .bind(&*text(saga))
            .bind(&*text(&record.key))
            .bind(record.version - 1)
            .execute(self.write())
            .await?
        };
        Ok(done.rows_affected() == 1)
    }

    /// Keep `schedule` (its name must be new): `rabbitry serve` fires it from its next
    /// reload on. The schedule is checked first — pattern, time zone, routing key — and a
    /// bad one is an error naming what is wrong.
    pub async fn add_schedule(&self, schedule: &StoredSchedule) -> crate::Result<bool> {
        schedule
            .to_schedule()
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let done = sqlx::query(
            "INSERT INTO rabbitry_schedules (name, pattern, time_zone, routing_key, body, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&schedule.name)
        .bind(&schedule.pattern)
        .bind(&schedule.time_zone)
        .bind(&schedule.routing_key)
        .bind(&*text(&schedule.body))
        .bind(now_ms())
        .execute(self.write())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Every stored schedule, by name.
    pub async fn schedules(&self) -> crate::Result<Vec<StoredSchedule>> {
        let rows = sqlx::query(
            "SELECT name, pattern, time_zone, routing_key, body, created_at \
             FROM rabbitry_schedules ORDER BY name",
        )
        .fetch_all(self.read())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(StoredSchedule {
                    name: row.try_get("name")?,
                    pattern: row.try_get("pattern")?,
                    time_zone: row.try_get("time_zone")?,
                    routing_key: row.try_get("routing_key")?,
                    body: row.try_get("body")?,
                    created_ms: row.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// Remove the stored schedule `name`; whether there was one.
    pub async fn remove_schedule(&self, name: &str) -> crate::Result<bool> {
        let done = sqlx::query("DELETE FROM rabbitry_schedules WHERE name = $1")
            .bind(&*text(name))
            .execute(self.write())
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

/// A cron schedule kept in the store: a JSON body published with a routing key at every
/// tick (see [`Schedule::json`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct StoredSchedule {
    /// Its name (letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// The cron pattern (5 fields, or 6 with seconds first).
    pub pattern: String,
    /// The IANA time zone the pattern is read in.
    pub time_zone: String,
    /// The routing key (and event type) of what it publishes.
    pub routing_key: String,
    /// The JSON body it publishes.
    pub body: String,
    /// When it was added (Unix ms; 0 before it is stored).
    pub created_ms: i64,
}

impl StoredSchedule {
    /// A schedule to store; checked by [`to_schedule`](StoredSchedule::to_schedule).
    pub fn new(name: &str, pattern: &str, routing_key: &str, body: &str) -> StoredSchedule {
        StoredSchedule {
            name: name.to_owned(),
            pattern: pattern.to_owned(),
            time_zone: "UTC".into(),
            routing_key: routing_key.to_owned(),
            body: body.to_owned(),
            created_ms: 0,
        }
    }

    /// Read the pattern in the IANA time zone `zone`.
    pub fn time_zone(mut self, zone: &str) -> StoredSchedule {
        self.time_zone = zone.to_owned();
        self
    }

    /// The [`Schedule`] to run, or what is wrong with this one.
    pub fn to_schedule(&self) -> rabbitry::Result<Schedule> {
        let body: serde_json::Value = serde_json::from_str(&self.body).map_err(|e| {
            rabbitry::Error::Config(format!(
                "schedule '{}': the body is not JSON: {e}",
                self.name
            ))
        })?;
        let schedule = Schedule::json(&self.name, &self.pattern, &self.routing_key, &body)?;
        Ok(schedule
            .time_zone(&self.time_zone)?
            .revision(self.created_ms.to_string()))
    }
}

/// The store's saga instances, as the [`SagaRepository`] a
/// [`Saga`](rabbitry::Saga) keeps them in: on SQLite or PostgreSQL, with the version check
/// in the `UPDATE`'s `WHERE` (and the key's uniqueness for new instances).
///
/// ```no_run
/// use rabbitry::{Saga, Subscription};
/// use rabbitry_store::{SagaStore, Store};
/// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct Checkout;
/// # async fn run() -> Result<(), rabbitry_store::StoreError> {
/// let store = Store::connect("sqlite://rabbitry.db").await?;
/// let saga = Saga::<Checkout>::new(Subscription::new("checkout"), SagaStore::new(store));
/// # let _ = saga; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SagaStore {
    store: Store,
}

impl SagaStore {
    /// The saga instances of `store`.
    pub fn new(store: Store) -> SagaStore {
        SagaStore { store }
    }
}

impl SagaRepository for SagaStore {
    fn load<'a>(
        &'a self,
        saga: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<SagaRecord>, BoxError>> {
        Box::pin(async move {
            let mut found = self.store.saga_instances(key, Some(saga)).await?;
            Ok(found.pop().map(|s| s.record))
        })
    }

    fn save<'a>(
        &'a self,
        saga: &'a str,
        record: &'a SagaRecord,
    ) -> BoxFuture<'a, Result<bool, BoxError>> {
        Box::pin(async move { Ok(self.store.save_saga(saga, record).await?) })
    }
}
