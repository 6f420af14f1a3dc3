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
//!   aggregates drains completely. The outputs are merged into one batch.
//! - When a stage fails as a whole (`Err`, e.g. `init` refused on recycle), the batch's
//!   result is that error; state that earlier stages committed for the batch stays committed.

mod stage;
pub mod window;

pub use stage::{DeadLetter, LateEvent, Stage, StageOutput};
pub use window::{WindowConfig, WindowError, WindowId, WindowKind, WindowState};

use crate::runtime::PluginError;
use weir_format::{Batch, BatchBuilder};

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

/// An ordered list of stages.
#[derive(Debug, Default)]
pub struct Chain {
    stages: Vec<Stage>,
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
    pub fn process(&mut self, batch: &[u8]) -> Result<ChainOutput, PluginError> {
        let mut output = ChainOutput {
            batch: Vec::new(),
            dead_letters: Vec::new(),
            late: Vec::new(),
        };
        output.batch = run(&mut self.stages, batch, &mut output)?;
        Ok(output)
    }

    /// End of input: finishes every open window, stage by stage, and runs what that emits
    /// through the rest of the chain.
    pub fn flush(&mut self) -> Result<ChainOutput, PluginError> {
        let mut output = ChainOutput {
            batch: Vec::new(),
            dead_letters: Vec::new(),
            late: Vec::new(),
        };
        let mut batches = Vec::new();
        for i in 0..self.stages.len() {
            let (stage, rest) = self.stages[i..].split_at_mut(1);
            let flushed = stage[0].flush()?;
            output.dead_letters.extend(flushed.dead_letters);
            output.late.extend(flushed.late);
            let out = run(rest, &flushed.batch, &mut output)?;
            batches.push(out);
        }
        output.batch = merge(&batches);
        Ok(output)
    }
}

/// Runs `batch` through `stages`, collecting dead letters and late events into `output`.
fn run(
    stages: &mut [Stage],
    batch: &[u8],
    output: &mut ChainOutput,
) -> Result<Vec<u8>, PluginError> {
    let mut current: Option<Vec<u8>> = None;
    for stage in stages {
        let input = current.as_deref().unwrap_or(batch);
        let out = stage.process(input)?;
        output.dead_letters.extend(out.dead_letters);
        output.late.extend(out.late);
        current = Some(out.batch);
    }
    Ok(current.unwrap_or_else(|| batch.to_vec()))
}

/// One batch holding the events of several, in order (sources kept).
fn merge(batches: &[Vec<u8>]) -> Vec<u8> {
    let mut builder = BatchBuilder::new();
    for batch in batches {
        // Each came out of a stage, verified or built by the host.
        if let Ok(batch) = Batch::verify(batch) {
            for event in batch.iter() {
                builder.push_ref(&event, event.source());
            }
        }
    }
    builder.finish()
}
