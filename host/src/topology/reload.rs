//! Applying a new config to the running topology, in two phases, the way a careful operator
//! would: first build and check everything the new config needs while the old one serves
//! untouched ([`Topology::prepare`]), then change the running graph in an order that loses and
//! repeats nothing ([`Topology::apply`]). `diff.rs` says what changes.
//!
//! Decisions:
//!
//! - **Prepare may fail; apply does not.** Opening new destinations and disk buffers,
//!   compiling plugins, instantiating and initializing new stage versions with their new
//!   `with` values, claiming the stages it changes (a deploy in progress refuses the reload):
//!   all of it before anything running is touched. A reload that fails there leaves the old
//!   config serving and says why.
//! - **Order** (Vector's topology does the same with its sources, transforms and sinks):
//!   sinks reconfigured in place and new sinks started first, so that every output the
//!   pipelines may be given exists; then new pipelines; then changed ones (new outputs between
//!   two rounds, stage swaps, producer lists); then restarted ones (the successor takes the
//!   sources' queue at once and its first batch once the predecessor retired: each producer's
//!   batches stay in order); then removed ones (their batches refused from then on, what they
//!   took processed); last, the sinks no pipeline writes to any more are closed.
//! - **A sink that is no longer written to** gets [`DRAIN`] to deliver what it holds. One
//!   that needs longer (its destination is down) goes on in the background until it is done or
//!   the router stops: its events are not lost (a `block` sink's batches are not acked until
//!   delivered; a `spill` sink's disk buffer stays for a later config, or a restart, that names
//!   it again). The report says which.

use super::diff::{ConfigDiff, PipelineChange, SinkChange};
use super::{BuiltPipeline, PipelineBuilder, PipelineInfo, Resume, RunningPipeline, Topology};
use crate::admin::ReloadReport;
use crate::admin::deploy::{Claim, Deployer, PipelineTarget, PreparedChange};
use crate::admin::registry::Registry;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::config::PipelineConfig;
use crate::pipeline::{Outputs, Pipeline};
use crate::runtime::{Digest, Limits, StageConfig};
use crate::sinks::runner::{BufferConfig, RetryConfig, Sink};
use crate::sinks::{self, Destination};
use crate::sources::kafka::KafkaSource;
use crate::sources::quic::{PipelineEntry, QuicControl};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a reload waits for a sink no pipeline writes to any more to deliver what it holds
/// before it lets it go on in the background.
pub const DRAIN: Duration = Duration::from_secs(10);

/// A pipeline changed in place, ready.
struct Changed {
    name: String,
    outputs: Option<(Outputs, PipelineInfo)>,
    stages: Vec<PreparedChange>,
    allowed: Option<Option<Vec<String>>>,
}

/// A sink changed in place: its new destination, limits and retries.
type Reconfigure = (Arc<Sink>, Box<dyn Destination>, BufferConfig, RetryConfig);

/// Everything a new config needs, built and checked; nothing running touched yet.
pub(crate) struct Plan {
    diff: ConfigDiff,
    config: Config,
    sinks: BTreeMap<String, Arc<Sink>>,
    start: Vec<(Arc<Sink>, Box<dyn Destination>)>,
    reconfigure: Vec<Reconfigure>,
    added: Vec<(BuiltPipeline, Vec<crate::admin::deploy::StageTarget>)>,
    restarted: Vec<(BuiltPipeline, Vec<Claim>)>,
    changed: Vec<Changed>,
    removed: Vec<(String, Vec<Claim>)>,
}

/// The config as it runs after a reload: `new`, except what needs a restart, which stays as
/// `old` has it (so that the next reload reports it again).
fn applied(old: &Config, new: &Config) -> Config {
    let mut config = new.clone();
    config.data_dir.clone_from(&old.data_dir);
    config.listener.listen = old.listener.listen;
    config.listener.tls.clone_from(&old.listener.tls);
    config.listener.limits = old.listener.limits;
    config.metrics = old.metrics;
    config.admin.clone_from(&old.admin);
    config.sources.clone_from(&old.sources);
    config
}

