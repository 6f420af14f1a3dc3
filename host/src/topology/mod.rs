//! The running graph of a router: the plugin runtime, the sinks (each with its runner task) and
//! the pipelines (each with its worker), built from a [`Config`]. Sources are handed the
//! pipelines' inputs; the topology never sees a socket.
//!
//! Decisions:
//!
//! - **Build, then start.** [`Topology::build`] does everything that can fail (compiling
//!   plugins, instantiating and initializing stages, opening destinations and disk buffers)
//!   without starting a thread or a task; [`Built::start`] starts the sink runners and the
//!   pipeline workers. A config that fails leaves nothing running.
//! - **Plugins**: each stage runs the version the plugin registry says (`admin/registry.rs`:
//!   the one last deployed to it, or the one its config names), compiled once per version and
//!   shared by the stages that run it, through the compile cache under the data directory.
//! - **The instance pool** is sized for every stage twice over (a stage's instance and a
//!   replacement being prepared for a swap) plus room: [`pool_size`].
//! - **A pipeline's queue** holds as many batches as its producers may have unacked at once
//!   (`max_in_flight × max_producers_per_pipeline`, at most 65 536): a source rarely waits on
//!   it, and memory stays bounded by the sources' own limits.
//! - **Stopping** ([`Topology::stop_pipelines`], then [`Topology::stop_sinks`]): every sink is
//!   told the router stops (a full `block` buffer then gives up after a bound instead of
//!   holding a worker forever), the pipelines drain in parallel under one deadline, then the
//!   sinks deliver what they buffer and close, a sink only once every sink that may
//!   dead-letter into it has closed (the config has no dead-letter loops).

pub mod diff;
mod reload;

pub use reload::DRAIN;

use crate::admin::deploy::{PipelineTarget, StageTarget};
use crate::admin::registry::Registry;
use crate::checkpoint::{
    Checkpoints, PipelineCheckpoint, Restored, RestoredStage, RestoredState, StageMeta,
};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::config::{PipelineConfig, PluginSource, StageSpec, dead_letter_file};
use crate::pipeline::fanout::{Fanout, UnmatchedOut};
use crate::pipeline::route::{Condition, Unmatched};
use crate::pipeline::tap::Taps;
use crate::pipeline::{
    Chain, Pipeline, PipelineInput, Position, Resumed, Stage, WindowState, WorkerConfig,
    WorkerSetup, lane_of,
};
use crate::runtime::{Digest, Limits, Plugin, Runtime, RuntimeConfig, StageConfig};
use crate::sinks::runner::Sink;
use crate::sinks::{
    self, BufferConfig, Destination, FileConfig, FileDestination, Fsync, RetryConfig, WhenFull,
};
use crate::utc::now_ms;
use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use tokio::task::JoinHandle;

/// A pipeline as the router runs it, for printing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineInfo {
    /// Its name.
    pub name: String,
    /// Its stages: name, plugin name and version.
    pub stages: Vec<String>,
    /// The sinks it writes to.
    pub sinks: Vec<String>,
    /// Where its dead letters go.
    pub dead_letters: String,
    /// How many workers it runs on, and how batches are shared out among them.
    pub workers: String,
}

/// The live instances the pool holds for `stages` stages: two per stage (its instance and a
/// replacement being prepared), and room for a few more.
pub fn pool_size(stages: usize) -> u32 {
    u32::try_from(2 * stages + 8).unwrap_or(u32::MAX)
}

/// A pipeline built and not started: its worker's setup and what the rest needs of it.
struct BuiltPipeline {
    setup: WorkerSetup,
    info: PipelineInfo,
    allowed: Option<Vec<String>>,
    stages: Vec<StageTarget>,
    /// Where its sources resume (from the checkpoint).
    positions: Vec<Position>,
}

/// Where a pipeline being built takes its window state and its sources' positions from.
enum Resume {
    /// From the checkpoint: a start, or a pipeline a reload adds.
    Checkpoint,
    /// From nothing: it replaces a running pipeline (a reload restarting it), whose
    /// checkpoint handle it goes on with, so that its rounds come after the old one's.
    Replacing(Option<PipelineCheckpoint>),
}

