//! [`Chain`]: the stages of one pipeline for one worker, in order: the one loop that runs a
//! batch through stages, used by `weir serve`'s workers, `weir test` and the benches.
//!
//! Decisions:
//!
//! - A [`Chain`] is the ordered stages of one pipeline for one worker; routing to sinks is
//!   not its business.
//! - Dead letters and late events of every stage are collected in stage order; each names
//!   its stage, and its `index` is the event's position in *that stage's* input.
//! - Every stage that ran reports a [`StageRun`] (events in and out, failures, time): the
//!   caller counts them; the chain keeps no counters.
//! - [`Chain::flush`] (end of input) flushes stage by stage: what stage `i` emits when its
//!   windows close goes through stages `i+1..` before stage `i+1` is flushed, so a chain of
//!   aggregates drains completely. The outputs are merged into one batch; a batch that does
//!   not verify there is an error, never skipped.
//! - **Failures lose nothing and count nothing twice.** A stage call is all or nothing (see
//!   `stage.rs`): when stage `k` fails as a whole, it changed nothing, while stages `0..k`
//!   have committed their part (an aggregate folded the batch, windows it finished left its
//!   state). So a failed call returns a [`ChainError`] holding the failing stage, the error,
//!   everything the chain finished before the failure ([`ChainError::output`]: events that went
//!   through every stage, dead letters and late events) and stage `k`'s unprocessed input
//!   ([`ChainError::pending`]). The caller delivers `output` as if the call had succeeded and,
//!   once the stage can run again, passes `pending` to [`Chain::resume`] at stage `k`; it must
//!   not run the original batch again. After a failed [`Chain::flush`]: deliver `output`,
//!   resume `pending`, then flush again (stages already flushed hold no window and emit
//!   nothing).
//! - **Swaps and probation.** [`Chain::swap`] replaces a stage's version between two calls; an
//!   aggregate's window state moves to the new version. With a probation of n batches, the
//!   previous version is kept until the new one took n batches. On probation, a batch (or a
//!   flush) is first given to the new version whole, without isolating events: when it takes
//!   it, that is its output. When it fails (an event failure, or it cannot run), it changed
//!   nothing, and the previous version takes the same input from the same window state, with
//!   isolation. If the previous version fails on no event, the new version is **rolled back**:
//!   the previous one serves again and its output is the batch's output, so a bad version
//!   dead-letters nothing. If the previous version fails on some events too, the new one gets
//!   the input again from the same state, isolating: if it fails only on events the previous
//!   one also fails on, those are poison (dead letters as usual) and the new version stays
//!   (its output, its state); if it fails on any other, it is rolled back. If neither version
//!   can run, the call fails as any stage that cannot run, and the probation goes on. A batch
//!   is always processed wholly by one version. Each probation's end is a [`Verdict`] in the
//!   output.
//! - **One probation for all the workers of a pipeline.** Each worker swaps its own instance
//!   of the new version in, and they share one [`SharedProbation`]: the version passes once
//!   the workers together took n batches without failing, and is rolled back on every worker
//!   as soon as one rolls it back. A worker learns what another decided at its next batch (or
//!   its next swap), before running it.
//! - **Keys stay with their worker.** In a pipeline split by key among several workers, an
//!   aggregate's windows of a key live on the worker that owns the key. An event that reaches
//!   an aggregate with a key another worker owns (an earlier stage changed it) is a dead letter
//!   of the aggregate saying so, never folded into the wrong worker's windows.

use super::input::lane_of;
use super::stage::{DeadLetter, Kept, LateEvent, Scope, Stage, StageOutput, kept_batch};
use super::tap::PipelineTap;
use super::window::{WindowId, WindowState};
use crate::runtime::{PluginError, PluginKind};
use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use weir_format::{Batch, BatchBuilder, FormatError};

/// The events a chain output: a batch and which of its events are in. After filters this is
/// a selection of the batch they read, not a copy: sinks take selections as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// A batch the host built or verified; `None`: the batch the chain was given (every stage
    /// that ran was a filter).
    pub batch: Option<Vec<u8>>,
    /// The events of that batch that are in; `None`: every one.
    pub kept: Kept,
}

impl Output {
    /// Every event of a batch of its own.
    fn whole(batch: Vec<u8>) -> Output {
        Output {
            batch: Some(batch),
            kept: None,
        }
    }

    /// The batch the events are in, `input` being the batch the chain was given.
    pub fn base<'a>(&'a self, input: &'a [u8]) -> &'a [u8] {
        self.batch.as_deref().unwrap_or(input)
    }

    /// The number of events.
    pub fn len(&self, input: &[u8]) -> usize {
        match &self.kept {
            Some(kept) => kept.count(),
            None => count(self.base(input)),
        }
    }

    /// The events as a batch of their own: the bytes as they are when every event is in,
    /// else the kept events copied into a new batch.
    pub fn to_batch<'a>(&'a self, input: &'a [u8]) -> Cow<'a, [u8]> {
        let base = self.base(input);
        match &self.kept {
            None => Cow::Borrowed(base),
            Some(kept) => {
                // SAFETY: a chain's input was verified and its stages' outputs were built or
                // verified by the host.
                let batch = unsafe { Batch::trusted(base) };
                Cow::Owned(kept_batch(&mut BatchBuilder::new(), &batch, Some(kept)))
            }
        }
    }
}

/// What a chain made of one batch (or of the end of input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainOutput {
    /// The events that went through every stage.
    pub events: Output,
    /// Dead letters of every stage, in stage order.
    pub dead_letters: Vec<DeadLetter>,
    /// Late events of every aggregate stage, in stage order.
    pub late: Vec<LateEvent>,
    /// What each stage that ran did, in the order they ran.
    pub runs: Vec<StageRun>,
    /// Probations that ended while the chain ran (see [`Chain::swap`]).
    pub verdicts: Vec<Verdict>,
}

impl ChainOutput {
    fn new() -> Self {
        ChainOutput {
            events: Output::whole(Vec::new()),
            dead_letters: Vec::new(),
            late: Vec::new(),
            runs: Vec::new(),
            verdicts: Vec::new(),
        }
    }

    /// Notes what stage `stage` (running `version`) made of `events_in` events (a call
    /// started at `started`), `events_out` events: its run, dead letters and late events;
    /// returns its output.
    fn took<B>(
        &mut self,
        stage: usize,
        version: &str,
        (events_in, events_out): (usize, usize),
        out: StageOutput<B>,
        started: Instant,
    ) -> B {
        self.runs.push(StageRun {
            stage,
            version: version.to_owned(),
            events_in,
            events_out,
            failed: out.dead_letters.len(),
            late: out.late.len(),
            retried: out.retried,
            elapsed: started.elapsed(),
        });
        self.dead_letters.extend(out.dead_letters);
        self.late.extend(out.late);
        out.batch
    }
}

/// What one stage did with one batch (or, flushing, with the end of input): the counts the
/// server's metrics take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageRun {
    /// The stage's index in the chain.
    pub stage: usize,
    /// The plugin version whose output this is.
    pub version: String,
    /// Events handed to the stage (0 for a flush).
    pub events_in: usize,
    /// Events it output.
    pub events_out: usize,
    /// Events (or windows) it failed on: its dead letters.
    pub failed: usize,
    /// Events too late for any of its windows.
    pub late: usize,
    /// Why the call on the whole batch failed, when the batch was then retried event by event
    /// (see [`StageOutput::retried`]).
    pub retried: Option<String>,
    /// How long the call took.
    pub elapsed: Duration,
}

/// A stage of a chain could not run: which one, why, what the chain finished before, and the
/// batch the stage did not process (see the module docs for what to do with each).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stage `{name}`: {error}")]
pub struct ChainError {
    /// The failing stage's index in the chain.
    pub stage: usize,
    /// The failing stage's name.
    pub name: String,
    /// Why it failed (never about one event: those are dead letters).
    pub error: PluginError,
    /// What the chain finished before the failure: output that went through every stage
    /// (a valid batch, maybe empty), and the dead letters and late events of the stages that
    /// ran. Deliver it as if the call had succeeded.
    pub output: ChainOutput,
    /// The failing stage's input, which it did not process (a valid batch, maybe empty): give
    /// it to [`Chain::resume`] at [`ChainError::stage`].
    pub pending: Vec<u8>,
}

