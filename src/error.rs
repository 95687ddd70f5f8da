//! The crate's error type.

use std::fmt;
use std::time::Duration;

/// `Result` with rabbitry's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in rabbitry, each variant saying what to do about it.
///
/// Handler failures are not errors of this type: a handler returns a
/// [`Failure`](crate::Failure), which the runtime turns into a retry or a dead-letter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is out of range or inconsistent. Nothing was sent to the broker.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The broker could not be reached, or refused the credentials or the virtual host.
    #[error(
        "cannot connect to RabbitMQ at {url}: {source} \
         (check that the broker is running and that the URL's host, port, credentials and vhost are right)"
    )]
    Connect {
        /// The URL tried, with the password redacted.
        url: String,
        /// What the client or the broker said.
        #[source]
        source: BrokerError,
    },

    /// An exchange or queue already exists on the broker with different settings
    /// (the broker answered PRECONDITION_FAILED).
    #[error(
        "{kind} '{name}' already exists with different settings{}: {detail}. \
         Delete it (its messages go with it) or change the worker's settings to match",
        argument.as_ref().map(|a| format!(" (argument '{a}')")).unwrap_or_default()
    )]
    TopologyConflict {
        /// `"queue"` or `"exchange"`.
        kind: &'static str,
        /// The name of the queue or exchange.
        name: String,
        /// The conflicting argument, when the broker named one (for example `x-max-priority`).
        argument: Option<String>,
        /// The broker's own words.
        detail: String,
    },

    /// A worker asks for something the connected broker cannot do.
    #[error("worker '{worker}' cannot run on this broker: {reason}")]
    Unsupported {
        /// The worker's name.
        worker: String,
        /// What is missing and what to do instead.
        reason: String,
    },

    /// A worker on an existing queue ([`Subscription::existing_queue`](crate::Subscription::existing_queue))
    /// found no such queue.
    #[error(
        "queue '{queue}' does not exist; a worker with existing_queue() only consumes a queue \
         declared elsewhere (declare it first, or drop existing_queue() to let rabbitry declare it)"
    )]
    QueueNotFound {
        /// The missing queue.
        queue: String,
    },

    /// Declaring an exchange, queue or binding failed for a reason other than a conflict.
    #[error("declaring {kind} '{name}' failed: {source}")]
    Declare {
        /// `"queue"`, `"exchange"` or `"binding"`.
        kind: &'static str,
        /// The name of what was declared.
        name: String,
        /// What the broker said.
        #[source]
        source: BrokerError,
    },

    /// A published message matched no binding: no queue would have received it.
    #[error(
        "message to exchange '{exchange}' with routing key '{routing_key}' is unroutable: \
         no queue is bound for that key (start the consuming worker first, or check the event type)"
    )]
    Unroutable {
        /// The exchange published to.
        exchange: String,
        /// The routing key used.
        routing_key: String,
    },

    /// The exchange published to does not exist.
    #[error(
        "exchange '{exchange}' does not exist (declare it, or start a runtime that declares it)"
    )]
    ExchangeNotFound {
        /// The missing exchange.
        exchange: String,
    },

    /// The broker refused the message (a negative publisher confirm).
    #[error(
        "the broker refused the message to exchange '{exchange}' with routing key '{routing_key}' \
         (a queue may be full with overflow=reject-publish, or out of resources); it was not stored"
    )]
    Nacked {
        /// The exchange published to.
        exchange: String,
        /// The routing key used.
        routing_key: String,
    },

    /// No publisher confirm arrived in time. The message may or may not have been stored.
    #[error(
        "no confirm for the message to exchange '{exchange}' with routing key '{routing_key}' \
         within {timeout:?}; it may or may not have been stored (publish again: consumers must be idempotent)"
    )]
    PublishTimeout {
        /// The exchange published to.
        exchange: String,
        /// The routing key used.
        routing_key: String,
        /// The configured publish timeout.
        timeout: Duration,
    },

    /// The connection failed before the broker confirmed the message; it may or may not have been stored.
    #[error(
        "the connection failed before the broker confirmed the message to exchange '{exchange}' \
         with routing key '{routing_key}': {source}; it may or may not have been stored"
    )]
    NotConfirmed {
        /// The exchange published to.
        exchange: String,
        /// The routing key used.
        routing_key: String,
        /// What failed.
        #[source]
        source: BrokerError,
    },

    /// A message body is larger than the configured limit.
    #[error(
        "message body is {size} bytes, over the limit of {limit} bytes (raise max_body_bytes or send less)"
    )]
    BodyTooLarge {
        /// The body's size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },

    /// Some messages of a batch were not confirmed; the others were.
    #[error(
        "{} of {total} messages in the batch failed; the first (#{}): {}",
        failures.len(),
        failures.first().map_or(0, |f| f.0),
        failures.first().map_or_else(String::new, |f| f.1.to_string())
    )]
    Batch {
        /// How many messages the batch held.
        total: usize,
        /// The position in the batch and the error of each failed message, in order.
        failures: Vec<(usize, Error)>,
    },

    /// Not sent: an earlier message of the same batch (at this position) failed with an
    /// error that every later one would have met too (the broker could not be reached).
    #[error(
        "not sent: message #{cause} of the batch could not reach the broker, so the rest were not tried"
    )]
    NotSent {
        /// The position of the message whose error stopped the batch.
        cause: usize,
    },

    /// An event breaks the JSON Schema registered for its type (with
    /// `PublisherBuilder::schemas`, feature `schema`); nothing was sent.
    #[error("event '{event_type}' does not match its schema, so it was not sent: {reason}")]
    Invalid {
        /// The event type.
        event_type: String,
        /// The first few violations, each with the field's JSON pointer.
        reason: String,
    },

    /// An event could not be serialized to JSON.
    #[error("cannot serialize the event to JSON: {0}")]
    Serialize(#[source] serde_json::Error),

    /// No worker with this name is registered with the runtime.
    #[error("no worker named '{0}' is registered")]
    UnknownWorker(String),

    /// A worker with this name is already registered with the runtime.
    #[error("a worker named '{0}' is already registered (queue names must be unique per runtime)")]
    DuplicateWorker(String),

    /// The runtime or publisher has been shut down.
    #[error("the runtime has shut down")]
    ShutDown,

    /// Control across processes failed (the registered worker states could not be read).
    #[error("{0}")]
    Control(String),

    /// Any other error from the AMQP client or the broker.
    #[error("broker error: {0}")]
    Broker(#[from] BrokerError),
}

/// An error reported by the AMQP client library or the broker.
#[derive(Clone)]
pub struct BrokerError(Box<lapin::Error>);

impl BrokerError {
    /// The AMQP reply code when the broker closed a channel or connection with an error
    /// (for example 404 NOT_FOUND or 406 PRECONDITION_FAILED).
    pub fn reply_code(&self) -> Option<u16> {
        match self.0.kind() {
            lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
            _ => None,
        }
    }

    /// The broker's reply text, when the broker closed a channel or connection with an error.
    pub fn reply_text(&self) -> Option<&str> {
        match self.0.kind() {
            lapin::ErrorKind::ProtocolError(e) => Some(e.get_message().as_str()),
            _ => None,
        }
    }
}

impl fmt::Debug for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.kind() {
            // The broker's own text already names the condition ("NOT_FOUND - no exchange …").
            lapin::ErrorKind::ProtocolError(e) => f.write_str(e.get_message().as_str()),
            _ => fmt::Display::fmt(&self.0, f),
        }
    }
}

impl std::error::Error for BrokerError {}

impl From<lapin::Error> for BrokerError {
    fn from(e: lapin::Error) -> Self {
        BrokerError(Box::new(e))
    }
}

impl From<lapin::Error> for Error {
    fn from(e: lapin::Error) -> Self {
        Error::Broker(BrokerError::from(e))
    }
}
