//! Publishes sample orders: `ORDERS` of them (default 20), one every `INTERVAL_MS`
//! (default 200). Every tenth is high priority; every seventh has an invalid quantity.

use std::process::ExitCode;
use std::time::Duration;

use rabbitry::Publisher;
use rabbitry_observe::Observability;
use rabbitry_workers::orders::OrderPlaced;
use rabbitry_workers::{Names, binary_name, init_telemetry};
use tracing::{error, info};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> ExitCode {
    let _telemetry = match init_telemetry(&binary_name()) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| rabbitry::DEFAULT_URL.into());
    // Its publishes carry a W3C trace context, so each order's trace starts here.
    let publisher = match Publisher::builder(url)
        .exchange(Names::from_env().exchange)
        .observer(Observability::new())
        .connect()
        .await
    {
        Ok(p) => p,
        Err(e) => {
            error!(error = %e, "cannot connect");
            return ExitCode::FAILURE;
        }
    };
    let interval = Duration::from_millis(env_or("INTERVAL_MS", 200));
    for n in 1..=env_or("ORDERS", 20) {
        let mut order = OrderPlaced::sample(1000 + n);
        if n % 7 == 0 {
            order.items[0].qty = 0;
        }
        let priority = if n % 10 == 0 { 9 } else { 0 };
        match publisher.message(&order).priority(priority).send().await {
            Ok(id) => {
                info!(order_id = order.order_id, priority, message_id = %id, "order published")
            }
            Err(e) => {
                error!(order_id = order.order_id, error = %e, "publish failed");
                return ExitCode::FAILURE;
            }
        }
        tokio::time::sleep(interval).await;
    }
    publisher.close().await;
    ExitCode::SUCCESS
}
