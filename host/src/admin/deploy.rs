//! Deploys and rollbacks: a new version of a stage's plugin is compiled (or taken from the
//! compile cache), checked against the stage's world, instantiated and initialized with the
//! stage's config, all off the hot path, then handed to the pipeline's worker, which swaps it
//! in between two batches, on probation (`pipeline/chain.rs`).
//!
//! Decisions:
//!
//! - **One deploy per stage at a time.** A second deploy (or rollback) of a stage while one is
//!   being prepared or is on probation is refused, naming what is in progress; deploys to
//!   other stages go ahead in parallel.
//! - **A version that cannot serve never replaces one that does**: a file that is not a
//!   component, the wrong world, a missing export, an `init` that refuses the stage's config
//!   are refused before the worker hears of them, with the loader's error; the registry keeps
//!   it as the stage's last error.
//! - **The deploy outlives its request.** The probation is awaited by a task of its own that
//!   records the verdict in the registry and releases the stage; the request waits for it at
//!   most `wait`, then reports the version as on probation.
//! - **Deploy-to-serving time** is measured from the request to the swap being done.

use super::registry::{Registry, StageRecord, Status};
use crate::metrics::Metrics;
use crate::pipeline::{
    PipelineControl, SharedProbation, Stage, StateChange, Swap, SwapRefused, Swapped, Verdict,
    WindowConfig,
};
use crate::runtime::{Digest, PluginKind, Runtime, StageConfig};
use crate::utc::now_ms;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Batches a new version is on probation for unless the deploy says otherwise.
pub const DEFAULT_PROBATION: u64 = 100;
/// How long a deploy request waits for the probation's verdict unless it says otherwise.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// A stage as a deploy sees it: what a new version of it must be and get.
#[derive(Debug, Clone)]
pub struct StageTarget {
    /// The stage's name.
    pub name: String,
    /// The world its plugin implements.
    pub kind: PluginKind,
    /// What `init` gets, and the limits.
    pub config: StageConfig,
    /// The window of an aggregate stage.
    pub window: Option<WindowConfig>,
}

/// A pipeline as a deploy sees it.
#[derive(Clone)]
pub struct PipelineTarget {
    /// Its worker.
    pub control: PipelineControl,
    /// Its stages, in order.
    pub stages: Vec<StageTarget>,
}

/// What a deploy (or rollback) asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeployOptions {
    /// Batches on probation (0: none).
    pub probation: u64,
    /// What to do when an aggregate's new version writes another state layout.
    pub state: StateChange,
    /// How long the request waits for the probation's verdict.
    pub wait: Duration,
}

impl Default for DeployOptions {
    fn default() -> Self {
        DeployOptions {
            probation: DEFAULT_PROBATION,
            state: StateChange::Refuse,
            wait: DEFAULT_WAIT,
        }
    }
}

/// Where a deployed version stands when the request returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Serving (passed its probation, or had none).
    Serving,
    /// Swapped in, still on probation when the request stopped waiting.
    Probation,
    /// Failed on probation and rolled back: the previous version serves.
    RolledBack,
    /// The stage already runs this version: nothing was done.
    Unchanged,
}

/// What a deploy or rollback did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployReport {
    /// The pipeline.
    pub pipeline: String,
    /// The stage.
    pub stage: String,
    /// The plugin's name.
    pub name: String,
    /// The version (8 hex digits).
    pub version: String,
    /// Its SHA-256, 64 hex digits.
    pub digest: String,
    /// The version that served before (8 hex digits).
    pub previous: String,
    /// Where it stands.
    pub outcome: Outcome,
    /// Batches on probation asked for.
    pub probation: u64,
    /// Batches it processed so far.
    pub batches: u64,
    /// Milliseconds spent compiling (or loading from the compile cache).
    pub compile_ms: f64,
    /// Whether the compiled plugin came from the compile cache.
    pub from_cache: bool,
    /// Milliseconds spent instantiating and initializing it.
    pub init_ms: f64,
    /// Microseconds batches waited for the swap.
    pub pause_us: f64,
    /// Windows the previous version finishes because the state layout changed (`--state
    /// drain`).
    pub draining_windows: u64,
    /// Milliseconds from the request to the version serving (swapped in).
    pub serving_ms: f64,
    /// Why it was rolled back.
    pub error: Option<String>,
}

