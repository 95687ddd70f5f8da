//! Check the payload against a JSON Schema; dead-letter what breaks it.

use std::sync::Arc;

use tower_layer::Layer;

use super::check::{Check, Checked};

use super::filter::payload_of;
use crate::disposition::Disposition;
use crate::error::Result;
use crate::message::Message;
use crate::outcome::FailureKind;
use crate::schema::{Schema, Schemas};

#[derive(Debug, Clone)]
enum Against {
    All(Schema),
    ByType(Schemas),
}

/// Checks each message's JSON payload against a JSON Schema before the handler runs. A
/// payload that breaks it is dead-lettered at once — kind `invalid`, never retried — with
/// the first few violations in `x-exception-message`, e.g.
/// `payload does not match the schema of order.placed: 2 violations: /total: "x" is not of
/// type "number"; (root): "order_id" is a required property`.
///
/// ```
/// use rabbitry::middleware::ValidateLayer;
/// use rabbitry::Registration;
/// # use rabbitry::prelude::*;
/// #[derive(serde::Deserialize, schemars::JsonSchema)]
/// struct OrderPlaced { order_id: u64, total: f64 }
/// # struct Billing;
/// # impl Worker for Billing {
/// #     type Event = OrderPlaced;
/// #     fn subscription(&self) -> Subscription { Subscription::new("billing").bind("order.placed") }
/// #     async fn handle(&self, _: Delivery<OrderPlaced>, _: &Context) -> Outcome { Ok(()) }
/// # }
///
/// let billing = Registration::new(Billing).layer(ValidateLayer::of::<OrderPlaced>()?);
/// # let _ = Runtime::builder().worker(billing);
/// # Ok::<(), rabbitry::Error>(())
/// ```
///
/// Put it after an [`UpcastLayer`](super::UpcastLayer): the schema is the handler's
/// version, and an old message only fits it once upcast.
#[derive(Debug, Clone)]
pub struct ValidateLayer {
    against: Arc<Against>,
}

impl ValidateLayer {
    /// Check every message against `schema`.
    pub fn new(schema: Schema) -> ValidateLayer {
        ValidateLayer {
            against: Arc::new(Against::All(schema)),
        }
    }

    /// Check every message against the schema derived from `T`.
    pub fn of<T: schemars::JsonSchema>() -> Result<ValidateLayer> {
        Ok(ValidateLayer::new(Schema::of::<T>()?))
    }

    /// Check each message against the schema of its event type; a type without one
    /// passes unchecked. For a [`Router`](crate::Router) of several types.
    pub fn by_type(schemas: Schemas) -> ValidateLayer {
        ValidateLayer {
            against: Arc::new(Against::ByType(schemas)),
        }
    }
}

impl<S> Layer<S> for ValidateLayer {
    type Service = Validate<S>;

    fn layer(&self, inner: S) -> Validate<S> {
        Checked::new(inner, self.clone())
    }
}

/// The service of [`ValidateLayer`].
pub type Validate<S> = Checked<S, ValidateLayer>;

impl Check for ValidateLayer {
    fn check(&self, message: &mut Message) -> Option<Disposition> {
        let event_type = message.metadata().event_type();
        let schema = match &*self.against {
            Against::All(schema) => Some(schema),
            Against::ByType(schemas) => schemas.get(event_type),
        }?;
        let verdict = payload_of(message).and_then(|payload| {
            schema.check(&payload).map_err(|violations| {
                let reason =
                    format!("payload does not match the schema of {event_type}: {violations}");
                Disposition::dead_letter(FailureKind::Invalid, reason)
            })
        });
        verdict.err()
    }
}
