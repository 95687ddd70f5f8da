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
use rabbitry_workers::email::{EmailWorker, Outbox};
use rabbitry_workers::orders::OrderPlaced;

#[path = "../../tests/support/cleanup.rs"]
mod cleanup;

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
