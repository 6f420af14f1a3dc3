//! `weir serve` as a library: the composition root. [`Server::start`] opens the plugin
//! registry, builds the topology from a [`Config`] (plugins, stages, sinks, pipelines), serves
//! the metrics and the admin endpoint, and starts the QUIC source on the pipelines' inputs; [`Server::shutdown`] stops them in the order that loses
//! nothing. [`Server::stats`] reads the counters back from the metrics, the one place they are
//! kept.

use crate::admin::AdminServer;
use crate::admin::deploy::Deployer;
use crate::admin::registry::Registry;
use crate::config::Config;
use crate::metrics::{Metrics, MetricsServer};
use crate::sinks::runner::Sink;
use crate::sources::quic::{self, PipelineEntry, QuicSource};
use crate::topology::Topology;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

pub use crate::topology::PipelineInfo;

/// A snapshot of a pipeline's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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

/// A running `weir serve`.
pub struct Server {
    topology: Topology,
    quic: QuicSource,
    metrics: Arc<Metrics>,
    metrics_server: Option<MetricsServer>,
    admin: Option<AdminServer>,
    pipelines: Vec<PipelineInfo>,
    /// Every sink, by name, for the stats (also after the topology stopped).
    sinks: BTreeMap<String, Arc<Sink>>,
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
        let built = Topology::build(&config, &metrics, &registry)?;
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
            })
            .collect();
        let admin = match &config.admin {
            None => Ok(None),
            Some(admin) => {
                let deployer = Deployer::new(
                    topology.runtime().clone(),
                    registry.clone(),
                    metrics.clone(),
                    topology.deploy_targets(),
                );
                AdminServer::start(admin, Arc::new(deployer))
                    .await
                    .map(Some)
                    .with_context(|| format!("cannot serve the admin endpoint on {}", admin.listen))
            }
        };
        let started = admin.and_then(|admin| {
            QuicSource::start(&config.listener, &config.data_dir, entries, &metrics)
                .map(|quic| (admin, quic))
        });
        let (admin, quic) = match started {
            Ok(started) => started,
            Err(e) => {
                // Nothing was accepted: stop what started, quietly.
                topology.stop_pipelines().await;
                topology.stop_sinks().await;
                return Err(e);
            }
        };
        let pipelines = topology
            .pipelines()
            .iter()
            .map(|p| p.info.clone())
            .collect();
        let sinks = topology.sinks().clone();
        Ok(Server {
            topology,
            quic,
            metrics,
            metrics_server,
            admin,
            pipelines,
            sinks,
        })
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

    /// The pipelines, in config order.
    pub fn pipelines(&self) -> &[PipelineInfo] {
        &self.pipelines
    }

    /// The metrics (what the Prometheus endpoint serves).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
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
        stats(&self.metrics, &self.pipelines, &self.sinks)
    }

    /// Stops gracefully (PROTOCOL §12): `goaway` to every producer, new connections refused
    /// with `SHUTTING_DOWN`, no further batch read; every batch already read is processed,
    /// aggregate windows are flushed, sinks flushed and everything accepted acked; then each
    /// connection closes with `NO_ERROR` and the endpoint closes.
    pub async fn shutdown(self) -> Result<ShutdownReport> {
        // No deploy starts from now on; one on probation ends with its pipeline.
        if let Some(admin) = self.admin {
            admin.stop().await;
        }
        self.quic.stop_reading().await;
        let mut problems = self.topology.stop_pipelines().await;
        problems.extend(self.quic.withheld());
        problems.extend(self.topology.stop_sinks().await);
        if let Some(server) = self.metrics_server {
            server.stop().await;
        }
        self.quic.close().await;
        Ok(ShutdownReport {
            stats: stats(&self.metrics, &self.pipelines, &self.sinks),
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