/// An ordered list of stages, each maybe with a new version on probation.
#[derive(Debug, Default)]
pub struct Chain {
    stages: Vec<Stage>,
    /// Per stage: the version it ran before a swap, kept while the new one is on probation.
    probation: Vec<Option<Probation>>,
    /// Per aggregate stage: the previous version, finishing the windows it opened, when the
    /// new one writes another state layout.
    draining: Vec<Option<Stage>>,
    /// Where the stages' outputs are offered to `weir tap` readers.
    tap: Option<Arc<PipelineTap>>,
    /// Which worker of how many runs it, in a pipeline split by key.
    lane: Option<(usize, usize)>,
    /// Its first aggregate stage (a swap never changes a stage's kind).
    first_aggregate: Option<usize>,
}

/// What [`Chain::swap`] does when an aggregate's new version declares another state layout
/// than the accumulators of the open windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateChange {
    /// Refuse the swap (the default): the new version would misread the accumulators.
    #[default]
    Refuse,
    /// Swap, and let the previous version finish the windows it opened: it folds their
    /// events and finishes them, the new version everything else.
    Drain,
}

/// A stage's previous version, kept while the new one is on probation.
#[derive(Debug)]
struct Probation {
    previous: Stage,
    /// Batches the new version must take without failing.
    batches: u64,
    /// What every worker of the pipeline shares of the probation.
    shared: Arc<SharedProbation>,
}

/// What the workers of one pipeline share of a new version's probation: the batches they took
/// with it together, and how it ended once one of them decided.
#[derive(Debug, Default)]
pub struct SharedProbation(Mutex<(u64, Option<Ending>)>);

/// How a shared probation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    Passed,
    RolledBack(String),
}

impl SharedProbation {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Option<Ending>)> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Rolls the version back on every worker (each at its next batch), unless it passed
    /// already: a deploy that one worker refused.
    pub fn roll_back(&self, why: String) {
        self.decide(Ending::RolledBack(why));
    }

    /// Batches taken so far, by every worker.
    fn taken(&self) -> u64 {
        self.lock().0
    }

    fn ending(&self) -> Option<Ending> {
        self.lock().1.clone()
    }

    /// Decides how it ended, unless a worker did already; how it ended.
    fn decide(&self, ending: Ending) -> Ending {
        self.lock().1.get_or_insert(ending).clone()
    }

    /// One more batch taken; how it ended once `batches` were.
    fn took(&self, batches: u64) -> Option<Ending> {
        let mut shared = self.lock();
        shared.0 += 1;
        if shared.0 >= batches {
            Some(shared.1.get_or_insert(Ending::Passed).clone())
        } else {
            shared.1.clone()
        }
    }
}

/// How a probation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The new version took its probation batches: the previous one is dropped.
    Passed {
        /// The stage's index.
        stage: usize,
        /// The new version, now serving for good.
        version: String,
        /// Batches it took on probation.
        batches: u64,
    },
    /// The previous version finished the last window it opened before a swap that changed the
    /// state layout: it is dropped.
    Drained {
        /// The stage's index.
        stage: usize,
        /// The previous version, gone.
        version: String,
    },
    /// The new version failed on events the previous one takes: the previous one serves again
    /// and its output of that batch is what went on.
    RolledBack {
        /// The stage's index.
        stage: usize,
        /// The version rolled back.
        version: String,
        /// The version serving again.
        restored: String,
        /// Why: the new version's error on that batch.
        error: String,
        /// Batches it had taken before.
        batches: u64,
        /// Whether another worker of the pipeline rolled it back and this one followed (the
        /// rollback is counted once, where it was decided).
        followed: bool,
    },
}

/// What changed of one version's window state since the last checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleChanges {
    /// The version's digest (64 hex digits).
    pub version: String,
    /// The layout id of its accumulators.
    pub layout: Option<String>,
    /// Its event time.
    pub max_event_ms: Option<i64>,
    /// The windows written (with their accumulator) or finished (`None`).
    pub windows: Vec<(WindowId, Option<Vec<u8>>)>,
}

/// What changed of one aggregate stage's window state since the last checkpoint
/// ([`Chain::take_state_changes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChanges {
    /// The stage's index.
    pub stage: usize,
    /// The stage's name.
    pub name: String,
    /// The version serving.
    pub current: RoleChanges,
    /// The previous version, finishing the windows it opened before a layout change.
    pub draining: Option<RoleChanges>,
    /// The worker whose state this is, of how many: `(0, 1)` for a pipeline on one worker.
    /// Each worker's event time is its own (how far it got); with other workers writing the
    /// stage's state too, a worker without a previous version says nothing of theirs.
    pub lane: (usize, usize),
}

impl StateChanges {
    /// Whether other workers write the stage's state too (a pipeline split by key).
    pub fn shared(&self) -> bool {
        self.lane.1 > 1
    }
}

/// Why [`Chain::swap`] refused a replacement, and the replacement back.
#[derive(Debug)]
pub struct SwapRefused {
    /// Why.
    pub message: String,
    /// The replacement, unused.
    pub replacement: Stage,
}

/// Where a run through stages stopped: the stage, the error, its unprocessed input.
struct Failure {
    stage: usize,
    error: PluginError,
    pending: Vec<u8>,
}

impl Chain {
    /// A chain of these stages, first to last.
    pub fn new(stages: Vec<Stage>) -> Self {
        let probation = stages.iter().map(|_| None).collect();
        let draining = stages.iter().map(|_| None).collect();
        let first_aggregate = stages
            .iter()
            .position(|s| s.plugin().kind() == PluginKind::Aggregate);
        Chain {
            stages,
            probation,
            draining,
            tap: None,
            lane: None,
            first_aggregate,
        }
    }

    /// Its first aggregate stage, if it has one.
    pub fn first_aggregate(&self) -> Option<usize> {
        self.first_aggregate
    }

    /// The chain runs on worker `lane` of `lanes` of a pipeline split by key: an aggregate
    /// takes only events whose key that worker owns.
    pub fn set_lane(&mut self, lane: usize, lanes: usize) {
        self.lane = (lanes > 1).then_some((lane, lanes));
    }

    /// Offers each stage's output to the readers of `tap` (`weir tap PIPELINE/STAGE`).
    pub fn set_tap(&mut self, tap: Arc<PipelineTap>) {
        self.tap = Some(tap);
    }

