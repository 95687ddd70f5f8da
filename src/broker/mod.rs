//! The narrow seam between the runtime and the broker: connections, channels, declarations,
//! consuming, acknowledging and publishing. Two implementations stand behind it — RabbitMQ
//! over AMQP ([`amqp`]), and an in-process broker with the same semantics ([`memory`]) —
//! chosen by the URL's scheme. Nothing above this module knows which one it talks to.

mod amqp;
mod memory;

use std::future::Future;

use futures_util::Stream;
use futures_util::future::Either;
use lapin::BasicProperties;
use lapin::types::{FieldTable, ShortString};

use crate::error::{BrokerError, Error, Result};
pub use memory::{BrokerMessage, MemoryBroker};

/// `url` with its password replaced by `***`, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    match authority[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &authority[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// The queue argument of a queue whose one message is a lease its consumer holds
/// unacknowledged on purpose; the in-memory broker does not count it as work in progress.
pub(crate) use memory::LEASE_ARG;

/// Whether `url` names an in-memory broker.
pub(crate) fn is_memory_url(url: &str) -> bool {
    memory::is_memory_url(url)
}

/// The wall and tokio times at which the in-memory broker at `url` was made.
pub(crate) fn memory_epoch(url: &str) -> (std::time::SystemTime, tokio::time::Instant) {
    memory::epoch(url)
}

/// Turn a string into an AMQP short string, or say which field is too long.
pub(crate) fn short(what: &str, s: &str) -> Result<ShortString> {
    ShortString::try_new(s).map_err(|_| {
        Error::Config(format!(
            "{what} is {} bytes; AMQP allows at most 255",
            s.len()
        ))
    })
}

/// A message received from a queue.
#[derive(Debug)]
pub(crate) struct Incoming {
    pub(crate) tag: u64,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) redelivered: bool,
    pub(crate) properties: BasicProperties,
    pub(crate) body: Vec<u8>,
}

/// The broker's answer to a confirmed publish.
#[derive(Debug)]
pub(crate) enum Confirm {
    /// Stored (or, for an unroutable mandatory message, dropped: `returned` then carries
    /// the message id of a returned message, which may belong to another publish).
    Ack { returned: Option<Option<String>> },
    /// Refused.
    Nack,
}

/// Whether the broker answered `error` with this AMQP reply code.
pub(crate) fn reply_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

/// 404: the exchange or queue does not exist.
pub(crate) const NOT_FOUND: u16 = 404;
/// 406: a declaration conflicts with what exists.
pub(crate) const PRECONDITION_FAILED: u16 = 406;

/// One connection to a broker.
#[derive(Clone)]
pub(crate) enum Connection {
    Amqp(amqp::Connection),
    Memory(memory::Connection),
}

impl Connection {
    /// Connect once (no retries). `name` shows in RabbitMQ's management UI.
    pub(crate) async fn open(url: &str, name: &str) -> Result<Connection> {
        if memory::is_memory_url(url) {
            return memory::Connection::open(url).map(Connection::Memory);
        }
        amqp::Connection::open(url, name)
            .await
            .map(Connection::Amqp)
    }

    pub(crate) async fn channel(&self) -> Result<Channel> {
        match self {
            Connection::Amqp(c) => c.channel().await.map(Channel::Amqp),
            Connection::Memory(c) => c.channel().map(Channel::Memory).map_err(Error::from),
        }
    }

    /// Run `op` on a channel of its own and close it afterwards, whatever `op` returned:
    /// a refused operation (404, 406) closes that channel only.
    pub(crate) async fn on_channel<T, E: From<Error>>(
        &self,
        op: impl AsyncFnOnce(&Channel) -> Result<T, E>,
    ) -> Result<T, E> {
        let ch = self.channel().await?;
        let result = op(&ch).await;
        ch.close().await;
        result
    }

    pub(crate) fn is_connected(&self) -> bool {
        match self {
            Connection::Amqp(c) => c.is_connected(),
            Connection::Memory(c) => c.is_connected(),
        }
    }

    /// Resolves when the connection is lost, with the reason.
    pub(crate) fn lost(&self) -> impl Future<Output = BrokerError> + Send + 'static {
        match self {
            Connection::Amqp(c) => Either::Left(c.lost()),
            Connection::Memory(c) => Either::Right(c.lost()),
        }
    }

    pub(crate) async fn close(&self) {
        match self {
            Connection::Amqp(c) => c.close().await,
            Connection::Memory(c) => c.close(),
        }
    }
}