/// Everything a config needs, built and checked, nothing started yet.
pub struct Built {
    runtime: Runtime,
    pipelines: Vec<BuiltPipeline>,
    sinks: BTreeMap<String, Arc<Sink>>,
    destinations: Vec<(Arc<Sink>, Box<dyn Destination>)>,
    plugins: HashMap<String, Plugin>,
    checkpoints: Arc<Checkpoints>,
    taps: Arc<Taps>,
}

/// A running pipeline and what the sources need of it.
pub struct RunningPipeline {
    /// The worker.
    pub pipeline: Pipeline,
    /// What it runs, for printing.
    pub info: PipelineInfo,
    /// Producers allowed to write to it; `None`: every authenticated producer.
    pub allowed: Option<Vec<String>>,
    /// Its stages, as deploys see them.
    pub stages: Vec<StageTarget>,
    /// Where its sources resumed at its start (from the checkpoint).
    pub positions: Vec<Position>,
    /// Where it checkpoints its window state, when it does.
    pub checkpoint: Option<PipelineCheckpoint>,
}

/// The running sinks and pipelines.
pub struct Topology {
    /// Kept for the plugins loaded later (deploys, reloads); every stage already holds it.
    runtime: Runtime,
    pipelines: Vec<RunningPipeline>,
    /// The sinks the pipelines write to, by name.
    sinks: BTreeMap<String, Arc<Sink>>,
    /// Every sink's task, those a reload removed and that still deliver what they hold
    /// included.
    runners: Vec<(Arc<Sink>, JoinHandle<Vec<String>>)>,
    /// Workers a reload retired, joined at the stop.
    retired: Vec<Pipeline>,
    /// Plugins by digest: compiled once per version, whatever loads them.
    plugins: HashMap<String, Plugin>,
    /// Where checkpointed pipelines keep their window state.
    checkpoints: Arc<Checkpoints>,
    /// The `weir tap` readers, by pipeline.
    taps: Arc<Taps>,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("pipelines", &self.pipelines.len())
            .field("sinks", &self.sinks.len())
            .finish_non_exhaustive()
    }
}

impl Topology {
    /// Compiles every plugin, instantiates every stage, opens every sink (see the module
    /// docs); starts nothing.
    pub fn build(
        config: &Config,
        metrics: &Arc<Metrics>,
        registry: &Registry,
        checkpoints: &Arc<Checkpoints>,
        taps: &Arc<Taps>,
    ) -> Result<Built> {
        crate::files::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
        let stage_count: usize = config
            .pipelines
            .iter()
            .map(|p| p.stages.len() * p.workers.max(1))
            .sum();
        let max_memory = config
            .pipelines
            .iter()
            .flat_map(|p| &p.stages)
            .map(|s| s.memory_bytes)
            .max()
            .unwrap_or(0)
            .max(RuntimeConfig::default().max_memory_bytes);
        let runtime = Runtime::new(RuntimeConfig {
            max_instances: pool_size(stage_count),
            max_memory_bytes: max_memory,
            cache_dir: Some(registry.compiled_dir()),
            ..RuntimeConfig::default()
        })?;

        let mut sinks: BTreeMap<String, Arc<Sink>> = BTreeMap::new();
        let mut destinations: Vec<(Arc<Sink>, Box<dyn Destination>)> = Vec::new();
        for sink in &config.sinks {
            let destination = sinks::open(sink)?;
            let handle = Sink::new(
                &sink.name,
                destination.describe(),
                sink.buffer,
                sink.retry,
                &config.data_dir.join("spill").join(&sink.name),
                metrics.sink(&sink.name),
            )
            .map_err(anyhow::Error::msg)?;
            sinks.insert(sink.name.clone(), handle.clone());
            destinations.push((handle, destination));
        }
        let limits = &config.listener.limits;
        let queue = (limits.protocol.max_in_flight as usize)
            .saturating_mul(limits.max_producers_per_pipeline as usize)
            .clamp(1, 65_536);
        let mut plugins: HashMap<String, Plugin> = HashMap::new();
        let mut pipelines = Vec::new();
        for pipeline in &config.pipelines {
            let mut builder = PipelineBuilder {
                config,
                pipeline,
                runtime: &runtime,
                registry,
                plugins: &mut plugins,
                sinks: &mut sinks,
                destinations: &mut destinations,
                metrics,
                checkpoints,
                taps,
            };
            pipelines.push(builder.build(queue, Resume::Checkpoint)?);
        }
        Ok(Built {
            runtime,
            pipelines,
            sinks,
            destinations,
            plugins,
            checkpoints: checkpoints.clone(),
            taps: taps.clone(),
        })
    }

