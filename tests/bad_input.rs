//! Hostile input against a real RabbitMQ: a corpus of malformed, oversized, oddly typed and
//! forged messages published with a bare AMQP client, good messages interleaved. Each bad one
//! lands in the dead-letter queue with a reason a person can read, or is handled where it is
//! valid; every good one is handled; the worker never restarts. Also: publishing mistakes
//! and conflicting declarations give typed errors.

#[macro_use]
mod support;

use std::collections::{BTreeMap, BTreeSet};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use rabbitry::prelude::*;
use rabbitry::{Error, headers};
use serde::Deserialize;
use support::*;
use tokio::sync::mpsc;

const MIB: usize = 1024 * 1024;
/// The worker's body limit in this suite.
const LIMIT: usize = 12 * MIB;
/// Good messages have ids from here on; hostile cases use their own number.
const GOOD: u64 = 1_000_000;

#[derive(Debug, Deserialize)]
struct Reading {
    id: u64,
    #[allow(dead_code)]
    #[serde(default)]
    note: Option<String>,
}

struct Sensor {
    queue: String,
    handled: mpsc::UnboundedSender<u64>,
}

impl Worker for Sensor {
    type Event = Reading;
    fn subscription(&self) -> Subscription {
        Subscription::new(&self.queue)
            .bind("reading.*")
            .prefetch(20)
            .concurrency(4)
    }
    async fn handle(&self, reading: Delivery<Reading>, _: &Context) -> Outcome {
        self.handled.send(reading.id).unwrap();
        Ok(())
    }
}

enum Expect {
    /// Valid: the handler sees this id.
    Handled(u64),
    /// Dead-lettered as undecodable, with this in `x-exception-message`.
    Dead(&'static str),
    /// Routed nowhere: nobody ever sees it.
    Unrouted,
}

struct Case {
    name: &'static str,
    key: &'static str,
    body: Vec<u8>,
    props: BasicProperties,
    expect: Expect,
}

fn tagged(name: &str) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert("x-case".into(), AMQPValue::LongString(name.into()));
    h
}

fn with(name: &str, extra: impl FnOnce(&mut FieldTable)) -> BasicProperties {
    let mut h = tagged(name);
    extra(&mut h);
    BasicProperties::default().with_headers(h)
}

