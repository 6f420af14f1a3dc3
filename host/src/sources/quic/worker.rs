//! The pipeline worker: one thread per pipeline runs its stages, fans the output out to its
//! sinks and acks.
//!
//! wasmtime is synchronous, so stages never run on the async workers. Stream tasks hand the
//! worker decoded batch frames over a bounded channel; the worker takes what is queued (up to
//! [`MAX_ROUND`] batches) as one **round**: for each batch, the sequence check (duplicates
//! dropped unverified, gaps fail the stream), verification (here, not on the stream task),
//! the stages, and the fan-out: the output batch is shared by every sink, each offered the
//! events its condition selects (`sinks/runner.rs` says when a sink has accepted them); events
//! no sink takes go to the `unmatched` output. Then the disk buffers written are synced, the
//! worker waits until every sink has accepted the round, and only then acks, cumulative per
//! (producer, pipeline) and coalesced per connection. Dead letters and late events go to the
//! pipeline's dead-letter sink with headers naming the error, stage and plugin, accepted in
//! the same round and counted.

use super::connection::{ConnState, StreamShared};
use super::{PipelineCounters, bump};
use crate::metrics::{PipelineMetrics, StageMetrics};
use crate::pipeline::route::Condition;
use crate::pipeline::{Chain, DeadLetter, LateEvent};
use crate::runtime::PluginKind;
use crate::sinks::runner::{Accepted, Sink, Ticket};
use crate::sinks::{Outgoing, Selection, SharedBatch};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use weir_format::frame::{BatchFrame, ErrorCode};
use weir_format::{Batch, BatchBuilder, Event};

/// Most batches one round takes before it flushes and acks.
pub(crate) const MAX_ROUND: usize = 256;
/// Attempts at a stage that cannot run (a pool exhausted, `init` refusing on recycle) before
/// the batch is given up with `INTERNAL_ERROR` (its sequence is not consumed: a resend runs it
/// again).
const STAGE_ATTEMPTS: u32 = 5;
/// Attempts at a failing disk-buffer sync once shutdown has begun (before it, the worker
/// retries until it works: backpressure, never loss).
const SHUTDOWN_SYNC_ATTEMPTS: u32 = 3;
/// How long a round waits for its sinks once shutdown has begun (before it, as long as it
/// takes: a `block` sink's destination being down is backpressure).
const SHUTDOWN_ACCEPT_WAIT: Duration = Duration::from_secs(10);

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
    /// Set when shutdown begins: a failing disk-buffer sync then gives up after
    /// [`SHUTDOWN_SYNC_ATTEMPTS`], and waiting for sinks after [`SHUTDOWN_ACCEPT_WAIT`], also
    /// in the round under way.
    pub stopping: AtomicBool,
    /// When shutdown began: rounds stop waiting for their sinks [`SHUTDOWN_ACCEPT_WAIT`]
    /// after it (one deadline for the whole drain, not one per round).
    pub stopping_since: OnceLock<Instant>,
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

/// Where a pipeline's events that no sink takes go.
pub(crate) enum UnmatchedOut {
    /// Some sink takes every event.
    Impossible,
    /// Dropped and counted.
    Drop,
    /// To this sink.
    Sink(Arc<Sink>),
}

/// A pipeline's worker, run on its own thread.
pub(crate) struct Worker {
    pub handle: Arc<PipelineCore>,
    pub chain: Chain,
    /// The pipeline's name, shared by its deliveries.
    pub name: Arc<str>,
    /// Its sinks and which events each takes.
    pub routes: Vec<(Arc<Sink>, Condition)>,
    pub unmatched: UnmatchedOut,
    pub dead_letters: Arc<Sink>,
    pub metrics: PipelineMetrics,
    /// One per stage, in order.
    pub stage_metrics: Vec<StageMetrics>,
    pub rx: mpsc::Receiver<Work>,
    /// A round was not accepted (only while stopping): acks are cumulative, so acking any
    /// later round would ack it too. No more acks from this worker.
    pub withhold_acks: bool,
}

