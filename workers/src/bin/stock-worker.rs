//! Reserves and releases stock for the order-fulfilment saga (`stock.reserve`,
//! `stock.release`). `STOCK_LEVELS` limits SKUs, e.g. `BOOK-1=10,MUG-2=0`.

use std::process::ExitCode;

use rabbitry_workers::fulfilment::{STOCK_QUEUE, stock_worker};
use rabbitry_workers::inventory::Stock;
use rabbitry_workers::{Names, run_worker};

#[tokio::main]
async fn main() -> ExitCode {
    let stock = Stock::default();
    for level in std::env::var("STOCK_LEVELS").unwrap_or_default().split(',') {
        if let Some((sku, n)) = level.split_once('=')
            && let Ok(n) = n.trim().parse()
        {
            stock.set_level(sku.trim(), n);
        }
    }
    run_worker(stock_worker(&Names::from_env().queue(STOCK_QUEUE), stock)).await
}
