//! Messages and queues of the in-memory broker: priority levels, requeueing to the original
//! position, time-to-live, and the bookkeeping RabbitMQ does when it dead-letters.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use tokio::time::Instant;

/// A message held by a queue.
#[derive(Clone, Debug)]
pub(super) struct Message {
    pub(super) exchange: String,
    pub(super) routing_key: String,
    pub(super) properties: BasicProperties,
    pub(super) body: Vec<u8>,
    pub(super) redelivered: bool,
    /// When it entered its current queue (tokio time, so that paused tests can fast-forward).
    pub(super) enqueued_at: Instant,
    /// Its position in its current queue: a requeued message goes back to it.
    pub(super) seq: u64,
}

/// A queue: its declaration and its ready messages, by priority level.
pub(super) struct Queue {
    pub(super) args: FieldTable,
    pub(super) quorum: bool,
    /// Single active consumer: only the first consumer (the oldest) is delivered to.
    pub(super) single_active: bool,
    /// Holds a lease its consumer keeps unacknowledged on purpose (a schedule's token): an
    /// unacknowledged delivery from it is not work in progress.
    pub(super) lease: bool,
    pub(super) max_priority: Option<u8>,
    pub(super) ttl: Option<Duration>,
    pub(super) dead_letter_exchange: Option<String>,
    pub(super) dead_letter_key: Option<String>,
    /// Ready messages by priority level, each level first in, first out.
    pub(super) ready: BTreeMap<u8, VecDeque<Message>>,
    /// Consumers as (channel, tag), served round-robin.
    pub(super) consumers: Vec<(u64, String)>,
    pub(super) next_consumer: usize,
    pub(super) expiry_scheduled: bool,
}

impl Queue {
    pub(super) fn level(&self, priority: Option<u8>) -> u8 {
        let priority = priority.unwrap_or(0);
        if self.quorum {
            // RabbitMQ 4 quorum queues: two levels, high above 4.
            u8::from(priority > 4)
        } else {
            self.max_priority.map_or(0, |max| priority.min(max))
        }
    }

    pub(super) fn push_back(&mut self, message: Message) {
        let level = self.level(*message.properties.priority());
        self.ready.entry(level).or_default().push_back(message);
    }

    /// Put a requeued message back where it was, as RabbitMQ does.
    pub(super) fn requeue(&mut self, message: Message) {
        let level = self
            .ready
            .entry(self.level(*message.properties.priority()))
            .or_default();
        let at = level.partition_point(|m| m.seq < message.seq);
        level.insert(at, message);
    }

    pub(super) fn pop(&mut self) -> Option<Message> {
        let mut level = self.ready.last_entry()?;
        let message = level.get_mut().pop_front();
        if level.get().is_empty() {
            level.remove();
        }
        message
    }

    pub(super) fn len(&self) -> usize {
        self.ready.values().map(VecDeque::len).sum()
    }

    /// Ready messages in the order they would be delivered.
    pub(super) fn in_order(&self) -> impl Iterator<Item = &Message> {
        self.ready.values().rev().flatten()
    }

    /// Remove the messages whose time-to-live has passed, oldest first.
    pub(super) fn take_expired(&mut self, now: Instant) -> Vec<Message> {
        let Some(ttl) = self.ttl else {
            return Vec::new();
        };
        let mut expired = Vec::new();
        for level in self.ready.values_mut() {
            while level.front().is_some_and(|m| m.enqueued_at + ttl <= now) {
                expired.extend(level.pop_front());
            }
        }
        self.ready.retain(|_, level| !level.is_empty());
        expired
    }

    pub(super) fn next_expiry(&self) -> Option<Instant> {
        let ttl = self.ttl?;
        self.ready
            .values()
            .filter_map(|l| l.front())
            .map(|m| m.enqueued_at + ttl)
            .min()
    }
}

/// An argument's value, compared the way RabbitMQ does: any integer width is the same number.
#[derive(Debug, PartialEq)]
pub(super) enum Arg {
    Int(i128),
    Text(Vec<u8>),
    Other(String),
}

