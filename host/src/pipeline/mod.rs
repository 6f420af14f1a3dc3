//! Running batches through plugins: [`Stage`] (one plugin instance for one worker), [`Chain`]
//! (stages in order, the one stage loop), the host-side event-time windows of aggregates
//! ([`window`]), and the worker that runs a pipeline for any source ([`Pipeline`]: batches in
//! with a [`Completion`] each, output fanned out to the sinks, completions resolved once the
//! sinks accepted).
//!
//! The core here takes data and returns decisions: a batch in, an output batch plus dead
//! letters and late events out; windows take event time as an argument. Sockets, sinks and
//! threads sit around it (DESIGN §9).
//!
//! See `chain.rs` for how a chain fails without losing or repeating anything, `worker.rs` for
//! rounds, completions and control messages, and `input.rs` for what a source may expect.

mod chain;
pub mod config;
pub(crate) mod fanout;
mod input;
pub mod route;
mod stage;
pub mod tap;
pub mod window;
mod worker;

pub use chain::{
    Chain, ChainError, ChainOutput, RoleChanges, SharedProbation, StageRun, StateChange,
    StateChanges, SwapRefused, Verdict,
};
pub use input::{
    Completion, Input, Partition, PipelineInput, Position, Resumed, Slot, lane_key, lane_of,
};
pub use stage::{DeadLetter, LateEvent, Scope, Stage, StageOutput};
pub use window::{
    MAX_WINDOWS_PER_EVENT, WindowConfig, WindowError, WindowId, WindowKind, WindowState, Windows,
};
pub use worker::{
    MAX_ROUND, Outputs, Pipeline, PipelineControl, Swap, Swapped, WorkerConfig, WorkerSetup,
};