/// What a deploy or rollback did, in a few lines (as `weir deploy` and `weir reload` print it).
impl std::fmt::Display for DeployReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self;
        let target = format!("{}/{}", r.pipeline, r.stage);
        let prepared = format!(
            "{} in {:.0} ms, initialized in {:.1} ms, swapped in {:.0} ms after the request (batches waited {:.2} ms)",
            if r.from_cache {
                "loaded from the compile cache"
            } else {
                "compiled"
            },
            r.compile_ms,
            r.init_ms,
            r.serving_ms,
            r.pause_us / 1e3
        );
        let text = match r.outcome {
            Outcome::Unchanged => format!(
                "{target}: already serving `{}` {}; nothing to do",
                r.name, r.version
            ),
            Outcome::Serving if r.draining_windows > 0 => format!(
                "{target}: `{}` {} serves (was {}): {prepared}\n  the state layout changed: {} finishes the {} windows it opened, {} takes every other",
                r.name, r.version, r.previous, r.previous, r.draining_windows, r.version
            ),
            Outcome::Serving if r.probation == 0 => format!(
                "{target}: `{}` {} serves (was {}): {prepared}",
                r.name, r.version, r.previous
            ),
            Outcome::Serving => format!(
                "{target}: `{}` {} serves (was {}): {prepared}\n  probation passed: {} batches without a failure; {} is kept for `weir rollback`",
                r.name, r.version, r.previous, r.batches, r.previous
            ),
            Outcome::Probation => format!(
                "{target}: `{}` {} swapped in (was {}): {prepared}\n  on probation: {} of {} batches so far; `weir plugins` shows the verdict",
                r.name, r.version, r.previous, r.batches, r.probation
            ),
            Outcome::RolledBack => format!(
                "{target}: `{}` {} swapped in (was {}): {prepared}\n  rolled back after {} batches on probation; {} serves again, and it took the batch the new version failed on",
                r.name, r.version, r.previous, r.batches, r.previous
            ),
        };
        f.write_str(&text)
    }
}

/// Why a deploy or rollback did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeployError {
    /// No such pipeline, stage or version.
    #[error("{0}")]
    NotFound(String),
    /// Another deploy of the stage is in progress.
    #[error("{0}")]
    Busy(String),
    /// The version cannot serve (module, world, exports, init): the old one still serves.
    #[error("{0}")]
    Refused(String),
    /// Something on weir's side failed (the registry's disk, a stopped pipeline).
    #[error("{0}")]
    Internal(String),
}

/// Everything the admin endpoint needs to deploy into a running router.
pub struct Deployer {
    runtime: Runtime,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// The pipelines as they run now (a reload changes them).
    pipelines: RwLock<BTreeMap<String, PipelineTarget>>,
    /// Stages with a deploy in progress, and what it is.
    busy: Mutex<HashMap<(String, String), String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The map is updated in single steps: a poisoned lock's data is whole.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A stage claimed for one deploy (or reload); released when dropped.
pub(crate) struct Claim {
    deployer: Arc<Deployer>,
    key: (String, String),
}

impl Claim {
    fn update(&self, doing: String) {
        if let Some(entry) = lock(&self.deployer.busy).get_mut(&self.key) {
            *entry = doing;
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        lock(&self.deployer.busy).remove(&self.key);
    }
}

/// A reload's change of one stage, claimed and prepared, not swapped in yet.
pub(crate) struct PreparedChange {
    claim: Claim,
    index: usize,
    target: StageTarget,
    record: StageRecord,
    prepared: Prepared,
}

/// A new version, ready to be swapped in.
pub(crate) struct Prepared {
    /// Who asked, as the registry records it: `deploy`, `config` (a reload's config names a
    /// new plugin), or `None` (a reload gave the serving version new `with` values or limits:
    /// the same version, nothing to record).
    origin: Option<&'static str>,
    /// One instance per worker of the pipeline.
    stages: Vec<Stage>,
    /// Its component, stored in the registry once it is swapped in.
    bytes: Vec<u8>,
    digest: Digest,
    name: String,
    compile: Duration,
    from_cache: bool,
    init: Duration,
}

impl Deployer {
    /// A deployer for these pipelines.
    pub fn new(
        runtime: Runtime,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        pipelines: BTreeMap<String, PipelineTarget>,
    ) -> Deployer {
        Deployer {
            runtime,
            registry,
            metrics,
            pipelines: RwLock::new(pipelines),
            busy: Mutex::new(HashMap::new()),
        }
    }

