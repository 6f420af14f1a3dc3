//! Running batches through plugins: [`Stage`] (one plugin instance for one worker), [`Chain`]
//! (stages in order) and the host-side event-time windows of aggregates ([`window`]).
//!
//! The core here takes data and returns decisions: a batch in, an output batch plus dead
//! letters and late events out; windows take event time as an argument. Sockets, sinks and
//! threads sit around it (DESIGN §9).
//!
//! Decisions:
//!
//! - A [`Chain`] is the ordered stages of one pipeline for one worker; routing to sinks is
//!   not its business. `weir test` builds one from one plugin or several.
//! - Dead letters and late events of every stage are collected in stage order; each names
//!   its stage, and its `index` is the event's position in *that stage's* input.
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

pub mod config;
pub mod route;
mod stage;
pub mod window;

pub use stage::{DeadLetter, LateEvent, Stage, StageOutput};
pub use window::{
    MAX_WINDOWS_PER_EVENT, WindowConfig, WindowError, WindowId, WindowKind, WindowState, Windows,
};

use crate::runtime::PluginError;
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
}

impl ChainOutput {
    fn new() -> Self {
        ChainOutput {
            batch: Vec::new(),
            dead_letters: Vec::new(),
            late: Vec::new(),
        }
    }
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

    /// Runs a batch through every stage.
    pub fn process(&mut self, batch: &[u8]) -> Result<ChainOutput, Box<ChainError>> {
        self.resume(0, batch)
    }

    /// Runs a batch through the stages from `stage` on: how a [`ChainError::pending`] batch
    /// is taken up again. At `stages().len()` the batch is the chain's output as it is.
    pub fn resume(&mut self, stage: usize, batch: &[u8]) -> Result<ChainOutput, Box<ChainError>> {
        let first = stage.min(self.stages.len());
        let mut output = ChainOutput::new();
        match run(&mut self.stages[first..], first, batch, &mut output) {
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
            let failure = match stage[0].flush() {
                Ok(flushed) => {
                    output.dead_letters.extend(flushed.dead_letters);
                    output.late.extend(flushed.late);
                    match run(rest, i + 1, &flushed.batch, &mut output) {
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

/// Runs `batch` through `stages` (the first of which is stage `offset` of the chain),
/// collecting dead letters and late events into `output`. On failure, returns the failing
/// stage's index in the chain and its input.
fn run(
    stages: &mut [Stage],
    offset: usize,
    batch: &[u8],
    output: &mut ChainOutput,
) -> Result<Vec<u8>, Box<Failure>> {
    let mut current: Option<Vec<u8>> = None;
    for (k, stage) in stages.iter_mut().enumerate() {
        let result = match current.as_deref() {
            // SAFETY: a stage's output batch is one the host built or verified
            // (`Stage::process_batch`), so the next stage reads it without verifying it again.
            Some(previous) => stage.process_batch(&unsafe { Batch::trusted(previous) }),
            None => stage.process(batch),
        };
        match result {
            Ok(out) => {
                output.dead_letters.extend(out.dead_letters);
                output.late.extend(out.late);
                current = Some(out.batch);
            }
            Err(error) => {
                return Err(Box::new(Failure {
                    stage: offset + k,
                    error,
                    pending: current.unwrap_or_else(|| batch.to_vec()),
                }));
            }
        }
    }
    Ok(current.unwrap_or_else(|| batch.to_vec()))
}

/// Appends the events of `batch` to `merged` (sources kept); a batch that does not verify is
/// an error and nothing of it is appended.
fn append(merged: &mut BatchBuilder, batch: &[u8]) -> Result<(), FormatError> {
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
