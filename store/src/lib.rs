//! The record of a [rabbitry] system: every event published, how each worker handled each
//! delivery, the messages workers dead-lettered, and a de-duplication inbox shared by
//! processes — in a SQLite file by default, in PostgreSQL at scale, chosen by URL.
//!
//! ```no_run
//! use rabbitry_store::{EventFilter, Store, StoredEvent};
//!
//! # async fn run() -> Result<(), rabbitry_store::StoreError> {
//! let store = Store::connect("sqlite://rabbitry.db").await?; // or postgres://user@host/db
//! let mut event = StoredEvent::new("01J…", "order.placed", "events", "order.placed", r#"{"id":42}"#);
//! event.properties = event.properties.with_correlation_id("order-42".into());
//! store.record_events(&[event]).await?; // idempotent on the message id
//! for event in store.events(&EventFilter::new().event_type("order.placed")).await? {
//!     println!("{} {}", event.seq, event.message_id);
//! }
//! # Ok(()) }
//! ```
//!
//! Migrations are compiled in and run by [`Store::connect`]. A SQLite store runs in WAL
//! mode with a busy timeout and one writer connection (readers do not wait for it); a
//! PostgreSQL store shares one pool. Every write is a transaction, and every insert is
//! idempotent on what identifies the row (an event's message id, a handling report's id, a
//! dead letter's worker + message id + failure time), so a batch written twice — by a
//! process killed before it acknowledged its messages, say — is recorded once.
//!
//! [`Inbox`] is the persistent [`DedupStore`](rabbitry::middleware::DedupStore) for
//! [`DedupLayer`](rabbitry::middleware::DedupLayer): processes on one queue share it, and
//! a claim is held under a lease, so a process killed mid-handling does not turn the
//! broker's redelivery into a skipped duplicate. [`Keeper`] fills the store from the
//! broker (`rabbitry serve` runs it); [`Outbox`] and [`OutboxRelay`] publish what an
//! application's own transaction wrote.
//!
//! ```no_run
//! use std::sync::Arc;
//! use rabbitry::middleware::DedupLayer;
//! use rabbitry_store::{EventFilter, Inbox, Keeper, Store};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Store::connect("sqlite://rabbitry.db").await?; // migrations run here
//! let keeper = Keeper::new(store.clone(), "events").dead_letters_of("orders.inventory");
//! let dedup = DedupLayer::with_store(Arc::new(Inbox::new(store.clone())));
//! for event in store.events(&EventFilter::new().event_type("order.placed").limit(10)).await? {
//!     println!("{} {}", event.message_id, event.routing_key);
//! }
//! # let _ = (keeper, dedup); Ok(()) }
//! ```
//!
//! [rabbitry]: https://docs.rs/rabbitry

mod batch;
mod controls;
mod db;
mod inbox;
mod keeper;
mod outbox;
mod records;
mod redrive;
mod replay;
mod sagas;
mod tokens;

use std::time::{SystemTime, UNIX_EPOCH};

use rabbitry::lapin::BasicProperties;
use rabbitry::lapin::types::{AMQPValue, FieldTable};
use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};

pub use controls::{Webhook, WebhookRetry};
pub use db::Backend;
pub use inbox::Inbox;
pub use keeper::{Keeper, REPLAYED_FROM};
pub use outbox::{Outbox, OutboxConnection, OutboxRelay};
pub use records::{DeadLetter, DeadLetterState, EventFilter, HandlingRecord, StoredEvent};
pub use redrive::{REDRIVEN_AT, RedriveError, redriven_properties};
pub use replay::{ReplayError, replay, replayed_properties};
pub use sagas::{SagaFilter, SagaStore, StoredSaga, StoredSchedule};
pub use tokens::{ApiToken, NewToken, Scope, token_digest};

/// What can go wrong with a store. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The URL names no supported database.
    #[error("{0}")]
    Url(String),
    /// The database could not be reached or opened.
    #[error("cannot open the store {url}: {error} (is the database running, and the URL right?)")]
    Connect {
        /// The URL, without its password.
        url: String,
        /// What the driver said.
        error: String,
    },
    /// The schema could not be brought up to date.
    #[error("cannot migrate the store: {0}")]
    Migrate(String),
    /// A query failed (the database went away, a disk is full…): nothing was written by the
    /// call that returned it; try again later.
    #[error("store query failed: {0}")]
    Query(#[from] sqlx::Error),
    /// What was to be stored is not valid (a schedule's pattern, say); the message says
    /// what to fix.
    #[error("{0}")]
    Invalid(String),
    /// A stored row could not be read back (written by another version?).
    #[error("a stored row is unreadable: {0}")]
    Corrupt(String),
}

