//! Counts every order event by type, and revenue from placed orders.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rabbitry::prelude::*;
use serde_json::Value;
use tracing::info;

/// The analytics worker's queue.
pub const QUEUE: &str = "orders.analytics";

/// Running totals.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    /// Events seen per event type.
    pub events: BTreeMap<String, u64>,
    /// Sum of `total` over `order.placed` events.
    pub revenue: f64,
}

/// Shared view of the totals.
#[derive(Debug, Clone, Default)]
pub struct Stats(Arc<Mutex<Totals>>);

impl Stats {
    /// A copy of the totals so far.
    pub fn totals(&self) -> Totals {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Consumes every `order.*` event as plain JSON, whatever its shape.
pub struct AnalyticsWorker {
    queue: String,
    stats: Stats,
}

impl AnalyticsWorker {
    /// An analytics worker on `queue` counting into `stats`.
    pub fn new(queue: impl Into<String>, stats: Stats) -> AnalyticsWorker {
        AnalyticsWorker {
            queue: queue.into(),
            stats,
        }
    }
}

impl Worker for AnalyticsWorker {
    type Event = Value;

    fn subscription(&self) -> Subscription {
        Subscription::new(&self.queue)
            .bind("order.*")
            .prefetch(100)
            .concurrency(4)
    }

    async fn handle(&self, event: Delivery<Value>, _ctx: &Context) -> Outcome {
        let mut totals = self.stats.0.lock().unwrap_or_else(|e| e.into_inner());
        *totals
            .events
            .entry(event.event_type().to_owned())
            .or_default() += 1;
        if event.event_type() == "order.placed" {
            totals.revenue += event.get("total").and_then(Value::as_f64).unwrap_or(0.0);
        }
        info!(event_type = event.event_type(), "event counted");
        Ok(())
    }
}