fn json_of_size(id: u64, size: usize) -> Vec<u8> {
    let head = format!(r#"{{"id":{id},"note":""#);
    let mut body = head.into_bytes();
    body.resize(size - 2, b'x');
    body.extend_from_slice(b"\"}");
    body
}

fn corpus() -> Vec<Case> {
    use Expect::*;
    let case = |name, body: &[u8], expect| Case {
        name,
        key: "reading.taken",
        body: body.to_vec(),
        props: with(name, |_| {}),
        expect,
    };
    let props = |name, p: BasicProperties| p.with_headers(tagged(name));
    let mut cases = vec![
        case("invalid json", b"{not json", Dead("key must be a string")),
        case("truncated json", br#"{"id": 1"#, Dead("EOF while parsing")),
        case(
            "json array",
            b"[1,2,3]",
            Dead("invalid type: integer `2`, expected a string"),
        ),
        case("empty object", b"{}", Dead("missing field `id`")),
        case(
            "string id",
            br#"{"id":"one"}"#,
            Dead("invalid type: string \"one\""),
        ),
        case(
            "negative id",
            br#"{"id":-1}"#,
            Dead("invalid value: integer `-1`"),
        ),
        case(
            "fractional id",
            br#"{"id":1.5}"#,
            Dead("invalid type: floating point `1.5`"),
        ),
        case(
            "overflowing id",
            br#"{"id":18446744073709551616}"#,
            Dead("invalid type: floating point"),
        ),
        case(
            "invalid utf-8",
            &[0xff, 0xfe, 0xfd],
            Dead("expected value at line 1 column 1"),
        ),
        case(
            "invalid utf-8 in a string",
            b"{\"id\":10,\"note\":\"\xff\"}",
            Dead("invalid unicode code point"),
        ),
        case("empty body", b"", Dead("EOF while parsing a value")),
        case(
            "whitespace only",
            b"  \n\t ",
            Dead("EOF while parsing a value"),
        ),
        case("json null", b"null", Dead("invalid type: null")),
        case(
            "json string",
            b"\"hello\"",
            Dead("invalid type: string \"hello\""),
        ),
        case(
            "byte order mark",
            b"\xEF\xBB\xBF{\"id\":15}",
            Dead("expected value at line 1 column 1"),
        ),
        case("deep nesting", &b"[".repeat(100_000), Dead("invalid type")),
        case(
            "duplicate field",
            br#"{"id":17,"id":18}"#,
            Dead("duplicate field `id`"),
        ),
        case(
            "trailing garbage",
            br#"{"id":18} trailing"#,
            Dead("trailing characters"),
        ),
        case(
            "trailing NUL byte",
            b"{\"id\":19}\0",
            Dead("trailing characters"),
        ),
        case(
            "wrong shape for the key",
            br#"{"reading":20}"#,
            Dead("missing field `id`"),
        ),
        Case {
            name: "text/plain content type",
            key: "reading.taken",
            body: br#"{"id":21}"#.to_vec(),
            props: props(
                "text/plain content type",
                BasicProperties::default().with_content_type("text/plain".into()),
            ),
            expect: Dead("unsupported content type 'text/plain'"),
        },
        Case {
            name: "xml content type",
            key: "reading.taken",
            body: b"<reading id='22'/>".to_vec(),
            props: props(
                "xml content type",
                BasicProperties::default().with_content_type("application/xml".into()),
            ),
            expect: Dead("unsupported content type 'application/xml'"),
        },
        Case {
            name: "gzip encoding",
            key: "reading.taken",
            body: br#"{"id":23}"#.to_vec(),
            props: props(
                "gzip encoding",
                BasicProperties::default().with_content_encoding("gzip".into()),
            ),
            expect: Dead("unsupported content encoding 'gzip'"),
        },
        Case {
            name: "over the size limit",
            key: "reading.taken",
            body: json_of_size(24, LIMIT + MIB),
            props: with("over the size limit", |_| {}),
            expect: Dead("over the limit of 12582912 bytes"),
        },
        Case {
            name: "10 MiB body",
            key: "reading.taken",
            body: json_of_size(25, 10 * MIB),
            props: with("10 MiB body", |_| {}),
            expect: Handled(25),
        },
        Case {
            name: "no properties at all",
            key: "reading.taken",
            body: br#"{"id":26}"#.to_vec(),
            props: BasicProperties::default(),
            expect: Handled(26),
        },
        case(
            "extra unknown fields",
            br#"{"id":27,"colour":"blue","nested":{"a":[1,2]}}"#,
            Handled(27),
        ),
        Case {
            name: "json with a charset",
            key: "reading.taken",
            body: br#"{"id":28}"#.to_vec(),
            props: props(
                "json with a charset",
                BasicProperties::default()
                    .with_content_type("application/json; charset=utf-8".into()),
            ),
            expect: Handled(28),
        },
        Case {
            name: "vendor json type",
            key: "reading.taken",
            body: br#"{"id":29}"#.to_vec(),
            props: props(
                "vendor json type",
                BasicProperties::default().with_content_type("application/vnd.reading+json".into()),
            ),
            expect: Handled(29),
        },
        Case {
            name: "a 100 KiB header",
            key: "reading.taken",
            body: br#"{"id":30}"#.to_vec(),
            props: with("a 100 KiB header", |h| {
                h.insert(
                    "x-huge".into(),
                    AMQPValue::LongString("h".repeat(100 * 1024).into()),
                );
            }),
            expect: Handled(30),
        },
        Case {
            name: "a thousand headers",
            key: "reading.taken",
            body: br#"{"id":31}"#.to_vec(),
            props: with("a thousand headers", |h| {
                for i in 0..1000 {
                    h.insert(format!("x-h{i}").into(), AMQPValue::LongLongInt(i));
                }
            }),
            expect: Handled(31),
        },
        Case {
            name: "oddly typed rabbitry headers",
            key: "reading.taken",
            body: br#"{"id":32}"#.to_vec(),
            props: with("oddly typed rabbitry headers", |h| {
                h.insert(
                    headers::RETRY_COUNT.into(),
                    AMQPValue::LongString("abc".into()),
                );
                h.insert(
                    headers::ORIGINAL_EXCHANGE.into(),
                    AMQPValue::LongLongInt(42),
                );
                h.insert(
                    headers::ORIGINAL_ROUTING_KEY.into(),
                    AMQPValue::FieldTable(FieldTable::default()),
                );
                h.insert(
                    headers::X_DEATH.into(),
                    AMQPValue::LongString("garbage".into()),
                );
                h.insert(headers::EVENT_VERSION.into(), AMQPValue::LongLongInt(-5));
                h.insert(headers::FIRST_FAILURE_AT.into(), AMQPValue::Boolean(true));
                h.insert(
                    "x-array".into(),
                    AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Double(1.5)])),
                );
                h.insert(
                    "x-bytes".into(),
                    AMQPValue::ByteArray(vec![0, 159, 255].into()),
                );
                h.insert("x-void".into(), AMQPValue::Void);
            }),
            expect: Handled(32),
        },
        Case {
            name: "forged huge retry count",
            key: "reading.taken",
            body: br#"{"id":33}"#.to_vec(),
            props: with("forged huge retry count", |h| {
                h.insert(
                    headers::RETRY_COUNT.into(),
                    AMQPValue::LongLongInt(i64::MAX),
                );
            }),
            expect: Handled(33),
        },
        Case {
            name: "forged negative retry count",
            key: "reading.taken",
            body: br#"{"id":34}"#.to_vec(),
            props: with("forged negative retry count", |h| {
                h.insert(headers::RETRY_COUNT.into(), AMQPValue::LongInt(-7));
            }),
            expect: Handled(34),
        },
        Case {
            name: "type property of another event",
            key: "reading.taken",
            body: br#"{"id":35}"#.to_vec(),
            props: props(
                "type property of another event",
                BasicProperties::default().with_type("user.registered".into()),
            ),
            expect: Handled(35),
        },
        Case {
            name: "unexpected key matching the binding",
            key: "reading.unknown",
            body: br#"{"id":36}"#.to_vec(),
            props: with("unexpected key matching the binding", |_| {}),
            expect: Handled(36),
        },
        Case {
            name: "longest message id",
            key: "reading.taken",
            body: br#"{"id":37}"#.to_vec(),
            props: props(
                "longest message id",
                BasicProperties::default().with_message_id("m".repeat(255).into()),
            ),
            expect: Handled(37),
        },
        Case {
            name: "empty message id",
            key: "reading.taken",
            body: br#"{"id":38}"#.to_vec(),
            props: props(
                "empty message id",
                BasicProperties::default().with_message_id("".into()),
            ),
            expect: Handled(38),
        },
        Case {
            name: "transient delivery mode and odd priority",
            key: "reading.taken",
            body: br#"{"id":39}"#.to_vec(),
            props: props(
                "transient delivery mode and odd priority",
                BasicProperties::default()
                    .with_delivery_mode(1)
                    .with_priority(255),
            ),
            expect: Handled(39),
        },
        Case {
            name: "longest correlation id",
            key: "reading.taken",
            body: br#"{"id":40}"#.to_vec(),
            props: props(
                "longest correlation id",
                BasicProperties::default().with_correlation_id("c".repeat(255).into()),
            ),
            expect: Handled(40),
        },
        Case {
            name: "unknown routing key",
            key: "nobody.listens.here",
            body: br#"{"id":41}"#.to_vec(),
            props: with("unknown routing key", |_| {}),
            expect: Unrouted,
        },
    ];
    // The dead-lettered copy of an invalid message keeps every original header.
    cases.push(Case {
        name: "invalid json with headers to keep",
        key: "reading.taken",
        body: b"not json at all".to_vec(),
        props: with("invalid json with headers to keep", |h| {
            h.insert(
                "x-tenant".into(),
                AMQPValue::LongString(LongString::from("acme")),
            );
        }),
        expect: Dead("expected ident"),
    });
    cases
}

