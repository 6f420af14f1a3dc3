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

use crate::sinks::SharedBatch;
use std::sync::Arc;
use tokio::sync::mpsc;
use weir_format::Event;

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
}

/// Where sources put batches for one pipeline: a bounded queue (a full queue is backpressure
/// on the source). Cheap to clone.
#[derive(Clone)]
pub struct PipelineInput {
    name: Arc<str>,
    tx: mpsc::Sender<Input>,
}

impl std::fmt::Debug for PipelineInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineInput")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Room for one batch in a pipeline's queue, taken before the batch is handed over so that a
/// source can hand it over without waiting (under a lock of its own, say).
pub type Slot<'a> = mpsc::Permit<'a, Input>;

impl PipelineInput {
    pub(crate) fn new(name: Arc<str>, tx: mpsc::Sender<Input>) -> PipelineInput {
        PipelineInput { name, tx }
    }

    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for room in the queue; `None` once the pipeline stopped taking batches.
    pub async fn reserve(&self) -> Option<Slot<'_>> {
        self.tx.reserve().await.ok()
    }

    /// Hands over a batch, waiting for room; gives it back when the pipeline stopped taking
    /// batches.
    pub async fn send(&self, input: Input) -> Result<(), Input> {
        self.tx.send(input).await.map_err(|e| e.0)
    }

    /// Hands over a batch if there is room now; gives it back when there is none or the
    /// pipeline stopped taking batches.
    pub fn try_send(&self, input: Input) -> Result<(), Input> {
        self.tx.try_send(input).map_err(|e| match e {
            mpsc::error::TrySendError::Full(input) | mpsc::error::TrySendError::Closed(input) => {
                input
            }
        })
    }

    /// Whether the pipeline stopped taking batches.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Whether `other` feeds the same worker's queue.
    pub fn same_queue(&self, other: &PipelineInput) -> bool {
        self.tx.same_channel(&other.tx)
    }
}
