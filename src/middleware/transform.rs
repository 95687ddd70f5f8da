//! Rewrite the JSON payload before it is decoded.

use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};
use tower_layer::Layer;

use super::check::{Check, Checked};

use super::filter::payload_of;
use crate::condition::Condition;
use crate::disposition::Disposition;
use crate::message::{Message, Metadata};

type MapFn = Arc<dyn Fn(&mut Value, &Metadata) + Send + Sync>;

#[derive(Clone)]
enum Step {
    Rename { from: String, to: String },
    Redact(String),
    Remove(String),
    Set { at: String, value: Value },
    Map(MapFn),
}

/// Rewrites the JSON payload — rename, redact, remove or add fields, or any change in a
/// closure — before the layers below and the handler see it. Steps run in the order
/// given. Fields are addressed by JSON pointer (`/customer/email`); a step whose field is
/// missing does nothing.
///
/// ```
/// use rabbitry::middleware::TransformLayer;
/// use rabbitry::{Condition, Registration};
/// use serde_json::json;
/// # use rabbitry::prelude::*;
/// # struct Crm;
/// # impl Worker for Crm {
/// #     type Event = serde_json::Value;
/// #     fn subscription(&self) -> Subscription { Subscription::new("crm").bind("user.#") }
/// #     async fn handle(&self, _: Delivery<serde_json::Value>, _: &Context) -> Outcome { Ok(()) }
/// # }
///
/// let tidy = TransformLayer::new()
///     .rename("/mail", "/email")            // an old producer's field name
///     .redact("/password")                  // never reaches the handler
///     .set("/source", json!("legacy-crm"))  // enrich
///     .map(|user, meta| user["seen_by"] = json!(meta.queue()))
///     .when(Condition::app_id("legacy-crm"));
/// let crm = Registration::new(Crm).layer(tidy);
/// # let _ = Runtime::builder().worker(crm);
/// ```
///
/// The rewritten body replaces the original for everything after this layer. Retry and
/// dead-letter copies carry the message as it was *received* (a retried message goes
/// through this layer again), so a redaction here does not keep a value out of the
/// dead-letter queue: redact at the producer for that. A body that is not JSON is
/// dead-lettered (kind `undecodable`).
#[derive(Clone, Default)]
pub struct TransformLayer {
    steps: Arc<Vec<Step>>,
    when: Option<Arc<Condition>>,
}

impl fmt::Debug for TransformLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransformLayer")
            .field("steps", &self.steps.len())
            .field("when", &self.when)
            .finish()
    }
}

/// The text `[redacted]` that [`TransformLayer::redact`] leaves in place of a value.
pub const REDACTED: &str = "[redacted]";

impl TransformLayer {
    /// A transform with no steps yet.
    pub fn new() -> TransformLayer {
        TransformLayer::default()
    }

    fn step(mut self, step: Step) -> TransformLayer {
        Arc::make_mut(&mut self.steps).push(step);
        self
    }

    /// Move the field at `from` to `to` (both JSON pointers; missing objects on the way to
    /// `to` are created).
    pub fn rename(self, from: impl Into<String>, to: impl Into<String>) -> TransformLayer {
        self.step(Step::Rename {
            from: from.into(),
            to: to.into(),
        })
    }

    /// Replace the value at `at` with the text [`REDACTED`].
    pub fn redact(self, at: impl Into<String>) -> TransformLayer {
        self.step(Step::Redact(at.into()))
    }

    /// Remove the field at `at`.
    pub fn remove(self, at: impl Into<String>) -> TransformLayer {
        self.step(Step::Remove(at.into()))
    }

    /// Set the field at `at` to `value` (creating missing objects on the way).
    pub fn set(self, at: impl Into<String>, value: Value) -> TransformLayer {
        self.step(Step::Set {
            at: at.into(),
            value,
        })
    }

    /// Change the payload in place with `f`, which also sees the metadata.
    pub fn map<F>(self, f: F) -> TransformLayer
    where
        F: Fn(&mut Value, &Metadata) + Send + Sync + 'static,
    {
        self.step(Step::Map(Arc::new(f)))
    }

