//! What a handler stack decides about a message, stated explicitly.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::time::Duration;

use crate::outcome::{Action, Failure, FailureKind, Outcome};

type BoxError = Box<dyn StdError + Send + Sync>;

/// What a worker's service stack decided about one message. The runtime settles it:
/// acknowledges it, or stores a retry or dead-letter copy (confirmed) and then acknowledges
/// the original.
///
/// Every layer answers with one of these, never with an error, so each one says what
/// happens to the acknowledgement: a filter *skips* (it does not fail), a layer that gives
/// up *dead-letters* with a kind and a reason.
///
/// The variant decides what happens: a [`Failure`] carried by `Retry` is retried even if it
/// was made with [`Failure::reject`] (how a `Failure` was made only matters when a handler
/// returns it, through `From<Outcome>`).
///
/// ```
/// use rabbitry::{Disposition, FailureKind};
/// use std::time::Duration;
///
/// let skip = Disposition::skip("not for this region");
/// let later = Disposition::retry_after(Duration::from_secs(30), "downstream is rate limiting");
/// let never = Disposition::dead_letter(FailureKind::Rejected, "unknown customer");
/// assert!(matches!(skip, Disposition::Skip { .. }));
/// assert!(matches!(later, Disposition::Retry { after: Some(_), .. }));
/// assert!(matches!(never, Disposition::DeadLetter { .. }));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Disposition {
    /// Handled: acknowledge it.
    Ack,
    /// Not for this worker (filtered out, a duplicate): acknowledge it without handling and
    /// record it as skipped. Never retried, never dead-lettered.
    Skip {
        /// Why, for observers and the logs.
        reason: Cow<'static, str>,
    },
    /// Failed, perhaps only for now: retry after at least `after`, or after the delay of the
    /// worker's retry policy when `None`. Dead-lettered instead once the policy's attempts
    /// are spent.
    Retry {
        /// The delay asked for, if not the policy's.
        after: Option<Duration>,
        /// What went wrong (its kind and message go into the copy's headers).
        failure: Failure,
    },
    /// Failed for good: dead-letter it now.
    DeadLetter {
        /// What went wrong (its kind and message go into the copy's headers).
        failure: Failure,
    },
    /// Not now, and not a failure: put it back in the worker's queue after `after`
    /// (through a delay queue, as a retry waits), without counting an attempt or adding
    /// failure headers. For a layer that holds a message back, like
    /// [`OrderedLayer`](crate::middleware::OrderedLayer) while an earlier message of the same
    /// key waits for its retry.
    Defer {
        /// How long it waits in the broker (rounded up to a delay queue's tier).
        after: Duration,
        /// Why, for observers and the logs.
        reason: Cow<'static, str>,
    },
}

impl Disposition {
    /// Acknowledge without handling, recorded as skipped with `reason`.
    pub fn skip(reason: impl Into<Cow<'static, str>>) -> Disposition {
        Disposition::Skip {
            reason: reason.into(),
        }
    }

    /// A transient failure, retried after the worker's policy delay.
    pub fn retry(error: impl Into<BoxError>) -> Disposition {
        Disposition::Retry {
            after: None,
            failure: Failure::retry(error),
        }
    }

    /// A transient failure, retried after at least `delay`.
    pub fn retry_after(delay: Duration, error: impl Into<BoxError>) -> Disposition {
        Disposition::Retry {
            after: Some(delay),
            failure: Failure::retry_after(delay, error),
        }
    }

    /// A permanent failure of `kind`, dead-lettered now.
    pub fn dead_letter(kind: FailureKind, error: impl Into<BoxError>) -> Disposition {
        Disposition::DeadLetter {
            failure: Failure::new(Action::Reject, kind, error.into()),
        }
    }

    /// Put the message back in the worker's queue after `after`, without counting an
    /// attempt: see [`Disposition::Defer`].
    pub fn defer(after: Duration, reason: impl Into<Cow<'static, str>>) -> Disposition {
        Disposition::Defer {
            after,
            reason: reason.into(),
        }
    }

    /// A failure of `kind` that is retried like a transient one (the kind is what the
    /// headers and observers report: a panic, a timeout).
    pub(crate) fn retry_as(kind: FailureKind, error: impl Into<BoxError>) -> Disposition {
        Disposition::Retry {
            after: None,
            failure: Failure::new(Action::Retry, kind, error.into()),
        }
    }
}

/// A handler's [`Outcome`] as a disposition: `Ok` acknowledges, and a [`Failure`] retries
/// or dead-letters as it was made ([`Failure::retry`], [`Failure::retry_after`],
/// [`Failure::reject`]).
impl From<Outcome> for Disposition {
    fn from(outcome: Outcome) -> Disposition {
        match outcome {
            Ok(()) => Disposition::Ack,
            Err(failure) => match failure.action() {
                Action::Retry => Disposition::Retry {
                    after: None,
                    failure,
                },
                Action::RetryAfter(delay) => Disposition::Retry {
                    after: Some(delay),
                    failure,
                },
                Action::Reject => Disposition::DeadLetter { failure },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_outcomes_map_to_dispositions() {
        assert!(matches!(Disposition::from(Ok(())), Disposition::Ack));
        let d = Disposition::from(Err(Failure::reject("bad")));
        assert!(
            matches!(&d, Disposition::DeadLetter { failure } if failure.kind() == FailureKind::Rejected)
        );
        let d = Disposition::from(Err(Failure::retry_after(Duration::from_secs(2), "slow")));
        assert!(
            matches!(d, Disposition::Retry { after: Some(a), .. } if a == Duration::from_secs(2))
        );
        let d = Disposition::from(Err("x".parse::<u8>().unwrap_err().into()));
        assert!(matches!(d, Disposition::Retry { after: None, .. }));
    }
}
