//! What the store holds, as Rust values.

use rabbitry::lapin::BasicProperties;
use rabbitry::lapin::types::FieldTable;
use serde::Serialize;

/// One event published to the exchange, as the audit recorded it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct StoredEvent {
    /// Its place in the store (ascending in recording order); 0 before it is stored.
    pub seq: i64,
    /// The message id (unique in the store).
    pub message_id: String,
    /// The AMQP `type` (the event type).
    pub event_type: String,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its AMQP properties (headers included), exactly as published: it can be published
    /// again as it was. Its correlation id, source (`app_id`) and timestamp are also
    /// stored in columns of their own, for filtering.
    #[serde(serialize_with = "properties_as_json")]
    pub properties: BasicProperties,
    /// Its body.
    #[serde(serialize_with = "body_as_text")]
    pub body: Vec<u8>,
    /// When the store recorded it, in Unix milliseconds.
    pub recorded_at: i64,
}

impl StoredEvent {
    /// An event to record (`seq` and `recorded_at` are set by the store).
    pub fn new(
        message_id: impl Into<String>,
        event_type: impl Into<String>,
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        body: impl Into<Vec<u8>>,
    ) -> StoredEvent {
        StoredEvent {
            seq: 0,
            message_id: message_id.into(),
            event_type: event_type.into(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            properties: BasicProperties::default(),
            body: body.into(),
            recorded_at: 0,
        }
    }

    /// Its correlation id.
    pub fn correlation_id(&self) -> Option<&str> {
        self.properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str())
    }

    /// Who published it (the AMQP `app_id`).
    pub fn source(&self) -> Option<&str> {
        self.properties.app_id().as_ref().map(|a| a.as_str())
    }

    /// The AMQP timestamp, in Unix milliseconds (second precision), if it had one.
    pub fn published_at(&self) -> Option<i64> {
        self.properties
            .timestamp()
            .and_then(|secs| i64::try_from(secs).ok())
            .map(|secs| secs.saturating_mul(1000))
    }

    /// Its headers.
    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }
}

/// How one worker handled one delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct HandlingRecord {
    /// The report's own id (a retried report is recorded once).
    pub id: String,
    /// The worker (its queue).
    pub worker: String,
    /// The message.
    pub message_id: String,
    /// The attempt (1 for the first delivery).
    pub attempt: u32,
    /// `handled`, `skipped`, `retried`, `dead_lettered`, `requeued` or `deferred`.
    pub outcome: String,
    /// Why (a skip's or a failure's reason).
    pub reason: Option<String>,
    /// Time in the worker's stack, in microseconds.
    pub duration_us: i64,
    /// When it was settled, in Unix milliseconds.
    pub handled_at: i64,
    /// The host (or process) that handled it.
    pub host: String,
}

impl HandlingRecord {
    /// A handling report (`reason` empty, `duration_us` 0 until set).
    pub fn new(
        id: impl Into<String>,
        worker: impl Into<String>,
        message_id: impl Into<String>,
        attempt: u32,
        outcome: impl Into<String>,
        handled_at: i64,
        host: impl Into<String>,
    ) -> HandlingRecord {
        HandlingRecord {
            id: id.into(),
            worker: worker.into(),
            message_id: message_id.into(),
            attempt,
            outcome: outcome.into(),
            reason: None,
            duration_us: 0,
            handled_at,
            host: host.into(),
        }
    }
}

/// Where a dead letter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeadLetterState {
    /// In the store, waiting for a decision.
    Waiting,
    /// Sent back to its worker's queue.
    Redriven,
    /// Thrown away.
    Purged,
}

impl DeadLetterState {
    /// `waiting`, `redriven` or `purged`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterState::Waiting => "waiting",
            DeadLetterState::Redriven => "redriven",
            DeadLetterState::Purged => "purged",
        }
    }

    pub(crate) fn parse(s: &str) -> DeadLetterState {
        match s {
            "redriven" => DeadLetterState::Redriven,
            "purged" => DeadLetterState::Purged,
            _ => DeadLetterState::Waiting,
        }
    }
}

