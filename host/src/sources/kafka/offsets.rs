//! Which offsets the Kafka source may commit: a partition's offset moves past a batch only once
//! that batch and every batch of the partition handed over before it were accepted by the
//! sinks (their completions resolved `Ok`). Pure bookkeeping, no consumer and no clock: the
//! source feeds it what it hands over and what its completions say, and asks what to commit.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// A partition of a topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Partition {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition's number.
    pub partition: i32,
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Accepted,
    Refused,
}

/// One batch handed over and not yet passed by the partition's commit mark.
#[derive(Debug)]
struct InFlight {
    id: u64,
    /// The offset after the batch's last record: what a commit writes once it is accepted.
    next: i64,
    state: State,
}

#[derive(Debug, Default)]
struct Track {
    in_flight: VecDeque<InFlight>,
    /// Where the partition resumes once everything accepted so far is committed.
    accepted: Option<i64>,
    /// What the last commit wrote.
    committed: Option<i64>,
}

impl Track {
    /// Batches handed over and not resolved yet.
    fn pending(&self) -> usize {
        self.in_flight
            .iter()
            .filter(|b| b.state == State::Pending)
            .count()
    }

    /// Moves the accepted mark past the accepted batches at the front; a refused batch stops
    /// it for good (its records are consumed again by whoever next owns the partition).
    fn advance(&mut self) {
        while self
            .in_flight
            .front()
            .is_some_and(|b| b.state == State::Accepted)
        {
            if let Some(batch) = self.in_flight.pop_front() {
                self.accepted = Some(batch.next);
            }
        }
    }
}

/// The source's offsets, by partition (see the module docs).
#[derive(Debug, Default)]
pub struct Offsets {
    partitions: BTreeMap<Partition, Track>,
}

impl Offsets {
    /// Batch `id` of `partition` was handed over; `next` is the offset after its last record.
    pub fn handed(&mut self, partition: &Partition, id: u64, next: i64) {
        self.partitions
            .entry(partition.clone())
            .or_default()
            .in_flight
            .push_back(InFlight {
                id,
                next,
                state: State::Pending,
            });
    }

    /// Records up to `next` of `partition` need no processing (a checkpoint already holds
    /// them): committed like an accepted batch, in order.
    pub fn skipped(&mut self, partition: &Partition, id: u64, next: i64) {
        self.handed(partition, id, next);
        self.resolved(partition, id, true);
    }

    /// Batch `id`'s completion resolved. Returns `false` for a batch it does not track (its
    /// partition was released meanwhile).
    pub fn resolved(&mut self, partition: &Partition, id: u64, accepted: bool) -> bool {
        let Some(track) = self.partitions.get_mut(partition) else {
            return false;
        };
        let Some(batch) = track.in_flight.iter_mut().find(|b| b.id == id) else {
            return false;
        };
        batch.state = if accepted {
            State::Accepted
        } else {
            State::Refused
        };
        track.advance();
        true
    }

    /// Batches of `partitions` handed over and not resolved yet.
    pub fn pending(&self, partitions: &[Partition]) -> usize {
        partitions
            .iter()
            .filter_map(|p| self.partitions.get(p))
            .map(Track::pending)
            .sum()
    }

    /// Batches handed over and not resolved yet, over every partition.
    pub fn pending_total(&self) -> usize {
        self.partitions.values().map(Track::pending).sum()
    }

    /// The offsets to commit (of `only` when given, else of every partition): those whose
    /// accepted mark moved since the last commit, or with `all` every accepted mark. They count
    /// as committed from here on; [`Offsets::commit_failed`] undoes that.
    pub fn take_commit(&mut self, only: Option<&[Partition]>, all: bool) -> Vec<(Partition, i64)> {
        let mut out = Vec::new();
        for (partition, track) in &mut self.partitions {
            if only.is_some_and(|only| !only.contains(partition)) {
                continue;
            }
            if let Some(accepted) = track.accepted
                && (all || track.committed != Some(accepted))
            {
                track.committed = Some(accepted);
                out.push((partition.clone(), accepted));
            }
        }
        out
    }

    /// A commit of these offsets failed: the next [`Offsets::take_commit`] offers them again.
    pub fn commit_failed(&mut self, offsets: &[(Partition, i64)]) {
        for (partition, offset) in offsets {
            if let Some(track) = self.partitions.get_mut(partition)
                && track.committed == Some(*offset)
            {
                track.committed = None;
            }
        }
    }

    /// Forgets `partitions` (revoked): their batches still in flight resolve untracked.
    pub fn release(&mut self, partitions: &[Partition]) {
        for partition in partitions {
            self.partitions.remove(partition);
        }
    }

