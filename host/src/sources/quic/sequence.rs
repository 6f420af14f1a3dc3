//! The sequence state of one producer on one pipeline (PROTOCOL §9): which batch comes next,
//! which are acked, and what became of those in between. Pure: no I/O, no locks, no time.
//!
//! A batch is taken once, in sequence order; the pipeline resolves it later, maybe out of
//! order (one sink is slower than another). Acks are cumulative, so the acked mark moves only
//! over a run of accepted batches from its current position: a batch that is rejected (its
//! sinks will never accept it; only while stopping) holds the mark where it is for good, and
//! every batch accepted behind it stays unacked ([`Sequences::withheld`]): an ack past it would
//! claim it too.

use std::collections::VecDeque;

/// What to do with a batch of a given sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The next one: take it.
    Take,
    /// Taken already: drop it (a resend after a reconnect).
    Duplicate,
    /// Batches are missing before it: a protocol error.
    Gap {
        /// The sequence expected.
        expected: u64,
    },
    /// The last `u64`: nothing could follow it (PROTOCOL §9).
    Reserved,
}

/// What became of a batch taken and not acked yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    InPipeline,
    Accepted,
    Rejected,
}

/// The sequence state of one (producer, pipeline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sequences {
    /// The next sequence expected.
    next: u64,
    /// Every sequence below is acked.
    acked: u64,
    /// The fate of each sequence from `acked` to `next`.
    open: VecDeque<Fate>,
}

impl Sequences {
    /// The state of a producer whose first batch has sequence `first` (a producer may start
    /// anywhere; `welcome` told it 0 when the server had no state for it).
    pub fn starting_at(first: u64) -> Sequences {
        Sequences {
            next: first,
            acked: first,
            open: VecDeque::new(),
        }
    }

    /// The next sequence expected.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Every sequence below this one is acked.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// What to do with batch `sequence`.
    pub fn check(&self, sequence: u64) -> Verdict {
        if sequence < self.next {
            Verdict::Duplicate
        } else if sequence > self.next {
            Verdict::Gap {
                expected: self.next,
            }
        } else if sequence == u64::MAX {
            Verdict::Reserved
        } else {
            Verdict::Take
        }
    }

    /// Takes batch `sequence`, which [`Sequences::check`] said to take.
    pub fn take(&mut self, sequence: u64) {
        debug_assert_eq!(self.check(sequence), Verdict::Take);
        self.open.push_back(Fate::InPipeline);
        self.next = sequence + 1;
    }

    /// Batch `sequence` was resolved; the new acked mark when it moved.
    pub fn resolve(&mut self, sequence: u64, accepted: bool) -> Option<u64> {
        let index = usize::try_from(sequence.checked_sub(self.acked)?).ok()?;
        let fate = self.open.get_mut(index)?;
        if *fate != Fate::InPipeline {
            return None;
        }
        *fate = if accepted {
            Fate::Accepted
        } else {
            Fate::Rejected
        };
        let before = self.acked;
        while self.open.front() == Some(&Fate::Accepted) {
            self.open.pop_front();
            self.acked += 1;
        }
        (self.acked > before).then_some(self.acked)
    }

    /// Batches accepted by the sinks that stay unacked because an earlier one was rejected.
    pub fn withheld(&self) -> u64 {
        match self.open.iter().position(|f| *f == Fate::Rejected) {
            Some(first) => self
                .open
                .iter()
                .skip(first)
                .filter(|f| **f == Fate::Accepted)
                .count() as u64,
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_taken_in_order_and_resends_are_duplicates() {
        let mut s = Sequences::starting_at(5);
        assert_eq!(s.check(5), Verdict::Take);
        s.take(5);
        assert_eq!(s.check(5), Verdict::Duplicate);
        assert_eq!(s.check(4), Verdict::Duplicate);
        assert_eq!(s.check(7), Verdict::Gap { expected: 6 });
        assert_eq!((s.next(), s.acked()), (6, 5));
        let last = Sequences::starting_at(u64::MAX);
        assert_eq!(last.check(u64::MAX), Verdict::Reserved);
    }

    #[test]
    fn the_mark_moves_over_accepted_batches_only_from_the_front() {
        let mut s = Sequences::starting_at(0);
        for i in 0..4 {
            s.take(i);
        }
        // Out of order: 2 and 1 before 0.
        assert_eq!(s.resolve(2, true), None);
        assert_eq!(s.resolve(1, true), None);
        assert_eq!(s.resolve(0, true), Some(3));
        assert_eq!(s.acked(), 3);
        // Resolving twice, or something never taken, changes nothing.
        assert_eq!(s.resolve(0, true), None);
        assert_eq!(s.resolve(9, true), None);
        assert_eq!(s.resolve(3, true), Some(4));
        assert_eq!((s.next(), s.acked(), s.withheld()), (4, 4, 0));
    }

    #[test]
    fn a_rejected_batch_holds_the_mark_and_withholds_later_ones() {
        let mut s = Sequences::starting_at(10);
        for i in 10..14 {
            s.take(i);
        }
        assert_eq!(s.resolve(10, true), Some(11));
        assert_eq!(s.resolve(11, false), None);
        assert_eq!(s.resolve(12, true), None);
        assert_eq!(s.resolve(13, true), None);
        assert_eq!(s.acked(), 11);
        assert_eq!(s.withheld(), 2);
        // A resend of a withheld batch is still a duplicate: it was processed once.
        assert_eq!(s.check(12), Verdict::Duplicate);
    }
}
