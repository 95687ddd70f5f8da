//! The order domain of the rabbitry demo: three workers sharing the exchange `events`.
//!
//! | binary | queue | consumes |
//! |---|---|---|
//! | `email-worker` | `orders.email` (priority, max 10) | `order.placed` |
//! | `inventory-worker` | `orders.inventory` | `order.placed`; rejects quantities ≤ 0, retries stock outages |
//! | `analytics-worker` | `orders.analytics` | `order.*` |
//! | `order-producer` | — | publishes sample orders |
//!
//! Every binary reads `AMQP_URL`, and for running several isolated copies on one broker,
//! `RABBITRY_EXCHANGE` (default `events`) and `RABBITRY_QUEUE_PREFIX` (default empty).
//! `--plan` prints what a worker would declare and exits.
//!
//! Observability ([`rabbitry_observe`]): the workers serve `/metrics`, `/health` and
//! `/ready` on `RABBITRY_HTTP_ADDR` when it is set; every binary logs JSON lines with
//! `RABBITRY_LOG_FORMAT=json`, propagates W3C trace context, and exports spans over OTLP
//! when built with the `otlp` feature and `OTEL_EXPORTER_OTLP_ENDPOINT` is set. The workers
//! send handling reports to the store's keeper (`rabbitry.reports`).

pub mod analytics;
pub mod email;
pub mod fulfilment;
pub mod inventory;
pub mod orders;

use std::process::ExitCode;

use rabbitry::control::Control;
use rabbitry::prelude::*;
use rabbitry_observe::{HandlingReports, Observability, RuntimeBuilderExt, Telemetry};
use rabbitry_store::Store;

/// Exchange and queue names, from the environment.
#[derive(Debug, Clone)]
pub struct Names {
    /// The topic exchange.
    pub exchange: String,
    /// Prepended to every queue name.
    pub queue_prefix: String,
}

impl Names {
    /// `RABBITRY_EXCHANGE` (default `events`) and `RABBITRY_QUEUE_PREFIX` (default empty).
    pub fn from_env() -> Names {
        Names {
            exchange: std::env::var("RABBITRY_EXCHANGE").unwrap_or_else(|_| "events".into()),
            queue_prefix: std::env::var("RABBITRY_QUEUE_PREFIX").unwrap_or_default(),
        }
    }

    /// A queue name with the prefix.
    pub fn queue(&self, name: &str) -> String {
        format!("{}{name}", self.queue_prefix)
    }
}

/// Log to stderr, at `level` unless `RUST_LOG` says otherwise.
pub fn init_tracing_at(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Logs and traces configured by the environment (see [`Telemetry::init`]), for the
/// binary named `service`. Keep the value until the process ends.
pub fn init_telemetry(service: &str) -> rabbitry::Result<Telemetry> {
    Telemetry::init(service)
}

/// The running binary's name, for logs and traces.
pub fn binary_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "rabbitry-worker".into())
}

/// Run one worker until SIGINT or SIGTERM: `--plan` prints the topology instead. Prints
/// `ready` on stdout once consuming. Serves `/metrics`, `/health` and `/ready` on
/// `RABBITRY_HTTP_ADDR` when set. Exits 0 after a graceful shutdown, 1 on a startup error
/// (a bad setting included).
pub async fn run_worker(worker: impl Into<rabbitry::Registration>) -> ExitCode {
    let _telemetry = match init_telemetry(&binary_name()) {
        Ok(telemetry) => telemetry,
        Err(e) => return fail(e),
    };
    let observability = match Observability::from_env() {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let names = Names::from_env();
    let builder = Runtime::builder()
        .exchange(names.exchange)
        .worker(worker)
        .observability(&observability);
    // Pause, resume and rebinding through `rabbitry serve`; with a store, started in the
    // registered state.
    let builder = match std::env::var("RABBITRY_STORE") {
        Ok(store) if !std::env::args().any(|a| a == "--plan") => match Store::connect(&store).await
        {
            Ok(store) => builder.control(Control::new().registry(store)),
            Err(e) => return fail(rabbitry::Error::Control(e.to_string())),
        },
        _ => builder.control(Control::new()),
    };
    if std::env::args().any(|a| a == "--plan") {
        return match builder.plan() {
            Ok(plan) => {
                print!("{plan}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        };
    }
    // Served while connecting too: /health answers, /ready says 503 until consuming.
    if let Err(e) = observability.serve().await {
        return fail(e);
    }
    // Every outcome goes to the store's keeper, if one runs (rabbitry serve).
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| rabbitry::DEFAULT_URL.into());
    let reports = match HandlingReports::start(&url) {
        Ok(reports) => reports,
        Err(e) => return fail(e),
    };
    let builder = builder.observer(reports.clone());
    let code = match builder.start().await {
        Ok(runtime) => {
            println!("ready");
            runtime.shutdown_on_signal().await;
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    };
    // The last reports go out, and their connection closes, before the process ends.
    reports.close().await;
    code
}

fn fail(e: rabbitry::Error) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}
