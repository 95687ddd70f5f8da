//! Which deliveries on a channel can be acknowledged, and with as few frames as possible.
//!
//! Handlers finish out of order, but a multiple-ack covers every earlier delivery, so only
//! the longest run of settled deliveries from the oldest one can be acknowledged with one
//! frame. Nothing is ever acknowledged before its own outcome is known.

use std::collections::VecDeque;

/// What to do with a delivery once its outcome is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Handled, retried or dead-lettered (the copy is confirmed): acknowledge.
    Ack,
    /// Could not be settled (the retry or dead-letter copy was not confirmed): give it back
    /// to the queue.
    Requeue,
}

/// A frame to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckOp {
    /// Acknowledge every delivery up to and including this tag.
    AckUpTo(u64),
    /// Acknowledge exactly this tag.
    AckOne(u64),
    /// Requeue exactly this tag.
    Requeue(u64),
}

/// Deliveries of one channel in delivery order, each with its outcome once known.
#[derive(Debug, Default)]
pub(crate) struct AckBook {
    entries: VecDeque<(u64, Option<Settle>)>,
    /// Length of the run of settled entries at the front.
    settled_prefix: usize,
}

impl AckBook {
    /// Record a delivery. Tags increase on a channel.
    pub(crate) fn delivered(&mut self, tag: u64) {
        debug_assert!(self.entries.back().is_none_or(|(t, _)| *t < tag));
        self.entries.push_back((tag, None));
    }

    /// Record the outcome of delivery `tag`.
    pub(crate) fn settled(&mut self, tag: u64, settle: Settle) {
        if let Ok(i) = self.entries.binary_search_by_key(&tag, |(t, _)| *t) {
            self.entries[i].1 = Some(settle);
        }
        while self
            .entries
            .get(self.settled_prefix)
            .is_some_and(|(_, s)| s.is_some())
        {
            self.settled_prefix += 1;
        }
    }

    /// How many deliveries can be acknowledged right now.
    pub(crate) fn ready(&self) -> usize {
        self.settled_prefix
    }

    /// The frames that settle the front run, removing it from the book.
    pub(crate) fn take_ready(&mut self, ops: &mut Vec<AckOp>) {
        let mut ack_up_to = None;
        for _ in 0..self.settled_prefix {
            match self.entries.pop_front() {
                Some((tag, Some(Settle::Ack))) => ack_up_to = Some(tag),
                Some((tag, Some(Settle::Requeue))) => {
                    // A multiple-ack past this tag would ack it too: close the run first.
                    ops.extend(ack_up_to.take().map(AckOp::AckUpTo));
                    ops.push(AckOp::Requeue(tag));
                }
                _ => unreachable!("the settled prefix holds only settled entries"),
            }
        }
        ops.extend(ack_up_to.map(AckOp::AckUpTo));
        self.settled_prefix = 0;
    }

    /// The frames that settle everything known, one by one behind the front run
    /// (used when stopping, where unsettled deliveries go back to the queue).
    pub(crate) fn take_all_settled(&mut self, ops: &mut Vec<AckOp>) {
        self.take_ready(ops);
        self.entries.retain(|(tag, settle)| match settle {
            Some(Settle::Ack) => {
                ops.push(AckOp::AckOne(*tag));
                false
            }
            Some(Settle::Requeue) => {
                ops.push(AckOp::Requeue(*tag));
                false
            }
            None => true,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(tags: impl IntoIterator<Item = u64>) -> AckBook {
        let mut b = AckBook::default();
        tags.into_iter().for_each(|t| b.delivered(t));
        b
    }

    fn take(b: &mut AckBook) -> Vec<AckOp> {
        let mut ops = Vec::new();
        b.take_ready(&mut ops);
        ops
    }

    #[test]
    fn out_of_order_completions_wait_for_the_oldest() {
        let mut b = book(1..=4);
        b.settled(3, Settle::Ack);
        b.settled(2, Settle::Ack);
        assert_eq!(b.ready(), 0);
        assert!(take(&mut b).is_empty());
        b.settled(1, Settle::Ack);
        assert_eq!(b.ready(), 3);
        assert_eq!(take(&mut b), [AckOp::AckUpTo(3)]);
        b.settled(4, Settle::Ack);
        assert_eq!(take(&mut b), [AckOp::AckUpTo(4)]);
    }

    #[test]
    fn a_requeue_splits_the_multiple_ack() {
        let mut b = book(1..=5);
        for t in [1, 2, 4, 5] {
            b.settled(t, Settle::Ack);
        }
        b.settled(3, Settle::Requeue);
        assert_eq!(
            take(&mut b),
            [AckOp::AckUpTo(2), AckOp::Requeue(3), AckOp::AckUpTo(5)]
        );
    }

    #[test]
    fn stopping_settles_everything_known_and_leaves_the_rest() {
        let mut b = book([1, 2, 3, 7]);
        b.settled(2, Settle::Ack);
        b.settled(7, Settle::Requeue);
        let mut ops = Vec::new();
        b.take_all_settled(&mut ops);
        assert_eq!(ops, [AckOp::AckOne(2), AckOp::Requeue(7)]);
        ops.clear();
        b.take_all_settled(&mut ops);
        assert!(ops.is_empty());
        // 1 and 3 stay unacknowledged: closing the channel returns them to the queue.
        b.settled(1, Settle::Ack);
        assert_eq!(take(&mut b), [AckOp::AckUpTo(1)]);
    }

    #[test]
    fn unknown_tags_are_ignored() {
        let mut b = book([5]);
        b.settled(4, Settle::Ack);
        assert_eq!(b.ready(), 0);
    }
}
