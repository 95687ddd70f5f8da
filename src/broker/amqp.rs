//! The AMQP side of the seam: RabbitMQ through lapin.

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeBindOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, ConnectionProperties, ExchangeKind};

use super::{Confirm, Incoming, redact_url};
use crate::error::{BrokerError, Error, Result};

/// Heartbeat (seconds) when the URL does not set one: a dead peer is noticed in ~2× this.
const DEFAULT_HEARTBEAT: u16 = 10;
/// TCP + handshake timeout (ms) when the URL does not set one.
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;

/// Parse and check an AMQP URL, filling in rabbitry's heartbeat and connect timeout
/// when the URL does not set them.
pub(crate) fn parse_url(url: &str) -> Result<AMQPUri> {
    let mut uri = AMQPUri::from_str(url).map_err(|e| {
        Error::Config(format!(
            "invalid AMQP URL '{}': {e} (expected amqp://user:password@host:5672/vhost)",
            redact_url(url)
        ))
    })?;
    if uri.scheme == lapin::uri::AMQPScheme::AMQPS && !cfg!(feature = "tls") {
        return Err(Error::Config(format!(
            "'{}' uses amqps://, but rabbitry was built without the `tls` feature",
            redact_url(url)
        )));
    }
    uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT);
    uri.query
        .connection_timeout
        .get_or_insert(DEFAULT_CONNECT_TIMEOUT_MS);
    Ok(uri)
}

/// One AMQP connection, owned or borrowed from the publisher's pool.
#[derive(Clone)]
pub(crate) struct Connection {
    inner: Arc<dyn AsLapin>,
}

/// Anything that holds a live `lapin::Connection`.
trait AsLapin: Send + Sync + 'static {
    fn lapin(&self) -> &lapin::Connection;
}

impl AsLapin for lapin::Connection {
    fn lapin(&self) -> &lapin::Connection {
        self
    }
}

impl AsLapin for deadpool_lapin::Object {
    fn lapin(&self) -> &lapin::Connection {
        self
    }
}

impl Connection {
    /// Connect once (no retries). `name` shows in the management UI.
    pub(crate) async fn open(url: &str, name: &str) -> Result<Connection> {
        let uri = parse_url(url)?;
        let props = ConnectionProperties::default().with_connection_name(name.into());
        lapin::Connection::connect_uri(uri, props)
            .await
            .map(|c| Connection { inner: Arc::new(c) })
            .map_err(|e| Error::Connect {
                url: redact_url(url),
                source: BrokerError::from(e),
            })
    }

    /// Wrap a connection taken from the publisher's pool; it goes back to the pool when
    /// the last clone is dropped.
    pub(crate) fn pooled(object: deadpool_lapin::Object) -> Connection {
        Connection {
            inner: Arc::new(object),
        }
    }

    pub(crate) async fn channel(&self) -> Result<Channel> {
        Ok(Channel {
            inner: self.inner.lapin().create_channel().await?,
        })
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.inner.lapin().status().connected()
    }

    /// Resolves when the connection is lost (I/O error, missed heartbeats, or closed by
    /// the broker), with the reason.
    pub(crate) fn lost(&self) -> impl Future<Output = BrokerError> + Send + 'static {
        let events = self.inner.lapin().events_listener();
        let status = self.inner.lapin().status().clone();
        async move {
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                // Channel-level errors are reported here too; only a dead connection counts.
                if let lapin::Event::Error(e) = event
                    && !status.connected()
                {
                    return BrokerError::from(e);
                }
            }
            let closed = lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed);
            BrokerError::from(lapin::Error::from(closed))
        }
    }

    pub(crate) async fn close(&self) {
        if self.is_connected() {
            let _ = self
                .inner
                .lapin()
                .close(200, "rabbitry shutting down".into())
                .await;
        }
    }
}

/// One AMQP channel.
#[derive(Clone)]
pub(crate) struct Channel {
    inner: lapin::Channel,
}

impl Channel {
    pub(crate) fn is_open(&self) -> bool {
        self.inner.status().connected()
    }