    /// The pipelines, in config order.
    pub fn pipelines(&self) -> &[RunningPipeline] {
        &self.pipelines
    }

    /// Every sink, by name (pipelines' default dead-letter files included, named
    /// `PIPELINE/dead-letters`).
    pub(crate) fn sinks(&self) -> &BTreeMap<String, Arc<Sink>> {
        &self.sinks
    }

    /// The plugin runtime every stage runs in.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Every pipeline as deploys see it, by name.
    pub fn deploy_targets(&self) -> BTreeMap<String, PipelineTarget> {
        self.pipelines
            .iter()
            .map(|p| {
                let target = PipelineTarget {
                    control: p.pipeline.controller(),
                    stages: p.stages.clone(),
                };
                (p.info.name.clone(), target)
            })
            .collect()
    }

    /// Stops every pipeline (see the module docs); the problems met.
    pub async fn stop_pipelines(&self) -> Vec<String> {
        for sink in self.sinks.values() {
            sink.stopping();
        }
        // Every worker is told first, so they finish at once: their last rounds wait in
        // parallel, not in turn.
        let stops: Vec<_> = self.pipelines.iter().map(|p| p.pipeline.stop()).collect();
        let mut problems = Vec::new();
        for stop in stops {
            problems.append(&mut stop.await);
        }
        problems
    }

    /// Once the pipelines stopped: the sinks deliver what they buffer, then end; the worker
    /// threads are joined. The problems met.
    pub async fn stop_sinks(self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut left = self.runners;
        while !left.is_empty() {
            let fed: Vec<bool> = left
                .iter()
                .map(|(sink, _)| {
                    left.iter()
                        .any(|(other, _)| !Arc::ptr_eq(other, sink) && other.dead_letters_to(sink))
                })
                .collect();
            let all = fed.iter().all(|f| *f);
            let (now, later): (Vec<_>, Vec<_>) =
                left.into_iter().zip(fed).partition(|(_, fed)| all || !fed);
            for ((sink, _), _) in &now {
                sink.close();
            }
            for ((_, runner), _) in now {
                match runner.await {
                    Ok(mut p) => problems.append(&mut p),
                    Err(e) => problems.push(format!("a sink's task failed: {e}")),
                }
            }
            left = later.into_iter().map(|(runner, _)| runner).collect();
        }
        let mut pipelines: Vec<Pipeline> = self.pipelines.into_iter().map(|p| p.pipeline).collect();
        pipelines.extend(self.retired);
        let joined = tokio::task::spawn_blocking(move || {
            pipelines
                .into_iter()
                .filter_map(|p| p.join().err())
                .collect::<Vec<String>>()
        })
        .await;
        match joined {
            Ok(mut p) => problems.append(&mut p),
            Err(e) => problems.push(format!("joining the pipeline threads: {e}")),
        }
        problems
    }
}

impl Built {
    /// Starts the sink runners and the pipeline workers. Must be called within a tokio
    /// runtime.
    pub fn start(self) -> Result<Topology> {
        let mut pipelines = Vec::new();
        for BuiltPipeline {
            setup,
            info,
            allowed,
            stages,
            positions,
        } in self.pipelines
        {
            let checkpoint = setup.checkpoint.clone();
            let pipeline = Pipeline::spawn(setup).context("cannot start a pipeline thread")?;
            pipelines.push(RunningPipeline {
                pipeline,
                info,
                allowed,
                stages,
                positions,
                checkpoint,
            });
        }
        // After everything that can fail: a runner holds its sink (and its disk buffer's lock)
        // until it stops.
        let runners = self
            .destinations
            .into_iter()
            .map(|(sink, destination)| (sink.clone(), tokio::spawn(sink.run(destination))))
            .collect();
        Ok(Topology {
            runtime: self.runtime,
            pipelines,
            sinks: self.sinks,
            runners,
            retired: Vec::new(),
            plugins: self.plugins,
            checkpoints: self.checkpoints,
            taps: self.taps,
        })
    }
}

