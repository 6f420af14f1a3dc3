//! What a source hands a pipeline: a verified batch and its [`Completion`], the one way the
//! source learns what became of the batch.
//!
//! The contract, the same for every source (DESIGN §6):
//!
//! - The source verifies a batch before handing it over ([`SharedBatch`] holds only verified
//!   batches) and hands over each batch once, in the order it wants the batches processed.
//! - The pipeline resolves every completion exactly once: `Ok` once every sink that takes
//!   events of the batch accepted them as its `when_full` policy says (and its dead letters
//!   are accepted by the dead-letter sink); `Err` with a reason when that will never happen
//!   (the router stopped first, or a sink gave up on its destination while stopping).
//!   Completions of one pipeline may resolve out of order (one sink is slower than another);
//!   a source that acks cumulatively keeps its own order.
//! - Resolving is cheap and may happen on any thread (a sink's task, the worker): a
//!   completion's callback must not block.
//! - A completion dropped unresolved (a worker that ended) resolves as `Err`: a source never
//!   waits forever on a batch nobody holds.

use super::config::MAX_WORKERS;
use crate::sinks::SharedBatch;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::mpsc;
use weir_format::{BatchBuilder, Event};

type Callback = Box<dyn FnOnce(Result<(), String>) + Send>;

/// How a source learns what became of one batch: resolved once, `Ok` when the sinks accepted
/// it, `Err` with the reason when they never will.
pub struct Completion(Option<Callback>);

impl Completion {
    /// A completion that calls `on_resolved` once.
    pub fn new(on_resolved: impl FnOnce(Result<(), String>) + Send + 'static) -> Completion {
        Completion(Some(Box::new(on_resolved)))
    }

    /// A completion nobody waits for.
    pub fn ignored() -> Completion {
        Completion(None)
    }

    /// Resolves the completion.
    pub fn resolve(mut self, result: Result<(), String>) {
        if let Some(callback) = self.0.take() {
            callback(result);
        }
    }

    /// `parts` completions that resolve this one together: `Ok` once every part resolved
    /// `Ok`, `Err` as soon as one resolves `Err` (with its reason). A batch split among a
    /// pipeline's workers completes when every worker's part does.
    pub fn split(self, parts: usize) -> Vec<Completion> {
        if parts <= 1 {
            return vec![self];
        }
        let joined = Arc::new(Mutex::new((parts, Some(self))));
        (0..parts)
            .map(|_| {
                let joined = joined.clone();
                Completion::new(move |result| {
                    let whole = {
                        let mut joined = joined.lock().unwrap_or_else(PoisonError::into_inner);
                        joined.0 -= 1;
                        if result.is_err() || joined.0 == 0 {
                            joined.1.take()
                        } else {
                            None
                        }
                    };
                    // Resolved outside the lock: a callback may take a while.
                    if let Some(whole) = whole {
                        whole.resolve(result);
                    }
                })
            })
            .collect()
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(callback) = self.0.take() {
            callback(Err(
                "the pipeline stopped before the batch was processed".into()
            ));
        }
    }
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Completion(pending)"
        } else {
            "Completion(resolved)"
        })
    }
}

/// Where a source resumes after a batch: recorded with the window state the batch changed
/// (a checkpointed pipeline), so that after a restart the source skips what the state already
/// holds. The QUIC source's key is `quic/PRODUCER`, its `next` the sequence after the batch's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Which of the source's streams (a producer, a partition).
    pub key: Arc<str>,
    /// Where that stream resumes.
    pub next: u64,
}

/// One batch for a pipeline.
#[derive(Debug)]
pub struct Input {
    /// The batch, verified by the source.
    pub batch: SharedBatch,
    /// Resolved once the sinks accepted the batch's events.
    pub completion: Completion,
    /// Where the source resumes after it, if the source can resume (see [`Position`]).
    pub position: Option<Position>,
    /// What the source read with the batch and could not make an event of, as events for
    /// the pipeline's dead-letter sink (each with a `weir-error` header saying why); the
    /// completion covers them too.
    pub rejected: Vec<Event>,
    /// Set by the pipeline on a worker's part of a batch split by key: the latest event time
    /// of the whole batch, which the worker's windows reach as one worker's would. Sources
    /// leave it `None`.
    pub batch_ms: Option<i64>,
    /// Per event, where the stream resumes after it (a Kafka record: its offset + 1), for a
    /// source whose batches may be cut anywhere when read again; `None`: the batch's
    /// `position` for every event (a source that resends a batch as it was, like QUIC).
    pub event_next: Option<Vec<u64>>,
}

