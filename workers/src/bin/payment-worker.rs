//! Charges and refunds for the order-fulfilment saga (`payment.charge`, `payment.refund`),
//! through a pretend gateway that declines charges over `PAYMENT_LIMIT` (default 1000) and
//! never answers for order ids listed in `PAYMENT_LOSE` (comma-separated).

use std::process::ExitCode;

use rabbitry_workers::fulfilment::{PAYMENT_QUEUE, Payments, payment_worker};
use rabbitry_workers::{Names, run_worker};

#[tokio::main]
async fn main() -> ExitCode {
    let payments = Payments::default();
    let limit = std::env::var("PAYMENT_LIMIT")
        .ok()
        .and_then(|v| v.parse().ok());
    payments.decline_over(limit.unwrap_or(1000.0));
    for id in std::env::var("PAYMENT_LOSE").unwrap_or_default().split(',') {
        if let Ok(id) = id.trim().parse() {
            payments.lose(id);
        }
    }
    run_worker(payment_worker(
        &Names::from_env().queue(PAYMENT_QUEUE),
        payments,
    ))
    .await
}
