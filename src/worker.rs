//! The `Worker` trait and its `Subscription`.

use std::future::Future;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::context::Context;
use crate::event::Delivery;
use crate::outcome::Outcome;
use crate::retry::RetryPolicy;

/// Handles one type of event from one queue.
///
/// ```
/// use rabbitry::{Context, Delivery, Event, Failure, Outcome, RetryPolicy, Subscription, Worker};
/// use serde::{Deserialize, Serialize};
/// use std::time::Duration;
///
/// #[derive(Serialize, Deserialize)]
/// struct UserRegistered {
///     user_id: u64,
///     email: String,
/// }
/// impl Event for UserRegistered {
///     const TYPE: &'static str = "user.registered";
/// }
///
/// struct WelcomeEmail;
///
/// impl Worker for WelcomeEmail {
///     type Event = UserRegistered;
///
///     fn subscription(&self) -> Subscription {
///         Subscription::new("users.welcome-email")
///             .bind(UserRegistered::TYPE)
///             .retry(RetryPolicy::exponential(Duration::from_secs(2)).max_attempts(4))
///     }
///
///     async fn handle(&self, user: Delivery<UserRegistered>, _ctx: &Context) -> Outcome {
///         if !user.email.contains('@') {
///             return Err(Failure::reject("not an email address"));
///         }
///         // send the email; an error returned with `?` is retried with backoff
///         Ok(())
///     }
/// }
/// ```
pub trait Worker: Send + Sync + 'static {
    /// The payload type, decoded from the message body as JSON. Unknown fields are
    /// ignored unless the type says otherwise; use [`serde_json::Value`] to take any JSON.
    type Event: DeserializeOwned + Send + 'static;

    /// Where the worker consumes from and how.
    fn subscription(&self) -> Subscription;

    /// Handle one delivery. `Ok(())` acknowledges it; see [`Failure`](crate::Failure)
    /// for retrying and rejecting. A panic counts as a transient failure.
    fn handle(
        &self,
        delivery: Delivery<Self::Event>,
        ctx: &Context,
    ) -> impl Future<Output = Outcome> + Send;
}

/// The kind of queue a worker consumes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// A classic queue: supports up to 255 priorities on every RabbitMQ version.
    #[default]
    Classic,
    /// A quorum queue: replicated; supports (two-level) priority from RabbitMQ 4.0.
    Quorum,
}

impl QueueType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// Where and how a worker consumes: its queue, bindings, flow control, priority and retries.
///
/// The queue name is also the worker's name in the runtime.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub(crate) queue: String,
    pub(crate) bindings: Vec<String>,
    pub(crate) prefetch: u16,
    pub(crate) concurrency: usize,
    pub(crate) max_priority: Option<u8>,
    pub(crate) retry: RetryPolicy,
    pub(crate) queue_type: QueueType,
    pub(crate) timeout: Option<Duration>,
    /// Consume a queue that exists already, without declaring it.
    pub(crate) existing: bool,
    /// Unbind what an earlier declaration bound and this one does not.
    pub(crate) prune: bool,
    pub(crate) single_active: bool,
}

/// Room left in a 255-byte queue name for the longest derived name (`.retry.4294967295`).
const MAX_QUEUE_NAME: usize = 255 - ".retry.4294967295".len();

impl Subscription {
    /// A subscription on `queue`, with no bindings yet, prefetch 50, concurrency 10, no
    /// priority, the default [`RetryPolicy`], a classic queue and a 5-minute handler timeout.
    pub fn new(queue: impl Into<String>) -> Subscription {
        Subscription {
            queue: queue.into(),
            bindings: Vec::new(),
            prefetch: 50,
            concurrency: 10,
            max_priority: None,
            retry: RetryPolicy::default(),
            queue_type: QueueType::Classic,
            timeout: Some(Duration::from_secs(300)),
            existing: false,
            prune: false,
            single_active: false,
        }
    }

    /// Receive events whose type matches `pattern` (`order.placed`, `order.*`, `#`).
    pub fn bind(mut self, pattern: impl Into<String>) -> Subscription {
        self.bindings.push(pattern.into());
        self
    }

    /// How many unacknowledged deliveries the broker may send ahead (1..=65535).
    pub fn prefetch(mut self, prefetch: u16) -> Subscription {
        self.prefetch = prefetch;
        self
    }

    /// How many handlers may run at once (at least 1, at most the prefetch).
    pub fn concurrency(mut self, concurrency: usize) -> Subscription {
        self.concurrency = concurrency;
        self
    }

