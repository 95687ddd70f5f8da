//! rabbitry against a best-practice raw lapin loop, on the same broker, in one run.
//!
//! ```text
//! cargo bench --bench throughput                 # 100,000 messages, 3 rounds
//! cargo bench --bench throughput -- --count 20000 --rounds 1
//! ```
//!
//! `BENCH_RSS_DETAIL=1` makes each consumer child print its RSS split (anonymous, file-backed).
//!
//! S1: persistent ~200-byte JSON events through a durable topic exchange to one queue:
//! publish rate with confirms (1000 in flight), consume rate from a pre-filled queue,
//! end-to-end rate with producer and consumer running together, and publish-to-handle
//! latency. S2: as S1 end-to-end with 10% of the messages failing once and retried through
//! rabbitry's retry tiers. Consumers run in a child process (this binary, re-executed) so
//! that their CPU time (getrusage) and peak RSS are their own.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::stream::{self, FuturesUnordered, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use rabbitry::middleware::{DedupLayer, FilterLayer, RateLimitLayer, UpcastLayer, ValidateLayer};
use rabbitry::prelude::*;
use rabbitry::{Condition, Rate, Registration};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

#[path = "../tests/support/cleanup.rs"]
mod cleanup;

const KEY: &str = "bench.event";
const IN_FLIGHT: usize = 1000;
const PREFETCH: u16 = 300;
const ACK_EVERY: u64 = 100;
const CONCURRENCY: usize = 32;

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct BenchEvent {
    id: u64,
    sent_at_ns: u64,
    pad: String,
}

impl Event for BenchEvent {
    const TYPE: &'static str = KEY;
}

impl BenchEvent {
    fn new(id: u64) -> BenchEvent {
        BenchEvent {
            id,
            sent_at_ns: now_ns(),
            pad: "p".repeat(150),
        }
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| rabbitry::DEFAULT_URL.into())
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// CPU seconds used so far by the RabbitMQ node (beam.smp), if it runs on this machine.
fn broker_cpu_seconds() -> Option<f64> {
    let pid = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            (cmdline.contains("beam.smp") && cmdline.contains("rabbit")).then(|| entry.file_name())
        })?;
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.to_string_lossy())).ok()?;
    // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / per_second)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Imp {
    Raw,
    Rabbitry,
}

impl Imp {
    fn name(self) -> &'static str {
        match self {
            Imp::Raw => "raw",
            Imp::Rabbitry => "rabbitry",
        }
    }
}

/// The rabbitry worker's subscription; the parent declares it, the child consumes with it.
fn subscription(queue: &str) -> Subscription {
    Subscription::new(queue)
        .bind(KEY)
        .prefetch(PREFETCH)
        .concurrency(CONCURRENCY)
        .retry(RetryPolicy::exponential(Duration::from_millis(1)).max_attempts(3))
}

/// What a consumer child reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Consumed {
    handled: u64,
    secs: f64,
    cpu_secs: f64,
    peak_rss_kib: u64,
    p50_us: u64,
    p99_us: u64,
}

// ---------------------------------------------------------------- child: a consumer process

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(handled: u64, started: Instant, cpu_at_start: f64, mut latencies_ns: Vec<u64>) {
    if std::env::var_os("BENCH_RSS_DETAIL").is_some() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        for line in status
            .lines()
            .filter(|l| l.starts_with("Rss") || l.starts_with("VmHWM"))
        {
            eprintln!("{line}");
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu_secs = cpu_seconds() - cpu_at_start;
    latencies_ns.sort_unstable();
    let result = Consumed {
        handled,
        secs,
        cpu_secs,
        peak_rss_kib: peak_rss_kib(),
        p50_us: percentile(&latencies_ns, 0.50) / 1000,
        p99_us: percentile(&latencies_ns, 0.99) / 1000,
    };
    println!("result {}", serde_json::to_string(&result).unwrap());
}

struct BenchWorker {
    queue: String,
    target: u64,
    fail_every: Option<u64>,
    handled: AtomicU64,
    latencies: Mutex<Vec<u64>>,
    done: tokio::sync::Notify,
}

impl Worker for BenchWorker {
    type Event = BenchEvent;

    fn subscription(&self) -> Subscription {
        subscription(&self.queue)
    }

    async fn handle(&self, event: Delivery<BenchEvent>, _ctx: &Context) -> Outcome {
        if event.attempt() == 1 && self.fail_every.is_some_and(|k| event.id % k == 0) {
            return Err(Failure::retry("failing once"));
        }
        let latency = now_ns().saturating_sub(event.sent_at_ns);
        self.latencies.lock().unwrap().push(latency);
        if self.handled.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            self.done.notify_one();
        }
        Ok(())
    }
}