impl Topology {
    /// Builds and checks everything `new` needs that `old` (the running config) does not have
    /// (see the module docs); touches nothing running. `Err` says why the reload is refused.
    pub(crate) async fn prepare(
        &mut self,
        old: &Config,
        new: &Config,
        registry: &Arc<Registry>,
        metrics: &Arc<Metrics>,
        deployer: &Arc<Deployer>,
    ) -> Result<Plan, String> {
        let diff = ConfigDiff::new(old, new, |pipeline, spec| {
            let Ok((_, bytes, _)) = super::source_bytes(&spec.plugin) else {
                // Unreadable: building the stage says so.
                return true;
            };
            registry
                .stage(pipeline, &spec.name)
                .is_none_or(|record| record.config != Digest::of(&bytes).hex())
        });
        let config = applied(old, new);
        for source in &old.sources {
            if new.pipeline(source.pipeline()).is_none() {
                return Err(format!(
                    "pipeline `{}` is fed by source `{}`, which runs until the router restarts: keep the pipeline, or restart the router to remove both",
                    source.pipeline(),
                    source.name()
                ));
            }
        }
        let mut sinks = self.sinks.clone();
        let mut start = Vec::new();
        let mut reconfigure = Vec::new();
        for change in &diff.sinks {
            let name = change.name();
            let Some(sink_config) = config.sinks.iter().find(|s| s.name == name) else {
                // Removed: it goes once nothing writes to it.
                sinks.remove(name);
                continue;
            };
            let destination = sinks::open(sink_config).map_err(|e| e.to_string())?;
            match change {
                SinkChange::Reconfigured(_) => {
                    let Some(sink) = sinks.get(name) else {
                        return Err(format!("sink `{name}` is not running"));
                    };
                    reconfigure.push((
                        sink.clone(),
                        destination,
                        sink_config.buffer,
                        sink_config.retry,
                    ));
                }
                SinkChange::Added(_) | SinkChange::Replaced(_) => {
                    if let Some(left) = self.still_delivering(name) {
                        return Err(format!(
                            "sink `{name}`: the sink of that name a reload removed still delivers what it held ({left} events); reload again once it is done"
                        ));
                    }
                    let sink = Sink::new(
                        name,
                        destination.describe(),
                        sink_config.buffer,
                        sink_config.retry,
                        &config.data_dir.join("spill").join(name),
                        metrics.sink(name),
                    )?;
                    sinks.insert(name.to_owned(), sink.clone());
                    start.push((sink, destination));
                }
                SinkChange::Removed(_) => {}
            }
        }

        let limits = &config.listener.limits;
        let queue = (limits.protocol.max_in_flight as usize)
            .saturating_mul(limits.max_producers_per_pipeline as usize)
            .clamp(1, 65_536);
        let mut added = Vec::new();
        let mut restarted = Vec::new();
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        for change in &diff.pipelines {
            let name = change.name();
            match change {
                PipelineChange::Removed(_) => {
                    let claims = deployer
                        .claim_pipeline(name)
                        .map_err(|e| format!("pipeline `{name}`: {e}"))?;
                    removed.push((name.to_owned(), claims));
                }
                PipelineChange::Added(_) | PipelineChange::Restarted { .. } => {
                    let claims = match change {
                        PipelineChange::Restarted { .. } => deployer
                            .claim_pipeline(name)
                            .map_err(|e| format!("pipeline `{name}`: {e}"))?,
                        _ => Vec::new(),
                    };
                    let Some(pipeline) = config.pipeline(name) else {
                        continue;
                    };
                    let resume = match change {
                        PipelineChange::Restarted { .. } => Resume::Replacing(
                            self.pipelines
                                .iter()
                                .find(|p| p.info.name == name)
                                .and_then(|p| p.checkpoint.clone()),
                        ),
                        _ => Resume::Checkpoint,
                    };
                    let built = self.build_pipeline(
                        &config, pipeline, &mut sinks, &mut start, registry, metrics, queue, resume,
                    )?;
                    match change {
                        PipelineChange::Restarted { .. } => restarted.push((built, claims)),
                        _ => {
                            let targets = built.stages.clone();
                            added.push((built, targets));
                        }
                    }
                }
                PipelineChange::Changed {
                    stages,
                    outputs,
                    producers,
                    ..
                } => {
                    let Some(pipeline) = config.pipeline(name) else {
                        continue;
                    };
                    let Some(running) = self.pipelines.iter().find(|p| p.info.name == name) else {
                        return Err(format!("pipeline `{name}` is not running"));
                    };
                    let outputs = if *outputs {
                        let mut builder = PipelineBuilder {
                            config: &config,
                            pipeline,
                            runtime: &self.runtime,
                            registry,
                            plugins: &mut self.plugins,
                            sinks: &mut sinks,
                            destinations: &mut start,
                            metrics,
                            checkpoints: &self.checkpoints,
                            taps: &self.taps,
                        };
                        let (fanout, info) = builder
                            .outputs(running.info.stages.clone())
                            .map_err(|e| format!("{e:#}"))?;
                        Some((
                            Outputs {
                                fanout,
                                version_header: pipeline.version_header.clone(),
                            },
                            info,
                        ))
                    } else {
                        None
                    };
                    let mut prepared = Vec::new();
                    for stage in stages {
                        prepared.push(
                            self.prepare_stage(
                                pipeline,
                                &stage.stage,
                                stage.what.contains(&"plugin"),
                                deployer,
                            )
                            .await?,
                        );
                    }
                    changed.push(Changed {
                        name: name.to_owned(),
                        outputs,
                        stages: prepared,
                        allowed: producers.then(|| pipeline.producers.clone()),
                    });
                }
            }
        }
        // Sinks no pipeline of the new config writes to go (a removed pipeline's dead-letter
        // file, a sink replaced by one of another policy).
        let used = used_sinks(&config);
        sinks.retain(|name, _| used.contains(name));
        Ok(Plan {
            diff,
            config,
            sinks,
            start,
            reconfigure,
            added,
            restarted,
            changed,
            removed,
        })
    }

