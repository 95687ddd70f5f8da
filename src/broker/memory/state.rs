//! The in-memory broker's state and every operation on it, following RabbitMQ's semantics
//! for what rabbitry uses. One lock guards it all: this broker is for tests, demos and
//! single-process use, where being simple and exact matters more than throughput.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::topic;
use crate::broker::{Confirm, Incoming};

/// What a consumer's stream yields.
pub(super) type Delivery = lapin::Result<Incoming>;

/// A message held by a queue.
#[derive(Clone, Debug)]
pub(super) struct Message {
    pub(super) exchange: String,
    pub(super) routing_key: String,
    pub(super) properties: BasicProperties,
    pub(super) body: Vec<u8>,
    pub(super) redelivered: bool,
    /// When it entered its current queue (tokio time, so that paused tests can fast-forward).
    enqueued_at: Instant,
    /// Its position in its current queue: a requeued message goes back to it.
    seq: u64,
}

struct Queue {
    args: FieldTable,
    quorum: bool,
    max_priority: Option<u8>,
    ttl: Option<Duration>,
    dead_letter_exchange: Option<String>,
    dead_letter_key: Option<String>,
    /// Ready messages by priority level, each level first in, first out.
    ready: BTreeMap<u8, VecDeque<Message>>,
    /// Consumers as (channel, tag), served round-robin.
    consumers: Vec<(u64, String)>,
    next_consumer: usize,
    expiry_scheduled: bool,
}

impl Queue {
    fn level(&self, priority: Option<u8>) -> u8 {
        let priority = priority.unwrap_or(0);
        if self.quorum {
            // RabbitMQ 4 quorum queues: two levels, high above 4.
            u8::from(priority > 4)
        } else {
            self.max_priority.map_or(0, |max| priority.min(max))
        }
    }

    fn push_back(&mut self, message: Message) {
        let level = self.level(*message.properties.priority());
        self.ready.entry(level).or_default().push_back(message);
    }

    /// Put a requeued message back where it was, as RabbitMQ does.
    fn requeue(&mut self, message: Message) {
        let level = self
            .ready
            .entry(self.level(*message.properties.priority()))
            .or_default();
        let at = level.partition_point(|m| m.seq < message.seq);
        level.insert(at, message);
    }

    fn pop(&mut self) -> Option<Message> {
        let mut level = self.ready.last_entry()?;
        let message = level.get_mut().pop_front();
        if level.get().is_empty() {
            level.remove();
        }
        message
    }

    fn len(&self) -> usize {
        self.ready.values().map(VecDeque::len).sum()
    }

    /// Ready messages in the order they would be delivered.
    fn in_order(&self) -> impl Iterator<Item = &Message> {
        self.ready.values().rev().flatten()
    }

    /// Remove the messages whose time-to-live has passed, oldest first.
    fn take_expired(&mut self, now: Instant) -> Vec<Message> {
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

    fn next_expiry(&self) -> Option<Instant> {
        let ttl = self.ttl?;
        self.ready
            .values()
            .filter_map(|l| l.front())
            .map(|m| m.enqueued_at + ttl)
            .min()
    }
}

struct Consumer {
    queue: String,
    prefetch: u16,
    unacked: usize,
    tx: mpsc::UnboundedSender<Delivery>,
}

struct Unacked {
    queue: String,
    consumer: Option<String>,
    message: Message,
}

struct Chan {
    conn: u64,
    next_tag: u64,
    prefetch: u16,
    consumers: HashMap<String, Consumer>,
    unacked: BTreeMap<u64, Unacked>,
}

struct Conn {
    channels: Vec<u64>,
    lost: watch::Sender<Option<lapin::Error>>,
}

/// Everything the broker holds.
#[derive(Default)]
pub(super) struct State {
    /// Exchange name → kind (`topic`, `direct`, `fanout`). The default exchange is implicit.
    exchanges: HashMap<String, String>,
    /// (exchange, queue, binding key).
    bindings: BTreeSet<(String, String, String)>,
    queues: HashMap<String, Queue>,
    conns: HashMap<u64, Conn>,
    chans: HashMap<u64, Chan>,
    next_id: u64,
    next_seq: u64,
    /// TTL queues that just received messages and may need an expiry timer.
    pub(super) needs_expiry: Vec<String>,
    /// Messages published by clients, when recording is on.
    pub(super) journal: Option<Vec<Message>>,
}

fn soft(kind: AMQPSoftError, text: String) -> lapin::Error {
    // AMQP reply texts are short strings: keep them under 256 bytes.
    let mut end = text.len().min(255);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let message = ShortString::from(&text[..end]);
    lapin::ErrorKind::ProtocolError(AMQPError::new(AMQPErrorKind::Soft(kind), message)).into()
}

fn channel_closed(operation: &'static str) -> lapin::Error {
    lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, operation).into()
}