/// The five layers of the middleware benchmark, none of which changes the outcome: a
/// filter that keeps everything, JSON Schema validation, an upcast with nothing to do
/// (the events are at their version), in-process de-duplication and an unlimited rate
/// limit.
fn five_layers(worker: Shared) -> Registration {
    Registration::new(worker)
        .layer(FilterLayer::new(Condition::event_type(KEY)))
        .layer(ValidateLayer::of::<BenchEvent>().expect("the schema compiles"))
        .layer(UpcastLayer::of::<BenchEvent>())
        .layer(DedupLayer::new())
        .layer(RateLimitLayer::new(
            Rate::per_second(1_000_000_000).unwrap().burst(u32::MAX),
        ))
}

async fn consume_rabbitry(
    exchange: &str,
    queue: &str,
    target: u64,
    fail_every: Option<u64>,
    layers: bool,
) {
    let worker = std::sync::Arc::new(BenchWorker {
        queue: queue.into(),
        target,
        fail_every,
        handled: AtomicU64::new(0),
        latencies: Mutex::new(Vec::with_capacity(target as usize)),
        done: tokio::sync::Notify::new(),
    });
    let runtime = Runtime::builder()
        .url(url())
        .exchange(exchange)
        .worker(match layers {
            true => five_layers(Shared(worker.clone())),
            false => Registration::new(Shared(worker.clone())),
        })
        .start()
        .await
        .expect("runtime starts");
    let (started, cpu) = (Instant::now(), cpu_seconds());
    println!("ready");
    worker.done.notified().await;
    let latencies = std::mem::take(&mut *worker.latencies.lock().unwrap());
    report(
        worker.handled.load(Ordering::Relaxed),
        started,
        cpu,
        latencies,
    );
    runtime.shutdown().await;
}

/// Lets the child keep a handle on its worker's counters.
struct Shared(std::sync::Arc<BenchWorker>);

impl Worker for Shared {
    type Event = BenchEvent;
    fn subscription(&self) -> Subscription {
        self.0.subscription()
    }
    async fn handle(&self, event: Delivery<BenchEvent>, ctx: &Context) -> Outcome {
        self.0.handle(event, ctx).await
    }
}

async fn consume_raw(queue: &str, target: u64) {
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (started, cpu) = (Instant::now(), cpu_seconds());
    println!("ready");
    let mut latencies = Vec::with_capacity(target as usize);
    let mut handled = 0u64;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.unwrap();
        let event: BenchEvent = serde_json::from_slice(&delivery.data).unwrap();
        latencies.push(now_ns().saturating_sub(event.sent_at_ns));
        handled += 1;
        if handled % ACK_EVERY == 0 || handled == target {
            ch.basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .unwrap();
        }
        if handled == target {
            break;
        }
    }
    report(handled, started, cpu, latencies);
    let _ = conn.close(200, "OK".into()).await;
}

fn child(args: &[String]) {
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let imp = arg("--imp").expect("--imp");
    let exchange = arg("--exchange").expect("--exchange");
    let queue = arg("--queue").expect("--queue");
    let count: u64 = arg("--count").expect("--count").parse().unwrap();
    let fail_every = arg("--fail-every").map(|v| v.parse().unwrap());
    let layers = args.iter().any(|a| a == "--layers");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        match imp.as_str() {
            "raw" => consume_raw(&queue, count).await,
            _ => consume_rabbitry(&exchange, &queue, count, fail_every, layers).await,
        }
    });
}