impl StoreError {
    fn connect(url: &str, error: impl std::fmt::Display) -> StoreError {
        StoreError::Connect {
            url: db::redact(url),
            error: error.to_string(),
        }
    }
}

/// The store's result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The columns [`event_of`] reads.
macro_rules! event_columns {
    () => {
        "seq, message_id, event_type, exchange, routing_key, correlation_id, source, \
         properties, body, published_at, recorded_at"
    };
}

/// The columns [`dead_letter_of`] reads.
macro_rules! dead_letter_columns {
    () => {
        "seq, worker, message_id, failed_at, event_type, exchange, routing_key, kind, reason, \
         properties, body, recorded_at, state, state_changed_at"
    };
}

/// Default number of rows a listing returns.
const DEFAULT_LIMIT: u32 = 100;

/// A connection to the record. Cheap to clone: clones share the pools.
#[derive(Clone)]
pub struct Store {
    pools: std::sync::Arc<db::Pools>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.pools.backend)
            .finish_non_exhaustive()
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Open the store at `url` — `sqlite://<file>` (created if missing) or
    /// `postgres://user[:password]@host[:port]/database` — and bring its schema up to date.
    pub async fn connect(url: &str) -> Result<Store> {
        let pools = db::open(url).await?;
        Ok(Store {
            pools: std::sync::Arc::new(pools),
        })
    }

    /// Which database this store is on.
    pub fn backend(&self) -> Backend {
        self.pools.backend
    }

    /// Close every connection (waiting for queries in progress).
    pub async fn close(&self) {
        self.pools.write.close().await;
        self.pools.read.close().await;
    }

    fn write(&self) -> &AnyPool {
        &self.pools.write
    }

    fn read(&self) -> &AnyPool {
        &self.pools.read
    }

    /// Record `events` in one transaction; an event whose message id is already stored is
    /// left as it is. Returns how many were new.
    pub async fn record_events(&self, events: &[StoredEvent]) -> Result<u64> {
        let recorded_at = now_ms();
        let insert = Insert {
            head: "INSERT INTO rabbitry_events (message_id, event_type, exchange, routing_key, \
                   correlation_id, source, properties, body, published_at, recorded_at)",
            width: 10,
            tail: "ON CONFLICT (message_id) DO NOTHING",
        };
        let mut tx = self.write().begin().await?;
        let new = insert
            .run(self.backend(), &mut tx, events, |q, e| {
                q.bind(&*indexed(&e.message_id))
                    .bind(&*indexed(&e.event_type))
                    .bind(&*text(&e.exchange))
                    .bind(&*text(&e.routing_key))
                    .bind(e.correlation_id().map(indexed).as_deref())
                    .bind(e.source().map(text).as_deref())
                    .bind(properties_json(&e.properties))
                    .bind(&e.body)
                    .bind(e.published_at())
                    .bind(recorded_at)
            })
            .await?;
        tx.commit().await?;
        Ok(new)
    }

    /// The events `filter` selects, oldest first.
    pub async fn events(&self, filter: &EventFilter) -> Result<Vec<StoredEvent>> {
        let rows = sqlx::query(concat!(
            "SELECT * FROM (SELECT ",
            event_columns!(),
            " FROM rabbitry_events \
             WHERE ($1 IS NULL OR event_type = $1) AND ($2 IS NULL OR recorded_at >= $2) \
             AND ($3 IS NULL OR correlation_id = $3) ORDER BY seq DESC LIMIT $4) AS latest \
             ORDER BY seq"
        ))
        .bind(filter.event_type.as_deref().map(indexed).as_deref())
        .bind(filter.since)
        .bind(filter.correlation_id.as_deref().map(indexed).as_deref())
        .bind(i64::from(filter.limit.unwrap_or(DEFAULT_LIMIT)))
        .fetch_all(self.read())
        .await?;
        rows.iter().map(event_of).collect()
    }

    /// How many recorded events `filter` selects (its limit aside).
    pub async fn count_events(&self, filter: &EventFilter) -> Result<u64> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM rabbitry_events \
             WHERE ($1 IS NULL OR event_type = $1) AND ($2 IS NULL OR recorded_at >= $2) \
             AND ($3 IS NULL OR correlation_id = $3)",
        )
        .bind(filter.event_type.as_deref().map(indexed).as_deref())
        .bind(filter.since)
        .bind(filter.correlation_id.as_deref().map(indexed).as_deref())
        .fetch_one(self.read())
        .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// The event with `message_id`, if it was recorded.
    pub async fn event(&self, message_id: &str) -> Result<Option<StoredEvent>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            event_columns!(),
            " FROM rabbitry_events WHERE message_id = $1"
        ))
        .bind(&*indexed(message_id))
        .fetch_optional(self.read())
        .await?;
        row.as_ref().map(event_of).transpose()
    }

    /// Record handling reports in one transaction (a report already stored is skipped).
    /// Returns how many were new.
    pub async fn record_handlings(&self, handlings: &[HandlingRecord]) -> Result<u64> {
        let insert = Insert {
            head: "INSERT INTO rabbitry_handlings (id, worker, message_id, attempt, outcome, \
                   reason, duration_us, handled_at, host)",
            width: 9,
            tail: "ON CONFLICT (id) DO NOTHING",
        };
        let mut tx = self.write().begin().await?;
        let new = insert
            .run(self.backend(), &mut tx, handlings, |q, h| {
                q.bind(&*indexed(&h.id))
                    .bind(&*text(&h.worker))
                    .bind(&*indexed(&h.message_id))
                    .bind(i64::from(h.attempt))
                    .bind(&*text(&h.outcome))
                    .bind(h.reason.as_deref().map(text).as_deref())
                    .bind(h.duration_us)
                    .bind(h.handled_at)
                    .bind(&*text(&h.host))
            })
            .await?;
        tx.commit().await?;
        Ok(new)
    }

    /// Every handling of `message_id`, in the order they happened.
    pub async fn handlings(&self, message_id: &str) -> Result<Vec<HandlingRecord>> {
        let rows = sqlx::query(
            "SELECT id, worker, message_id, attempt, outcome, reason, duration_us, handled_at, host \
             FROM rabbitry_handlings WHERE message_id = $1 ORDER BY handled_at, worker, attempt",
        )
        .bind(&*indexed(message_id))
        .fetch_all(self.read())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(HandlingRecord {
                    id: r.try_get("id")?,
                    worker: r.try_get("worker")?,
                    message_id: r.try_get("message_id")?,
                    attempt: u32::try_from(r.try_get::<i64, _>("attempt")?).unwrap_or(0),
                    outcome: r.try_get("outcome")?,
                    reason: r.try_get("reason")?,
                    duration_us: r.try_get("duration_us")?,
                    handled_at: r.try_get("handled_at")?,
                    host: r.try_get("host")?,
                })
            })
            .collect()
    }

    /// Keep dead letters in one transaction (one already kept is skipped). Returns how many
    /// were new.
    pub async fn record_dead_letters(&self, letters: &[DeadLetter]) -> Result<u64> {
        let recorded_at = now_ms();
        let insert = Insert {
            head: "INSERT INTO rabbitry_dead_letters (worker, message_id, failed_at, event_type, \
                   exchange, routing_key, kind, reason, properties, body, recorded_at, state)",
            width: 12,
            tail: "ON CONFLICT (worker, message_id, failed_at) DO NOTHING",
        };
        let mut tx = self.write().begin().await?;
        let new = insert
            .run(self.backend(), &mut tx, letters, |q, d| {
                q.bind(&*indexed(&d.worker))
                    .bind(&*indexed(&d.message_id))
                    .bind(&*indexed(&d.failed_at))
                    .bind(&*text(&d.event_type))
                    .bind(&*text(&d.exchange))
                    .bind(&*text(&d.routing_key))
                    .bind(d.kind.as_deref().map(text).as_deref())
                    .bind(d.reason.as_deref().map(text).as_deref())
                    .bind(properties_json(&d.properties))
                    .bind(&d.body)
                    .bind(recorded_at)
                    .bind(DeadLetterState::Waiting.as_str())
            })
            .await?;
        tx.commit().await?;
        Ok(new)
    }

    /// Dead letters, oldest first: of one worker (or all), in one state (or any).
    pub async fn dead_letters(
        &self,
        worker: Option<&str>,
        state: Option<DeadLetterState>,
        limit: Option<u32>,
    ) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            dead_letter_columns!(),
            " FROM rabbitry_dead_letters WHERE ($1 IS NULL OR worker = $1) \
                 AND ($2 IS NULL OR state = $2) ORDER BY seq LIMIT $3"
        ))
        .bind(worker.map(text).as_deref())
        .bind(state.map(DeadLetterState::as_str))
        .bind(i64::from(limit.unwrap_or(DEFAULT_LIMIT)))
        .fetch_all(self.read())
        .await?;
        rows.iter().map(dead_letter_of).collect()
    }

    /// How many dead letters are kept: of one worker (or all), in one state (or any).
    pub async fn count_dead_letters(
        &self,
        worker: Option<&str>,
        state: Option<DeadLetterState>,
    ) -> Result<u64> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM rabbitry_dead_letters WHERE ($1 IS NULL OR worker = $1) \
             AND ($2 IS NULL OR state = $2)",
        )
        .bind(worker.map(text).as_deref())
        .bind(state.map(DeadLetterState::as_str))
        .fetch_one(self.read())
        .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// The dead letter `seq`.
    pub async fn dead_letter(&self, seq: i64) -> Result<Option<DeadLetter>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            dead_letter_columns!(),
            " FROM rabbitry_dead_letters WHERE seq = $1"
        ))
        .bind(seq)
        .fetch_optional(self.read())
        .await?;
        row.as_ref().map(dead_letter_of).transpose()
    }

    /// Move the waiting dead letters among `seqs` to `state`, in one transaction; those not
    /// waiting (already redriven or purged) are left as they are. Returns how many moved.
    pub async fn set_dead_letter_state(&self, seqs: &[i64], state: DeadLetterState) -> Result<u64> {
        let now = now_ms();
        let mut tx = self.write().begin().await?;
        let mut moved = 0;
        for seq in seqs {
            moved += sqlx::query(
                "UPDATE rabbitry_dead_letters SET state = $1, state_changed_at = $2 \
                 WHERE seq = $3 AND state = 'waiting'",
            )
            .bind(state.as_str())
            .bind(now)
            .bind(seq)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(moved)
    }
}

