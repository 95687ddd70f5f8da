//! The in-memory broker's side of the seam: connections, channels and consumers' streams.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use lapin::BasicProperties;
use lapin::types::FieldTable;
use tokio::sync::{mpsc, watch};

use super::state::{Delivery, State};
use super::{Broker, SCHEME};
use crate::broker::{Confirm, Incoming};
use crate::error::{BrokerError, Error, Result};

struct ConnHandle {
    broker: Arc<Broker>,
    id: u64,
    lost: watch::Receiver<Option<lapin::Error>>,
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        let id = self.id;
        self.broker.with(|s| s.close_connection(id, None));
    }
}

/// A connection to an in-memory broker; closed when its last clone (and channel) is dropped.
#[derive(Clone)]
pub(crate) struct Connection {
    inner: Arc<ConnHandle>,
}

impl Connection {
    pub(crate) fn open(url: &str) -> Result<Connection> {
        let name = url.strip_prefix(SCHEME).unwrap_or(url);
        let name = name.split(['?', '/']).next().unwrap_or_default();
        if name.is_empty() {
            return Err(Error::Config(format!(
                "'{url}' names no in-memory broker: use memory://<name> (see MemoryBroker::url)"
            )));
        }
        let broker = Broker::named(name);
        let (id, lost) = broker.with(State::connect);
        Ok(Connection {
            inner: Arc::new(ConnHandle { broker, id, lost }),
        })
    }

    pub(crate) fn channel(&self) -> lapin::Result<Channel> {
        let id = self.inner.broker.with(|s| s.open_channel(self.inner.id))?;
        Ok(Channel {
            inner: Arc::new(ChanHandle {
                conn: self.inner.clone(),
                id,
            }),
        })
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.inner.broker.lock().is_connected(self.inner.id)
    }

    pub(crate) fn lost(&self) -> impl std::future::Future<Output = BrokerError> + Send + 'static {
        let mut lost = self.inner.lost.clone();
        async move {
            loop {
                if let Some(e) = lost.borrow_and_update().clone() {
                    return BrokerError::from(e);
                }
                if lost.changed().await.is_err() {
                    let closed =
                        lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed);
                    return BrokerError::from(lapin::Error::from(closed));
                }
            }
        }
    }

    pub(crate) fn close(&self) {
        let id = self.inner.id;
        self.inner.broker.with(|s| s.close_connection(id, None));
    }
}

struct ChanHandle {
    conn: Arc<ConnHandle>,
    id: u64,
}

impl Drop for ChanHandle {
    fn drop(&mut self) {
        let id = self.id;
        self.conn.broker.with(|s| s.close_channel(id, None));
    }
}

/// A channel on an in-memory connection; closed when its last clone is dropped.
#[derive(Clone)]
pub(crate) struct Channel {
    inner: Arc<ChanHandle>,
}

impl Channel {
    fn with<T>(&self, op: impl FnOnce(&mut State, u64) -> T) -> T {
        let id = self.inner.id;
        self.inner.conn.broker.with(|s| op(s, id))
    }

    pub(crate) fn is_open(&self) -> bool {
        self.with(|s, id| s.is_open(id))
    }

    pub(crate) fn declare_exchange(&self, name: &str, kind: &str) -> lapin::Result<()> {
        self.with(|s, id| s.declare_exchange(id, name, kind))
    }

    pub(crate) fn declare_queue(&self, name: &str, args: FieldTable) -> lapin::Result<u32> {
        self.with(|s, id| s.declare_queue(id, name, args))
    }

    pub(crate) fn queue_counts(&self, name: &str) -> lapin::Result<(u32, u32)> {
        self.with(|s, id| s.queue_counts(id, name))
    }

    pub(crate) fn declare_queue_passive(&self, name: &str) -> lapin::Result<u32> {
        self.with(|s, id| s.declare_queue_passive(id, name))
    }

    pub(crate) fn delete_queue(&self, name: &str, if_empty: bool) -> lapin::Result<u32> {
        self.with(|s, id| s.delete_queue(id, name, if_empty))
    }

    pub(crate) fn unbind(&self, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
        self.with(|s, id| s.unbind(id, queue, exchange, key))
    }

    pub(crate) fn get(&self, queue: &str) -> lapin::Result<Option<Incoming>> {
        self.with(|s, id| s.get(id, queue))
    }

    pub(crate) fn bind(&self, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
        self.with(|s, id| s.bind(id, queue, exchange, key))
    }

    pub(crate) fn bind_headers(
        &self,
        destination: &str,
        to_exchange: bool,
        exchange: &str,
        matching: &[(&str, &str)],
    ) -> lapin::Result<()> {
        self.with(|s, id| s.bind_headers(id, destination, to_exchange, exchange, matching))
    }

    pub(crate) fn qos(&self, prefetch: u16) -> lapin::Result<()> {
        self.with(|s, id| s.qos(id, prefetch))
    }

    pub(crate) fn confirm_select(&self) -> lapin::Result<()> {
        // Every publish is confirmed at once; there is no mode to switch on.
        if self.is_open() {
            Ok(())
        } else {
            Err(lapin::ErrorKind::InvalidChannelState(
                lapin::ChannelState::Closed,
                "confirm.select",
            )
            .into())
        }
    }

    pub(crate) fn consume(&self, queue: &str, tag: &str) -> lapin::Result<Deliveries> {
        self.with(|s, id| s.consume(id, queue, tag)).map(Deliveries)
    }

    pub(crate) fn get_message_id(&self, queue: &str) -> lapin::Result<Option<String>> {
        self.with(|s, id| s.get_message_id(id, queue))
    }

    pub(crate) fn cancel(&self, tag: &str) -> lapin::Result<()> {
        self.with(|s, id| s.cancel(id, tag))
    }

    pub(crate) fn ack(&self, tag: u64, multiple: bool) -> lapin::Result<()> {
        self.with(|s, id| s.ack(id, tag, multiple))
    }

    pub(crate) fn nack(&self, tag: u64, requeue: bool) -> lapin::Result<()> {
        self.with(|s, id| s.nack(id, tag, requeue))
    }

    pub(crate) fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> lapin::Result<Confirm> {
        self.with(|s, id| s.publish(id, exchange, routing_key, body, properties, mandatory))
    }

    pub(crate) fn close(&self) {
        self.with(|s, id| s.close_channel(id, None));
    }
}

/// A consumer's deliveries; ends when the consumer is cancelled or its channel closes.
pub(crate) struct Deliveries(mpsc::UnboundedReceiver<Delivery>);

impl Stream for Deliveries {
    type Item = lapin::Result<Incoming>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}
