//! The chaos suite: zero loss under failure, duplicates counted.
//!
//! ```text
//! cargo test --release --test chaos -- --test-threads=1 --nocapture
//! ```
//!
//! Each scenario publishes uniquely numbered messages, keeps the ids the broker confirmed,
//! and checks the worker's ledger afterwards: every confirmed id handled at least once, no
//! id handled that was never published, duplicates printed. The broker restart runs last
//! (tests run in name order with one thread), so it cannot disturb the others.

#[path = "../../tests/support/cleanup.rs"]
mod cleanup;
#[path = "../../tests/support/relay.rs"]
mod relay;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use rabbitry::prelude::*;
use rabbitry::{Error, RuntimeBuilder, Topology, headers};
use rabbitry_chaos::{ChaosConfig, ChaosMessage, ChaosWorker, Verdict, read_ledger, verify};
use relay::Relay;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const PATIENCE: Duration = Duration::from_secs(90);

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| rabbitry::DEFAULT_URL.into())
}

/// One scenario's names, ledger and cleanup.
struct Scenario {
    name: &'static str,
    exchange: String,
    queue: String,
    ledger: PathBuf,
}

impl Scenario {
    fn new(name: &'static str) -> Scenario {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let prefix = format!("chaos.{name}.{}", &id[id.len() - 8..]);
        Scenario {
            name,
            exchange: format!("{prefix}.events"),
            queue: format!("{prefix}.work"),
            ledger: std::env::temp_dir().join(format!("{prefix}.ledger")),
        }
    }

    fn config(&self) -> ChaosConfig {
        ChaosConfig::new(&self.queue, &self.ledger)
    }

    fn builder(&self) -> RuntimeBuilder {
        Runtime::builder()
            .url(url())
            .exchange(&self.exchange)
            .reconnect_delay(Duration::from_millis(50), Duration::from_secs(1))
            .startup_timeout(Duration::from_secs(30))
    }

    async fn publisher(&self) -> Publisher {
        Publisher::builder(url())
            .exchange(&self.exchange)
            .connect()
            .await
            .expect("publisher connects")
    }

    fn ledger(&self) -> HashMap<u64, u32> {
        read_ledger(&self.ledger).expect("ledger readable")
    }

    /// Poll the ledger (a file another process may be writing) until `done` holds.
    async fn wait_for_ledger(&self, what: &str, done: impl Fn(&HashMap<u64, u32>) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let ledger = self.ledger();
            if done(&ledger) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: waited {PATIENCE:?} for {what}; {} ids handled",
                self.name,
                ledger.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn spawn_worker(&self, env: &[(&str, String)]) -> WorkerProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_chaos-worker"));
        command
            .env("AMQP_URL", url())
            .env("RABBITRY_EXCHANGE", &self.exchange)
            .env("CHAOS_QUEUE", &self.queue)
            .env("CHAOS_LEDGER", &self.ledger)
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("chaos-worker starts");
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let _ = tx.send(line);
            }
        });
        WorkerProcess { child, lines }
    }

    async fn ready_count(&self, queue: &str) -> u32 {
        let conn = Connection::connect(&url(), ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let options = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = ch
            .queue_declare(queue.into(), options, FieldTable::default())
            .await
            .unwrap();
        let _ = conn.close(200, "OK".into()).await;
        q.message_count()
    }

    fn report(&self, verdict: &Verdict, produced: &Produced) {
        println!(
            "[{}] published {} ({} publishes unconfirmed); expected handled {}, handled {} distinct, \
             duplicates {}, lost {}, unknown {}",
            self.name,
            produced.attempted.len(),
            produced.failures,
            verdict.confirmed,
            verdict.handled,
            verdict.duplicates,
            verdict.lost.len(),
            verdict.unknown.len()
        );
        assert!(
            verdict.holds(),
            "[{}] lost {:?}, unknown {:?}",
            self.name,
            &verdict.lost[..verdict.lost.len().min(20)],
            verdict.unknown
        );
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        let queues = Topology::new(&self.exchange, [&self.config().subscription()])
            .queues()
            .map(str::to_owned)
            .collect();
        let exchanges = vec![self.exchange.clone(), format!("{}.dlx", self.exchange)];
        let _ = std::fs::remove_file(&self.ledger);
        cleanup::delete(&url(), queues, exchanges);
    }
}