/// Rows one multi-row `INSERT` carries (12 columns × 100 rows stays far below SQLite's
/// 32,766 and PostgreSQL's 65,535 bind parameters).
const ROWS_PER_INSERT: usize = 100;

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

/// A multi-row `INSERT`: `head VALUES ($1, …, $width), (…) … tail`, sent in statements
/// of [`ROWS_PER_INSERT`] rows (the remainder in tens and ones) — one round trip per
/// hundred rows instead of one per row.
struct Insert {
    head: &'static str,
    width: usize,
    tail: &'static str,
}

impl Insert {
    /// Insert `rows` in `tx`, `bind` adding one row's `width` values. Returns the rows
    /// inserted (those the `tail`'s conflict clause skipped are not counted).
    async fn run<T>(
        &self,
        backend: Backend,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        rows: &[T],
        bind: impl for<'q> Fn(AnyQuery<'q>, &T) -> AnyQuery<'q>,
    ) -> Result<u64> {
        let mut inserted = 0;
        let mut rest = rows;
        while !rest.is_empty() {
            // Statements of 100, 10 or 1 rows only: three prepared statements per table
            // in each connection's cache, whatever the batch sizes.
            let size = [ROWS_PER_INSERT, 10, 1]
                .into_iter()
                .find(|n| *n <= rest.len())
                .unwrap_or(1);
            let (chunk, tail) = rest.split_at(size);
            rest = tail;
            let mut query = sqlx::query(sqlx::AssertSqlSafe(self.sql(backend, chunk.len())));
            for row in chunk {
                query = bind(query, row);
            }
            inserted += query.execute(&mut **tx).await?.rows_affected();
        }
        Ok(inserted)
    }

    /// The statement for `rows` rows. SQLite gets anonymous `?` placeholders: it looks a
    /// numbered one up by a linear scan, which made a 1,000-parameter statement spend half
    /// its time finding its parameters.
    fn sql(&self, backend: Backend, rows: usize) -> String {
        use std::fmt::Write;
        let mut sql = String::with_capacity(self.head.len() + rows * self.width * 6 + 64);
        sql.push_str(self.head);
        sql.push_str(" VALUES ");
        for row in 0..rows {
            sql.push_str(if row == 0 { "(" } else { ", (" });
            for column in 0..self.width {
                let sep = if column == 0 { "" } else { ", " };
                let _ = match backend {
                    Backend::Sqlite => write!(sql, "{sep}?"),
                    _ => write!(sql, "{sep}${}", row * self.width + column + 1),
                };
            }
            sql.push(')');
        }
        sql.push(' ');
        sql.push_str(self.tail);
        sql
    }
}

