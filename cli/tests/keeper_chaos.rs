//! The keeper under failure, on RabbitMQ with the `rabbitry serve` binary:
//!
//! 1. SIGKILLed three times while 20,000 events are published and 2,000 of them are
//!    dead-lettered by a worker: every event and every dead letter ends in the store
//!    exactly once, and the audit queue and the dead-letter queue end empty. ("Once" is
//!    what the store's unique keys guarantee when a batch is written again after a kill;
//!    what this run can catch is a loss: a message acknowledged before its commit.)
//! 2. PostgreSQL stopped for 10 s while events and dead letters flow: the keeper stops
//!    acknowledging, resumes when the database is back, and nothing is lost.
//!
//! Kills processes and stops the database: never part of a plain `cargo test` (`test =
//! false`). `.ci/run` runs it after the other suites:
//! `cargo test -p rabbitry-cli --test keeper_chaos -- --test-threads=1 --nocapture`.

#[path = "../../store/tests/db/mod.rs"]
#[allow(unused_macros)]
mod db;
#[path = "../../tests/support/mod.rs"]
#[allow(unused_macros)]
mod support;

use std::collections::HashSet;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rabbitry::prelude::*;
use rabbitry::{Publisher, Registration};
use rabbitry_store::{DeadLetterState, EventFilter, Store};
use serde::{Deserialize, Serialize};
use support::*;

#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    id: u64,
}

impl Event for OrderPlaced {
    const TYPE: &'static str = "order.placed";
}

/// How long the store may take to hold everything once publishing is over.
const SETTLE: Duration = Duration::from_secs(180);

/// Events published per pause, and the pause: about 2,500 events a second, so that the
/// kills and the outage fall in the middle of the stream.
const CHUNK: u64 = 250;
const PAUSE: Duration = Duration::from_millis(100);

/// A `rabbitry serve` process of this test.
struct Keeper {
    child: Option<Child>,
}

