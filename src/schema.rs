//! JSON Schemas for event types: checked when consuming
//! ([`ValidateLayer`](crate::middleware::ValidateLayer)) and, if asked, when publishing.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::event::Event;

/// How many violations a report lists (the rest are counted).
const MAX_ERRORS: usize = 5;
/// How long one violation's text may be (some quote the whole value).
const MAX_ERROR_LEN: usize = 200;

/// A compiled JSON Schema (drafts 4 to 2020-12), derived from a Rust type with
/// [`schemars`](https://docs.rs/schemars) or given as JSON.
///
/// References are resolved only inside the schema: a `$ref` to a URL or a file is refused
/// when the schema is compiled, so a schema cannot make the process fetch anything.
///
/// ```
/// use rabbitry::Schema;
/// use serde_json::json;
///
/// #[derive(serde::Deserialize, schemars::JsonSchema)]
/// struct OrderPlaced { order_id: u64, total: f64 }
///
/// let schema = Schema::of::<OrderPlaced>()?;
/// assert!(schema.check(&json!({ "order_id": 7, "total": 9.5 })).is_ok());
/// let invalid = schema.check(&json!({ "order_id": "seven" })).unwrap_err();
/// assert_eq!(invalid.count(), 2); // a string id, no total
/// println!("{invalid}"); // "2 violations: /order_id: \"seven\" is not of type \"integer\"; …"
///
/// let given = Schema::from_json(&json!({ "type": "object", "required": ["sku"] }))?;
/// assert!(given.check(&json!({})).is_err());
/// # Ok::<(), rabbitry::Error>(())
/// ```
#[derive(Clone)]
pub struct Schema {
    validator: Arc<jsonschema::Validator>,
    source: Arc<Value>,
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schema")
            .field("source", &self.source)
            .finish()
    }
}

impl Schema {
    /// The schema of `T`, as schemars derives it (serde's renames and tags included).
    pub fn of<T: schemars::JsonSchema>() -> Result<Schema> {
        let schema = schemars::schema_for!(T);
        Schema::from_json(schema.as_value())
    }

    /// Compile `schema`. Fails with [`Error::Config`] when it is not a valid schema or
    /// refers to anything outside itself.
    pub fn from_json(schema: &Value) -> Result<Schema> {
        // Offline whatever features jsonschema was built with: nothing is ever fetched.
        let validator = jsonschema::options()
            .offline()
            .build(schema)
            .map_err(|e| Error::Config(format!("invalid JSON Schema: {e}")))?;
        Ok(Schema {
            validator: Arc::new(validator),
            source: Arc::new(schema.clone()),
        })
    }

    /// The schema as JSON.
    pub fn as_json(&self) -> &Value {
        &self.source
    }

    /// Check `instance`: `Err` lists the first few violations.
    pub fn check(&self, instance: &Value) -> std::result::Result<(), Violations> {
        let mut errors = self.validator.iter_errors(instance);
        let Some(first) = errors.next() else {
            return Ok(());
        };
        let mut shown = Vec::new();
        let mut count = 0;
        for error in std::iter::once(first).chain(errors) {
            count += 1;
            if shown.len() < MAX_ERRORS {
                let path = error.instance_path().to_string();
                let path = if path.is_empty() {
                    "(root)".into()
                } else {
                    path
                };
                let mut text = format!("{path}: {error}");
                if text.len() > MAX_ERROR_LEN {
                    let mut end = MAX_ERROR_LEN;
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    text.truncate(end);
                    text.push('…');
                }
                shown.push(text);
            }
        }
        Err(Violations {
            errors: shown,
            count,
        })
    }
}

/// Why a payload breaks its schema: the first few violations, readable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violations {
    errors: Vec<String>,
    count: usize,
}

