//! The order-fulfilment saga (see `rabbitry_workers::fulfilment`), its instances kept in the
//! store at `RABBITRY_STORE` (default `sqlite://rabbitry.db`). `RABBITRY_SAGA_TIMEOUT_MS`
//! shortens the 30 s within which an order must be settled.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use rabbitry_store::{SagaStore, Store};
use rabbitry_workers::fulfilment::{SAGA_QUEUE, TIMEOUT, saga};
use rabbitry_workers::{Names, run_worker};

#[tokio::main]
async fn main() -> ExitCode {
    let url = std::env::var("RABBITRY_STORE").unwrap_or_else(|_| "sqlite://rabbitry.db".into());
    let store = match Store::connect(&url).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let timeout = std::env::var("RABBITRY_SAGA_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(TIMEOUT, Duration::from_millis);
    let queue = Names::from_env().queue(SAGA_QUEUE);
    let code = run_worker(saga(
        Arc::new(SagaStore::new(store.clone())),
        &queue,
        timeout,
    ))
    .await;
    store.close().await;
    code
}
