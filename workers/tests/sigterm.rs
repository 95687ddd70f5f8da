//! SIGTERM against the real `email-worker` binary and a real RabbitMQ: the in-flight email
//! finishes and is acknowledged, the rest stays queued, and the process exits 0.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cleanup::DeleteOnDrop;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use rabbitry::Topology;
use rabbitry::prelude::*;
use rabbitry_workers::analytics::{AnalyticsWorker, Stats};
use rabbitry_workers::email::{EmailWorker, Outbox};
use rabbitry_workers::inventory::{InventoryWorker, Stock};
use rabbitry_workers::orders::OrderPlaced;

#[path = "../../tests/support/cleanup.rs"]
mod cleanup;
#[path = "../../tests/support/http.rs"]
mod http;
use http::get;

const PATIENCE: Duration = Duration::from_secs(30);

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| rabbitry::DEFAULT_URL.into())
}

/// Lines of a child's output, as they come.
fn lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_for(rx: &mpsc::Receiver<String>, needle: &str, seen: &mut Vec<String>) {
    loop {
        let line = rx.recv_timeout(PATIENCE).unwrap_or_else(|_| {
            panic!(
                "no '{needle}' within {PATIENCE:?}; output so far:\n{}",
                seen.join("\n")
            )
        });
        let found = line.contains(needle);
        seen.push(line);
        if found {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_email_in_flight_and_exits_zero() {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let prefix = format!("t.sigterm.{}.", &id[id.len() - 8..]);
    let exchange = format!("{prefix}events");
    let queue = format!("{prefix}orders.email");
    let subscription = EmailWorker::new(&queue, Outbox::default()).subscription();
    let _cleanup = DeleteOnDrop {
        url: url(),
        queues: Topology::new(&exchange, [&subscription])
            .queues()
            .map(str::to_owned)
            .collect(),
        exchanges: vec![exchange.clone(), format!("{exchange}.dlx")],
    };

    let mut child = Command::new(env!("CARGO_BIN_EXE_email-worker"))
        .env("AMQP_URL", url())
        .env("RABBITRY_EXCHANGE", &exchange)
        .env("RABBITRY_QUEUE_PREFIX", &prefix)
        .env("EMAIL_SEND_MS", "300")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("email-worker starts");
    let stdout = lines(child.stdout.take().unwrap());
    let stderr = lines(child.stderr.take().unwrap());
    let mut out = Vec::new();
    let mut log = Vec::new();
    wait_for(&stdout, "ready", &mut out);

    let publisher = Publisher::builder(url())
        .exchange(&exchange)
        .connect()
        .await
        .unwrap();
    let orders: Vec<_> = (1..=10).map(OrderPlaced::sample).collect();
    publisher.publish_batch(&orders).await.unwrap();

    // One email sent; with one at a time and 300 ms each, the next one is now in flight.
    wait_for(&stderr, "confirmation email sent", &mut log);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    log.extend(stderr.iter());
    assert!(
        exit.success(),
        "exit status {exit:?}; log:\n{}",
        log.join("\n")
    );
    assert!(
        log.iter().any(|l| l.contains("shutdown signal received")),
        "{}",
        log.join("\n")
    );

    let sent = log
        .iter()
        .filter(|l| l.contains("confirmation email sent"))
        .count();
    assert!(sent >= 1);
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let ready = ch
        .queue_declare(queue.as_str().into(), passive, FieldTable::default())
        .await
        .unwrap()
        .message_count() as usize;
    // Nothing lost: every order was either sent (and acknowledged) or is still queued.
    assert_eq!(
        sent + ready,
        orders.len(),
        "sent {sent}, still queued {ready}"
    );

    publisher.close().await;
}

/// A child process killed if the test fails before it stops it.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_binaries_serve_metrics_health_and_ready_and_log_json() {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let prefix = format!("t.endpoints.{}.", &id[id.len() - 8..]);
    let exchange = format!("{prefix}events");
    let names = ["orders.email", "orders.inventory", "orders.analytics"];
    let queue = |name: &str| format!("{prefix}{name}");
    let subscriptions = [
        EmailWorker::new(queue(names[0]), Outbox::default()).subscription(),
        InventoryWorker::new(queue(names[1]), Stock::default()).subscription(),
        AnalyticsWorker::new(queue(names[2]), Stats::default()).subscription(),
    ];
    let _cleanup = DeleteOnDrop {
        url: url(),
        queues: Topology::new(&exchange, subscriptions.iter())
            .queues()
            .map(str::to_owned)
            .collect(),
        exchanges: vec![exchange.clone(), format!("{exchange}.dlx")],
    };

    let mut children = Vec::new();
    for (binary, name) in [
        (env!("CARGO_BIN_EXE_email-worker"), names[0]),
        (env!("CARGO_BIN_EXE_inventory-worker"), names[1]),
        (env!("CARGO_BIN_EXE_analytics-worker"), names[2]),
    ] {
        let addr = free_addr();
        let mut child = Command::new(binary)
            .env("AMQP_URL", url())
            .env("RABBITRY_EXCHANGE", &exchange)
            .env("RABBITRY_QUEUE_PREFIX", &prefix)
            .env("RABBITRY_HTTP_ADDR", &addr)
            .env("RABBITRY_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the worker starts");
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        wait_for(&stdout, "ready", &mut Vec::new());
        let (status, body) = get(&addr, "/ready");
        assert_eq!(status, 200, "{body}");
        let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(ready["workers"][0]["name"], format!("{prefix}{name}"));
        assert_eq!(ready["workers"][0]["state"], "consuming");
        assert_eq!(get(&addr, "/health").0, 200);
        children.push((KillOnDrop(Some(child)), addr, stderr));
    }

    // Three orders from the producer binary, handled by the email worker.
    let produced = Command::new(env!("CARGO_BIN_EXE_order-producer"))
        .env("AMQP_URL", url())
        .env("RABBITRY_EXCHANGE", &exchange)
        .env("ORDERS", "3")
        .env("INTERVAL_MS", "0")
        .output()
        .unwrap();
    assert!(produced.status.success(), "{produced:?}");
    let email = &children[0].1;
    let handled = format!(
        "rabbitry_deliveries_total{{worker=\"{prefix}orders.email\",event_type=\"order.placed\",outcome=\"handled\"}} 3"
    );
    let deadline = std::time::Instant::now() + PATIENCE;
    let page = loop {
        let page = get(email, "/metrics").1;
        if page.contains(&handled) || std::time::Instant::now() > deadline {
            break page;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(page.contains(&handled), "{page}");
    assert!(page.contains("rabbitry_connection_up 1"), "{page}");

    for (mut guard, _, stderr) in children {
        let mut child = guard.0.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(exit.success(), "{exit:?}");
        let log: Vec<String> = stderr.iter().collect();
        assert!(!log.is_empty());
        for line in &log {
            let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
            assert!(parsed.is_ok(), "a JSON log line: {line:?} in {log:#?}");
        }
    }
}