/// How a pipeline's batches are shared out among its workers (`workers = N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partition {
    /// Whole batches, by the source's stream (a producer, a partition: the key of the batch's
    /// [`Position`]): a stream's batches reach one worker, in order.
    Stream,
    /// Each batch split by event key ([`lane_of`]): a key's events reach the worker that owns
    /// it, in order, and an aggregate's windows (one per key) live on that worker alone. Every
    /// worker gets a part of every batch, maybe empty, so that each worker's position in each
    /// stream is its own to checkpoint ([`lane_key`]).
    Key,
}

/// The worker of `lanes` that owns events with `key`: xxh3 of the key (none: of nothing),
/// modulo the worker count. Fixed by xxh3's spec, so a checkpoint's per-worker positions mean
/// the same after an upgrade.
pub fn lane_of(key: Option<&[u8]>, lanes: usize) -> usize {
    if lanes <= 1 {
        return 0;
    }
    (xxhash_rust::xxh3::xxh3_64(key.unwrap_or_default()) % lanes as u64) as usize
}

/// The position key worker `lane` of `lanes` records for stream `key` (a [`Partition::Key`]
/// pipeline): `key@LANE/LANES`, one worker included, so that a stream key holding `@` (a
/// producer's id) is never taken for a worker's.
pub fn lane_key(key: &str, lane: usize, lanes: usize) -> Arc<str> {
    Arc::from(format!("{key}@{lane}/{lanes}"))
}

/// `key@LANE/LANES` taken apart; a key without the suffix (written before workers existed) is
/// worker 0 of 1.
fn parse_lane_key(key: &str) -> (&str, usize, usize) {
    key.rsplit_once('@')
        .and_then(|(base, suffix)| {
            let (lane, lanes) = suffix.split_once('/')?;
            let (lane, lanes) = (lane.parse().ok()?, lanes.parse().ok()?);
            (lane < lanes && lanes <= MAX_WORKERS).then_some((base, lane, lanes))
        })
        .unwrap_or((key, 0, 1))
}

/// Where each worker of a [`Partition::Key`] pipeline stood in each stream when it was last
/// checkpointed: the source resumes every stream from the furthest point up to which every
/// event is folded, and an event of a batch its worker already folded is left out of that
/// worker's part.
///
/// The positions of each worker count the pipeline ran with are kept apart (a restart may
/// change `workers`), and each says something true for good: worker `w` of `n` folded every
/// event of the stream whose key it owns, up to its position. So an event is held when any of
/// them says so, and a stream resumes from the furthest point one of them covers for every key.
#[derive(Debug, Default)]
pub struct Resumed {
    /// Per stream, what each worker count says.
    streams: HashMap<Arc<str>, Vec<Held>>,
}

/// What the workers of one count held of a stream: the count, and each worker's next position
/// (`None`: that worker committed nothing of the stream).
type Held = (usize, Vec<Option<u64>>);

impl Resumed {
    /// Takes the positions a checkpoint holds apart: where each stream's source resumes and
    /// what each worker already holds.
    pub fn from_checkpoint(rows: Vec<Position>) -> (Vec<Position>, Resumed) {
        let mut resumed = Resumed::default();
        for Position { key, next } in rows {
            let (base, lane, lanes) = parse_lane_key(&key);
            let groups = resumed.streams.entry(Arc::from(base)).or_default();
            let at = groups
                .iter()
                .position(|(n, _)| *n == lanes)
                .unwrap_or_else(|| {
                    groups.push((lanes, vec![None; lanes]));
                    groups.len() - 1
                });
            // Positions only grow: of two rows for one worker (one written before the
            // suffix existed), the later.
            let slot = &mut groups[at].1[lane];
            *slot = (*slot).max(Some(next));
        }
        let positions = resumed
            .streams
            .iter()
            .filter_map(|(key, groups)| {
                // Up to where every key is folded, by each worker count's account.
                let next = groups
                    .iter()
                    .filter_map(|(_, slots)| slots.iter().copied().min().flatten())
                    .max()?;
                Some(Position {
                    key: key.clone(),
                    next,
                })
            })
            .collect();
        (positions, resumed)
    }

    /// Whether the worker that owned `key` when stream `stream` was checkpointed already
    /// folded the event after which the stream resumes at `next`.
    fn holds(&self, stream: &str, key: Option<&[u8]>, next: u64) -> bool {
        self.streams.get(stream).is_some_and(|groups| {
            groups
                .iter()
                .any(|(lanes, slots)| slots[lane_of(key, *lanes)].is_some_and(|held| next <= held))
        })
    }

    fn covers(&self, stream: &str) -> bool {
        self.streams.contains_key(stream)
    }
}