    /// Replaces stage `index` with `replacement`, a version of the same kind initialized with
    /// the stage's config; an aggregate's window state moves to it. With `probation` > 0 the
    /// previous version is kept until the new one has taken that many batches without failing
    /// (see the module docs) and `Ok(None)` is returned; with 0 the previous version is
    /// returned at once, for the caller to drop.
    ///
    /// An aggregate's new version that declares another state layout than the open windows'
    /// accumulators is refused, or, with [`StateChange::Drain`], swapped in beside the previous
    /// one, which finishes the windows it opened. Either way a version with another layout is
    /// not on probation: the previous version could not take over windows it cannot read.
    ///
    /// The probation is `shared` with the pipeline's other workers (see the module docs); a
    /// probation another worker already ended is ended here first.
    pub fn swap(
        &mut self,
        index: usize,
        mut replacement: Stage,
        probation: u64,
        shared: &Arc<SharedProbation>,
        on_change: StateChange,
    ) -> Result<Option<Stage>, Box<SwapRefused>> {
        // Split by key, a batch reaches every worker as a part of its own: a probation of n
        // batches is n parts for each worker, taken together.
        let probation = probation.saturating_mul(self.lane.map_or(1, |(_, n)| n as u64));
        if let (Some(stage), Some(slot)) =
            (self.stages.get_mut(index), self.probation.get_mut(index))
            && let Some(ending) = slot.as_ref().and_then(|p| p.shared.ending())
        {
            end_probation(stage, slot, index, (ending, true), &mut ChainOutput::new());
        }
        let refuse = |message: String, replacement: Stage| {
            Err(Box::new(SwapRefused {
                message,
                replacement,
            }))
        };
        let (Some(current), Some(slot), Some(draining)) = (
            self.stages.get_mut(index),
            self.probation.get_mut(index),
            self.draining.get_mut(index),
        ) else {
            return refuse(format!("the chain has no stage {index}"), replacement);
        };
        if current.plugin().kind() != replacement.plugin().kind() {
            let message = format!(
                "stage `{}` takes {} plugins (world `weir:plugin/{}@0.1.0`); plugin `{}` {} implements world `weir:plugin/{}@0.1.0`",
                current.name(),
                current.plugin().kind(),
                current.plugin().kind().world(),
                replacement.plugin().name(),
                replacement.plugin().version(),
                replacement.plugin().kind().world()
            );
            return refuse(message, replacement);
        }
        if let Some(p) = slot {
            let message = format!(
                "stage `{}`: version {} is on probation ({} of {} batches)",
                current.name(),
                current.plugin().version(),
                p.shared.taken(),
                p.batches
            );
            return refuse(message, replacement);
        }
        if let Some(old) = draining {
            let message = format!(
                "stage `{}`: version {} still finishes the {} windows it opened before the state layout changed",
                current.name(),
                old.plugin().version(),
                old.window_state().map_or(0, WindowState::open_windows)
            );
            return refuse(message, replacement);
        }
        let open = current.window_state().map_or(0, WindowState::open_windows);
        if open > 0 && current.layout() != replacement.layout() {
            let (old, new) = (
                current.layout().unwrap_or_default().to_owned(),
                replacement.layout().unwrap_or_default().to_owned(),
            );
            if on_change == StateChange::Refuse {
                let message = format!(
                    "stage `{}`: plugin `{}` {} declares state layout `{new}`, but the {open} open windows hold accumulators of layout `{old}` (written by {}): a version never reads another layout's accumulators; deploy it with `--state drain` to let {} finish the windows it opened, or keep the layout",
                    current.name(),
                    replacement.plugin().name(),
                    replacement.plugin().version(),
                    current.plugin().version(),
                    current.plugin().version(),
                );
                return refuse(message, replacement);
            }
            if let Some(state) = current.window_state() {
                replacement.set_window_state(WindowState::continuing(state, Some(new)));
            }
            *draining = Some(std::mem::replace(current, replacement));
            return Ok(None);
        }
        // Another layout with no window open: the new version starts the state afresh, and the
        // previous one could never read what it writes, so no probation (nothing to fall back
        // on).
        let probation = if current.layout() == replacement.layout() {
            probation
        } else {
            0
        };
        if let Some(state) = current.take_window_state() {
            replacement.set_window_state(state);
        }
        let previous = std::mem::replace(current, replacement);
        if probation == 0 {
            return Ok(Some(previous));
        }
        *slot = Some(Probation {
            previous,
            batches: probation,
            shared: shared.clone(),
        });
        Ok(None)
    }

    /// From now on, every aggregate stage's window state remembers what changes, for
    /// [`Chain::take_state_changes`] (a checkpointed pipeline).
    pub fn track_changes(&mut self) {
        let states = self
            .stages
            .iter_mut()
            .chain(self.draining.iter_mut().flatten())
            .chain(self.probation.iter_mut().flatten().map(|p| &mut p.previous));
        for stage in states {
            stage.track_changes();
        }
    }

    /// What changed of each aggregate stage's window state since the last call: the windows
    /// written and finished, the event time, and which version holds them.
    pub fn take_state_changes(&mut self) -> Vec<StateChanges> {
        let mut changes = Vec::new();
        for (index, (stage, draining)) in self
            .stages
            .iter_mut()
            .zip(self.draining.iter_mut())
            .enumerate()
        {
            let Some(current) = role_changes(stage) else {
                continue;
            };
            changes.push(StateChanges {
                stage: index,
                name: stage.name().to_owned(),
                current,
                draining: draining.as_mut().and_then(role_changes),
                lane: self.lane.unwrap_or((0, 1)),
            });
        }
        changes
    }

    /// Puts back, at a start from a checkpoint, the previous version of stage `index` that was
    /// finishing the windows it opened before a layout change (its window state restored).
    pub fn restore_draining(&mut self, index: usize, old: Stage) {
        if let Some(slot) = self.draining.get_mut(index) {
            *slot = Some(old);
        }
    }

    /// The windows stage `index`'s previous version still finishes after a state layout change
    /// (0: none).
    pub fn draining(&self, index: usize) -> usize {
        self.draining
            .get(index)
            .and_then(Option::as_ref)
            .and_then(Stage::window_state)
            .map_or(0, WindowState::open_windows)
    }

    /// Stage `index`'s probation, if its version is on one: (batches taken, batches to take).
    pub fn probation(&self, index: usize) -> Option<(u64, u64)> {
        self.probation
            .get(index)?
            .as_ref()
            .map(|p| (p.shared.taken(), p.batches))
    }

    /// The stages, first to last.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// The stages, mutably (window state, raw calls).
    pub fn stages_mut(&mut self) -> &mut [Stage] {
        &mut self.stages
    }

    /// Whether the chain has no stages (its output is its input).
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// Runs a batch through every stage.
    pub fn process(&mut self, batch: &[u8]) -> Result<ChainOutput, Box<ChainError>> {
        match Batch::verify(batch) {
            Ok(input) => self.process_batch(&input),
            // The first stage names the plugin in its error about the input.
            Err(_) => self.resume(0, batch),
        }
    }

    /// Runs a verified batch through every stage (the caller verified it once, at the edge).
    pub fn process_batch(&mut self, input: &Batch<'_>) -> Result<ChainOutput, Box<ChainError>> {
        self.run_from(0, First::Verified(input), None)
    }

    /// [`Chain::process_batch`] for a worker's part of a batch split by key: the first
    /// aggregate's event time reaches `batch_ms`, the latest of the whole batch, once it folded
    /// the part.
    pub fn process_part(
        &mut self,
        input: &Batch<'_>,
        batch_ms: Option<i64>,
    ) -> Result<ChainOutput, Box<ChainError>> {
        self.run_from(0, First::Verified(input), batch_ms)
    }

    /// Runs a batch through the stages from `stage` on: how a [`ChainError::pending`] batch
    /// is taken up again. At `stages().len()` the batch is the chain's output as it is.
    pub fn resume(&mut self, stage: usize, batch: &[u8]) -> Result<ChainOutput, Box<ChainError>> {
        self.run_from(stage, First::Bytes(batch), None)
    }

    fn run_from(
        &mut self,
        stage: usize,
        first: First<'_, '_>,
        batch_ms: Option<i64>,
    ) -> Result<ChainOutput, Box<ChainError>> {
        let first_stage = stage.min(self.stages.len());
        let mut output = ChainOutput::new();
        let slots = Slots {
            stages: &mut self.stages[first_stage..],
            probation: &mut self.probation[first_stage..],
            draining: &mut self.draining[first_stage..],
            tap: self.tap.as_deref().filter(|t| t.is_read()),
            lane: self.lane,
            batch_ms: self.first_aggregate.map(|index| (index, batch_ms)),
        };
        match run(slots, first_stage, first, &mut output) {
            Ok(events) => {
                output.events = events;
                Ok(output)
            }
            Err(failure) => {
                output.events = Output::whole(BatchBuilder::new().finish());
                Err(self.failed(*failure, output))
            }
        }
    }

    /// End of input: finishes every open window, stage by stage, and runs what that emits
    /// through the rest of the chain.
    pub fn flush(&mut self) -> Result<ChainOutput, Box<ChainError>> {
        let mut output = ChainOutput::new();
        let mut merged = BatchBuilder::new();
        for i in 0..self.stages.len() {
            let (stage, rest) = self.stages[i..].split_at_mut(1);
            let (probation, rest_probation) = self.probation[i..].split_at_mut(1);
            let (draining, rest_draining) = self.draining[i..].split_at_mut(1);
            let started = Instant::now();
            let flushed = match draining[0].as_mut() {
                Some(old) => drained_flush(&mut stage[0], old),
                None => call(
                    &mut stage[0],
                    &mut probation[0],
                    i,
                    0,
                    &mut output,
                    Stage::flush_strict,
                    Stage::flush,
                ),
            };
            if flushed.is_ok()
                && let Some(old) = draining[0].take()
            {
                output.verdicts.push(Verdict::Drained {
                    stage: i,
                    version: old.plugin().version().to_owned(),
                });
            }
            let failure = match flushed {
                Ok(flushed) => {
                    let version = stage[0].plugin().version().to_owned();
                    let events_out = count(&flushed.batch);
                    let flushed = output.took(i, &version, (0, events_out), flushed, started);
                    if let Some(tap) = &self.tap {
                        tap.offer_stage(stage[0].name(), &flushed);
                    }
                    let rest = Slots {
                        stages: rest,
                        probation: rest_probation,
                        draining: rest_draining,
                        tap: self.tap.as_deref().filter(|t| t.is_read()),
                        lane: self.lane,
                        batch_ms: None,
                    };
                    match run(rest, i + 1, First::Bytes(&flushed), &mut output) {
                        Ok(out) => match append(&mut merged, &out.to_batch(&flushed)) {
                            Ok(()) => continue,
                            Err(e) => self.bad_flush_output(e),
                        },
                        Err(failure) => *failure,
                    }
                }
                Err(error) => Failure {
                    stage: i,
                    error,
                    pending: BatchBuilder::new().finish(),
                },
            };
            output.events = Output::whole(merged.finish());
            return Err(self.failed(failure, output));
        }
        output.events = Output::whole(merged.finish());
        Ok(output)
    }

