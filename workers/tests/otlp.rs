//! The `otlp` feature: a worker binary built with it exports its spans over OTLP/HTTP to
//! the collector named by `OTEL_EXPORTER_OTLP_ENDPOINT` (here, a listener in the test).
//! Run by `.ci/run` as `cargo test -p rabbitry-workers --features otlp --test otlp`.
#![cfg(feature = "otlp")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cleanup::DeleteOnDrop;
use rabbitry::Topology;
use rabbitry::prelude::*;
use rabbitry_workers::analytics::{AnalyticsWorker, Stats};
use rabbitry_workers::orders::OrderPlaced;

#[path = "../../tests/support/cleanup.rs"]
mod cleanup;

const PATIENCE: Duration = Duration::from_secs(30);

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| rabbitry::DEFAULT_URL.into())
}

/// One HTTP request a collector received: request line, content type, body.
struct Posted {
    line: String,
    content_type: String,
    body: Vec<u8>,
}

/// A collector that answers every request with 200 and reports it.
fn collector() -> (String, mpsc::Receiver<Posted>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let (mut length, mut content_type) = (0, String::new());
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).unwrap();
                    let header = header.trim_end();
                    if header.is_empty() {
                        break;
                    }
                    let (name, value) = header.split_once(':').unwrap_or((header, ""));
                    match name.to_ascii_lowercase().as_str() {
                        "content-length" => length = value.trim().parse().unwrap(),
                        "content-type" => content_type = value.trim().to_owned(),
                        _ => {}
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")
                    .unwrap();
                let _ = tx.send(Posted {
                    line: line.trim_end().to_owned(),
                    content_type,
                    body,
                });
            }
        }
    });
    (endpoint, rx)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_exports_its_spans_over_otlp() {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let prefix = format!("t.otlp.{}.", &id[id.len() - 8..]);
    let exchange = format!("{prefix}events");
    let queue = format!("{prefix}orders.analytics");
    let subscription = AnalyticsWorker::new(&queue, Stats::default()).subscription();
    let _cleanup = DeleteOnDrop {
        url: url(),
        queues: Topology::new(&exchange, [&subscription])
            .queues()
            .map(str::to_owned)
            .collect(),
        exchanges: vec![exchange.clone(), format!("{exchange}.dlx")],
    };
    let (endpoint, posted) = collector();
    let mut child = Command::new(env!("CARGO_BIN_EXE_analytics-worker"))
        .env("AMQP_URL", url())
        .env("RABBITRY_EXCHANGE", &exchange)
        .env("RABBITRY_QUEUE_PREFIX", &prefix)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_SERVICE_NAME", "otlp-test-analytics")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("analytics-worker starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    let publisher = Publisher::builder(url())
        .exchange(&exchange)
        .connect()
        .await
        .unwrap();
    publisher.publish(&OrderPlaced::sample(1)).await.unwrap();
    let span_name = format!("process {queue}");
    let found = loop {
        let post = posted
            .recv_timeout(PATIENCE)
            .expect("the worker posted its spans to the collector");
        if contains(&post.body, &span_name) {
            break post;
        }
    };
    assert_eq!(found.line, "POST /v1/traces HTTP/1.1");
    assert_eq!(found.content_type, "application/x-protobuf");
    assert!(
        contains(&found.body, "otlp-test-analytics"),
        "the service name"
    );
    assert!(contains(&found.body, "messaging.system"));

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    publisher.close().await;
}