    pub(crate) async fn declare_exchange(&self, name: &str, kind: &str) -> lapin::Result<()> {
        let kind = match kind {
            "topic" => ExchangeKind::Topic,
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "headers" => ExchangeKind::Headers,
            other => ExchangeKind::Custom(other.to_owned()),
        };
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        self.inner
            .exchange_declare(name.into(), kind, options, FieldTable::default())
            .await
    }

    /// Declare a durable queue; returns the number of messages ready in it.
    pub(crate) async fn declare_queue(&self, name: &str, args: FieldTable) -> lapin::Result<u32> {
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        self.queue_declare(name, options, args).await
    }

    async fn queue_declare(
        &self,
        name: &str,
        options: QueueDeclareOptions,
        args: FieldTable,
    ) -> lapin::Result<u32> {
        let q = self.inner.queue_declare(name.into(), options, args).await?;
        Ok(q.message_count())
    }

    pub(crate) async fn queue_counts(&self, name: &str) -> lapin::Result<(u32, u32)> {
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let q = self
            .inner
            .queue_declare(name.into(), options, FieldTable::default())
            .await?;
        Ok((q.message_count(), q.consumer_count()))
    }

    pub(crate) async fn declare_queue_passive(&self, name: &str) -> lapin::Result<u32> {
        self.queue_counts(name).await.map(|(ready, _)| ready)
    }

    pub(crate) async fn delete_queue(&self, name: &str, if_empty: bool) -> lapin::Result<u32> {
        let options = QueueDeleteOptions {
            if_empty,
            ..QueueDeleteOptions::default()
        };
        self.inner.queue_delete(name.into(), options).await
    }

    pub(crate) async fn unbind(&self, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
        self.inner
            .queue_unbind(
                queue.into(),
                exchange.into(),
                key.into(),
                FieldTable::default(),
            )
            .await
    }

    pub(crate) async fn bind(&self, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
        self.inner
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    pub(crate) async fn bind_headers(
        &self,
        destination: &str,
        to_exchange: bool,
        exchange: &str,
        matching: &[(&str, &str)],
    ) -> lapin::Result<()> {
        let mut args = FieldTable::default();
        args.insert("x-match".into(), AMQPValue::LongString("all".into()));
        for (k, v) in matching {
            args.insert((*k).into(), AMQPValue::LongString((*v).into()));
        }
        if to_exchange {
            self.inner
                .exchange_bind(
                    destination.into(),
                    exchange.into(),
                    "".into(),
                    ExchangeBindOptions::default(),
                    args,
                )
                .await
        } else {
            self.inner
                .queue_bind(
                    destination.into(),
                    exchange.into(),
                    "".into(),
                    QueueBindOptions::default(),
                    args,
                )
                .await
        }
    }

    /// Per-consumer prefetch (never global: RabbitMQ 4.3 rejects global QoS).
    pub(crate) async fn qos(&self, prefetch: u16) -> lapin::Result<()> {
        self.inner
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
    }

    pub(crate) async fn confirm_select(&self) -> lapin::Result<()> {
        self.inner
            .confirm_select(ConfirmSelectOptions::default())
            .await
    }

    pub(crate) async fn consume(
        &self,
        queue: &str,
        tag: &str,
    ) -> lapin::Result<impl Stream<Item = lapin::Result<Incoming>> + Send + Unpin + use<>> {
        let consumer = self
            .inner
            .basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(consumer.map(|d| d.map(incoming)))
    }

    /// Fetch one message to be acknowledged; `None` when the queue is empty.
    pub(crate) async fn get(&self, queue: &str) -> lapin::Result<Option<Incoming>> {
        let options = lapin::options::BasicGetOptions { no_ack: false };
        let message = self.inner.basic_get(queue.into(), options).await?;
        Ok(message.map(|m| incoming(m.delivery)))
    }

    /// Fetch one message with auto-acknowledgement and return its message id.
    pub(crate) async fn get_message_id(&self, queue: &str) -> lapin::Result<Option<String>> {
        let options = lapin::options::BasicGetOptions { no_ack: true };
        let message = self.inner.basic_get(queue.into(), options).await?;
        Ok(message.and_then(|m| {
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
        }))
    }

    pub(crate) async fn cancel(&self, tag: &str) -> lapin::Result<()> {
        self.inner
            .basic_cancel(tag.into(), BasicCancelOptions::default())
            .await
    }

    /// Acknowledge every unacknowledged delivery up to and including `tag`.
    pub(crate) async fn ack_up_to(&self, tag: u64) -> lapin::Result<()> {
        self.inner
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await
    }

    /// Acknowledge exactly `tag`.
    pub(crate) async fn ack_one(&self, tag: u64) -> lapin::Result<()> {
        self.inner
            .basic_ack(tag, BasicAckOptions { multiple: false })
            .await
    }

    pub(crate) async fn nack(&self, tag: u64, requeue: bool) -> lapin::Result<()> {
        self.inner
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: false,
                    requeue,
                },
            )
            .await
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
        let confirm = self
            .inner
            .basic_publish(
                ShortString::try_new(exchange).map_err(|e| lapin_other(e.to_string()))?,
                ShortString::try_new(routing_key).map_err(|e| lapin_other(e.to_string()))?,
                BasicPublishOptions {
                    mandatory,
                    immediate: false,
                },
                body,
                properties,
            )
            .await?;
        Ok(async move {
            Ok(match confirm.await? {
                lapin::Confirmation::Ack(returned) => Confirm::Ack {
                    returned: returned.map(|m| {
                        m.delivery
                            .properties
                            .message_id()
                            .as_ref()
                            .map(|id| id.to_string())
                    }),
                },
                lapin::Confirmation::Nack(_) => Confirm::Nack,
                // Only a channel without confirm mode answers this; ours always has it.
                lapin::Confirmation::NotRequested => Confirm::Nack,
            })
        })
    }

    pub(crate) async fn close(&self) {
        if self.is_open() {
            let _ = self.inner.close(200, "OK".into()).await;
        }
    }
}