async fn hostile_messages_are_dead_lettered_or_handled_and_good_ones_all_flow(env: TestEnv) {
    let queue = env.queue("sensor");
    let (tx, mut handled) = mpsc::unbounded_channel();
    let worker = Sensor {
        queue: queue.clone(),
        handled: tx,
    };
    env.track(&worker.subscription());
    let rt = env
        .builder()
        .max_body_bytes(LIMIT)
        .worker(worker)
        .start()
        .await
        .unwrap();

    let cases = corpus();
    assert!(cases.len() >= 30, "the corpus has {} cases", cases.len());
    for (i, case) in cases.iter().enumerate() {
        env.publish_bare(case.key, &case.body, case.props.clone())
            .await;
        let good = format!(r#"{{"id":{}}}"#, GOOD + i as u64);
        env.publish_bare("reading.taken", good.as_bytes(), BasicProperties::default())
            .await;
    }

    let mut expected: BTreeSet<u64> = (0..cases.len() as u64).map(|i| GOOD + i).collect();
    expected.extend(cases.iter().filter_map(|c| match c.expect {
        Expect::Handled(id) => Some(id),
        _ => None,
    }));
    let mut seen = BTreeMap::<u64, usize>::new();
    while seen.len() < expected.len() {
        let id = tokio::time::timeout(PATIENCE, handled.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "still waiting for {:?}",
                    expected
                        .iter()
                        .filter(|i| !seen.contains_key(i))
                        .collect::<Vec<_>>()
                )
            })
            .unwrap();
        *seen.entry(id).or_default() += 1;
    }
    let dead_cases: Vec<&Case> = cases
        .iter()
        .filter(|c| matches!(c.expect, Expect::Dead(_)))
        .collect();
    let dead = env.take(&format!("{queue}.dlq"), dead_cases.len()).await;
    let status = rt.workers().await.unwrap();
    rt.shutdown().await;

    assert_eq!(
        seen.keys().copied().collect::<BTreeSet<_>>(),
        expected,
        "handled exactly the valid messages"
    );
    assert!(seen.values().all(|n| *n == 1), "handled twice: {seen:?}");
    assert!(handled.try_recv().is_err(), "handled something unexpected");
    assert!(status[0].consuming && status[0].restarts == 0, "{status:?}");
    assert_eq!(
        env.ready(&format!("{queue}.dlq")).await,
        0,
        "more dead letters than bad messages"
    );
    assert_eq!(env.ready(&queue).await, 0);

    let by_case: BTreeMap<String, &Taken> = dead
        .iter()
        .map(|d| (d.header_str("x-case").expect("x-case kept"), d))
        .collect();
    let mut wrong_reasons = Vec::new();
    for case in dead_cases {
        let Expect::Dead(reason) = case.expect else {
            unreachable!()
        };
        let d = by_case
            .get(case.name)
            .unwrap_or_else(|| panic!("'{}' is not in the DLQ", case.name));
        assert_eq!(
            d.header_str(headers::EXCEPTION_KIND).as_deref(),
            Some("undecodable"),
            "{}",
            case.name
        );
        let message = d.header_str(headers::EXCEPTION_MESSAGE).unwrap();
        if !message.contains(reason) {
            wrong_reasons.push(format!("'{}': {message:?} lacks {reason:?}", case.name));
        }
        assert!(
            message.len() <= headers::MAX_EXCEPTION_MESSAGE,
            "{}",
            case.name
        );
        assert_eq!(
            d.body, case.body,
            "'{}': the body is kept as received",
            case.name
        );
        assert_eq!(d.header_str(headers::ORIGINAL_QUEUE), Some(queue.clone()));
    }
    assert!(wrong_reasons.is_empty(), "{}", wrong_reasons.join("\n"));
    let kept = by_case["invalid json with headers to keep"];
    assert_eq!(kept.header_str("x-tenant").as_deref(), Some("acme"));
}

