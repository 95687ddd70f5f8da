//! Order fulfilment as a saga: reserve stock and charge the payment for each placed order;
//! confirm when both succeed, compensate (release the stock, refund) when one fails, and
//! cancel when the order is not settled in time.
//!
//! ```text
//! order.placed ──► saga ──► stock.reserve ──► stock worker ──► stock.reservation.made | .refused
//!                       └─► payment.charge ─► payment worker ─► payment.charged | payment.declined
//!                       └─► order.timed-out (to itself, after 30 s, held by the broker)
//! both made/charged          ──► order.confirmed
//! declined, stock reserved   ──► stock.release ──► stock.reservation.released ──► order.cancelled
//! refused, payment charged   ──► payment.refund, order.cancelled
//! timed out                  ──► (release / refund what was done) ──► order.cancelled
//! ```

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rabbitry::prelude::*;
use rabbitry::{Router, Saga, SagaRepository, Step};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::inventory::{Stock, StockError};
use crate::orders::{Item, OrderPlaced};

/// The saga's queue (and its name in the store).
pub const SAGA_QUEUE: &str = "orders.fulfilment";
/// The stock worker's queue.
pub const STOCK_QUEUE: &str = "orders.stock";
/// The payment worker's queue.
pub const PAYMENT_QUEUE: &str = "orders.payment";
/// How long an order may take before the saga cancels it.
pub const TIMEOUT: Duration = Duration::from_secs(30);

macro_rules! event {
    ($(#[$doc:meta])* $name:ident = $type:literal { $($(#[$fdoc:meta])* $field:ident: $ty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: $ty,)*
        }
        impl Event for $name {
            const TYPE: &'static str = $type;
        }
    };
}

event!(
    /// Reserve every item of an order (to the stock worker).
    ReserveStock = "stock.reserve" {
        /// The order.
        order_id: u64,
        /// What to reserve.
        items: Vec<Item>,
    }
);
event!(
    /// The stock worker reserved the order's items.
    StockReservationMade = "stock.reservation.made" {
        /// The order.
        order_id: u64,
    }
);
event!(
    /// The stock worker could not reserve the order's items.
    StockReservationRefused = "stock.reservation.refused" {
        /// The order.
        order_id: u64,
        /// Why.
        reason: String,
    }
);
event!(
    /// Give back what was reserved for an order (compensation).
    ReleaseStock = "stock.release" {
        /// The order.
        order_id: u64,
        /// What was reserved.
        items: Vec<Item>,
    }
);
event!(
    /// The stock worker gave the order's items back.
    StockReservationReleased = "stock.reservation.released" {
        /// The order.
        order_id: u64,
    }
);
event!(
    /// Charge an order's total (to the payment worker).
    ChargePayment = "payment.charge" {
        /// The order.
        order_id: u64,
        /// How much.
        amount: f64,
    }
);
event!(
    /// The payment worker charged the order.
    PaymentCharged = "payment.charged" {
        /// The order.
        order_id: u64,
    }
);
event!(
    /// The payment worker's gateway declined the charge.
    PaymentDeclined = "payment.declined" {
        /// The order.
        order_id: u64,
        /// Why.
        reason: String,
    }
);
event!(
    /// Pay back a charge (compensation).
    RefundPayment = "payment.refund" {
        /// The order.
        order_id: u64,
        /// How much.
        amount: f64,
    }
);
event!(
    /// The order is reserved and paid.
    OrderConfirmed = "order.confirmed" {
        /// The order.
        order_id: u64,
    }
);
event!(
    /// The order will not be fulfilled; what was done for it is undone.
    OrderCancelled = "order.cancelled" {
        /// The order.
        order_id: u64,
        /// Why.
        reason: String,
    }
);
event!(
    /// The saga's own timeout: the order was not settled in time.
    OrderTimedOut = "order.timed-out" {
        /// The order.
        order_id: u64,
    }
);

/// Where one part of an order stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// Asked, no answer yet.
    #[default]
    Pending,
    /// Done.
    Done,
    /// Refused, with the reason.
    Failed(String),
    /// Being undone: the compensation was asked for.
    Releasing,
    /// Undone by compensation.
    Undone,
}

/// The saga's state for one order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Fulfilment {
    /// The order.
    pub order_id: u64,
    /// Its total.
    pub amount: f64,
    /// Its items (to release them).
    pub items: Vec<Item>,
    /// The stock reservation.
    pub stock: Part,
    /// The payment.
    pub payment: Part,
    /// Why it is being cancelled, once it is.
    pub cancelling: Option<String>,
    /// Whether its timeout fired before it was settled.
    pub timed_out: bool,
}

