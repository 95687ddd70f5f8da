//! Conditional routing: rules that send each event on to the routing keys they name.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use serde::{Deserialize, Serialize};
use tower_service::Service;

use crate::condition::Condition;
use crate::disposition::Disposition;
use crate::error::Error;
use crate::headers;
use crate::message::Message;
use crate::middleware::payload_of;
use crate::outcome::FailureKind;
use crate::publisher::Publisher;
use crate::registration::Registration;
use crate::worker::Subscription;

/// The header a [`ContentRouter`] sets on what it sends on: the routers it went through,
/// by queue name, comma-separated, in order.
pub const ROUTED_BY: &str = "x-routed-by";

/// One rule of a [`ContentRouter`]: events that meet `when` go on to routing key `to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    /// The condition.
    pub when: Condition,
    /// The routing key to publish to.
    pub to: String,
}

impl Rule {
    /// Events meeting `when` go to `to`.
    pub fn new(when: Condition, to: impl Into<String>) -> Rule {
        Rule {
            when,
            to: to.into(),
        }
    }
}

/// Routes events by content: a worker that consumes its subscription and publishes each
/// event again, unchanged, to the routing key of every rule it meets — so producers
/// publish `order.placed` and never learn that large orders also go to the fraud team.
///
/// ```
/// use rabbitry::{Condition, ContentRouter, Rule, Subscription};
/// # use rabbitry::Runtime;
///
/// let triage = ContentRouter::new(Subscription::new("order-triage").bind("order.placed"))
///     .rule(Condition::field("/total").gt(1000.0), "order.review")
///     .rule(Condition::header("x-region", "eu"), "order.placed.eu")
///     .otherwise("order.standard");
/// # let _ = Runtime::builder().worker(triage);
///
/// // Rules are data, so they can come from configuration:
/// let rules: Vec<Rule> = serde_json::from_str(
///     r#"[{ "when": { "field": { "at": "/total", "gt": 1000.0 } }, "to": "order.review" }]"#,
/// )?;
/// let from_config = ContentRouter::new(Subscription::new("order-triage-2").bind("order.placed"))
///     .rules(rules);
/// # let _ = Runtime::builder().worker(from_config);
/// # Ok::<(), serde_json::Error>(())
/// ```
///
/// Every matching rule sends one copy (a routing key once, however many rules name it);
/// when none matches, the event goes to the [`otherwise`](ContentRouter::otherwise) key,
/// or is skipped. Copies keep the body, message id, type, correlation id and headers
/// (less what retries and failures wrote), and list the routers they went through in
/// `x-routed-by`: a copy that comes back to a router it already went through is skipped,
/// so rules cannot loop, not even through several routers. A copy that no queue takes (unroutable)
/// dead-letters the original with the reason, so nothing vanishes; a broker error retries
/// it (copies already sent may then be sent again: consumers see at-least-once, as
/// always).
#[must_use = "a content router does nothing until it is registered with RuntimeBuilder::worker or Runtime::add_worker"]
#[derive(Debug)]
pub struct ContentRouter {
    subscription: Subscription,
    rules: Vec<Rule>,
    otherwise: Option<String>,
}

impl ContentRouter {
    /// A router consuming `subscription`'s queue, with no rules yet.
    pub fn new(subscription: Subscription) -> ContentRouter {
        ContentRouter {
            subscription,
            rules: Vec::new(),
            otherwise: None,
        }
    }

    /// Events that meet `when` go on to `routing_key`.
    pub fn rule(mut self, when: Condition, routing_key: impl Into<String>) -> ContentRouter {
        self.rules.push(Rule::new(when, routing_key));
        self
    }

    /// Add `rules`, in order.
    pub fn rules(mut self, rules: impl IntoIterator<Item = Rule>) -> ContentRouter {
        self.rules.extend(rules);
        self
    }

    /// Events that meet no rule go on to `routing_key` (instead of being skipped).
    pub fn otherwise(mut self, routing_key: impl Into<String>) -> ContentRouter {
        self.otherwise = Some(routing_key.into());
        self
    }

