//! The events of the order domain.

use rabbitry::Event;
use serde::{Deserialize, Serialize};

/// A customer placed an order. Unknown extra fields in incoming JSON are ignored.
///
/// ```json
/// {"order_id": 1001, "user_id": 42, "total": 59.9, "items": [{"sku": "BOOK-1", "qty": 2}]}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderPlaced {
    /// The order's id.
    pub order_id: u64,
    /// Who ordered.
    pub user_id: u64,
    /// The order total.
    pub total: f64,
    /// What was ordered.
    pub items: Vec<Item>,
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// The stock-keeping unit.
    pub sku: String,
    /// How many; must be positive, which the inventory worker checks.
    pub qty: i64,
}

impl Event for OrderPlaced {
    const TYPE: &'static str = "order.placed";
}

impl OrderPlaced {
    /// The demo's sample order with the given id.
    pub fn sample(order_id: u64) -> OrderPlaced {
        OrderPlaced {
            order_id,
            user_id: 42,
            total: 59.9,
            items: vec![Item {
                sku: "BOOK-1".into(),
                qty: 2,
            }],
        }
    }
}

/// Stock was reserved for every item of an order (published by the inventory worker).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockReserved {
    /// The order whose items were reserved.
    pub order_id: u64,
}

impl Event for StockReserved {
    const TYPE: &'static str = "stock.reserved";
}