/// The order-fulfilment saga on [`SAGA_QUEUE`], keeping its instances in `repository`;
/// an order not settled within `timeout` is cancelled.
pub fn saga(
    repository: Arc<dyn SagaRepository>,
    queue: &str,
    timeout: Duration,
) -> Saga<Fulfilment> {
    let key = |order_id: u64| order_id.to_string();
    let subscription = Subscription::new(queue)
        .concurrency(16)
        .retry(RetryPolicy::exponential(Duration::from_millis(200)).max_attempts(8));
    Saga::with_repository(subscription, repository)
        .starts(
            move |o: &OrderPlaced| key(o.order_id),
            move |step: &mut Step<Fulfilment>, o: &Delivery<OrderPlaced>| {
                step.state.order_id = o.order_id;
                step.state.amount = o.total;
                step.state.items = o.items.clone();
                step.publish(&ReserveStock {
                    order_id: o.order_id,
                    items: o.items.clone(),
                })?;
                step.publish(&ChargePayment {
                    order_id: o.order_id,
                    amount: o.total,
                })?;
                step.schedule(
                    timeout,
                    &OrderTimedOut {
                        order_id: o.order_id,
                    },
                )?;
                step.set_status("reserving_and_charging");
                Ok(())
            },
        )
        .on(
            move |e: &StockReservationMade| key(e.order_id),
            |step: &mut Step<Fulfilment>, _: &Delivery<StockReservationMade>| {
                // Unless a release is already on its way.
                if step.state.stock == Part::Pending {
                    step.state.stock = Part::Done;
                }
                decide(step)
            },
        )
        .on(
            move |e: &StockReservationRefused| key(e.order_id),
            |step: &mut Step<Fulfilment>, e: &Delivery<StockReservationRefused>| {
                if step.state.stock == Part::Pending {
                    step.state.stock = Part::Failed(e.reason.clone());
                }
                decide(step)
            },
        )
        .on(
            move |e: &PaymentCharged| key(e.order_id),
            |step: &mut Step<Fulfilment>, _: &Delivery<PaymentCharged>| {
                if step.state.payment == Part::Pending {
                    step.state.payment = Part::Done;
                }
                decide(step)
            },
        )
        .on(
            move |e: &PaymentDeclined| key(e.order_id),
            |step: &mut Step<Fulfilment>, e: &Delivery<PaymentDeclined>| {
                if step.state.payment == Part::Pending {
                    step.state.payment = Part::Failed(e.reason.clone());
                }
                decide(step)
            },
        )
        .on(
            move |e: &StockReservationReleased| key(e.order_id),
            |step: &mut Step<Fulfilment>, _: &Delivery<StockReservationReleased>| {
                step.state.stock = Part::Undone;
                decide(step)
            },
        )
        .on(
            move |e: &OrderTimedOut| key(e.order_id),
            move |step: &mut Step<Fulfilment>, _: &Delivery<OrderTimedOut>| {
                step.state.timed_out = true;
                if step.state.cancelling.is_none() {
                    step.state.cancelling = Some(format!("not settled within {timeout:?}"));
                }
                decide(step)
            },
        )
}

/// What to do now that one part answered (or time ran out).
fn decide(step: &mut Step<Fulfilment>) -> Outcome {
    let order_id = step.state.order_id;
    if step.state.cancelling.is_none() {
        match (&step.state.stock, &step.state.payment) {
            (Part::Done, Part::Done) => {
                step.publish(&OrderConfirmed { order_id })?;
                step.complete("confirmed");
                return Ok(());
            }
            (Part::Failed(reason), _) | (_, Part::Failed(reason)) => {
                step.state.cancelling = Some(reason.clone());
            }
            // Still waiting for an answer.
            _ => return Ok(()),
        }
    }
    // Cancelling: undo what was done — after a timeout, also what may still be done: the
    // services refuse a reservation or a charge for an order they were told to undo, so a
    // late answer can leave nothing behind. Cancel once nothing is left to wait for.
    let timed_out = step.state.timed_out;
    let payment = &step.state.payment;
    if *payment == Part::Done || (*payment == Part::Pending && timed_out) {
        let refund = RefundPayment {
            order_id,
            amount: step.state.amount,
        };
        step.publish(&refund)?;
        step.state.payment = Part::Undone;
    }
    let release = match step.state.stock {
        Part::Done => true,
        Part::Pending => timed_out,
        _ => false,
    };
    if release {
        let release = ReleaseStock {
            order_id,
            items: step.state.items.clone(),
        };
        step.publish(&release)?;
        step.state.stock = Part::Releasing;
        step.set_status("compensating");
    }
    if step.state.stock == Part::Releasing {
        return Ok(()); // until the stock worker says it is released
    }
    if step.state.stock == Part::Pending || step.state.payment == Part::Pending {
        // The other part may still succeed and then need undoing: wait for its answer
        // (or the timeout).
        step.set_status("cancelling");
        return Ok(());
    }
    let reason = step.state.cancelling.clone().unwrap_or_default();
    step.publish(&OrderCancelled { order_id, reason })?;
    let status = if timed_out { "timed_out" } else { "cancelled" };
    step.complete(status);
    Ok(())
}