fn no_queue(name: &str) -> lapin::Error {
    soft(
        AMQPSoftError::NOTFOUND,
        format!("NOT_FOUND - no queue '{name}' in vhost '/'"),
    )
}

/// An argument's value, compared the way RabbitMQ does: any integer width is the same number.
#[derive(Debug, PartialEq)]
enum Arg {
    Int(i128),
    Text(Vec<u8>),
    Other(String),
}

fn arg(value: &AMQPValue) -> Arg {
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

fn arg_text(args: &FieldTable, key: &str) -> Option<String> {
    match args.inner().get(key).map(arg) {
        Some(Arg::Text(t)) => Some(String::from_utf8_lossy(&t).into_owned()),
        _ => None,
    }
}

fn arg_int(args: &FieldTable, key: &str) -> Option<i128> {
    match args.inner().get(key).map(arg) {
        Some(Arg::Int(i)) => Some(i),
        _ => None,
    }
}

/// `properties` with a death of the message in `queue` for `reason` recorded in `x-death`,
/// as RabbitMQ does: one entry per (queue, reason), most recent first, with a count.
fn with_death(
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

impl State {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    // ------------------------------------------------------------ connections and channels

    pub(super) fn connect(&mut self) -> (u64, watch::Receiver<Option<lapin::Error>>) {
        let id = self.id();
        let (lost, watcher) = watch::channel(None);
        self.conns.insert(
            id,
            Conn {
                channels: Vec::new(),
                lost,
            },
        );
        (id, watcher)
    }

    pub(super) fn is_connected(&self, conn: u64) -> bool {
        self.conns.contains_key(&conn)
    }

    pub(super) fn open_channel(&mut self, conn: u64) -> lapin::Result<u64> {
        let id = self.id();
        let Some(c) = self.conns.get_mut(&conn) else {
            return Err(
                lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed).into(),
            );
        };
        c.channels.push(id);
        self.chans.insert(
            id,
            Chan {
                conn,
                next_tag: 0,
                prefetch: 0,
                consumers: HashMap::new(),
                unacked: BTreeMap::new(),
            },
        );
        Ok(id)
    }

    pub(super) fn is_open(&self, chan: u64) -> bool {
        self.chans.contains_key(&chan)
    }

    fn chan(&mut self, chan: u64, operation: &'static str) -> lapin::Result<&mut Chan> {
        self.chans
            .get_mut(&chan)
            .ok_or_else(|| channel_closed(operation))
    }

    /// Close a channel: its consumers end (with `error` first, if any) and every delivery it
    /// did not acknowledge goes back to the front of its queue, marked redelivered.
    pub(super) fn close_channel(&mut self, chan: u64, error: Option<lapin::Error>) {
        let Some(c) = self.chans.remove(&chan) else {
            return;
        };
        if let Some(conn) = self.conns.get_mut(&c.conn) {
            conn.channels.retain(|ch| *ch != chan);
        }
        let mut touched = BTreeSet::new();
        for (tag, consumer) in c.consumers {
            if let Some(e) = &error {
                let _ = consumer.tx.send(Err(e.clone()));
            }
            if let Some(q) = self.queues.get_mut(&consumer.queue) {
                q.consumers.retain(|(ch, t)| !(*ch == chan && *t == tag));
            }
            touched.insert(consumer.queue);
        }
        for (_, unacked) in c.unacked.into_iter().rev() {
            if let Some(q) = self.queues.get_mut(&unacked.queue) {
                let mut message = unacked.message;
                message.redelivered = true;
                q.requeue(message);
                touched.insert(unacked.queue);
            }
        }
        for queue in touched {
            self.dispatch(&queue);
        }
    }

    /// A channel error: the broker closes the channel, as RabbitMQ does.
    fn fail(&mut self, chan: u64, error: lapin::Error) -> lapin::Error {
        self.close_channel(chan, Some(error.clone()));
        error
    }

    /// Close a connection and its channels; `error` marks it as lost rather than closed.
    pub(super) fn close_connection(&mut self, conn: u64, error: Option<lapin::Error>) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        for chan in c.channels {
            self.close_channel(chan, error.clone());
        }
        let reason = error.unwrap_or_else(|| {
            lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed).into()
        });
        c.lost.send_replace(Some(reason));
    }

    /// Fail every connection, as if the network had dropped.
    pub(super) fn break_connections(&mut self) {
        let conns: Vec<u64> = self.conns.keys().copied().collect();
        for conn in conns {
            let error = std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "in-memory connection broken",
            );
            self.close_connection(conn, Some(error.into()));
        }
    }

    // ------------------------------------------------------------ topology

    pub(super) fn declare_exchange(
        &mut self,
        chan: u64,
        name: &str,
        kind: &str,
    ) -> lapin::Result<()> {
        self.chan(chan, "exchange.declare")?;
        match self.exchanges.get(name) {
            Some(existing) if existing != kind => {
                let text = format!(
                    "PRECONDITION_FAILED - inequivalent arg 'type' for exchange '{name}' in vhost '/': \
                     received '{kind}' but current is '{existing}'"
                );
                Err(self.fail(chan, soft(AMQPSoftError::PRECONDITIONFAILED, text)))
            }
            Some(_) => Ok(()),
            None => {
                self.exchanges.insert(name.to_owned(), kind.to_owned());
                Ok(())
            }
        }
    }

    pub(super) fn declare_queue(
        &mut self,
        chan: u64,
        name: &str,
        args: FieldTable,
    ) -> lapin::Result<u32> {
        self.chan(chan, "queue.declare")?;
        let quorum = arg_text(&args, "x-queue-type").as_deref() == Some("quorum");
        if quorum && args.contains_key("x-max-priority") {
            let text = format!(
                "PRECONDITION_FAILED - invalid arg 'x-max-priority' for queue '{name}' in vhost '/' \
                 of queue type rabbit_quorum_queue"
            );
            return Err(self.fail(chan, soft(AMQPSoftError::PRECONDITIONFAILED, text)));
        }
        if let Some(existing) = self.queues.get(name) {
            let keys: BTreeSet<&str> = existing
                .args
                .inner()
                .keys()
                .chain(args.inner().keys())
                .map(|k| k.as_str())
                .collect();
            let differing = keys
                .into_iter()
                .find(|k| existing.args.inner().get(*k).map(arg) != args.inner().get(*k).map(arg))
                .map(str::to_owned);
            if let Some(key) = differing {
                let show = |t: &FieldTable| {
                    t.inner()
                        .get(key.as_str())
                        .map_or("none".into(), |v| format!("{:?}", arg(v)))
                };
                let text = format!(
                    "PRECONDITION_FAILED - inequivalent arg '{key}' for queue '{name}' in vhost '/': \
                     received {} but current is {}",
                    show(&args),
                    show(&existing.args)
                );
                return Err(self.fail(chan, soft(AMQPSoftError::PRECONDITIONFAILED, text)));
            }
            return Ok(existing.len() as u32);
        }
        let max_priority = arg_int(&args, "x-max-priority").map(|p| p.clamp(1, 255) as u8);
        let ttl = arg_int(&args, "x-message-ttl").map(|ms| Duration::from_millis(ms.max(0) as u64));
        let queue = Queue {
            quorum,
            max_priority,
            ttl,
            dead_letter_exchange: arg_text(&args, "x-dead-letter-exchange"),
            dead_letter_key: arg_text(&args, "x-dead-letter-routing-key"),
            args,
            ready: BTreeMap::new(),
            consumers: Vec::new(),
            next_consumer: 0,
            expiry_scheduled: false,
        };
        self.queues.insert(name.to_owned(), queue);
        Ok(0)
    }

    pub(super) fn bind(
        &mut self,
        chan: u64,
        queue: &str,
        exchange: &str,
        key: &str,
    ) -> lapin::Result<()> {
        self.chan(chan, "queue.bind")?;
        if !self.exchanges.contains_key(exchange) {
            let text = format!("NOT_FOUND - no exchange '{exchange}' in vhost '/'");
            return Err(self.fail(chan, soft(AMQPSoftError::NOTFOUND, text)));
        }
        if !self.queues.contains_key(queue) {
            return Err(self.fail(chan, no_queue(queue)));
        }
        self.bindings
            .insert((exchange.to_owned(), queue.to_owned(), key.to_owned()));
        Ok(())
    }

    pub(super) fn delete_queue(&mut self, chan: u64, name: &str) -> lapin::Result<u32> {
        self.chan(chan, "queue.delete")?;
        let Some(queue) = self.queues.remove(name) else {
            return Ok(0);
        };
        self.bindings.retain(|(_, q, _)| q != name);
        // Its consumers are cancelled by the broker: their streams end.
        for (ch, tag) in queue.consumers.iter() {
            if let Some(c) = self.chans.get_mut(ch) {
                c.consumers.remove(tag);
            }
        }
        Ok(queue.len() as u32)
    }

    // ------------------------------------------------------------ consuming

    pub(super) fn qos(&mut self, chan: u64, prefetch: u16) -> lapin::Result<()> {
        self.chan(chan, "basic.qos")?.prefetch = prefetch;
        Ok(())
    }

    pub(super) fn consume(
        &mut self,
        chan: u64,
        queue: &str,
        tag: &str,
    ) -> lapin::Result<mpsc::UnboundedReceiver<Delivery>> {
        self.chan(chan, "basic.consume")?;
        if !self.queues.contains_key(queue) {
            return Err(self.fail(chan, no_queue(queue)));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let c = self.chan(chan, "basic.consume")?;
        let consumer = Consumer {
            queue: queue.to_owned(),
            prefetch: c.prefetch,
            unacked: 0,
            tx,
        };
        c.consumers.insert(tag.to_owned(), consumer);
        if let Some(q) = self.queues.get_mut(queue) {
            q.consumers.push((chan, tag.to_owned()));
        }
        self.dispatch(queue);
        Ok(rx)
    }

    pub(super) fn cancel(&mut self, chan: u64, tag: &str) -> lapin::Result<()> {
        let c = self.chan(chan, "basic.cancel")?;
        // Dropping the sender ends the consumer's stream; its unacknowledged deliveries stay
        // on the channel, still to be acknowledged.
        if let Some(consumer) = c.consumers.remove(tag)
            && let Some(q) = self.queues.get_mut(&consumer.queue)
        {
            q.consumers.retain(|(ch, t)| !(*ch == chan && t == tag));
        }
        Ok(())
    }

    /// Acknowledge `tag` (and every earlier unacknowledged delivery when `multiple`).
    pub(super) fn ack(&mut self, chan: u64, tag: u64, multiple: bool) -> lapin::Result<()> {
        let c = self.chan(chan, "basic.ack")?;
        if !c.unacked.contains_key(&tag) {
            let text = format!("PRECONDITION_FAILED - unknown delivery tag {tag}");
            return Err(self.fail(chan, soft(AMQPSoftError::PRECONDITIONFAILED, text)));
        }
        let acked: Vec<Unacked> = if multiple {
            let later = c.unacked.split_off(&(tag + 1));
            std::mem::replace(&mut c.unacked, later)
                .into_values()
                .collect()
        } else {
            c.unacked.remove(&tag).into_iter().collect()
        };
        let mut touched = BTreeSet::new();
        for unacked in acked {
            if let Some(consumer) = unacked.consumer.and_then(|t| c.consumers.get_mut(&t)) {
                consumer.unacked = consumer.unacked.saturating_sub(1);
            }
            touched.insert(unacked.queue);
        }
        for queue in touched {
            self.dispatch(&queue);
        }
        Ok(())
    }

    /// Reject `tag`: back to the front of its queue, or dead-lettered.
    pub(super) fn nack(&mut self, chan: u64, tag: u64, requeue: bool) -> lapin::Result<()> {
        let c = self.chan(chan, "basic.nack")?;
        let Some(unacked) = c.unacked.remove(&tag) else {
            let text = format!("PRECONDITION_FAILED - unknown delivery tag {tag}");
            return Err(self.fail(chan, soft(AMQPSoftError::PRECONDITIONFAILED, text)));
        };
        if let Some(consumer) = unacked
            .consumer
            .as_ref()
            .and_then(|t| c.consumers.get_mut(t))
        {
            consumer.unacked = consumer.unacked.saturating_sub(1);
        }
        let mut message = unacked.message;
        if requeue {
            if let Some(q) = self.queues.get_mut(&unacked.queue) {
                message.redelivered = true;
                q.requeue(message);
            }
        } else {
            self.dead_letter(&unacked.queue, message, "rejected");
        }
        self.dispatch(&unacked.queue);
        Ok(())
    }

    /// Fetch one message with auto-acknowledgement; its message id.
    pub(super) fn get_message_id(
        &mut self,
        chan: u64,
        queue: &str,
    ) -> lapin::Result<Option<String>> {
        self.chan(chan, "basic.get")?;
        self.expire(queue);
        let Some(q) = self.queues.get_mut(queue) else {
            return Err(self.fail(chan, no_queue(queue)));
        };
        Ok(q.pop()
            .and_then(|m| m.properties.message_id().as_ref().map(|id| id.to_string())))
    }

    /// Hand ready messages to consumers with room under their prefetch, round-robin.
    fn dispatch(&mut self, queue: &str) {
        self.expire(queue);
        loop {
            let Some(q) = self.queues.get_mut(queue) else {
                return;
            };
            if q.ready.is_empty() || q.consumers.is_empty() {
                return;
            }
            let n = q.consumers.len();
            let has_room = |(ch, tag): &(u64, String)| {
                self.chans
                    .get(ch)
                    .and_then(|c| c.consumers.get(tag))
                    .is_some_and(|c| c.prefetch == 0 || c.unacked < usize::from(c.prefetch))
            };
            let Some(i) = (0..n)
                .map(|i| (q.next_consumer + i) % n)
                .find(|i| has_room(&q.consumers[*i]))
            else {
                return;
            };
            q.next_consumer = (i + 1) % n;
            let (ch, tag) = q.consumers[i].clone();
            let Some(message) = q.pop() else {
                return;
            };
            let Some(c) = self.chans.get_mut(&ch) else {
                return;
            };
            c.next_tag += 1;
            let delivery_tag = c.next_tag;
            let Some(consumer) = c.consumers.get_mut(&tag) else {
                return;
            };
            let incoming = Incoming {
                tag: delivery_tag,
                exchange: message.exchange.clone(),
                routing_key: message.routing_key.clone(),
                redelivered: message.redelivered,
                properties: message.properties.clone(),
                body: message.body.clone(),
            };
            if consumer.tx.send(Ok(incoming)).is_err() {
                // Its stream was dropped without a cancel: the consumer is gone.
                c.consumers.remove(&tag);
                if let Some(q) = self.queues.get_mut(queue) {
                    q.consumers.retain(|(c, t)| !(*c == ch && *t == tag));
                    q.requeue(message);
                }
                continue;
            }
            consumer.unacked += 1;
            c.unacked.insert(
                delivery_tag,
                Unacked {
                    queue: queue.to_owned(),
                    consumer: Some(tag),
                    message,
                },
            );
        }
    }

    // ------------------------------------------------------------ publishing and routing

    fn route(&self, exchange: &str, key: &str) -> Vec<String> {
        if exchange.is_empty() {
            return self
                .queues
                .contains_key(key)
                .then(|| key.to_owned())
                .into_iter()
                .collect();
        }
        let kind = self.exchanges.get(exchange).map(String::as_str);
        let mut queues: Vec<String> = self
            .bindings
            .iter()
            .filter(|(x, _, pattern)| {
                x == exchange
                    && match kind {
                        Some("topic") => topic::matches(pattern, key),
                        Some("fanout") => true,
                        _ => pattern == key,
                    }
            })
            .map(|(_, q, _)| q.clone())
            .collect();
        queues.dedup();
        queues
    }

    fn enqueue(&mut self, queue: &str, mut message: Message) {
        self.next_seq += 1;
        message.seq = self.next_seq;
        message.enqueued_at = Instant::now();
        if let Some(q) = self.queues.get_mut(queue) {
            q.push_back(message);
            if q.ttl.is_some() && !q.expiry_scheduled {
                self.needs_expiry.push(queue.to_owned());
            }
        }
    }

    /// A client's publish. The confirm is immediate; an unroutable `mandatory` message comes
    /// back (its message id in the confirm), an unknown exchange closes the channel.
    pub(super) fn publish(
        &mut self,
        chan: u64,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> lapin::Result<Confirm> {
        self.chan(chan, "basic.publish")?;
        if !self.has_exchange(exchange) {
            let text = format!("NOT_FOUND - no exchange '{exchange}' in vhost '/'");
            return Err(self.fail(chan, soft(AMQPSoftError::NOTFOUND, text)));
        }
        let routed = self.deliver(exchange, routing_key, body, properties.clone());
        if routed == 0 && mandatory {
            let id = properties.message_id().as_ref().map(|id| id.to_string());
            return Ok(Confirm::Ack { returned: Some(id) });
        }
        Ok(Confirm::Ack { returned: None })
    }

    /// Whether `exchange` exists (the default exchange always does).
    pub(super) fn has_exchange(&self, exchange: &str) -> bool {
        exchange.is_empty() || self.exchanges.contains_key(exchange)
    }

    /// Route a message to every matching queue (recording it when recording is on);
    /// how many queues took it.
    pub(super) fn deliver(
        &mut self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> usize {
        let message = Message {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            properties,
            body: body.to_vec(),
            redelivered: false,
            enqueued_at: Instant::now(),
            seq: 0,
        };
        let queues = self.route(exchange, routing_key);
        for queue in &queues {
            self.enqueue(queue, message.clone());
            self.dispatch(queue);
        }
        if let Some(journal) = &mut self.journal {
            journal.push(message);
        }
        queues.len()
    }

    /// Dead-letter a message leaving `queue` for `reason` (`rejected`, `expired`), per the
    /// queue's `x-dead-letter-exchange` and `x-dead-letter-routing-key`; dropped without them.
    fn dead_letter(&mut self, queue: &str, message: Message, reason: &str) {
        let Some(q) = self.queues.get(queue) else {
            return;
        };
        let Some(exchange) = q.dead_letter_exchange.clone() else {
            return;
        };
        let routing_key = q
            .dead_letter_key
            .clone()
            .unwrap_or_else(|| message.routing_key.clone());
        let properties = with_death(&message.properties, queue, reason, &message);
        let moved = Message {
            exchange: exchange.clone(),
            routing_key: routing_key.clone(),
            properties,
            body: message.body,
            redelivered: false,
            enqueued_at: Instant::now(),
            seq: 0,
        };
        for target in self.route(&exchange, &routing_key) {
            self.enqueue(&target, moved.clone());
            self.dispatch(&target);
        }
    }

    // ------------------------------------------------------------ time to live

    /// Dead-letter whatever has expired in `queue`.
    fn expire(&mut self, queue: &str) {
        let expired = match self.queues.get_mut(queue) {
            Some(q) => q.take_expired(Instant::now()),
            None => return,
        };
        for message in expired {
            self.dead_letter(queue, message, "expired");
        }
    }

    /// Expire what is due in `queue`; when its next message expires, or `None` (and the
    /// queue's timer stops) when it holds none.
    pub(super) fn expire_due(&mut self, queue: &str) -> Option<Instant> {
        self.expire(queue);
        self.dispatch(queue);
        let q = self.queues.get_mut(queue)?;
        let next = q.next_expiry();
        q.expiry_scheduled = next.is_some();
        next
    }

    /// Claim the expiry timer of `queue`; false if one runs already or none is needed.
    pub(super) fn claim_expiry(&mut self, queue: &str) -> bool {
        match self.queues.get_mut(queue) {
            Some(q) if !q.expiry_scheduled && q.ttl.is_some() && !q.ready.is_empty() => {
                q.expiry_scheduled = true;
                true
            }
            _ => false,
        }
    }

    // ------------------------------------------------------------ inspection

    pub(super) fn queue_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.queues.keys().cloned().collect();
        names.sort();
        names
    }

    pub(super) fn ready(&mut self, queue: &str) -> Option<usize> {
        self.expire(queue);
        self.queues.get(queue).map(Queue::len)
    }

    pub(super) fn peek(&mut self, queue: &str) -> Vec<Message> {
        self.expire(queue);
        self.queues
            .get(queue)
            .map(|q| q.in_order().cloned().collect())
            .unwrap_or_default()
    }

    pub(super) fn take(&mut self, queue: &str, max: usize) -> Vec<Message> {
        self.expire(queue);
        let Some(q) = self.queues.get_mut(queue) else {
            return Vec::new();
        };
        std::iter::from_fn(|| q.pop()).take(max).collect()
    }

    /// Nothing left to do: no delivery awaits an acknowledgement, no queue with a consumer
    /// holds a ready message, and no message waits out a time-to-live (a pending retry).
    pub(super) fn idle(&self) -> bool {
        self.chans.values().all(|c| c.unacked.is_empty())
            && self
                .queues
                .values()
                .all(|q| q.ready.is_empty() || (q.consumers.is_empty() && q.ttl.is_none()))
    }
}