    /// Pipeline `name` runs as `target` from now on (a reload added or changed it).
    pub(crate) fn set_pipeline(&self, name: &str, target: PipelineTarget) {
        self.pipelines
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), target);
    }

    /// Pipeline `name` is no more (a reload removed it).
    pub(crate) fn remove_pipeline(&self, name: &str) {
        self.pipelines
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The pipelines and their stages, in name order.
    pub fn pipelines(&self) -> BTreeMap<String, PipelineTarget> {
        self.pipelines
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Batches version `version` of stage `pipeline/stage` processed since the router started.
    pub fn batches(&self, pipeline: &str, stage: &str, version: &str) -> (u64, u64) {
        let m = self.metrics.stage_version(pipeline, stage, version);
        (m.batches.get(), m.failed_events.get())
    }

    fn find(&self, pipeline: &str, stage: &str) -> Result<(usize, PipelineTarget), DeployError> {
        let pipelines = self.pipelines();
        let Some(target) = pipelines.get(pipeline).cloned() else {
            let known: Vec<String> = pipelines.keys().map(|p| format!("`{p}`")).collect();
            return Err(DeployError::NotFound(format!(
                "unknown pipeline `{pipeline}` (pipelines: {})",
                known.join(", ")
            )));
        };
        match target.stages.iter().position(|s| s.name == stage) {
            Some(index) => Ok((index, target)),
            None => {
                let known: Vec<String> = target
                    .stages
                    .iter()
                    .map(|s| format!("`{}`", s.name))
                    .collect();
                Err(DeployError::NotFound(format!(
                    "pipeline `{pipeline}` has no stage `{stage}` (stages: {})",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                )))
            }
        }
    }

    pub(crate) fn claim(
        self: &Arc<Self>,
        pipeline: &str,
        stage: &str,
        doing: String,
    ) -> Result<Claim, DeployError> {
        let key = (pipeline.to_owned(), stage.to_owned());
        let mut busy = lock(&self.busy);
        if let Some(what) = busy.get(&key) {
            return Err(DeployError::Busy(format!(
                "a deploy to `{pipeline}/{stage}` is in progress ({what}); try again when it is done"
            )));
        }
        busy.insert(key.clone(), doing);
        Ok(Claim {
            deployer: self.clone(),
            key,
        })
    }

    /// Deploys `bytes` (a component named `name`) to stage `stage` of `pipeline`.
    pub async fn deploy(
        self: &Arc<Self>,
        pipeline: &str,
        stage: &str,
        name: &str,
        bytes: Vec<u8>,
        options: DeployOptions,
    ) -> Result<DeployReport, DeployError> {
        let started = Instant::now();
        let (index, target) = self.find(pipeline, stage)?;
        let claim = self.claim(pipeline, stage, format!("`{name}` being prepared"))?;
        let record = self.record(pipeline, stage)?;
        let digest = Digest::of(&bytes);
        if record.serving == digest.hex() {
            let (batches, _) = self.batches(pipeline, stage, &digest.short());
            return Ok(DeployReport {
                pipeline: pipeline.to_owned(),
                stage: stage.to_owned(),
                name: name.to_owned(),
                version: digest.short(),
                digest: digest.hex(),
                previous: digest.short(),
                outcome: Outcome::Unchanged,
                probation: 0,
                batches,
                compile_ms: 0.0,
                from_cache: false,
                init_ms: 0.0,
                pause_us: 0.0,
                draining_windows: 0,
                serving_ms: 0.0,
                error: None,
            });
        }
        let workers = target.control.workers();
        let prepared = self
            .prepare(&target.stages[index], name, bytes, workers)
            .await;
        let prepared = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                let message =
                    format!("`{pipeline}/{stage}`: {e}; the serving version is unchanged");
                tracing::warn!("deploy refused: {message}");
                self.note_refused(pipeline, stage, &message);
                return Err(DeployError::Refused(message));
            }
        };
        self.detached(
            claim,
            target.control,
            index,
            record,
            prepared,
            options,
            started,
        )
        .await
    }

