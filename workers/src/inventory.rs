//! Reserves stock for every item of a placed order.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rabbitry::prelude::*;
use tracing::info;

use crate::orders::{Item, OrderPlaced, StockReserved};

/// The inventory worker's queue.
pub const QUEUE: &str = "orders.inventory";

/// Why a reservation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StockError {
    /// The stock service could not be reached: worth retrying.
    Unavailable,
    /// Not enough of `sku` left: retrying will not help.
    OutOfStock {
        /// The item that ran out.
        sku: String,
    },
    /// The order's reservation was released (cancelled) before it was made.
    Cancelled,
}

impl fmt::Display for StockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StockError::Unavailable => f.write_str("stock service unavailable"),
            StockError::OutOfStock { sku } => write!(f, "out of stock: {sku}"),
            StockError::Cancelled => f.write_str("the order was cancelled"),
        }
    }
}

impl std::error::Error for StockError {}

/// An in-memory stock service: levels per SKU (unknown SKUs are unlimited), the
/// reservations made, and simulated outages.
#[derive(Debug, Clone, Default)]
pub struct Stock {
    levels: Arc<Mutex<HashMap<String, i64>>>,
    reserved: Arc<Mutex<Vec<u64>>>,
    /// Orders released: a reservation that arrives later is refused.
    cancelled: Arc<Mutex<std::collections::HashSet<u64>>>,
    unavailable: Arc<Mutex<Vec<u64>>>,
    outage: Arc<AtomicU32>,
}

impl Stock {
    /// Limit `sku` to `level` units.
    pub fn set_level(&self, sku: &str, level: i64) {
        self.levels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sku.to_owned(), level);
    }

    /// Make the next `calls` reservations fail as if the service were down.
    pub fn fail_next(&self, calls: u32) {
        self.outage.store(calls, Ordering::SeqCst);
    }

    /// The orders reserved so far, in order.
    pub fn reserved(&self) -> Vec<u64> {
        self.reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The orders whose reservation hit an outage, in order.
    pub fn unavailable(&self) -> Vec<u64> {
        self.unavailable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Give back the items reserved for `order_id` (nothing if it has no reservation), and
    /// refuse any reservation for it from now on.
    pub fn release(&self, order_id: u64, items: &[Item]) {
        self.cancelled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(order_id);
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(at) = reserved.iter().position(|id| *id == order_id) else {
            return;
        };
        reserved.remove(at);
        let mut levels = self.levels.lock().unwrap_or_else(|e| e.into_inner());
        for item in items {
            if let Some(level) = levels.get_mut(&item.sku) {
                *level += item.qty;
            }
        }
    }

    /// Reserve every item of an order, all or nothing; an order reserved already is not
    /// reserved twice (a redelivered request).
    pub fn reserve(&self, order_id: u64, items: &[Item]) -> Result<(), StockError> {
        let outage = self
            .outage
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if outage.is_ok() {
            self.unavailable
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(order_id);
            return Err(StockError::Unavailable);
        }
        if self
            .cancelled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&order_id)
        {
            return Err(StockError::Cancelled);
        }
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        if reserved.contains(&order_id) {
            // A redelivered request: reserved already, and only once.
            return Ok(());
        }
        let mut levels = self.levels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(item) = items
            .iter()
            .find(|i| levels.get(&i.sku).is_some_and(|level| *level < i.qty))
        {
            return Err(StockError::OutOfStock {
                sku: item.sku.clone(),
            });
        }
        for item in items {
            if let Some(level) = levels.get_mut(&item.sku) {
                *level -= item.qty;
            }
        }
        reserved.push(order_id);
        Ok(())
    }
}

/// Orders the inventory worker rejected, with the reason (they went to its dead-letter queue).
#[derive(Debug, Clone, Default)]
pub struct Rejections(Arc<Mutex<Vec<(u64, String)>>>);

impl Rejections {
    /// Every rejection so far, in order.
    pub fn list(&self) -> Vec<(u64, String)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Consumes `order.placed`: rejects orders with a quantity of 0 or less (to the dead-letter
/// queue, no retry), retries when the stock service is down, and publishes `stock.reserved`.
pub struct InventoryWorker {
    queue: String,
    stock: Stock,
    retry: RetryPolicy,
    rejections: Rejections,
}

impl InventoryWorker {
    /// An inventory worker on `queue` reserving from `stock`.
    pub fn new(queue: impl Into<String>, stock: Stock) -> InventoryWorker {
        InventoryWorker {
            queue: queue.into(),
            stock,
            retry: RetryPolicy::exponential(Duration::from_secs(1)).max_attempts(5),
            rejections: Rejections::default(),
        }
    }

    /// The orders this worker rejected.
    pub fn rejections(&self) -> Rejections {
        self.rejections.clone()
    }

    fn reject(&self, order_id: u64, reason: String) -> Outcome {
        self.rejections
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((order_id, reason.clone()));
        Err(Failure::reject(reason))
    }

    /// Use this retry policy instead of 1 s doubling, 5 attempts.
    pub fn retry(mut self, policy: RetryPolicy) -> InventoryWorker {
        self.retry = policy;
        self
    }
}

impl Worker for InventoryWorker {
    type Event = OrderPlaced;

    fn subscription(&self) -> Subscription {
        Subscription::new(&self.queue)
            .bind(OrderPlaced::TYPE)
            .retry(self.retry.clone())
    }

    async fn handle(&self, order: Delivery<OrderPlaced>, ctx: &Context) -> Outcome {
        if let Some(bad) = order.items.iter().find(|i| i.qty <= 0) {
            let reason = format!(
                "item {} has quantity {}; quantities must be positive",
                bad.sku, bad.qty
            );
            return self.reject(order.order_id, reason);
        }
        match self.stock.reserve(order.order_id, &order.items) {
            Ok(()) => {}
            Err(e @ (StockError::OutOfStock { .. } | StockError::Cancelled)) => {
                return self.reject(order.order_id, e.to_string());
            }
            Err(e @ StockError::Unavailable) => return Err(e.into()), // transient: retried
        }
        info!(
            order_id = order.order_id,
            attempt = order.attempt(),
            "stock reserved"
        );
        // Announce it whether or not anyone listens yet.
        let reserved = StockReserved {
            order_id: order.order_id,
        };
        ctx.message(&reserved).allow_unroutable().send().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(qty: i64) -> Vec<Item> {
        vec![Item {
            sku: "BOOK-1".into(),
            qty,
        }]
    }

    #[test]
    fn levels_are_enforced_all_or_nothing() {
        let stock = Stock::default();
        stock.set_level("BOOK-1", 3);
        assert_eq!(stock.reserve(1, &items(2)), Ok(()));
        assert_eq!(
            stock.reserve(2, &items(2)),
            Err(StockError::OutOfStock {
                sku: "BOOK-1".into()
            })
        );
        assert_eq!(stock.reserved(), [1]);
    }

    #[test]
    fn outages_fail_the_next_calls_only() {
        let stock = Stock::default();
        stock.fail_next(2);
        assert_eq!(stock.reserve(1, &items(1)), Err(StockError::Unavailable));
        assert_eq!(stock.reserve(1, &items(1)), Err(StockError::Unavailable));
        assert_eq!(stock.reserve(1, &items(1)), Ok(()));
    }
}
