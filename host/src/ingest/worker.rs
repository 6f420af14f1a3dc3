//! The pipeline worker: one thread per pipeline runs its stages, writes its sinks and acks.
//!
//! wasmtime is synchronous, so stages never run on the async workers. Stream tasks hand the
//! worker decoded batch frames over a bounded channel; the worker takes what is queued (up to
//! [`MAX_ROUND`] batches) as one **round**: for each batch, the sequence check (duplicates
//! dropped unverified, gaps fail the stream), verification (here, not on the stream task),
//! the stages, and writes to every sink; then one flush per sink (one fsync per round under
//! load), and only then the acks, cumulative per (producer, pipeline) and coalesced per
//! connection. Dead letters and late events go to the pipeline's dead-letter sink with headers
//! naming the error, stage and plugin, are flushed in the same round and counted.

use super::connection::{ConnState, StreamShared};
use super::{PipelineCounters, bump};
use crate::pipeline::{Chain, DeadLetter, LateEvent};
use crate::sinks::Sink;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use weir_format::frame::{BatchFrame, ErrorCode};
use weir_format::{Batch, BatchBuilder, Event};

/// Most batches one round takes before it flushes and acks.
pub(crate) const MAX_ROUND: usize = 256;
/// Attempts at a stage that cannot run (a pool exhausted, `init` refusing on recycle) before
/// the batch is given up with `INTERNAL_ERROR` (its sequence is not consumed: a resend runs it
/// again).
const STAGE_ATTEMPTS: u32 = 5;
/// Attempts at a failing sink flush once shutdown has begun (before it, the worker retries
/// until the sink recovers: backpressure, never loss).
const SHUTDOWN_FLUSH_ATTEMPTS: u32 = 3;

/// A sink shared by the pipelines that write to it.
pub(crate) type SharedSink = Arc<Mutex<Box<dyn Sink>>>;

/// What stream tasks send a worker.
pub(crate) enum Work {
    /// A decoded, unverified batch.
    Batch(Item),
    /// Finish: process what is queued, flush windows and sinks, ack, reply with the problems.
    Shutdown(oneshot::Sender<Vec<String>>),
}

/// One batch frame with where it came from.
pub(crate) struct Item {
    /// The frame, unverified.
    pub frame: BatchFrame,
    /// The producer id of its connection.
    pub producer: Arc<str>,
    /// Its stream (for acks, permits and stream errors).
    pub stream: Arc<StreamShared>,
}

/// The sequence state of one (producer, pipeline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sequence {
    /// The next sequence expected.
    pub next: u64,
    /// Every sequence below is acked.
    pub acked: u64,
}

/// What the rest of the server holds of a pipeline: its queue and who may write to it, and
/// what it shares with the worker ([`PipelineCore`], through `Deref`). The worker holds only
/// the core, so the queue closes (and the worker ends) when the server is gone.
pub(crate) struct PipelineHandle {
    /// What the worker shares.
    pub core: Arc<PipelineCore>,
    /// Producers allowed to write; `None`: every authenticated producer.
    pub allowed: Option<Vec<String>>,
    /// The worker's queue.
    pub tx: mpsc::Sender<Work>,
}

impl std::ops::Deref for PipelineHandle {
    type Target = PipelineCore;

    fn deref(&self) -> &PipelineCore {
        &self.core
    }
}

/// A producer's newest connection and the pipeline's index in its `hello`.
pub(crate) type CurrentConnection = (Weak<ConnState>, u16);

/// What a pipeline's worker shares with the connections.
pub(crate) struct PipelineCore {
    /// The pipeline's name.
    pub name: String,
    /// Sequence state per producer id.
    pub sequences: Mutex<HashMap<Arc<str>, Sequence>>,
    /// Per producer id, its newest connection and the pipeline's index in its `hello`: acks
    /// go there too, not only to the streams the batches came on.
    pub current: Mutex<HashMap<Arc<str>, CurrentConnection>>,
    /// The pipeline's counters.
    pub counters: PipelineCounters,
    /// Set when shutdown begins: a failing flush then gives up after
    /// [`SHUTDOWN_FLUSH_ATTEMPTS`], also in the round under way.
    pub stopping: AtomicBool,
}

