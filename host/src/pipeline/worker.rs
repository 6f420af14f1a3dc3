//! The pipeline worker: a pipeline runs on N worker threads (`workers = N`), each of which
//! takes verified batches from any source, runs them through its own [`Chain`] (its own plugin
//! instances), fans the output out to the pipeline's sinks and resolves each batch's
//! [`Completion`] once the sinks accepted it. It knows nothing of producers, streams or wire
//! codes: that is the sources' business (`sources/`).
//!
//! - **Workers.** Each worker has its own queue; [`PipelineInput`] shares the batches out
//!   (`input.rs`): whole batches by stream (a producer, a Kafka partition), so a stream's
//!   batches stay in order; in a pipeline with an aggregate, each batch split by event key,
//!   so that a key's windows live on one worker and the results are those of one worker. The
//!   workers share the sinks, the counters and the checkpoint; control messages go to each
//!   (a deploy swaps every worker's instance, `admin/deploy.rs`), and a stop or retirement
//!   ends when every worker's has.
//! - **Rounds.** wasmtime is synchronous, so stages never run on the async workers. The worker
//!   takes what is queued (up to [`MAX_ROUND`] batches) as one round: each batch goes through
//!   the chain and its output is offered to the sinks ([`Fanout`]). At the end of the round its
//!   dead letters go to the dead-letter sink as one batch, the disk buffers written are
//!   synced, and the round's [`Ticket`] is sealed with the round's completions. The worker
//!   then goes on with the next round at once: it never waits for sinks. The ticket resolves
//!   the completions, on whichever thread completes the round's last delivery (a sink's
//!   task), with no polling. Memory stays bounded by the sinks' buffers (a full `block` sink
//!   holds the worker in `offer`) and by the sources' own limits on batches not completed.
//! - **Control.** Between two batches the worker takes [`Control`] messages, ahead of any
//!   queued batch: swap a stage's plugin version ([`Swap`]: the new version is instantiated
//!   and initialized off the worker, so the swap itself moves a few pointers and the window
//!   state), send the output elsewhere from the next round on ([`Outputs`]: a reload's new
//!   routes or sinks), retire (a reload removes or restarts the pipeline: the queue is
//!   processed and the windows flushed, and the rounds resolve whenever the sinks accept
//!   them), and stop. A pipeline that replaces another is started with
//!   [`Pipeline::spawn_after`]: it takes the sources' queue at once and its first batch once
//!   the one it replaces retired. A version on probation is the chain's business (`chain.rs`); the
//!   worker tells the deployer the verdict and counts swaps, pauses and rollbacks.
//! - **A stage that cannot run** (its instance pool exhausted, its plugin's `init` refusing on
//!   a recycle) leaves no half-applied batch: the chain hands back what the earlier stages
//!   finished (delivered as usual: their output, dead letters and folds stand) and the failing
//!   stage's unprocessed input, which the worker runs again from that stage, with backoff,
//!   [`WorkerConfig::stage_attempts`] times in all. After that, the events of that input become
//!   dead letters of the stage ("cannot run: …") and the batch completes. Nothing is run twice
//!   and nothing is lost.
//! - **Stop** drains: queued batches are processed, aggregate windows flushed and fanned out,
//!   and the worker waits up to [`WorkerConfig::stop_wait`] (from when stopping began) for the
//!   sinks to accept what it offered; rounds not accepted by then are rejected.

use super::chain::{
    Chain, ChainError, ChainOutput, Output as ChainEvents, SharedProbation, StateChange,
    SwapRefused, Verdict,
};
use super::fanout::Fanout;
use super::input::{Completion, Input, Partition, PipelineInput, Position, Resumed};
use super::stage::{DeadLetter, LateEvent, Stage};
use super::tap::PipelineTap;
use crate::checkpoint::PipelineCheckpoint;
use crate::metrics::{Metrics, PipelineMetrics, StageMetrics, VersionMetrics};
use crate::runtime::{PluginError, PluginKind};
use crate::sinks::SharedBatch;
use crate::sinks::runner::Ticket;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use weir_format::{Batch, BatchBuilder, Event, KeepBitmap};

/// Most batches one round takes before it is sealed.
pub const MAX_ROUND: usize = 256;
/// A selection keeping fewer than one event in `SPARSE` of its batch goes to the sinks as a
/// batch of its own: their buffers count the events they hold, and a few events should not
/// keep a large batch in memory.
const SPARSE: usize = 4;
/// How long a stopping worker waits for a ticket's callback that another thread is running.
const CALLBACK_WAIT: Duration = Duration::from_secs(1);

/// How a worker retries and stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Attempts at a stage that cannot run before its pending events become dead letters.
    pub stage_attempts: u32,
    /// The wait after the first failed attempt; each later wait is four times longer.
    pub stage_backoff: Duration,
    /// Attempts at a failing disk-buffer sync once stopping (before it, the worker retries
    /// until it works: backpressure, never loss).
    pub stop_sync_attempts: u32,
    /// How long, from when stopping began, the worker waits for its sinks to accept what it
    /// offered.
    pub stop_wait: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            stage_attempts: 5,
            stage_backoff: Duration::from_millis(40),
            stop_sync_attempts: 3,
            stop_wait: Duration::from_secs(10),
        }
    }
}

