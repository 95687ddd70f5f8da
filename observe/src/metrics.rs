//! The Prometheus metrics of a runtime, kept in a recorder of their own.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use rabbitry::QueueDepth;
use rabbitry::observe::{Handling, PublishOutcome};

/// `rabbitry_deliveries_total{worker, event_type, outcome}`.
pub const DELIVERIES: &str = "rabbitry_deliveries_total";
/// `rabbitry_handler_duration_seconds{worker, event_type}`.
pub const HANDLER_DURATION: &str = "rabbitry_handler_duration_seconds";
/// `rabbitry_in_flight{worker}`.
pub const IN_FLIGHT: &str = "rabbitry_in_flight";
/// `rabbitry_published_total{exchange, outcome}`.
pub const PUBLISHED: &str = "rabbitry_published_total";
/// `rabbitry_queue_messages{queue, state}`.
pub const QUEUE_MESSAGES: &str = "rabbitry_queue_messages";
/// `rabbitry_consumers{queue}`.
pub const CONSUMERS: &str = "rabbitry_consumers";
/// `rabbitry_connection_up`.
pub const CONNECTION_UP: &str = "rabbitry_connection_up";
/// `rabbitry_reconnects_total`.
pub const RECONNECTS: &str = "rabbitry_reconnects_total";

/// The buckets of [`HANDLER_DURATION`], in seconds: 1 ms to 120 s.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Distinct `event_type` label values per worker; the type comes from the producer (AMQP
/// `type`), so past this many the rest are counted as `other`.
pub const MAX_EVENT_TYPES: usize = 64;
/// Longest `event_type` label value; longer types are counted as `other`.
const MAX_EVENT_TYPE_LEN: usize = 128;

/// Every outcome label of [`DELIVERIES`], in [`outcome_index`] order.
const OUTCOMES: [&str; 6] = [
    "handled",
    "skipped",
    "retried",
    "dead_lettered",
    "requeued",
    "deferred",
];

static META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// The recorder and the handles of the hot path, cached so a delivery costs no key building.
pub(crate) struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    workers: RwLock<HashMap<String, WorkerMetrics>>,
    exchanges: RwLock<HashMap<String, [Counter; 4]>>,
    connection_up: Gauge,
    reconnects: Counter,
}

struct WorkerMetrics {
    in_flight: Gauge,
    types: HashMap<String, TypeMetrics>,
}

struct TypeMetrics {
    outcomes: [Counter; 6],
    duration: Histogram,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(HANDLER_DURATION.into()), &DURATION_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        describe(&recorder);
        let handle = recorder.handle();
        let connection_up = recorder.register_gauge(&Key::from_static_name(CONNECTION_UP), &META);
        let reconnects = recorder.register_counter(&Key::from_static_name(RECONNECTS), &META);
        Metrics {
            recorder,
            handle,
            workers: RwLock::default(),
            exchanges: RwLock::default(),
            connection_up,
            reconnects,
        }
    }

    /// Everything, in the Prometheus text format.
    pub(crate) fn render(&self) -> String {
        self.handle.render()
    }

    /// Drain what histograms hold between scrapes (call now and then).
    pub(crate) fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    pub(crate) fn received(&self, worker: &str) {
        self.with_worker(worker, |w| w.in_flight.increment(1.0));
    }

    pub(crate) fn settled(
        &self,
        worker: &str,
        event_type: &str,
        handling: &Handling,
        duration: Duration,
    ) {
        let event_type = label_for(event_type);
        let outcome = outcome_index(handling);
        {
            let workers = self.workers.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(w) = workers.get(worker) {
                // `received` made the worker's entry and counted it in flight.
                w.in_flight.decrement(1.0);
                let known = w.types.get(event_type).or_else(|| {
                    (w.types.len() >= MAX_EVENT_TYPES)
                        .then(|| w.types.get("other"))
                        .flatten()
                });
                if let Some(t) = known {
                    return t.record(outcome, handling, duration);
                }
            }
        }
        let mut workers = self.workers.write().unwrap_or_else(PoisonError::into_inner);
        let entry = self.worker_mut(&mut workers, worker);
        let label = if entry.types.len() >= MAX_EVENT_TYPES && !entry.types.contains_key(event_type)
        {
            "other"
        } else {
            event_type
        };
        let types = &mut entry.types;
        let metrics = types
            .entry(label.to_owned())
            .or_insert_with(|| TypeMetrics::new(&self.recorder, worker, label));
        metrics.record(outcome, handling, duration);
    }

    pub(crate) fn published(&self, exchange: &str, outcome: PublishOutcome) {
        let index = match outcome {
            PublishOutcome::Confirmed => 0,
            PublishOutcome::Unroutable => 1,
            PublishOutcome::Nacked => 2,
            _ => 3,
        };
        {
            let exchanges = self
                .exchanges
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(counters) = exchanges.get(exchange) {
                counters[index].increment(1);
                return;
            }
        }
        let mut exchanges = self
            .exchanges
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let counters = exchanges.entry(exchange.to_owned()).or_insert_with(|| {
            ["confirmed", "unroutable", "nacked", "failed"].map(|outcome| {
                let labels = vec![
                    Label::new("exchange", exchange.to_owned()),
                    Label::new("outcome", outcome),
                ];
                self.recorder
                    .register_counter(&Key::from_parts(PUBLISHED, labels), &META)
            })
        });
        counters[index].increment(1);
    }

    pub(crate) fn connection(&self, up: bool) {
        self.connection_up.set(if up { 1.0 } else { 0.0 });
    }

    pub(crate) fn reconnected(&self) {
        self.reconnects.increment(1);
        self.connection(true);
    }

    pub(crate) fn queue_depths(&self, depths: &[QueueDepth]) {
        for depth in depths {
            let queue = depth.queue.clone();
            let ready = Key::from_parts(
                QUEUE_MESSAGES,
                vec![
                    Label::new("queue", queue.clone()),
                    Label::new("state", "ready"),
                ],
            );
            self.recorder
                .register_gauge(&ready, &META)
                .set(f64::from(depth.ready));
            let consumers = Key::from_parts(CONSUMERS, vec![Label::new("queue", queue)]);
            self.recorder
                .register_gauge(&consumers, &META)
                .set(f64::from(depth.consumers));
        }
    }

    /// Make `worker`'s handles now (its in-flight gauge shows 0 until its first delivery).
    pub(crate) fn worker(&self, worker: &str) {
        self.with_worker(worker, |_| {});
    }

    /// Run `f` on `worker`'s handles, making them if needed.
    fn with_worker(&self, worker: &str, f: impl FnOnce(&WorkerMetrics)) {
        {
            let workers = self.workers.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(w) = workers.get(worker) {
                return f(w);
            }
        }
        let mut workers = self.workers.write().unwrap_or_else(PoisonError::into_inner);
        f(self.worker_mut(&mut workers, worker));
    }

    /// `worker`'s handles in `workers`, made if needed.
    fn worker_mut<'a>(
        &self,
        workers: &'a mut HashMap<String, WorkerMetrics>,
        worker: &str,
    ) -> &'a mut WorkerMetrics {
        workers
            .entry(worker.to_owned())
            .or_insert_with(|| WorkerMetrics::new(&self.recorder, worker))
    }
}