    fn failed(&self, failure: Failure, output: ChainOutput) -> Box<ChainError> {
        let name = self
            .stages
            .get(failure.stage)
            .map(|s| s.name().to_owned())
            .unwrap_or_default();
        Box::new(ChainError {
            stage: failure.stage,
            name,
            error: failure.error,
            output,
            pending: failure.pending,
        })
    }

    /// A flushed batch that does not verify (it came out of the last stage, verified or built
    /// by the host, so this is a bug): an error naming the last stage, not a silent skip.
    fn bad_flush_output(&self, e: FormatError) -> Failure {
        let stage = self.stages.len().saturating_sub(1);
        let (plugin, version) = self
            .stages
            .get(stage)
            .map(|s| {
                (
                    s.plugin().name().to_owned(),
                    s.plugin().version().to_owned(),
                )
            })
            .unwrap_or_default();
        Failure {
            stage,
            error: PluginError::BadOutput {
                plugin,
                version,
                call: "flush",
                message: format!("the stage's output is not a weir batch: {e}"),
            },
            pending: BatchBuilder::new().finish(),
        }
    }
}

/// The input of the first stage a run goes through.
enum First<'a, 'b> {
    /// Verified by the caller.
    Verified(&'a Batch<'b>),
    /// Verified here (a stage's error names a batch that does not verify).
    Bytes(&'a [u8]),
}

/// Runs `first` through `stages` (the first of which is stage `offset` of the chain; each with
/// its probation), collecting dead letters, late events, runs and verdicts into `output`. On
/// failure, returns the failing stage's index in the chain and its input.
///
/// A filter's output is what it kept of its input, as a selection: the next filter reads the
/// same batch with that selection, and the kept events are copied into a batch of their own
/// only when a stage of another kind comes next (or for a tap reader, or a failure's pending
/// input). So a chain that only filters hands its input on with a selection, never a copy.
fn run(
    slots: Slots<'_>,
    offset: usize,
    first: First<'_, '_>,
    output: &mut ChainOutput,
) -> Result<Output, Box<Failure>> {
    let Slots {
        stages,
        probation,
        draining,
        tap,
        lane,
        batch_ms,
    } = slots;
    let first_bytes = match &first {
        First::Verified(batch) => batch.bytes(),
        First::Bytes(bytes) => bytes,
    };
    let mut current: Option<Vec<u8>> = None;
    let mut kept: Kept = None;
    let slots = stages
        .iter_mut()
        .zip(probation.iter_mut())
        .zip(draining.iter_mut());
    for (k, ((stage, probation), draining)) in slots.enumerate() {
        let started = Instant::now();
        let index = offset + k;
        let filter = stage.plugin().kind() == PluginKind::Filter && draining.is_none();
        if !filter && kept.is_some() {
            let selection = Output {
                batch: current.take(),
                kept: kept.take(),
            };
            current = Some(selection.to_batch(first_bytes).into_owned());
        }
        if let (Some(lane), Some(previous)) = (lane, current.as_mut())
            && stage.plugin().kind() == PluginKind::Aggregate
        {
            foreign_keys(stage, lane, previous, output);
        }
        // Kept across a retry of the batch (which has no time of its own to give).
        if let Some((_, time @ Some(_))) = batch_ms.filter(|(first, _)| *first == index) {
            for state in [Some(&mut *stage), draining.as_mut()]
                .into_iter()
                .flatten()
                .filter_map(Stage::window_state_mut)
            {
                state.set_batch_time(time);
            }
        }
        let verified;
        let input = match (current.as_deref(), &first) {
            // SAFETY: a stage's output batch is one the host built or verified
            // (`Stage::process_batch`), so the next stage reads it without verifying it again.
            (Some(previous), _) => unsafe { Batch::trusted(previous) },
            (None, First::Verified(input)) => **input,
            (None, First::Bytes(bytes)) => match Batch::verify(bytes) {
                Ok(input) => {
                    verified = input;
                    verified
                }
                Err(e) => {
                    return Err(Box::new(Failure {
                        stage: index,
                        error: PluginError::BadInput {
                            plugin: stage.plugin().name().to_owned(),
                            version: stage.plugin().version().to_owned(),
                            message: e.to_string(),
                        },
                        pending: bytes.to_vec(),
                    }));
                }
            },
        };
        let events_in = kept.as_ref().map_or(input.len(), |k| k.count());
        let version = |stage: &Stage| stage.plugin().version().to_owned();
        if filter {
            let result = call(
                stage,
                probation,
                index,
                events_in,
                output,
                |s| s.filter_kept_strict(&input, kept.as_ref()),
                |s| s.filter_kept(&input, kept.as_ref()),
            );
            match result {
                Ok(out) => {
                    let events_out = out.batch.as_ref().map_or(input.len(), |k| k.count());
                    let counts = (events_in, events_out);
                    kept = output.took(index, &version(stage), counts, out, started);
                    if let Some(tap) = tap {
                        let batch = kept_batch(&mut BatchBuilder::new(), &input, kept.as_ref());
                        tap.offer_stage(stage.name(), &batch);
                    }
                }
                Err(error) => {
                    return Err(Box::new(Failure {
                        stage: index,
                        error,
                        pending: kept_batch(&mut BatchBuilder::new(), &input, kept.as_ref()),
                    }));
                }
            }
            continue;
        }
        let result = match draining.as_mut() {
            Some(old) => drained(stage, old, &input),
            None => call(
                stage,
                probation,
                index,
                events_in,
                output,
                |s| s.process_batch_strict(&input),
                |s| s.process_batch(&input),
            ),
        };
        if result.is_ok()
            && let Some(old) =
                draining.take_if(|old| old.window_state().is_none_or(|s| s.open_windows() == 0))
        {
            output.verdicts.push(Verdict::Drained {
                stage: index,
                version: old.plugin().version().to_owned(),
            });
        }
        match result {
            Ok(out) => {
                let counts = (events_in, count(&out.batch));
                let out = output.took(index, &version(stage), counts, out, started);
                if let Some(tap) = tap {
                    tap.offer_stage(stage.name(), &out);
                }
                current = Some(out);
            }
            Err(error) => {
                return Err(Box::new(Failure {
                    stage: index,
                    error,
                    pending: current.unwrap_or_else(|| first_bytes.to_vec()),
                }));
            }
        }
    }
    Ok(Output {
        batch: current,
        kept,
    })
}

/// Takes the events whose key another worker owns out of `batch`, an aggregate's input made by
/// earlier stages on worker `lane.0` of `lane.1`, as dead letters of the aggregate: their
/// windows live on that other worker.
fn foreign_keys(
    stage: &Stage,
    lane: (usize, usize),
    batch: &mut Vec<u8>,
    output: &mut ChainOutput,
) {
    let (own, lanes) = lane;
    // SAFETY: a stage's output batch is one the host built or verified.
    let events = unsafe { Batch::trusted(batch) };
    if events.iter().all(|e| lane_of(e.key(), lanes) == own) {
        return;
    }
    let mut kept = BatchBuilder::new();
    for (index, event) in events.iter().enumerate() {
        let owner = lane_of(event.key(), lanes);
        if owner == own {
            kept.push_ref(&event, event.source());
            continue;
        }
        output.dead_letters.push(DeadLetter {
            event: event.to_event(),
            index,
            window: None,
            error: format!(
                "an earlier stage changed its key to `{}`, whose windows live on worker {owner} of {lanes}, not this one ({own}): with `workers` above 1 the stages before an aggregate must keep each event's key; set `workers = 1` for this pipeline",
                String::from_utf8_lossy(event.key().unwrap_or_default())
            ),
            plugin: stage.plugin().name().to_owned(),
            version: stage.plugin().version().to_owned(),
            stage: stage.name().to_owned(),
        });
    }
    *batch = kept.finish();
}

/// A chain's per-stage slots from some stage on.
struct Slots<'a> {
    stages: &'a mut [Stage],
    probation: &'a mut [Option<Probation>],
    draining: &'a mut [Option<Stage>],
    /// Where each stage's output is offered to `weir tap` readers.
    tap: Option<&'a PipelineTap>,
    /// Which worker of how many runs the chain, in a pipeline split by key.
    lane: Option<(usize, usize)>,
    /// The first aggregate stage, and the latest event time of the whole batch of which the
    /// input is a worker's part.
    batch_ms: Option<(usize, Option<i64>)>,
}

