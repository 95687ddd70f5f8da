//! What to declare on the broker for a set of workers, and the declaring of it.

pub(crate) mod delay;
mod record;

use std::fmt;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::broker::{self, Channel, Confirm, Connection, NOT_FOUND, PRECONDITION_FAILED};
use crate::error::{BrokerError, Error, Result};
use crate::publisher::Publisher;
use crate::worker::{QueueType, Subscription};
use record::Record;

/// The dead-letter exchange of `exchange`.
pub(crate) fn dlx_name(exchange: &str) -> String {
    format!("{exchange}.dlx")
}

/// The dead-letter queue of worker queue `queue`.
pub(crate) fn dlq_name(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// The queue that keeps what worker queue `queue` declared last (see [`record`]).
pub(crate) fn record_name(queue: &str) -> String {
    format!("{queue}.topology")
}

/// The retry tier of worker queue `queue` that holds messages for `delay_ms`.
pub(crate) fn retry_queue_name(queue: &str, delay_ms: u64) -> String {
    format!("{queue}.retry.{delay_ms}")
}

/// Everything rabbitry declares for a set of workers: exchanges, queues with their
/// arguments, and bindings. Printing it shows the plan without touching the broker:
///
/// ```
/// use rabbitry::{RetryPolicy, Subscription, Topology};
/// use std::time::Duration;
///
/// let email = Subscription::new("orders.email")
///     .bind("order.placed")
///     .max_priority(10)
///     .retry(RetryPolicy::exponential(Duration::from_secs(1)).max_attempts(3));
/// let plan = Topology::new("events", [&email]);
/// let text = plan.to_string();
/// assert!(text.contains("queue orders.email.retry.2000"));
/// assert!(plan.queues().any(|q| q == "orders.email.dlq"));
/// ```
///
/// [`declare`](Topology::declare) puts it on a broker, so a producer can prepare the queues
/// of workers that have not started yet.
///
/// **Changed workers.** Each worker queue `q` gets a small queue `q.topology` holding the
/// bindings and retry queues the last declaration made. When a worker comes back with
/// another retry policy, the retry queues it no longer uses are deleted once empty (one
/// still holding a retry is kept, with a warning, until a later start finds it empty;
/// nothing is lost either way: a retry queue is declared again by whoever still needs it).
/// When it comes back with fewer bindings, the old ones are reported at every start (a
/// warning, and [`WorkerStatus::stale_bindings`](crate::WorkerStatus::stale_bindings)),
/// and removed only for a subscription with
/// [`prune_bindings`](Subscription::prune_bindings): during a rolling deploy, an old
/// replica that reconnects would otherwise remove what the new version added. Bindings
/// someone added by hand, and queues a worker only consumes
/// ([`existing_queue`](Subscription::existing_queue)), are never touched.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    exchanges: Vec<(String, &'static str)>,
    queues: Vec<QueueSpec>,
    bindings: Vec<BindingSpec>,
    /// What each worker declares, recorded to reconcile the next declaration (not for
    /// workers on existing queues: those belong to someone else).
    records: Vec<Planned>,
}

/// One worker's record and how to reconcile it.
#[derive(Debug, Clone, PartialEq)]
struct Planned {
    queue: String,
    record: Record,
    prune: bool,
}

/// Where a declaration publishes (its topology records, the quorum priority probe): never
/// on a consumer's connection, which a broker alarm would then block, acknowledgements and
/// all.
#[derive(Clone, Copy)]
pub(crate) enum Publishing<'a> {
    /// The connection declaring is a short-lived one of its own.
    Here,
    /// The runtime's publisher (its connection opens when first needed).
    Publisher(&'a Publisher),
}

