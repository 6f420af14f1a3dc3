//! `weir serve` as a library: the composition root. [`Server::start`] opens the plugin
//! registry, builds the topology from a [`Config`] (plugins, stages, sinks, pipelines), serves
//! the metrics and the admin endpoint, and starts the QUIC source on the pipelines' inputs;
//! [`Server::reload`] applies a changed config file to the running router
//! (`topology/reload.rs`); [`Server::shutdown`] stops everything in the order that loses
//! nothing. [`Server::stats`] reads the counters back from the metrics, the one place they are
//! kept.

use crate::admin::deploy::Deployer;
use crate::admin::registry::Registry;
use crate::admin::status::{PipelineStatus, ReloadRecord, SinkStatus, StageStatus, StatusView};
use crate::admin::{AdminServer, BoxFuture, ReloadError, ReloadReport, RouterHandle};
use crate::checkpoint::Checkpoints;
use crate::config::Config;
use crate::metrics::{Metrics, MetricsServer};
use crate::pipeline::PipelineInput;
use crate::pipeline::tap::{TapReader, Taps};
use crate::sinks::runner::{Sink, WhenFull};
use crate::sources::SourceConfig;
use crate::sources::kafka::KafkaSource;
use crate::sources::quic::{self, PipelineEntry, QuicControl, QuicSource};
use crate::topology::{RunningPipeline, Topology};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

pub use crate::topology::PipelineInfo;

/// A snapshot of a pipeline's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PipelineStats {
    /// Batches that entered the pipeline (verified, their sequence taken).
    pub batches_accepted: u64,
    /// Events in those batches.
    pub events_accepted: u64,
    /// Events in batches dropped unverified as duplicates (a sequence already taken).
    pub duplicates_dropped: u64,
    /// Batches acked (accepted by every sink that takes events of them).
    pub batches_acked: u64,
    /// Events the last stage output (fanned out to the sinks).
    pub events_out: u64,
    /// Dead letters sent to the dead-letter sink.
    pub dead_letters: u64,
    /// Late events sent to the dead-letter sink.
    pub late_events: u64,
}

/// A snapshot of a sink's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SinkStats {
    /// Events accepted into its buffer (memory or disk).
    pub events_in: u64,
    /// Events delivered to its destination.
    pub events_out: u64,
    /// Events dropped by its `when_full` policy.
    pub dropped: u64,
    /// Failed send attempts.
    pub errors: u64,
    /// Events its destination refused, sent to the dead-letter sink.
    pub dead_lettered: u64,
    /// Events buffered now (memory or disk).
    pub buffered: u64,
}

/// A snapshot of the server's counters, read from its metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections whose `hello` was accepted (`welcome` sent).
    pub connections_accepted: u64,
    /// Connections refused in the handshake (`refuse` sent).
    pub connections_refused: u64,
    /// Connections refused at the QUIC level because `max_connections` were open.
    pub connections_over_limit: u64,
    /// Batch frames read off streams (duplicates and failed ones included).
    pub batches_received: u64,
    /// Batch streams failed with an error (framing, limits, invalid batch, gap).
    pub stream_errors: u64,
    /// Sum over the pipelines.
    pub batches_accepted: u64,
    /// Sum over the pipelines.
    pub events_accepted: u64,
    /// Sum over the pipelines.
    pub duplicates_dropped: u64,
    /// Sum over the pipelines.
    pub batches_acked: u64,
    /// Sum over the pipelines.
    pub events_out: u64,
    /// Sum over the pipelines.
    pub dead_letters: u64,
    /// Per pipeline, by name.
    pub pipelines: BTreeMap<String, PipelineStats>,
    /// Per sink, by name (dead-letter files included, named `PIPELINE/dead-letters`).
    pub sinks: BTreeMap<String, SinkStats>,
}

/// What a graceful shutdown did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// The counters once everything stopped.
    pub stats: Stats,
    /// Problems met while stopping (a sink that could not flush, windows not flushed); empty
    /// when everything accepted was written and acked.
    pub problems: Vec<String>,
}

/// The running config and topology, which reloads change.
struct Running {
    config: Config,
    topology: Topology,
}