impl WorkerConfig {
    /// The wait after failed attempt `attempt` (1-based).
    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << (2 * attempt.saturating_sub(1)).min(16);
        self.stage_backoff.saturating_mul(factor)
    }
}

/// A new version for one stage, ready to run: instantiated and initialized off the worker.
pub struct Swap {
    /// The stage's index.
    pub stage: usize,
    /// The new version.
    pub replacement: Stage,
    /// Batches it must take without failing before the previous version is dropped (0: no
    /// probation; see `chain.rs`).
    pub probation: u64,
    /// What to do when an aggregate's new version writes another state layout.
    pub on_change: StateChange,
    /// Told once the swap is done, or why it was refused (with the replacement back).
    pub done: oneshot::Sender<Result<Swapped, Box<SwapRefused>>>,
    /// Told how the probation ended; dropped unanswered if the pipeline stops first.
    pub verdict: Option<oneshot::Sender<Verdict>>,
    /// The probation, shared by every worker of the pipeline the version is swapped into.
    pub shared: Arc<SharedProbation>,
}

/// A swap that was done.
pub struct Swapped {
    /// The version taken out (no probation), for the caller to drop off the worker.
    pub previous: Option<Stage>,
    /// Whether the new version is on probation (its verdict will come).
    pub on_probation: bool,
    /// Windows the previous version goes on finishing, because the new one writes another
    /// state layout (0: none).
    pub draining: usize,
    /// How long batches waited because of the swap: from the end of the last batch the old
    /// version took to the moment the worker could take the next (when one was waiting), or
    /// the swap itself (when none was).
    pub pause: Duration,
}

/// Where a pipeline's output goes, as a reload changes it: its fan-out (routes, `unmatched`,
/// dead-letter sink) and its version header.
pub struct Outputs {
    /// The sinks and their conditions.
    pub(crate) fanout: Fanout,
    /// A header naming the plugin versions that made each output event.
    pub version_header: Option<String>,
}

/// What a running pipeline's worker is told between two batches.
pub(crate) enum Control {
    /// Swap a stage's plugin version; window state carries over.
    Swap(Box<Swap>),
    /// From the next round on, the output goes to these sinks; told once it does.
    Outputs {
        /// The new outputs.
        outputs: Box<Outputs>,
        /// Told once the next round will use them.
        done: oneshot::Sender<()>,
    },
    /// Stop taking batches, process what is queued (and what sources hold room for), flush
    /// windows, and end without waiting for the sinks: the rounds resolve whenever the sinks
    /// accept them. For a pipeline a reload removes or restarts.
    Retire {
        /// Told once the worker ended.
        reply: oneshot::Sender<()>,
    },
    /// Stop taking batches, process what is queued, flush windows, wait for the sinks, end.
    /// Replies with the problems met (empty when everything was accepted).
    Stop {
        /// The problems.
        reply: oneshot::Sender<Vec<String>>,
    },
}

/// What a running pipeline shares with whoever stops it.
#[derive(Default)]
struct Stopping {
    flag: AtomicBool,
    since: OnceLock<Instant>,
}