    /// The first mistake in the rules, if any.
    fn problem(&self) -> Option<String> {
        if self.subscription.queue().contains(',') {
            return Some(
                "a content router's queue name cannot contain ',' (x-routed-by lists routers by it)"
                    .into(),
            );
        }
        if self.rules.is_empty() && self.otherwise.is_none() {
            return Some("the content router has no rules: add one with .rule(…)".into());
        }
        let keys = self.rules.iter().map(|r| &r.to).chain(&self.otherwise);
        for key in keys {
            if let Err(e) = crate::worker::check_pattern(key) {
                return Some(format!("routing key {e}"));
            }
            if key.split('.').any(|w| w == "*" || w == "#") {
                return Some(format!(
                    "routing key '{key}' has a wildcard: rules publish to a key, not a pattern"
                ));
            }
        }
        None
    }
}

impl From<ContentRouter> for Registration {
    fn from(router: ContentRouter) -> Registration {
        let problem = router.problem();
        let ContentRouter {
            subscription,
            rules,
            otherwise,
        } = router;
        let name: Arc<str> = subscription.queue().into();
        let reads_payload = rules.iter().any(|r| r.when.reads_payload());
        let table = Arc::new(Table {
            rules,
            otherwise,
            reads_payload,
            name,
        });
        Registration::innermost(subscription, "rabbitry::ContentRouter", move |publisher| {
            Route {
                table,
                publisher: publisher.clone(),
            }
        })
        .problem(problem)
    }
}

struct Table {
    rules: Vec<Rule>,
    otherwise: Option<String>,
    reads_payload: bool,
    name: Arc<str>,
}

impl Table {
    /// The routing keys `message` goes on to, each once, in rule order.
    fn targets(&self, message: &Message) -> Result<Vec<&str>, Disposition> {
        let payload = match self.reads_payload {
            true => Some(payload_of(message)?),
            false => None,
        };
        let mut keys: Vec<&str> = Vec::new();
        for rule in &self.rules {
            if rule.when.matches(message.metadata(), payload.as_ref())
                && !keys.contains(&rule.to.as_str())
            {
                keys.push(&rule.to);
            }
        }
        if keys.is_empty()
            && let Some(key) = &self.otherwise
        {
            keys.push(key);
        }
        Ok(keys)
    }
}

/// The innermost service of a content router.
#[derive(Clone)]
struct Route {
    table: Arc<Table>,
    publisher: Publisher,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("router", &self.table.name)
            .finish()
    }
}

impl Service<Message> for Route {
    type Response = Disposition;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Disposition, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, message: Message) -> Self::Future {
        let (table, publisher) = (self.table.clone(), self.publisher.clone());
        Box::pin(async move {
            let meta = message.metadata();
            let routed_by = meta.header_str(ROUTED_BY).unwrap_or("");
            if routed_by.split(',').any(|r| r == &*table.name) {
                return Ok(Disposition::skip(
                    "already routed by this router (a rule's key leads back to it)",
                ));
            }
            let keys = match table.targets(&message) {
                Ok(keys) if keys.is_empty() => return Ok(Disposition::skip("no rule matched")),
                Ok(keys) => keys,
                Err(dead_letter) => return Ok(dead_letter),
            };
            // A fresh event on its new key: what retries and failures wrote is not carried.
            let route = [
                headers::ORIGINAL_EXCHANGE,
                headers::ORIGINAL_ROUTING_KEY,
                headers::ORIGINAL_QUEUE,
            ];
            let dropped = |k: &str| route.contains(&k) || headers::FAILURE.contains(&k);
            let kept = meta.headers().map(|h| {
                h.inner()
                    .iter()
                    .filter(|(k, _)| !dropped(k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<std::collections::BTreeMap<_, _>>()
            });
            let mut h = lapin::types::FieldTable::from(kept.unwrap_or_default());
            let routers = match routed_by {
                "" => table.name.to_string(),
                earlier => format!("{earlier},{}", table.name),
            };
            headers::set(&mut h, ROUTED_BY, headers::string(&routers));
            let properties = meta
                .properties()
                .clone()
                .with_headers(h)
                .with_message_id(meta.message_id().into());
            for key in keys {
                let sent = publisher
                    .send_raw(
                        publisher.exchange(),
                        key,
                        message.body(),
                        properties.clone(),
                    )
                    .await;
                match sent {
                    Ok(()) => {}
                    Err(e @ Error::Unroutable { .. }) => {
                        let reason = format!("routing to '{key}': {e}");
                        return Ok(Disposition::dead_letter(FailureKind::Rejected, reason));
                    }
                    Err(e) => return Ok(Disposition::retry(format!("routing to '{key}': {e}"))),
                }
            }
            Ok(Disposition::Ack)
        })
    }
}
