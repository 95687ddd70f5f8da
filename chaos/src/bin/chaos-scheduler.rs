//! The chaos suite's scheduler process: a runtime without workers running one cron schedule
//! that fires `chaos.tick` every second. Configured by the environment: `AMQP_URL`,
//! `RABBITRY_EXCHANGE`, `CHAOS_SCHEDULE` (the schedule's name). Prints `ready` once started
//! and rabbitry's scheduling log (which says when this process leads the schedule) on
//! standard output.

use std::process::ExitCode;

use rabbitry::{Event, Runtime, Schedule};
use serde::Serialize;

#[derive(Serialize)]
struct ChaosTick {
    tick_ms: i64,
}

impl Event for ChaosTick {
    const TYPE: &'static str = "chaos.tick";
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "warn,rabbitry::schedule=info",
        ))
        .with_writer(std::io::stdout)
        .with_ansi(false)
        .init();
    let name = std::env::var("CHAOS_SCHEDULE").unwrap_or_else(|_| "chaos-tick".into());
    let exchange = std::env::var("RABBITRY_EXCHANGE").unwrap_or_else(|_| "events".into());
    let schedule = match Schedule::new(&name, "* * * * * *", |tick| ChaosTick {
        tick_ms: tick.unix_ms(),
    }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match Runtime::builder()
        .exchange(exchange)
        .schedule(schedule)
        .start()
        .await
    {
        Ok(runtime) => {
            println!("ready");
            runtime.shutdown_on_signal().await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
