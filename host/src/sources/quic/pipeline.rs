//! One pipeline as the QUIC source sees it: who may write to it, each producer's sequence
//! state, and the queue of the pipeline's worker.
//!
//! [`QuicPipeline::admit`] runs on a batch stream's task for each batch frame: it takes room
//! in the pipeline's queue first (waiting there is backpressure), then, under the producer's
//! lock, checks the sequence (duplicates dropped unverified, gaps fail the stream), verifies
//! the batch, takes the sequence and hands the batch over, so the queue holds each producer's
//! batches in sequence order. The batch's completion, resolved by the pipeline once the sinks
//! accepted it, moves the producer's acked mark (`sequence.rs`), counts the batches acked,
//! queues the cumulative ack on the batch's connection and on the producer's newest one, and
//! gives the connection its permit back.

use super::connection::{ConnState, StreamShared};
use super::sequence::{Sequences, Verdict};
use super::{read, write};
use crate::metrics::PipelineMetrics;
use crate::pipeline::{Completion, Input, PipelineInput, Position};
use crate::sinks::SharedBatch;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use weir_format::frame::{BatchFrame, ErrorCode};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps and states behind these locks are updated in single steps, so a poisoned one
    // is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How the QUIC source's [`Position`] keys begin (then the producer id).
const KEY_PREFIX: &str = "quic/";

/// A producer's newest connection and the pipeline's index in its `hello`.
pub(crate) type CurrentConnection = (Weak<ConnState>, u16);

/// A producer's sequence state on one pipeline; `None` until its first batch.
type ProducerState = Arc<Mutex<Option<Sequences>>>;

/// What became of a batch frame handed to [`QuicPipeline::admit`].
pub(crate) enum Admitted {
    /// In the pipeline: its completion gives the permit back.
    Taken,
    /// Dropped as a duplicate: give the permit back now.
    Duplicate,
    /// The stream failed (gap, invalid batch, reserved sequence): give the permit back.
    Failed,
    /// The pipeline takes no more batches.
    Stopped,
    /// A reload removed the pipeline.
    Removed,
}

/// One pipeline of the router, as producers write to it. A reload may give it another
/// worker (a new input), another producer list, or remove it; the producers' sequence state
/// stays here through all of it.
pub(crate) struct QuicPipeline {
    /// The pipeline's name.
    pub name: String,
    /// Producers allowed to write; `None`: every authenticated producer.
    allowed: RwLock<Option<Vec<String>>>,
    input: RwLock<PipelineInput>,
    /// A reload removed it: batches are refused with `UNKNOWN_PIPELINE`.
    removed: AtomicBool,
    producers: Mutex<HashMap<Arc<str>, ProducerState>>,
    /// Per producer id, its newest connection and the pipeline's index in its `hello`: acks
    /// go there too, not only to the streams the batches came on.
    current: Mutex<HashMap<Arc<str>, CurrentConnection>>,
    metrics: PipelineMetrics,
}

impl QuicPipeline {
    /// A pipeline fed from `input`; producers resume where `positions` say (a checkpoint's:
    /// batches below are dropped as duplicates, and `welcome` announces them as acked).
    pub fn new(
        input: PipelineInput,
        allowed: Option<Vec<String>>,
        metrics: PipelineMetrics,
        positions: &[Position],
    ) -> QuicPipeline {
        let producers = positions
            .iter()
            .filter_map(|p| {
                let producer = p.key.strip_prefix(KEY_PREFIX)?;
                let state = Arc::new(Mutex::new(Some(Sequences::starting_at(p.next))));
                Some((Arc::from(producer), state))
            })
            .collect();
        QuicPipeline {
            name: input.name().to_owned(),
            allowed: RwLock::new(allowed),
            input: RwLock::new(input),
            removed: AtomicBool::new(false),
            producers: Mutex::new(producers),
            current: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Whether producer `id` may write to the pipeline.
    pub fn allows(&self, id: &str) -> bool {
        read(&self.allowed)
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|p| p == id))
    }

    /// Producers allowed from now on (connections made later); `None`: every one.
    pub fn set_allowed(&self, allowed: Option<Vec<String>>) {
        *write(&self.allowed) = allowed;
    }

    /// Batches go to `input` from now on: a reload restarted the pipeline. The old input
    /// closes when its worker retires; a batch that finds it closed takes the new one.
    pub fn set_input(&self, input: PipelineInput) {
        *write(&self.input) = input;
    }

    /// A reload removed the pipeline: batches are refused from now on.
    pub fn remove(&self) {
        self.removed.store(true, Ordering::Release);
    }

    /// Whether a reload removed the pipeline.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// The key of a producer's [`Position`]s.
    fn position_key(&self, producer: &str) -> Arc<str> {
        Arc::from(format!("{KEY_PREFIX}{producer}"))
    }

