//! Bring an old version of an event up to the version the handler knows.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use lapin::types::AMQPValue;
use serde_json::Value;
use tower_layer::Layer;

use super::check::{Check, Checked};

use super::filter::payload_of;
use crate::disposition::Disposition;
use crate::event::Event;
use crate::headers;
use crate::message::{Message, Metadata};
use crate::outcome::FailureKind;

type Step = Arc<dyn Fn(Value) -> Value + Send + Sync>;

/// Upcasts messages of one event type to the handler's version, one version at a time.
///
/// Publishers send the version in `x-event-version` (a message without it — from an
/// older rabbitry or another AMQP client — is version 1). A message older than the
/// handler's version goes through the chain of steps (v1→v2, v2→v3, …) on its JSON, and
/// reaches the layers below and the handler as the current version, with its header
/// updated. A message *newer* than the handler, or one whose chain has a gap, is
/// dead-lettered (kind `unsupported_version`) with the reason, never mis-decoded. Messages
/// of other event types pass untouched, so a [`Router`](crate::Router) takes one layer per
/// type.
///
/// ```
/// use rabbitry::middleware::UpcastLayer;
/// use rabbitry::{Event, Registration};
/// use serde_json::json;
/// # use rabbitry::prelude::*;
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct CustomerRegistered { name: String, email: String, country: String }
/// impl Event for CustomerRegistered {
///     const TYPE: &'static str = "customer.registered";
///     const VERSION: u32 = 3;
/// }
///
/// let upcast = UpcastLayer::of::<CustomerRegistered>()
///     // v1 had `mail`; v2 renamed it
///     .step(1, |mut v| {
///         if let Some(mail) = v.as_object_mut().and_then(|o| o.remove("mail")) {
///             v["email"] = mail;
///         }
///         v
///     })
///     // v3 added the country
///     .step(2, |mut v| {
///         v["country"] = json!("unknown");
///         v
///     });
/// # struct Welcome;
/// # impl Worker for Welcome {
/// #     type Event = CustomerRegistered;
/// #     fn subscription(&self) -> Subscription { Subscription::new("welcome").bind("customer.registered") }
/// #     async fn handle(&self, _: Delivery<CustomerRegistered>, _: &Context) -> Outcome { Ok(()) }
/// # }
/// let welcome = Registration::new(Welcome).layer(upcast);
/// # let _ = Runtime::builder().worker(welcome);
/// ```
///
/// Keep every step as long as any queue, dead-letter queue or store may still hold that
/// version: a redriven message from last month is upcast the same way.
#[derive(Clone)]
pub struct UpcastLayer {
    event_type: Arc<str>,
    version: u32,
    steps: Arc<BTreeMap<u32, Step>>,
}

impl fmt::Debug for UpcastLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpcastLayer")
            .field("event_type", &self.event_type)
            .field("version", &self.version)
            .field("steps", &self.steps.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl UpcastLayer {
    /// Upcast messages of `event_type` to `version`.
    pub fn new(event_type: impl Into<String>, version: u32) -> UpcastLayer {
        UpcastLayer {
            event_type: event_type.into().into(),
            version,
            steps: Arc::new(BTreeMap::new()),
        }
    }

    /// Upcast messages of `E::TYPE` to `E::VERSION`.
    pub fn of<E: Event>() -> UpcastLayer {
        UpcastLayer::new(E::TYPE, E::VERSION)
    }

    /// The step from version `from` to `from + 1`.
    pub fn step<F>(mut self, from: u32, step: F) -> UpcastLayer
    where
        F: Fn(Value) -> Value + Send + Sync + 'static,
    {
        Arc::make_mut(&mut self.steps).insert(from, Arc::new(step));
        self
    }

    /// Bring `message` to the target version, or say what to do with it instead.
    fn upcast(&self, message: &mut Message) -> Result<(), Disposition> {
        let (event_type, target) = (&self.event_type, self.version);
        let unsupported =
            |reason| Disposition::dead_letter(FailureKind::UnsupportedVersion, reason);
        let version =
            supported_version(message.metadata(), event_type, target).map_err(unsupported)?;
        if version == target {
            return Ok(());
        }
        if let Some(gap) = (version..target).find(|v| !self.steps.contains_key(v)) {
            return Err(unsupported(format!(
                "{event_type} is version {version}; no upcaster from version {gap} to {}",
                gap + 1
            )));
        }
        let mut payload = payload_of(message)?;
        for v in version..target {
            payload = (self.steps[&v])(payload);
        }
        let body = serde_json::to_vec(&payload).map_err(|e| {
            Disposition::retry(format!("the upcast payload cannot be serialized: {e}"))
        })?;
        message.set_body(body);
        message.set_header(
            headers::EVENT_VERSION,
            AMQPValue::LongLongInt(target.into()),
        );
        Ok(())
    }
}

/// The version of a message (1 when it has no `x-event-version`), if a handler of
/// `event_type` at version `handled` can take it (perhaps once upcast); else why not.
pub(crate) fn supported_version(
    meta: &Metadata,
    event_type: &str,
    handled: u32,
) -> Result<u32, String> {
    let found = meta.event_version();
    let present = meta
        .headers()
        .is_some_and(|h| h.inner().contains_key(headers::EVENT_VERSION));
    if present && found.is_none() || found == Some(0) {
        return Err(format!(
            "header {} is not a version number (1 or more)",
            headers::EVENT_VERSION
        ));
    }
    let version = found.unwrap_or(1);
    if version > handled {
        return Err(format!(
            "{event_type} is version {version}, newer than this worker handles \
             ({handled}): deploy a worker that knows it, then redrive"
        ));
    }
    Ok(version)
}

impl<S> Layer<S> for UpcastLayer {
    type Service = Upcast<S>;

    fn layer(&self, inner: S) -> Upcast<S> {
        Checked::new(inner, self.clone())
    }
}

/// The service of [`UpcastLayer`].
pub type Upcast<S> = Checked<S, UpcastLayer>;

impl Check for UpcastLayer {
    fn check(&self, message: &mut Message) -> Option<Disposition> {
        if message.metadata().event_type() != &*self.event_type {
            return None;
        }
        self.upcast(message).err()
    }
}