/// What changed of `stage`'s window state since the last call; `None` for a stage that keeps
/// none.
fn role_changes(stage: &mut Stage) -> Option<RoleChanges> {
    let version = stage.plugin().digest().hex();
    let state = stage.window_state_mut()?;
    Some(RoleChanges {
        version,
        layout: state.layout().map(str::to_owned),
        max_event_ms: state.max_event_ms(),
        windows: state.take_changes(),
    })
}

/// One batch through a stage whose previous version finishes the windows it opened: it folds
/// their events, the new version every other window; all or nothing for both.
fn drained(
    stage: &mut Stage,
    old: &mut Stage,
    input: &Batch<'_>,
) -> Result<StageOutput, PluginError> {
    // The windows the previous version holds before this batch are its own, also those it
    // finishes during the batch.
    let Some(before) = old.window_state().cloned() else {
        return stage.process_batch(input);
    };
    let finishing = old.process_batch_in(input, Scope::Opened)?;
    match stage.process_batch_in(input, Scope::Except(&before)) {
        Ok(new) => Ok(joined(finishing, new)),
        Err(e) => {
            old.set_window_state(before);
            Err(e)
        }
    }
}

/// End of input for a stage whose previous version still finishes windows: both flush.
fn drained_flush(stage: &mut Stage, old: &mut Stage) -> Result<StageOutput, PluginError> {
    let before = old.window_state().cloned();
    let finishing = old.flush()?;
    match stage.flush() {
        Ok(new) => Ok(joined(finishing, new)),
        Err(e) => {
            if let Some(state) = before {
                old.set_window_state(state);
            }
            Err(e)
        }
    }
}

/// The outputs of the two versions of a draining stage as one: the previous version's first.
fn joined(first: StageOutput, second: StageOutput) -> StageOutput {
    let mut batch = BatchBuilder::new();
    for part in [&first.batch, &second.batch] {
        // SAFETY: a stage's output batch is one the host built or verified.
        for event in unsafe { Batch::trusted(part) }.iter() {
            batch.push_ref(&event, event.source());
        }
    }
    let mut dead_letters = first.dead_letters;
    dead_letters.extend(second.dead_letters);
    let mut late = first.late;
    late.extend(second.late);
    StageOutput {
        batch: batch.finish(),
        dead_letters,
        late,
        retried: first.retried.or(second.retried),
    }
}

/// Runs one call of stage `index` on `events` events (0 for a flush): as it is, or, when its
/// version is on probation, under the probation rule (the module docs). `strict` makes the
/// call without isolating events (an event failure is an `Err`), `isolating` with. Ends the
/// probation when it passes (only calls with events count) or fails (the verdict goes to
/// `output`).
#[allow(clippy::too_many_arguments)]
fn call<B>(
    stage: &mut Stage,
    probation: &mut Option<Probation>,
    index: usize,
    events: usize,
    output: &mut ChainOutput,
    strict: impl Fn(&mut Stage) -> Result<StageOutput<B>, PluginError>,
    isolating: impl Fn(&mut Stage) -> Result<StageOutput<B>, PluginError>,
) -> Result<StageOutput<B>, PluginError> {
    // Another worker ended the probation: so does this one, before the batch.
    if let Some(ending) = probation.as_ref().and_then(|p| p.shared.ending()) {
        end_probation(stage, probation, index, (ending, true), output);
    }
    let Some(p) = probation.as_mut() else {
        return isolating(stage);
    };
    let before = stage.window_state().cloned();
    // `Some(why)` when the new version is rolled back; the result is then the previous one's.
    let (result, rolled_back) = match strict(stage) {
        Ok(out) => (Ok(out), None),
        Err(new_error) => {
            // The new version changed nothing (a call is all or nothing): the previous one
            // takes the same input from the same state.
            if let Some(state) = stage.take_window_state() {
                p.previous.set_window_state(state);
            }
            match isolating(&mut p.previous) {
                Ok(old) if old.dead_letters.is_empty() => (Ok(old), Some(new_error.to_string())),
                Ok(old) => {
                    // The input holds events the previous version fails on too: the new one is
                    // to blame only if it fails on others.
                    let after_old = p.previous.take_window_state();
                    if let Some(state) = before {
                        stage.set_window_state(state);
                    }
                    let poison = failed(&old);
                    match isolating(stage) {
                        Ok(new) if failed(&new).is_subset(&poison) => (Ok(new), None),
                        new => {
                            // Back to the previous version's state after the batch.
                            stage.take_window_state();
                            if let Some(state) = after_old {
                                p.previous.set_window_state(state);
                            }
                            let why = match new {
                                Ok(new) => new
                                    .dead_letters
                                    .into_iter()
                                    .find(|d| !poison.contains(&(d.window.is_some(), d.index)))
                                    .map_or_else(|| new_error.to_string(), |d| d.error),
                                Err(e) => e.to_string(),
                            };
                            (Ok(old), Some(why))
                        }
                    }
                }
                Err(_) => {
                    // Neither version can run: a stage that cannot run, not the new version's
                    // fault. The state goes back to the new version, unchanged.
                    if let Some(state) = p.previous.take_window_state() {
                        stage.set_window_state(state);
                    }
                    (Err(new_error), None)
                }
            }
        }
    };
    let ending = match rolled_back {
        // The previous version's output of the batch stands either way.
        Some(error) => match p.shared.decide(Ending::RolledBack(error)) {
            rolled_back @ Ending::RolledBack(_) => Some(rolled_back),
            // Another worker passed the version just now: it stays here too, with the window
            // state the previous version left.
            Ending::Passed => {
                if let Some(state) = p.previous.take_window_state() {
                    stage.set_window_state(state);
                }
                Some(Ending::Passed)
            }
        },
        // A batch counts when it gave the new version events to fail on.
        None if result.is_ok() && events > 0 => p.shared.took(p.batches),
        None => None,
    };
    if let Some(ending) = ending {
        end_probation(stage, probation, index, (ending, false), output);
    }
    result
}

/// Ends stage `index`'s probation as `ending` says: the new version stays, or the previous one
/// serves again (with the window state); the verdict goes to `output`. `followed`: another
/// worker decided it.
fn end_probation(
    stage: &mut Stage,
    probation: &mut Option<Probation>,
    index: usize,
    (ending, followed): (Ending, bool),
    output: &mut ChainOutput,
) {
    let Some(mut p) = probation.take() else {
        return;
    };
    let batches = p.shared.taken();
    match ending {
        Ending::Passed => output.verdicts.push(Verdict::Passed {
            stage: index,
            version: stage.plugin().version().to_owned(),
            batches,
        }),
        Ending::RolledBack(error) => {
            if let Some(state) = stage.take_window_state() {
                p.previous.set_window_state(state);
            }
            let failed_version = std::mem::replace(stage, p.previous);
            output.verdicts.push(Verdict::RolledBack {
                stage: index,
                version: failed_version.plugin().version().to_owned(),
                restored: stage.plugin().version().to_owned(),
                error,
                batches,
                followed,
            });
        }
    }
}

