//! The transactional outbox: an event written in the same transaction as the business data,
//! published afterwards by a relay — so "saved" and "published" cannot disagree after a
//! crash.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use rabbitry::lapin::BasicProperties;
use rabbitry::lapin::types::{AMQPValue, FieldTable};
use rabbitry::{Event, Publisher, headers};
use sqlx::Row;
use tracing::warn;

use crate::{Store, StoreError, now_ms};

/// How long a relay holds the rows it took before another relay may take them.
const LEASE: Duration = Duration::from_secs(30);
/// Rows one relay step publishes at most.
const STEP: i64 = 100;

/// One outbox row to insert.
#[derive(Debug, Clone)]
#[doc(hidden)]
pub struct OutboxRow {
    message_id: String,
    exchange: String,
    routing_key: String,
    properties: String,
    body: Vec<u8>,
    created_at: i64,
}

/// A connection an outbox row can be written on inside the application's transaction:
/// SQLite's and PostgreSQL's (a `Transaction<'_, Sqlite>` or `<Postgres>` derefs to one).
pub trait OutboxConnection: Send {
    /// Insert `row`.
    #[doc(hidden)]
    fn insert_outbox<'a>(
        &'a mut self,
        row: &'a OutboxRow,
    ) -> BoxFuture<'a, Result<(), sqlx::Error>>;
}

macro_rules! outbox_connection {
    ($conn:ty) => {
        impl OutboxConnection for $conn {
            fn insert_outbox<'a>(
                &'a mut self,
                row: &'a OutboxRow,
            ) -> BoxFuture<'a, Result<(), sqlx::Error>> {
                Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO rabbitry_outbox (message_id, exchange, routing_key, properties, body, \
                         created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(&row.message_id)
                    .bind(&row.exchange)
                    .bind(&row.routing_key)
                    .bind(&row.properties)
                    .bind(&row.body)
                    .bind(row.created_at)
                    .execute(self)
                    .await
                    .map(drop)
                })
            }
        }
    };
}

outbox_connection!(sqlx::SqliteConnection);
outbox_connection!(sqlx::PgConnection);

/// Writes events into the outbox of the database the application writes its data to (a
/// [`Store`] on that database creates the table), inside the application's transaction.
///
/// ```no_run
/// use rabbitry::Event;
/// use rabbitry_store::Outbox;
/// # #[derive(serde::Serialize)] struct OrderPlaced { order_id: u64 }
/// # impl Event for OrderPlaced { const TYPE: &'static str = "order.placed"; }
///
/// # async fn place_order(pool: sqlx::SqlitePool) -> Result<(), Box<dyn std::error::Error>> {
/// let outbox = Outbox::new("events");
/// let mut tx = pool.begin().await?;
/// sqlx::query("INSERT INTO orders (id) VALUES (42)").execute(&mut *tx).await?;
/// let message_id = outbox.enqueue(&mut *tx, &OrderPlaced { order_id: 42 }).await?;
/// tx.commit().await?; // the order and its event, or neither
/// # let _ = message_id; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Outbox {
    exchange: String,
}

impl Outbox {
    /// An outbox for events published to `exchange`.
    pub fn new(exchange: impl Into<String>) -> Outbox {
        Outbox {
            exchange: exchange.into(),
        }
    }

    /// Write `event` (routing key `E::TYPE`) into the outbox on `conn`, inside the caller's
    /// transaction. Returns its message id, fixed now, so consumers can de-duplicate the
    /// copies a relay may publish twice (a crash between the publish and the mark).
    pub async fn enqueue<E: Event>(
        &self,
        conn: &mut impl OutboxConnection,
        event: &E,
    ) -> crate::Result<String> {
        self.enqueue_with_key(conn, event, E::TYPE).await
    }

