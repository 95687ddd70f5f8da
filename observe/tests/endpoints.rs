//! The metrics and the endpoints, scraped over HTTP, on RabbitMQ and on the in-memory broker:
//! exact counters after a known mix of outcomes, histogram buckets, queue depths, and a
//! readiness that follows the broker connection.

#[path = "../../tests/support/mod.rs"]
#[macro_use]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rabbitry::middleware::FilterLayer;
use rabbitry::prelude::*;
use rabbitry::{Error, Registration, RetryPolicy};
use rabbitry_observe::{Observability, RuntimeBuilderExt};
use serde_json::{Value, json};
use support::journal::Journal;
use support::*;
use tokio::net::TcpStream;

#[derive(serde::Serialize)]
struct Job {
    n: usize,
    kind: &'static str,
}

impl Event for Job {
    const TYPE: &'static str = "job";
}

/// `GET path` on `addr`: the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || support::http::get(addr, &path))
        .await
        .unwrap()
}

/// Send `raw` as is: the status code and the body.
async fn request(addr: SocketAddr, raw: &str) -> (u16, String) {
    let raw = raw.to_owned();
    tokio::task::spawn_blocking(move || support::http::request(addr, &raw))
        .await
        .unwrap()
}

/// Endpoints on a free port of the loopback interface.
fn on_any_port() -> Observability {
    Observability::new().http("127.0.0.1:0".parse().unwrap())
}

/// Wait until nothing listens on `addr` any more.
async fn until_closed(addr: SocketAddr) {
    let wait = async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("the endpoints stop with the runtime");
}

/// The value of the sample `name{labels}` in a Prometheus text page.
fn sample(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
        if metric != name {
            return None;
        }
        let found = rest.trim_end_matches('}');
        let matches = labels
            .iter()
            .all(|(k, v)| found.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        let count = found.split(',').filter(|s| !s.is_empty()).count();
        (matches && count == labels.len()).then(|| value.parse().unwrap())
    })
}