/// What one round did, for the acks.
#[derive(Default)]
struct Round {
    /// Counts the round's deliveries not accepted yet.
    ticket: Arc<Ticket>,
    /// A delivery was refused (only while stopping): the round is not acked.
    refused: Vec<String>,
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
        // What kept rounds from being acked (only ever while stopping), for the shutdown report.
        let mut problems = Vec::new();
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
                self.metrics.duplicates_dropped.inc();
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
        let events = batch.len() as u64;
        match self.run_stages(&batch, round) {
            Ok(output) => {
                round.accepted += 1;
                bump(&counters.batches_accepted, 1);
                bump(&counters.events_accepted, events);
                self.metrics.batches_in.inc();
                self.metrics.events_in.inc_by(events);
                let output = match output {
                    // SAFETY: a stage's output batch is one the host built or verified
                    // (`Stage::process_batch`).
                    Some(bytes) => unsafe { SharedBatch::trusted(bytes) },
                    // SAFETY: verified above.
                    None => unsafe { SharedBatch::trusted(frame.payload) },
                };
                self.fan_out(output, round);
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

    /// Runs a verified batch through the stages; the last stage's output (`None`: no stages,
    /// the input itself). Dead letters and late events go to the round.
    fn run_stages(
        &mut self,
        input: &Batch<'_>,
        round: &mut Round,
    ) -> Result<Option<Vec<u8>>, String> {
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
            let started = Instant::now();
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
            let metrics = &self.stage_metrics[k];
            metrics.latency.observe(started.elapsed().as_secs_f64());
            let (inputs, errors) = (view.len(), output.dead_letters.len());
            // SAFETY: as above.
            let outputs = unsafe { Batch::trusted(&output.batch) }.len();
            metrics.events_in.inc_by(inputs as u64);
            metrics.events_out.inc_by(outputs as u64);
            metrics.errors.inc_by(errors as u64);
            // An aggregate folds its input into windows: nothing of it is dropped.
            let aggregate = self.chain.stages()[k].plugin().kind() == PluginKind::Aggregate;
            if !aggregate {
                metrics
                    .dropped
                    .inc_by(inputs.saturating_sub(outputs + errors) as u64);
            }
            dead.extend(output.dead_letters);
            late.extend(output.late);
            current = Some(output.batch);
        }
        self.dead_letters(&dead, &late, round);
        Ok(current)
    }

    /// Offers each sink the events its condition selects; the rest to `unmatched`.
    fn fan_out(&mut self, out: SharedBatch, round: &mut Round) {
        let batch = out.batch();
        let n = batch.len();
        bump(&self.handle.counters.events_out, n as u64);
        if n == 0 {
            return;
        }
        let mut taken = match self.unmatched {
            UnmatchedOut::Impossible => Vec::new(),
            _ => vec![false; n],
        };
        for (sink, condition) in &self.routes {
            let selection = match condition {
                Condition::All => Selection::All,
                _ => {
                    let indices: Vec<u32> = batch
                        .iter()
                        .enumerate()
                        .filter(|(_, e)| condition.matches(e))
                        .map(|(i, _)| i as u32)
                        .collect();
                    if indices.is_empty() {
                        continue;
                    }
                    for &i in &indices {
                        if let Some(t) = taken.get_mut(i as usize) {
                            *t = true;
                        }
                    }
                    if indices.len() == n {
                        Selection::All
                    } else {
                        Selection::Some(indices.into())
                    }
                }
            };
            let delivery = Outgoing::new(out.clone(), selection, self.name.clone());
            if let Err(e) = sink.offer(delivery, &round.ticket) {
                round.refused.push(e);
            }
        }
        if taken.is_empty() {
            return;
        }
        let rest: Vec<u32> = (0..n as u32).filter(|&i| !taken[i as usize]).collect();
        if rest.is_empty() {
            return;
        }
        self.metrics.unmatched.inc_by(rest.len() as u64);
        match &self.unmatched {
            UnmatchedOut::Sink(sink) => {
                let selection = if rest.len() == n {
                    Selection::All
                } else {
                    Selection::Some(rest.into())
                };
                let delivery = Outgoing::new(out.clone(), selection, self.name.clone());
                if let Err(e) = sink.offer(delivery, &round.ticket) {
                    round.refused.push(e);
                }
            }
            _ => {
                self.metrics.unmatched_dropped.inc_by(rest.len() as u64);
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
        self.metrics.dead_letters.inc_by(dead.len() as u64);
        self.metrics.late_events.inc_by(late.len() as u64);
    }

    /// End of input: aggregates finish their open windows.
    fn flush_windows(&mut self, round: &mut Round, problems: &mut Vec<String>) {
        match self.chain.flush() {
            Ok(output) => {
                self.count_windows(&output.batch);
                self.write_windows(output.batch, round, problems);
                self.dead_letters(&output.dead_letters, &output.late, round);
            }
            Err(e) => {
                let message = format!(
                    "pipeline `{}`: windows not flushed at shutdown: {e}",
                    self.handle.name
                );
                let e = *e;
                self.count_windows(&e.output.batch);
                self.write_windows(e.output.batch, round, problems);
                self.dead_letters(&e.output.dead_letters, &e.output.late, round);
                tracing::error!("{message}");
                problems.push(message);
            }
        }
    }

    /// Counts the windows finished at shutdown as the last stage's output.
    fn count_windows(&self, bytes: &[u8]) {
        if let (Some(metrics), Ok(batch)) = (self.stage_metrics.last(), Batch::verify(bytes)) {
            metrics.events_out.inc_by(batch.len() as u64);
        }
    }

    /// Fans the finished windows' output out (host-built, so it verifies; never lost
    /// silently).
    fn write_windows(&mut self, bytes: Vec<u8>, round: &mut Round, problems: &mut Vec<String>) {
        if bytes.is_empty() {
            return;
        }
        match SharedBatch::verify(bytes) {
            Ok(batch) => self.fan_out(batch, round),
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

    /// Every sink this pipeline offers to, each once.
    fn sinks(&self) -> Vec<&Arc<Sink>> {
        let mut sinks: Vec<&Arc<Sink>> = Vec::new();
        let unmatched = match &self.unmatched {
            UnmatchedOut::Sink(sink) => Some(sink),
            _ => None,
        };
        let all = self.routes.iter().map(|(s, _)| s);
        for sink in all.chain(unmatched).chain([&self.dead_letters]) {
            if !sinks.iter().any(|s| Arc::ptr_eq(s, sink)) {
                sinks.push(sink);
            }
        }
        sinks
    }

    /// Hands the round's dead letters to the dead-letter sink, syncs the disk buffers written,
    /// waits until every sink accepted the round, then acks and releases the round's permits.
    fn finish_round(&mut self, mut round: Round, stopping: bool, problems: &mut Vec<String>) {
        if round.dead_count > 0 {
            let bytes = round.dead.finish();
            match SharedBatch::verify(bytes) {
                Ok(batch) => {
                    let letters = Outgoing::all(batch, self.name.clone());
                    if let Err(e) = self.dead_letters.offer(letters, &round.ticket) {
                        round.refused.push(e);
                    }
                }
                // The host built this batch: it always verifies. Never lose it silently.
                Err(e) => round.refused.push(format!(
                    "pipeline `{}`: {} dead letters not written: {e}",
                    self.handle.name, round.dead_count
                )),
            }
        }
        let stopping = || stopping || self.handle.stopping.load(Ordering::Acquire);
        for sink in self.sinks() {
            let mut attempt: u32 = 0;
            while let Err(e) = sink.sync() {
                attempt += 1;
                tracing::error!(
                    "pipeline `{}`: {e} (attempt {attempt}; acks wait)",
                    self.handle.name
                );
                if stopping() && attempt >= SHUTDOWN_SYNC_ATTEMPTS {
                    round
                        .refused
                        .push(format!("pipeline `{}`: {e}", self.handle.name));
                    break;
                }
                std::thread::sleep(Duration::from_millis(100 * u64::from(attempt.min(50))));
            }
        }
        // A round already refused is not acked whatever the rest does: no need to wait.
        while round.refused.is_empty() {
            match round.ticket.wait(Duration::from_millis(100)) {
                Accepted::Yes => break,
                Accepted::Never => {
                    round.refused.push(format!(
                        "pipeline `{}`: a sink gave up on the last batches; they are not acked",
                        self.handle.name
                    ));
                    break;
                }
                Accepted::Waiting => {}
            }
            let since = self.handle.stopping_since.get();
            if stopping() && since.is_none_or(|since| since.elapsed() >= SHUTDOWN_ACCEPT_WAIT) {
                round.refused.push(format!(
                    "pipeline `{}`: a sink did not accept the last batches in {}s; they are not acked",
                    self.handle.name,
                    SHUTDOWN_ACCEPT_WAIT.as_secs()
                ));
                break;
            }
        }
        if !round.refused.is_empty() {
            self.withhold_acks = true;
        } else if self.withhold_acks && round.accepted > 0 {
            let batches = if round.accepted == 1 {
                "batch"
            } else {
                "batches"
            };
            round.refused.push(format!(
                "pipeline `{}`: {} later {batches} not acked: an earlier round was not accepted, and an ack would cover it too",
                self.handle.name, round.accepted
            ));
        }
        if round.refused.is_empty() && !self.withhold_acks {
            let mut sequences = lock(&self.handle.sequences);
            for (_, producer) in &round.streams {
                if let Some(state) = sequences.get_mut(producer) {
                    state.acked = state.next;
                }
            }
            // Counted before the acks leave, so a producer that sees an ack sees it counted.
            bump(&self.handle.counters.batches_acked, round.accepted);
            self.metrics.batches_acked.inc_by(round.accepted);
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
        } else {
            for message in &round.refused {
                tracing::error!("{message}");
            }
            problems.append(&mut round.refused);
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