/// What the counters are read from: the pipelines and sinks as they run now.
#[derive(Clone, Default)]
struct View {
    pipelines: Vec<PipelineInfo>,
    sinks: BTreeMap<String, Arc<Sink>>,
}

impl View {
    fn of(topology: &Topology) -> View {
        View {
            pipelines: topology
                .pipelines()
                .iter()
                .map(|p| p.info.clone())
                .collect(),
            sinks: topology.sinks().clone(),
        }
    }
}

/// What the server shares with reloads and the admin endpoint.
struct Core {
    metrics: Arc<Metrics>,
    checkpoints: Arc<Checkpoints>,
    registry: Arc<Registry>,
    deployer: Arc<Deployer>,
    quic: QuicControl,
    /// The Kafka sources (`[sources]`; a reload does not change them).
    kafka: Vec<KafkaSource>,
    /// `None` once the server is stopping. One reload at a time holds it.
    running: tokio::sync::Mutex<Option<Running>>,
    view: Mutex<View>,
    /// The `weir tap` readers.
    taps: Arc<Taps>,
    /// When the server started, ms since the Unix epoch.
    started_ms: i64,
    /// The config file it runs.
    config_path: PathBuf,
    last_reload: Mutex<Option<ReloadRecord>>,
}

impl Core {
    fn view(&self) -> View {
        self.view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The Kafka sources take no record from now on.
    fn stop_reading(&self) {
        for source in &self.kafka {
            source.stop_reading();
        }
    }

    /// After the pipelines stopped: the Kafka sources commit and leave their groups.
    async fn close_sources(&self) {
        for source in &self.kafka {
            source.close().await;
        }
    }

    async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let result = self.apply_reload().await;
        let (applied, summary) = match &result {
            Ok(report) if report.changes.is_empty() => (true, "no changes".to_owned()),
            Ok(report) => (
                true,
                format!(
                    "{} change{}: {}",
                    report.changes.len(),
                    if report.changes.len() == 1 { "" } else { "s" },
                    report.changes.join("; ")
                ),
            ),
            Err(e) => (false, e.to_string()),
        };
        *lock(&self.last_reload) = Some(ReloadRecord {
            at_ms: crate::utc::now_ms(),
            applied,
            summary,
        });
        result
    }

    async fn apply_reload(&self) -> Result<ReloadReport, ReloadError> {
        let mut running = self.running.lock().await;
        let Some(Running { config, topology }) = running.as_mut() else {
            return Err(ReloadError::Stopping);
        };
        let new = Config::load(&config.path).map_err(|e| ReloadError::Invalid(e.to_string()))?;
        let plan = topology
            .prepare(config, &new, &self.registry, &self.metrics, &self.deployer)
            .await
            .map_err(|e| {
                if e.contains("is in progress") {
                    ReloadError::Busy(e)
                } else {
                    ReloadError::Refused(e)
                }
            })?;
        let (applied, report) = topology
            .apply(plan, &self.quic, &self.kafka, &self.deployer, &self.metrics)
            .await;
        *config = applied;
        let view = View::of(topology);
        let names: Vec<&str> = view.pipelines.iter().map(|p| p.name.as_str()).collect();
        self.taps.retain(&names);
        *lock(&self.view) = view;
        Ok(report)
    }