    /// The first refused batch of `partition` that holds its commit mark back, if any: the
    /// offset the partition stays at.
    pub fn stuck_at(&self, partition: &Partition) -> Option<i64> {
        let track = self.partitions.get(partition)?;
        match track.in_flight.front() {
            Some(b) if b.state == State::Refused => Some(track.accepted.unwrap_or(-1)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> Partition {
        Partition {
            topic: "events".into(),
            partition: n,
        }
    }

    #[test]
    fn a_partition_commits_only_past_batches_accepted_in_order() {
        let mut offsets = Offsets::default();
        offsets.handed(&p(0), 1, 100);
        offsets.handed(&p(0), 2, 200);
        offsets.handed(&p(0), 3, 300);
        assert_eq!(offsets.take_commit(None, false), vec![]);
        // The second batch's sinks accept first: nothing may be committed yet.
        assert!(offsets.resolved(&p(0), 2, true));
        assert_eq!(offsets.take_commit(None, false), vec![]);
        assert_eq!(offsets.pending(&[p(0)]), 2);
        // The first: both are passed at once.
        assert!(offsets.resolved(&p(0), 1, true));
        assert_eq!(offsets.take_commit(None, false), vec![(p(0), 200)]);
        // Nothing moved since; a synchronous commit sends it again all the same.
        assert_eq!(offsets.take_commit(None, false), vec![]);
        assert_eq!(offsets.take_commit(None, true), vec![(p(0), 200)]);
        assert!(offsets.resolved(&p(0), 3, true));
        assert_eq!(offsets.take_commit(None, false), vec![(p(0), 300)]);
        assert_eq!(offsets.pending_total(), 0);
    }

    #[test]
    fn partitions_move_independently() {
        let mut offsets = Offsets::default();
        offsets.handed(&p(0), 1, 10);
        offsets.handed(&p(1), 2, 20);
        offsets.resolved(&p(1), 2, true);
        assert_eq!(offsets.take_commit(None, false), vec![(p(1), 20)]);
        offsets.resolved(&p(0), 1, true);
        assert_eq!(offsets.take_commit(Some(&[p(1)]), false), vec![]);
        assert_eq!(offsets.take_commit(Some(&[p(0)]), false), vec![(p(0), 10)]);
    }

    #[test]
    fn a_refused_batch_holds_its_partition_back_for_good() {
        let mut offsets = Offsets::default();
        offsets.handed(&p(0), 1, 10);
        offsets.handed(&p(0), 2, 20);
        offsets.handed(&p(0), 3, 30);
        offsets.resolved(&p(0), 1, true);
        offsets.resolved(&p(0), 2, false);
        offsets.resolved(&p(0), 3, true);
        assert_eq!(offsets.take_commit(None, false), vec![(p(0), 10)]);
        assert_eq!(offsets.stuck_at(&p(0)), Some(10));
        offsets.handed(&p(0), 4, 40);
        offsets.resolved(&p(0), 4, true);
        assert_eq!(offsets.take_commit(None, false), vec![]);
    }

    #[test]
    fn a_failed_commit_is_offered_again_unless_a_later_one_replaced_it() {
        let mut offsets = Offsets::default();
        offsets.handed(&p(0), 1, 10);
        offsets.resolved(&p(0), 1, true);
        let first = offsets.take_commit(None, false);
        offsets.commit_failed(&first);
        assert_eq!(offsets.take_commit(None, false), vec![(p(0), 10)]);
        offsets.handed(&p(0), 2, 20);
        offsets.resolved(&p(0), 2, true);
        let second = offsets.take_commit(None, false);
        assert_eq!(second, vec![(p(0), 20)]);
        // The failure of the older commit does not undo the newer one.
        offsets.commit_failed(&first);
        assert_eq!(offsets.take_commit(None, false), vec![]);
    }

    #[test]
    fn skipped_records_commit_in_order_and_released_partitions_are_forgotten() {
        let mut offsets = Offsets::default();
        offsets.handed(&p(0), 1, 10);
        offsets.skipped(&p(0), 2, 15);
        assert_eq!(offsets.take_commit(None, false), vec![]);
        offsets.resolved(&p(0), 1, true);
        assert_eq!(offsets.take_commit(None, false), vec![(p(0), 15)]);
        offsets.handed(&p(0), 3, 20);
        offsets.release(&[p(0)]);
        assert!(!offsets.resolved(&p(0), 3, true));
        assert_eq!(offsets.pending_total(), 0);
        assert_eq!(offsets.take_commit(None, false), vec![]);
    }
}
