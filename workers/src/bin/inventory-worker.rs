//! Reserves stock for placed orders. `STOCK_OUTAGE_CALLS` makes the first N reservations
//! fail as if the stock service were down (they are retried).

use std::process::ExitCode;

use rabbitry_workers::inventory::{InventoryWorker, QUEUE, Stock};
use rabbitry_workers::{Names, run_worker};

#[tokio::main]
async fn main() -> ExitCode {
    let stock = Stock::default();
    if let Some(calls) = std::env::var("STOCK_OUTAGE_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        stock.fail_next(calls);
    }
    run_worker(InventoryWorker::new(Names::from_env().queue(QUEUE), stock)).await
}