// ---------------------------------------------------------------- parent: publish and measure

struct Names {
    exchange: String,
    queue: String,
}

impl Names {
    fn new(imp: Imp, round: usize) -> Names {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let prefix = format!("bench.{}.{round}.{}", imp.name(), &id[id.len() - 6..]);
        Names {
            exchange: format!("{prefix}.events"),
            queue: format!("{prefix}.queue"),
        }
    }
}

async fn declare(imp: Imp, names: &Names) {
    match imp {
        Imp::Rabbitry => Runtime::builder()
            .url(url())
            .exchange(&names.exchange)
            .worker(Shared(std::sync::Arc::new(BenchWorker {
                queue: names.queue.clone(),
                target: 0,
                fail_every: None,
                handled: AtomicU64::new(0),
                latencies: Mutex::new(Vec::new()),
                done: tokio::sync::Notify::new(),
            })))
            .declare()
            .await
            .unwrap(),
        Imp::Raw => {
            let conn = Connection::connect(&url(), ConnectionProperties::default())
                .await
                .unwrap();
            let ch = conn.create_channel().await.unwrap();
            let durable = ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            };
            ch.exchange_declare(
                names.exchange.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .unwrap();
            let durable = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            ch.queue_declare(names.queue.as_str().into(), durable, FieldTable::default())
                .await
                .unwrap();
            ch.queue_bind(
                names.queue.as_str().into(),
                names.exchange.as_str().into(),
                KEY.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
            let _ = conn.close(200, "OK".into()).await;
        }
    }
}

async fn cleanup(names: &Names) {
    let sub = subscription(&names.queue);
    let queues = rabbitry::Topology::new(&names.exchange, [&sub])
        .queues()
        .map(str::to_owned)
        .collect();
    let exchanges = vec![names.exchange.clone(), format!("{}.dlx", names.exchange)];
    tokio::task::spawn_blocking(move || cleanup::delete(&url(), queues, exchanges))
        .await
        .unwrap();
}

/// Publish `count` events with about `IN_FLIGHT` confirms outstanding; returns msgs/s.
async fn publish(imp: Imp, names: &Names, count: u64) -> f64 {
    match imp {
        Imp::Raw => {
            let conn = Connection::connect(&url(), ConnectionProperties::default())
                .await
                .unwrap();
            let ch = conn.create_channel().await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            let started = Instant::now();
            let mut confirms = FuturesUnordered::new();
            for id in 0..count {
                let body = serde_json::to_vec(&BenchEvent::new(id)).unwrap();
                // What a careful hand-written producer sends: persistent JSON with an id for
                // idempotency, its type and a timestamp.
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_message_id(uuid::Uuid::now_v7().to_string().into())
                    .with_type(KEY.into())
                    .with_timestamp(now_ns() / 1_000_000_000);
                let confirm = ch
                    .basic_publish(
                        names.exchange.as_str().into(),
                        KEY.into(),
                        BasicPublishOptions::default(),
                        &body,
                        props,
                    )
                    .await
                    .unwrap();
                confirms.push(confirm);
                if confirms.len() >= IN_FLIGHT {
                    assert!(confirms.next().await.unwrap().unwrap().is_ack());
                }
            }
            while let Some(c) = confirms.next().await {
                assert!(c.unwrap().is_ack());
            }
            let rate = count as f64 / started.elapsed().as_secs_f64();
            let _ = conn.close(200, "OK".into()).await;
            rate
        }
        Imp::Rabbitry => {
            let publisher = Publisher::builder(url())
                .exchange(&names.exchange)
                .connect()
                .await
                .unwrap();
            let started = Instant::now();
            let mut sends = stream::iter(0..count)
                .map(|id| {
                    let publisher = &publisher;
                    async move { publisher.publish(&BenchEvent::new(id)).await }
                })
                .buffer_unordered(IN_FLIGHT);
            while let Some(sent) = sends.next().await {
                sent.unwrap();
            }
            let rate = count as f64 / started.elapsed().as_secs_f64();
            publisher.close().await;
            rate
        }
    }
}

/// Sustained publishing from one task: rabbitry's `Pipeline` keeps `IN_FLIGHT` confirms in
/// flight across its `send` calls, serializing each event as it goes. (The raw side of this
/// row is the raw publish loop above, which is already a single task.)
async fn publish_sustained(names: &Names, count: u64) -> f64 {
    let publisher = Publisher::builder(url())
        .exchange(&names.exchange)
        .connect()
        .await
        .unwrap();
    let started = Instant::now();
    let mut pipeline = publisher.pipeline().window(IN_FLIGHT);
    for id in 0..count {
        pipeline.send(&BenchEvent::new(id)).await.unwrap();
    }
    assert_eq!(pipeline.flush().await.unwrap(), count as usize);
    let rate = count as f64 / started.elapsed().as_secs_f64();
    drop(pipeline);
    publisher.close().await;
    rate
}

/// The same single-task loop written with amqprs, the other Rust AMQP client: publish,
/// keep `IN_FLIGHT` confirms outstanding (counted by its confirm callback), wait for all.
async fn publish_amqprs(names: &Names, count: u64) -> f64 {
    use amqprs::channel::{BasicPublishArguments, ConfirmSelectArguments};
    use amqprs::connection::{Connection, OpenConnectionArguments};

    /// Gives back one window permit per confirmed message.
    struct Window {
        permits: std::sync::Arc<tokio::sync::Semaphore>,
        confirmed_up_to: u64,
        single: std::collections::BTreeSet<u64>,
    }
    impl Window {
        fn confirm(&mut self, tag: u64, multiple: bool) {
            let released = if multiple {
                let above = self.single.split_off(&(tag + 1));
                let counted = self.single.len() as u64;
                self.single = above;
                let n = tag.saturating_sub(self.confirmed_up_to) - counted;
                self.confirmed_up_to = self.confirmed_up_to.max(tag);
                n
            } else {
                self.single.insert(tag);
                1
            };
            while self.single.remove(&(self.confirmed_up_to + 1)) {
                self.confirmed_up_to += 1;
            }
            self.permits.add_permits(released as usize);
        }
    }
    #[async_trait::async_trait]
    impl amqprs::callbacks::ChannelCallback for Window {
        async fn close(
            &mut self,
            _: &amqprs::channel::Channel,
            close: amqprs::CloseChannel,
        ) -> Result<(), amqprs::error::Error> {
            panic!("amqprs channel closed: {close}");
        }
        async fn cancel(
            &mut self,
            _: &amqprs::channel::Channel,
            _: amqprs::Cancel,
        ) -> Result<(), amqprs::error::Error> {
            Ok(())
        }
        async fn flow(
            &mut self,
            _: &amqprs::channel::Channel,
            active: bool,
        ) -> Result<bool, amqprs::error::Error> {
            Ok(active)
        }
        async fn publish_ack(&mut self, _: &amqprs::channel::Channel, ack: amqprs::Ack) {
            self.confirm(ack.delivery_tag(), ack.mutiple());
        }
        async fn publish_nack(&mut self, _: &amqprs::channel::Channel, nack: amqprs::Nack) {
            panic!("amqprs publish nacked: {}", nack.delivery_tag());
        }
        async fn publish_return(
            &mut self,
            _: &amqprs::channel::Channel,
            _: amqprs::Return,
            _: amqprs::BasicProperties,
            _: Vec<u8>,
        ) {
        }
    }

    // amqp://user:password@host:port/vhost, the parts this bench needs.
    let url = url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let (auth, rest) = rest.split_once('@').unwrap_or(("guest:guest", rest));
    let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
    let hostport = rest.split('/').next().unwrap_or("127.0.0.1:5672");
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "5672"));
    let args = OpenConnectionArguments::new(host, port.parse().unwrap(), user, password);
    let conn = Connection::open(&args).await.unwrap();
    let ch = conn.open_channel(None).await.unwrap();
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    ch.register_callback(Window {
        permits: permits.clone(),
        confirmed_up_to: 0,
        single: Default::default(),
    })
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    let started = Instant::now();
    for id in 0..count {
        permits.acquire().await.unwrap().forget();
        let body = serde_json::to_vec(&BenchEvent::new(id)).unwrap();
        let props = amqprs::BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json")
            .with_message_id(&uuid::Uuid::now_v7().to_string())
            .with_message_type(KEY)
            .with_timestamp(now_ns() / 1_000_000_000)
            .finish();
        ch.basic_publish(
            props,
            body,
            BasicPublishArguments::new(&names.exchange, KEY),
        )
        .await
        .unwrap();
    }
    // Every confirm is in once the whole window is free again.
    let _all = permits.acquire_many(IN_FLIGHT as u32).await.unwrap();
    let rate = count as f64 / started.elapsed().as_secs_f64();
    let _ = ch.close().await;
    let _ = conn.close().await;
    rate
}

