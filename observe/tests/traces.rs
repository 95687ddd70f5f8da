//! Trace propagation, checked with an in-memory span exporter: publish → handler → retry →
//! handler → follow-up publish → second worker form one trace with the right parents, on
//! RabbitMQ and in memory; a message a Python (pika) client published with a `traceparent`
//! continues that trace; one without starts a new one.

#[path = "../../tests/support/mod.rs"]
#[macro_use]
mod support;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use rabbitry::RetryPolicy;
use rabbitry::prelude::*;
use rabbitry_observe::{Observability, RuntimeBuilderExt};
use serde::{Deserialize, Serialize};
use support::journal::Journal;
use support::*;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The spans every test of this binary exports (one global subscriber; tests pick theirs
/// by message id).
fn spans() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        // The layer `Telemetry::init` installs.
        tracing_subscriber::registry()
            .with(rabbitry_observe::trace_layer(&provider))
            .init();
        exporter
    })
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

/// Wait until the exporter holds the spans `pick` finds (spans end after their settlement
/// is reported), and return them.
async fn wait_for_spans(pick: impl Fn(&[SpanData]) -> Option<Vec<SpanData>>) -> Vec<SpanData> {
    let wait = async {
        loop {
            let all = spans().get_finished_spans().unwrap();
            if let Some(found) = pick(&all) {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("the spans were exported")
}

/// The spans named `name` about message `id`.
fn named<'a>(all: &'a [SpanData], name: &str, id: &str) -> Vec<&'a SpanData> {
    all.iter()
        .filter(|s| s.name == name && attribute(s, "messaging.message.id").as_deref() == Some(id))
        .collect()
}

#[derive(Serialize, Deserialize)]
struct StepOne {
    order: u64,
}

impl Event for StepOne {
    const TYPE: &'static str = "step.one";
}

#[derive(Serialize, Deserialize)]
struct StepTwo {
    order: u64,
}

impl Event for StepTwo {
    const TYPE: &'static str = "step.two";
}

/// Rejects order 0; fails every other order's first attempt, then publishes `StepTwo`.
struct First(Subscription);

impl Worker for First {
    type Event = StepOne;

    fn subscription(&self) -> Subscription {
        self.0.clone()
    }

    async fn handle(&self, d: Delivery<StepOne>, ctx: &Context) -> Outcome {
        if d.payload().order == 0 {
            return Err(Failure::reject("order 0 does not exist"));
        }
        if d.attempt() == 1 {
            return Err(Failure::retry("stock service away"));
        }
        ctx.publish(&StepTwo {
            order: d.payload().order,
        })
        .await?;
        Ok(())
    }
}

struct Second(Subscription);

impl Worker for Second {
    type Event = StepTwo;

    fn subscription(&self) -> Subscription {
        self.0.clone()
    }

    async fn handle(&self, _: Delivery<StepTwo>, _: &Context) -> Outcome {
        Ok(())
    }
}

async fn publish_retry_follow_up_and_second_worker_form_one_trace(env: TestEnv) {
    spans();
    let journal = Arc::new(Journal::default());
    let (first, second) = (env.queue("first"), env.queue("second"));
    let first_sub = Subscription::new(&first)
        .bind("step.one")
        .retry(RetryPolicy::exponential(Duration::from_millis(50)).max_attempts(3));
    let second_sub = Subscription::new(&second).bind("step.two");
    env.track(&first_sub);
    env.track(&second_sub);
    let observability = Observability::new();
    let rt = env
        .builder()
        .observer(journal.clone())
        .observability(&observability)
        .worker(First(first_sub))
        .worker(Second(second_sub))
        .start()
        .await
        .unwrap();
    let publisher = Publisher::builder(env.url())
        .exchange(env.exchange.clone())
        .observer(observability)
        .connect()
        .await
        .unwrap();
    let id = publisher.publish(&StepOne { order: 7 }).await.unwrap();
    let settled = journal.wait_for(&second, 1).await;
    let follow_up = settled[0].0.clone();

    let (exchange, first_name, second_name) = (
        format!("publish {}", env.exchange),
        format!("process {first}"),
        format!("process {second}"),
    );
    let found = wait_for_spans(|all| {
        let origin = named(all, &exchange, &id);
        let attempts = named(all, &first_name, &id);
        let retry_copy = named(all, "publish ", &id);
        let published = named(all, &exchange, &follow_up);
        let handled = named(all, &second_name, &follow_up);
        let spans = [origin, attempts, retry_copy, published, handled];
        let counts: Vec<usize> = spans.iter().map(Vec::len).collect();
        (counts == [1, 2, 1, 1, 1]).then(|| spans.into_iter().flatten().cloned().collect())
    })
    .await;
    let [origin, a, b, retry_copy, published, handled] = &found[..] else {
        unreachable!()
    };
    let (first_attempt, second_attempt) = match attribute(a, "attempt").as_deref() {
        Some("1") => (a, b),
        _ => (b, a),
    };
    assert_eq!(attribute(second_attempt, "attempt").as_deref(), Some("2"));

    let trace = origin.span_context.trace_id();
    for span in &found {
        assert_eq!(
            span.span_context.trace_id(),
            trace,
            "one trace: {}",
            span.name
        );
    }
    assert_eq!(
        origin.parent_span_id,
        SpanId::INVALID,
        "the producer starts the trace"
    );
    assert_eq!(first_attempt.parent_span_id, origin.span_context.span_id());
    assert_eq!(
        second_attempt.parent_span_id,
        origin.span_context.span_id(),
        "the retry copy kept the producer's traceparent"
    );
    assert!(first_attempt.parent_span_is_remote);
    assert_eq!(
        retry_copy.parent_span_id,
        first_attempt.span_context.span_id()
    );
    assert_eq!(
        published.parent_span_id,
        second_attempt.span_context.span_id(),
        "the follow-up is published from the handler's span"
    );
    assert_eq!(handled.parent_span_id, published.span_context.span_id());

    // The OpenTelemetry messaging attributes.
    assert_eq!(
        attribute(origin, "messaging.system").as_deref(),
        Some("rabbitmq")
    );
    assert_eq!(
        attribute(origin, "messaging.destination.name"),
        Some(env.exchange.clone())
    );
    assert_eq!(
        attribute(origin, "messaging.rabbitmq.destination.routing_key").as_deref(),
        Some("step.one")
    );
    assert_eq!(
        attribute(origin, "messaging.operation.type").as_deref(),
        Some("send")
    );
    assert_eq!(
        attribute(handled, "messaging.operation.type").as_deref(),
        Some("process")
    );
    assert_eq!(
        attribute(published, "messaging.message.conversation_id"),
        Some(id.clone()),
        "a follow-up's correlation id is the conversation"
    );
    assert_eq!(
        attribute(first_attempt, "outcome").as_deref(),
        Some("retried")
    );
    assert_eq!(
        attribute(first_attempt, "error.type").as_deref(),
        Some("transient")
    );
    assert_eq!(attribute(handled, "outcome").as_deref(), Some("handled"));
    assert_eq!(
        attribute(published, "outcome").as_deref(),
        Some("confirmed")
    );
    assert_eq!(format!("{:?}", origin.span_kind), "Producer");
    assert_eq!(format!("{:?}", handled.span_kind), "Consumer");

    // A dead-letter copy keeps the producer's trace context.
    let rejected = publisher.publish(&StepOne { order: 0 }).await.unwrap();
    journal
        .wait_until(&first, |done| done.iter().any(|(id, _, _)| *id == rejected))
        .await;
    let sent = wait_for_spans(|all| {
        let found = named(all, &exchange, &rejected);
        (found.len() == 1).then(|| vec![found[0].clone()])
    })
    .await;
    let expected = format!(
        "00-{}-{}-01",
        sent[0].span_context.trace_id(),
        sent[0].span_context.span_id()
    );
    let dead = env.take(&format!("{first}.dlq"), 1).await;
    assert_eq!(dead[0].message_id().as_deref(), Some(rejected.as_str()));
    assert_eq!(dead[0].header_str("traceparent"), Some(expected));

    publisher.close().await;
    rt.shutdown().await;
}

on_both_brokers!(publish_retry_follow_up_and_second_worker_form_one_trace);

const FOREIGN_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const FOREIGN_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pika_message_with_a_traceparent_continues_its_trace() {
    spans();
    let env = TestEnv::rabbitmq("pika_traceparent");
    let journal = Arc::new(Journal::default());
    let queue = env.queue("foreign");
    let (probe, _seen) = env.probe(Subscription::new(&queue).bind("foreign.#"), |_| Ok(()));
    let rt = env
        .builder()
        .observer(journal.clone())
        .observability(&Observability::new())
        .worker(probe)
        .start()
        .await
        .unwrap();

    // A Python service publishes two messages with pika: one inside a trace, one not.
    let script = r#"
import os, pika
params = pika.URLParameters(os.environ["AMQP_URL"])
conn = pika.BlockingConnection(params)
ch = conn.channel()
ch.confirm_delivery()
ex = os.environ["EXCHANGE"]
traced = pika.BasicProperties(message_id="pika-traced", type="foreign.thing",
    content_type="application/json",
    headers={"traceparent": "00-" + os.environ["TRACE"] + "-" + os.environ["SPAN"] + "-01",
             "tracestate": "vendor=1"})
ch.basic_publish(ex, "foreign.thing", b'{"n": 1}', traced, mandatory=True)
plain = pika.BasicProperties(message_id="pika-plain", type="foreign.thing",
    content_type="application/json")
ch.basic_publish(ex, "foreign.thing", b'{"n": 2}', plain, mandatory=True)
conn.close()
"#;
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .env("AMQP_URL", support::url())
        .env("EXCHANGE", &env.exchange)
        .env("TRACE", FOREIGN_TRACE)
        .env("SPAN", FOREIGN_SPAN)
        .output()
        .await
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the pika publisher failed (scripts/test installs pika: python3 -m pip install pika): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // MassTransit carries the same W3C value in MT-Activity-Id.
    let mut headers = FieldTable::default();
    let mt_span = "1111111111111111";
    let mt = format!("00-{FOREIGN_TRACE}-{mt_span}-01");
    headers.insert(
        "MT-Activity-Id".into(),
        AMQPValue::LongString(mt.as_str().into()),
    );
    let props = BasicProperties::default()
        .with_message_id("masstransit".into())
        .with_type("foreign.thing".into())
        .with_headers(headers);
    env.publish_bare("foreign.thing", b"{}", props).await;
    journal.wait_for(&queue, 3).await;

    let name = format!("process {queue}");
    let found = wait_for_spans(|all| {
        let picked: Vec<SpanData> = ["pika-traced", "pika-plain", "masstransit"]
            .iter()
            .filter_map(|id| named(all, &name, id).first().map(|s| (*s).clone()))
            .collect();
        (picked.len() == 3).then_some(picked)
    })
    .await;
    let trace = TraceId::from_hex(FOREIGN_TRACE).unwrap();
    let (traced, plain, mass_transit) = (&found[0], &found[1], &found[2]);
    assert_eq!(
        traced.span_context.trace_id(),
        trace,
        "joins the producer's trace"
    );
    assert_eq!(
        traced.parent_span_id,
        SpanId::from_hex(FOREIGN_SPAN).unwrap()
    );
    assert!(traced.parent_span_is_remote);
    assert_eq!(
        traced.span_context.trace_state().header(),
        "vendor=1",
        "tracestate travels too"
    );
    assert_ne!(
        plain.span_context.trace_id(),
        trace,
        "no traceparent: a new trace"
    );
    assert_eq!(plain.parent_span_id, SpanId::INVALID);
    assert_eq!(mass_transit.span_context.trace_id(), trace);
    assert_eq!(
        mass_transit.parent_span_id,
        SpanId::from_hex(mt_span).unwrap()
    );

    rt.shutdown().await;
}
