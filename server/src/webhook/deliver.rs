//! One webhook delivery: the message's exact body POSTed, signed afresh for this attempt,
//! and the answer turned into a disposition.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use std::time::Duration;

use rabbitry::{Disposition, Failure, Message, RetryPolicy};

use super::egress::{Egress, EgressError, retry_after};
use super::sign::signature;

/// The service a webhook's worker runs (see [`Registration::service`](rabbitry::Registration::service)).
#[derive(Clone)]
pub(crate) struct Deliver {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    secret: String,
    egress: Egress,
    /// The waits of the webhook's retry policy and its longest allowed wait, shortest
    /// first: a `Retry-After` is rounded up to one of them (capped at the longest), so an
    /// endpoint cannot make the broker hold a retry queue per value it answers.
    waits: Vec<Duration>,
}

impl Deliver {
    pub(crate) fn new(
        url: String,
        secret: String,
        egress: Egress,
        retry: &RetryPolicy,
        longest: Duration,
    ) -> Deliver {
        let mut waits: Vec<Duration> = (1..retry.attempts().max(2))
            .map(|n| retry.delay_before_retry(n))
            .chain([longest])
            .collect();
        waits.sort();
        waits.dedup();
        Deliver {
            inner: Arc::new(Inner {
                url,
                secret,
                egress,
                waits,
            }),
        }
    }
}

impl tower_service::Service<Message> for Deliver {
    type Response = Disposition;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Disposition, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, message: Message) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { Ok(inner.deliver(message).await) })
    }
}

fn value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

impl Inner {
    /// The policy's wait at least `asked` long (its longest when none is).
    fn wait_at_least(&self, asked: Duration) -> Option<Duration> {
        self.waits
            .iter()
            .find(|w| **w >= asked)
            .or(self.waits.last())
            .copied()
    }

    async fn deliver(&self, message: Message) -> Disposition {
        let metadata = message.metadata();
        let id = metadata.message_id().to_owned();
        // The id is signed as sent: one a header cannot carry could never be verified.
        if HeaderValue::from_str(&id).is_err() {
            return dead_letter(
                "the message id cannot be a webhook-id header (not visible ASCII)".into(),
            );
        }
        // Signed now, not when first sent: a retry that waited in a tier carries a fresh
        // timestamp, which receivers check against their clock.
        let timestamp = crate::unix_seconds();
        let body = message.body().clone();
        let Some(signature) = signature(&self.secret, &id, timestamp, &body) else {
            return dead_letter("the webhook's signing secret is unreadable".into());
        };
        let mut headers = HeaderMap::new();
        let pairs = [
            ("content-type", "application/json".to_owned()),
            ("webhook-id", id.clone()),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", signature),
            ("x-event-type", metadata.event_type().to_owned()),
            ("x-routing-key", metadata.routing_key().to_owned()),
            ("x-attempt", metadata.attempt().to_string()),
            ("user-agent", "rabbitry-webhooks".to_owned()),
        ];
        for (name, text) in pairs {
            headers.insert(HeaderName::from_static(name), value(&text));
        }
        match self.egress.post(&self.url, headers, body).await {
            Ok(answer) if answer.status.is_success() => Disposition::Ack,
            Ok(answer) => {
                let status = answer.status;
                let what = format!("HTTP {}: {}", status.as_u16(), answer.excerpt);
                if retryable(status) {
                    let failure = Failure::retry(what);
                    Disposition::Retry {
                        after: retry_after(&answer.headers).and_then(|a| self.wait_at_least(a)),
                        failure,
                    }
                } else {
                    dead_letter(what)
                }
            }
            // Nothing was sent to an address it may not reach: no retry will change that
            // (a name that resolves inside now is refused now).
            Err(e @ (EgressError::Refused { .. } | EgressError::Url(_))) => {
                dead_letter(e.to_string())
            }
            Err(e) => Disposition::Retry {
                after: None,
                failure: Failure::retry(e.to_string()),
            },
        }
    }
}

/// 408, 429 and 5xx are worth another attempt; other answers will not change.
fn retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

fn dead_letter(what: String) -> Disposition {
    Disposition::DeadLetter {
        failure: Failure::reject(what),
    }
}