impl Keeper {
    /// Start `rabbitry serve` and wait until it says it is ready.
    fn start(env: &TestEnv, store: &str, worker: &str) -> Keeper {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rabbitry"))
            .args(["serve", "--dlq", worker])
            .env("AMQP_URL", support::url())
            .env("RABBITRY_STORE", store)
            .env("RABBITRY_EXCHANGE", &env.exchange)
            .env("RABBITRY_REPORTS_QUEUE", env.queue("reports"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("rabbitry serve starts");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "rabbitry serve is ready");
        Keeper { child: Some(child) }
    }

    fn sigkill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

/// Events `e-0` … `e-{n-1}`, every tenth rejected by the worker.
fn rejected(id: u64) -> bool {
    id % 10 == 0
}

/// Publish `n` events (confirmed, ids `e-<i>`) at the test's pace.
async fn produce(publisher: Publisher, n: u64) {
    let mut id = 0;
    while id < n {
        let mut pipeline = publisher.pipeline();
        for _ in 0..CHUNK.min(n - id) {
            let event = OrderPlaced { id };
            let message = publisher.message(&event).message_id(format!("e-{id}"));
            pipeline.send_message(message).await.expect("published");
            id += 1;
        }
        pipeline.flush().await.expect("confirmed");
        tokio::time::sleep(PAUSE).await;
    }
}

/// The topology of the test: a worker rejecting every tenth event, the keeper's queues
/// tracked for cleanup. Returns the worker's queue and its runtime.
async fn worker(env: &TestEnv) -> (String, rabbitry::Runtime, Recorder) {
    let queue = env.queue("inventory");
    let (probe, seen) = env.probe(
        Subscription::new(&queue).bind("order.placed"),
        |seen| match seen.body["id"].as_u64() {
            Some(id) if rejected(id) => Err(Failure::reject(format!("order {id}: no stock"))),
            _ => Ok(()),
        },
    );
    let runtime = env
        .builder()
        .worker(Registration::new(probe))
        .start()
        .await
        .expect("the worker starts");
    let audit = format!("{}.audit", env.exchange);
    let reports = env.queue("reports");
    env.track_names([
        audit.as_str(),
        format!("{audit}.dlq").as_str(),
        format!("{audit}.topology").as_str(),
        reports.as_str(),
        format!("{reports}.dlq").as_str(),
        format!("{reports}.topology").as_str(),
        format!("{queue}.dlq.dlq").as_str(),
        format!("{queue}.dlq.topology").as_str(),
    ]);
    (queue, runtime, seen)
}

/// Wait (up to [`SETTLE`]) until the store holds `n` events and `n / 10` dead letters of
/// `worker`, then check each is there exactly once and the queues are empty.
async fn everything_once(env: &TestEnv, store: &Store, worker: &str, n: u64) {
    let all = EventFilter::new().limit(u32::try_from(n * 2).unwrap());
    let started = Instant::now();
    loop {
        let events = store.count_events(&all).await.unwrap_or(0);
        let letters = store
            .count_dead_letters(Some(worker), None)
            .await
            .unwrap_or(0);
        if events >= n && letters >= n / 10 {
            break;
        }
        assert!(
            started.elapsed() < SETTLE,
            "the store holds {events} of {n} events and {letters} of {} dead letters",
            n / 10
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = store.events(&all).await.unwrap();
    assert_eq!(events.len() as u64, n, "every event once, no more");
    let ids: HashSet<String> = events.into_iter().map(|e| e.message_id).collect();
    let expected: HashSet<String> = (0..n).map(|i| format!("e-{i}")).collect();
    assert_eq!(ids, expected);

    let letters = store
        .dead_letters(Some(worker), None, Some(u32::try_from(n).unwrap()))
        .await
        .unwrap();
    assert_eq!(
        letters.len() as u64,
        n / 10,
        "every dead letter once, no more"
    );
    let ids: HashSet<&str> = letters.iter().map(|l| l.message_id.as_str()).collect();
    let expected: HashSet<String> = (0..n)
        .filter(|i| rejected(*i))
        .map(|i| format!("e-{i}"))
        .collect();
    assert_eq!(ids, expected.iter().map(String::as_str).collect());
    assert!(letters.iter().all(|l| l.state == DeadLetterState::Waiting
        && l.reason.as_deref().is_some_and(|r| r.contains("no stock"))));

    // Every acknowledgement came after its commit: nothing is left behind in the broker.
    until(|| async { env.ready(&format!("{}.audit", env.exchange)).await == 0 }).await;
    until(|| async { env.ready(&format!("{worker}.dlq")).await == 0 }).await;
}

async fn events_recorded(store: &Store) -> u64 {
    store.count_events(&EventFilter::new()).await.unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeper_sigkilled_three_times_loses_and_doubles_nothing() {
    const EVENTS: u64 = 20_000;
    let env = TestEnv::rabbitmq("keeper_kill");
    let db = db::Db::sqlite("keeper_kill").await;
    let (worker, worker_rt, _seen) = worker(&env).await;
    let mut keeper = Keeper::start(&env, &db.url, &worker);
    let store = db.store().await;

    let producing = tokio::spawn(produce(env.publisher().await, EVENTS));
    // Kill it mid-stream, three times, each once it has recorded some more.
    for (kill, at) in [2_000, 7_000, 12_000].into_iter().enumerate() {
        until_long(|| async { events_recorded(&store).await >= at }).await;
        keeper.sigkill();
        eprintln!("keeper SIGKILLed ({} of 3) at {at}+ events", kill + 1);
        keeper = Keeper::start(&env, &db.url, &worker);
    }
    producing.await.unwrap();
    everything_once(&env, &store, &worker, EVENTS).await;

    drop(keeper);
    worker_rt.shutdown().await;
    db.done(store).await;
}

/// Stops the local PostgreSQL cluster the tests use (the one on the port of
/// `RABBITRY_TEST_POSTGRES`); starts it again when dropped (after a panic too; `.ci/run`
/// also runs `scripts/ensure-postgres` after this test, whatever its result).
struct PostgresStopped {
    cluster: (String, String),
}

impl PostgresStopped {
    fn stop() -> PostgresStopped {
        let admin = db::admin_url();
        let authority = admin.split("://").nth(1).unwrap_or("").split('/').next();
        let port = authority
            .and_then(|a| a.rsplit('@').next())
            .and_then(|hp| hp.rsplit_once(':'))
            .map(|(_, p)| p.to_owned())
            .unwrap_or_else(|| "5432".into());
        let out = Command::new("pg_lsclusters")
            .arg("-h")
            .output()
            .expect("pg_lsclusters runs (Debian's postgresql-common)");
        // Lines: version, cluster, port, status, …
        let listing = String::from_utf8_lossy(&out.stdout);
        let cluster = listing
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2] == port)
            .map(|f| (f[0].to_owned(), f[1].to_owned()))
            .unwrap_or_else(|| panic!("a local cluster on port {port}: {listing}"));
        let stopped = PostgresStopped { cluster };
        stopped.ctl("stop");
        stopped
    }

    fn ctl(&self, action: &str) {
        let status = Command::new("pg_ctlcluster")
            .args([&self.cluster.0, &self.cluster.1, action, "--", "-m", "fast"])
            .status()
            .expect("pg_ctlcluster runs");
        assert!(status.success(), "pg_ctlcluster {action} failed");
    }
}

impl Drop for PostgresStopped {
    fn drop(&mut self) {
        let _ = Command::new("pg_ctlcluster")
            .args([&self.cluster.0, &self.cluster.1, "start"])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_ten_seconds_loses_nothing() {
    const EVENTS: u64 = 40_000;
    let env = TestEnv::rabbitmq("keeper_pg_down");
    let db = db::Db::postgres("keeper_pg_down").await;
    let (worker, worker_rt, _seen) = worker(&env).await;
    let keeper = Keeper::start(&env, &db.url, &worker);
    let store = db.store().await;

    let producing = tokio::spawn(produce(env.publisher().await, EVENTS));
    until_long(|| async { events_recorded(&store).await >= 3_000 }).await;
    let outage = PostgresStopped::stop();
    let stopped_at = Instant::now();
    eprintln!("PostgreSQL stopped");
    assert!(
        store.count_events(&EventFilter::new()).await.is_err(),
        "the database is down"
    );
    // The outage itself lasts 10 s from the stop (the check above can take a while: the
    // store's pool waits for a connection before it gives up): events keep coming meanwhile.
    tokio::time::sleep_until((stopped_at + Duration::from_secs(10)).into()).await;
    assert!(
        !producing.is_finished(),
        "the outage fell in the middle of the stream"
    );
    let audit = format!("{}.audit", env.exchange);
    assert!(
        env.ready(&audit).await > 0,
        "meanwhile the events wait in the broker, unacknowledged by the keeper"
    );
    drop(outage); // started again
    eprintln!("PostgreSQL started again");
    producing.await.unwrap();
    everything_once(&env, &store, &worker, EVENTS).await;

    drop(keeper);
    worker_rt.shutdown().await;
    db.done(store).await;
}

/// As `until`, with the patience of a stream that takes a while.
async fn until_long<F, Fut>(check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < SETTLE,
            "the expected state was reached in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