    /// Make the queue a priority queue with priorities `0..=max` (1..=255; 10 or less is
    /// recommended). Waiting messages with a higher priority are delivered first.
    pub fn max_priority(mut self, max: u8) -> Subscription {
        self.max_priority = Some(max);
        self
    }

    /// How failures are retried.
    pub fn retry(mut self, policy: RetryPolicy) -> Subscription {
        self.retry = policy;
        self
    }

    /// Classic (the default) or quorum.
    pub fn queue_type(mut self, queue_type: QueueType) -> Subscription {
        self.queue_type = queue_type;
        self
    }

    /// Fail a handler run (as a transient failure) when it takes longer than `timeout`.
    /// Keep it well below the broker's `consumer_timeout` (30 minutes by default).
    pub fn timeout(mut self, timeout: Duration) -> Subscription {
        self.timeout = Some(timeout);
        self
    }

    /// Let handlers run as long as they like.
    pub fn no_timeout(mut self) -> Subscription {
        self.timeout = None;
        self
    }

    /// Consume a queue that already exists — a dead-letter queue, a queue another team
    /// declared — without declaring it: the runtime only checks that it is there (start
    /// fails with [`Error::QueueNotFound`](crate::Error::QueueNotFound) if not) and never
    /// changes its arguments. Bindings are optional (added if given). The worker's retry
    /// queues and dead-letter queue (`<queue>.retry.<ms>`, `<queue>.dlq`) are declared as
    /// usual; retries counted in another queue do not count here.
    pub fn existing_queue(mut self) -> Subscription {
        self.existing = true;
        self
    }

    /// Remove the bindings an earlier version of this worker declared and this one does
    /// not, when it starts (see [`Topology`](crate::Topology)). Off by default, when they are
    /// only reported: during a rolling deploy, an old replica that reconnects with pruning
    /// on would remove the bindings the new version added. Turn it on once every replica
    /// runs the new bindings (or for workers that run as one process).
    pub fn prune_bindings(mut self) -> Subscription {
        self.prune = true;
        self
    }

    /// Declare the queue with single active consumer: of all the processes consuming it,
    /// the broker delivers to one at a time, and to the next when that one goes away. What
    /// keeps per-key order ([`OrderedLayer`](crate::middleware::OrderedLayer)) across
    /// processes, at the cost of their parallelism on this queue. Like every queue argument
    /// it is fixed when the queue is first declared (change it by deleting the queue).
    pub fn single_active_consumer(mut self) -> Subscription {
        self.single_active = true;
        self
    }

    /// The queue name, which is also the worker's name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The binding patterns.
    pub fn bindings(&self) -> &[String] {
        &self.bindings
    }

    /// The retry policy.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// Check every setting, as the runtime does when it starts the worker: the queue name
    /// (length, reserved prefixes), every binding pattern, prefetch, concurrency, priority,
    /// timeout and retry policy. An [`Error::Config`](crate::Error::Config) names the
    /// worker and the setting — what a server registering workers from requests answers.
    pub fn validate(&self) -> Result<(), crate::Error> {
        let fail = |what: String| {
            Err(crate::Error::Config(format!(
                "worker '{}': {what}",
                self.queue
            )))
        };
        if self.queue.is_empty() {
            return Err(crate::Error::Config(
                "a worker's queue name must not be empty".into(),
            ));
        }
        if self.queue.len() > MAX_QUEUE_NAME {
            return fail(format!(
                "queue name is {} bytes; at most {MAX_QUEUE_NAME} leaves room for its retry queues",
                self.queue.len()
            ));
        }
        if self.queue.starts_with("amq.") {
            return fail("queue names starting with 'amq.' are reserved by the broker".into());
        }
        if !self.existing && self.queue.ends_with(".topology") {
            return fail(
                "queue names ending in '.topology' are where rabbitry records each worker's \
                 topology; pick another name (or consume it with existing_queue())"
                    .into(),
            );
        }
        if self.bindings.is_empty() && !self.existing {
            return fail("no bindings: add at least one with .bind(\"event.type\")".into());
        }
        for pattern in &self.bindings {
            check_pattern(pattern).or_else(|e| fail(format!("binding {e}")))?;
        }
        if self.existing && self.single_active {
            return fail(
                "single_active_consumer cannot apply to an existing queue: its arguments \
                 belong to whoever declared it"
                    .into(),
            );
        }
        if self.existing && self.max_priority.is_some() {
            return fail(
                "max_priority cannot apply to an existing queue: its arguments belong to \
                 whoever declared it"
                    .into(),
            );
        }
        if self.prefetch == 0 {
            return fail("prefetch must be at least 1 (0 would mean unlimited)".into());
        }
        if self.concurrency == 0 {
            return fail("concurrency must be at least 1".into());
        }
        if self.concurrency > usize::from(self.prefetch) {
            return fail(format!(
                "concurrency ({}) exceeds prefetch ({}): handlers could never all be busy",
                self.concurrency, self.prefetch
            ));
        }
        if self.max_priority == Some(0) {
            return fail("max_priority must be between 1 and 255".into());
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return fail("timeout must be longer than zero (use no_timeout() for none)".into());
        }
        self.retry.validate().or_else(fail)
    }
}

