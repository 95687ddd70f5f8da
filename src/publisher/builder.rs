//! Configuring a publisher.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use super::{Inner, Publisher, Returns, SlotCell};
use crate::broker;
use crate::error::{Error, Result};
use crate::observe::{Observer, Observers};
use crate::rate::{Limiter, Rate};
#[cfg(feature = "schema")]
use crate::schema::Schemas;

/// Configures a [`Publisher`].
#[derive(Clone)]
pub struct PublisherBuilder {
    pub(super) url: String,
    pub(super) exchange: String,
    pub(super) timeout: Duration,
    pub(super) connections: usize,
    pub(super) max_body: usize,
    pub(super) app_id: Option<String>,
    pub(super) name: String,
    pub(super) observers: Vec<Arc<dyn Observer>>,
    pub(super) rate: Option<Rate>,
    #[cfg(feature = "schema")]
    pub(super) schemas: Option<Schemas>,
}

impl fmt::Debug for PublisherBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublisherBuilder")
            .field("url", &broker::redact_url(&self.url))
            .field("exchange", &self.exchange)
            .field("timeout", &self.timeout)
            .field("connections", &self.connections)
            .field("max_body", &self.max_body)
            .field("app_id", &self.app_id)
            .field("name", &self.name)
            .field("observers", &self.observers.len())
            .finish()
    }
}

impl PublisherBuilder {
    /// Publish to this exchange (default `events`).
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// Fail a publish that is not confirmed within `timeout` (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Number of connections, each with one confirm channel (default 1, which keeps
    /// messages from one task in order).
    pub fn connections(mut self, connections: usize) -> Self {
        self.connections = connections;
        self
    }

    /// Refuse bodies larger than this many bytes (default 16 MiB, RabbitMQ 4's default
    /// `max_message_size`).
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        self.max_body = max;
        self
    }

    /// The `app_id` property (default: the executable's name).
    pub fn app_id(mut self, app_id: impl Into<String>) -> Self {
        self.app_id = Some(app_id.into());
        self
    }

    /// The connection name shown in the management UI (default `rabbitry-publisher`).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Tell `observer` how every publish ends (see [`observe`](crate::observe)).
    pub fn observer(mut self, observer: impl Observer) -> Self {
        self.observers.push(Arc::new(observer));
        self
    }

    /// Publish at most at `rate`: a publish waits for its slot (it is never refused).
    /// Limits this publisher's own publishes (and its clones'), not the runtime's retry and
    /// dead-letter copies.
    pub fn rate_limit(mut self, rate: Rate) -> Self {
        self.rate = Some(rate);
        self
    }

    /// Check each event against the schema of its type in `schemas` before it is sent: an
    /// event that breaks it is refused with [`Error::Invalid`] and nothing is sent. Types
    /// without a schema are not checked.
    #[cfg(feature = "schema")]
    pub fn schemas(mut self, schemas: Schemas) -> Self {
        self.schemas = Some(schemas);
        self
    }

    /// The runtime's observers, for its own publisher.
    pub(crate) fn observers(mut self, observers: Vec<Arc<dyn Observer>>) -> Self {
        self.observers = observers;
        self
    }

    /// Check the settings and connect.
    pub async fn connect(self) -> Result<Publisher> {
        let publisher = self.build()?;
        // Connect now, so that a wrong URL or a stopped broker is reported here.
        publisher.inner.slot(0).await?;
        Ok(publisher)
    }

    /// Check the settings without connecting: the connection opens on the first publish
    /// (whose error then says if the broker cannot be reached). For a publisher that may
    /// never be used, or that must not delay a start.
    pub fn build(self) -> Result<Publisher> {
        if self.connections == 0 {
            return Err(Error::Config(
                "publisher connections must be at least 1".into(),
            ));
        }
        if self.timeout.is_zero() {
            return Err(Error::Config(
                "publish timeout must be longer than zero".into(),
            ));
        }
        broker::short("exchange name", &self.exchange)?;
        let app_id = match self.app_id.or_else(executable_name) {
            Some(id) => Some(broker::short("app_id", &id)?),
            None => None,
        };
        let pool = broker::Pool::new(&self.url, self.name, self.connections)?;
        Ok(Publisher {
            inner: Arc::new(Inner {
                url: broker::redact_url(&self.url),
                pool,
                slots: (0..self.connections).map(|_| SlotCell::default()).collect(),
                next: AtomicUsize::new(0),
                exchange: self.exchange,
                timeout: self.timeout,
                max_body: self.max_body,
                app_id,
                returns: Returns::default(),
                observers: Observers::new(self.observers),
                limiter: self.rate.map(Limiter::new),
                delays: tokio::sync::OnceCell::new(),
                #[cfg(feature = "schema")]
                schemas: self.schemas.filter(|s| !s.is_empty()),
            }),
        })
    }
}

fn executable_name() -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.file_stem()?.to_string_lossy().into_owned())
}