/// Text as the store keeps it: NUL, which PostgreSQL's `TEXT` refuses (a batch holding
/// one would be refused whole, again and again), becomes U+FFFD.
pub(crate) fn text(s: &str) -> std::borrow::Cow<'_, str> {
    match s.contains('\0') {
        true => s.replace('\0', "\u{fffd}").into(),
        false => s.into(),
    }
}

/// Longest indexed value, in bytes: a PostgreSQL index entry is limited to about 2.7 kB.
const INDEXED_MAX: usize = 512;

/// An indexed value as the store keeps it: as [`text`]; one longer than [`INDEXED_MAX`]
/// bytes (never an AMQP id, which is at most 255) is kept as its first 256 bytes and a
/// digest of the whole (a UUID v5), so two long values stay two.
pub(crate) fn indexed(s: &str) -> std::borrow::Cow<'_, str> {
    if s.len() <= INDEXED_MAX {
        return text(s);
    }
    let mut end = 256;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let digest = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, s.as_bytes());
    format!("{}…#{}", text(&s[..end]), digest.simple()).into()
}

/// AMQP properties as stored: serde's JSON of them, exact (header types included) — but
/// for a NaN or infinite float in a header, which JSON cannot hold (it would come back as
/// `null` and make the row unreadable): it is kept as the text `NaN`, `inf` or `-inf`.
fn properties_json(properties: &BasicProperties) -> String {
    let json = match properties.headers() {
        Some(headers) if !finite_table(headers) => {
            let clean = properties.clone().with_headers(finite_copy(headers));
            serde_json::to_string(&clean)
        }
        _ => serde_json::to_string(properties),
    };
    json.unwrap_or_else(|_| "{}".into())
}