    /// Transform only the messages that meet `condition`; the others pass unchanged.
    pub fn when(mut self, condition: Condition) -> TransformLayer {
        self.when = Some(Arc::new(condition));
        self
    }

    fn apply(&self, payload: &mut Value, meta: &Metadata) {
        for step in self.steps.iter() {
            match step {
                Step::Rename { from, to } => {
                    if let Some(value) = take_at(payload, from) {
                        put_at(payload, to, value);
                    }
                }
                Step::Redact(at) => {
                    if let Some(value) = payload.pointer_mut(at) {
                        *value = Value::String(REDACTED.into());
                    }
                }
                Step::Remove(at) => {
                    take_at(payload, at);
                }
                Step::Set { at, value } => put_at(payload, at, value.clone()),
                Step::Map(f) => f(payload, meta),
            }
        }
    }
}

/// The parent's pointer and the last token, unescaped (`~1` is `/`, `~0` is `~`).
fn split_pointer(pointer: &str) -> Option<(&str, String)> {
    let (parent, last) = pointer.rsplit_once('/')?;
    Some((parent, last.replace("~1", "/").replace("~0", "~")))
}

fn take_at(root: &mut Value, pointer: &str) -> Option<Value> {
    let (parent, last) = split_pointer(pointer)?;
    match root.pointer_mut(parent)? {
        Value::Object(map) => map.remove(&last),
        Value::Array(items) => {
            let i: usize = last.parse().ok()?;
            (i < items.len()).then(|| items.remove(i))
        }
        _ => None,
    }
}

fn put_at(root: &mut Value, pointer: &str, value: Value) {
    let Some((parent, last)) = split_pointer(pointer) else {
        return;
    };
    let mut node = root;
    for token in parent.split('/').skip(1) {
        let token = token.replace("~1", "/").replace("~0", "~");
        let Value::Object(map) = node else { return };
        node = map
            .entry(token)
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if let Value::Object(map) = node {
        map.insert(last, value);
    }
}

impl<S> Layer<S> for TransformLayer {
    type Service = Transform<S>;

    fn layer(&self, inner: S) -> Transform<S> {
        Checked::new(inner, self.clone())
    }
}

/// The service of [`TransformLayer`].
pub type Transform<S> = Checked<S, TransformLayer>;

impl Check for TransformLayer {
    fn check(&self, message: &mut Message) -> Option<Disposition> {
        let mut payload = match payload_of(message) {
            Ok(payload) => payload,
            Err(dead_letter) => return Some(dead_letter),
        };
        let applies = match &self.when {
            Some(c) => c.matches(message.metadata(), Some(&payload)),
            None => true,
        };
        if applies {
            self.apply(&mut payload, message.metadata());
            match serde_json::to_vec(&payload) {
                Ok(body) => message.set_body(body),
                Err(e) => {
                    let reason = format!("the transformed payload cannot be serialized: {e}");
                    return Some(Disposition::retry(reason));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn steps_rename_redact_remove_and_set_by_pointer() {
        let layer = TransformLayer::new()
            .rename("/mail", "/contact/email")
            .redact("/card/number")
            .remove("/debug")
            .set("/meta/source", json!("legacy"))
            .rename("/missing", "/x")
            .redact("/also/missing")
            .rename("/items/0", "/first");
        let mut v = json!({
            "mail": "a@b.c", "card": {"number": "4111"}, "debug": true, "items": [1, 2]
        });
        let meta = Metadata::new(
            "q".into(),
            "e".into(),
            "k".into(),
            false,
            Default::default(),
        );
        layer.apply(&mut v, &meta);
        assert_eq!(
            v,
            json!({
                "contact": {"email": "a@b.c"}, "card": {"number": REDACTED},
                "meta": {"source": "legacy"}, "items": [2], "first": 1
            })
        );
        // A payload that is not an object is left alone.
        let mut s = json!("text");
        layer.apply(&mut s, &meta);
        assert_eq!(s, json!("text"));
    }
}