    /// Every pipeline, stage and sink with its counters, the versions serving, the last
    /// reload.
    fn status(&self) -> StatusView {
        let view = self.view();
        let stats = stats(&self.metrics, &view.pipelines, &view.sinks);
        let plugins = crate::admin::plugins(&self.deployer);
        let pipelines = view
            .pipelines
            .iter()
            .map(|info| PipelineStatus {
                name: info.name.clone(),
                counts: stats.pipelines.get(&info.name).cloned().unwrap_or_default(),
                stages: plugins
                    .stages
                    .iter()
                    .filter(|s| s.pipeline == info.name)
                    .map(|s| {
                        let m = self.metrics.stage(&s.pipeline, &s.stage);
                        let serving = s.versions.iter().find(|v| v.version == s.serving);
                        StageStatus {
                            name: s.stage.clone(),
                            kind: s.kind.clone(),
                            events_in: m.events_in.get(),
                            events_out: m.events_out.get(),
                            dropped: m.dropped.get(),
                            dead_lettered: m.errors.get(),
                            plugin: serving.map(|v| v.name.clone()).unwrap_or_default(),
                            version: s.serving.clone(),
                            deployed_ms: serving.map_or(0, |v| v.deployed_at_ms),
                        }
                    })
                    .collect(),
                sinks: info.sinks.clone(),
            })
            .collect();
        let sinks = view
            .sinks
            .iter()
            .map(|(name, sink)| {
                let buffer = sink.buffer();
                SinkStatus {
                    name: name.clone(),
                    destination: sink.describe(),
                    counts: stats.sinks.get(name).cloned().unwrap_or_default(),
                    capacity: match buffer.when_full {
                        // A disk buffer, bounded in bytes.
                        WhenFull::Spill => 0,
                        _ => buffer.max_events as u64,
                    },
                    when_full: buffer.when_full.as_str().to_owned(),
                }
            })
            .collect();
        StatusView {
            now_ms: crate::utc::now_ms(),
            started_ms: self.started_ms,
            config: self.config_path.display().to_string(),
            pipelines,
            sinks,
            sources: self.kafka.iter().map(KafkaSource::status).collect(),
            last_reload: lock(&self.last_reload).clone(),
        }
    }

    /// A reader of what leaves `pipeline` (or its stage `stage`).
    fn tap(&self, pipeline: &str, stage: Option<&str>, sample: u64) -> Result<TapReader, String> {
        let view = self.view();
        let Some(info) = view.pipelines.iter().find(|p| p.name == pipeline) else {
            let names: Vec<&str> = view.pipelines.iter().map(|p| p.name.as_str()).collect();
            return Err(format!(
                "no pipeline `{pipeline}` (there {}: {})",
                if names.len() == 1 { "is" } else { "are" },
                names.join(", ")
            ));
        };
        if let Some(stage) = stage {
            let stages: Vec<String> = self
                .deployer
                .pipelines()
                .remove(&info.name)
                .map(|target| target.stages.into_iter().map(|s| s.name).collect())
                .unwrap_or_default();
            if !stages.iter().any(|s| s == stage) {
                return Err(format!(
                    "pipeline `{pipeline}` has no stage `{stage}` (its stages: {})",
                    if stages.is_empty() {
                        "none".to_owned()
                    } else {
                        stages.join(", ")
                    }
                ));
            }
        }
        Ok(self.taps.subscribe(pipeline, stage, sample))
    }
}

/// Starts the Kafka sources of `config`, each feeding its pipeline; none when one fails (those
/// started are closed).
async fn start_sources(
    config: &Config,
    topology: &Topology,
    metrics: &Arc<Metrics>,
) -> Result<Vec<KafkaSource>> {
    let mut started = Vec::new();
    for source in &config.sources {
        let SourceConfig::Kafka(kafka) = source;
        let Some(pipeline) = topology
            .pipelines()
            .iter()
            .find(|p| p.info.name == kafka.pipeline)
        else {
            anyhow::bail!(
                "source `{}`: pipeline `{}` is not running",
                kafka.name,
                kafka.pipeline
            );
        };
        match KafkaSource::start(kafka, pipeline.input(), &pipeline.positions, metrics) {
            Ok(source) => started.push(source),
            Err(e) => {
                for source in &started {
                    source.close().await;
                }
                return Err(e);
            }
        }
    }
    Ok(started)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RouterHandle for Core {
    fn reload(&self) -> BoxFuture<'_, Result<ReloadReport, ReloadError>> {
        Box::pin(Core::reload(self))
    }

    fn status(&self) -> StatusView {
        Core::status(self)
    }

    fn tap(&self, pipeline: &str, stage: Option<&str>, sample: u64) -> Result<TapReader, String> {
        Core::tap(self, pipeline, stage, sample)
    }
}