fn finite_value(value: &AMQPValue) -> bool {
    match value {
        AMQPValue::Float(f) => f.is_finite(),
        AMQPValue::Double(d) => d.is_finite(),
        AMQPValue::FieldArray(a) => a.as_slice().iter().all(finite_value),
        AMQPValue::FieldTable(t) => finite_table(t),
        _ => true,
    }
}

fn finite_table(table: &FieldTable) -> bool {
    table.inner().values().all(finite_value)
}

fn finite_copy(table: &FieldTable) -> FieldTable {
    let mut copy = FieldTable::default();
    for (key, value) in table.inner() {
        copy.insert(key.clone(), finite_value_copy(value));
    }
    copy
}

fn finite_value_copy(value: &AMQPValue) -> AMQPValue {
    let text = |x: f64| AMQPValue::LongString(format!("{x}").into());
    match value {
        AMQPValue::Float(f) if !f.is_finite() => text(f64::from(*f)),
        AMQPValue::Double(d) if !d.is_finite() => text(*d),
        AMQPValue::FieldArray(a) => AMQPValue::FieldArray(
            a.as_slice()
                .iter()
                .map(finite_value_copy)
                .collect::<Vec<_>>()
                .into(),
        ),
        AMQPValue::FieldTable(t) => AMQPValue::FieldTable(finite_copy(t)),
        other => other.clone(),
    }
}

fn properties_of(text: &str) -> Result<BasicProperties> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("properties: {e}")))
}

fn event_of(r: &AnyRow) -> Result<StoredEvent> {
    Ok(StoredEvent {
        seq: r.try_get("seq")?,
        message_id: r.try_get("message_id")?,
        event_type: r.try_get("event_type")?,
        exchange: r.try_get("exchange")?,
        routing_key: r.try_get("routing_key")?,
        properties: properties_of(&r.try_get::<String, _>("properties")?)?,
        body: r.try_get("body")?,
        recorded_at: r.try_get("recorded_at")?,
    })
}

fn dead_letter_of(r: &AnyRow) -> Result<DeadLetter> {
    Ok(DeadLetter {
        seq: r.try_get("seq")?,
        worker: r.try_get("worker")?,
        message_id: r.try_get("message_id")?,
        failed_at: r.try_get("failed_at")?,
        event_type: r.try_get("event_type")?,
        exchange: r.try_get("exchange")?,
        routing_key: r.try_get("routing_key")?,
        kind: r.try_get("kind")?,
        reason: r.try_get("reason")?,
        properties: properties_of(&r.try_get::<String, _>("properties")?)?,
        body: r.try_get("body")?,
        recorded_at: r.try_get("recorded_at")?,
        state: DeadLetterState::parse(&r.try_get::<String, _>("state")?),
        state_changed_at: r.try_get("state_changed_at")?,
    })
}
