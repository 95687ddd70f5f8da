//! The in-memory broker's state: connections, channels, topology and inspection here;
//! consuming in [`consume`], publishing, routing and dead-lettering in [`route`]. The
//! in-memory broker's state and every operation on it, following RabbitMQ's semantics
//! for what rabbitry uses. One lock guards it all: this broker is for tests, demos and
//! single-process use, where being simple and exact matters more than throughput.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use tokio::sync::{mpsc, watch};

pub(super) use super::queue::Message;
use super::queue::{Queue, arg, arg_int, arg_text, describe};

mod consume;
mod route;
use crate::broker::Incoming;

/// What a consumer's stream yields.
pub(super) type Delivery = lapin::Result<Incoming>;

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
    /// Bindings that match on message headers (from a `headers` exchange, to a queue or
    /// another exchange).
    header_bindings: Vec<HeaderBinding>,
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

/// A binding of a `headers` exchange: a message whose headers hold every `(key, value)`
/// pair (`x-match = all`) goes to the destination, a queue or another exchange.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct HeaderBinding {
    pub(super) exchange: String,
    pub(super) destination: String,
    pub(super) to_exchange: bool,
    pub(super) matching: Vec<(String, String)>,
}

/// The queue argument marking a queue whose message is a lease held unacknowledged (see
/// [`Queue::lease`]); RabbitMQ keeps it as an ordinary argument.
pub(crate) const LEASE_ARG: &str = "x-rabbitry-lease";

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
                let show =
                    |t: &FieldTable| t.inner().get(key.as_str()).map_or("none".into(), describe);
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
        let single_active = matches!(
            args.inner().get("x-single-active-consumer"),
            Some(AMQPValue::Boolean(true))
        );
        let lease = matches!(args.inner().get(LEASE_ARG), Some(AMQPValue::Boolean(true)));
        let queue = Queue {
            quorum,
            single_active,
            lease,
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
        let binding = self.binding(chan, "queue.bind", queue, exchange, key)?;
        self.bindings.insert(binding);
        Ok(())
    }

    /// Bind `destination` (a queue, or an exchange when `to_exchange`) to the headers
    /// exchange `exchange` for messages whose headers hold every pair of `matching`.
    pub(super) fn bind_headers(
        &mut self,
        chan: u64,
        destination: &str,
        to_exchange: bool,
        exchange: &str,
        matching: &[(&str, &str)],
    ) -> lapin::Result<()> {
        self.chan(chan, "exchange.bind")?;
        for x in std::iter::once(exchange).chain(to_exchange.then_some(destination)) {
            if !self.exchanges.contains_key(x) {
                let text = format!("NOT_FOUND - no exchange '{x}' in vhost '/'");
                return Err(self.fail(chan, soft(AMQPSoftError::NOTFOUND, text)));
            }
        }
        if !to_exchange && !self.queues.contains_key(destination) {
            return Err(self.fail(chan, no_queue(destination)));
        }
        let binding = HeaderBinding {
            exchange: exchange.to_owned(),
            destination: destination.to_owned(),
            to_exchange,
            matching: matching
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        if !self.header_bindings.contains(&binding) {
            self.header_bindings.push(binding);
        }
        Ok(())
    }

    /// The binding `exchange` → `queue` with `key`, once both ends are known to exist.
    fn binding(
        &mut self,
        chan: u64,
        operation: &'static str,
        queue: &str,
        exchange: &str,
        key: &str,
    ) -> lapin::Result<(String, String, String)> {
        self.chan(chan, operation)?;
        if !self.exchanges.contains_key(exchange) {
            let text = format!("NOT_FOUND - no exchange '{exchange}' in vhost '/'");
            return Err(self.fail(chan, soft(AMQPSoftError::NOTFOUND, text)));
        }
        if !self.queues.contains_key(queue) {
            return Err(self.fail(chan, no_queue(queue)));
        }
        Ok((exchange.to_owned(), queue.to_owned(), key.to_owned()))
    }

    pub(super) fn queue_counts(&mut self, chan: u64, name: &str) -> lapin::Result<(u32, u32)> {
        self.chan(chan, "queue.declare")?;
        match self.queues.get(name) {
            Some(q) => Ok((q.len() as u32, q.consumers.len() as u32)),
            None => Err(self.fail(chan, no_queue(name))),
        }
    }

    pub(super) fn declare_queue_passive(&mut self, chan: u64, name: &str) -> lapin::Result<u32> {
        self.queue_counts(chan, name).map(|(ready, _)| ready)
    }

    pub(super) fn unbind(
        &mut self,
        chan: u64,
        queue: &str,
        exchange: &str,
        key: &str,
    ) -> lapin::Result<()> {
        let binding = self.binding(chan, "queue.unbind", queue, exchange, key)?;
        self.bindings.remove(&binding);
        Ok(())
    }

    pub(super) fn delete_queue(
        &mut self,
        chan: u64,
        name: &str,
        if_empty: bool,
    ) -> lapin::Result<u32> {
        self.chan(chan, "queue.delete")?;
        if if_empty && self.queues.get(name).is_some_and(|q| q.len() > 0) {
            let text = format!("PRECONDITION_FAILED - queue '{name}' in vhost '/' is not empty");
            return Err(self.fail(chan, soft(AMQPSoftError::PRECONDITIONFAILED, text)));
        }
        Ok(self.remove_queue(name).unwrap_or(0) as u32)
    }

    /// Delete a queue, its bindings and its consumers; how many messages it held.
    pub(super) fn remove_queue(&mut self, name: &str) -> Option<usize> {
        let queue = self.queues.remove(name)?;
        self.bindings.retain(|(_, q, _)| q != name);
        self.header_bindings
            .retain(|b| b.to_exchange || b.destination != name);
        // Its consumers are cancelled by the broker: their streams end.
        for (ch, tag) in queue.consumers.iter() {
            if let Some(c) = self.chans.get_mut(ch) {
                c.consumers.remove(tag);
            }
        }
        Some(queue.len())
    }

    // ------------------------------------------------------------ inspection

    pub(super) fn is_bound(&self, queue: &str, exchange: &str, key: &str) -> bool {
        self.bindings
            .contains(&(exchange.to_owned(), queue.to_owned(), key.to_owned()))
    }

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
        let leased = |u: &Unacked| self.queues.get(&u.queue).is_some_and(|q| q.lease);
        self.chans.values().all(|c| c.unacked.values().all(leased))
            && self
                .queues
                .values()
                .all(|q| q.ready.is_empty() || (q.consumers.is_empty() && q.ttl.is_none()))
    }
}