    /// Rolls stage `stage` of `pipeline` back to `version` (a digest, or its first 4 or more hex
    /// digits), or to the version that served before the current one. No probation: the
    /// version served before.
    pub async fn rollback(
        self: &Arc<Self>,
        pipeline: &str,
        stage: &str,
        version: Option<&str>,
    ) -> Result<DeployReport, DeployError> {
        let started = Instant::now();
        let (index, target) = self.find(pipeline, stage)?;
        let claim = self.claim(pipeline, stage, "a rollback".into())?;
        let record = self.record(pipeline, stage)?;
        let chosen = match version {
            Some(prefix) => {
                let prefix = prefix.to_ascii_lowercase();
                let matching: Vec<_> = record
                    .versions
                    .iter()
                    .filter(|v| prefix.len() >= 4 && v.digest.starts_with(&prefix))
                    .collect();
                match matching.as_slice() {
                    [one] => (*one).clone(),
                    [] => {
                        return Err(DeployError::NotFound(format!(
                            "`{pipeline}/{stage}` keeps no version `{prefix}` (kept: {}; give 4 or more hex digits)",
                            kept(&record)
                        )));
                    }
                    _ => {
                        return Err(DeployError::NotFound(format!(
                            "`{prefix}` names more than one version of `{pipeline}/{stage}`: give more hex digits"
                        )));
                    }
                }
            }
            None => match record
                .versions
                .iter()
                .filter(|v| v.digest != record.serving && v.status == Status::Kept)
                .max_by_key(|v| v.deployed_at_ms)
            {
                Some(v) => v.clone(),
                None => {
                    return Err(DeployError::NotFound(format!(
                        "`{pipeline}/{stage}` keeps no earlier version to roll back to (kept: {})",
                        kept(&record)
                    )));
                }
            },
        };
        if chosen.digest == record.serving {
            return Err(DeployError::Refused(format!(
                "`{pipeline}/{stage}` already serves {}",
                chosen.digest.get(..8).unwrap_or_default()
            )));
        }
        let digest = Digest::parse(&chosen.digest).ok_or_else(|| {
            DeployError::Internal(format!(
                "the registry holds a bad digest `{}`",
                chosen.digest
            ))
        })?;
        let bytes = self
            .registry
            .blob(&digest)
            .map_err(|e| DeployError::Internal(e.to_string()))?;
        let prepared = self
            .prepare(
                &target.stages[index],
                &chosen.name,
                bytes,
                target.control.workers(),
            )
            .await
            .map_err(|e| DeployError::Refused(format!("`{pipeline}/{stage}`: {e}")))?;
        let options = DeployOptions {
            probation: 0,
            state: StateChange::Refuse,
            wait: Duration::ZERO,
        };
        self.detached(
            claim,
            target.control,
            index,
            record,
            prepared,
            options,
            started,
        )
        .await
    }

    /// Claims every stage of `pipeline` for a reload that removes or restarts it: refused,
    /// naming the deploy, when one is in progress.
    pub(crate) fn claim_pipeline(
        self: &Arc<Self>,
        pipeline: &str,
    ) -> Result<Vec<Claim>, DeployError> {
        let stages = self
            .pipelines()
            .get(pipeline)
            .map(|t| t.stages.iter().map(|s| s.name.clone()).collect::<Vec<_>>())
            .unwrap_or_default();
        stages
            .iter()
            .map(|stage| self.claim(pipeline, stage, "a config reload".into()))
            .collect()
    }

    /// Prepares a reload's change of stage `target.name` of `pipeline` (new `with` values,
    /// limits, or plugin): claims the stage and instantiates and initializes the new version
    /// with the new config, off the hot path. `plugin`: the config's new plugin (name, bytes);
    /// `None`: the version serving now. Refused, naming the stage, when it cannot serve.
    pub(crate) async fn prepare_change(
        self: &Arc<Self>,
        pipeline: &str,
        target: StageTarget,
        plugin: Option<(String, Vec<u8>)>,
    ) -> Result<PreparedChange, DeployError> {
        let (index, _) = self.find(pipeline, &target.name)?;
        let stage = target.name.clone();
        let claim = self.claim(pipeline, &stage, "a config reload".into())?;
        let record = self.record(pipeline, &stage)?;
        let (origin, name, bytes) = match plugin {
            Some((name, bytes)) => (Some("config"), name, bytes),
            None => {
                let digest = Digest::parse(&record.serving).ok_or_else(|| {
                    DeployError::Internal(format!(
                        "the registry holds a bad digest `{}`",
                        record.serving
                    ))
                })?;
                let name = record
                    .version(&record.serving)
                    .map_or_else(|| stage.clone(), |v| v.name.clone());
                let bytes = self
                    .registry
                    .blob(&digest)
                    .map_err(|e| DeployError::Internal(e.to_string()))?;
                (None, name, bytes)
            }
        };
        let workers = self
            .pipelines()
            .get(pipeline)
            .map_or(1, |p| p.control.workers());
        let prepared = self.prepare(&target, &name, bytes, workers).await;
        let mut prepared = prepared.map_err(|e| {
            DeployError::Refused(format!("pipeline `{pipeline}`, stage `{stage}`: {e}"))
        })?;
        prepared.origin = origin;
        Ok(PreparedChange {
            claim,
            index,
            target,
            record,
            prepared,
        })
    }

