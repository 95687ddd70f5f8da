//! Counts order events by type.

use std::process::ExitCode;

use rabbitry_workers::analytics::{AnalyticsWorker, QUEUE, Stats};
use rabbitry_workers::{Names, run_worker};

#[tokio::main]
async fn main() -> ExitCode {
    run_worker(AnalyticsWorker::new(
        Names::from_env().queue(QUEUE),
        Stats::default(),
    ))
    .await
}