/// Serves `stock.reserve` and `stock.release` from a [`Stock`] service: reservations that
/// find the service down are retried; refused ones answer `stock.reservation.refused`.
pub fn stock_worker(queue: &str, stock: Stock) -> Router {
    let releasing = stock.clone();
    Router::new(
        Subscription::new(queue)
            .retry(RetryPolicy::exponential(Duration::from_millis(500)).max_attempts(5)),
    )
    .on(move |r: Delivery<ReserveStock>, ctx: Context| {
        let stock = stock.clone();
        async move {
            if let Some(bad) = r.items.iter().find(|i| i.qty <= 0) {
                let reason = format!("item {} has quantity {}", bad.sku, bad.qty);
                let refused = StockReservationRefused {
                    order_id: r.order_id,
                    reason,
                };
                ctx.message(&refused).allow_unroutable().send().await?;
                return Ok(());
            }
            match stock.reserve(r.order_id, &r.items) {
                Ok(()) => {
                    info!(order_id = r.order_id, "stock reserved");
                    ctx.message(&StockReservationMade {
                        order_id: r.order_id,
                    })
                    .allow_unroutable()
                    .send()
                    .await?;
                }
                Err(StockError::Unavailable) => return Err(StockError::Unavailable.into()),
                Err(e) => {
                    let refused = StockReservationRefused {
                        order_id: r.order_id,
                        reason: e.to_string(),
                    };
                    ctx.message(&refused).allow_unroutable().send().await?;
                }
            }
            Ok(())
        }
    })
    .on(move |r: Delivery<ReleaseStock>, ctx: Context| {
        let stock = releasing.clone();
        async move {
            stock.release(r.order_id, &r.items);
            info!(order_id = r.order_id, "stock released");
            ctx.message(&StockReservationReleased {
                order_id: r.order_id,
            })
            .allow_unroutable()
            .send()
            .await?;
            Ok(())
        }
    })
}

/// A pretend payment gateway: declines charges over a limit, and never answers for the
/// orders it is told to lose (so that their saga times out).
#[derive(Debug, Clone, Default)]
pub struct Payments {
    inner: Arc<Mutex<PaymentsState>>,
}

#[derive(Debug, Default)]
struct PaymentsState {
    limit: Option<f64>,
    lost: HashSet<u64>,
    /// Orders refunded before they were charged: a later charge is declined.
    voided: HashSet<u64>,
    charged: Vec<u64>,
    refunded: Vec<u64>,
}

impl Payments {
    fn state(&self) -> std::sync::MutexGuard<'_, PaymentsState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decline charges over `limit`.
    pub fn decline_over(&self, limit: f64) {
        self.state().limit = Some(limit);
    }

    /// Never answer a charge for `order_id`.
    pub fn lose(&self, order_id: u64) {
        self.state().lost.insert(order_id);
    }

    /// The orders charged, in order.
    pub fn charged(&self) -> Vec<u64> {
        self.state().charged.clone()
    }

    /// The orders refunded, in order.
    pub fn refunded(&self) -> Vec<u64> {
        self.state().refunded.clone()
    }
}

