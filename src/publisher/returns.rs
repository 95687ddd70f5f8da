//! Matching returned (unroutable) messages to their own publish.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Returned-message ids kept for the publish they belong to (see [`Publisher`](super::Publisher)).
const MAX_ORPHANS: usize = 1024;

/// Returned (unroutable) messages, matched to their own publish by message id.
///
/// The AMQP client attaches a returned message to whichever confirm it resolves next, which
/// under a multiple-acknowledgement may be another message's. A return that is not ours is
/// kept here for its owner, who looks for it when its own confirm carries none.
#[derive(Default)]
pub(super) struct Returns {
    orphans: Mutex<VecDeque<String>>,
    /// Mirrors the ledger's length, so that the common case (no return anywhere) takes no lock.
    pending: AtomicUsize,
}

impl Returns {
    /// Whether the message `id` was returned, given what its own confirm carried.
    pub(super) fn settle(&self, id: &str, returned: Option<Option<String>>) -> bool {
        if !matches!(returned, Some(Some(_))) && self.pending.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mut orphans = crate::lock(&self.orphans);
        let unroutable = Self::settle_locked(&mut orphans, id, returned);
        self.pending.store(orphans.len(), Ordering::Release);
        unroutable
    }

    fn settle_locked(
        orphans: &mut VecDeque<String>,
        id: &str,
        returned: Option<Option<String>>,
    ) -> bool {
        match returned {
            Some(Some(returned_id)) if returned_id == id => return true,
            Some(Some(other)) => {
                if orphans.len() == MAX_ORPHANS {
                    orphans.pop_front();
                }
                orphans.push_back(other);
            }
            _ => {}
        }
        match orphans.iter().position(|o| o == id) {
            Some(i) => orphans.remove(i).is_some(),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_return_handed_to_another_confirm_reaches_its_owner() {
        let returns = Returns::default();
        // "a" was confirmed carrying the return of "b".
        assert!(!returns.settle("a", Some(Some("b".into()))));
        assert!(returns.settle("b", None));
        // Claimed once only.
        assert!(!returns.settle("b", None));
    }

    #[test]
    fn own_returns_and_plain_acks() {
        let returns = Returns::default();
        assert!(returns.settle("a", Some(Some("a".into()))));
        assert!(!returns.settle("c", None));
        assert!(!returns.settle("d", Some(None)));
    }

    #[test]
    fn the_ledger_is_bounded() {
        let returns = Returns::default();
        for i in 0..MAX_ORPHANS + 10 {
            returns.settle("x", Some(Some(i.to_string())));
        }
        assert_eq!(returns.orphans.lock().unwrap().len(), MAX_ORPHANS);
        assert!(!returns.settle("0", None), "the oldest was dropped");
        assert!(returns.settle(&(MAX_ORPHANS + 9).to_string(), None));
    }
}
