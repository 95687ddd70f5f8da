//! The chaos suite's worker process. Configured by the environment: `AMQP_URL`,
//! `RABBITRY_EXCHANGE`, `CHAOS_QUEUE`, `CHAOS_LEDGER` (required), `CHAOS_DELAY_MS`,
//! `CHAOS_CONCURRENCY`, `CHAOS_PREFETCH`. Prints `ready` once consuming, and progress lines.

use std::process::ExitCode;
use std::time::Duration;

use rabbitry::Runtime;
use rabbitry_chaos::{ChaosConfig, ChaosWorker};

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn number<T: std::str::FromStr>(name: &str, default: T) -> T {
    var(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let (Some(queue), Some(ledger)) = (var("CHAOS_QUEUE"), var("CHAOS_LEDGER")) else {
        eprintln!("error: CHAOS_QUEUE and CHAOS_LEDGER must be set");
        return ExitCode::FAILURE;
    };
    let mut config = ChaosConfig::new(queue, ledger);
    config.delay = Duration::from_millis(number("CHAOS_DELAY_MS", 0));
    config.concurrency = number("CHAOS_CONCURRENCY", config.concurrency);
    config.prefetch = number("CHAOS_PREFETCH", config.prefetch);
    config.report = true;
    let worker = match ChaosWorker::new(config) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: cannot open the ledger: {e}");
            return ExitCode::FAILURE;
        }
    };
    let exchange = var("RABBITRY_EXCHANGE").unwrap_or_else(|| "events".into());
    match Runtime::builder()
        .exchange(exchange)
        .worker(worker)
        .start()
        .await
    {
        Ok(runtime) => {
            println!("ready");
            runtime.shutdown_on_signal().await;
            println!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