    /// Swaps a prepared change in, as a deploy would (on probation; the verdict is recorded
    /// when it comes, not waited for), and makes the stage's new config the one later deploys
    /// get.
    pub(crate) async fn apply_change(
        self: &Arc<Self>,
        change: PreparedChange,
        control: PipelineControl,
    ) -> Result<DeployReport, DeployError> {
        let PreparedChange {
            claim,
            index,
            target,
            record,
            prepared,
        } = change;
        let pipeline = claim.key.0.clone();
        {
            let mut pipelines = self
                .pipelines
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(stage) = pipelines
                .get_mut(&pipeline)
                .and_then(|p| p.stages.get_mut(index))
            {
                *stage = target;
            }
        }
        let options = DeployOptions {
            wait: Duration::ZERO,
            ..DeployOptions::default()
        };
        self.detached(
            claim,
            control,
            index,
            record,
            prepared,
            options,
            Instant::now(),
        )
        .await
    }

    /// Runs [`Deployer::swap_in`] on a task of its own and waits for it: once the worker has
    /// the new version, the swap, its record in the registry and the verdict's go on even if
    /// the request is dropped (a client that gave up, the endpoint stopping).
    #[allow(clippy::too_many_arguments)]
    async fn detached(
        self: &Arc<Self>,
        claim: Claim,
        control: PipelineControl,
        index: usize,
        record: StageRecord,
        prepared: Prepared,
        options: DeployOptions,
        started: Instant,
    ) -> Result<DeployReport, DeployError> {
        let me = self.clone();
        tokio::spawn(async move {
            me.swap_in(claim, control, index, record, prepared, options, started)
                .await
        })
        .await
        .map_err(|e| DeployError::Internal(format!("the deploy's task failed: {e}")))?
    }

    fn record(&self, pipeline: &str, stage: &str) -> Result<StageRecord, DeployError> {
        self.registry.stage(pipeline, stage).ok_or_else(|| {
            DeployError::Internal(format!(
                "the registry has no record of `{pipeline}/{stage}`"
            ))
        })
    }

    fn note_refused(&self, pipeline: &str, stage: &str, message: &str) {
        if let Err(e) = self.registry.refused(pipeline, stage, message, now_ms()) {
            tracing::error!("{e}");
        }
    }

