//! Declarative conditions on a message: its type, source, headers and JSON payload.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::message::Metadata;
use crate::topic;

/// A condition on a message, written as data: what [`FilterLayer`] keeps and what
/// [`ContentRouter`] rules route on. It serializes to JSON, so rules can live in
/// configuration:
///
/// ```
/// use rabbitry::Condition;
/// use serde_json::json;
///
/// let big_eu_order = Condition::event_type("order.*")
///     .and(Condition::field("/total").gt(500.0))
///     .and(Condition::header("x-region", "eu"));
/// let as_json = serde_json::to_value(&big_eu_order).unwrap();
/// assert_eq!(as_json["all"][1], json!({ "field": { "at": "/total", "gt": 500.0 } }));
/// let back: Condition = serde_json::from_value(as_json).unwrap();
/// assert_eq!(back, big_eu_order);
/// ```
///
/// Fields are addressed by JSON pointer (`/customer/country`, `/items/0/sku`). A field
/// that is missing, or of another type than the test needs, does not match.
///
/// [`FilterLayer`]: crate::middleware::FilterLayer
/// [`ContentRouter`]: crate::ContentRouter
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// The event type matches a topic pattern (`order.*`, `order.#`).
    EventType(String),
    /// The `app_id` property (the publishing application) is this.
    AppId(String),
    /// A header is present with this value (text, or a whole number written in decimal).
    Header {
        /// The header's name.
        name: String,
        /// Its value.
        equals: String,
    },
    /// A field of the JSON payload passes a test.
    Field {
        /// A JSON pointer into the payload.
        at: String,
        /// The test.
        #[serde(flatten)]
        test: Test,
    },
    /// Every condition holds (true when empty).
    All(Vec<Condition>),
    /// At least one condition holds (false when empty).
    Any(Vec<Condition>),
    /// The condition does not hold.
    Not(Box<Condition>),
}

/// A test on one field of the payload: see [`Condition::field`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Test {
    /// The field is present (even if `null`).
    Exists(bool),
    /// The field equals this JSON value.
    Equals(Value),
    /// The field is one of these values.
    In(Vec<Value>),
    /// The field is a number greater than this.
    Gt(f64),
    /// The field is a number greater than or equal to this.
    Ge(f64),
    /// The field is a number less than this.
    Lt(f64),
    /// The field is a number less than or equal to this.
    Le(f64),
}

/// A field of the payload, to be tested: made by [`Condition::field`].
#[derive(Debug, Clone)]
#[must_use = "a field becomes a condition once tested, e.g. .equals(…) or .gt(…)"]
pub struct FieldCondition {
    pointer: String,
}

impl FieldCondition {
    fn test(self, test: Test) -> Condition {
        Condition::Field {
            at: self.pointer,
            test,
        }
    }

    /// The field is present.
    pub fn exists(self) -> Condition {
        self.test(Test::Exists(true))
    }

    /// The field equals `value`.
    pub fn equals(self, value: impl Into<Value>) -> Condition {
        self.test(Test::Equals(value.into()))
    }

    /// The field is one of `values`.
    pub fn one_of<V: Into<Value>>(self, values: impl IntoIterator<Item = V>) -> Condition {
        self.test(Test::In(values.into_iter().map(Into::into).collect()))
    }

    /// The field is a number above `n`.
    pub fn gt(self, n: f64) -> Condition {
        self.test(Test::Gt(n))
    }

    /// The field is a number at or above `n`.
    pub fn ge(self, n: f64) -> Condition {
        self.test(Test::Ge(n))
    }

    /// The field is a number below `n`.
    pub fn lt(self, n: f64) -> Condition {
        self.test(Test::Lt(n))
    }

    /// The field is a number at or below `n`.
    pub fn le(self, n: f64) -> Condition {
        self.test(Test::Le(n))
    }
}

impl Condition {
    /// The event type matches the topic `pattern`.
    pub fn event_type(pattern: impl Into<String>) -> Condition {
        Condition::EventType(pattern.into())
    }

    /// The publishing application (`app_id`) is `app`.
    pub fn app_id(app: impl Into<String>) -> Condition {
        Condition::AppId(app.into())
    }

    /// Header `name` has the text `value`.
    pub fn header(name: impl Into<String>, value: impl Into<String>) -> Condition {
        Condition::Header {
            name: name.into(),
            equals: value.into(),
        }
    }

    /// A field of the payload, by JSON pointer (`/total`, `/customer/country`), to test
    /// with `.equals`, `.gt` and the others.
    pub fn field(pointer: impl Into<String>) -> FieldCondition {
        FieldCondition {
            pointer: pointer.into(),
        }
    }

    /// This condition and `other`.
    pub fn and(self, other: Condition) -> Condition {
        match self {
            Condition::All(mut all) => {
                all.push(other);
                Condition::All(all)
            }
            first => Condition::All(vec![first, other]),
        }
    }

    /// This condition or `other`.
    pub fn or(self, other: Condition) -> Condition {
        match self {
            Condition::Any(mut any) => {
                any.push(other);
                Condition::Any(any)
            }
            first => Condition::Any(vec![first, other]),
        }
    }

    /// The opposite of this condition.
    #[allow(clippy::should_implement_trait)]
    pub fn not(self) -> Condition {
        Condition::Not(Box::new(self))
    }