/// A message a worker dead-lettered, kept with its failure.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its place in the store; 0 before it is stored. The id the CLI and API use.
    pub seq: i64,
    /// The worker that gave up on it.
    pub worker: String,
    /// The message id.
    pub message_id: String,
    /// When it was dead-lettered (`x-last-failure-at`): with the worker and the message id,
    /// what makes one dead-lettering unique (a message redriven and failing again is a
    /// second dead letter).
    pub failed_at: String,
    /// The event type.
    pub event_type: String,
    /// The exchange it was first published to (`x-original-exchange`).
    pub exchange: String,
    /// Its original routing key (`x-original-routing-key`).
    pub routing_key: String,
    /// The failure's kind (`x-exception-kind`).
    pub kind: Option<String>,
    /// The failure's message (`x-exception-message`).
    pub reason: Option<String>,
    /// Its AMQP properties as dead-lettered (failure headers included), exactly.
    #[serde(serialize_with = "properties_as_json")]
    pub properties: BasicProperties,
    /// Its body.
    #[serde(serialize_with = "body_as_text")]
    pub body: Vec<u8>,
    /// When the store recorded it, in Unix milliseconds.
    pub recorded_at: i64,
    /// Where it stands.
    pub state: DeadLetterState,
    /// When its state last changed, in Unix milliseconds.
    pub state_changed_at: Option<i64>,
}

impl DeadLetter {
    /// A dead letter to keep (exchange and routing key empty, no failure, until set).
    pub fn new(
        worker: impl Into<String>,
        message_id: impl Into<String>,
        failed_at: impl Into<String>,
        event_type: impl Into<String>,
        body: impl Into<Vec<u8>>,
    ) -> DeadLetter {
        DeadLetter {
            seq: 0,
            worker: worker.into(),
            message_id: message_id.into(),
            failed_at: failed_at.into(),
            event_type: event_type.into(),
            exchange: String::new(),
            routing_key: String::new(),
            kind: None,
            reason: None,
            properties: BasicProperties::default(),
            body: body.into(),
            recorded_at: 0,
            state: DeadLetterState::Waiting,
            state_changed_at: None,
        }
    }
}

/// Which events to list (every filter is optional; newest last).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct EventFilter {
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only events recorded at or after this time (Unix milliseconds).
    pub since: Option<i64>,
    /// Only events with this correlation id.
    pub correlation_id: Option<String>,
    /// At most this many (default 100).
    pub limit: Option<u32>,
}

impl EventFilter {
    /// Every event (up to the default limit).
    pub fn new() -> EventFilter {
        EventFilter::default()
    }

    /// Only `event_type`.
    pub fn event_type(mut self, event_type: impl Into<String>) -> EventFilter {
        self.event_type = Some(event_type.into());
        self
    }

    /// Only events recorded at or after `since` (Unix milliseconds).
    pub fn since(mut self, since: i64) -> EventFilter {
        self.since = Some(since);
        self
    }

    /// Only events with `correlation_id`.
    pub fn correlation_id(mut self, correlation_id: impl Into<String>) -> EventFilter {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// At most `limit` events.
    pub fn limit(mut self, limit: u32) -> EventFilter {
        self.limit = Some(limit);
        self
    }
}

/// Properties in JSON output: serde's form of them (types included).
fn properties_as_json<S: serde::Serializer>(p: &BasicProperties, s: S) -> Result<S::Ok, S::Error> {
    p.serialize(s)
}

/// A body in JSON output: as text when it is UTF-8 (JSON events are), else as bytes.
fn body_as_text<S: serde::Serializer>(body: &[u8], s: S) -> Result<S::Ok, S::Error> {
    match std::str::from_utf8(body) {
        Ok(text) => s.serialize_str(text),
        Err(_) => s.collect_seq(body),
    }
}
