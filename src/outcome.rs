//! What a handler returns, and how the runtime reads it.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

/// The result of handling one delivery: `Ok(())` acknowledges it, `Err(failure)` retries or
/// dead-letters it as the [`Failure`] says.
///
/// Any error type converts into a transient failure with `?`, so the common case reads
/// like ordinary Rust:
///
/// ```
/// use rabbitry::{Failure, Outcome};
///
/// fn reserve(qty: i64) -> Outcome {
///     if qty <= 0 {
///         // Permanent: straight to the dead-letter queue, no retry.
///         return Err(Failure::reject(format!("quantity must be positive, got {qty}")));
///     }
///     let _stock: u32 = "17".parse()?; // an error here is transient: retried with backoff
///     Ok(())
/// }
/// # assert!(reserve(0).is_err());
/// # assert!(reserve(1).is_ok());
/// ```
pub type Outcome = Result<(), Failure>;

type BoxError = Box<dyn StdError + Send + Sync>;

/// Why a delivery was not handled, and what the runtime should do about it.
///
/// `Failure` deliberately does not implement [`std::error::Error`], so that every error
/// type converts into it with `?` (as a transient failure).
pub struct Failure {
    action: Action,
    kind: FailureKind,
    error: BoxError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Retry after the delay the worker's retry policy gives for this attempt.
    Retry,
    /// Retry after (at least) this delay.
    RetryAfter(Duration),
    /// Dead-letter now.
    Reject,
}

/// The kind of a failure, written to the `x-exception-kind` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// The handler returned a transient error.
    Transient,
    /// The handler rejected the message as permanently unprocessable.
    Rejected,
    /// The handler panicked.
    Panic,
    /// The handler did not finish within the worker's timeout.
    Timeout,
    /// The message could not be decoded: bad JSON, wrong shape, unsupported content type
    /// or encoding, or a body over the size limit.
    Undecodable,
    /// The payload is JSON but breaks the event's JSON Schema
    /// (`middleware::ValidateLayer`, feature `schema`).
    Invalid,
    /// The event's version (`x-event-version`) is newer than the handler knows, or no
    /// upcaster brings it to the handler's version
    /// ([`UpcastLayer`](crate::middleware::UpcastLayer)).
    UnsupportedVersion,
    /// No handler of a [`Router`](crate::Router) takes this event type.
    UnknownType,
}

impl FailureKind {
    /// The header value: `transient`, `rejected`, `panic`, `timeout` or `undecodable`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Transient => "transient",
            FailureKind::Rejected => "rejected",
            FailureKind::Panic => "panic",
            FailureKind::Timeout => "timeout",
            FailureKind::Undecodable => "undecodable",
            FailureKind::Invalid => "invalid",
            FailureKind::UnsupportedVersion => "unsupported_version",
            FailureKind::UnknownType => "unknown_type",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Failure {
    /// A transient failure: retry after the delay the worker's retry policy gives, and
    /// dead-letter once its attempts are spent.
    pub fn retry(error: impl Into<BoxError>) -> Failure {
        Failure::new(Action::Retry, FailureKind::Transient, error.into())
    }

    /// A transient failure that should wait at least `delay` before the next attempt
    /// (for example a rate limit's `Retry-After`). Counts as an attempt.
    pub fn retry_after(delay: Duration, error: impl Into<BoxError>) -> Failure {
        Failure::new(
            Action::RetryAfter(delay),
            FailureKind::Transient,
            error.into(),
        )
    }

    /// A permanent failure: dead-letter the message now, without retrying.
    pub fn reject(error: impl Into<BoxError>) -> Failure {
        Failure::new(Action::Reject, FailureKind::Rejected, error.into())
    }

    pub(crate) fn new(action: Action, kind: FailureKind, error: BoxError) -> Failure {
        Failure {
            action,
            kind,
            error,
        }
    }

    pub(crate) fn action(&self) -> Action {
        self.action
    }

    /// The kind of failure.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The underlying error.
    pub fn error(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.error
    }
}

impl<E: Into<BoxError>> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure::retry(error)
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failure")
            .field("action", &self.action)
            .field("kind", &self.kind)
            .field("error", &self.error)
            .finish()
    }
}

impl fmt::Display for Failure {
    /// The error and its causes: the dead-letter header is often all an operator has to go
    /// on. An error whose own `Display` panics shows as a note instead of taking the
    /// settlement down with it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut text = self.error.to_string();
            let mut source = self.error.source();
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }));
        match text {
            Ok(text) => f.write_str(&text),
            Err(panic) => write!(
                f,
                "(the error's Display panicked: {})",
                crate::panic_message(&*panic)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_mark_makes_a_transient_failure() {
        fn f() -> Outcome {
            "x".parse::<u32>()?;
            Ok(())
        }
        let failure = f().unwrap_err();
        assert_eq!(failure.action(), Action::Retry);
        assert_eq!(failure.kind(), FailureKind::Transient);
        assert!(failure.to_string().contains("invalid digit"));
    }

    #[test]
    fn reject_and_retry_after_carry_their_action() {
        assert_eq!(Failure::reject("bad").action(), Action::Reject);
        assert_eq!(Failure::reject("bad").kind(), FailureKind::Rejected);
        let d = Duration::from_secs(3);
        assert_eq!(
            Failure::retry_after(d, "slow down").action(),
            Action::RetryAfter(d)
        );
    }

    #[test]
    fn an_error_whose_display_panics_still_displays() {
        #[derive(Debug)]
        struct Broken;
        impl fmt::Display for Broken {
            fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
                panic!("no words for this")
            }
        }
        impl StdError for Broken {}
        let shown = Failure::retry(Broken).to_string();
        assert_eq!(shown, "(the error's Display panicked: no words for this)");
    }

    #[test]
    fn display_includes_the_cause_chain() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("stock service call failed")
            }
        }
        impl StdError for Outer {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(std::io::Error::other("connection refused"));
        assert_eq!(
            Failure::retry(e).to_string(),
            "stock service call failed: connection refused"
        );
    }
}