    /// Compiles (or loads from the cache) and initializes a version for `target`, one
    /// instance for each of the pipeline's `workers`, off the async workers.
    async fn prepare(
        &self,
        target: &StageTarget,
        name: &str,
        bytes: Vec<u8>,
        workers: usize,
    ) -> Result<Prepared, String> {
        let runtime = self.runtime.clone();
        let target = target.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let plugin = runtime
                .load_bytes_as(&name, &bytes, target.kind)
                .map_err(|e| e.to_string())?;
            let compile = started.elapsed();
            let started = Instant::now();
            let stages = (0..workers.max(1))
                .map(|_| Stage::new(&plugin, target.config.clone(), target.window))
                .collect::<Result<Vec<Stage>, _>>()
                .map_err(|e| e.to_string())?;
            let init = started.elapsed();
            Ok(Prepared {
                origin: Some("deploy"),
                from_cache: plugin.from_cache(),
                stages,
                digest: Digest::of(&bytes),
                bytes,
                name,
                compile,
                init,
            })
        })
        .await
        .map_err(|e| format!("preparing the version failed: {e}"))?
    }

    /// Swaps a prepared version in and, on probation, waits (bounded) for the verdict.
    #[allow(clippy::too_many_arguments)]
    async fn swap_in(
        self: &Arc<Self>,
        claim: Claim,
        control: PipelineControl,
        index: usize,
        record: StageRecord,
        prepared: Prepared,
        options: DeployOptions,
        started: Instant,
    ) -> Result<DeployReport, DeployError> {
        let (pipeline, stage) = claim.key.clone();
        let Prepared {
            origin,
            stages: replacements,
            bytes,
            digest,
            name,
            compile,
            from_cache,
            init,
        } = prepared;
        let version = digest.short();
        claim.update(format!("version {version} being swapped in"));
        // Every worker swaps its own instance in; they share the probation, so the first
        // verdict is the pipeline's.
        let shared = Arc::new(SharedProbation::default());
        let (verdict_tx, mut verdict_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut dones = Vec::new();
        let mut unsent = None;
        for (lane, replacement) in replacements.into_iter().enumerate() {
            let (done, swapped) = oneshot::channel();
            let (verdict, told) = oneshot::channel();
            let swap = Swap {
                stage: index,
                replacement,
                probation: options.probation,
                on_change: options.state,
                done,
                verdict: Some(verdict),
                shared: shared.clone(),
            };
            // A worker that ended: the pipeline is stopping; the workers told already go back.
            if let Err(e) = control.swap(lane, swap) {
                unsent = Some(e);
                break;
            }
            let verdict_tx = verdict_tx.clone();
            tokio::spawn(async move {
                if let Ok(verdict) = told.await {
                    let _ = verdict_tx.send(verdict);
                }
            });
            dones.push(swapped);
        }
        drop(verdict_tx);
        let mut swaps = Vec::new();
        for swapped in dones {
            swaps.push(swapped.await.map_err(|_| {
                DeployError::Internal(format!("pipeline `{pipeline}` stopped before the swap"))
            })?);
        }
        if let Some(e) = unsent {
            self.undo(&control, index, swaps, &shared, &e);
            return Err(DeployError::Internal(e));
        }
        if let Some(refused) = swaps.iter().find_map(|s| s.as_ref().err()) {
            let message = format!("`{pipeline}/{stage}`: {}", refused.message);
            self.undo(&control, index, swaps, &shared, &message);
            self.note_refused(&pipeline, &stage, &message);
            return Err(DeployError::Refused(message));
        }
        let serving = started.elapsed();
        let swaps: Vec<Swapped> = swaps.into_iter().flatten().collect();
        let on_probation = swaps.iter().any(|s| s.on_probation);
        let pause = swaps.iter().map(|s| s.pause).max().unwrap_or_default();
        let draining: usize = swaps.iter().map(|s| s.draining).sum();
        let previous: Vec<Stage> = swaps.into_iter().filter_map(|s| s.previous).collect();
        tokio::task::spawn_blocking(move || drop(previous));
        if let Some(origin) = origin {
            self.registry
                .swapped(
                    &pipeline,
                    &stage,
                    &bytes,
                    &name,
                    origin,
                    on_probation,
                    now_ms(),
                )
                .map_err(|e| DeployError::Internal(e.to_string()))?;
        }
        drop(bytes);
        let previous = record.serving.get(..8).unwrap_or_default().to_owned();
        tracing::info!(
            "pipeline `{pipeline}`, stage `{stage}`: version {version} of `{name}` swapped in for {previous} (pause {:?}){}",
            pause,
            if on_probation {
                format!(", on probation for {} batches", options.probation)
            } else {
                String::new()
            }
        );
        let mut report = DeployReport {
            pipeline: pipeline.clone(),
            stage: stage.clone(),
            name,
            version: version.clone(),
            digest: digest.hex(),
            previous,
            outcome: Outcome::Serving,
            probation: if on_probation { options.probation } else { 0 },
            batches: 0,
            compile_ms: compile.as_secs_f64() * 1e3,
            from_cache,
            init_ms: init.as_secs_f64() * 1e3,
            pause_us: pause.as_secs_f64() * 1e6,
            draining_windows: draining as u64,
            serving_ms: serving.as_secs_f64() * 1e3,
            error: None,
        };
        if !on_probation {
            return Ok(report);
        }
        claim.update(format!("version {version} on probation"));
        // The verdict is recorded even if the request stops waiting.
        let (judged_tx, judged) = oneshot::channel();
        let deployer = self.clone();
        tokio::spawn(async move {
            let verdict = verdict_rx.recv().await;
            deployer.judged(&claim, &digest, verdict.as_ref());
            drop(claim);
            let _ = judged_tx.send(verdict);
        });
        match tokio::time::timeout(options.wait, judged).await {
            Ok(Ok(Some(Verdict::Passed { batches, .. }))) => {
                report.batches = batches;
            }
            Ok(Ok(Some(Verdict::RolledBack { error, batches, .. }))) => {
                report.outcome = Outcome::RolledBack;
                report.batches = batches;
                report.error = Some(error);
            }
            Ok(_) => {
                return Err(DeployError::Internal(format!(
                    "pipeline `{pipeline}` stopped while version {version} was on probation"
                )));
            }
            Err(_) => {
                report.outcome = Outcome::Probation;
                report.batches = self.batches(&pipeline, &stage, &version).0;
            }
        }
        Ok(report)
    }

    /// A swap some worker refused: the workers that swapped go back to the version they ran
    /// (on probation: rolled back at their next batch), and the unused instances are dropped
    /// off the async workers.
    fn undo(
        &self,
        control: &PipelineControl,
        index: usize,
        swaps: Vec<Result<Swapped, Box<SwapRefused>>>,
        shared: &Arc<SharedProbation>,
        message: &str,
    ) {
        shared.roll_back(format!("another worker refused it: {message}"));
        let mut unused = Vec::new();
        for (lane, swap) in swaps.into_iter().enumerate() {
            match swap {
                Err(refused) => unused.push(refused.replacement),
                Ok(Swapped {
                    previous: Some(previous),
                    ..
                }) => {
                    let (done, undone) = oneshot::channel();
                    // Windows the new version opened meanwhile, in another state layout, it
                    // finishes beside the previous one.
                    let back = Swap {
                        stage: index,
                        replacement: previous,
                        probation: 0,
                        on_change: StateChange::Drain,
                        done,
                        verdict: None,
                        shared: Arc::default(),
                    };
                    if let Err(e) = control.swap(lane, back) {
                        tracing::error!("{e}");
                        continue;
                    }
                    tokio::spawn(async move {
                        match undone.await {
                            Ok(Ok(swapped)) => {
                                tokio::task::spawn_blocking(move || drop(swapped.previous));
                            }
                            Ok(Err(refused)) => tracing::error!(
                                "worker {lane} keeps the refused version: {}",
                                refused.message
                            ),
                            Err(_) => {}
                        }
                    });
                }
                // On probation: rolled back by the shared probation. Draining another
                // layout's windows: the previous version finishes them, the new one stays.
                Ok(swapped) if !swapped.on_probation => tracing::error!(
                    "worker {lane} keeps the version others refused, its previous one finishing {} windows: {message}",
                    swapped.draining
                ),
                Ok(_) => {}
            }
        }
        tokio::task::spawn_blocking(move || drop(unused));
    }

    /// Records a probation's verdict.
    fn judged(&self, claim: &Claim, digest: &Digest, verdict: Option<&Verdict>) {
        let (pipeline, stage) = &claim.key;
        let recorded = match verdict {
            Some(Verdict::Passed { .. }) => self.registry.passed(pipeline, stage, digest),
            Some(Verdict::RolledBack { error, .. }) => {
                let message = format!(
                    "version {} rolled back on probation: {error}",
                    digest.short()
                );
                self.registry
                    .rolled_back(pipeline, stage, digest, &message, now_ms())
            }
            // The pipeline stopped first: the registry keeps the version as on probation,
            // which the next start marks interrupted. (A drain is no probation: no verdict.)
            None | Some(Verdict::Drained { .. }) => Ok(()),
        };
        if let Err(e) = recorded {
            tracing::error!("{e}");
        }
    }
}

/// The kept versions of a stage, for messages.
fn kept(record: &StageRecord) -> String {
    let versions: Vec<String> = record
        .versions
        .iter()
        .map(|v| {
            format!(
                "{} ({})",
                &v.digest[..8.min(v.digest.len())],
                v.status.as_str()
            )
        })
        .collect();
    if versions.is_empty() {
        "none".into()
    } else {
        versions.join(", ")
    }
}
