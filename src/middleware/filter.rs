//! Keep the messages a worker wants; skip the others.

use std::fmt;
use std::sync::Arc;

use serde_json::Value;
use tower_layer::Layer;

use super::check::{Check, Checked};

use crate::condition::Condition;
use crate::disposition::Disposition;
use crate::message::Message;
use crate::outcome::FailureKind;

type Predicate = Arc<dyn Fn(&Message) -> bool + Send + Sync>;
type PayloadPredicate = Arc<dyn Fn(&Value) -> bool + Send + Sync>;

#[derive(Clone)]
enum Keep {
    Condition(Arc<Condition>),
    Message(Predicate),
    Payload(PayloadPredicate),
}

/// Lets through the messages that meet a condition; the others are *skipped*:
/// acknowledged and recorded as skipped with the reason, never retried or dead-lettered.
///
/// Filter on the event type, the source (`app_id`, any header) or the payload, with a
/// declarative [`Condition`] or a closure:
///
/// ```
/// use rabbitry::middleware::FilterLayer;
/// use rabbitry::{Condition, Registration};
/// # use rabbitry::prelude::*;
/// # struct Fraud;
/// # impl Worker for Fraud {
/// #     type Event = serde_json::Value;
/// #     fn subscription(&self) -> Subscription { Subscription::new("fraud").bind("order.#") }
/// #     async fn handle(&self, _: Delivery<serde_json::Value>, _: &Context) -> Outcome { Ok(()) }
/// # }
///
/// // Only placed and paid orders, from the shop, over 1000.
/// let fraud = Registration::new(Fraud)
///     .layer(FilterLayer::event_types(["order.placed", "order.paid"]))
///     .layer(FilterLayer::new(Condition::app_id("shop")))
///     .layer(FilterLayer::payload(|order| order["total"].as_f64() > Some(1000.0)));
/// # let _ = Runtime::builder().worker(fraud);
/// ```
///
/// A filter that reads the payload dead-letters a body that is not JSON (kind
/// `undecodable`), as decoding would.
#[derive(Clone)]
pub struct FilterLayer {
    keep: Keep,
    reason: Arc<str>,
}

impl fmt::Debug for FilterLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FilterLayer")
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

impl FilterLayer {
    /// Keep the messages that meet `condition`.
    pub fn new(condition: Condition) -> FilterLayer {
        let reason = format!("filtered out: does not meet {condition}").into();
        FilterLayer {
            keep: Keep::Condition(Arc::new(condition)),
            reason,
        }
    }

    /// Keep the messages whose event type matches one of the topic `patterns`.
    pub fn event_types<P: Into<String>>(patterns: impl IntoIterator<Item = P>) -> FilterLayer {
        let any = patterns.into_iter().map(Condition::event_type).collect();
        FilterLayer::new(Condition::Any(any))
    }

    /// Keep the messages for which `keep` (given the whole message) returns true.
    pub fn message<F>(keep: F) -> FilterLayer
    where
        F: Fn(&Message) -> bool + Send + Sync + 'static,
    {
        FilterLayer {
            keep: Keep::Message(Arc::new(keep)),
            reason: "filtered out by a message predicate".into(),
        }
    }

    /// Keep the messages whose JSON payload `keep` returns true for.
    pub fn payload<F>(keep: F) -> FilterLayer
    where
        F: Fn(&Value) -> bool + Send + Sync + 'static,
    {
        FilterLayer {
            keep: Keep::Payload(Arc::new(keep)),
            reason: "filtered out by a payload predicate".into(),
        }
    }

    /// Say `reason` when skipping (what observers and the logs see).
    pub fn reason(mut self, reason: impl Into<String>) -> FilterLayer {
        self.reason = reason.into().into();
        self
    }
}

impl<S> Layer<S> for FilterLayer {
    type Service = Filter<S>;

    fn layer(&self, inner: S) -> Filter<S> {
        Checked::new(inner, self.clone())
    }
}

/// The service of [`FilterLayer`].
pub type Filter<S> = Checked<S, FilterLayer>;

/// The payload of `message` as JSON, or the dead-letter for a body that is not.
pub(crate) fn payload_of(message: &Message) -> Result<Value, Disposition> {
    message.json::<Value>().map_err(|e| {
        Disposition::dead_letter(FailureKind::Undecodable, format!("body is not JSON: {e}"))
    })
}

impl Check for FilterLayer {
    fn check(&self, message: &mut Message) -> Option<Disposition> {
        let keep = match &self.keep {
            Keep::Message(keep) => Ok(keep(message)),
            Keep::Condition(c) if !c.reads_payload() => Ok(c.matches(message.metadata(), None)),
            Keep::Condition(c) => {
                payload_of(message).map(|p| c.matches(message.metadata(), Some(&p)))
            }
            Keep::Payload(keep) => payload_of(message).map(|p| keep(&p)),
        };
        match keep {
            Ok(true) => None,
            Ok(false) => Some(Disposition::skip(self.reason.to_string())),
            Err(dead_letter) => Some(dead_letter),
        }
    }
}