impl WorkerMetrics {
    fn new(recorder: &PrometheusRecorder, worker: &str) -> WorkerMetrics {
        let key = Key::from_parts(IN_FLIGHT, vec![Label::new("worker", worker.to_owned())]);
        WorkerMetrics {
            in_flight: recorder.register_gauge(&key, &META),
            types: HashMap::new(),
        }
    }
}

impl TypeMetrics {
    fn new(recorder: &PrometheusRecorder, worker: &str, event_type: &str) -> TypeMetrics {
        let labels = || {
            vec![
                Label::new("worker", worker.to_owned()),
                Label::new("event_type", event_type.to_owned()),
            ]
        };
        let outcomes = OUTCOMES.map(|outcome| {
            let mut labels = labels();
            labels.push(Label::new("outcome", outcome));
            recorder.register_counter(&Key::from_parts(DELIVERIES, labels), &META)
        });
        let duration =
            recorder.register_histogram(&Key::from_parts(HANDLER_DURATION, labels()), &META);
        TypeMetrics { outcomes, duration }
    }

    fn record(&self, outcome: usize, handling: &Handling, duration: Duration) {
        self.outcomes[outcome].increment(1);
        // A requeue is the runtime failing to store a copy, not the handler's time.
        if !matches!(handling, Handling::Requeued) {
            self.duration.record(duration.as_secs_f64());
        }
    }
}

/// The position of `handling`'s label in [`OUTCOMES`].
fn outcome_index(handling: &Handling) -> usize {
    let name = handling.as_str();
    OUTCOMES.iter().position(|o| *o == name).unwrap_or(4)
}

/// The `event_type` label of a delivery's type: `unknown` when it has none, `other` when it
/// is too long to be a type.
fn label_for(event_type: &str) -> &str {
    if event_type.is_empty() {
        "unknown"
    } else if event_type.len() > MAX_EVENT_TYPE_LEN {
        "other"
    } else {
        event_type
    }
}

fn describe(recorder: &PrometheusRecorder) {
    let counter = |name: &'static str, text: &'static str| {
        recorder.describe_counter(KeyName::from_const_str(name), None, text.into());
    };
    let gauge = |name: &'static str, text: &'static str| {
        recorder.describe_gauge(KeyName::from_const_str(name), None, text.into());
    };
    counter(
        DELIVERIES,
        "Deliveries settled, by worker, event type and outcome (handled, skipped, retried, dead_lettered, requeued, deferred).",
    );
    recorder.describe_histogram(
        KeyName::from_const_str(HANDLER_DURATION),
        Some(Unit::Seconds),
        "Time a delivery spent in its worker's stack (layers, decoding, handler).".into(),
    );
    gauge(
        IN_FLIGHT,
        "Deliveries received and not yet settled, by worker.",
    );
    counter(
        PUBLISHED,
        "Publishes, by exchange and outcome (confirmed, unroutable, nacked, failed); retry copies go through the default exchange \"\".",
    );
    gauge(
        QUEUE_MESSAGES,
        "Messages in each worker queue and dead-letter queue, by state (ready), read periodically.",
    );
    gauge(
        CONSUMERS,
        "Consumers on each worker queue and dead-letter queue, from every process.",
    );
    gauge(
        CONNECTION_UP,
        "1 while the runtime's broker connection is up, else 0.",
    );
    counter(RECONNECTS, "Reconnections after a lost broker connection.");
}