/// A running `weir serve`.
pub struct Server {
    core: Arc<Core>,
    quic: QuicSource,
    metrics_server: Option<MetricsServer>,
    admin: Option<AdminServer>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("quic", &self.quic)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Compiles every plugin, opens every sink, binds the listener (loading the certificate,
    /// generated once when no TLS is configured), starts the pipelines and the accept loop,
    /// and returns: producers can connect at once.
    pub async fn start(config: Config) -> Result<Server> {
        let metrics = Metrics::new();
        crate::files::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
        let registry = Arc::new(Registry::open(&config.data_dir)?);
        let checkpoints = Checkpoints::open(&config.data_dir)?;
        let taps = Arc::new(Taps::default());
        let built = Topology::build(&config, &metrics, &registry, &checkpoints, &taps)?;
        let metrics_server = match config.metrics {
            Some(addr) => Some(
                crate::metrics::serve(addr, metrics.clone())
                    .await
                    .with_context(|| format!("cannot serve metrics on {addr}"))?,
            ),
            None => None,
        };
        let topology = built.start()?;
        let entries = topology
            .pipelines()
            .iter()
            .map(|p| PipelineEntry {
                input: p.input(),
                allowed: p.allowed.clone(),
                positions: p.positions.clone(),
            })
            .collect();
        let deployer = Arc::new(Deployer::new(
            topology.runtime().clone(),
            registry.clone(),
            metrics.clone(),
            topology.deploy_targets(),
        ));
        let quic = match QuicSource::start(&config.listener, &config.data_dir, entries, &metrics) {
            Ok(quic) => quic,
            Err(e) => {
                // Nothing was accepted: stop what started, quietly.
                topology.stop_pipelines().await;
                topology.stop_sinks().await;
                return Err(e);
            }
        };
        let kafka = match start_sources(&config, &topology, &metrics).await {
            Ok(kafka) => kafka,
            Err(e) => {
                quic.stop_reading().await;
                topology.stop_pipelines().await;
                topology.stop_sinks().await;
                quic.close().await;
                return Err(e);
            }
        };
        let core = Arc::new(Core {
            kafka,
            metrics,
            checkpoints,
            registry,
            deployer: deployer.clone(),
            quic: quic.control(),
            view: Mutex::new(View::of(&topology)),
            running: tokio::sync::Mutex::new(None),
            taps,
            started_ms: crate::utc::now_ms(),
            config_path: config.path.clone(),
            last_reload: Mutex::new(None),
        });
        let admin = match &config.admin {
            None => None,
            Some(admin) => {
                let started = AdminServer::start(admin, deployer, core.clone())
                    .await
                    .with_context(|| {
                        format!("cannot serve the admin endpoint on {}", admin.listen)
                    });
                match started {
                    Ok(admin) => Some(admin),
                    Err(e) => {
                        quic.stop_reading().await;
                        core.stop_reading();
                        topology.stop_pipelines().await;
                        core.close_sources().await;
                        topology.stop_sinks().await;
                        quic.close().await;
                        return Err(e);
                    }
                }
            }
        };
        *core.running.lock().await = Some(Running { config, topology });
        Ok(Server {
            core,
            quic,
            metrics_server,
            admin,
        })
    }

    /// Reads the config file again and applies what changed to the running router (see
    /// `topology/reload.rs`); an invalid config, or one whose parts cannot be built, changes
    /// nothing.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        self.core.reload().await
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.quic.local_addr()
    }

    /// The SHA-256 fingerprint (64 hex digits) of the certificate the server presents.
    pub fn fingerprint(&self) -> String {
        self.quic.fingerprint()
    }

    /// The certificate file the server presents.
    pub fn cert_path(&self) -> &Path {
        self.quic.cert_path()
    }

    /// Whether the certificate is the self-signed one generated into the data directory.
    pub fn cert_generated(&self) -> bool {
        self.quic.cert_generated()
    }

    /// The pipelines as they run now, in config order.
    pub fn pipelines(&self) -> Vec<PipelineInfo> {
        self.core.view().pipelines
    }

    /// Where pipeline `name` takes batches now, as a source hands them over (`None`: no such
    /// pipeline): for feeding a pipeline in-process, without the network.
    pub async fn input(&self, name: &str) -> Option<PipelineInput> {
        let running = self.core.running.lock().await;
        let pipelines = running.as_ref()?.topology.pipelines();
        pipelines
            .iter()
            .find(|p| p.info.name == name)
            .map(RunningPipeline::input)
    }