/// Where sources put batches for one pipeline: a bounded queue per worker (a full queue is
/// backpressure on the source), and how batches are shared out among them ([`Partition`]).
/// Cheap to clone.
#[derive(Clone)]
pub struct PipelineInput {
    name: Arc<str>,
    lanes: Arc<[mpsc::Sender<Input>]>,
    partition: Partition,
    resumed: Arc<Resumed>,
}

impl std::fmt::Debug for PipelineInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineInput")
            .field("name", &self.name)
            .field("workers", &self.lanes.len())
            .field("partition", &self.partition)
            .finish_non_exhaustive()
    }
}

/// Room for one batch in a pipeline's queues, taken before the batch is handed over so that a
/// source can hand it over without waiting (under a lock of its own, say).
pub struct Slot<'a> {
    input: &'a PipelineInput,
    /// One per worker the batch goes to: the stream's, or every worker (in order).
    permits: Vec<mpsc::Permit<'a, Input>>,
}

impl Slot<'_> {
    /// Hands the batch over.
    pub fn send(self, input: Input) {
        for (permit, part) in self.permits.into_iter().zip(self.input.parts(input)) {
            permit.send(part);
        }
    }
}

impl PipelineInput {
    pub(crate) fn new(
        name: Arc<str>,
        lanes: Vec<mpsc::Sender<Input>>,
        partition: Partition,
        resumed: Arc<Resumed>,
    ) -> PipelineInput {
        PipelineInput {
            name,
            lanes: lanes.into(),
            partition,
            resumed,
        }
    }

    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The worker whose queue takes the batches of stream `stream` ([`Partition::Stream`]).
    fn stream_lane(&self, stream: &str) -> usize {
        lane_of(Some(stream.as_bytes()), self.lanes.len())
    }