    /// Builds a pipeline of `config` against `sinks` (a dead-letter file it needs is added).
    #[allow(clippy::too_many_arguments)]
    fn build_pipeline(
        &mut self,
        config: &Config,
        pipeline: &PipelineConfig,
        sinks: &mut BTreeMap<String, Arc<Sink>>,
        start: &mut Vec<(Arc<Sink>, Box<dyn Destination>)>,
        registry: &Registry,
        metrics: &Arc<Metrics>,
        queue: usize,
        resume: Resume,
    ) -> Result<BuiltPipeline, String> {
        let mut builder = PipelineBuilder {
            config,
            pipeline,
            runtime: &self.runtime,
            registry,
            plugins: &mut self.plugins,
            sinks,
            destinations: start,
            metrics,
            checkpoints: &self.checkpoints,
            taps: &self.taps,
        };
        builder.build(queue, resume).map_err(|e| format!("{e:#}"))
    }

    /// Prepares stage `stage` of `pipeline` with its new config; with its config's plugin
    /// when `plugin` (it changed), else with the version serving.
    async fn prepare_stage(
        &self,
        pipeline: &PipelineConfig,
        stage: &str,
        plugin: bool,
        deployer: &Arc<Deployer>,
    ) -> Result<PreparedChange, String> {
        let Some(spec) = pipeline.stages.iter().find(|s| s.name == stage) else {
            return Err(format!("pipeline `{}`: no stage `{stage}`", pipeline.name));
        };
        let Some(target) = deployer
            .pipelines()
            .get(&pipeline.name)
            .and_then(|p| p.stages.iter().find(|s| s.name == stage).cloned())
        else {
            return Err(format!(
                "pipeline `{}`, stage `{stage}` is not running",
                pipeline.name
            ));
        };
        let mut config = StageConfig::new(spec.name.clone()).limits(Limits {
            memory_bytes: spec.memory_bytes,
            deadline: spec.deadline,
            ..Limits::default()
        });
        for (key, json) in &spec.with {
            config = config.with_json(key.clone(), json.clone());
        }
        let target = crate::admin::deploy::StageTarget { config, ..target };
        let plugin = if plugin {
            let (name, bytes, _) = super::source_bytes(&spec.plugin)
                .map_err(|e| format!("pipeline `{}`, stage `{stage}`: {e:#}", pipeline.name))?;
            Some((name, bytes))
        } else {
            None
        };
        deployer
            .prepare_change(&pipeline.name, target, plugin)
            .await
            .map_err(|e| e.to_string())
    }