impl RunningPipeline {
    /// Where sources put the pipeline's batches.
    pub fn input(&self) -> PipelineInput {
        self.pipeline.input()
    }
}

/// A checkpoint's windows shared out among `lanes` workers, each its keys' and its event time,
/// in one pass; the positions are the pipeline's business, not a worker's.
fn lane_shares(stages: BTreeMap<String, RestoredStage>, lanes: usize) -> Vec<Restored> {
    let mut shares: Vec<Restored> = (0..lanes).map(|_| Restored::default()).collect();
    let split = |state: RestoredState| {
        let mut parts: Vec<RestoredState> = (0..lanes)
            .map(|lane| RestoredState {
                meta: StageMeta {
                    max_event_ms: state.event_time(lane, lanes),
                    ..state.meta.clone()
                },
                event_times: BTreeMap::new(),
                windows: Vec::new(),
            })
            .collect();
        for (id, acc) in state.windows {
            parts[lane_of(id.key.as_deref(), lanes)]
                .windows
                .push((id, acc));
        }
        parts
    };
    for (name, stage) in stages {
        let mut draining = stage.draining.map(|d| split(d).into_iter());
        for (share, current) in shares.iter_mut().zip(split(stage.current)) {
            let draining = draining.as_mut().and_then(Iterator::next);
            share
                .stages
                .insert(name.clone(), RestoredStage { current, draining });
        }
    }
    shares
}

/// Another worker's instances of `stages`: the same plugin versions, each initialized with its
/// stage's config.
fn replicas(stages: &[Stage], targets: &[StageTarget]) -> Result<Vec<Stage>> {
    stages
        .iter()
        .zip(targets)
        .map(|(stage, target)| {
            Stage::new(stage.plugin(), target.config.clone(), target.window)
                .with_context(|| format!("stage `{}`", stage.name()))
        })
        .collect()
}

/// Builds one pipeline: its stages (plugins compiled once per source) and its fan-out.
struct PipelineBuilder<'a> {
    config: &'a Config,
    pipeline: &'a PipelineConfig,
    runtime: &'a Runtime,
    registry: &'a Registry,
    plugins: &'a mut HashMap<String, Plugin>,
    sinks: &'a mut BTreeMap<String, Arc<Sink>>,
    destinations: &'a mut Vec<(Arc<Sink>, Box<dyn Destination>)>,
    metrics: &'a Arc<Metrics>,
    checkpoints: &'a Arc<Checkpoints>,
    taps: &'a Arc<Taps>,
}

