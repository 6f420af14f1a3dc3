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

use super::stage::{DeadLetter, LateEvent, Stage, StageOutput};
use crate::runtime::PluginError;
use std::time::{Duration, Instant};
use weir_format::{Batch, BatchBuilder, FormatError};

/// What a chain made of one batch (or of the end of input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainOutput {
    /// The last stage's output batch.
    pub batch: Vec<u8>,
    /// Dead letters of every stage, in stage order.
    pub dead_letters: Vec<DeadLetter>,
    /// Late events of every aggregate stage, in stage order.
    pub late: Vec<LateEvent>,
    /// What each stage that ran did, in the order they ran.
    pub runs: Vec<StageRun>,
}

impl ChainOutput {
    fn new() -> Self {
        ChainOutput {
            batch: Vec::new(),
            dead_letters: Vec::new(),
            late: Vec::new(),
            runs: Vec::new(),
        }
    }

    /// Notes what stage `stage` made of `events_in` events (a call started at `started`):
    /// its run, dead letters and late events; returns its output batch.
    fn took(
        &mut self,
        stage: usize,
        events_in: usize,
        out: StageOutput,
        started: Instant,
    ) -> Vec<u8> {
        self.runs.push(StageRun {
            stage,
            events_in,
            events_out: count(&out.batch),
            failed: out.dead_letters.len(),
            late: out.late.len(),
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
    /// Events handed to the stage (0 for a flush).
    pub events_in: usize,
    /// Events it output.
    pub events_out: usize,
    /// Events (or windows) it failed on: its dead letters.
    pub failed: usize,
    /// Events too late for any of its windows.
    pub late: usize,
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

/// An ordered list of stages.
#[derive(Debug, Default)]
pub struct Chain {
    stages: Vec<Stage>,
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
        Chain { stages }
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
        self.run_from(0, First::Verified(input))
    }

    /// Runs a batch through the stages from `stage` on: how a [`ChainError::pending`] batch
    /// is taken up again. At `stages().len()` the batch is the chain's output as it is.
    pub fn resume(&mut self, stage: usize, batch: &[u8]) -> Result<ChainOutput, Box<ChainError>> {
        self.run_from(stage, First::Bytes(batch))
    }

    fn run_from(
        &mut self,
        stage: usize,
        first: First<'_, '_>,
    ) -> Result<ChainOutput, Box<ChainError>> {
        let first_stage = stage.min(self.stages.len());
        let mut output = ChainOutput::new();
        match run(
            &mut self.stages[first_stage..],
            first_stage,
            first,
            &mut output,
        ) {
            Ok(batch) => {
                output.batch = batch;
                Ok(output)
            }
            Err(failure) => {
                output.batch = BatchBuilder::new().finish();
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
            let started = Instant::now();
            let failure = match stage[0].flush() {
                Ok(flushed) => {
                    let flushed = output.took(i, 0, flushed, started);
                    match run(rest, i + 1, First::Bytes(&flushed), &mut output) {
                        Ok(out) => match append(&mut merged, &out) {
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
            output.batch = merged.finish();
            return Err(self.failed(failure, output));
        }
        output.batch = merged.finish();
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

/// Runs `first` through `stages` (the first of which is stage `offset` of the chain),
/// collecting dead letters, late events and runs into `output`. On failure, returns the failing
/// stage's index in the chain and its input.
fn run(
    stages: &mut [Stage],
    offset: usize,
    first: First<'_, '_>,
    output: &mut ChainOutput,
) -> Result<Vec<u8>, Box<Failure>> {
    let first_bytes = match &first {
        First::Verified(batch) => batch.bytes(),
        First::Bytes(bytes) => bytes,
    };
    let mut current: Option<Vec<u8>> = None;
    for (k, stage) in stages.iter_mut().enumerate() {
        let started = Instant::now();
        let (events_in, result) = match (current.as_deref(), &first) {
            (Some(previous), _) => {
                // SAFETY: a stage's output batch is one the host built or verified
                // (`Stage::process_batch`), so the next stage reads it without verifying it
                // again.
                let input = unsafe { Batch::trusted(previous) };
                (input.len(), stage.process_batch(&input))
            }
            (None, First::Verified(input)) => (input.len(), stage.process_batch(input)),
            (None, First::Bytes(bytes)) => match Batch::verify(bytes) {
                Ok(input) => (input.len(), stage.process_batch(&input)),
                Err(_) => (0, stage.process(bytes)),
            },
        };
        match result {
            Ok(out) => {
                current = Some(output.took(offset + k, events_in, out, started));
            }
            Err(error) => {
                return Err(Box::new(Failure {
                    stage: offset + k,
                    error,
                    pending: current.unwrap_or_else(|| first_bytes.to_vec()),
                }));
            }
        }
    }
    Ok(current.unwrap_or_else(|| first_bytes.to_vec()))
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
    use weir_format::{Event, encode};

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
}