/// Check a topic binding pattern: dot-separated words, where `*` (one word) and `#` (any
/// number of words) are wildcards only as whole words. The error describes the problem.
pub(crate) fn check_pattern(pattern: &str) -> Result<(), String> {
    let shown = || {
        let mut s: String = pattern.chars().take(40).collect();
        if s.len() < pattern.len() {
            s.push('…');
        }
        s.escape_debug().to_string()
    };
    if pattern.is_empty() {
        return Err("pattern is empty: use '#' to receive every event".into());
    }
    if pattern.len() > 255 {
        return Err(format!(
            "pattern '{}' is {} bytes; AMQP allows at most 255",
            shown(),
            pattern.len()
        ));
    }
    if let Some(c) = pattern
        .chars()
        .find(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "pattern '{}' contains {c:?}: event types have no spaces or control characters",
            shown()
        ));
    }
    for word in pattern.split('.') {
        if word.is_empty() {
            return Err(format!(
                "pattern '{}' has an empty word (a leading, trailing or doubled '.')",
                shown()
            ));
        }
        if word.len() > 1 && word.contains(['*', '#']) {
            return Err(format!(
                "pattern '{}': '{}' is not a wildcard — '*' and '#' match only as whole words \
                 (write 'user.*', not 'user*'), so it would match nothing you publish",
                shown(),
                word.escape_debug()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Subscription {
        Subscription::new("orders.email").bind("order.placed")
    }

    fn error_of(s: Subscription) -> String {
        s.validate().unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_valid() {
        valid().validate().unwrap();
    }

    #[test]
    fn each_bad_setting_is_named() {
        assert!(error_of(Subscription::new("q")).contains("no bindings"));
        assert!(error_of(Subscription::new("").bind("a")).contains("empty"));
        assert!(error_of(Subscription::new("amq.x").bind("a")).contains("reserved"));
        assert!(error_of(Subscription::new("q".repeat(250)).bind("a")).contains("retry queues"));
        assert!(error_of(valid().prefetch(0)).contains("prefetch"));
        assert!(error_of(valid().concurrency(0)).contains("concurrency"));
        assert!(error_of(valid().prefetch(4).concurrency(5)).contains("exceeds prefetch"));
        assert!(error_of(valid().max_priority(0)).contains("max_priority"));
        assert!(error_of(valid().timeout(Duration::ZERO)).contains("timeout"));
        assert!(error_of(valid().bind("x".repeat(300))).contains("255"));
        assert!(error_of(valid().max_priority(3).existing_queue()).contains("existing queue"));
        assert!(error_of(Subscription::new("orders.topology").bind("a")).contains("records"));
        Subscription::new("someone.elses")
            .existing_queue()
            .validate()
            .unwrap();
        let e = error_of(valid().retry(RetryPolicy::default().max_attempts(0)));
        assert!(
            e.contains("orders.email") && e.contains("max_attempts"),
            "{e}"
        );
    }

    #[test]
    fn binding_patterns_are_checked_whole_and_never_panic() {
        for good in [
            "order.placed",
            "order.*",
            "#",
            "order.#",
            "*.placed",
            "commande.passée",
            "a.b.c.d",
        ] {
            assert_eq!(check_pattern(good), Ok(()), "{good}");
        }
        let bad = [
            ("", "empty"),
            ("order..placed", "empty word"),
            (".order", "empty word"),
            ("order.", "empty word"),
            ("user*", "not a wildcard"),
            ("order.#x", "not a wildcard"),
            ("order placed", "spaces"),
            ("order\tplaced", "spaces"),
            ("order.\u{0}", "control"),
        ];
        for (pattern, says) in bad {
            let e = check_pattern(pattern).unwrap_err();
            assert!(e.contains(says), "{pattern:?}: {e}");
        }
        // Over-long patterns of multi-byte characters are cut on a character boundary.
        for c in ['é', '€', '🐇'] {
            let long: String = std::iter::repeat_n(c, 200).collect();
            let e = check_pattern(&long).unwrap_err();
            assert!(e.contains("at most 255"), "{e}");
            let e = error_of(valid().bind(long));
            assert!(e.contains("orders.email") && e.contains("binding"), "{e}");
        }
    }
}