impl Publishing<'_> {
    async fn connection(&self, here: &Connection) -> Result<Connection> {
        match self {
            Publishing::Here => Ok(here.clone()),
            Publishing::Publisher(p) => p.connection().await,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct QueueSpec {
    name: String,
    queue_type: QueueType,
    args: Vec<(&'static str, Arg)>,
    /// A quorum queue asking for priority: RabbitMQ ≥ 4.0 gives it two levels without
    /// an argument; older brokers cannot, which is checked before declaring.
    quorum_priority: bool,
    /// Declared elsewhere: only checked to exist, never declared.
    existing: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Arg {
    Str(String),
    Int(i64),
    Bool(bool),
}

#[derive(Debug, Clone, PartialEq)]
struct BindingSpec {
    exchange: String,
    queue: String,
    key: String,
}

impl Topology {
    /// The plan for `subscriptions` on the topic exchange `exchange`.
    pub fn new<'a>(
        exchange: &str,
        subscriptions: impl IntoIterator<Item = &'a Subscription>,
    ) -> Topology {
        let mut plan = Topology {
            exchanges: vec![
                (exchange.to_owned(), "topic"),
                (dlx_name(exchange), "direct"),
            ],
            queues: Vec::new(),
            bindings: Vec::new(),
            records: Vec::new(),
        };
        for s in subscriptions {
            plan.add(exchange, s);
        }
        plan
    }

    fn add(&mut self, exchange: &str, s: &Subscription) {
        let dlx = dlx_name(exchange);
        let mut args = vec![
            ("x-queue-type", Arg::Str(s.queue_type.as_str().to_owned())),
            // Messages the broker itself dead-letters (rejected by another client,
            // expired, over a length limit, over a quorum delivery limit) reach the DLQ too.
            ("x-dead-letter-exchange", Arg::Str(dlx.clone())),
            ("x-dead-letter-routing-key", Arg::Str(s.queue.clone())),
        ];
        if s.single_active {
            args.push(("x-single-active-consumer", Arg::Bool(true)));
        }
        let mut quorum_priority = false;
        match (s.max_priority, s.queue_type) {
            (Some(max), QueueType::Classic) => args.push(("x-max-priority", Arg::Int(max.into()))),
            (Some(_), QueueType::Quorum) => quorum_priority = true,
            (None, _) => {}
        }
        self.queues.push(QueueSpec {
            name: s.queue.clone(),
            queue_type: s.queue_type,
            args,
            quorum_priority,
            existing: s.existing,
        });
        let mut bindings: Vec<BindingSpec> = s
            .bindings
            .iter()
            .map(|key| BindingSpec {
                exchange: exchange.to_owned(),
                queue: s.queue.clone(),
                key: key.clone(),
            })
            .collect();
        let tiers = s.retry.tiers();
        for tier in &tiers {
            self.queues.push(retry_tier(&s.queue, *tier));
        }
        let dlq = dlq_name(&s.queue);
        self.queues.push(classic(dlq.clone(), Vec::new()));
        bindings.push(BindingSpec {
            exchange: dlx,
            queue: dlq,
            key: s.queue.clone(),
        });
        if !s.existing {
            self.queues.push(classic(record_name(&s.queue), Vec::new()));
            let record = Record::new(
                bindings
                    .iter()
                    .map(|b| (b.queue.clone(), b.exchange.clone(), b.key.clone())),
                tiers,
            );
            self.records.push(Planned {
                queue: s.queue.clone(),
                record,
                prune: s.prune,
            });
        }
        self.bindings.extend(bindings);
    }

    /// The names of the delay tiers rabbitry declares for `exchange` on the first delayed
    /// message (see [`Outgoing::delay`](crate::Outgoing::delay)): each is both a headers
    /// exchange and a queue; the queue `<exchange>.delay.due` comes with them.
    ///
    /// ```
    /// let tiers = rabbitry::Topology::delay_tiers("events");
    /// assert_eq!(tiers.len(), 26);
    /// assert_eq!(tiers[0], "events.delay.100");
    /// assert_eq!(tiers[25], "events.delay.3355443200");
    /// ```
    pub fn delay_tiers(exchange: &str) -> Vec<String> {
        delay::tier_names(exchange)
    }

    /// Every queue of the delay tiers of `exchange`: the [`delay_tiers`](Topology::delay_tiers)
    /// and `<exchange>.delay.due` (to delete them, say).
    pub fn delay_queues(exchange: &str) -> Vec<String> {
        let mut queues = delay::tier_names(exchange);
        queues.push(delay::due_name(exchange));
        queues
    }

    /// The names of every queue in the plan.
    pub fn queues(&self) -> impl Iterator<Item = &str> {
        self.queues.iter().map(|q| q.name.as_str())
    }

    /// The names of every exchange in the plan.
    pub fn exchanges(&self) -> impl Iterator<Item = &str> {
        self.exchanges.iter().map(|(name, _)| name.as_str())
    }

    /// Connect to the broker at `url`, declare everything, and disconnect: what a runtime
    /// does at start, for a producer or a deployment step that prepares the queues before
    /// any worker runs. Idempotent; see [`Topology`] for what happens to what a changed
    /// worker no longer declares.
    pub async fn declare(&self, url: &str) -> Result<()> {
        let conn = Connection::open(url, "rabbitry:declare").await?;
        let declared = self.declare_on(&conn, Publishing::Here).await;
        conn.close().await;
        declared.map(drop)
    }

    /// Declare everything on `conn`. Idempotent: declaring the same plan again changes
    /// nothing. A conflicting existing declaration is an [`Error::TopologyConflict`].
    /// Returns, per worker, the bindings an earlier declaration made that this one no longer
    /// makes and that were left in place (see [`Subscription::prune_bindings`]).
    pub(crate) async fn declare_on(
        &self,
        conn: &Connection,
        publishing: Publishing<'_>,
    ) -> Result<Vec<(String, Vec<String>)>> {
        if let Some(q) = self.queues.iter().find(|q| q.quorum_priority) {
            let probing = publishing.connection(conn).await?;
            check_quorum_priority(&probing, &q.name).await?;
        }
        conn.on_channel(async |ch| self.declare_all(ch).await)
            .await?;
        let mut stale = Vec::new();
        for planned in &self.records {
            let reconciled = record::reconcile(conn, publishing, planned).await;
            match reconciled {
                Ok(left) => stale.push((planned.queue.clone(), left)),
                // What is wanted is declared; only the clean-up is missed this time.
                Err(e) => tracing::error!(
                    worker = %planned.queue,
                    error = %e,
                    "cannot reconcile the worker's topology with what it declared before; \
                     its queues and bindings are declared, stale ones may remain"
                ),
            }
        }
        Ok(stale)
    }

    async fn declare_all(&self, ch: &Channel) -> Result<()> {
        for (name, kind) in &self.exchanges {
            ch.declare_exchange(name, kind)
                .await
                .map_err(|e| declare_error("exchange", name, e))?;
        }
        for q in &self.queues {
            let declared = match q.existing {
                true => ch.declare_queue_passive(&q.name).await,
                false => ch.declare_queue(&q.name, q.field_table()).await,
            };
            declared.map_err(|e| match broker::reply_code(&e) {
                Some(NOT_FOUND) if q.existing => Error::QueueNotFound {
                    queue: q.name.clone(),
                },
                _ => declare_error("queue", &q.name, e),
            })?;
        }
        for b in &self.bindings {
            ch.bind(&b.queue, &b.exchange, &b.key)
                .await
                .map_err(|e| declare_error("binding", &b.to_string(), e))?;
        }
        Ok(())
    }
}

impl fmt::Display for BindingSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} ({})", self.exchange, self.queue, self.key)
    }
}