    fn producer(&self, id: &Arc<str>) -> ProducerState {
        lock(&self.producers).entry(id.clone()).or_default().clone()
    }

    /// The state `welcome` announces for `producer`: (next, acked), (0, 0) when there is none.
    pub fn welcome_state(&self, producer: &str) -> (u64, u64) {
        let state = lock(&self.producers).get(producer).cloned();
        state
            .and_then(|s| lock(&s).as_ref().map(|s| (s.next(), s.acked())))
            .unwrap_or((0, 0))
    }

    /// From now on, acks for `producer` also go to `conn`, as pipeline `index` of its `hello`.
    pub fn set_current(&self, producer: Arc<str>, conn: &Arc<ConnState>, index: u16) {
        lock(&self.current).insert(producer, (Arc::downgrade(conn), index));
    }

    /// Batches accepted by the sinks that stay unacked because an earlier batch of the same
    /// producer was not accepted.
    pub fn withheld(&self) -> u64 {
        let states: Vec<ProducerState> = lock(&self.producers).values().cloned().collect();
        states
            .iter()
            .filter_map(|s| lock(s).as_ref().map(Sequences::withheld))
            .sum()
    }

    /// Takes a batch frame of `stream` into the pipeline (see the module docs).
    pub async fn admit(
        self: &Arc<Self>,
        frame: BatchFrame,
        stream: &Arc<StreamShared>,
    ) -> Admitted {
        // The input of the moment; when it closed because a reload restarted the pipeline,
        // the new one.
        let mut input = read(&self.input).clone();
        let producer = stream.producer().clone();
        let key = self.position_key(&producer);
        let slot = loop {
            if self.is_removed() {
                stream.fail(
                    ErrorCode::UnknownPipeline,
                    format!("pipeline `{}` was removed by a config reload", self.name),
                );
                return Admitted::Removed;
            }
            if let Some(slot) = input.reserve(&key).await {
                break slot;
            }
            let current = read(&self.input).clone();
            if current.same_queue(&input) {
                return Admitted::Stopped;
            }
            input = current;
        };
        let state = self.producer(&producer);
        let mut sequences = lock(&state);
        let sequence = frame.sequence;
        // A producer's first batch may have any sequence.
        let verdict = match sequences.as_ref() {
            Some(s) => s.check(sequence),
            None => Sequences::starting_at(sequence).check(sequence),
        };
        match verdict {
            Verdict::Take => {}
            Verdict::Duplicate => {
                self.metrics
                    .duplicates_dropped
                    .inc_by(u64::from(frame.event_count));
                return Admitted::Duplicate;
            }
            Verdict::Gap { expected } => {
                stream.fail(
                    ErrorCode::SequenceGap,
                    format!(
                        "sequence gap on pipeline `{}`: expected batch {expected}, received {sequence}",
                        self.name
                    ),
                );
                return Admitted::Failed;
            }
            Verdict::Reserved => {
                stream.fail(
                    ErrorCode::ProtocolViolation,
                    format!("sequence {sequence} is reserved: no batch could follow it"),
                );
                return Admitted::Failed;
            }
        }
        if let Err(e) = frame.verify() {
            stream.fail(e.code(), e.to_string());
            return Admitted::Failed;
        }
        sequences
            .get_or_insert_with(|| Sequences::starting_at(sequence))
            .take(sequence);
        let completion = {
            let pipeline = self.clone();
            let state = state.clone();
            let stream = stream.clone();
            Completion::new(move |result| pipeline.completed(&state, sequence, result, &stream))
        };
        // SAFETY: verified above.
        let batch = unsafe { SharedBatch::trusted(frame.payload) };
        // Under the producer's lock: the queue holds its batches in sequence order.
        let position = Position {
            key,
            next: sequence + 1,
        };
        slot.send(Input {
            batch,
            completion,
            position: Some(position),
            rejected: Vec::new(),
            batch_ms: None,
            event_next: None,
        });
        Admitted::Taken
    }

    /// The pipeline resolved batch `sequence` of `stream`'s producer.
    fn completed(
        &self,
        state: &ProducerState,
        sequence: u64,
        result: Result<(), String>,
        stream: &Arc<StreamShared>,
    ) {
        let moved = lock(state).as_mut().and_then(|s| {
            let before = s.acked();
            s.resolve(sequence, result.is_ok())
                .map(|acked| (acked - before, acked))
        });
        if let Some((newly, acked)) = moved {
            // Counted before the acks leave, so a producer that sees an ack sees it counted.
            self.metrics.batches_acked.inc_by(newly);
            stream.ack(acked);
            // The producer may have reconnected since: its new connection waits for these
            // acks without resending (coalesced when it is the same one).
            let current = lock(&self.current).get(stream.producer()).cloned();
            if let Some((conn, index)) = current
                && let Some(conn) = conn.upgrade()
            {
                conn.ack(index, acked);
            }
        }
        stream.release();
    }
}
