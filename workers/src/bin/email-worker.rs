//! Sends order confirmation emails. `EMAIL_SEND_MS` sets the simulated sending time.

use std::process::ExitCode;
use std::time::Duration;

use rabbitry_workers::email::{EmailWorker, Outbox, QUEUE};
use rabbitry_workers::{Names, run_worker};

#[tokio::main]
async fn main() -> ExitCode {
    let send_ms = std::env::var("EMAIL_SEND_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let worker = EmailWorker::new(Names::from_env().queue(QUEUE), Outbox::default())
        .send_time(Duration::from_millis(send_ms));
    run_worker(worker).await
}