struct WorkerProcess {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl WorkerProcess {
    async fn wait_for_line(&mut self, prefix: &str) {
        loop {
            let line = tokio::time::timeout(PATIENCE, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no '{prefix}' line from chaos-worker"))
                .unwrap_or_else(|| panic!("chaos-worker exited before printing '{prefix}'"));
            if line.starts_with(prefix) {
                return;
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    async fn sigkill(mut self) {
        self.child.kill().await.expect("SIGKILL delivered");
    }

    async fn sigterm(mut self) -> std::process::ExitStatus {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("chaos-worker exits after SIGTERM")
            .unwrap()
    }

    /// (VmRSS, VmHWM) in KiB.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

/// What the producer saw.
#[derive(Default)]
struct Produced {
    attempted: BTreeSet<u64>,
    confirmed: BTreeSet<u64>,
    unconfirmed: Vec<u64>,
    failures: usize,
}

impl Produced {
    /// Publish `ids` as one batch; record which ones the broker confirmed.
    async fn publish(&mut self, publisher: &Publisher, ids: impl IntoIterator<Item = u64>) {
        let ids: Vec<u64> = ids.into_iter().collect();
        let messages: Vec<ChaosMessage> = ids.iter().map(|id| ChaosMessage::new(*id)).collect();
        self.attempted.extend(&ids);
        let failed: BTreeSet<usize> = match publisher.publish_batch(&messages).await {
            Ok(_) => BTreeSet::new(),
            Err(Error::Batch { failures, .. }) => failures.iter().map(|(i, _)| *i).collect(),
            Err(_) => (0..ids.len()).collect(),
        };
        self.failures += failed.len();
        for (i, id) in ids.into_iter().enumerate() {
            if failed.contains(&i) {
                self.unconfirmed.push(id);
            } else {
                self.confirmed.insert(id);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_1_worker_sigkilled_three_times_mid_stream() {
    let sc = Scenario::new("sigkill");
    let env = [
        ("CHAOS_DELAY_MS", "2".to_string()),
        ("CHAOS_CONCURRENCY", "8".to_string()),
    ];
    let mut worker = sc.spawn_worker(&env);
    worker.wait_for_line("ready").await;

    let publisher = sc.publisher().await;
    let producer = tokio::spawn(async move {
        let mut produced = Produced::default();
        for chunk in (0..10_000u64).collect::<Vec<_>>().chunks(500) {
            produced.publish(&publisher, chunk.iter().copied()).await;
        }
        produced
    });

    for threshold in [2_000, 4_500, 7_000] {
        sc.wait_for_ledger(&format!("{threshold} handled"), |l| l.len() >= threshold)
            .await;
        worker.sigkill().await;
        println!("[{}] SIGKILL after {} handled", sc.name, sc.ledger().len());
        worker = sc.spawn_worker(&env);
        worker.wait_for_line("ready").await;
    }
    let produced = producer.await.unwrap();
    assert_eq!(
        produced.confirmed.len(),
        10_000,
        "the broker stayed up: every publish is confirmed"
    );
    sc.wait_for_ledger("every confirmed id", |l| {
        produced.confirmed.iter().all(|id| l.contains_key(id))
    })
    .await;
    assert!(worker.sigterm().await.success());
    sc.report(
        &verify(&produced.confirmed, &produced.attempted, &sc.ledger()),
        &produced,
    );
    assert_eq!(sc.ready_count(&sc.queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_2_connection_cut_and_half_open_connection() {
    let sc = Scenario::new("network");
    let relay = Relay::start("127.0.0.1:5672").await;
    let mut config = sc.config();
    config.delay = Duration::from_millis(1);
    // Heartbeats every 2 s: a half-open connection is noticed within a few seconds.
    let rt = sc
        .builder()
        .url(relay.url_with("?heartbeat=2"))
        .worker(ChaosWorker::new(config).unwrap())
        .start()
        .await
        .unwrap();
    let publisher = sc.publisher().await; // directly, not through the relay
    let mut produced = Produced::default();

    produced.publish(&publisher, 0..1_500).await;
    sc.wait_for_ledger("500 handled", |l| l.len() >= 500).await;
    relay.cut();
    println!(
        "[{}] connections cut after {} handled",
        sc.name,
        sc.ledger().len()
    );
    sc.wait_for_ledger("ids 0..1500", |l| (0..1_500).all(|id| l.contains_key(&id)))
        .await;

    let before_stall = relay.accepted();
    produced.publish(&publisher, 1_500..3_000).await;
    sc.wait_for_ledger("2000 handled", |l| l.len() >= 2_000)
        .await;
    relay.stall();
    let stalled_at = Instant::now();
    println!(
        "[{}] connections stalled (half-open) after {} handled",
        sc.name,
        sc.ledger().len()
    );
    sc.wait_for_ledger("ids 0..3000", |l| (0..3_000).all(|id| l.contains_key(&id)))
        .await;
    println!(
        "[{}] recovered from the half-open connection in {:?}",
        sc.name,
        stalled_at.elapsed()
    );

    let status = rt.workers().await.unwrap();
    rt.shutdown().await;
    assert!(
        relay.accepted() > before_stall,
        "a new connection replaced the stalled one"
    );
    assert!(status[0].restarts >= 2, "{status:?}");
    sc.report(
        &verify(&produced.confirmed, &produced.attempted, &sc.ledger()),
        &produced,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_3_handler_panics_on_a_fifth_of_the_messages() {
    let sc = Scenario::new("panics");
    // Keep the expected panics out of the output; anything else still prints.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let chaos = info
            .payload()
            .downcast_ref::<String>()
            .is_some_and(|m| m.starts_with("chaos:"));
        if !chaos {
            default_hook(info);
        }
    }));
    let mut config = sc.config();
    config.panic_every = Some(5);
    let rt = sc
        .builder()
        .worker(ChaosWorker::new(config).unwrap())
        .start()
        .await
        .unwrap();
    let publisher = sc.publisher().await;
    let mut produced = Produced::default();
    produced.publish(&publisher, 0..1_000).await;

    let panicking: BTreeSet<u64> = (0..1_000).filter(|id| id % 5 == 0).collect();
    let healthy: BTreeSet<u64> = produced.confirmed.difference(&panicking).copied().collect();
    sc.wait_for_ledger("every healthy id", |l| {
        healthy.iter().all(|id| l.contains_key(id))
    })
    .await;

    // The panicking ones were retried (3 attempts) and dead-lettered.
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let dlq = format!("{}.dlq", sc.queue);
    let mut consumer = ch
        .basic_consume(
            dlq.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut dead = BTreeSet::new();
    while dead.len() < panicking.len() {
        let d = tokio::time::timeout(PATIENCE, consumer.next())
            .await
            .expect("dead letters")
            .unwrap()
            .unwrap();
        let headers = d.properties.headers().clone().unwrap_or_default();
        let kind = headers.inner().get(headers::EXCEPTION_KIND);
        assert!(
            matches!(kind, Some(AMQPValue::LongString(s)) if s.as_bytes() == b"panic"),
            "{kind:?}"
        );
        assert!(matches!(
            headers.inner().get(headers::RETRY_COUNT),
            Some(AMQPValue::LongLongInt(2))
        ));
        let message: ChaosMessage = serde_json::from_slice(&d.data).unwrap();
        assert!(
            dead.insert(message.id),
            "dead-lettered twice: {}",
            message.id
        );
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let _ = conn.close(200, "OK".into()).await;
    let status = rt.workers().await.unwrap();
    rt.shutdown().await;
    let _ = std::panic::take_hook();

    assert_eq!(dead, panicking);
    println!(
        "[{}] {} messages panicked on every attempt and were dead-lettered",
        sc.name,
        dead.len()
    );
    assert!(
        status[0].consuming && status[0].restarts == 0,
        "the worker stayed up: {status:?}"
    );
    let ledger = sc.ledger();
    assert!(panicking.iter().all(|id| !ledger.contains_key(id)));
    sc.report(&verify(&healthy, &produced.attempted, &ledger), &produced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_4_slow_consumer_under_a_million_message_backlog() {
    const BACKLOG: u64 = 1_000_000;
    let sc = Scenario::new("backlog");
    sc.builder()
        .worker(ChaosWorker::new(sc.config()).unwrap())
        .declare()
        .await
        .unwrap();
    let publisher = sc.publisher().await;
    let started = Instant::now();
    let mut produced = Produced::default();
    for chunk in (0..BACKLOG).collect::<Vec<_>>().chunks(20_000) {
        produced.publish(&publisher, chunk.iter().copied()).await;
    }
    let publish_time = started.elapsed();
    println!(
        "[{}] published {} in {publish_time:.1?} ({:.0} msg/s)",
        sc.name,
        produced.confirmed.len(),
        produced.confirmed.len() as f64 / publish_time.as_secs_f64()
    );
    assert_eq!(produced.confirmed.len() as u64, BACKLOG);

    // A slow consumer: 10 handlers at a time, 5 ms each, prefetch 50.
    let env = [
        ("CHAOS_DELAY_MS", "5".to_string()),
        ("CHAOS_CONCURRENCY", "10".to_string()),
        ("CHAOS_PREFETCH", "50".to_string()),
    ];
    let mut worker = sc.spawn_worker(&env);
    worker.wait_for_line("ready").await;
    let mut samples = Vec::new();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        samples.push(worker.memory());
    }
    let handled_while_sampled = sc.ledger().len();
    let (_, peak) = *samples.last().unwrap();
    let settled = &samples[8..]; // after the first two seconds
    let low = settled.iter().map(|(rss, _)| *rss).min().unwrap();
    let high = settled.iter().map(|(rss, _)| *rss).max().unwrap();
    println!(
        "[{}] consumer RSS over 10 s with {} of {BACKLOG} handled: {low}..{high} KiB, peak {peak} KiB",
        sc.name, handled_while_sampled
    );
    assert!(worker.sigterm().await.success());
    assert!(handled_while_sampled > 1_000, "the consumer made progress");
    assert!(
        high - low < 4 * 1024,
        "consumer memory grew from {low} to {high} KiB"
    );
    assert!(peak < 32 * 1024, "peak RSS {peak} KiB");

    // Nothing lost: what was handled plus what waits in the queue is everything.
    let ledger = sc.ledger();
    let waiting = u64::from(sc.ready_count(&sc.queue).await);
    assert_eq!(
        ledger.len() as u64 + waiting,
        BACKLOG,
        "handled {} + waiting {waiting}",
        ledger.len()
    );
    assert!(
        ledger.values().all(|n| *n == 1),
        "a graceful stop duplicates nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_5_sigterm_with_a_hundred_deliveries_in_flight() {
    let sc = Scenario::new("sigterm");
    let env = [
        ("CHAOS_DELAY_MS", "1000".to_string()),
        ("CHAOS_CONCURRENCY", "100".to_string()),
        ("CHAOS_PREFETCH", "200".to_string()),
    ];
    let mut worker = sc.spawn_worker(&env);
    worker.wait_for_line("ready").await;
    let publisher = sc.publisher().await;
    let mut produced = Produced::default();
    produced.publish(&publisher, 0..1_000).await;

    worker.wait_for_line("inflight 100").await;
    let status = worker.sigterm().await;
    assert!(status.success(), "exit status {status:?}");

    let ledger = sc.ledger();
    let waiting = sc.ready_count(&sc.queue).await as usize;
    println!(
        "[{}] SIGTERM with 100 in flight: {} finished, {waiting} back in the queue",
        sc.name,
        ledger.len()
    );
    assert!(ledger.len() >= 100, "the in-flight handlers finished");
    assert!(ledger.values().all(|n| *n == 1));
    assert_eq!(ledger.len() + waiting, 1_000, "nothing lost");
}

/// Restart RabbitMQ's application (the node stays up), whatever happens to the test.
struct BrokerRestart;

impl BrokerRestart {
    fn ctl(action: &str) {
        let status = std::process::Command::new("rabbitmqctl")
            .arg(action)
            .stdout(Stdio::null())
            .status()
            .expect("rabbitmqctl runs");
        assert!(status.success(), "rabbitmqctl {action} failed");
    }
}

impl Drop for BrokerRestart {
    fn drop(&mut self) {
        // start_app on a running app is a no-op; after a panic it brings the broker back.
        BrokerRestart::ctl("start_app");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_6_broker_restart_mid_publish_and_consume() {
    let sc = Scenario::new("restart");
    let mut config = sc.config();
    config.delay = Duration::from_millis(1);
    let rt = sc
        .builder()
        .worker(ChaosWorker::new(config).unwrap())
        .start()
        .await
        .unwrap();
    let publisher = sc.publisher().await;

    let (confirmed_tx, mut confirmed_rx) = tokio::sync::watch::channel(0usize);
    let producer = tokio::spawn(async move {
        let mut produced = Produced::default();
        for chunk in (0..10_000u64).collect::<Vec<_>>().chunks(50) {
            produced.publish(&publisher, chunk.iter().copied()).await;
            let _ = confirmed_tx.send(produced.confirmed.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Publish again whatever was not confirmed, now that the broker is back.
        let deadline = Instant::now() + PATIENCE;
        while !produced.unconfirmed.is_empty() && Instant::now() < deadline {
            let retry = std::mem::take(&mut produced.unconfirmed);
            produced.publish(&publisher, retry).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        produced
    });

    confirmed_rx.wait_for(|n| *n >= 1_000).await.unwrap();
    let guard = BrokerRestart;
    let down_at = Instant::now();
    tokio::task::spawn_blocking(|| BrokerRestart::ctl("stop_app"))
        .await
        .unwrap();
    println!(
        "[{}] broker application stopped after {} confirmed",
        sc.name,
        *confirmed_rx.borrow()
    );
    tokio::task::spawn_blocking(|| BrokerRestart::ctl("start_app"))
        .await
        .unwrap();
    let up_at = Instant::now();
    println!(
        "[{}] broker application back after {:?}",
        sc.name,
        up_at - down_at
    );
    drop(guard);

    let produced = producer.await.unwrap();
    sc.wait_for_ledger("every confirmed id", |l| {
        produced.confirmed.iter().all(|id| l.contains_key(id))
    })
    .await;
    println!(
        "[{}] every confirmed message handled {:?} after the broker came back",
        sc.name,
        up_at.elapsed()
    );
    let status = rt.workers().await.unwrap();
    rt.shutdown().await;
    assert!(
        produced.failures > 0,
        "publishing during the outage reported failures"
    );
    assert!(
        produced.unconfirmed.is_empty(),
        "every message was eventually confirmed"
    );
    assert!(status[0].consuming && status[0].restarts >= 1, "{status:?}");
    sc.report(
        &verify(&produced.confirmed, &produced.attempted, &sc.ledger()),
        &produced,
    );
}

/// A scheduler process of scenario 7 and the lines it printed.
struct SchedulerProcess {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    leads: bool,
}

impl SchedulerProcess {
    fn spawn(exchange: &str, schedule: &str) -> SchedulerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chaos-scheduler"))
            .env("AMQP_URL", url())
            .env("RABBITRY_EXCHANGE", exchange)
            .env("CHAOS_SCHEDULE", schedule)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chaos-scheduler starts");
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let _ = tx.send(line);
            }
        });
        SchedulerProcess {
            child,
            lines,
            leads: false,
        }
    }

    /// Read what it printed so far; whether it said it leads.
    fn poll(&mut self) -> bool {
        while let Ok(line) = self.lines.try_recv() {
            if line.contains("this process leads the schedule") {
                self.leads = true;
            }
        }
        self.leads
    }
}

/// The one process leading now (waits until one says so; fails if two do).
async fn leader(processes: &mut [SchedulerProcess]) -> usize {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let leading: Vec<usize> = (0..processes.len())
            .filter(|i| processes[*i].poll())
            .collect();
        match leading[..] {
            [one] => return one,
            [] => assert!(Instant::now() < deadline, "no scheduler took the lead"),
            _ => panic!("two scheduler processes lead at once: {leading:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_7_cron_leader_sigkilled_twice_over_three_processes() {
    let sc = Scenario::new("cron");
    let schedule = "chaos-tick";
    let ticks_queue = format!("{}.ticks", sc.queue);
    let token_queue = rabbitry::Scheduler::token_queue(&sc.exchange, schedule);
    let _cleanup = cleanup::DeleteOnDrop {
        url: url(),
        queues: vec![ticks_queue.clone(), token_queue],
        exchanges: vec![],
    };
    // Receive every tick: (tick, message id).
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        sc.exchange.as_str().into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        ticks_queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        ticks_queue.as_str().into(),
        sc.exchange.as_str().into(),
        "chaos.tick".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            ticks_queue.as_str().into(),
            "ticks".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (tick_tx, mut tick_rx) = mpsc::unbounded_channel::<(i64, String)>();
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
            let id = d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
                .unwrap_or_default();
            let _ = tick_tx.send((body["tick_ms"].as_i64().unwrap(), id));
            let _ = d.acker.ack(BasicAckOptions::default()).await;
        }
    });
    let mut ticks: Vec<(i64, String)> = Vec::new();
    let mut wait_ticks = async |ticks: &mut Vec<(i64, String)>, n: usize| {
        let target = ticks.len() + n;
        while ticks.len() < target {
            let tick = tokio::time::timeout(PATIENCE, tick_rx.recv())
                .await
                .expect("ticks keep coming")
                .expect("the tick consumer runs");
            ticks.push(tick);
        }
    };

    let mut processes: Vec<SchedulerProcess> = (0..3)
        .map(|_| SchedulerProcess::spawn(&sc.exchange, schedule))
        .collect();
    let mut killed = 0;
    for _ in 0..2 {
        let lead = leader(&mut processes).await;
        wait_ticks(&mut ticks, 3).await;
        let victim = processes.remove(lead);
        let mut child = victim.child;
        child.kill().await.expect("SIGKILL delivered");
        killed += 1;
        println!("[{}] leader SIGKILLed after {} ticks", sc.name, ticks.len());
    }
    leader(&mut processes).await;
    wait_ticks(&mut ticks, 4).await;
    for p in &mut processes {
        let _ = p.child.kill().await;
    }
    let _ = conn.close(200, "OK".into()).await;

    let mut seen: HashMap<i64, BTreeSet<String>> = HashMap::new();
    for (tick, id) in &ticks {
        seen.entry(*tick).or_default().insert(id.clone());
    }
    let distinct: BTreeSet<i64> = seen.keys().copied().collect();
    let first = *distinct.first().unwrap();
    let last = *distinct.last().unwrap();
    let duplicates = ticks.len() - distinct.len();
    println!(
        "[{}] {} ticks received, {} distinct seconds from first to last, {} duplicates, {killed} leaders killed",
        sc.name,
        ticks.len(),
        distinct.len(),
        duplicates
    );
    assert!(
        distinct.iter().all(|t| t % 1000 == 0),
        "ticks on whole seconds"
    );
    assert_eq!(
        distinct.len() as i64,
        (last - first) / 1000 + 1,
        "no tick skipped between the first and the last: {distinct:?}"
    );
    assert!(
        seen.values().all(|ids| ids.len() == 1),
        "a refired tick keeps its message id"
    );
    assert!(
        duplicates <= killed,
        "at most the last tick of a killed leader fires twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_8_delayed_messages_survive_a_worker_kill_and_a_broker_restart() {
    let sc = Scenario::new("delays");
    let _cleanup = cleanup::DeleteOnDrop {
        url: url(),
        queues: Topology::delay_queues(&sc.exchange),
        exchanges: Topology::delay_tiers(&sc.exchange),
    };
    let mut worker = sc.spawn_worker(&[]);
    worker.wait_for_line("ready").await;
    let publisher = sc.publisher().await;
    let mut produced = Produced::default();
    // 300 messages held by the broker for 3 to 12 s.
    for id in 0..300u64 {
        let message = ChaosMessage::new(id);
        let delay = Duration::from_millis(3_000 + (id % 10) * 1_000);
        produced.attempted.insert(id);
        match publisher.message(&message).delay(delay).send().await {
            Ok(_) => {
                produced.confirmed.insert(id);
            }
            Err(_) => produced.failures += 1,
        }
    }
    let sent_at = Instant::now();
    worker.sigkill().await;
    let guard = BrokerRestart;
    tokio::task::spawn_blocking(|| BrokerRestart::ctl("stop_app"))
        .await
        .unwrap();
    tokio::task::spawn_blocking(|| BrokerRestart::ctl("start_app"))
        .await
        .unwrap();
    drop(guard);
    println!(
        "[{}] 300 delayed messages published, worker killed, broker restarted {:?} after the last publish",
        sc.name,
        sent_at.elapsed()
    );
    let mut worker = sc.spawn_worker(&[]);
    worker.wait_for_line("ready").await;
    sc.wait_for_ledger("every delayed message", |l| {
        produced.confirmed.iter().all(|id| l.contains_key(id))
    })
    .await;
    worker.sigterm().await;
    sc.report(
        &verify(&produced.confirmed, &produced.attempted, &sc.ledger()),
        &produced,
    );
}