async fn publishing_mistakes_are_typed_errors(env: TestEnv) {
    // Declares the exchange, with no queue bound for order.placed.
    let (probe, _seen) = env.probe(Subscription::new(env.queue("other")).bind("user.*"), |_| {
        Ok(())
    });
    let rt = env.builder().worker(probe).start().await.unwrap();
    let publisher = env.publisher().await;

    match publisher.publish(&order(1)).await {
        Err(Error::Unroutable {
            exchange,
            routing_key,
        }) => {
            assert_eq!(
                (exchange.as_str(), routing_key.as_str()),
                (env.exchange.as_str(), "order.placed")
            );
        }
        other => panic!("expected Unroutable, got {other:?}"),
    }
    // The publisher stays usable after an unroutable message, and can opt out of the check.
    publisher
        .message(&order(2))
        .routing_key("user.registered")
        .send()
        .await
        .unwrap();
    publisher
        .message(&order(3))
        .allow_unroutable()
        .send()
        .await
        .unwrap();

    let missing = Publisher::builder(env.url())
        .exchange(format!("{}.missing", env.exchange))
        .connect()
        .await
        .unwrap();
    assert!(matches!(
        missing.publish(&order(3)).await,
        Err(Error::ExchangeNotFound { .. })
    ));
    // …and recovers its channel for the next publish.
    assert!(matches!(
        missing.publish(&order(3)).await,
        Err(Error::ExchangeNotFound { .. })
    ));

    let small = Publisher::builder(env.url())
        .exchange(env.exchange.clone())
        .max_body_bytes(16)
        .connect()
        .await
        .unwrap();
    assert!(matches!(
        small.publish(&order(4)).await,
        Err(Error::BodyTooLarge { limit: 16, .. })
    ));
    // In a batch, each event is checked as it is sent: the one too large is reported by
    // its position and not sent.
    let batch = small.publish_batch(&[order(5)]).await;
    assert!(
        matches!(&batch, Err(Error::Batch { total: 1, failures })
            if matches!(failures[..], [(0, Error::BodyTooLarge { limit: 16, .. })])),
        "{batch:?}"
    );
    assert!(matches!(
        publisher
            .message(&order(5))
            .routing_key("k".repeat(300))
            .send()
            .await,
        Err(Error::Config(_))
    ));
    assert!(matches!(
        publisher
            .message(&order(5))
            .header(&"h".repeat(300), "v")
            .send()
            .await,
        Err(Error::Config(_))
    ));
    rt.shutdown().await;
}

async fn a_conflicting_declaration_names_the_queue_and_argument(env: TestEnv) {
    let queue = env.queue("conflicted");
    let (plain, _) = env.probe(Subscription::new(&queue).bind("order.placed"), |_| Ok(()));
    env.builder().worker(plain).declare().await.unwrap();

    let (with_priority, _) = env.probe(
        Subscription::new(&queue)
            .bind("order.placed")
            .max_priority(10),
        |_| Ok(()),
    );
    let err = env
        .builder()
        .worker(with_priority)
        .start()
        .await
        .expect_err("start must fail");
    match &err {
        Error::TopologyConflict {
            kind,
            name,
            argument,
            ..
        } => {
            assert_eq!(*kind, "queue");
            assert_eq!(name, &queue);
            assert_eq!(argument.as_deref(), Some("x-max-priority"));
        }
        other => panic!("expected TopologyConflict, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains(&queue) && text.contains("x-max-priority"),
        "{text}"
    );
}

on_both_brokers!(
    hostile_messages_are_dead_lettered_or_handled_and_good_ones_all_flow,
    publishing_mistakes_are_typed_errors,
    a_conflicting_declaration_names_the_queue_and_argument,
);