    /// As [`enqueue`](Outbox::enqueue), with a routing key of the caller's.
    pub async fn enqueue_with_key<E: Event>(
        &self,
        conn: &mut impl OutboxConnection,
        event: &E,
        routing_key: &str,
    ) -> crate::Result<String> {
        let body = serde_json::to_vec(event)
            .map_err(|e| StoreError::Corrupt(format!("the event does not serialize: {e}")))?;
        let message_id = uuid_v7();
        let mut properties = BasicProperties::default()
            .with_message_id(message_id.as_str().into())
            .with_type(E::TYPE.into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(unix_seconds());
        if E::VERSION != 1 {
            let mut table = FieldTable::default();
            table.insert(
                headers::EVENT_VERSION.into(),
                AMQPValue::LongLongInt(E::VERSION.into()),
            );
            properties = properties.with_headers(table);
        }
        if let Some(priority) = E::PRIORITY {
            properties = properties.with_priority(priority);
        }
        let row = OutboxRow {
            message_id: message_id.clone(),
            exchange: self.exchange.clone(),
            routing_key: routing_key.to_owned(),
            properties: serde_json::to_string(&properties).unwrap_or_else(|_| "{}".into()),
            body,
            created_at: now_ms(),
        };
        conn.insert_outbox(&row).await?;
        Ok(message_id)
    }
}

fn uuid_v7() -> String {
    // Time-ordered, as the publisher's ids are.
    uuid::Uuid::now_v7().to_string()
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Publishes what the outbox holds, oldest first: each row with a confirm (mandatory), and
/// marks it sent only then. A row whose publish fails stays pending (its error and attempts
/// recorded) and is tried again after a pause that grows with its attempts (1 s per
/// attempt, at most a minute), while the rows behind it go on: a row that cannot be
/// published (an event nobody subscribes to yet) does not hold the others up, at the price
/// of their order. Several relays may run on one database: each takes rows under a 30 s
/// lease and marks only rows it still holds; a relay slower than its lease (a broker that
/// takes more than 30 s over 100 rows) can see another relay publish the same rows again.
#[derive(Debug, Clone)]
pub struct OutboxRelay {
    store: Store,
    publisher: Publisher,
}

impl OutboxRelay {
    /// A relay from `store`'s outbox through `publisher`.
    pub fn new(store: Store, publisher: Publisher) -> OutboxRelay {
        OutboxRelay { store, publisher }
    }

    /// Publish up to 100 pending rows; returns how many were published and marked.
    pub async fn step(&self) -> crate::Result<usize> {
        let now = now_ms();
        let lease = now + LEASE.as_millis() as i64;
        let rows = sqlx::query(
            "UPDATE rabbitry_outbox SET lease_until = $1, attempts = attempts + 1 \
             WHERE sent_at IS NULL AND (lease_until IS NULL OR lease_until < $2) \
             AND seq IN (SELECT seq FROM rabbitry_outbox WHERE sent_at IS NULL \
             AND (lease_until IS NULL OR lease_until < $2) ORDER BY seq LIMIT $3) \
             RETURNING seq, message_id, exchange, routing_key, properties, body",
        )
        .bind(lease)
        .bind(now)
        .bind(STEP)
        .fetch_all(self.store.write())
        .await?;
        let mut rows: Vec<_> = rows
            .iter()
            .map(|r| -> crate::Result<_> {
                let properties: String = r.try_get("properties")?;
                let properties: BasicProperties = serde_json::from_str(&properties)
                    .map_err(|e| StoreError::Corrupt(format!("outbox properties: {e}")))?;
                Ok((
                    r.try_get::<i64, _>("seq")?,
                    r.try_get::<String, _>("exchange")?,
                    r.try_get::<String, _>("routing_key")?,
                    properties,
                    r.try_get::<Vec<u8>, _>("body")?,
                ))
            })
            .collect::<crate::Result<_>>()?;
        rows.sort_by_key(|r| r.0);
        let mut published = 0;
        let taken: Vec<i64> = rows.iter().map(|r| r.0).collect();
        for (i, (seq, exchange, routing_key, properties, body)) in rows.into_iter().enumerate() {
            match self
                .publisher
                .publish_raw(&exchange, &routing_key, &body, properties)
                .await
            {
                Ok(()) => {
                    // Only while the lease is this step's: a relay that took too long (its
                    // lease over, the row taken by another) does not mark another's row.
                    sqlx::query(
                        "UPDATE rabbitry_outbox SET sent_at = $1, last_error = NULL \
                         WHERE seq = $2 AND lease_until = $3",
                    )
                    .bind(now_ms())
                    .bind(seq)
                    .bind(lease)
                    .execute(self.store.write())
                    .await?;
                    published += 1;
                }
                Err(e) => {
                    // This row waits (a growing pause: an event nobody subscribes to yet
                    // must not hold up the rows behind it); the rows after it go back now,
                    // and the step ends — the broker may be away.
                    let attempts =
                        sqlx::query("SELECT attempts FROM rabbitry_outbox WHERE seq = $1")
                            .bind(seq)
                            .fetch_one(self.store.read())
                            .await?
                            .try_get::<i64, _>("attempts")?;
                    let pause = (attempts.clamp(1, 60) * 1_000).min(60_000);
                    warn!(seq, error = %e, retry_in_ms = pause, "publishing an outbox row failed; it stays pending");
                    sqlx::query(
                        "UPDATE rabbitry_outbox SET lease_until = $1, last_error = $2 WHERE seq = $3",
                    )
                    .bind(now_ms() + pause)
                    .bind(e.to_string())
                    .bind(seq)
                    .execute(self.store.write())
                    .await?;
                    for rest in &taken[i + 1..] {
                        sqlx::query(
                            "UPDATE rabbitry_outbox SET lease_until = NULL \
                             WHERE seq = $1 AND lease_until = $2",
                        )
                        .bind(rest)
                        .bind(lease)
                        .execute(self.store.write())
                        .await?;
                    }
                    break;
                }
            }
        }
        Ok(published)
    }

    /// Relay until `stop` resolves: a step every `interval` (and at once after a full one).
    /// A store error is logged and the next step tries again.
    pub async fn run(&self, interval: Duration, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let published = match self.step().await {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, "the outbox relay could not read the outbox");
                    0
                }
            };
            if published as i64 == STEP {
                continue;
            }
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Rows not yet published.
    pub async fn pending(&self) -> crate::Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM rabbitry_outbox WHERE sent_at IS NULL")
            .fetch_one(self.store.read())
            .await?;
        Ok(row.try_get("n")?)
    }
}
