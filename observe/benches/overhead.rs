//! What observability costs: consumer (and publisher) CPU per message on RabbitMQ with
//! metrics and tracing on (Prometheus recorder, W3C propagation, an OpenTelemetry layer
//! with a tracer provider that exports nothing) against off, in the same run.
//!
//! ```text
//! cargo bench -p rabbitry-observe --bench overhead            # 50 000 messages, 5 rounds
//! BENCH_MESSAGES=100000 BENCH_ROUNDS=7 cargo bench -p rabbitry-observe --bench overhead
//! BENCH_CONFIGS=off,on cargo bench -p rabbitry-observe --bench overhead   # two of the three
//! ```
//!
//! Each measurement runs in a fresh child process (a process has one global `tracing`
//! subscriber), alternating the configurations round by round. A child pre-fills its own
//! queue with confirmed publishes, then starts a runtime with a no-op worker and counts the
//! process's CPU time (user + system, `getrusage`) until every message was handled. The
//! event and the consumer are S1's of `benches/throughput.rs` (about 200 bytes of JSON,
//! prefetch 300, concurrency 32, a handler that does nothing with it). Every configuration
//! logs to a sink at `info` (what a service does); `metrics` adds the `Observability`
//! observer on the runtime and the publisher; `on` adds the OpenTelemetry layer too
//! (`trace_layer`, a tracer provider without an exporter).

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use opentelemetry_sdk::trace::SdkTracerProvider;
use rabbitry::prelude::*;
use rabbitry_observe::{Observability, RuntimeBuilderExt};
use tokio::sync::Notify;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[path = "../../benches/support/s1.rs"]
mod s1;

use s1::{Counter, Tick};

fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole `rusage` into the pointer it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// One measurement in this process: prints `publish_us consume_us consume_rate`.
async fn child(config: &str, messages: usize) {
    // `metrics`: the observer alone (metrics, readiness, propagation with nothing to
    // propagate); `on`: the observer and the OpenTelemetry layer.
    let on = config != "off";
    let sink = tracing_subscriber::fmt::layer()
        .with_writer(std::io::sink)
        .with_filter(EnvFilter::new("info"));
    let provider = SdkTracerProvider::builder().build();
    let traces = (config == "on").then(|| {
        rabbitry_observe::trace_layer(&provider)
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    tracing_subscriber::registry()
        .with(sink)
        .with(traces)
        .init();

    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| rabbitry::DEFAULT_URL.into());
    let id = uuid::Uuid::now_v7().simple().to_string();
    let exchange = format!("bench.overhead.{}", &id[id.len() - 8..]);
    let queue = format!("{exchange}.q");
    let observability = Observability::new();
    let done = Arc::new((AtomicUsize::new(0), Notify::new()));
    let counter = || Counter {
        queue: queue.clone(),
        done: done.clone(),
        total: messages,
    };
    let builder = || {
        Runtime::builder()
            .url(&url)
            .exchange(&exchange)
            .worker(counter())
    };
    // Declare first (so the queue exists), publish, then consume.
    builder().declare().await.unwrap();
    let mut publisher = Publisher::builder(&url).exchange(&exchange);
    if on {
        publisher = publisher.observer(observability.clone());
    }
    let publisher = publisher.connect().await.unwrap();
    let before = cpu_time();
    let mut pipeline = publisher.pipeline();
    for id in 0..messages as u64 {
        pipeline.send(&Tick::new(id)).await.unwrap();
    }
    pipeline.flush().await.unwrap();
    let publish = cpu_time() - before;

    let (before, started) = (cpu_time(), Instant::now());
    let builder = match on {
        true => builder().observability(&observability),
        false => builder(),
    };
    let runtime = builder.start().await.unwrap();
    let notified = done.1.notified();
    if done.0.load(Ordering::Relaxed) < messages {
        notified.await;
    }
    let (consume, wall) = (cpu_time() - before, started.elapsed());
    runtime.shutdown().await;
    publisher.close().await;
    drop(provider);
    cleanup(&url, &exchange, &queue).await;
    let per = |d: Duration| d.as_secs_f64() * 1e6 / messages as f64;
    println!(
        "{:.3} {:.3} {:.0}",
        per(publish),
        per(consume),
        messages as f64 / wall.as_secs_f64()
    );
}

async fn cleanup(url: &str, exchange: &str, queue: &str) {
    let conn = lapin::Connection::connect(url, Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    // Every queue the worker's topology declares (retry tiers, DLQ), and its record.
    let subscription = Subscription::new(queue);
    let plan = rabbitry::Topology::new(exchange, [&subscription]);
    let mut queues: Vec<String> = plan.queues().map(str::to_owned).collect();
    queues.push(format!("{queue}.topology"));
    for q in queues {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    for e in [exchange.to_owned(), format!("{exchange}.dlx")] {
        let _ = ch
            .exchange_delete(e.as_str().into(), Default::default())
            .await;
    }
}

/// The median (`NaN` for a configuration that was not run: `BENCH_CONFIGS`).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let messages = env("BENCH_MESSAGES", 50_000);
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let config = args[i + 1].clone();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(child(&config, messages));
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for the list of benchmarks
    }
    let rounds = env("BENCH_ROUNDS", 5);
    let exe = std::env::current_exe().unwrap();
    let wanted = std::env::var("BENCH_CONFIGS").unwrap_or_else(|_| "off,metrics,on".into());
    let configs: Vec<&str> = ["off", "metrics", "on"]
        .into_iter()
        .filter(|c| wanted.split(',').any(|w| w == *c))
        .collect();
    let mut results: [(Vec<f64>, Vec<f64>, Vec<f64>); 3] = Default::default();
    println!("{messages} messages per run, {rounds} rounds, configurations alternating");
    for round in 0..rounds {
        for config in &configs {
            let i = ["off", "metrics", "on"]
                .iter()
                .position(|c| c == config)
                .unwrap();
            let out = Command::new(&exe)
                .args(["--child", config])
                .output()
                .expect("the child runs");
            assert!(
                out.status.success(),
                "child {config} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let line = String::from_utf8_lossy(&out.stdout);
            let v: Vec<f64> = line
                .split_whitespace()
                .map(|x| x.parse().unwrap())
                .collect();
            println!(
                "round {round} {config:>7}: publish {:.2} µs/msg CPU, consume {:.2} µs/msg CPU, {:.0} msg/s",
                v[0], v[1], v[2]
            );
            results[i].0.push(v[0]);
            results[i].1.push(v[1]);
            results[i].2.push(v[2]);
        }
    }
    let medians: Vec<[f64; 3]> = results
        .into_iter()
        .map(|(p, c, r)| [median(p), median(c), median(r)])
        .collect();
    let (off, metrics, on) = (medians[0], medians[1], medians[2]);
    println!();
    println!(
        "| median of {rounds} rounds | off | metrics | metrics + tracing | metrics / off | metrics + tracing / off |"
    );
    println!("|---|---|---|---|---|---|");
    let rows = [
        ("consumer CPU per message (µs)", 1),
        ("publisher CPU per message (µs)", 0),
        ("consume rate (msg/s)", 2),
    ];
    for (name, i) in rows {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} |",
            off[i],
            metrics[i],
            on[i],
            metrics[i] / off[i],
            on[i] / off[i]
        );
    }
}