/// One channel on a [`Connection`].
#[derive(Clone)]
pub(crate) enum Channel {
    Amqp(amqp::Channel),
    Memory(memory::Channel),
}

impl Channel {
    pub(crate) fn is_open(&self) -> bool {
        match self {
            Channel::Amqp(c) => c.is_open(),
            Channel::Memory(c) => c.is_open(),
        }
    }

    pub(crate) async fn declare_exchange(&self, name: &str, kind: &str) -> lapin::Result<()> {
        match self {
            Channel::Amqp(c) => c.declare_exchange(name, kind).await,
            Channel::Memory(c) => c.declare_exchange(name, kind),
        }
    }

    /// Declare a durable queue; returns the number of messages ready in it.
    pub(crate) async fn declare_queue(&self, name: &str, args: FieldTable) -> lapin::Result<u32> {
        match self {
            Channel::Amqp(c) => c.declare_queue(name, args).await,
            Channel::Memory(c) => c.declare_queue(name, args),
        }
    }

    /// Passively declare a queue (404 NOT_FOUND closes the channel if it does not exist);
    /// returns its ready messages and its consumers.
    pub(crate) async fn queue_counts(&self, name: &str) -> lapin::Result<(u32, u32)> {
        match self {
            Channel::Amqp(c) => c.queue_counts(name).await,
            Channel::Memory(c) => c.queue_counts(name),
        }
    }

    /// Check that a queue exists (404 NOT_FOUND closes the channel if not); returns the
    /// number of messages ready in it.
    pub(crate) async fn declare_queue_passive(&self, name: &str) -> lapin::Result<u32> {
        match self {
            Channel::Amqp(c) => c.declare_queue_passive(name).await,
            Channel::Memory(c) => c.declare_queue_passive(name),
        }
    }

    pub(crate) async fn delete_queue(&self, name: &str) -> lapin::Result<u32> {
        match self {
            Channel::Amqp(c) => c.delete_queue(name, false).await,
            Channel::Memory(c) => c.delete_queue(name, false),
        }
    }

    /// Delete a queue only if it holds no message (406 PRECONDITION_FAILED closes the
    /// channel if it does).
    pub(crate) async fn delete_queue_if_empty(&self, name: &str) -> lapin::Result<u32> {
        match self {
            Channel::Amqp(c) => c.delete_queue(name, true).await,
            Channel::Memory(c) => c.delete_queue(name, true),
        }
    }

    pub(crate) async fn unbind(&self, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
        match self {
            Channel::Amqp(c) => c.unbind(queue, exchange, key).await,
            Channel::Memory(c) => c.unbind(queue, exchange, key),
        }
    }

    pub(crate) async fn bind(&self, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
        match self {
            Channel::Amqp(c) => c.bind(queue, exchange, key).await,
            Channel::Memory(c) => c.bind(queue, exchange, key),
        }
    }

    /// Bind `destination` — a queue, or an exchange when `to_exchange` — to the `headers`
    /// exchange `exchange` for messages whose headers hold every `(key, value)` of
    /// `matching` (string values, `x-match = all`).
    pub(crate) async fn bind_headers(
        &self,
        destination: &str,
        to_exchange: bool,
        exchange: &str,
        matching: &[(&str, &str)],
    ) -> lapin::Result<()> {
        match self {
            Channel::Amqp(c) => {
                c.bind_headers(destination, to_exchange, exchange, matching)
                    .await
            }
            Channel::Memory(c) => c.bind_headers(destination, to_exchange, exchange, matching),
        }
    }

    /// Per-consumer prefetch (never global: RabbitMQ 4.3 rejects global QoS).
    pub(crate) async fn qos(&self, prefetch: u16) -> lapin::Result<()> {
        match self {
            Channel::Amqp(c) => c.qos(prefetch).await,
            Channel::Memory(c) => c.qos(prefetch),
        }
    }

    pub(crate) async fn confirm_select(&self) -> lapin::Result<()> {
        match self {
            Channel::Amqp(c) => c.confirm_select().await,
            Channel::Memory(c) => c.confirm_select(),
        }
    }

    pub(crate) async fn consume(
        &self,
        queue: &str,
        tag: &str,
    ) -> lapin::Result<impl Stream<Item = lapin::Result<Incoming>> + Send + Unpin + use<>> {
        Ok(match self {
            Channel::Amqp(c) => Either::Left(c.consume(queue, tag).await?),
            Channel::Memory(c) => Either::Right(c.consume(queue, tag)?),
        })
    }