/// A classic queue with `args` besides its type.
fn classic(name: String, mut args: Vec<(&'static str, Arg)>) -> QueueSpec {
    args.insert(0, ("x-queue-type", Arg::Str("classic".into())));
    QueueSpec {
        name,
        queue_type: QueueType::Classic,
        args,
        quorum_priority: false,
        existing: false,
    }
}

fn retry_tier(queue: &str, delay_ms: u64) -> QueueSpec {
    classic(
        retry_queue_name(queue, delay_ms),
        vec![
            ("x-message-ttl", Arg::Int(delay_ms as i64)),
            // Expired messages go back to the failing worker's queue only, via the default exchange.
            ("x-dead-letter-exchange", Arg::Str(String::new())),
            ("x-dead-letter-routing-key", Arg::Str(queue.to_owned())),
        ],
    )
}

/// Declare a durable classic single-active-consumer queue whose one message is a lease its
/// consumer holds (a schedule's token).
pub(crate) async fn declare_lease_queue(ch: &Channel, name: &str) -> Result<()> {
    let spec = classic(
        name.to_owned(),
        vec![
            ("x-single-active-consumer", Arg::Bool(true)),
            (broker::LEASE_ARG, Arg::Bool(true)),
        ],
    );
    ch.declare_queue(name, spec.field_table())
        .await
        .map(drop)
        .map_err(|e| declare_error("queue", name, e))
}

/// Declare one retry tier on demand (for a `retry_after` delay no policy tier covers).
pub(crate) async fn declare_retry_tier(ch: &Channel, queue: &str, delay_ms: u64) -> Result<()> {
    let spec = retry_tier(queue, delay_ms);
    ch.declare_queue(&spec.name, spec.field_table())
        .await
        .map(drop)
        .map_err(|e| declare_error("queue", &spec.name, e))
}

impl QueueSpec {
    fn field_table(&self) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in &self.args {
            let v = match v {
                Arg::Str(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
                Arg::Int(i) => AMQPValue::LongLongInt(*i),
                Arg::Bool(b) => AMQPValue::Boolean(*b),
            };
            t.insert((*k).into(), v);
        }
        t
    }
}

/// Map a failed declaration to an error that names what conflicts.
fn declare_error(kind: &'static str, name: &str, e: impl Into<BrokerError>) -> Error {
    let e = e.into();
    if e.reply_code() == Some(PRECONDITION_FAILED) {
        let detail = e.to_string();
        // "… inequivalent arg 'x-max-priority' for queue …" / "… invalid arg 'x-max-priority' …"
        let argument = detail
            .split_once(" arg '")
            .and_then(|(_, rest)| rest.split_once('\''))
            .map(|(arg, _)| arg.to_owned());
        return Error::TopologyConflict {
            kind,
            name: name.to_owned(),
            argument,
            detail,
        };
    }
    Error::Declare {
        kind,
        name: name.to_owned(),
        source: e,
    }
}

/// Quorum queues honour priorities from RabbitMQ 4.0 (two levels) and ignore them before.
/// lapin does not expose the server version, so ask the broker by behaviour: a high-priority
/// message published after a normal one must be delivered first.
async fn check_quorum_priority(conn: &Connection, queue: &str) -> Result<()> {
    let probe = format!("rabbitry.probe.{}", uuid::Uuid::now_v7());
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-expires".into(), AMQPValue::LongLongInt(60_000));
    let probing = async |ch: &Channel| {
        ch.declare_queue(&probe, args).await?;
        ch.confirm_select().await?;
        for priority in [0u8, 9] {
            let props = BasicProperties::default()
                .with_priority(priority)
                .with_message_id(priority.to_string().into());
            let confirm = ch.publish("", &probe, b"{}", props, true).await?;
            if !matches!(confirm.await?, Confirm::Ack { returned: None }) {
                return Ok(None);
            }
        }
        let first = ch.get_message_id(&probe).await?;
        ch.delete_queue(&probe).await?;
        Ok::<_, Error>(Some(first.as_deref() == Some("9")))
    };
    match conn.on_channel(probing).await {
        Ok(Some(true)) => Ok(()),
        Ok(Some(false)) => Err(Error::Unsupported {
            worker: queue.to_owned(),
            reason: "quorum queues honour message priority only from RabbitMQ 4.0; \
                     use QueueType::Classic for a priority queue on this broker"
                .into(),
        }),
        Ok(None) => Err(Error::Unsupported {
            worker: queue.to_owned(),
            reason: format!("the broker refused the probe messages sent to '{probe}'"),
        }),
        Err(Error::Broker(e)) => Err(declare_error("queue", &probe, e)),
        Err(e) => Err(e),
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, kind) in &self.exchanges {
            writeln!(f, "exchange {name} ({kind}, durable)")?;
        }
        for q in &self.queues {
            if q.existing {
                writeln!(f, "queue {} (existing: checked, never declared)", q.name)?;
                for b in self.bindings.iter().filter(|b| b.queue == q.name) {
                    writeln!(f, "  bound to {} with key {:?}", b.exchange, b.key)?;
                }
                continue;
            }
            write!(f, "queue {} ({}, durable)", q.name, q.queue_type.as_str())?;
            for (k, v) in q.args.iter().filter(|(k, _)| *k != "x-queue-type") {
                match v {
                    Arg::Str(s) => write!(f, " {k}={s:?}")?,
                    Arg::Int(i) => write!(f, " {k}={i}")?,
                    Arg::Bool(b) => write!(f, " {k}={b}")?,
                }
            }
            if q.quorum_priority {
                write!(f, " (two-level priority, RabbitMQ 4.0+)")?;
            }
            writeln!(f)?;
            for b in self.bindings.iter().filter(|b| b.queue == q.name) {
                writeln!(f, "  bound to {} with key {:?}", b.exchange, b.key)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RetryPolicy;
    use std::time::Duration;

    fn email() -> Subscription {
        Subscription::new("orders.email")
            .bind("order.placed")
            .max_priority(10)
            .retry(RetryPolicy::exponential(Duration::from_millis(100)).max_attempts(3))
    }

    #[test]
    fn plan_follows_the_design_table() {
        let plan = Topology::new("events", [&email()]);
        let text = plan.to_string();
        let expected = [
            "exchange events (topic, durable)",
            "exchange events.dlx (direct, durable)",
            "queue orders.email (classic, durable) x-dead-letter-exchange=\"events.dlx\" \
             x-dead-letter-routing-key=\"orders.email\" x-max-priority=10",
            "  bound to events with key \"order.placed\"",
            "queue orders.email.retry.100 (classic, durable) x-message-ttl=100 \
             x-dead-letter-exchange=\"\" x-dead-letter-routing-key=\"orders.email\"",
            "queue orders.email.retry.200 (classic, durable) x-message-ttl=200",
            "queue orders.email.dlq (classic, durable)",
            "  bound to events.dlx with key \"orders.email\"",
        ];
        for line in expected {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert_eq!(
            plan.queues().collect::<Vec<_>>(),
            [
                "orders.email",
                "orders.email.retry.100",
                "orders.email.retry.200",
                "orders.email.dlq",
                "orders.email.topology"
            ]
        );
    }

    #[test]
    fn quorum_priority_sends_no_max_priority_argument() {
        let s = email().queue_type(QueueType::Quorum);
        let plan = Topology::new("events", [&s]);
        let q = &plan.queues[0];
        assert!(q.quorum_priority);
        assert!(q.args.iter().all(|(k, _)| *k != "x-max-priority"));
        assert!(
            plan.to_string()
                .contains("queue orders.email (quorum, durable)")
        );
    }

    #[test]
    fn conflict_errors_name_the_argument() {
        let e = lapin::Error::from(lapin::ErrorKind::ProtocolError(lapin::protocol::AMQPError::new(
            lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::PRECONDITIONFAILED),
            "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue 'q' in vhost '/': \
             received the value '10' of type 'long' but current is none"
                .into(),
        )));
        match declare_error("queue", "q", e) {
            Error::TopologyConflict {
                kind,
                name,
                argument,
                ..
            } => {
                assert_eq!((kind, name.as_str()), ("queue", "q"));
                assert_eq!(argument.as_deref(), Some("x-max-priority"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