impl PipelineBuilder<'_> {
    fn build(&mut self, queue: usize, resume: Resume) -> Result<BuiltPipeline> {
        let (stages, stage_names, targets) = self.stages()?;
        let (fanout, info) = self.outputs(stage_names)?;
        let name = &self.pipeline.name;
        let aggregate = stages.iter().any(|s| s.window_state().is_some());
        let checkpointed = aggregate && self.pipeline.checkpoint;
        let workers = self.pipeline.workers.max(1);
        let mut lanes = vec![stages];
        for _ in 1..workers {
            lanes.push(replicas(&lanes[0], &targets)?);
        }
        let mut draining: Vec<Vec<(usize, Stage)>> = lanes.iter().map(|_| Vec::new()).collect();
        let (mut positions, mut resumed, checkpoint) = (Vec::new(), Resumed::default(), None);
        let checkpoint = match resume {
            Resume::Replacing(handle) => handle.filter(|_| checkpointed),
            Resume::Checkpoint if aggregate => {
                let restored = self.checkpoints.restore(name)?;
                let empty = restored == Restored::default();
                let Restored {
                    stages: saved,
                    positions: rows,
                } = restored;
                let producers = rows.len();
                // Messages count the windows of every worker, not one worker's share.
                let held: BTreeMap<String, (usize, usize)> = saved
                    .iter()
                    .map(|(stage, s)| {
                        let draining = s.draining.as_ref().map_or(0, |d| d.windows.len());
                        (stage.clone(), (s.current.windows.len(), draining))
                    })
                    .collect();
                let mut windows = 0;
                let shares = lane_shares(saved, workers);
                // Each worker's event time, as it starts: (stage, role, worker, ms).
                let times: Vec<(String, u8, usize, i64)> = shares
                    .iter()
                    .enumerate()
                    .flat_map(|(lane, share)| {
                        share.stages.iter().flat_map(move |(stage, s)| {
                            let roles = [Some(&s.current), s.draining.as_ref()];
                            roles.into_iter().enumerate().filter_map(move |(role, r)| {
                                let ms = r?.meta.max_event_ms?;
                                Some((stage.clone(), role as u8, lane, ms))
                            })
                        })
                    })
                    .collect();
                for ((stages, share), old) in lanes.iter_mut().zip(shares).zip(&mut draining) {
                    let (previous, restored) = self.restore(stages, &targets, share, &held)?;
                    *old = previous;
                    windows += restored;
                }
                if windows > 0 || producers > 0 {
                    tracing::info!(
                        "pipeline `{name}`: {windows} open windows and {producers} positions restored from the checkpoint"
                    );
                }
                let handle = self.checkpoints.pipeline(name);
                if checkpointed {
                    let times: Vec<(&str, u8, usize, i64)> = times
                        .iter()
                        .map(|(stage, role, lane, ms)| (stage.as_str(), *role, *lane, *ms))
                        .collect();
                    self.checkpoints.start_event_times(name, workers, &times)?;
                    (positions, resumed) = Resumed::from_checkpoint(rows);
                    Some(handle)
                } else {
                    if !empty {
                        // Restored once, then never written: its rows go, or the next start
                        // would restore them again.
                        self.checkpoints.forget(&handle);
                    }
                    None
                }
            }
            Resume::Checkpoint => checkpoint,
        };
        let chains = lanes
            .into_iter()
            .zip(draining)
            .map(|(stages, draining)| {
                let mut chain = Chain::new(stages);
                for (index, old) in draining {
                    chain.restore_draining(index, old);
                }
                chain
            })
            .collect();
        let setup = WorkerSetup {
            name: name.clone(),
            chains,
            fanout,
            metrics: self.metrics.pipeline(name),
            stage_metrics: self
                .pipeline
                .stages
                .iter()
                .map(|s| self.metrics.stage(name, &s.name))
                .collect(),
            queue,
            config: WorkerConfig::default(),
            registry: self.metrics.clone(),
            version_header: self.pipeline.version_header.clone(),
            checkpoint,
            resumed,
            tap: self.taps.pipeline(name),
        };
        Ok(BuiltPipeline {
            setup,
            info,
            allowed: self.pipeline.producers.clone(),
            stages: targets,
            positions,
        })
    }

    /// Puts the window state a checkpoint holds back into the pipeline's aggregate stages;
    /// returns the previous versions that were finishing their windows after a layout change,
    /// to go back beside them. What a stage's serving version cannot read, and windows of a
    /// stage the config no longer has, are errors saying what to do: never a silent reset.
    /// `restored` is one worker's share; `counts`, the pipeline's windows per stage (serving,
    /// draining), for the messages.
    fn restore(
        &mut self,
        stages: &mut [Stage],
        targets: &[StageTarget],
        mut restored: Restored,
        counts: &BTreeMap<String, (usize, usize)>,
    ) -> Result<(Vec<(usize, Stage)>, usize)> {
        // The pipeline's windows of a stage: (serving, draining).
        let held = |stage: &str, draining: bool| {
            counts
                .get(stage)
                .map_or(0, |(current, old)| if draining { *old } else { *current })
        };
        let name = &self.pipeline.name;
        let path = self.checkpoints.path().display().to_string();
        let mut draining = Vec::new();
        let mut windows = 0;
        for (index, stage) in stages.iter_mut().enumerate() {
            let Some(config) = stage.window_state().map(|s| *s.config()) else {
                continue;
            };
            let Some(saved) = restored.stages.remove(stage.name()) else {
                continue;
            };
            let current = saved.current;
            let version = |v: &str| v.get(..8).unwrap_or(v).to_owned();
            if !current.windows.is_empty() && current.meta.layout.as_deref() != stage.layout() {
                bail!(
                    "pipeline `{name}`, stage `{}`: the checkpoint {path} holds {} open windows written by version {} in state layout `{}`, and the version serving now ({} {}) writes layout `{}`, which cannot read them: name a version that writes `{}` in the config, or move {path} away to drop every open window",
                    stage.name(),
                    held(stage.name(), false),
                    version(&current.meta.version),
                    current.meta.layout.as_deref().unwrap_or_default(),
                    stage.plugin().name(),
                    stage.plugin().version(),
                    stage.layout().unwrap_or_default(),
                    current.meta.layout.as_deref().unwrap_or_default(),
                );
            }
            windows += current.windows.len();
            let layout = stage.layout().map(str::to_owned);
            stage.replace_window_state(WindowState::restore(
                config,
                layout,
                current.meta.max_event_ms,
                current.windows,
            ))?;
            let Some(old) = saved.draining.filter(|d| !d.windows.is_empty()) else {
                continue;
            };
            let unknown = || {
                anyhow::anyhow!(
                    "pipeline `{name}`, stage `{}`: the checkpoint {path} holds {} open windows that version {} was finishing after a state layout change, and the plugin registry no longer has that version: move {path} away to drop every open window",
                    stage.name(),
                    held(stage.name(), true),
                    version(&old.meta.version)
                )
            };
            let digest = Digest::parse(&old.meta.version).ok_or_else(unknown)?;
            let bytes = self.registry.blob(&digest).map_err(|_| unknown())?;
            let plugin = self.load(stage.plugin().name(), &bytes, None)?;
            let target = &targets[index];
            let mut previous = Stage::new(&plugin, target.config.clone(), target.window)?;
            windows += old.windows.len();
            previous.replace_window_state(WindowState::restore(
                config,
                old.meta.layout,
                old.meta.max_event_ms,
                old.windows,
            ))?;
            draining.push((index, previous));
        }
        if let Some((stage, _)) = restored
            .stages
            .iter()
            .find(|(_, s)| !s.current.windows.is_empty())
        {
            bail!(
                "pipeline `{name}`: the checkpoint {path} holds {} open windows of stage `{stage}`, which the config no longer has: add the stage back to finish them, or move {path} away to drop every open window",
                held(stage, false)
            );
        }
        Ok((draining, windows))
    }

    /// The pipeline's stages, instantiated; how each is described; as deploys see them.
    fn stages(&mut self) -> Result<(Vec<Stage>, Vec<String>, Vec<StageTarget>)> {
        let name = &self.pipeline.name;
        let mut stages = Vec::new();
        let mut stage_names = Vec::new();
        let mut targets = Vec::new();
        for spec in &self.pipeline.stages {
            let mut stage_config = StageConfig::new(spec.name.clone()).limits(Limits {
                memory_bytes: spec.memory_bytes,
                deadline: spec.deadline,
                ..Limits::default()
            });
            for (key, json) in &spec.with {
                stage_config = stage_config.with_json(key.clone(), json.clone());
            }
            let (stage, deployed) = self
                .stage(spec, &stage_config)
                .with_context(|| format!("pipeline `{name}`, stage `{}`", spec.name))?;
            let plugin = stage.plugin().clone();
            let origin = if deployed {
                format!(
                    "`{}`, deployed; the config names {}",
                    plugin.name(),
                    spec.plugin
                )
            } else {
                spec.plugin.to_string()
            };
            let compiled = if plugin.from_cache() {
                "from the compile cache"
            } else {
                "compiled"
            };
            stage_names.push(format!(
                "{} ({} {origin} {}, {compiled})",
                spec.name,
                plugin.kind(),
                plugin.version()
            ));
            targets.push(StageTarget {
                name: spec.name.clone(),
                kind: plugin.kind(),
                config: stage_config,
                window: spec.window,
            });
            stages.push(stage);
        }
        Ok((stages, stage_names, targets))
    }

    /// Where the pipeline's output goes (its sinks, `unmatched`, dead-letter sink), and the
    /// pipeline described with its stages `stage_names`.
    fn outputs(&mut self, stage_names: Vec<String>) -> Result<(Fanout, PipelineInfo)> {
        let name = &self.pipeline.name;
        let mut routes = Vec::new();
        let mut described = Vec::new();
        for route in &self.pipeline.sinks {
            let sink = self.find(&route.sink)?;
            described.push(describe_route(&sink, Some(&route.condition)));
            routes.push((sink, route.condition.clone()));
        }
        let unmatched = match &self.pipeline.unmatched {
            Unmatched::Impossible => UnmatchedOut::Impossible,
            Unmatched::Drop => {
                described.push("unmatched events: dropped (counted)".into());
                UnmatchedOut::Drop
            }
            Unmatched::Sink(sink) => {
                let sink = self.find(sink)?;
                described.push(format!(
                    "unmatched events → {}",
                    describe_route(&sink, None)
                ));
                UnmatchedOut::Sink(sink)
            }
        };
        let dead_letters = match &self.pipeline.dead_letters {
            Some(sink) => self.find(sink)?,
            None => self.dead_letter_file()?,
        };
        let pipeline_name: Arc<str> = Arc::from(name.as_str());
        for (sink, _) in &routes {
            sink.set_dead_letters(pipeline_name.clone(), dead_letters.clone());
        }
        if let UnmatchedOut::Sink(sink) = &unmatched {
            sink.set_dead_letters(pipeline_name.clone(), dead_letters.clone());
        }
        let aggregate = self.pipeline.stages.iter().any(|s| s.window.is_some());
        let info = PipelineInfo {
            name: name.clone(),
            stages: stage_names,
            sinks: described,
            dead_letters: describe_route(&dead_letters, None),
            workers: match (self.pipeline.workers, aggregate) {
                (1, _) => "1".to_owned(),
                (n, false) => format!("{n}, whole batches by producer or partition"),
                (n, true) => format!("{n}, each batch split by event key"),
            },
        };
        Ok((
            Fanout::new(pipeline_name, routes, unmatched, dead_letters),
            info,
        ))
    }

    /// Stage `spec` as it runs: the version last deployed to it, or the one its config names
    /// (the registry decides), instantiated with `config`; whether it is a deployed one. A
    /// deployed version that no longer loads or starts (its `init` refuses a config edited
    /// since) gives way to the config's plugin, loudly.
    fn stage(&mut self, spec: &StageSpec, config: &StageConfig) -> Result<(Stage, bool)> {
        let (name, bytes, path) = source_bytes(&spec.plugin)?;
        let resolved =
            self.registry
                .resolve(&self.pipeline.name, &spec.name, &name, &bytes, now_ms())?;
        if resolved.deployed {
            let started = self
                .load(&resolved.name, &resolved.bytes, None)
                .and_then(|plugin| Ok(Stage::new(&plugin, config.clone(), spec.window)?));
            match started {
                Ok(stage) => return Ok((stage, true)),
                Err(e) => {
                    tracing::error!(
                        "pipeline `{}`, stage `{}`: the version deployed to it, {} {}, does not start ({e:#}); the config's plugin serves instead",
                        self.pipeline.name,
                        spec.name,
                        resolved.name,
                        Digest::of(&resolved.bytes).short()
                    );
                    self.registry.fell_back(
                        &self.pipeline.name,
                        &spec.name,
                        &Digest::of(&bytes),
                        &name,
                        &format!("{e:#}"),
                        now_ms(),
                    )?;
                }
            }
        }
        let plugin = self.load(&name, &bytes, path)?;
        Ok((Stage::new(&plugin, config.clone(), spec.window)?, false))
    }

    /// The plugin of these bytes, compiled (or loaded from the compile cache) once per version.
    fn load(&mut self, name: &str, bytes: &[u8], path: Option<&Path>) -> Result<Plugin> {
        let key = Digest::of(bytes).hex();
        if let Some(plugin) = self.plugins.get(&key) {
            return Ok(plugin.clone());
        }
        let plugin = match path {
            // Read again by the runtime, so that its errors name the file.
            Some(path) => self.runtime.load_file(path)?,
            None => self.runtime.load_bytes(name, bytes)?,
        };
        tracing::info!(
            "plugin `{}` {}: {}",
            plugin.name(),
            plugin.version(),
            if plugin.from_cache() {
                "loaded from the compile cache"
            } else {
                "compiled"
            }
        );
        self.plugins.insert(key, plugin.clone());
        Ok(plugin)
    }

    fn find(&self, sink: &str) -> Result<Arc<Sink>> {
        match self.sinks.get(sink) {
            Some(s) => Ok(s.clone()),
            None => bail!("pipeline `{}`: unknown sink `{sink}`", self.pipeline.name),
        }
    }

    /// The pipeline's default dead-letter sink: `DATA_DIR/dead-letters/PIPELINE.jsonl`, the
    /// running one when there is one (a reload).
    fn dead_letter_file(&mut self) -> Result<Arc<Sink>> {
        let name = &self.pipeline.name;
        if let Some(sink) = self.sinks.get(&format!("{name}/dead-letters")) {
            return Ok(sink.clone());
        }
        let path = dead_letter_file(&self.config.data_dir, name);
        let sink_name = format!("{name}/dead-letters");
        let destination = FileDestination::open(
            &sink_name,
            &FileConfig {
                path,
                fsync: Fsync::OnAck,
                rotate_bytes: None,
                rotate_interval: None,
            },
        )?;
        let sink = Sink::new(
            &sink_name,
            sinks::Destination::describe(&destination),
            BufferConfig {
                when_full: WhenFull::Block,
                ..BufferConfig::default()
            },
            RetryConfig::default(),
            &self.config.data_dir.join("spill").join(&sink_name),
            self.metrics.sink(&sink_name),
        )
        .map_err(anyhow::Error::msg)?;
        self.sinks.insert(sink_name, sink.clone());
        self.destinations
            .push((sink.clone(), Box::new(destination)));
        Ok(sink)
    }
}