    /// Fetch one message to be acknowledged (or returned to the queue when the channel
    /// closes); `None` when the queue is empty.
    pub(crate) async fn get(&self, queue: &str) -> lapin::Result<Option<Incoming>> {
        match self {
            Channel::Amqp(c) => c.get(queue).await,
            Channel::Memory(c) => c.get(queue),
        }
    }

    /// Fetch one message with auto-acknowledgement and return its message id.
    pub(crate) async fn get_message_id(&self, queue: &str) -> lapin::Result<Option<String>> {
        match self {
            Channel::Amqp(c) => c.get_message_id(queue).await,
            Channel::Memory(c) => c.get_message_id(queue),
        }
    }

    pub(crate) async fn cancel(&self, tag: &str) -> lapin::Result<()> {
        match self {
            Channel::Amqp(c) => c.cancel(tag).await,
            Channel::Memory(c) => c.cancel(tag),
        }
    }

    /// Acknowledge every unacknowledged delivery up to and including `tag`.
    pub(crate) async fn ack_up_to(&self, tag: u64) -> lapin::Result<()> {
        match self {
            Channel::Amqp(c) => c.ack_up_to(tag).await,
            Channel::Memory(c) => c.ack(tag, true),
        }
    }

    /// Acknowledge exactly `tag`.
    pub(crate) async fn ack_one(&self, tag: u64) -> lapin::Result<()> {
        match self {
            Channel::Amqp(c) => c.ack_one(tag).await,
            Channel::Memory(c) => c.ack(tag, false),
        }
    }

    pub(crate) async fn nack(&self, tag: u64, requeue: bool) -> lapin::Result<()> {
        match self {
            Channel::Amqp(c) => c.nack(tag, requeue).await,
            Channel::Memory(c) => c.nack(tag, requeue),
        }
    }

    /// Send a message; the returned future resolves with the broker's confirm (the channel
    /// must be in confirm mode). With `mandatory`, an unroutable message comes back.
    pub(crate) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> lapin::Result<impl Future<Output = lapin::Result<Confirm>> + Send + use<>> {
        Ok(match self {
            Channel::Amqp(c) => Either::Left(
                c.publish(exchange, routing_key, body, properties, mandatory)
                    .await?,
            ),
            Channel::Memory(c) => Either::Right(std::future::ready(c.publish(
                exchange,
                routing_key,
                body,
                properties,
                mandatory,
            ))),
        })
    }

    pub(crate) async fn close(&self) {
        match self {
            Channel::Amqp(c) => c.close().await,
            Channel::Memory(c) => c.close(),
        }
    }
}

/// Where a publisher gets its connections.
pub(crate) enum Pool {
    Amqp(amqp::Pool),
    Memory(String),
}

impl Pool {
    /// A pool of at most `size` connections to `url`; nothing connects yet.
    pub(crate) fn new(url: &str, name: String, size: usize) -> Result<Pool> {
        if memory::is_memory_url(url) {
            return Ok(Pool::Memory(url.to_owned()));
        }
        amqp::Pool::new(url, name, size).map(Pool::Amqp)
    }

    pub(crate) async fn get(&self) -> Result<Connection> {
        match self {
            Pool::Amqp(p) => p.get().await.map(Connection::Amqp),
            Pool::Memory(url) => memory::Connection::open(url).map(Connection::Memory),
        }
    }

    pub(crate) fn close(&self) {
        if let Pool::Amqp(p) = self {
            p.close();
        }
    }

    /// The error of a connection (and channel) that did not open within `after`.
    pub(crate) fn timed_out(&self, after: std::time::Duration) -> crate::error::Error {
        let url = match self {
            Pool::Amqp(p) => p.url().to_owned(),
            Pool::Memory(url) => url.clone(),
        };
        let e = std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection and channel within {after:?}"),
        );
        crate::error::Error::Connect {
            url,
            source: crate::error::BrokerError::from(lapin::Error::from(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_survive_redaction() {
        assert_eq!(
            redact_url("amqp://guest:s3cret@localhost:5672/%2f"),
            "amqp://guest:***@localhost:5672/%2f"
        );
        assert_eq!(
            redact_url("amqps://u:p@ss@host/vh?heartbeat=5"),
            "amqps://u:***@host/vh?heartbeat=5"
        );
        assert_eq!(redact_url("amqp://localhost"), "amqp://localhost");
        assert_eq!(redact_url("amqp://user@localhost"), "amqp://user@localhost");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn overlong_names_are_errors_not_panics() {
        assert!(short("routing key", &"k".repeat(256)).is_err());
        assert!(short("routing key", "order.placed").is_ok());
    }
}