    /// Events a sink of this name that a reload removed still holds, if it still runs.
    fn still_delivering(&self, name: &str) -> Option<u64> {
        self.runners
            .iter()
            .find(|(sink, runner)| {
                sink.name() == name
                    && !runner.is_finished()
                    && !self.sinks.get(name).is_some_and(|s| Arc::ptr_eq(s, sink))
            })
            .map(|(sink, _)| sink.buffered())
    }

    /// Changes the running graph as `plan` says (see the module docs); the report.
    pub(crate) async fn apply(
        &mut self,
        plan: Plan,
        quic: &QuicControl,
        kafka: &[KafkaSource],
        deployer: &Arc<Deployer>,
        metrics: &Metrics,
    ) -> (Config, ReloadReport) {
        let started = Instant::now();
        let Plan {
            diff,
            config,
            sinks,
            start,
            reconfigure,
            added,
            restarted,
            changed,
            removed,
        } = plan;
        let mut report = ReloadReport {
            path: config.path.display().to_string(),
            changes: diff.to_string().lines().map(str::to_owned).collect(),
            swaps: Vec::new(),
            drained: Vec::new(),
            restart: diff.restart.clone(),
            elapsed_ms: 0.0,
        };
        if diff.is_empty() {
            report.changes.clear();
        }
        for (sink, destination, buffer, retry) in reconfigure {
            sink.reconfigure(destination, buffer, retry);
        }
        for (sink, destination) in start {
            self.runners
                .push((sink.clone(), tokio::spawn(sink.run(destination))));
        }
        let before = std::mem::replace(&mut self.sinks, sinks);

        for (built, targets) in added {
            let BuiltPipeline {
                setup,
                info,
                allowed,
                stages: _,
                positions,
            } = built;
            let name = info.name.clone();
            let checkpoint = setup.checkpoint.clone();
            match Pipeline::spawn(setup) {
                Ok(pipeline) => {
                    deployer.set_pipeline(
                        &name,
                        PipelineTarget {
                            control: pipeline.controller(),
                            stages: targets.clone(),
                        },
                    );
                    if let Err(e) = quic.add(
                        PipelineEntry {
                            input: pipeline.input(),
                            allowed: allowed.clone(),
                            positions: positions.clone(),
                        },
                        metrics,
                    ) {
                        report.drained.push(format!("pipeline `{name}`: {e:#}"));
                    }
                    self.pipelines.push(RunningPipeline {
                        pipeline,
                        info,
                        allowed,
                        stages: targets,
                        positions,
                        checkpoint,
                    });
                }
                Err(e) => report
                    .drained
                    .push(format!("pipeline `{name}`: cannot start its thread: {e}")),
            }
        }

        for change in changed {
            let Some(running) = self
                .pipelines
                .iter_mut()
                .find(|p| p.info.name == change.name)
            else {
                continue;
            };
            let control = running.pipeline.controller();
            if let Some((outputs, info)) = change.outputs {
                if let Err(e) = control.outputs(outputs).await {
                    report.drained.push(e);
                }
                running.info = info;
            }
            for stage in change.stages {
                match deployer.apply_change(stage, control.clone()).await {
                    Ok(swap) => report.swaps.push(swap),
                    Err(e) => report.drained.push(e.to_string()),
                }
            }
            if let Some(allowed) = change.allowed {
                quic.set_allowed(&change.name, allowed.clone());
                running.allowed = allowed;
            }
        }

        for (built, claims) in restarted {
            let BuiltPipeline {
                setup,
                info,
                allowed,
                stages,
                positions,
            } = built;
            let name = info.name.clone();
            let Some(position) = self.pipelines.iter().position(|p| p.info.name == name) else {
                continue;
            };
            let checkpoint = setup.checkpoint.clone();
            let (gate, after) = tokio::sync::oneshot::channel();
            let successor = match Pipeline::spawn_after(setup, after) {
                Ok(successor) => successor,
                Err(e) => {
                    report
                        .drained
                        .push(format!("pipeline `{name}`: cannot start its thread: {e}"));
                    continue;
                }
            };
            quic.restart(&name, successor.input());
            for source in kafka.iter().filter(|s| s.pipeline() == name) {
                source.restart(successor.input());
            }
            quic.set_allowed(&name, allowed.clone());
            let old = std::mem::replace(
                &mut self.pipelines[position],
                RunningPipeline {
                    pipeline: successor,
                    info,
                    allowed,
                    stages: stages.clone(),
                    positions,
                    checkpoint: checkpoint.clone(),
                },
            );
            old.pipeline.retire().await;
            // Its windows are flushed; a successor that checkpoints nothing leaves no row behind.
            if let (Some(handle), None) = (&old.checkpoint, &checkpoint) {
                self.checkpoints.forget(handle);
            }
            let _ = gate.send(());
            self.retired.push(old.pipeline);
            drop(claims);
            deployer.set_pipeline(
                &name,
                PipelineTarget {
                    control: self.pipelines[position].pipeline.controller(),
                    stages,
                },
            );
        }

        for (name, claims) in removed {
            if let Err(e) = quic.remove(&name) {
                report.drained.push(format!("pipeline `{name}`: {e:#}"));
            }
            if let Some(position) = self.pipelines.iter().position(|p| p.info.name == name) {
                let old = self.pipelines.remove(position);
                old.pipeline.retire().await;
                if let Some(handle) = &old.checkpoint {
                    self.checkpoints.forget(handle);
                }
                self.retired.push(old.pipeline);
            }
            drop(claims);
            deployer.remove_pipeline(&name);
        }
        // In the new config's order.
        self.pipelines.sort_by_key(|p| {
            config
                .pipelines
                .iter()
                .position(|c| c.name == p.info.name)
                .unwrap_or(usize::MAX)
        });

        if diff.producers {
            quic.set_auth(&config.listener);
        }

        for (name, sink) in before {
            if self.sinks.get(&name).is_some_and(|s| Arc::ptr_eq(s, &sink)) {
                continue;
            }
            report.drained.push(self.drain(&sink).await);
        }
        report.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        (config, report)
    }