/// Serves `payment.charge` and `payment.refund` from [`Payments`].
pub fn payment_worker(queue: &str, payments: Payments) -> Router {
    let refunds = payments.clone();
    Router::new(Subscription::new(queue))
        .on(move |c: Delivery<ChargePayment>, ctx: Context| {
            let payments = payments.clone();
            async move {
                let declined = {
                    let mut state = payments.state();
                    if state.lost.contains(&c.order_id) {
                        info!(order_id = c.order_id, "the gateway lost the charge");
                        return Ok(());
                    }
                    match state.limit {
                        _ if state.voided.contains(&c.order_id) => {
                            Some("the order was cancelled".to_owned())
                        }
                        Some(limit) if c.amount > limit => Some(format!(
                            "{:.2} is over the card's limit of {limit:.2}",
                            c.amount
                        )),
                        _ => {
                            // A redelivered charge is not charged twice.
                            if !state.charged.contains(&c.order_id) {
                                state.charged.push(c.order_id);
                            }
                            None
                        }
                    }
                };
                match declined {
                    None => {
                        ctx.message(&PaymentCharged {
                            order_id: c.order_id,
                        })
                        .allow_unroutable()
                        .send()
                        .await?
                    }
                    Some(reason) => {
                        ctx.message(&PaymentDeclined {
                            order_id: c.order_id,
                            reason,
                        })
                        .allow_unroutable()
                        .send()
                        .await?
                    }
                };
                Ok(())
            }
        })
        .on(move |r: Delivery<RefundPayment>, _ctx: Context| {
            let payments = refunds.clone();
            async move {
                let mut state = payments.state();
                match state.charged.contains(&r.order_id) {
                    true => state.refunded.push(r.order_id),
                    // Nothing to pay back; a charge arriving later is declined.
                    false => {
                        state.voided.insert(r.order_id);
                    }
                }
                Ok(())
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rabbitry::MemorySagaRepository;
    use rabbitry::testing::TestBroker;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn an_order_is_confirmed_compensated_or_timed_out() {
        let broker = TestBroker::new();
        let repository = Arc::new(MemorySagaRepository::new());
        let stock = Stock::default();
        let payments = Payments::default();
        payments.decline_over(1000.0);
        payments.lose(3);
        let rt = broker
            .runtime()
            .worker(saga(repository.clone(), SAGA_QUEUE, TIMEOUT))
            .worker(stock_worker(STOCK_QUEUE, stock.clone()))
            .worker(payment_worker(PAYMENT_QUEUE, payments.clone()))
            .start()
            .await
            .unwrap();
        let publisher = broker.publisher().await.unwrap();
        let start = Instant::now();
        let mut expensive = OrderPlaced::sample(2);
        expensive.total = 5000.0;
        for order in [OrderPlaced::sample(1), expensive, OrderPlaced::sample(3)] {
            publisher.publish(&order).await.unwrap();
        }
        broker.idle().await;

        let confirmed: Vec<OrderConfirmed> = broker.published("order.confirmed");
        assert_eq!(confirmed, [OrderConfirmed { order_id: 1 }]);
        let cancelled: Vec<OrderCancelled> = broker.published("order.cancelled");
        assert_eq!(cancelled.len(), 2, "{cancelled:?}");
        assert_eq!(cancelled[0].order_id, 2);
        assert!(
            cancelled[0].reason.contains("over the card's limit"),
            "{cancelled:?}"
        );
        assert_eq!(cancelled[1].order_id, 3);
        assert_eq!(cancelled[1].reason, "not settled within 30s");
        // Compensation: both declined and timed-out orders gave their stock back.
        let released: Vec<ReleaseStock> = broker.published("stock.release");
        assert_eq!(
            released.iter().map(|r| r.order_id).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(stock.reserved(), [1]);
        assert_eq!(payments.charged(), [1]);
        // The timeout fired exactly 30 s after the order, in paused time.
        let timed_out = broker
            .handled(SAGA_QUEUE)
            .into_iter()
            .find(|r| r.event_type == OrderTimedOut::TYPE)
            .unwrap();
        assert_eq!(timed_out.at - start, TIMEOUT);

        let records = repository.records(SAGA_QUEUE);
        let statuses: Vec<(&str, &str, bool)> = records
            .iter()
            .map(|r| (r.key.as_str(), r.status.as_str(), r.completed))
            .collect();
        assert_eq!(
            statuses,
            [
                ("1", "confirmed", true),
                ("2", "cancelled", true),
                ("3", "timed_out", true)
            ]
        );
        assert!(records.iter().all(|r| r.pending.is_empty()));
        let state: Fulfilment = serde_json::from_value(records[1].state.clone()).unwrap();
        assert_eq!(
            (state.stock, state.payment),
            (
                Part::Undone,
                Part::Failed("5000.00 is over the card's limit of 1000.00".into())
            )
        );
        rt.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_charge_that_answers_after_the_timeout_is_paid_back() {
        let broker = TestBroker::new();
        let repository = Arc::new(MemorySagaRepository::new());
        let stock = Stock::default();
        let payments = Payments::default();
        let rt = broker
            .runtime()
            .worker(saga(repository.clone(), SAGA_QUEUE, TIMEOUT))
            .worker(stock_worker(STOCK_QUEUE, stock.clone()))
            .worker(payment_worker(PAYMENT_QUEUE, payments.clone()))
            .start()
            .await
            .unwrap();
        // The payment service is stuck until the order has timed out.
        rt.pause(PAYMENT_QUEUE).await.unwrap();
        broker.publish(&OrderPlaced::sample(4)).await.unwrap();
        tokio::time::sleep(TIMEOUT + Duration::from_secs(1)).await;
        rt.resume(PAYMENT_QUEUE).await.unwrap();
        broker.idle().await;
        // The late charge went through and was paid back; the stock was released.
        assert_eq!(payments.charged(), [4]);
        assert_eq!(payments.refunded(), [4]);
        assert!(stock.reserved().is_empty());
        let record = &repository.records(SAGA_QUEUE)[0];
        assert_eq!(
            (record.status.as_str(), record.completed),
            ("timed_out", true)
        );
        let cancelled: Vec<OrderCancelled> = broker.published("order.cancelled");
        assert_eq!(cancelled.len(), 1);
        rt.shutdown().await;
    }
}
