//! Sends an order confirmation email for every placed order, high priority first.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rabbitry::prelude::*;
use tracing::info;

use crate::orders::OrderPlaced;

/// The email worker's queue.
pub const QUEUE: &str = "orders.email";

/// A confirmation email that was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentEmail {
    /// The order confirmed.
    pub order_id: u64,
    /// The recipient.
    pub user_id: u64,
    /// The message priority it arrived with.
    pub priority: Option<u8>,
}

/// Where sent emails are recorded, in sending order (the demo's stand-in for an SMTP server).
#[derive(Debug, Clone, Default)]
pub struct Outbox(Arc<Mutex<Vec<SentEmail>>>);

impl Outbox {
    /// Every email sent so far.
    pub fn sent(&self) -> Vec<SentEmail> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, email: SentEmail) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(email);
    }
}

/// Consumes `order.placed` from a priority queue (max priority 10), one at a time so that a
/// waiting high-priority order is always next.
pub struct EmailWorker {
    queue: String,
    outbox: Outbox,
    send_time: Duration,
}

impl EmailWorker {
    /// An email worker on `queue` recording into `outbox`.
    pub fn new(queue: impl Into<String>, outbox: Outbox) -> EmailWorker {
        EmailWorker {
            queue: queue.into(),
            outbox,
            send_time: Duration::ZERO,
        }
    }

    /// Pretend that sending an email takes this long.
    pub fn send_time(mut self, send_time: Duration) -> EmailWorker {
        self.send_time = send_time;
        self
    }
}

impl Worker for EmailWorker {
    type Event = OrderPlaced;

    fn subscription(&self) -> Subscription {
        // Priority only reorders messages waiting in the queue: a prefetch of 1 keeps them there.
        Subscription::new(&self.queue)
            .bind(OrderPlaced::TYPE)
            .max_priority(10)
            .prefetch(1)
            .concurrency(1)
    }

    async fn handle(&self, order: Delivery<OrderPlaced>, _ctx: &Context) -> Outcome {
        if !self.send_time.is_zero() {
            tokio::time::sleep(self.send_time).await;
        }
        info!(order_id = order.order_id, user_id = order.user_id, priority = ?order.priority(), "confirmation email sent");
        self.outbox.record(SentEmail {
            order_id: order.order_id,
            user_id: order.user_id,
            priority: order.priority(),
        });
        Ok(())
    }
}