    /// Waits for room for a batch of stream `stream` (the key of its [`Position`]); `None`
    /// once the pipeline stopped taking batches.
    pub async fn reserve(&self, stream: &str) -> Option<Slot<'_>> {
        let permits = match self.partition {
            Partition::Stream => vec![self.lanes[self.stream_lane(stream)].reserve().await.ok()?],
            Partition::Key => {
                let mut permits = Vec::with_capacity(self.lanes.len());
                for lane in self.lanes.iter() {
                    permits.push(lane.reserve().await.ok()?);
                }
                permits
            }
        };
        Some(Slot {
            input: self,
            permits,
        })
    }

    /// Hands over a batch, waiting for room; gives it back when the pipeline stopped taking
    /// batches.
    pub async fn send(&self, input: Input) -> Result<(), Input> {
        let stream = input.position.as_ref().map(|p| p.key.clone());
        match self.reserve(stream.as_deref().unwrap_or_default()).await {
            Some(slot) => {
                slot.send(input);
                Ok(())
            }
            None => Err(input),
        }
    }

    /// Hands over a batch if there is room now; gives it back when there is none or the
    /// pipeline stopped taking batches.
    pub fn try_send(&self, input: Input) -> Result<(), Input> {
        let permits = match self.partition {
            Partition::Stream => {
                let stream = input.position.as_ref().map_or("", |p| &p.key);
                self.lanes[self.stream_lane(stream)]
                    .try_reserve()
                    .map(|permit| vec![permit])
            }
            Partition::Key => self.lanes.iter().map(mpsc::Sender::try_reserve).collect(),
        };
        match permits {
            Ok(permits) => {
                Slot {
                    input: self,
                    permits,
                }
                .send(input);
                Ok(())
            }
            Err(_) => Err(input),
        }
    }

    /// What each worker a batch goes to gets of it: the batch itself ([`Partition::Stream`],
    /// or one worker with nothing checkpointed to leave out), or one part per worker, each
    /// with the events whose key it owns, its own position key and a share of the completion.
    fn parts(&self, input: Input) -> Vec<Input> {
        let lanes = self.lanes.len();
        let resumed = input
            .position
            .as_ref()
            .is_some_and(|p| self.resumed.covers(&p.key));
        if self.partition == Partition::Stream {
            return vec![input];
        }
        if lanes == 1 && !resumed {
            let mut input = input;
            if let Some(p) = input.position.as_mut() {
                p.key = lane_key(&p.key, 0, 1);
            }
            return vec![input];
        }
        let Input {
            batch,
            completion,
            position,
            mut rejected,
            event_next,
            ..
        } = input;
        let mut parts: Vec<BatchBuilder> = (0..lanes).map(|_| BatchBuilder::new()).collect();
        let mut held = 0usize;
        let mut batch_ms: Option<i64> = None;
        for (i, event) in batch.batch().iter().enumerate() {
            let key = event.key();
            batch_ms = batch_ms.max(Some(event.timestamp_ms()));
            if let Some(p) = position.as_ref().filter(|_| resumed)
                && let next = event_next.as_ref().and_then(|n| n.get(i)).copied()
                && self.resumed.holds(&p.key, key, next.unwrap_or(p.next))
            {
                held += 1;
                continue;
            }
            parts[lane_of(key, lanes)].push_ref(&event, event.source());
        }
        if held > 0 {
            tracing::info!(
                "pipeline `{}`: {held} events of a batch resent after a restart are left out: the checkpoint already holds them",
                self.name
            );
        }
        parts
            .into_iter()
            .zip(completion.split(lanes))
            .enumerate()
            .map(|(lane, (mut part, completion))| Input {
                // SAFETY: built here from a verified batch.
                batch: unsafe { SharedBatch::trusted(part.finish()) },
                completion,
                position: position.as_ref().map(|p| Position {
                    key: lane_key(&p.key, lane, lanes),
                    next: p.next,
                }),
                rejected: if lane == 0 {
                    std::mem::take(&mut rejected)
                } else {
                    Vec::new()
                },
                batch_ms,
                event_next: None,
            })
            .collect()
    }

    /// How many workers the pipeline runs on.
    pub fn workers(&self) -> usize {
        self.lanes.len()
    }

    /// Whether the pipeline stopped taking batches.
    pub fn is_closed(&self) -> bool {
        self.lanes.iter().any(mpsc::Sender::is_closed)
    }

    /// Whether `other` feeds the same workers' queues.
    pub fn same_queue(&self, other: &PipelineInput) -> bool {
        self.lanes[0].same_channel(&other.lanes[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a completion was resolved with, each time.
    type Seen = Arc<Mutex<Vec<Result<(), String>>>>;

    fn recorded() -> (Completion, Seen) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let completion = Completion::new(move |r| record.lock().expect("lock").push(r));
        (completion, seen)
    }

    #[test]
    fn a_split_completion_resolves_once_every_part_did_or_at_the_first_failure() {
        let (whole, seen) = recorded();
        let mut parts = whole.split(3);
        parts.pop().expect("part").resolve(Ok(()));
        parts.pop().expect("part").resolve(Ok(()));
        assert!(seen.lock().expect("lock").is_empty(), "one part is pending");
        parts.pop().expect("part").resolve(Ok(()));
        assert_eq!(*seen.lock().expect("lock"), [Ok(())]);

        let (whole, seen) = recorded();
        let mut parts = whole.split(3);
        parts
            .pop()
            .expect("part")
            .resolve(Err("sink refused".into()));
        assert_eq!(*seen.lock().expect("lock"), [Err("sink refused".into())]);
        parts.pop().expect("part").resolve(Ok(()));
        drop(parts);
        assert_eq!(seen.lock().expect("lock").len(), 1, "resolved once");

        let (whole, seen) = recorded();
        let mut parts = whole.split(2);
        parts.pop().expect("part").resolve(Ok(()));
        drop(parts);
        assert_eq!(
            *seen.lock().expect("lock"),
            [Err(
                "the pipeline stopped before the batch was processed".into()
            )],
            "a part dropped unresolved fails the batch"
        );
    }

    #[test]
    fn lane_keys_name_the_worker_and_the_worker_count() {
        assert_eq!(&*lane_key("quic/a", 1, 4), "quic/a@1/4");
        assert_eq!(&*lane_key("quic/a", 0, 1), "quic/a@0/1");
        assert_eq!(parse_lane_key("quic/a@1/4"), ("quic/a", 1, 4));
        assert_eq!(parse_lane_key("quic/a"), ("quic/a", 0, 1));
        assert_eq!(parse_lane_key("quic/a@b"), ("quic/a@b", 0, 1));
        assert_eq!(parse_lane_key("quic/a@5/4"), ("quic/a@5/4", 0, 1));
        // A producer whose id looks like a worker's suffix is still its own stream.
        assert_eq!(
            parse_lane_key(&lane_key("quic/x@1/2", 0, 1)),
            ("quic/x@1/2", 0, 1)
        );
        assert_eq!(
            parse_lane_key("quic/x@0/99999999999"),
            ("quic/x@0/99999999999", 0, 1),
            "no worker count above the maximum"
        );
        assert_eq!(lane_of(Some(b"k"), 1), 0);
        let lanes: std::collections::HashSet<usize> = (0..64)
            .map(|i| lane_of(Some(format!("k{i}").as_bytes()), 4))
            .collect();
        assert_eq!(lanes.len(), 4, "keys spread over every worker");
    }

    fn at(key: &str, next: u64) -> Position {
        Position {
            key: Arc::from(key),
            next,
        }
    }

    #[test]
    fn a_stream_resumes_from_the_worker_furthest_behind_and_each_worker_skips_what_it_holds() {
        let (positions, resumed) = Resumed::from_checkpoint(vec![
            at("quic/a@0/2", 7),
            at("quic/a@1/2", 5),
            // Worker 1 never committed anything of stream b: b starts from the beginning.
            at("quic/b@0/2", 3),
            at("quic/c", 9),
        ]);
        let mut positions: Vec<(String, u64)> = positions
            .into_iter()
            .map(|p| (p.key.to_string(), p.next))
            .collect();
        positions.sort();
        assert_eq!(
            positions,
            [("quic/a".to_owned(), 5), ("quic/c".to_owned(), 9)]
        );
        let key = |lane| {
            (0..)
                .map(|i| format!("k{i}"))
                .find(|k| lane_of(Some(k.as_bytes()), 2) == lane)
                .expect("a key")
        };
        let (k0, k1) = (key(0), key(1));
        // The batch after which stream a resumes at 6: worker 0 folded it, worker 1 did not.
        assert!(resumed.holds("quic/a", Some(k0.as_bytes()), 6));
        assert!(!resumed.holds("quic/a", Some(k1.as_bytes()), 6));
        assert!(!resumed.holds("quic/a", Some(k0.as_bytes()), 8));
        assert!(!resumed.holds("quic/b", Some(k1.as_bytes()), 1));
        assert!(resumed.holds("quic/c", Some(k1.as_bytes()), 9));
    }

    /// The values of each worker's part of `input`, handed to a key-split pipeline on two
    /// workers that resumed from `rows`.
    fn parts_of(rows: Vec<Position>, input: Input) -> Vec<Vec<String>> {
        let (_, resumed) = Resumed::from_checkpoint(rows);
        let lanes: Vec<mpsc::Sender<Input>> = (0..2).map(|_| mpsc::channel(1).0).collect();
        let pipeline = PipelineInput::new("p".into(), lanes, Partition::Key, Arc::new(resumed));
        pipeline
            .parts(input)
            .iter()
            .map(|part| {
                part.batch
                    .batch()
                    .iter()
                    .map(|e| String::from_utf8_lossy(e.value()).into_owned())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_batch_read_again_with_other_bounds_leaves_out_each_event_its_worker_folded() {
        // Kafka offsets 95..=104 read again as one batch; worker 0 had folded up to 100 (its
        // position 101), worker 1 up to 95.
        let key = |lane| {
            (0..)
                .map(|i| format!("k{i}"))
                .find(|k| lane_of(Some(k.as_bytes()), 2) == lane)
                .expect("a key")
        };
        let events: Vec<Event> = (95..105u64)
            .map(|offset| Event::new(offset.to_string(), 0).with_key(key((offset % 2) as usize)))
            .collect();
        let input = Input {
            batch: SharedBatch::verify(weir_format::encode(&events)).expect("a batch"),
            completion: Completion::ignored(),
            position: Some(at("kafka/t/0", 105)),
            rejected: Vec::new(),
            batch_ms: None,
            event_next: Some((96..106).collect()),
        };
        let parts = parts_of(
            vec![at("kafka/t/0@0/2", 101), at("kafka/t/0@1/2", 96)],
            input,
        );
        assert_eq!(parts[0], ["102", "104"], "worker 0 folded up to offset 100");
        assert_eq!(parts[1], ["97", "99", "101", "103"], "worker 1 up to 95");
    }

    #[test]
    fn positions_written_with_another_worker_count_still_say_what_is_held() {
        // Written with 2 workers (worker 1 behind), then after a restart with 3, which took
        // the stream up from 90 on.
        let (positions, resumed) = Resumed::from_checkpoint(vec![
            at("quic/a@0/2", 100),
            at("quic/a@1/2", 90),
            at("quic/a@0/3", 95),
            at("quic/a@1/3", 93),
            at("quic/a@2/3", 95),
        ]);
        assert_eq!(
            positions,
            [at("quic/a", 93)],
            "every key is folded up to 93"
        );
        for k in 0..60 {
            let key = format!("k{k}");
            let key = Some(key.as_bytes());
            let by_two = lane_of(key, 2) == 0;
            let by_three = lane_of(key, 3) != 1;
            assert_eq!(resumed.holds("quic/a", key, 94), by_two || by_three);
            assert_eq!(resumed.holds("quic/a", key, 99), by_two);
            assert!(!resumed.holds("quic/a", key, 101));
        }
    }
}