/// What a stage failed on in one call: (a window rather than an event, index).
fn failed<B>(out: &StageOutput<B>) -> std::collections::HashSet<(bool, usize)> {
    out.dead_letters
        .iter()
        .map(|d| (d.window.is_some(), d.index))
        .collect()
}

/// The events in a batch a stage output (verified or built by the host).
fn count(batch: &[u8]) -> usize {
    // SAFETY: a stage's output batch is one the host built or verified (`Stage::process_batch`,
    // `Stage::flush`).
    unsafe { Batch::trusted(batch) }.len()
}

/// Appends the events of `batch` to `merged` (sources kept); a batch that does not verify is
/// an error and nothing of it is appended.
pub(crate) fn append(merged: &mut BatchBuilder, batch: &[u8]) -> Result<(), FormatError> {
    let batch = Batch::verify(batch)?;
    for event in batch.iter() {
        merged.push_ref(&event, event.source());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::WindowConfig;
    use crate::runtime::{Runtime, RuntimeConfig, StageConfig};
    use std::time::Duration;
    use weir_format::{Event, encode};

    mod plugins {
        include!(concat!(env!("OUT_DIR"), "/plugin_paths.rs"));
    }

    fn runtime() -> Runtime {
        Runtime::new(RuntimeConfig {
            max_instances: 8,
            ..RuntimeConfig::default()
        })
        .expect("runtime")
    }

    fn stage(runtime: &Runtime, path: &str) -> Stage {
        let plugin = runtime.load_file(path).expect("plugin");
        let window = (plugin.kind() == crate::runtime::PluginKind::Aggregate)
            .then(|| WindowConfig::tumbling(Duration::from_secs(60)));
        Stage::new(&plugin, StageConfig::new("s"), window).expect("stage")
    }

    fn values(batch: &[u8]) -> Vec<String> {
        Batch::verify(batch)
            .expect("a batch")
            .iter()
            .map(|e| String::from_utf8_lossy(e.value()).into_owned())
            .collect()
    }

    /// The output of a chain whose last stage is not a filter: a batch of its own.
    fn bytes(output: &ChainOutput) -> &[u8] {
        output.events.batch.as_deref().expect("a batch of its own")
    }

    fn batch(values: &[&str]) -> Vec<u8> {
        let events: Vec<Event> = values
            .iter()
            .enumerate()
            .map(|(i, v)| Event::new(*v, 1_000 + i as i64).with_key("k"))
            .collect();
        encode(&events)
    }

    /// Events keyed `k0`, `k1`, … with these values: even-key keeps those at even positions.
    fn keyed(values: &[&str]) -> Vec<u8> {
        let events: Vec<Event> = values
            .iter()
            .enumerate()
            .map(|(i, v)| Event::new(*v, i as i64).with_key(format!("k{i}")))
            .collect();
        encode(&events)
    }

    /// What each stage run counted: (events in, out, failed).
    fn counts(out: &ChainOutput) -> Vec<(usize, usize, usize)> {
        out.runs
            .iter()
            .map(|r| (r.events_in, r.events_out, r.failed))
            .collect()
    }

    #[test]
    fn filters_hand_on_a_selection_of_the_input_and_a_later_filter_answers_for_it_alone() {
        let runtime = runtime();
        let mut chain = Chain::new(vec![
            stage(&runtime, plugins::EVEN_KEY),
            stage(&runtime, plugins::PANIC_ON_MARK),
        ]);
        // k1's poison was dropped by even-key: the guard's call on the whole batch traps on it,
        // the kept events alone pass, and nothing is a dead letter.
        let input = keyed(&["a", "poison", "c", "d"]);
        let out = chain.process(&input).expect("runs");
        assert_eq!(out.events.batch, None, "no event copied");
        let kept = out.events.kept.as_ref().expect("a selection");
        assert_eq!(kept.kept().collect::<Vec<_>>(), [0, 2]);
        assert_eq!(values(&out.events.to_batch(&input)), ["a", "c"]);
        assert!(out.dead_letters.is_empty(), "{:?}", out.dead_letters);
        assert_eq!(counts(&out), [(4, 2, 0), (2, 2, 0)]);

        // k4's poison is kept by even-key: a dead letter, indexed among the events the guard
        // was given (a, c, poison), the same for a guard called on the selected events alone
        // since the first batch (this chain's) as for one that has not been (a new chain's).
        for mut chain in [
            chain,
            Chain::new(vec![
                stage(&runtime, plugins::EVEN_KEY),
                stage(&runtime, plugins::PANIC_ON_MARK),
            ]),
        ] {
            let input = keyed(&["a", "poison", "c", "d", "poison", "f"]);
            let out = chain.process(&input).expect("runs");
            assert_eq!(values(&out.events.to_batch(&input)), ["a", "c"]);
            let dead: Vec<(usize, &str, &str)> = out
                .dead_letters
                .iter()
                .map(|d| (d.index, d.stage.as_str(), d.error.as_str()))
                .collect();
            assert_eq!(dead.len(), 1, "{dead:?}");
            assert_eq!((dead[0].0, dead[0].1), (2, "s"));
            assert!(dead[0].2.contains("trap"), "{}", dead[0].2);
            assert_eq!(counts(&out), [(6, 3, 0), (3, 2, 1)]);
        }
    }

    #[test]
    fn a_filter_on_probation_is_judged_on_the_events_an_earlier_filter_kept() {
        let runtime = runtime();
        let mut chain = Chain::new(vec![
            stage(&runtime, plugins::EVEN_KEY),
            stage(&runtime, plugins::PANIC_ON_MARK),
        ]);
        let new = stage(&runtime, plugins::PANIC_ON_MARK);
        let version = new.plugin().version().to_owned();
        assert!(
            chain
                .swap(1, new, 2, &Arc::default(), StateChange::Refuse)
                .expect("swapped")
                .is_none()
        );
        // Each batch's poison is dropped by even-key: the new version's strict call on the
        // whole batch traps on it, and the kept events alone pass.
        let mut verdicts = Vec::new();
        for _ in 0..2 {
            let input = keyed(&["a", "poison", "c", "d"]);
            let out = chain.process(&input).expect("runs");
            assert_eq!(values(&out.events.to_batch(&input)), ["a", "c"]);
            assert!(out.dead_letters.is_empty(), "{:?}", out.dead_letters);
            verdicts.extend(out.verdicts);
        }
        assert_eq!(
            verdicts,
            [Verdict::Passed {
                stage: 1,
                version,
                batches: 2
            }]
        );
    }

    #[test]
    fn a_stage_of_another_kind_gets_only_the_kept_events_as_a_batch() {
        let runtime = runtime();
        let mut chain = Chain::new(vec![
            stage(&runtime, plugins::EVEN_KEY),
            stage(&runtime, plugins::TALLY_A),
        ]);
        let out = chain
            .process(&keyed(&["a", "b", "c", "d", "e"]))
            .expect("runs");
        assert_eq!(counts(&out), [(5, 3, 0), (3, 0, 0)]);
        let flushed = chain.flush().expect("flush");
        let mut keys: Vec<String> = Batch::verify(bytes(&flushed))
            .expect("a batch")
            .iter()
            .map(|e| String::from_utf8_lossy(e.key().unwrap_or_default()).into_owned())
            .collect();
        keys.sort();
        assert_eq!(keys, ["k0", "k2", "k4"]);
    }

    #[test]
    fn a_version_that_takes_its_probation_batches_stays_and_the_previous_one_goes() {
        let runtime = runtime();
        let mut chain = Chain::new(vec![stage(&runtime, plugins::IDENTITY)]);
        let new = stage(&runtime, plugins::PANIC_ON_MARK);
        let version = new.plugin().version().to_owned();
        assert!(
            chain
                .swap(0, new, 2, &Arc::default(), StateChange::Refuse)
                .expect("swapped")
                .is_none()
        );
        assert_eq!(chain.probation(0), Some((0, 2)));
        let input = batch(&["a", "b"]);
        let first = chain.process(&input).expect("first");
        assert_eq!(
            (values(&first.events.to_batch(&input)), first.verdicts),
            (vec!["a".into(), "b".into()], vec![])
        );
        assert_eq!(chain.probation(0), Some((1, 2)));
        let second = chain.process(&batch(&["c"])).expect("second");
        assert_eq!(
            second.verdicts,
            [Verdict::Passed {
                stage: 0,
                version: version.clone(),
                batches: 2
            }]
        );
        assert_eq!(chain.probation(0), None);
        assert_eq!(chain.stages()[0].plugin().version(), version);
        assert_eq!(second.runs[0].version, version);
    }

    #[test]
    fn only_batches_with_events_count_for_a_probation() {
        let runtime = runtime();
        let mut chain = Chain::new(vec![stage(&runtime, plugins::IDENTITY)]);
        assert!(
            chain
                .swap(
                    0,
                    stage(&runtime, plugins::DROP_BOTS),
                    1,
                    &Arc::default(),
                    StateChange::Refuse
                )
                .expect("swapped")
                .is_none()
        );
        chain.process(&encode(&[])).expect("an empty batch");
        chain.flush().expect("a flush");
        assert_eq!(chain.probation(0), Some((0, 1)), "nothing to fail on yet");
        let out = chain.process(&batch(&["a"])).expect("a batch");
        assert!(matches!(
            &out.verdicts[..],
            [Verdict::Passed { batches: 1, .. }]
        ));
    }

    #[test]
    fn a_version_failing_where_the_previous_one_does_not_is_rolled_back_with_no_dead_letter() {
        let runtime = runtime();
        let old = stage(&runtime, plugins::IDENTITY);
        let old_version = old.plugin().version().to_owned();
        let mut chain = Chain::new(vec![old]);
        let new = stage(&runtime, plugins::PANIC_ON_MARK);
        let new_version = new.plugin().version().to_owned();
        assert!(
            chain
                .swap(0, new, 10, &Arc::default(), StateChange::Refuse)
                .expect("swapped")
                .is_none()
        );
        chain
            .process(&batch(&["a"]))
            .expect("a batch the new version takes");
        let input = batch(&["b", "poison", "c"]);
        let out = chain
            .process(&input)
            .expect("the previous version takes it");
        assert_eq!(
            values(&out.events.to_batch(&input)),
            ["b", "poison", "c"],
            "the previous version's output"
        );
        assert!(out.dead_letters.is_empty(), "{:?}", out.dead_letters);
        assert_eq!(out.runs[0].version, old_version);
        let [
            Verdict::RolledBack {
                stage: 0,
                version,
                restored,
                error,
                batches: 1,
                followed: false,
            },
        ] = out.verdicts.as_slice()
        else {
            panic!("expected one rollback, got {:?}", out.verdicts);
        };
        assert_eq!((version, restored), (&new_version, &old_version));
        assert!(error.contains("poison event at timestamp 1001"), "{error}");
        assert_eq!(chain.stages()[0].plugin().version(), old_version);
        assert_eq!(chain.probation(0), None);
    }

    #[test]
    fn events_both_versions_fail_on_are_poison_and_the_new_version_stays() {
        let runtime = runtime();
        let mut chain = Chain::new(vec![stage(&runtime, plugins::PANIC_ON_MARK)]);
        let new = stage(&runtime, plugins::PANIC_ON_MARK);
        assert!(
            chain
                .swap(0, new, 3, &Arc::default(), StateChange::Refuse)
                .expect("swapped")
                .is_none()
        );
        let input = batch(&["a", "poison"]);
        let out = chain.process(&input).expect("a batch");
        assert_eq!(values(&out.events.to_batch(&input)), ["a"]);
        assert_eq!(out.events.batch, None, "a filter's output is a selection");
        assert_eq!(out.dead_letters.len(), 1);
        assert_eq!(out.dead_letters[0].index, 1);
        assert!(out.verdicts.is_empty());
        assert_eq!(chain.probation(0), Some((1, 3)), "still on probation");
    }

    #[test]
    fn window_state_moves_to_the_new_version_and_nothing_is_folded_twice() {
        let runtime = runtime();
        let mut chain = Chain::new(vec![stage(&runtime, plugins::BAD_FINISH)]);
        chain
            .process(&batch(&["x"]))
            .expect("folded by the first version");
        let new = stage(&runtime, plugins::BAD_FINISH);
        assert!(
            chain
                .swap(0, new, 5, &Arc::default(), StateChange::Refuse)
                .expect("swapped")
                .is_none()
        );
        // Both versions fail on the poison event: each runs the batch once from the state
        // before it; the state kept is the new version's, with `y` folded once.
        let out = chain.process(&batch(&["y", "poison"])).expect("a batch");
        assert_eq!(out.dead_letters.len(), 1);
        let flushed = chain.flush().expect("flush");
        assert_eq!(values(bytes(&flushed)), ["count=2"]);
    }

    #[test]
    fn a_swap_is_refused_for_another_kind_or_while_a_version_is_on_probation() {
        let runtime = runtime();
        let mut chain = Chain::new(vec![stage(&runtime, plugins::IDENTITY)]);
        let refused = chain
            .swap(
                0,
                stage(&runtime, plugins::COUNT_SUM),
                0,
                &Arc::default(),
                StateChange::Refuse,
            )
            .expect_err("an aggregate for a filter stage");
        assert!(
            refused
                .message
                .starts_with("stage `s` takes filter plugins (world `weir:plugin/filter@0.1.0`); plugin `count_sum` ")
                && refused
                    .message
                    .ends_with(" implements world `weir:plugin/aggregate@0.1.0`"),
            "{}",
            refused.message
        );
        assert!(
            chain
                .swap(
                    0,
                    stage(&runtime, plugins::DROP_BOTS),
                    4,
                    &Arc::default(),
                    StateChange::Refuse
                )
                .expect("ok")
                .is_none()
        );
        let refused = chain
            .swap(
                0,
                stage(&runtime, plugins::IDENTITY),
                0,
                &Arc::default(),
                StateChange::Refuse,
            )
            .expect_err("on probation");
        assert!(
            refused
                .message
                .ends_with(" is on probation (0 of 4 batches)"),
            "{}",
            refused.message
        );
        let previous = chain
            .swap(
                9,
                stage(&runtime, plugins::IDENTITY),
                0,
                &Arc::default(),
                StateChange::Refuse,
            )
            .expect_err("no such stage");
        assert_eq!(previous.message, "the chain has no stage 9");
    }

    #[test]
    fn merging_refuses_a_batch_that_does_not_verify() {
        let mut merged = BatchBuilder::new();
        append(&mut merged, &encode(&[Event::new("a", 1)])).expect("a batch");
        assert!(append(&mut merged, b"junk").is_err());
        append(&mut merged, &encode(&[Event::new("b", 2)])).expect("a batch");
        let out = merged.finish();
        let events = Batch::verify(&out).expect("merged").to_events();
        assert_eq!(events, vec![Event::new("a", 1), Event::new("b", 2)]);
    }

    #[test]
    fn chain_errors_name_the_stage() {
        let e = ChainError {
            stage: 1,
            name: "geo".into(),
            error: PluginError::Instantiate {
                plugin: "geo_enrich".into(),
                version: "1234abcd".into(),
                message: "pool exhausted".into(),
            },
            output: ChainOutput::new(),
            pending: Vec::new(),
        };
        assert_eq!(
            e.to_string(),
            "stage `geo`: plugin `geo_enrich` 1234abcd: cannot instantiate: pool exhausted"
        );
    }

    fn tagged(batch: &[u8]) -> Vec<(String, String)> {
        Batch::verify(batch)
            .expect("a batch")
            .iter()
            .map(|e| {
                let version = e.header("version").unwrap_or_default();
                (
                    String::from_utf8_lossy(e.value()).into_owned(),
                    String::from_utf8_lossy(version).into_owned(),
                )
            })
            .collect()
    }

    fn at(ms: i64) -> Vec<u8> {
        encode(&[Event::new("x", ms).with_key("a")])
    }

    #[test]
    fn a_version_with_the_same_state_layout_takes_the_open_windows_over() {
        let runtime = runtime();
        let mut chain = Chain::new(vec![stage(&runtime, plugins::TALLY_A)]);
        chain.process(&at(1_000)).expect("folded by a");
        let b = stage(&runtime, plugins::TALLY_B);
        assert_eq!(
            b.layout(),
            chain.stages()[0].layout(),
            "one accumulator type"
        );
        assert!(
            chain
                .swap(0, b, 0, &Arc::default(), StateChange::Refuse)
                .expect("swapped")
                .is_some()
        );
        chain.process(&at(2_000)).expect("folded by b");
        let flushed = chain.flush().expect("flush");
        assert_eq!(tagged(bytes(&flushed)), [("count=2".into(), "b".into())]);
    }

    #[test]
    fn another_state_layout_is_refused_while_windows_are_open() {
        let runtime = runtime();
        let mut chain = Chain::new(vec![stage(&runtime, plugins::TALLY_A)]);
        chain.process(&at(1_000)).expect("folded by a");
        let wide = stage(&runtime, plugins::TALLY_WIDE);
        let (a, w) = (
            chain.stages()[0].layout().unwrap_or_default().to_owned(),
            wide.layout().unwrap_or_default().to_owned(),
        );
        assert!(
            a.starts_with("auto:") && w.starts_with("auto:") && a != w,
            "{a} {w}"
        );
        let refused = chain
            .swap(0, wide, 5, &Arc::default(), StateChange::Refuse)
            .expect_err("another layout");
        assert!(
            refused.message.contains(&format!(
                "declares state layout `{w}`, but the 1 open windows hold accumulators of layout `{a}`"
            )) && refused.message.contains("deploy it with `--state drain`"),
            "{}",
            refused.message
        );
        // With no window open, any layout goes, with no probation: the previous version could
        // never read what the new one writes.
        let mut fresh = Chain::new(vec![stage(&runtime, plugins::TALLY_A)]);
        let previous = fresh
            .swap(
                0,
                refused.replacement,
                5,
                &Arc::default(),
                StateChange::Refuse,
            )
            .expect("swapped");
        assert!(previous.is_some(), "the previous version is not kept");
        assert_eq!(fresh.probation(0), None);
    }

    #[test]
    fn draining_lets_the_previous_version_finish_the_windows_it_opened() {
        let runtime = runtime();
        let mut chain = Chain::new(vec![stage(&runtime, plugins::TALLY_A)]);
        chain.process(&at(1_000)).expect("folded by a");
        let wide = stage(&runtime, plugins::TALLY_WIDE);
        assert!(
            chain
                .swap(0, wide, 5, &Arc::default(), StateChange::Drain)
                .expect("swapped")
                .is_none()
        );
        assert_eq!((chain.draining(0), chain.probation(0)), (1, None));
        // 30 s: a's window; 61 s: a new one (wide's), which also closes a's.
        let out = chain
            .process(&encode(&[
                Event::new("x", 30_000).with_key("a"),
                Event::new("x", 61_000).with_key("a"),
            ]))
            .expect("a batch");
        assert_eq!(tagged(bytes(&out)), [("count=2".into(), "a".into())]);
        assert!(
            matches!(&out.verdicts[..], [Verdict::Drained { stage: 0, .. }]),
            "{:?}",
            out.verdicts
        );
        assert_eq!(chain.draining(0), 0);
        let flushed = chain.flush().expect("flush");
        assert_eq!(tagged(bytes(&flushed)), [("count=1".into(), "wide".into())]);
    }

    /// Two workers' chains running identity, each swapped to panic-on-mark on probation for
    /// `batches` batches, sharing `shared`.
    fn two_workers_on_probation(
        runtime: &Runtime,
        batches: u64,
        shared: &Arc<SharedProbation>,
    ) -> Vec<Chain> {
        (0..2)
            .map(|_| {
                let mut chain = Chain::new(vec![stage(runtime, plugins::IDENTITY)]);
                let new = stage(runtime, plugins::PANIC_ON_MARK);
                let swapped = chain.swap(0, new, batches, shared, StateChange::Refuse);
                assert!(swapped.expect("swapped").is_none(), "on probation");
                chain
            })
            .collect()
    }

    #[test]
    fn workers_sharing_a_probation_pass_together_on_the_batches_they_took_together() {
        let runtime = runtime();
        let shared = Arc::new(SharedProbation::default());
        let mut workers = two_workers_on_probation(&runtime, 2, &shared);
        let version = workers[0].stages()[0].plugin().version().to_owned();
        let first = workers[0].process(&batch(&["a"])).expect("a batch");
        assert_eq!(first.verdicts, []);
        assert_eq!(workers[1].probation(0), Some((1, 2)), "counted for both");
        let second = workers[1].process(&batch(&["b"])).expect("a batch");
        let passed = Verdict::Passed {
            stage: 0,
            version: version.clone(),
            batches: 2,
        };
        assert_eq!(second.verdicts, std::slice::from_ref(&passed));
        // The other worker learns it at its next batch, before running it.
        assert_eq!(workers[0].probation(0), Some((2, 2)));
        let third = workers[0].process(&batch(&["c"])).expect("a batch");
        assert_eq!(third.verdicts, [passed]);
        assert_eq!(workers[0].probation(0), None);
        assert_eq!(third.runs[0].version, version);
    }

    #[test]
    fn a_version_one_worker_rolls_back_is_rolled_back_on_every_worker() {
        let runtime = runtime();
        let shared = Arc::new(SharedProbation::default());
        let mut workers = two_workers_on_probation(&runtime, 5, &shared);
        let old = stage(&runtime, plugins::IDENTITY)
            .plugin()
            .version()
            .to_owned();
        let failed = workers[0]
            .process(&batch(&["a", "poison"]))
            .expect("the previous version takes it");
        assert!(matches!(
            &failed.verdicts[..],
            [Verdict::RolledBack { restored, .. }] if *restored == old
        ));
        let next = workers[1].process(&batch(&["b"])).expect("a batch");
        match &next.verdicts[..] {
            [
                Verdict::RolledBack {
                    restored, error, ..
                },
            ] => {
                assert_eq!(*restored, old);
                assert!(error.contains("trap"), "{error}");
            }
            other => panic!("rolled back, not {other:?}"),
        }
        assert_eq!(
            next.runs[0].version, old,
            "the previous version ran the batch"
        );
        // A worker that never took a batch of it ends the probation at its next swap.
        let mut idle = Chain::new(vec![stage(&runtime, plugins::IDENTITY)]);
        idle.swap(
            0,
            stage(&runtime, plugins::PANIC_ON_MARK),
            5,
            &shared,
            StateChange::Refuse,
        )
        .expect("swapped");
        let again = stage(&runtime, plugins::DROP_BOTS);
        assert!(
            idle.swap(0, again, 0, &Arc::default(), StateChange::Refuse)
                .is_ok(),
            "no longer on probation"
        );
    }

    #[test]
    fn an_aggregate_on_one_of_several_workers_dead_letters_keys_another_worker_owns() {
        let runtime = runtime();
        let mut chain = Chain::new(vec![
            stage(&runtime, plugins::EVEN_KEY),
            stage(&runtime, plugins::COUNT_SUM),
        ]);
        chain.set_lane(0, 2);
        // even-key keeps half of them: the aggregate's input is a batch the chain built.
        let events: Vec<Event> = (0..40)
            .map(|i| Event::new(r#"{"amount":1}"#, 1_000).with_key(format!("k{i}")))
            .collect();
        let foreign: Vec<String> = events
            .iter()
            .filter_map(|e| e.key.as_deref())
            .filter(|k| k.last().is_some_and(|d| d % 2 == 0) && lane_of(Some(k), 2) != 0)
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        assert!(!foreign.is_empty() && foreign.len() < 20, "{foreign:?}");
        let out = chain.process(&encode(&events)).expect("runs");
        let mut dead: Vec<String> = out
            .dead_letters
            .iter()
            .map(|d| {
                String::from_utf8_lossy(d.event.key.as_deref().unwrap_or_default()).into_owned()
            })
            .collect();
        dead.sort();
        let mut expected = foreign.clone();
        expected.sort();
        assert_eq!(dead, expected);
        let error = &out.dead_letters[0].error;
        assert!(
            error.starts_with(&format!("an earlier stage changed its key to `{}`, whose windows live on worker 1 of 2, not this one (0)", foreign[0]))
                && error.ends_with("set `workers = 1` for this pipeline"),
            "{error}"
        );
        let windows = chain.stages()[1]
            .window_state()
            .expect("an aggregate")
            .open_windows();
        assert_eq!(
            windows,
            20 - foreign.len(),
            "only the worker's own keys folded"
        );
    }
}