pub(super) fn arg(value: &AMQPValue) -> Arg {
    match value {
        AMQPValue::ShortShortInt(v) => Arg::Int((*v).into()),
        AMQPValue::ShortShortUInt(v) => Arg::Int((*v).into()),
        AMQPValue::ShortInt(v) => Arg::Int((*v).into()),
        AMQPValue::ShortUInt(v) => Arg::Int((*v).into()),
        AMQPValue::LongInt(v) => Arg::Int((*v).into()),
        AMQPValue::LongUInt(v) => Arg::Int((*v).into()),
        AMQPValue::LongLongInt(v) => Arg::Int((*v).into()),
        AMQPValue::LongString(s) => Arg::Text(s.as_bytes().to_vec()),
        AMQPValue::ShortString(s) => Arg::Text(s.as_str().as_bytes().to_vec()),
        other => Arg::Other(format!("{other:?}")),
    }
}

/// An argument's value as RabbitMQ words it in a PRECONDITION_FAILED reply.
pub(super) fn describe(value: &AMQPValue) -> String {
    let (shown, kind) = match value {
        AMQPValue::LongString(s) => (
            String::from_utf8_lossy(s.as_bytes()).into_owned(),
            "longstr",
        ),
        AMQPValue::ShortString(s) => (s.to_string(), "longstr"),
        AMQPValue::LongLongInt(v) => (v.to_string(), "long"),
        AMQPValue::LongInt(v) => (v.to_string(), "signedint"),
        AMQPValue::LongUInt(v) => (v.to_string(), "unsignedint"),
        AMQPValue::ShortInt(v) => (v.to_string(), "short"),
        AMQPValue::ShortUInt(v) => (v.to_string(), "unsignedshort"),
        AMQPValue::ShortShortInt(v) => (v.to_string(), "byte"),
        AMQPValue::ShortShortUInt(v) => (v.to_string(), "unsignedbyte"),
        AMQPValue::Boolean(v) => (v.to_string(), "bool"),
        other => (format!("{other:?}"), "other"),
    };
    format!("the value '{shown}' of type '{kind}'")
}

pub(super) fn arg_text(args: &FieldTable, key: &str) -> Option<String> {
    match args.inner().get(key).map(arg) {
        Some(Arg::Text(t)) => Some(String::from_utf8_lossy(&t).into_owned()),
        _ => None,
    }
}

pub(super) fn arg_int(args: &FieldTable, key: &str) -> Option<i128> {
    match args.inner().get(key).map(arg) {
        Some(Arg::Int(i)) => Some(i),
        _ => None,
    }
}

/// `properties` with a death of the message in `queue` for `reason` recorded in `x-death`,
/// as RabbitMQ does: one entry per (queue, reason), most recent first, with a count.
pub(super) fn with_death(
    properties: &BasicProperties,
    queue: &str,
    reason: &str,
    message: &Message,
) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let same = |d: &AMQPValue| match d {
        AMQPValue::FieldTable(t) => {
            arg_text(t, "queue").as_deref() == Some(queue)
                && arg_text(t, "reason").as_deref() == Some(reason)
        }
        _ => false,
    };
    let count = match deaths.iter().position(same) {
        Some(i) => match deaths.remove(i) {
            AMQPValue::FieldTable(t) => arg_int(&t, "count").unwrap_or(0) as i64 + 1,
            _ => 1,
        },
        None => 1,
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut entry = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes()));
    entry.insert("count".into(), AMQPValue::LongLongInt(count));
    entry.insert("reason".into(), text(reason));
    entry.insert("queue".into(), text(queue));
    entry.insert("time".into(), AMQPValue::Timestamp(now));
    entry.insert("exchange".into(), text(&message.exchange));
    entry.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![text(&message.routing_key)])),
    );
    deaths.insert(0, AMQPValue::FieldTable(entry));
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );
    properties.clone().with_headers(headers)
}