impl Violations {
    /// The first few violations, each `pointer: message`.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// How many violations there were in all.
    pub fn count(&self) -> usize {
        self.count
    }
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.count {
            1 => write!(f, "1 violation: ")?,
            n => write!(f, "{n} violations: ")?,
        }
        f.write_str(&self.errors.join("; "))?;
        if self.count > self.errors.len() {
            write!(f, "; and {} more", self.count - self.errors.len())?;
        }
        Ok(())
    }
}

impl std::error::Error for Violations {}

/// Schemas by event type: what [`ValidateLayer::by_type`] checks a consumer's messages
/// against and [`PublisherBuilder::schemas`] checks outgoing events against. An event
/// type without a schema is not checked.
///
/// ```
/// use rabbitry::{Event, Schemas};
///
/// #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// struct OrderPlaced { order_id: u64 }
/// impl Event for OrderPlaced { const TYPE: &'static str = "order.placed"; }
///
/// let schemas = Schemas::new().event::<OrderPlaced>()?;
/// assert!(schemas.get("order.placed").is_some());
/// # Ok::<(), rabbitry::Error>(())
/// ```
///
/// [`ValidateLayer::by_type`]: crate::middleware::ValidateLayer::by_type
/// [`PublisherBuilder::schemas`]: crate::PublisherBuilder::schemas
#[derive(Debug, Clone, Default)]
pub struct Schemas {
    by_type: HashMap<String, Schema>,
}

impl Schemas {
    /// No schemas yet.
    pub fn new() -> Schemas {
        Schemas::default()
    }

    /// Add the derived schema of event type `E` (under `E::TYPE`).
    pub fn event<E: Event + schemars::JsonSchema>(self) -> Result<Schemas> {
        Ok(self.insert(E::TYPE, Schema::of::<E>()?))
    }

    /// Add `schema` for `event_type` (replacing any before).
    pub fn insert(mut self, event_type: impl Into<String>, schema: Schema) -> Schemas {
        self.by_type.insert(event_type.into(), schema);
        self
    }

    /// The schema of `event_type`, if one was added.
    pub fn get(&self, event_type: &str) -> Option<&Schema> {
        self.by_type.get(event_type)
    }

    /// Check `instance` against the schema of `event_type`; `Ok` when it has none.
    pub fn check(&self, event_type: &str, instance: &Value) -> std::result::Result<(), Violations> {
        match self.get(event_type) {
            Some(schema) => schema.check(instance),
            None => Ok(()),
        }
    }

    /// Whether no schema was added.
    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn violations_are_bounded_and_readable() {
        let schema = Schema::from_json(&json!({
            "type": "object",
            "properties": { "n": { "type": "integer" }, "s": { "type": "string", "maxLength": 3 } },
            "required": ["a", "b", "c", "d", "e", "f"]
        }))
        .unwrap();
        let v = schema
            .check(&json!({ "n": "x", "s": "long".repeat(200) }))
            .unwrap_err();
        assert_eq!(v.count(), 8);
        assert_eq!(v.errors().len(), MAX_ERRORS);
        assert!(
            v.errors()
                .iter()
                .all(|e| e.len() <= MAX_ERROR_LEN + '…'.len_utf8())
        );
        let text = v.to_string();
        assert!(text.starts_with("8 violations: "), "{text}");
        assert!(text.ends_with("and 3 more"), "{text}");
        assert!(
            text.contains("(root): \"a\" is a required property"),
            "{text}"
        );
    }

    #[test]
    fn remote_references_and_broken_schemas_are_refused() {
        for bad in [
            json!({ "$ref": "https://example.com/schema.json" }),
            json!({ "$ref": "file:///etc/passwd" }),
            json!({ "type": 12 }),
        ] {
            let e = Schema::from_json(&bad).unwrap_err();
            assert!(e.to_string().contains("invalid JSON Schema"), "{e}");
        }
        let local = json!({ "$defs": { "id": { "type": "integer" } }, "properties": { "id": { "$ref": "#/$defs/id" } } });
        let schema = Schema::from_json(&local).unwrap();
        assert!(schema.check(&json!({ "id": "x" })).is_err());
    }
}