    /// The metrics (what the Prometheus endpoint serves).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.core.metrics
    }

    /// The address of the Prometheus endpoint, when `[metrics]` configures one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_server.as_ref().map(MetricsServer::local_addr)
    }

    /// The address of the admin endpoint, when `[admin]` configures one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::local_addr)
    }

    /// The counters now, read from the metrics.
    pub fn stats(&self) -> Stats {
        let view = self.core.view();
        stats(&self.core.metrics, &view.pipelines, &view.sinks)
    }

    /// Stops gracefully (PROTOCOL §12): `goaway` to every producer, new connections refused
    /// with `SHUTTING_DOWN`, no further batch read; every batch already read is processed,
    /// aggregate windows are checkpointed (or, with `checkpoint = false`, finished), sinks
    /// flushed and everything accepted acked; then each
    /// connection closes with `NO_ERROR` and the endpoint closes.
    pub async fn shutdown(self) -> Result<ShutdownReport> {
        // Taps end (their streams would hold the admin endpoint's stop).
        self.core.taps.close();
        // No deploy starts from now on; one on probation ends with its pipeline.
        if let Some(admin) = self.admin {
            admin.stop().await;
        }
        // A reload under way finishes first; none starts after.
        let running = self.core.running.lock().await.take();
        let view = self.core.view();
        self.core.checkpoints.stopping();
        self.quic.stop_reading().await;
        self.core.stop_reading();
        let mut problems = Vec::new();
        if let Some(Running { topology, .. }) = running {
            problems.extend(topology.stop_pipelines().await);
            // The last rounds' checkpoints, then their acks and commits.
            self.core.checkpoints.sync().await;
            problems.extend(self.quic.withheld());
            self.core.close_sources().await;
            problems.extend(topology.stop_sinks().await);
        }
        if let Some(server) = self.metrics_server {
            server.stop().await;
        }
        self.quic.close().await;
        // Released for a router started after this one on the same data directory.
        let checkpoints = self.core.checkpoints.clone();
        let _ = tokio::task::spawn_blocking(move || checkpoints.close()).await;
        Ok(ShutdownReport {
            stats: stats(&self.core.metrics, &view.pipelines, &view.sinks),
            problems,
        })
    }
}

/// The counters of `pipelines` and `sinks`, read from `metrics`.
fn stats(
    metrics: &Metrics,
    pipelines: &[PipelineInfo],
    sinks: &BTreeMap<String, Arc<Sink>>,
) -> Stats {
    let source = metrics.source(quic::SOURCE);
    let mut stats = Stats {
        connections_accepted: source.connections_accepted.get(),
        connections_refused: source.connections_refused.get(),
        connections_over_limit: source.connections_over_limit.get(),
        batches_received: source.batches_received.get(),
        stream_errors: source.stream_errors.get(),
        ..Stats::default()
    };
    for info in pipelines {
        let m = metrics.pipeline(&info.name);
        let s = PipelineStats {
            batches_accepted: m.batches_in.get(),
            events_accepted: m.events_in.get(),
            duplicates_dropped: m.duplicates_dropped.get(),
            batches_acked: m.batches_acked.get(),
            events_out: m.events_out.get(),
            dead_letters: m.dead_letters.get(),
            late_events: m.late_events.get(),
        };
        stats.batches_accepted += s.batches_accepted;
        stats.events_accepted += s.events_accepted;
        stats.duplicates_dropped += s.duplicates_dropped;
        stats.batches_acked += s.batches_acked;
        stats.events_out += s.events_out;
        stats.dead_letters += s.dead_letters;
        stats.pipelines.insert(info.name.clone(), s);
    }
    for (name, sink) in sinks {
        let m = sink.metrics();
        stats.sinks.insert(
            name.clone(),
            SinkStats {
                events_in: m.events_in.get(),
                events_out: m.events_out.get(),
                dropped: m.dropped.get(),
                errors: m.errors.get(),
                dead_lettered: m.dead_lettered.get(),
                buffered: sink.buffered(),
            },
        );
    }
    stats
}