    /// Whether evaluating this condition needs the JSON payload.
    pub fn reads_payload(&self) -> bool {
        match self {
            Condition::Field { .. } => true,
            Condition::All(c) | Condition::Any(c) => c.iter().any(Condition::reads_payload),
            Condition::Not(c) => c.reads_payload(),
            _ => false,
        }
    }

    /// Whether a message with `metadata` and `payload` meets the condition. `payload` is
    /// only read by field tests (`None` when it was not parsed: no field matches).
    pub fn matches(&self, metadata: &Metadata, payload: Option<&Value>) -> bool {
        match self {
            Condition::EventType(pattern) => topic::matches(pattern, metadata.event_type()),
            Condition::AppId(app) => metadata.app_id() == Some(app.as_str()),
            Condition::Header { name, equals } => match metadata.header_str(name) {
                Some(text) => text == equals,
                None => metadata
                    .header_u64(name)
                    .is_some_and(|n| equals.parse() == Ok(n)),
            },
            Condition::Field { at, test } => {
                let value = payload.and_then(|p| p.pointer(at));
                match test {
                    Test::Exists(wanted) => payload.is_some() && value.is_some() == *wanted,
                    _ => value.is_some_and(|value| test.passes(value)),
                }
            }
            Condition::All(all) => all.iter().all(|c| c.matches(metadata, payload)),
            Condition::Any(any) => any.iter().any(|c| c.matches(metadata, payload)),
            Condition::Not(c) => !c.matches(metadata, payload),
        }
    }
}

impl Test {
    fn passes(&self, value: &Value) -> bool {
        let number = || value.as_f64();
        match self {
            Test::Exists(wanted) => *wanted,
            Test::Equals(expected) => value == expected,
            Test::In(values) => values.contains(value),
            Test::Gt(n) => number().is_some_and(|v| v > *n),
            Test::Ge(n) => number().is_some_and(|v| v >= *n),
            Test::Lt(n) => number().is_some_and(|v| v < *n),
            Test::Le(n) => number().is_some_and(|v| v <= *n),
        }
    }
}

impl fmt::Display for Condition {
    /// The condition as compact JSON (what logs and skip reasons show).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_json::to_string(self) {
            Ok(text) => f.write_str(&text),
            Err(_) => f.write_str("<condition>"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::BasicProperties;
    use lapin::types::FieldTable;
    use serde_json::json;

    fn meta(kind: &str) -> Metadata {
        let mut headers = FieldTable::default();
        headers.insert("x-region".into(), crate::headers::string("eu"));
        headers.insert("x-tier".into(), lapin::types::AMQPValue::LongLongInt(2));
        let props = BasicProperties::default()
            .with_type(kind.into())
            .with_app_id("shop".into())
            .with_headers(headers);
        Metadata::new("q".into(), "events".into(), kind.into(), false, props)
    }

    #[test]
    fn conditions_read_type_source_headers_and_fields() {
        let m = meta("order.placed");
        let order = json!({ "total": 750, "country": "FR", "tags": ["gift"] });
        let yes = [
            Condition::event_type("order.*"),
            Condition::app_id("shop"),
            Condition::header("x-region", "eu"),
            Condition::header("x-tier", "2"),
            Condition::field("/total").gt(500.0),
            Condition::field("/total").le(750.0),
            Condition::field("/country").one_of(["FR", "DE"]),
            Condition::field("/tags/0").equals("gift"),
            Condition::field("/country").exists(),
            Condition::field("/missing").exists().not(),
            Condition::Field {
                at: "/missing".into(),
                test: Test::Exists(false),
            },
            Condition::event_type("user.*").or(Condition::field("/total").ge(750.0)),
            Condition::All(vec![]),
        ];
        for c in yes {
            assert!(c.matches(&m, Some(&order)), "{c}");
        }
        let no = [
            Condition::event_type("order"),
            Condition::app_id("other"),
            Condition::header("x-region", "us"),
            Condition::header("x-tier", "3"),
            Condition::header("x-tier", "two"),
            Condition::field("/total").lt(500.0),
            Condition::field("/country").gt(1.0),
            Condition::field("/missing").equals(json!(null)),
            Condition::Field {
                at: "/total".into(),
                test: Test::Exists(false),
            },
            Condition::field("/total")
                .gt(500.0)
                .and(Condition::app_id("x")),
            Condition::Any(vec![]),
        ];
        for c in no {
            assert!(!c.matches(&m, Some(&order)), "{c}");
        }
        assert!(!Condition::field("/total").gt(1.0).matches(&m, None));
    }

    #[test]
    fn conditions_round_trip_through_json() {
        let c = Condition::field("/total")
            .gt(500.0)
            .and(Condition::header("x-region", "eu").not());
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Condition>(&text).unwrap(), c);
        let parsed: Condition = serde_json::from_value(
            json!({"any": [{"event_type": "order.#"}, {"field": {"at": "/a", "exists": true}}]}),
        )
        .unwrap();
        assert!(parsed.reads_payload());
        assert!(
            serde_json::from_value::<Condition>(json!({"field": {"at": "/a", "bogus": 1}}))
                .is_err()
        );
        assert!(serde_json::from_value::<Condition>(json!({"field": "/a"})).is_err());
    }
}