    /// Closes a sink no pipeline writes to any more and waits (at most [`DRAIN`]) for it to
    /// deliver what it holds; what became of it.
    async fn drain(&mut self, sink: &Arc<Sink>) -> String {
        sink.close();
        let Some(position) = self.runners.iter().position(|(s, _)| Arc::ptr_eq(s, sink)) else {
            return format!("sink `{}`: closed", sink.name());
        };
        let finished = tokio::time::timeout(DRAIN, &mut self.runners[position].1).await;
        let Ok(finished) = finished else {
            let left = sink.buffered();
            return if sink.buffer().when_full == sinks::WhenFull::Spill {
                format!(
                    "sink `{}`: {left} events still in its disk buffer after {DRAIN:?}; it goes on delivering them in the background, and what it has not delivered when the router stops stays in the disk buffer for a config that names it again",
                    sink.name()
                )
            } else {
                format!(
                    "sink `{}`: {left} events still buffered after {DRAIN:?} (its destination {} does not take them); it goes on delivering them in the background until the router stops",
                    sink.name(),
                    sink.describe()
                )
            };
        };
        self.runners.remove(position);
        match finished {
            Ok(problems) if problems.is_empty() => {
                format!("sink `{}`: delivered what it held and closed", sink.name())
            }
            Ok(problems) => problems.join("; "),
            Err(e) => format!("sink `{}`: its task failed: {e}", sink.name()),
        }
    }
}

/// The sinks the pipelines of `config` write to: their sinks, `unmatched` and dead-letter
/// sinks, and the default dead-letter files.
fn used_sinks(config: &Config) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for p in &config.pipelines {
        used.extend(p.sinks.iter().map(|r| r.sink.clone()));
        if let crate::pipeline::route::Unmatched::Sink(s) = &p.unmatched {
            used.insert(s.clone());
        }
        match &p.dead_letters {
            Some(s) => used.insert(s.clone()),
            None => used.insert(format!("{}/dead-letters", p.name)),
        };
    }
    used
}