/// `publish_batch`: a slice of events sent through a pipeline.
async fn publish_batch(names: &Names, count: u64) -> f64 {
    let publisher = Publisher::builder(url())
        .exchange(&names.exchange)
        .connect()
        .await
        .unwrap();
    let started = Instant::now();
    let events: Vec<BenchEvent> = (0..count).map(BenchEvent::new).collect();
    publisher.publish_batch(&events).await.unwrap();
    let rate = count as f64 / started.elapsed().as_secs_f64();
    publisher.close().await;
    rate
}

struct Child {
    process: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

async fn spawn_consumer(
    imp: Imp,
    names: &Names,
    count: u64,
    fail_every: Option<u64>,
    layers: bool,
) -> Child {
    let mut command = tokio::process::Command::new(std::env::current_exe().unwrap());
    command.args([
        "--child",
        "--imp",
        imp.name(),
        "--exchange",
        &names.exchange,
        "--queue",
        &names.queue,
        "--count",
        &count.to_string(),
    ]);
    if let Some(k) = fail_every {
        command.args(["--fail-every", &k.to_string()]);
    }
    if layers {
        command.arg("--layers");
    }
    let mut process = command
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(process.stdout.take().unwrap()).lines();
    while let Some(line) = lines.next_line().await.unwrap() {
        if line == "ready" {
            return Child { process, lines };
        }
    }
    panic!("the consumer child exited before it was ready");
}

async fn finish(mut child: Child) -> Consumed {
    while let Some(line) = child.lines.next_line().await.unwrap() {
        if let Some(json) = line.strip_prefix("result ") {
            let result = serde_json::from_str(json).unwrap();
            child.process.wait().await.unwrap();
            return result;
        }
    }
    panic!("the consumer child exited without a result");
}

#[derive(Default)]
struct Samples(BTreeMap<(&'static str, Imp), Vec<f64>>);

impl Samples {
    fn add(&mut self, what: &'static str, imp: Imp, value: f64) {
        self.0.entry((what, imp)).or_default().push(value);
    }

    fn median(&self, what: &'static str, imp: Imp) -> Option<f64> {
        let mut v = self.0.get(&(what, imp))?.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        Some(v[v.len() / 2])
    }
}

async fn round(round: usize, count: u64, samples: &mut Samples) {
    // Alternate who goes first, so that drift in the broker's state favours neither.
    let order = if round % 2 == 1 {
        [Imp::Raw, Imp::Rabbitry]
    } else {
        [Imp::Rabbitry, Imp::Raw]
    };
    for imp in order {
        // S1: publish into a queue with no consumer, then consume it from a child process.
        let names = Names::new(imp, round);
        declare(imp, &names).await;
        let rate = publish(imp, &names, count).await;
        samples.add("publish", imp, rate);
        let consumed = finish(spawn_consumer(imp, &names, count, None, false).await).await;
        samples.add("consume", imp, consumed.handled as f64 / consumed.secs);
        samples.add(
            "cpu_us",
            imp,
            consumed.cpu_secs * 1e6 / consumed.handled as f64,
        );
        samples.add("rss_mib", imp, consumed.peak_rss_kib as f64 / 1024.0);
        if imp == Imp::Rabbitry {
            declare(imp, &names).await;
            samples.add("publish_batch", imp, publish_batch(&names, count).await);
            // The same pre-filled queue, consumed through five layers.
            let layered = finish(spawn_consumer(imp, &names, count, None, true).await).await;
            add_layered(samples, &layered);
        }
        cleanup(&names).await;
        // Sustained publishing from one task, into an empty queue as above.
        let names = Names::new(imp, round);
        declare(imp, &names).await;
        let rate = match imp {
            Imp::Raw => publish(imp, &names, count).await,
            Imp::Rabbitry => publish_sustained(&names, count).await,
        };
        samples.add("sustained", imp, rate);
        cleanup(&names).await;
        if imp == Imp::Raw {
            let names = Names::new(imp, round);
            declare(imp, &names).await;
            samples.add("sustained_amqprs", imp, publish_amqprs(&names, count).await);
            cleanup(&names).await;
        }

        // S1 end-to-end (and S2 for rabbitry): producer and consumer at once.
        let mut runs = vec![("e2e", None)];
        if imp == Imp::Rabbitry {
            runs.push(("s2", Some(10)));
        }
        for (what, fail_every) in runs {
            let names = Names::new(imp, round);
            declare(imp, &names).await;
            let child = spawn_consumer(imp, &names, count, fail_every, false).await;
            let (started, broker_cpu) = (Instant::now(), broker_cpu_seconds());
            publish(imp, &names, count).await;
            let consumed = finish(child).await;
            let secs = started.elapsed().as_secs_f64();
            samples.add(what, imp, count as f64 / secs);
            if let (Some(before), Some(after)) = (broker_cpu, broker_cpu_seconds()) {
                let key = if what == "e2e" {
                    "broker_us"
                } else {
                    "s2_broker_us"
                };
                samples.add(key, imp, (after - before) * 1e6 / count as f64);
            }
            samples.add(
                if what == "e2e" { "p50_ms" } else { "s2_p50_ms" },
                imp,
                consumed.p50_us as f64 / 1000.0,
            );
            samples.add(
                if what == "e2e" { "p99_ms" } else { "s2_p99_ms" },
                imp,
                consumed.p99_us as f64 / 1000.0,
            );
            cleanup(&names).await;
        }
        eprintln!("round {round}: {} done", imp.name());
    }
}

fn add_layered(samples: &mut Samples, consumed: &Consumed) {
    let rate = consumed.handled as f64 / consumed.secs;
    samples.add("consume_layers", Imp::Rabbitry, rate);
    let cpu = consumed.cpu_secs * 1e6 / consumed.handled as f64;
    samples.add("cpu_us_layers", Imp::Rabbitry, cpu);
}

/// The middleware rows: rabbitry's worker through five layers against the bare worker.
fn layers_table(samples: &Samples) {
    let get = |what| samples.median(what, Imp::Rabbitry);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "—".into(),
    };
    let fmt =
        |v: Option<f64>, digits: usize| v.map_or("—".to_string(), |v| format!("{v:.digits$}"));
    println!();
    println!(
        "| middleware (consume from a pre-filled queue) | bare worker | five layers | layers / bare | target |"
    );
    println!("|---|---:|---:|---:|---|");
    println!(
        "| msgs/s | {} | {} | {} | >= 0.90 |",
        fmt(get("consume"), 0),
        fmt(get("consume_layers"), 0),
        ratio(get("consume_layers"), get("consume"))
    );
    println!(
        "| consumer CPU per message, µs | {} | {} | {} | <= 1.50 |",
        fmt(get("cpu_us"), 2),
        fmt(get("cpu_us_layers"), 2),
        ratio(get("cpu_us_layers"), get("cpu_us"))
    );
}

/// Only the middleware comparison: bare and layered consumers of the same pre-filled
/// queue size, alternating which goes first.
async fn layers_only(count: u64, rounds: usize) -> Samples {
    let mut samples = Samples::default();
    for round in 1..=rounds {
        let order = if round % 2 == 1 {
            [false, true]
        } else {
            [true, false]
        };
        for layers in order {
            let names = Names::new(Imp::Rabbitry, round);
            declare(Imp::Rabbitry, &names).await;
            publish(Imp::Rabbitry, &names, count).await;
            let consumed =
                finish(spawn_consumer(Imp::Rabbitry, &names, count, None, layers).await).await;
            match layers {
                true => add_layered(&mut samples, &consumed),
                false => {
                    samples.add(
                        "consume",
                        Imp::Rabbitry,
                        consumed.handled as f64 / consumed.secs,
                    );
                    samples.add(
                        "cpu_us",
                        Imp::Rabbitry,
                        consumed.cpu_secs * 1e6 / consumed.handled as f64,
                    );
                }
            }
            cleanup(&names).await;
        }
        eprintln!("round {round} done");
    }
    samples
}

fn table(samples: &Samples, count: u64, rounds: usize) {
    let get = |what, imp| samples.median(what, imp);
    let fmt =
        |v: Option<f64>, digits: usize| v.map_or("—".to_string(), |v| format!("{v:.digits$}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "—".into(),
    };
    println!();
    println!(
        "{count} persistent ~200-byte JSON events per measurement; median of {rounds} round(s)"
    );
    println!(
        "raw lapin: {IN_FLIGHT} confirms in flight, prefetch {PREFETCH}, one multiple-ack per {ACK_EVERY}; \
         its messages carry the same standard properties (persistent, content type, message id, type, timestamp)"
    );
    println!(
        "rabbitry: concurrent publish() calls ({IN_FLIGHT} in flight); worker prefetch {PREFETCH}, concurrency {CONCURRENCY}"
    );
    println!();
    println!("| measure | raw lapin | rabbitry | rabbitry / raw | target |");
    println!("|---|---:|---:|---:|---|");
    let rows: [(&str, &'static str, usize, &str); 5] = [
        (
            "S1 publish, msgs/s (1000 confirms in flight)",
            "publish",
            0,
            ">= 0.95",
        ),
        (
            "S1 consume from a pre-filled queue, msgs/s",
            "consume",
            0,
            ">= 0.90",
        ),
        ("S1 end-to-end, msgs/s", "e2e", 0, ">= 0.95"),
        ("S1 consumer CPU per message, µs", "cpu_us", 2, "<= 1.30"),
        ("S1 consumer peak RSS, MiB", "rss_mib", 1, "rabbitry <= 16"),
    ];
    for (label, what, digits, target) in rows {
        let (raw, rab) = (get(what, Imp::Raw), get(what, Imp::Rabbitry));
        println!(
            "| {label} | {} | {} | {} | {target} |",
            fmt(raw, digits),
            fmt(rab, digits),
            ratio(rab, raw)
        );
    }
    for (label, what) in [
        ("S1 latency p50, ms", "p50_ms"),
        ("S1 latency p99, ms", "p99_ms"),
    ] {
        let (raw, rab) = (get(what, Imp::Raw), get(what, Imp::Rabbitry));
        println!(
            "| {label} | {} | {} | {} | |",
            fmt(raw, 1),
            fmt(rab, 1),
            ratio(rab, raw)
        );
    }
    println!(
        "| S1 publish_batch, msgs/s | — | {} | {} | |",
        fmt(get("publish_batch", Imp::Rabbitry), 0),
        ratio(
            get("publish_batch", Imp::Rabbitry),
            get("publish", Imp::Raw)
        )
    );
    println!(
        "| S1 sustained publish from one task, msgs/s (raw loop / `Pipeline`) | {} | {} | {} | >= 1.00 |",
        fmt(get("sustained", Imp::Raw), 0),
        fmt(get("sustained", Imp::Rabbitry), 0),
        ratio(get("sustained", Imp::Rabbitry), get("sustained", Imp::Raw))
    );
    println!(
        "| S1 sustained publish, raw amqprs loop, msgs/s | {} | — | {} (rabbitry / amqprs) | aim |",
        fmt(get("sustained_amqprs", Imp::Raw), 0),
        ratio(
            get("sustained", Imp::Rabbitry),
            get("sustained_amqprs", Imp::Raw)
        )
    );
    let (s2, s1) = (get("s2", Imp::Rabbitry), get("e2e", Imp::Rabbitry));
    println!(
        "| S2 end-to-end, 10% fail once, msgs/s | — | {} | {} (of rabbitry S1) | >= 0.90 |",
        fmt(s2, 0),
        ratio(s2, s1)
    );
    println!(
        "| broker CPU per message end-to-end, µs (S1 raw, S1 rabbitry / S2 rabbitry) | {} | {} / {} | | |",
        fmt(get("broker_us", Imp::Raw), 1),
        fmt(get("broker_us", Imp::Rabbitry), 1),
        fmt(get("s2_broker_us", Imp::Rabbitry), 1)
    );
    println!(
        "| S2 latency p50 / p99, ms | — | {} / {} | | |",
        fmt(get("s2_p50_ms", Imp::Rabbitry), 1),
        fmt(get("s2_p99_ms", Imp::Rabbitry), 1)
    );
}

async fn publish_only(count: u64, rounds: usize, only: Option<&str>) {
    let mut rows: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for round in 0..rounds {
        let mut order = ["raw lapin loop", "rabbitry Pipeline", "raw amqprs loop"];
        order.rotate_left(round % 3);
        for who in order
            .into_iter()
            .filter(|w| only.is_none_or(|o| w.contains(o)))
        {
            let imp = if who.starts_with("rabbitry") {
                Imp::Rabbitry
            } else {
                Imp::Raw
            };
            let names = Names::new(imp, round);
            declare(imp, &names).await;
            let cpu = cpu_seconds();
            let rate = match who {
                "raw lapin loop" => publish(Imp::Raw, &names, count).await,
                "rabbitry Pipeline" => publish_sustained(&names, count).await,
                _ => publish_amqprs(&names, count).await,
            };
            let cpu_us = (cpu_seconds() - cpu) * 1e6 / count as f64;
            rows.entry(who).or_default().push((rate, cpu_us));
            cleanup(&names).await;
        }
    }
    println!("| publisher | msgs/s (median) | publisher CPU µs/msg (median) |");
    println!("|---|---:|---:|");
    for (who, mut v) in rows {
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let mut rates: Vec<f64> = v.iter().map(|r| r.0).collect();
        let mut cpus: Vec<f64> = v.drain(..).map(|r| r.1).collect();
        println!(
            "| {who} | {:.0} | {:.2} |",
            median(&mut rates),
            median(&mut cpus)
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        return child(&args[i + 1..]);
    }
    let arg = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let count = arg("--count", 100_000);
    let rounds = arg("--rounds", 3) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if args.iter().any(|a| a == "--prefill") {
        // For profiling a consumer alone: declare and fill a queue (left for that run),
        // and print the arguments that consume it in a child process.
        let names = Names::new(Imp::Rabbitry, 0);
        rt.block_on(async {
            declare(Imp::Rabbitry, &names).await;
            publish(Imp::Rabbitry, &names, count).await;
        });
        println!(
            "--child --imp rabbitry --exchange {} --queue {} --count {count}",
            names.exchange, names.queue
        );
        return;
    }
    if args.iter().any(|a| a == "--layers-only") {
        // The middleware comparison alone (also part of the full run).
        let samples = rt.block_on(layers_only(count, rounds));
        println!("{count} events per measurement; median of {rounds} round(s)");
        layers_table(&samples);
        return;
    }
    if args.iter().any(|a| a == "--publish-only") {
        // A quick look at publishing from one task: rate and the publishing process's CPU
        // per message, for each client (or `--only lapin|rabbitry|amqprs`), alternating who
        // goes first.
        let only = args
            .iter()
            .position(|a| a == "--only")
            .and_then(|i| args.get(i + 1));
        rt.block_on(publish_only(count, rounds, only.map(String::as_str)));
        return;
    }
    let mut samples = Samples::default();
    rt.block_on(async {
        for r in 1..=rounds {
            round(r, count, &mut samples).await;
        }
    });
    table(&samples, count, rounds);
    layers_table(&samples);
}