/// A delivery as the seam hands it on.
fn incoming(d: lapin::message::Delivery) -> Incoming {
    Incoming {
        tag: d.delivery_tag,
        exchange: d.exchange.into(),
        routing_key: d.routing_key.into(),
        redelivered: d.redelivered,
        properties: d.properties,
        body: d.data,
    }
}

fn lapin_other(msg: String) -> lapin::Error {
    lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg))
}

/// The publisher's pool of AMQP connections (deadpool-lapin).
pub(crate) struct Pool {
    pool: deadpool_lapin::Pool,
    url: String,
}

impl Pool {
    /// A pool of at most `size` connections to `url`; nothing connects yet.
    pub(crate) fn new(url: &str, name: String, size: usize) -> Result<Pool> {
        let uri = parse_url(url)?;
        let config = deadpool_lapin::Config {
            url: Some(uri.to_string()),
            pool: Some(deadpool_lapin::PoolConfig::new(size)),
        };
        let pool = config
            .create_pool(
                move || ConnectionProperties::default().with_connection_name(name.clone().into()),
                deadpool_lapin::Runtime::Tokio1,
            )
            .map_err(|e| {
                Error::Config(format!(
                    "cannot create the publisher's connection pool: {e}"
                ))
            })?;
        Ok(Pool {
            pool,
            url: redact_url(url),
        })
    }

    /// The broker's URL, without its password.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// A live connection: an idle pooled one, or a new one (dead ones are discarded by the
    /// pool's recycle check). It returns to the pool when its last clone is dropped.
    pub(crate) async fn get(&self) -> Result<Connection> {
        let object = self.pool.get().await.map_err(|e| {
            let source = match e {
                deadpool_lapin::PoolError::Backend(e) => BrokerError::from(e),
                other => {
                    BrokerError::from(lapin::Error::from(std::io::Error::other(other.to_string())))
                }
            };
            Error::Connect {
                url: self.url.clone(),
                source,
            }
        })?;
        Ok(Connection::pooled(object))
    }

    pub(crate) fn close(&self) {
        self.pool.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_a_heartbeat_and_bad_urls_a_clear_error() {
        let uri = parse_url("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(uri.query.heartbeat, Some(DEFAULT_HEARTBEAT));
        let uri = parse_url("amqp://127.0.0.1/%2f?heartbeat=3").unwrap();
        assert_eq!(uri.query.heartbeat, Some(3));
        let err = parse_url("http://guest:pw@host").unwrap_err().to_string();
        assert!(err.contains("invalid AMQP URL"), "{err}");
        assert!(!err.contains("pw"), "{err}");
    }
}