/// Scrape `/metrics` until `check` holds (queue depths are read periodically).
async fn scrape_until(addr: SocketAddr, check: impl Fn(&str) -> bool) -> String {
    let wait = async {
        loop {
            let (status, page) = get(addr, "/metrics").await;
            assert_eq!(status, 200);
            if check(&page) {
                return page;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("the metrics reached the expected state")
}

/// `GET /ready` until it answers `status`.
async fn ready_until(addr: SocketAddr, status: u16) -> Value {
    let wait = async {
        loop {
            let (got, body) = get(addr, "/ready").await;
            if got == status {
                return serde_json::from_str(&body).expect("a JSON body");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("/ready answered {status}"))
}

async fn counters_are_exact_after_a_known_mix_of_outcomes(env: TestEnv) {
    let journal = Arc::new(Journal::default());
    let queue = env.queue("mix");
    let subscription = Subscription::new(&queue)
        .bind("job.#")
        .retry(RetryPolicy::exponential(Duration::from_millis(100)).max_attempts(3));
    let (probe, _seen) = env.probe(subscription, |seen| match seen.body["kind"].as_str() {
        Some("fail_once") if seen.attempt == 1 => Err(Failure::retry("not yet")),
        Some("bad") => Err(Failure::reject("bad job")),
        _ => Ok(()),
    });
    let worker = Registration::new(probe)
        .layer(FilterLayer::payload(|job| job["kind"] != "skip").reason("skip"));
    let observability = on_any_port().queue_depths_every(Duration::from_secs(1));
    let rt = env
        .builder()
        .observer(journal.clone())
        .worker(worker)
        .observability(&observability)
        .start()
        .await
        .unwrap();
    let addr = observability.local_addr().expect("served once started");
    let publisher = Publisher::builder(env.url())
        .exchange(env.exchange.clone())
        .observer(observability.clone())
        .connect()
        .await
        .unwrap();

    let jobs = [
        "ok",
        "ok",
        "ok",
        "skip",
        "skip",
        "fail_once",
        "fail_once",
        "bad",
    ];
    for (n, kind) in jobs.iter().enumerate() {
        let job = Job { n, kind };
        publisher
            .message(&job)
            .routing_key(format!("job.{kind}"))
            .send()
            .await
            .unwrap();
    }
    let unroutable = publisher
        .message(&Job { n: 99, kind: "ok" })
        .routing_key("nobody.listens")
        .send()
        .await;
    assert!(
        matches!(unroutable, Err(Error::Unroutable { .. })),
        "{unroutable:?}"
    );
    // 8 first deliveries and 2 retried ones.
    journal.wait_for(&queue, 10).await;

    let page = scrape_until(addr, |page| {
        sample(
            page,
            "rabbitry_queue_messages",
            &[("queue", &format!("{queue}.dlq")), ("state", "ready")],
        ) == Some(1.0)
    })
    .await;
    let deliveries = |outcome: &str| {
        sample(
            &page,
            "rabbitry_deliveries_total",
            &[
                ("worker", &queue),
                ("event_type", "job"),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(deliveries("handled"), Some(5.0), "{page}");
    assert_eq!(deliveries("skipped"), Some(2.0), "{page}");
    assert_eq!(deliveries("retried"), Some(2.0), "{page}");
    assert_eq!(deliveries("dead_lettered"), Some(1.0), "{page}");
    assert_eq!(deliveries("requeued"), Some(0.0), "{page}");
    let labels = [("worker", queue.as_str()), ("event_type", "job")];
    assert_eq!(
        sample(&page, "rabbitry_handler_duration_seconds_count", &labels),
        Some(10.0),
        "{page}"
    );
    let buckets: Vec<&str> = page
        .lines()
        .filter(|l| {
            l.starts_with("rabbitry_handler_duration_seconds_bucket{") && l.contains(&queue)
        })
        .collect();
    assert_eq!(
        buckets.len(),
        rabbitry_observe::DURATION_BUCKETS.len() + 1,
        "{page}"
    );
    assert!(
        buckets.last().unwrap().contains("le=\"+Inf\"") && buckets.last().unwrap().ends_with(" 10")
    );
    assert!(
        !page.contains("rabbitry_handler_duration_seconds{"),
        "a histogram, not a summary"
    );
    assert_eq!(
        sample(&page, "rabbitry_in_flight", &[("worker", &queue)]),
        Some(0.0)
    );
    let published = |exchange: &str, outcome: &str| {
        sample(
            &page,
            "rabbitry_published_total",
            &[("exchange", exchange), ("outcome", outcome)],
        )
    };
    assert_eq!(published(&env.exchange, "confirmed"), Some(8.0), "{page}");
    assert_eq!(published(&env.exchange, "unroutable"), Some(1.0), "{page}");
    assert_eq!(
        published("", "confirmed"),
        Some(2.0),
        "the two retry copies: {page}"
    );
    assert_eq!(
        published(&format!("{}.dlx", env.exchange), "confirmed"),
        Some(1.0),
        "the dead-letter copy: {page}"
    );
    assert_eq!(
        sample(
            &page,
            "rabbitry_queue_messages",
            &[("queue", &queue), ("state", "ready")]
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&page, "rabbitry_consumers", &[("queue", &queue)]),
        Some(1.0),
        "{page}"
    );
    assert_eq!(sample(&page, "rabbitry_connection_up", &[]), Some(1.0));
    assert_eq!(sample(&page, "rabbitry_reconnects_total", &[]), Some(0.0));
    assert!(
        page.contains("# TYPE rabbitry_handler_duration_seconds histogram"),
        "{page}"
    );

    // The other answers of the endpoint.
    let (status, body) = get(addr, "/health").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _) = get(addr, "/nothing-here").await;
    assert_eq!(status, 404);
    let post =
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    assert_eq!(request(addr, post).await.0, 405);
    let (status, _) = request(addr, "NOT HTTP AT ALL\r\n\r\n").await;
    assert_eq!(
        status, 400,
        "a malformed request gets a 400, and the server goes on"
    );
    assert_eq!(get(addr, "/health").await.0, 200);

    publisher.close().await;
    rt.shutdown().await;
    until_closed(addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_the_broker_connection() {
    let env = TestEnv::rabbitmq("ready_follows_the_broker_connection");
    let queue = env.queue("ready");
    let (probe, _seen) = env.probe(Subscription::new(&queue).bind("x"), |_| Ok(()));
    let observability = on_any_port();
    // Served before the runtime starts: alive, not ready.
    let addr = observability.serve().await.unwrap().expect("an address");
    let body = ready_until(addr, 503).await;
    assert_eq!(body["running"], json!(false), "{body}");
    assert_eq!(get(addr, "/health").await.0, 200);
    let rt = env
        .breakable_builder()
        .await
        .worker(probe)
        .observability(&observability)
        .start()
        .await
        .unwrap();
    let body = ready_until(addr, 200).await;
    assert_eq!(body["workers"][0]["name"], json!(queue));
    assert_eq!(body["workers"][0]["state"], json!("consuming"));

    // The broker goes away (every connection cut, new ones refused) and comes back.
    let relay = env.relay().expect("a relay on RabbitMQ");
    relay.down();
    let body = ready_until(addr, 503).await;
    assert_eq!(body["ready"], json!(false));
    assert_eq!(body["connected"], json!(false), "{body}");
    assert_eq!(body["workers"][0]["state"], json!("starting"), "{body}");
    assert_eq!(get(addr, "/health").await.0, 200, "alive while not ready");
    let page = get(addr, "/metrics").await.1;
    assert_eq!(
        sample(&page, "rabbitry_connection_up", &[]),
        Some(0.0),
        "{page}"
    );

    relay.up();
    let body = ready_until(addr, 200).await;
    assert_eq!(body["workers"][0]["state"], json!("consuming"), "{body}");
    let page = get(addr, "/metrics").await.1;
    assert_eq!(
        sample(&page, "rabbitry_reconnects_total", &[]),
        Some(1.0),
        "{page}"
    );
    assert_eq!(sample(&page, "rabbitry_connection_up", &[]), Some(1.0));

    assert_eq!(
        observability.local_addr(),
        Some(addr),
        "the runtime's start kept the endpoints served before it"
    );

    rt.pause(&queue).await.unwrap();
    let body = ready_until(addr, 503).await;
    assert_eq!(
        body["workers"][0]["state"],
        json!("paused"),
        "paused: not consuming"
    );
    rt.resume(&queue).await.unwrap();
    ready_until(addr, 200).await;
    rt.shutdown().await;
    until_closed(addr).await;
}

async fn a_busy_address_fails_the_start(env: TestEnv) {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let queue = env.queue("busy");
    let (probe, _seen) = env.probe(Subscription::new(&queue).bind("x"), |_| Ok(()));
    let started = env
        .builder()
        .worker(probe)
        .observability(&Observability::new().http(taken.local_addr().unwrap()))
        .start()
        .await;
    let err = started.expect_err("the start fails");
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.to_string().contains("RABBITRY_HTTP_ADDR"), "{err}");
}

on_both_brokers!(
    counters_are_exact_after_a_known_mix_of_outcomes,
    a_busy_address_fails_the_start,
);