impl PipelineCore {
    /// The state `welcome` announces for `producer`: (0, 0) when there is none.
    pub fn welcome_state(&self, producer: &str) -> Sequence {
        lock(&self.sequences)
            .get(producer)
            .copied()
            .unwrap_or(Sequence { next: 0, acked: 0 })
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps behind these locks are updated in single steps, so a poisoned one is still
    // usable. A sink's lock is poisoned only by a panic in that sink's write or flush, which
    // ends its pipeline's thread (its batches are never acked).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A pipeline's worker, run on its own thread.
pub(crate) struct Worker {
    pub handle: Arc<PipelineCore>,
    pub chain: Chain,
    pub sinks: Vec<SharedSink>,
    pub dead_letters: SharedSink,
    pub rx: mpsc::Receiver<Work>,
}

/// What one round did, for the acks.
#[derive(Default)]
struct Round {
    /// Every item's stream and producer, in order: a permit each, and an ack.
    streams: Vec<(Arc<StreamShared>, Arc<str>)>,
    /// Batches accepted this round.
    accepted: u64,
    /// Dead letters and late events of the round, as events for the dead-letter sink.
    dead: BatchBuilder,
    /// Events in `dead`.
    dead_count: usize,
}

impl Worker {
    /// Runs until a [`Work::Shutdown`] (or until every sender is gone).
    pub fn run(mut self) {
        let mut stopping = None;
        while stopping.is_none() {
            let Some(first) = self.rx.blocking_recv() else {
                break;
            };
            let mut round = Round::default();
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(work) = next.take() {
                match work {
                    Work::Batch(item) => self.batch(item, &mut round),
                    Work::Shutdown(reply) => {
                        stopping = Some(reply);
                        break;
                    }
                }
                taken += 1;
                if taken < MAX_ROUND {
                    next = self.rx.try_recv().ok();
                }
            }
            let mut problems = Vec::new();
            if stopping.is_some() {
                self.flush_windows(&mut round, &mut problems);
            }
            self.finish_round(round, stopping.is_some(), &mut problems);
            if let Some(reply) = stopping.take() {
                // The server may have stopped waiting; nothing to do then.
                let _ = reply.send(problems);
                return;
            }
        }
    }

    fn batch(&mut self, item: Item, round: &mut Round) {
        let Item {
            frame,
            producer,
            stream,
        } = item;
        round.streams.push((stream.clone(), producer.clone()));
        let handle = self.handle.clone();
        let counters = &handle.counters;
        if stream.is_failed() {
            bump(&counters.batches_discarded, 1);
            return;
        }
        let sequence = frame.sequence;
        let state = lock(&self.handle.sequences).get(&producer).copied();
        if let Some(state) = state {
            if sequence < state.next {
                bump(&counters.duplicates_dropped, 1);
                return;
            }
            if sequence > state.next {
                stream.fail(
                    ErrorCode::SequenceGap,
                    format!(
                        "sequence gap on pipeline `{}`: expected batch {}, received {sequence}",
                        self.handle.name, state.next
                    ),
                );
                return;
            }
        }
        // The last u64 cannot be accepted: nothing could follow it (PROTOCOL §9).
        let Some(after) = sequence.checked_add(1) else {
            stream.fail(
                ErrorCode::ProtocolViolation,
                format!("sequence {sequence} is reserved: no batch could follow it"),
            );
            return;
        };
        let batch = match frame.verify() {
            Ok(batch) => batch,
            Err(e) => {
                stream.fail(e.code(), e.to_string());
                return;
            }
        };
        lock(&self.handle.sequences).insert(
            producer.clone(),
            Sequence {
                next: after,
                acked: state.map_or(sequence, |s| s.acked),
            },
        );
        match self.run_stages(&batch, round) {
            Ok(()) => {
                round.accepted += 1;
                bump(&counters.batches_accepted, 1);
                bump(&counters.events_accepted, batch.len() as u64);
            }
            Err(message) => {
                // Nothing of the batch reached a sink: give its sequence back, so that a
                // resend runs it again.
                let mut sequences = lock(&self.handle.sequences);
                match state {
                    Some(previous) => sequences.insert(producer, previous),
                    None => sequences.remove(&producer),
                };
                drop(sequences);
                stream.fail(ErrorCode::InternalError, message);
            }
        }
    }

    /// Runs a verified batch through the stages and writes the output to every sink.
    fn run_stages(&mut self, input: &Batch<'_>, round: &mut Round) -> Result<(), String> {
        let mut current: Option<Vec<u8>> = None;
        let mut dead = Vec::new();
        let mut late = Vec::new();
        for k in 0..self.chain.stages().len() {
            let view = match &current {
                // SAFETY: a stage's output batch is one the host built or verified
                // (`Stage::process_batch`).
                Some(bytes) => unsafe { Batch::trusted(bytes) },
                None => *input,
            };
            let mut attempt = 0;
            let output = loop {
                let stage = &mut self.chain.stages_mut()[k];
                match stage.process_batch(&view) {
                    Ok(output) => break output,
                    Err(e) => {
                        attempt += 1;
                        let message = format!(
                            "pipeline `{}`: stage `{}` cannot run: {e}",
                            self.handle.name,
                            stage.name()
                        );
                        if attempt >= STAGE_ATTEMPTS {
                            return Err(message);
                        }
                        tracing::warn!("{message} (attempt {attempt} of {STAGE_ATTEMPTS})");
                        std::thread::sleep(Duration::from_millis(10 << (2 * attempt)));
                    }
                }
            };
            dead.extend(output.dead_letters);
            late.extend(output.late);
            current = Some(output.batch);
        }
        let out = match &current {
            // SAFETY: as above, the last stage's output is host-built or verified.
            Some(bytes) => unsafe { Batch::trusted(bytes) },
            None => *input,
        };
        self.write(&out);
        self.dead_letters(&dead, &late, round);
        Ok(())
    }

    fn write(&mut self, out: &Batch<'_>) {
        bump(&self.handle.counters.events_out, out.len() as u64);
        if out.is_empty() {
            return;
        }
        for sink in &self.sinks {
            let mut sink = lock(sink);
            if let Err(e) = sink.write(out) {
                // Writes only buffer; a sink whose write fails reports it again on flush.
                tracing::error!("{e}");
            }
        }
    }

    fn dead_letters(&mut self, dead: &[DeadLetter], late: &[LateEvent], round: &mut Round) {
        for d in dead {
            tracing::warn!(
                "pipeline `{}`: dead letter from stage `{}` (plugin `{}` {}): {}",
                self.handle.name,
                d.stage,
                d.plugin,
                d.version,
                d.error
            );
            round.dead.push(&dead_letter_event(d));
        }
        for l in late {
            round.dead.push(&late_event(l));
        }
        round.dead_count += dead.len() + late.len();
        bump(&self.handle.counters.dead_letters, dead.len() as u64);
        bump(&self.handle.counters.late_events, late.len() as u64);
    }

    /// End of input: aggregates finish their open windows.
    fn flush_windows(&mut self, round: &mut Round, problems: &mut Vec<String>) {
        match self.chain.flush() {
            Ok(output) => {
                self.write_windows(&output.batch, problems);
                self.dead_letters(&output.dead_letters, &output.late, round);
            }
            Err(e) => {
                self.write_windows(&e.output.batch, problems);
                self.dead_letters(&e.output.dead_letters, &e.output.late, round);
                let message = format!(
                    "pipeline `{}`: windows not flushed at shutdown: {e}",
                    self.handle.name
                );
                tracing::error!("{message}");
                problems.push(message);
            }
        }
    }

    /// Writes the finished windows' output (host-built, so it verifies; never lost silently).
    fn write_windows(&mut self, bytes: &[u8], problems: &mut Vec<String>) {
        match Batch::verify(bytes) {
            Ok(batch) => self.write(&batch),
            Err(e) => {
                let message = format!(
                    "pipeline `{}`: window results not written: {e}",
                    self.handle.name
                );
                tracing::error!("{message}");
                problems.push(message);
            }
        }
    }

    /// Flushes the sinks, then acks and releases the round's permits.
    fn finish_round(&mut self, mut round: Round, stopping: bool, problems: &mut Vec<String>) {
        if round.dead_count > 0 {
            let bytes = round.dead.finish();
            match Batch::verify(&bytes) {
                Ok(batch) => {
                    let mut sink = lock(&self.dead_letters);
                    if let Err(e) = sink.write(&batch) {
                        tracing::error!("{e}");
                    }
                }
                // The host built this batch: it always verifies. Never lose it silently.
                Err(e) => tracing::error!(
                    "pipeline `{}`: {} dead letters not written: {e}",
                    self.handle.name,
                    round.dead_count
                ),
            }
        }
        let mut flushed = true;
        let sinks = self.sinks.iter().chain(std::iter::once(&self.dead_letters));
        for sink in sinks {
            let mut attempt: u32 = 0;
            loop {
                let result = lock(sink).flush();
                match result {
                    Ok(()) => break,
                    Err(e) => {
                        attempt += 1;
                        tracing::error!(
                            "pipeline `{}`: {e} (attempt {attempt}; acks wait)",
                            self.handle.name
                        );
                        let stopping = stopping || self.handle.stopping.load(Ordering::Acquire);
                        if stopping && attempt >= SHUTDOWN_FLUSH_ATTEMPTS {
                            problems.push(format!("pipeline `{}`: {e}", self.handle.name));
                            flushed = false;
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100 * u64::from(attempt.min(50))));
                    }
                }
            }
        }
        if flushed {
            let mut sequences = lock(&self.handle.sequences);
            for (_, producer) in &round.streams {
                if let Some(state) = sequences.get_mut(producer) {
                    state.acked = state.next;
                }
            }
            // Counted before the acks leave, so a producer that sees an ack sees it counted.
            bump(&self.handle.counters.batches_acked, round.accepted);
            let current = lock(&self.handle.current);
            for (stream, producer) in &round.streams {
                if let Some(state) = sequences.get(producer) {
                    stream.ack(state.acked);
                    // The producer may have reconnected since: its new connection waits for
                    // these acks without resending (coalesced when it is the same one).
                    if let Some((conn, index)) = current.get(producer)
                        && let Some(conn) = conn.upgrade()
                    {
                        conn.ack(*index, state.acked);
                    }
                }
            }
            drop(current);
            drop(sequences);
        }
        for (stream, _) in &round.streams {
            stream.release();
        }
    }
}

/// A dead letter as an event for the dead-letter sink: the original event with headers naming
/// what failed.
fn dead_letter_event(d: &DeadLetter) -> Event {
    d.event
        .clone()
        .with_header("weir-error", d.error.as_str())
        .with_header("weir-stage", d.stage.as_str())
        .with_header("weir-plugin", d.plugin.as_str())
        .with_header("weir-plugin-version", d.version.as_str())
}

/// A late event as an event for the dead-letter sink.
fn late_event(l: &LateEvent) -> Event {
    l.event
        .clone()
        .with_header(
            "weir-error",
            "late: every window it belongs to had finished",
        )
        .with_header("weir-stage", l.stage.as_str())
}
