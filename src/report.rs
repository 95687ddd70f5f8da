//! Handling reports: what runtimes tell the store's keeper about each settled delivery,
//! through the broker, so that workers on many hosts need no database of their own.

use serde::{Deserialize, Serialize};

use crate::event::Event;

/// The exchange (topic, durable) runtimes send [`HandlingReport`]s to and the keeper reads.
pub const REPORTS_EXCHANGE: &str = "rabbitry.reports";

/// The routing key of handling reports on [`REPORTS_EXCHANGE`].
pub const HANDLINGS_KEY: &str = "handlings";

/// A batch of settled deliveries from one process: one message per about a hundred
/// outcomes. JSON on the wire; published as the event type `rabbitry.handlings`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HandlingReport {
    /// The process that handled them (host and process id).
    pub host: String,
    /// The settled deliveries, in the order they were settled.
    pub handlings: Vec<ReportedHandling>,
}

impl HandlingReport {
    /// A report from `host`.
    pub fn new(host: impl Into<String>, handlings: Vec<ReportedHandling>) -> HandlingReport {
        HandlingReport {
            host: host.into(),
            handlings,
        }
    }
}

impl Event for HandlingReport {
    const TYPE: &'static str = "rabbitry.handlings";
}

/// One settled delivery in a [`HandlingReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReportedHandling {
    /// The report's own id (a report received twice is recorded once).
    pub id: String,
    /// The worker (its queue).
    pub worker: String,
    /// The message id.
    pub message_id: String,
    /// The attempt (1 for the first delivery).
    pub attempt: u32,
    /// `handled`, `skipped`, `retried`, `dead_lettered`, `requeued` or `deferred`.
    pub outcome: String,
    /// Why: a skip's, a deferral's or a failure's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Time in the worker's stack, in microseconds.
    pub duration_us: u64,
    /// When it was settled, in Unix milliseconds.
    pub handled_at: i64,
}

impl ReportedHandling {
    /// One settled delivery (no reason until set).
    pub fn new(
        id: impl Into<String>,
        worker: impl Into<String>,
        message_id: impl Into<String>,
        attempt: u32,
        outcome: impl Into<String>,
        duration_us: u64,
        handled_at: i64,
    ) -> ReportedHandling {
        ReportedHandling {
            id: id.into(),
            worker: worker.into(),
            message_id: message_id.into(),
            attempt,
            outcome: outcome.into(),
            reason: None,
            duration_us,
            handled_at,
        }
    }
}