/// The name and bytes of the plugin a config names, and its file when it is one.
fn source_bytes(source: &PluginSource) -> Result<(String, Vec<u8>, Option<&Path>)> {
    match source {
        PluginSource::Example(example) => {
            let Some((_, bytes)) = crate::examples::ALL.iter().find(|(n, _)| n == example) else {
                bail!("unknown plugin `example:{example}`");
            };
            Ok((example.clone(), bytes.to_vec(), None))
        }
        PluginSource::File(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read plugin {}", path.display()))?;
            Ok((source.name(), bytes, Some(path)))
        }
    }
}

/// `NAME: DESTINATION, when_full = POLICY`, and the condition when there is one.
fn describe_route(sink: &Sink, condition: Option<&Condition>) -> String {
    let condition = match condition {
        None | Some(Condition::All) => String::new(),
        Some(Condition::Route(tags)) => format!(" (route {})", tags.join(" or ")),
        Some(Condition::Headers(headers)) => {
            let h: Vec<String> = headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!(" (header {})", h.join(" and "))
        }
    };
    format!(
        "{}{condition}: {}, when_full = {}",
        sink.name(),
        sink.describe(),
        sink.buffer().when_full.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::WindowId;

    #[test]
    fn a_checkpoint_is_shared_out_by_key_and_each_worker_gets_its_own_event_time() {
        let window = |key: &str| WindowId {
            key: Some(key.as_bytes().to_vec()),
            start_ms: 0,
            end_ms: 1000,
        };
        let keys = ["k0", "k1", "k2", "k3", "k4", "k5"];
        let stage = RestoredStage {
            current: RestoredState {
                meta: StageMeta {
                    version: "a".repeat(64),
                    layout: None,
                    max_event_ms: None,
                },
                event_times: BTreeMap::from([((2, 0), 900), ((2, 1), 1400)]),
                windows: keys
                    .iter()
                    .map(|k| (window(k), k.as_bytes().to_vec()))
                    .collect(),
            },
            draining: None,
        };
        let shares = lane_shares(BTreeMap::from([("sum".to_owned(), stage)]), 2);
        for (lane, (share, ms)) in shares.iter().zip([900, 1400]).enumerate() {
            let state = &share.stages["sum"].current;
            assert_eq!(state.meta.max_event_ms, Some(ms), "worker {lane}");
            let mine: Vec<&str> = keys
                .iter()
                .copied()
                .filter(|k| lane_of(Some(k.as_bytes()), 2) == lane)
                .collect();
            let held: Vec<&str> = state
                .windows
                .iter()
                .map(|(id, _)| {
                    std::str::from_utf8(id.key.as_deref().unwrap_or_default()).unwrap_or("")
                })
                .collect();
            assert_eq!(held, mine, "worker {lane}");
        }
    }
}