impl Stopping {
    fn begin(&self) {
        self.since.get_or_init(Instant::now);
        self.flag.store(true, Ordering::Release);
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

/// What a pipeline's workers are built from.
pub struct WorkerSetup {
    /// The pipeline's name.
    pub name: String,
    /// Its stages, one chain per worker (`workers = N`), each with its own plugin instances.
    pub chains: Vec<Chain>,
    /// Its sinks.
    pub(crate) fanout: Fanout,
    /// Its counters.
    pub metrics: PipelineMetrics,
    /// One per stage, in order.
    pub stage_metrics: Vec<StageMetrics>,
    /// Batches queued at most, per worker.
    pub queue: usize,
    /// Retries and stopping.
    pub config: WorkerConfig,
    /// The metrics, for the series of plugin versions deployed later.
    pub registry: Arc<Metrics>,
    /// A header naming the plugin versions that made each output event (`STAGE=VERSION,…`).
    pub version_header: Option<String>,
    /// Where its window state and its sources' positions are checkpointed (`checkpoint.rs`);
    /// `None`: nowhere (open windows are finished at a stop instead).
    pub checkpoint: Option<PipelineCheckpoint>,
    /// What each worker already held of each stream at the last checkpoint.
    pub resumed: Resumed,
    /// Where its output and its stages' outputs are offered to `weir tap` readers.
    pub tap: Arc<PipelineTap>,
}

/// One of a running pipeline's workers: the way to reach it, its thread.
struct Lane {
    control: mpsc::UnboundedSender<Control>,
    thread: Option<JoinHandle<()>>,
}

/// A running pipeline: its workers' threads and the ways to reach them.
pub struct Pipeline {
    name: Arc<str>,
    input: PipelineInput,
    lanes: Vec<Lane>,
    stopping: Arc<Stopping>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("name", &self.name)
            .field("workers", &self.lanes.len())
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Starts the worker threads. Must be called within a tokio runtime (the workers wait for
    /// their queues on it, from their own threads).
    pub fn spawn(setup: WorkerSetup) -> std::io::Result<Pipeline> {
        Pipeline::start(setup, None)
    }

    /// Starts the worker threads, which take their first batch once `after` completes (or is
    /// dropped): a pipeline that replaces another takes over its sources' queues at once, and
    /// processes them only once the one it replaces has retired, so each producer's batches
    /// stay in order.
    pub fn spawn_after(
        setup: WorkerSetup,
        after: oneshot::Receiver<()>,
    ) -> std::io::Result<Pipeline> {
        Pipeline::start(setup, Some(after))
    }

    fn start(
        setup: WorkerSetup,
        after: Option<oneshot::Receiver<()>>,
    ) -> std::io::Result<Pipeline> {
        let name: Arc<str> = Arc::from(setup.name.as_str());
        let stopping = Arc::new(Stopping::default());
        let runtime = tokio::runtime::Handle::current();
        // Every worker waits for the same retirement.
        let (go, ready) = tokio::sync::watch::channel(after.is_none());
        if let Some(after) = after {
            runtime.spawn(async move {
                let _ = after.await;
                let _ = go.send(true);
            });
        }
        let workers = setup.chains.len().max(1);
        let partition = if setup.chains.iter().any(|c| c.first_aggregate().is_some()) {
            Partition::Key
        } else {
            Partition::Stream
        };
        let mut senders = Vec::with_capacity(workers);
        let mut lanes = Vec::with_capacity(workers);
        for (index, mut chain) in setup.chains.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel(setup.queue.max(1));
            let (control, control_rx) = mpsc::unbounded_channel();
            if setup.checkpoint.is_some() {
                chain.track_changes();
            }
            if partition == Partition::Key {
                chain.set_lane(index, workers);
            }
            chain.set_tap(setup.tap.clone());
            let worker = Worker {
                name: name.clone(),
                lane: index,
                chain,
                checkpoint: setup.checkpoint.clone(),
                fanout: setup.fanout.clone(),
                metrics: setup.metrics.clone(),
                stage_metrics: setup.stage_metrics.clone(),
                input: rx,
                input_open: true,
                control: control_rx,
                runtime: runtime.clone(),
                config: setup.config,
                stopping: stopping.clone(),
                outstanding: Vec::new(),
                problems: Arc::new(Mutex::new(Vec::new())),
                registry: setup.registry.clone(),
                version_series: HashMap::new(),
                verdicts: HashMap::new(),
                version_header: setup.version_header.clone(),
                tap: setup.tap.clone(),
                versions: Vec::new(),
                last_batch_end: None,
            };
            let mut ready = ready.clone();
            let thread = std::thread::Builder::new()
                .name(if workers == 1 {
                    format!("weir-{name}")
                } else {
                    format!("weir-{name}-{index}")
                })
                .spawn(move || {
                    let _ = worker.runtime.block_on(ready.wait_for(|go| *go));
                    worker.run();
                })?;
            senders.push(tx);
            lanes.push(Lane {
                control,
                thread: Some(thread),
            });
        }
        Ok(Pipeline {
            input: PipelineInput::new(name.clone(), senders, partition, Arc::new(setup.resumed)),
            name,
            lanes,
            stopping,
        })
    }

    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where sources put its batches.
    pub fn input(&self) -> PipelineInput {
        self.input.clone()
    }

    /// Tells every worker `message()`; the replies to wait for, or why a worker cannot be told.
    fn tell<T>(
        &self,
        message: impl Fn(oneshot::Sender<T>) -> Control,
    ) -> Vec<Result<oneshot::Receiver<T>, String>> {
        self.lanes
            .iter()
            .map(|lane| {
                let (reply, done) = oneshot::channel();
                lane.control
                    .send(message(reply))
                    .map(|()| done)
                    .map_err(|_| format!("pipeline `{}`: its worker has stopped", self.name))
            })
            .collect()
    }

    /// What deployers hold of the pipeline: a way to hand its workers a new stage version.
    pub fn controller(&self) -> PipelineControl {
        PipelineControl {
            name: self.name.clone(),
            lanes: self.lanes.iter().map(|l| l.control.clone()).collect(),
        }
    }

    /// Tells the workers to stop (see [`Control::Stop`]) at once; the future completes when
    /// they finished, with the problems met (each once).
    pub fn stop(&self) -> impl std::future::Future<Output = Vec<String>> + use<> {
        // Also cuts retries short in the rounds under way.
        self.stopping.begin();
        let told = self.tell(|reply| Control::Stop { reply });
        let name = self.name.clone();
        async move {
            let mut problems: Vec<String> = Vec::new();
            for reply in told {
                let more = match reply {
                    Err(e) => vec![e],
                    Ok(done) => done.await.unwrap_or_else(|_| {
                        vec![format!(
                            "pipeline `{name}`: its worker ended without finishing"
                        )]
                    }),
                };
                for problem in more {
                    if !problems.contains(&problem) {
                        problems.push(problem);
                    }
                }
            }
            problems
        }
    }

    /// Tells the workers to retire (see [`Control::Retire`]); the future completes once they
    /// processed what was queued and ended. Their rounds resolve whenever the sinks accept
    /// them.
    pub fn retire(&self) -> impl std::future::Future<Output = ()> + use<> {
        let told = self.tell(|reply| Control::Retire { reply });
        async move {
            // A reply dropped unanswered: the worker ended some other way; nothing to wait for.
            for done in told.into_iter().flatten() {
                let _ = done.await;
            }
        }
    }

    /// Waits for the worker threads to end (after [`Pipeline::stop`]); blocks.
    pub fn join(mut self) -> Result<(), String> {
        let mut panicked = 0;
        for lane in &mut self.lanes {
            if let Some(Err(_)) = lane.thread.take().map(JoinHandle::join) {
                panicked += 1;
            }
        }
        match panicked {
            0 => Ok(()),
            n => Err(format!(
                "pipeline `{}`: {n} of its {} worker threads panicked",
                self.name,
                self.lanes.len()
            )),
        }
    }
}

/// A handle to a running pipeline's workers for swapping stage versions and outputs. Cheap to
/// clone.
#[derive(Clone)]
pub struct PipelineControl {
    name: Arc<str>,
    lanes: Arc<[mpsc::UnboundedSender<Control>]>,
}

impl PipelineControl {
    /// How many workers the pipeline runs on: a deploy hands each its own new version.
    pub fn workers(&self) -> usize {
        self.lanes.len()
    }

    /// Hands worker `lane` a new version of a stage (see [`Swap`]); `Err` when the worker has
    /// ended. The outcome comes on the swap's own channels.
    pub fn swap(&self, lane: usize, swap: Swap) -> Result<(), String> {
        self.lanes
            .get(lane)
            .ok_or_else(|| format!("pipeline `{}` has no worker {lane}", self.name))?
            .send(Control::Swap(Box::new(swap)))
            .map_err(|_| self.stopped())
    }

    /// From the next round on, the output goes to `outputs`; completes once every worker's
    /// does (`Err` when a worker has ended).
    pub fn outputs(
        &self,
        outputs: Outputs,
    ) -> impl std::future::Future<Output = Result<(), String>> + use<> {
        let told: Vec<_> = self
            .lanes
            .iter()
            .map(|lane| {
                let (done, told) = oneshot::channel();
                let outputs = Box::new(Outputs {
                    fanout: outputs.fanout.clone(),
                    version_header: outputs.version_header.clone(),
                });
                lane.send(Control::Outputs { outputs, done })
                    .map(|()| told)
                    .map_err(|_| self.stopped())
            })
            .collect();
        let stopped = self.stopped();
        async move {
            for told in told {
                told?.await.map_err(|_| stopped.clone())?;
            }
            Ok(())
        }
    }

    fn stopped(&self) -> String {
        format!("pipeline `{}`: its worker has stopped", self.name)
    }
}

/// A pipeline's worker, run on its own thread.
struct Worker {
    name: Arc<str>,
    /// Which of the pipeline's workers it is.
    lane: usize,
    chain: Chain,
    checkpoint: Option<PipelineCheckpoint>,
    fanout: Fanout,
    metrics: PipelineMetrics,
    stage_metrics: Vec<StageMetrics>,
    input: mpsc::Receiver<Input>,
    /// Whether a source may still send (some `PipelineInput` is alive).
    input_open: bool,
    control: mpsc::UnboundedReceiver<Control>,
    runtime: tokio::runtime::Handle,
    config: WorkerConfig,
    stopping: Arc<Stopping>,
    /// Sealed rounds, until resolved.
    outstanding: Vec<Arc<Ticket>>,
    /// Why rounds were not accepted, each reason once.
    problems: Arc<Mutex<Vec<String>>>,
    /// Where per-version series come from.
    registry: Arc<Metrics>,
    /// Per (stage, version), its series.
    version_series: HashMap<(usize, String), VersionMetrics>,
    /// Per stage on probation, who waits for the verdict.
    verdicts: HashMap<usize, oneshot::Sender<Verdict>>,
    /// The header naming the versions that made each output event, if the pipeline sets one.
    version_header: Option<String>,
    /// Where its output is offered to `weir tap` readers.
    tap: Arc<PipelineTap>,
    /// The version of each stage that made the batch under way.
    versions: Vec<(usize, String)>,
    /// When the last batch was done.
    last_batch_end: Option<Instant>,
}

/// What the worker waits for next.
enum Next {
    Control(Control),
    Input(Input),
    /// Every control sender is gone: the pipeline was dropped without a stop.
    Abandoned,
}

/// One round: its ticket, its batches' completions, its dead letters.
struct Round {
    ticket: Arc<Ticket>,
    completions: Vec<Completion>,
    /// Where each of the round's sources resumes after it.
    positions: HashMap<Arc<str>, u64>,
    /// Deliveries a sink did not take (only while stopping): the round is not accepted.
    refused: Vec<String>,
    dead: BatchBuilder,
    dead_count: usize,
}

impl Round {
    fn new() -> Round {
        Round {
            ticket: Ticket::new(),
            completions: Vec::new(),
            positions: HashMap::new(),
            refused: Vec::new(),
            dead: BatchBuilder::new(),
            dead_count: 0,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update under these locks is a single push: a poisoned lock's data is consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Worker {
    fn run(mut self) {
        loop {
            let first = match self.next() {
                Next::Input(input) => input,
                Next::Control(Control::Stop { reply }) => {
                    let problems = self.stop();
                    // The stopper may have given up waiting; nothing to do then.
                    let _ = reply.send(problems);
                    return;
                }
                Next::Control(Control::Swap(swap)) => {
                    self.swap(*swap);
                    continue;
                }
                Next::Control(Control::Outputs { outputs, done }) => {
                    let Outputs {
                        fanout,
                        version_header,
                    } = *outputs;
                    self.fanout = fanout;
                    self.version_header = version_header;
                    let _ = done.send(());
                    continue;
                }
                Next::Control(Control::Retire { reply }) => {
                    self.drain(true);
                    let _ = reply.send(());
                    return;
                }
                Next::Abandoned => {
                    let problems = self.stop();
                    for problem in problems {
                        tracing::error!("{problem}");
                    }
                    return;
                }
            };
            let mut round = Round::new();
            self.process(first, &mut round);
            // A control message ends the round: it is taken before the next batch.
            while round.completions.len() < MAX_ROUND && self.control.is_empty() {
                match self.input.try_recv() {
                    Ok(input) => self.process(input, &mut round),
                    Err(_) => break,
                }
            }
            self.finish_round(round);
        }
    }

    /// The next control message or batch, control first; blocks.
    fn next(&mut self) -> Next {
        if let Ok(control) = self.control.try_recv() {
            return Next::Control(control);
        }
        if let Ok(input) = self.input.try_recv() {
            return Next::Input(input);
        }
        let (control, input, open) = (&mut self.control, &mut self.input, &mut self.input_open);
        self.runtime.block_on(async {
            loop {
                tokio::select! {
                    biased;
                    message = control.recv() => return match message {
                        Some(message) => Next::Control(message),
                        None => Next::Abandoned,
                    },
                    batch = input.recv(), if *open => match batch {
                        Some(batch) => return Next::Input(batch),
                        // No source can send any more; control messages still come.
                        None => *open = false,
                    },
                }
            }
        })
    }

    fn swap(&mut self, swap: Swap) {
        let Swap {
            stage,
            replacement,
            probation,
            on_change,
            done,
            verdict,
            shared,
        } = swap;
        let started = Instant::now();
        let waiting = !self.input.is_empty();
        let result = self
            .chain
            .swap(stage, replacement, probation, &shared, on_change);
        let from = match (waiting, self.last_batch_end) {
            (true, Some(end)) => end.min(started),
            _ => started,
        };
        let pause = from.elapsed();
        let on_probation = self.chain.probation(stage).is_some();
        let draining = self.chain.draining(stage);
        if result.is_ok() {
            // Every worker swaps; the pipeline's stage counts one swap.
            if let (0, Some(metrics)) = (self.lane, self.stage_metrics.get(stage)) {
                metrics.swaps.inc();
                metrics.swap_pause.observe(pause.as_secs_f64());
            }
            if let (Some(verdict), true) = (verdict, on_probation) {
                self.verdicts.insert(stage, verdict);
            }
        }
        let _ = done.send(result.map(|previous| Swapped {
            previous,
            on_probation,
            draining,
            pause,
        }));
    }

    fn process(&mut self, input: Input, round: &mut Round) {
        let Input {
            batch,
            completion,
            position,
            rejected,
            batch_ms,
            ..
        } = input;
        round.completions.push(completion);
        if !rejected.is_empty() {
            for event in &rejected {
                round.dead.push(event);
            }
            round.dead_count += rejected.len();
            self.metrics.dead_letters.inc_by(rejected.len() as u64);
        }
        if let Some(Position { key, next }) = position {
            let at = round.positions.entry(key).or_insert(next);
            *at = (*at).max(next);
        }
        let view = batch.batch();
        // A worker's empty part of a batch split by key is no batch of its own.
        if !view.is_empty() {
            self.metrics.batches_in.inc();
        }
        self.metrics.events_in.inc_by(view.len() as u64);
        let (output, kept) = if self.chain.is_empty() {
            (batch.clone(), None)
        } else {
            self.versions.clear();
            let result = self.chain.process_part(&view, batch_ms);
            let events = self.finish_chain(result, view.bytes(), round);
            match (&self.version_header, events) {
                (Some(header), events) => {
                    let tagged = self.tag_versions(header, &events.to_batch(view.bytes()));
                    // SAFETY: built here.
                    (unsafe { SharedBatch::trusted(tagged) }, None)
                }
                // Only filters ran, and kept few: the kept events as a batch of their own.
                (None, events @ ChainEvents { batch: None, .. })
                    if events
                        .kept
                        .as_ref()
                        .is_some_and(|k| k.count() * SPARSE < view.len()) =>
                {
                    let bytes = events.to_batch(view.bytes()).into_owned();
                    // SAFETY: built here from a verified batch.
                    (unsafe { SharedBatch::trusted(bytes) }, None)
                }
                // Only filters ran: the input itself, with what they kept.
                (None, ChainEvents { batch: None, kept }) => (batch.clone(), kept),
                (
                    None,
                    ChainEvents {
                        batch: Some(bytes),
                        kept,
                    },
                ) => {
                    // SAFETY: a chain's output is a batch the host built or verified.
                    (unsafe { SharedBatch::trusted(bytes) }, kept)
                }
            }
        };
        self.fan_out(&output, kept.as_ref(), round);
        self.last_batch_end = Some(Instant::now());
    }

    /// The output with header `header` on every event: `STAGE=VERSION` of every stage that made
    /// it, comma-separated.
    fn tag_versions(&self, header: &str, bytes: &[u8]) -> Vec<u8> {
        let value = self
            .versions
            .iter()
            .map(|(stage, version)| {
                let name = self.chain.stages().get(*stage).map_or("", |s| s.name());
                format!("{name}={version}")
            })
            .collect::<Vec<_>>()
            .join(",");
        let mut tagged = BatchBuilder::new();
        // SAFETY: a chain's output is a batch the host built or verified.
        for event in unsafe { Batch::trusted(bytes) }.iter() {
            tagged.push_parts(
                event.key(),
                event.value(),
                event.timestamp_ms(),
                event
                    .headers()
                    .filter(|(name, _)| *name != header)
                    .chain([(header, value.as_bytes())]),
                event.route(),
                event.source(),
            );
        }
        tagged.finish()
    }

    /// Takes a chain's result to the end: delivers what it finished, runs a failed stage's
    /// input again (with backoff), and makes that input dead letters once the attempts are
    /// spent. Returns the output events, `input` being the batch the chain was given.
    fn finish_chain(
        &mut self,
        mut result: Result<ChainOutput, Box<ChainError>>,
        input: &[u8],
        round: &mut Round,
    ) -> ChainEvents {
        let mut parts = Vec::new();
        let mut attempt = 0;
        // The input of the run `result` comes from, once a stage's input was run again.
        let mut resumed: Option<Vec<u8>> = None;
        loop {
            let base = resumed.as_deref().unwrap_or(input);
            match result {
                Ok(output) => {
                    let events = self.take(output, round);
                    if resumed.is_none() {
                        return events;
                    }
                    parts.push(events.to_batch(base).into_owned());
                    break;
                }
                Err(e) => {
                    let ChainError {
                        stage,
                        name,
                        error,
                        output,
                        pending,
                    } = *e;
                    parts.push(self.take(output, round).to_batch(base).into_owned());
                    attempt += 1;
                    let message = format!(
                        "pipeline `{}`: stage `{name}` cannot run: {error}",
                        self.name
                    );
                    if attempt >= self.config.stage_attempts {
                        tracing::error!(
                            "{message} (attempt {attempt} of {}); its input becomes dead letters",
                            self.config.stage_attempts
                        );
                        self.dead_letter_pending(stage, &pending, &error, round);
                        break;
                    }
                    tracing::warn!(
                        "{message} (attempt {attempt} of {}; retrying)",
                        self.config.stage_attempts
                    );
                    let wait = self.config.backoff(attempt);
                    if !self.stopping.is_set() {
                        std::thread::sleep(wait);
                    }
                    result = self.chain.resume(stage, &pending);
                    resumed = Some(pending);
                }
            }
        }
        ChainEvents {
            batch: Some(merge(parts)),
            kept: None,
        }
    }

    /// Counts what the stages did, collects dead letters and late events into the round, and
    /// returns the output events.
    fn take(&mut self, output: ChainOutput, round: &mut Round) -> ChainEvents {
        for verdict in output.verdicts {
            self.verdict(verdict);
        }
        for run in &output.runs {
            match self
                .versions
                .iter_mut()
                .find(|(stage, _)| *stage == run.stage)
            {
                Some(seen) => seen.1.clone_from(&run.version),
                None => self.versions.push((run.stage, run.version.clone())),
            }
            if run.events_in > 0 {
                let version = self.version_metrics(run.stage, &run.version);
                version.batches.inc();
                version.failed_events.inc_by(run.failed as u64);
            }
            let Some(metrics) = self.stage_metrics.get(run.stage) else {
                continue;
            };
            // A worker's empty part of a batch split by key is no call worth timing.
            if run.events_in > 0 || run.events_out > 0 {
                metrics.latency.observe(run.elapsed.as_secs_f64());
            }
            metrics.events_in.inc_by(run.events_in as u64);
            metrics.events_out.inc_by(run.events_out as u64);
            metrics.errors.inc_by(run.failed as u64);
            if run.retried.is_some() {
                metrics.retried.inc();
            }
            // An aggregate folds its input into windows: nothing of it is dropped.
            let aggregate = self
                .chain
                .stages()
                .get(run.stage)
                .is_some_and(|s| s.plugin().kind() == PluginKind::Aggregate);
            if !aggregate {
                metrics
                    .dropped
                    .inc_by(run.events_in.saturating_sub(run.events_out + run.failed) as u64);
            }
        }
        self.dead_letters(&output.dead_letters, &output.late, round);
        output.events
    }

    /// The series of one version of stage `stage`, asked for once.
    fn version_metrics(&mut self, stage: usize, version: &str) -> &VersionMetrics {
        let key = (stage, version.to_owned());
        let (metrics, name, chain) = (&self.registry, &self.name, &self.chain);
        self.version_series.entry(key).or_insert_with(|| {
            let stage = chain.stages().get(stage).map_or("", |s| s.name());
            metrics.stage_version(name, stage, version)
        })
    }

    /// A probation ended: count it, log it, tell whoever deployed the version.
    fn verdict(&mut self, verdict: Verdict) {
        let stage = match &verdict {
            Verdict::Passed { stage, .. }
            | Verdict::RolledBack { stage, .. }
            | Verdict::Drained { stage, .. } => *stage,
        };
        let name = self
            .chain
            .stages()
            .get(stage)
            .map_or("", |s| s.name())
            .to_owned();
        match &verdict {
            Verdict::Passed {
                version, batches, ..
            } => tracing::info!(
                "pipeline `{}`, stage `{name}`: version {version} passed its probation ({batches} batches)",
                self.name
            ),
            Verdict::Drained { version, .. } => tracing::info!(
                "pipeline `{}`, stage `{name}`: version {version} finished the last window it opened before the state layout changed, and is dropped",
                self.name
            ),
            Verdict::RolledBack {
                version,
                restored,
                error,
                batches,
                followed,
                ..
            } => {
                if let (false, Some(metrics)) = (followed, self.stage_metrics.get(stage)) {
                    metrics.rollbacks.inc();
                }
                tracing::error!(
                    "pipeline `{}`, stage `{name}`: version {version} rolled back to {restored} after {batches} batches on probation: {error}",
                    self.name
                );
            }
        }
        if let Some(report) = self.verdicts.remove(&stage) {
            let _ = report.send(verdict);
        }
    }

    /// The events of a stage's input that it could not run on, as its dead letters.
    fn dead_letter_pending(
        &mut self,
        stage: usize,
        pending: &[u8],
        error: &PluginError,
        round: &mut Round,
    ) {
        let Ok(batch) = Batch::verify(pending) else {
            // A chain's pending batch is host-built; never lose it silently all the same.
            round.refused.push(format!(
                "pipeline `{}`: a batch that stage {stage} could not run on is not a weir batch",
                self.name
            ));
            return;
        };
        let Some(failing) = self.chain.stages().get(stage) else {
            return;
        };
        let letters: Vec<DeadLetter> = batch
            .iter()
            .enumerate()
            .map(|(index, event)| DeadLetter {
                event: event.to_event(),
                index,
                window: None,
                error: format!("cannot run: {error}"),
                plugin: failing.plugin().name().to_owned(),
                version: failing.plugin().version().to_owned(),
                stage: failing.name().to_owned(),
            })
            .collect();
        if let Some(metrics) = self.stage_metrics.get(stage) {
            metrics.events_in.inc_by(letters.len() as u64);
            metrics.errors.inc_by(letters.len() as u64);
        }
        self.dead_letters(&letters, &[], round);
    }

    /// Offers the events of `output` that `kept` holds (`None`: every one) to the sinks.
    fn fan_out(&mut self, output: &SharedBatch, kept: Option<&KeepBitmap>, round: &mut Round) {
        self.tap.offer_output(output, kept);
        let n = kept.map_or(output.batch().len(), KeepBitmap::count) as u64;
        self.metrics.events_out.inc_by(n);
        let refused = self
            .fanout
            .offer(output, kept, &round.ticket, &self.metrics);
        round.refused.extend(refused);
    }

    fn dead_letters(&mut self, dead: &[DeadLetter], late: &[LateEvent], round: &mut Round) {
        for d in dead {
            tracing::warn!(
                "pipeline `{}`: dead letter from stage `{}` (plugin `{}` {}): {}",
                self.name,
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
        self.metrics.dead_letters.inc_by(dead.len() as u64);
        self.metrics.late_events.inc_by(late.len() as u64);
    }

    /// Hands the round's dead letters to the dead-letter sink, syncs the disk buffers written,
    /// and seals the round's ticket with its completions.
    fn finish_round(&mut self, mut round: Round) {
        if round.dead_count > 0 {
            match SharedBatch::verify(round.dead.finish()) {
                Ok(letters) => {
                    if let Err(e) = self.fanout.offer_dead_letters(letters, &round.ticket) {
                        round.refused.push(e);
                    }
                }
                // The host built this batch: it always verifies. Never lose it silently.
                Err(e) => round.refused.push(format!(
                    "{} dead letters not written: {e}",
                    round.dead_count
                )),
            }
        }
        for sink in self.fanout.sinks() {
            let mut attempt: u32 = 0;
            while let Err(e) = sink.sync() {
                attempt += 1;
                tracing::error!(
                    "pipeline `{}`: {e} (attempt {attempt}; acks wait)",
                    self.name
                );
                if self.stopping.is_set() && attempt >= self.config.stop_sync_attempts {
                    round.refused.push(e);
                    break;
                }
                std::thread::sleep(Duration::from_millis(100 * u64::from(attempt.min(50))));
            }
        }
        let Round {
            ticket,
            completions,
            refused,
            positions,
            ..
        } = round;
        if let Some(first) = refused.first() {
            for message in &refused {
                tracing::error!("pipeline `{}`: {message}", self.name);
            }
            ticket.fail(first.clone());
        }
        let problems = self.problems.clone();
        let name = self.name.clone();
        let note = move |result: &Result<(), String>| {
            if let Err(reason) = result {
                let problem = format!("pipeline `{name}`: {reason}; its batches are not acked");
                let mut problems = lock(&problems);
                if !problems.contains(&problem) {
                    tracing::error!("{problem}");
                    problems.push(problem);
                }
            }
        };
        match &self.checkpoint {
            None => ticket.seal(move |result| {
                note(&result);
                for completion in completions {
                    completion.resolve(result.clone());
                }
            }),
            // Acked once the sinks accepted the round and its changes are committed.
            Some(checkpoint) => {
                let number = checkpoint.next_round();
                let changes = self.chain.take_state_changes();
                let positions = positions
                    .into_iter()
                    .map(|(key, next)| Position { key, next })
                    .collect();
                let checkpoint = checkpoint.clone();
                ticket.seal(move |result| {
                    note(&result);
                    checkpoint.round_done(number, changes, positions, result, completions);
                });
            }
        }
        self.outstanding.retain(|t| !t.is_resolved());
        self.outstanding.push(ticket);
    }

    /// Processes what is queued, flushes windows, waits (bounded) for the sinks; the problems.
    fn stop(&mut self) -> Vec<String> {
        self.stopping.begin();
        // A checkpointed pipeline keeps its open windows for the next start.
        self.drain(self.checkpoint.is_none());

        let since = self
            .stopping
            .since
            .get()
            .copied()
            .unwrap_or_else(Instant::now);
        let deadline = since + self.config.stop_wait;
        for ticket in std::mem::take(&mut self.outstanding) {
            if !ticket.wait_until(deadline) {
                ticket.fail(format!(
                    "a sink did not accept the last batches in {:?}",
                    self.config.stop_wait
                ));
                // A sink's task may be running the ticket's callback right now: its problem
                // belongs in this report (the callback never blocks).
                ticket.wait_until(Instant::now() + CALLBACK_WAIT);
            }
        }
        std::mem::take(&mut *lock(&self.problems))
    }

    /// Takes no more batches, processes what is queued (waiting for batches a source holds
    /// room for: they are its to hand over), and, with `flush`, finishes the open windows.
    fn drain(&mut self, flush: bool) {
        self.input.close();
        loop {
            let mut round = Round::new();
            while round.completions.len() < MAX_ROUND {
                match self.input.try_recv() {
                    Ok(input) => self.process(input, &mut round),
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                    Err(mpsc::error::TryRecvError::Empty) if !round.completions.is_empty() => {
                        break;
                    }
                    // Empty, but a source may hold room it is about to use: wait for it (the
                    // queue ends once no room is held).
                    Err(mpsc::error::TryRecvError::Empty) => {
                        let input = &mut self.input;
                        match self.runtime.block_on(input.recv()) {
                            Some(input) => self.process(input, &mut round),
                            None => break,
                        }
                    }
                }
            }
            if round.completions.is_empty() {
                break;
            }
            self.finish_round(round);
        }
        let mut round = Round::new();
        if flush {
            self.flush_windows(&mut round);
        }
        self.finish_round(round);
    }

    /// End of input: aggregates finish their open windows; the results are fanned out.
    fn flush_windows(&mut self, round: &mut Round) {
        let mut attempt = 0;
        loop {
            match self.chain.flush() {
                Ok(output) => {
                    let events = self.take(output, round);
                    self.fan_out_flushed(&events, &[], round);
                    return;
                }
                Err(e) => {
                    let e = *e;
                    let events = self.take(e.output, round);
                    self.fan_out_flushed(&events, &[], round);
                    // What the failing stage did not take goes on through the rest first.
                    let resumed = self.chain.resume(e.stage, &e.pending);
                    let events = self.finish_chain(resumed, &e.pending, round);
                    self.fan_out_flushed(&events, &e.pending, round);
                    attempt += 1;
                    if attempt >= self.config.stage_attempts {
                        let message = format!(
                            "pipeline `{}`: windows not flushed at shutdown: stage `{}`: {}",
                            self.name, e.name, e.error
                        );
                        tracing::error!("{message}");
                        lock(&self.problems).push(message);
                        return;
                    }
                }
            }
        }
    }

    /// Fans out what a flush made (`input`: the batch a resumed run was given; a flush's own
    /// output is a batch of its own).
    fn fan_out_flushed(&mut self, events: &ChainEvents, input: &[u8], round: &mut Round) {
        match SharedBatch::verify(events.to_batch(input).into_owned()) {
            Ok(batch) => self.fan_out(&batch, None, round),
            Err(e) => round
                .refused
                .push(format!("window results not written: {e}")),
        }
    }
}

/// One batch of the parts a chain returned (usually one; more after a stage failed).
fn merge(mut parts: Vec<Vec<u8>>) -> Vec<u8> {
    // SAFETY: every part is a chain's output, built or verified by the host.
    parts.retain(|p| !unsafe { Batch::trusted(p) }.is_empty());
    match parts.len() {
        0 => BatchBuilder::new().finish(),
        1 => parts.pop().unwrap_or_default(),
        _ => {
            let mut merged = BatchBuilder::new();
            for part in &parts {
                // SAFETY: as above.
                for event in unsafe { Batch::trusted(part) }.iter() {
                    merged.push_ref(&event, event.source());
                }
            }
            merged.finish()
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

#[cfg(test)]
mod tests;
