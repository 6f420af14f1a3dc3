//! Counters, gauges and histograms of `weir serve`, and the HTTP endpoint that Prometheus
//! scrapes them from.
//!
//! [`Metrics`] owns one [`prometheus_client`] registry with every metric family below. The
//! pipeline worker and the sink runners ask it once, at startup, for their handles
//! ([`Metrics::pipeline`], [`Metrics::stage`], [`Metrics::sink`]); a handle holds the series
//! themselves, so counting an event is one relaxed atomic add and never a lookup (observing a
//! histogram takes the histogram's own uncontended lock). Asking twice for the same pipeline,
//! stage or sink returns handles to the same series. Counters and gauges can be read back
//! (`Counter::get`, `Gauge::get`), which is how `weir demo` prints live counts; histograms are
//! read through [`Metrics::render`] only (prometheus-client 0.24 exposes no reader for them).
//!
//! [`serve`] answers `GET /metrics` with [`Metrics::render`]: the OpenMetrics text format
//! (`application/openmetrics-text; version=1.0.0`), which Prometheus scrapes natively.
//!
//! | metric | type | labels | meaning |
//! | --- | --- | --- | --- |
//! | `weir_pipeline_events_in_total` | counter | `pipeline` | events that entered the pipeline |
//! | `weir_pipeline_batches_in_total` | counter | `pipeline` | batches that entered the pipeline |
//! | `weir_pipeline_batches_acked_total` | counter | `pipeline` | batches acknowledged to their producer |
//! | `weir_pipeline_unmatched_events_total` | counter | `pipeline` | events that left the last stage and that no sink took |
//! | `weir_pipeline_unmatched_dropped_events_total` | counter | `pipeline` | unmatched events dropped, as the pipeline's config asks |
//! | `weir_pipeline_dead_lettered_events_total` | counter | `pipeline` | events the pipeline sent to its dead-letter destination |
//! | `weir_pipeline_late_events_total` | counter | `pipeline` | events that arrived after their window had closed |
//! | `weir_pipeline_duplicate_events_dropped_total` | counter | `pipeline` | events dropped as duplicates of events already taken |
//! | `weir_pipeline_events_out_total` | counter | `pipeline` | events that left the last stage (fanned out to the sinks) |
//! | `weir_stage_events_in_total` | counter | `pipeline`, `stage` | events handed to the stage |
//! | `weir_stage_events_out_total` | counter | `pipeline`, `stage` | events the stage passed on |
//! | `weir_stage_dropped_events_total` | counter | `pipeline`, `stage` | events the stage filtered out |
//! | `weir_stage_failed_events_total` | counter | `pipeline`, `stage` | events the stage failed on, which were dead-lettered |
//! | `weir_stage_batches_retried_total` | counter | `pipeline`, `stage` | batches (or end-of-input flushes) whose call failed as a whole (a trap, the deadline, the memory cap, an error the plugin returned, output that does not verify) and that were retried event by event |
//! | `weir_stage_latency_seconds` | histogram | `pipeline`, `stage` | seconds the stage spent on one batch |
//! | `weir_stage_swaps_total` | counter | `pipeline`, `stage` | plugin versions swapped in (deploys and rollbacks) |
//! | `weir_stage_rollbacks_total` | counter | `pipeline`, `stage` | versions rolled back automatically after failing on probation |
//! | `weir_stage_swap_pause_seconds` | histogram | `pipeline`, `stage` | how long batches waited for a swap |
//! | `weir_stage_version_batches_total` | counter | `pipeline`, `stage`, `version` | batches a plugin version processed |
//! | `weir_stage_version_failed_events_total` | counter | `pipeline`, `stage`, `version` | events a plugin version failed on |
//! | `weir_sink_events_in_total` | counter | `sink` | events accepted into the sink's buffer |
//! | `weir_sink_events_out_total` | counter | `sink` | events delivered to the destination |
//! | `weir_sink_dropped_events_total` | counter | `sink` | events dropped by the sink's `when_full` policy |
//! | `weir_sink_send_errors_total` | counter | `sink` | failed send attempts (each retry that fails counts once) |
//! | `weir_sink_dead_lettered_events_total` | counter | `sink` | events the destination rejected, sent to the dead-letter destination |
//! | `weir_sink_buffer_events` | gauge | `sink` | events in the sink's memory buffer now |
//! | `weir_sink_buffer_bytes` | gauge | `sink` | bytes in the sink's memory buffer now |
//! | `weir_sink_spill_bytes` | gauge | `sink` | bytes in the sink's disk spill buffer now |
//! | `weir_sink_latency_seconds` | histogram | `sink` | seconds from an event entering the buffer to its delivery |
//! | `weir_sink_send_latency_seconds` | histogram | `sink` | seconds one send call to the destination took |
//! | `weir_source_connections_accepted_total` | counter | `source` | connections whose `hello` was accepted |
//! | `weir_source_connections_refused_total` | counter | `source` | connections refused in the handshake |
//! | `weir_source_connections_over_limit_total` | counter | `source` | connections refused because `max_connections` were open |
//! | `weir_source_batches_received_total` | counter | `source` | batch frames read off streams (duplicates included) |
//! | `weir_source_stream_errors_total` | counter | `source` | batch streams failed with an error (framing, limits, invalid batch, gap) |
//! | `weir_source_kafka_lag` | gauge | `source`, `topic`, `partition` | records of a partition the Kafka source owns that it has not read yet (the partition's end minus the source's position) |
//!
//! A sink is labelled by its name only: pipelines that share a sink share its series. The
//! QUIC listener is the source `quic`.
//!
//! These series are the only counts the server keeps: `Server::stats`, the shutdown summary and
//! `weir demo` read them back, so what they print and what Prometheus scrapes cannot differ.
//! Histograms have the buckets of [`LATENCY_BUCKETS`]: 50 µs doubling up to 26.2 s, and
//! `+Inf`. Counters end in `_total` in the exposition; their `# TYPE` lines name the family
//! without the suffix, as OpenMetrics requires.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::http::{Handler, HttpServer};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::Histogram;

/// The `Content-Type` of [`Metrics::render`]'s output, as prometheus-client's encoder writes
/// it.
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How many buckets a latency histogram has, besides `+Inf`.
const LATENCY_BUCKET_COUNT: usize = 20;

/// The upper bounds, in seconds, of every latency histogram's buckets: 50 µs, doubling up to
/// 26.2144 s (`+Inf` follows).
pub const LATENCY_BUCKETS: [f64; LATENCY_BUCKET_COUNT] = latency_buckets();

const fn latency_buckets() -> [f64; LATENCY_BUCKET_COUNT] {
    let mut buckets = [0.0; LATENCY_BUCKET_COUNT];
    let mut bound = 50e-6;
    let mut i = 0;
    while i < LATENCY_BUCKET_COUNT {
        buckets[i] = bound;
        bound *= 2.0;
        i += 1;
    }
    buckets
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// How long [`MetricsServer::stop`] lets a response in flight finish (a scraper that stopped
/// reading) before it closes the connection anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A label value, escaped as the text format asks when encoded: `\` as `\\`, `"` as `\"` and a
/// line feed as `\n`. (prometheus-client 0.24 writes label values as they are.)
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct LabelValue(String);

impl EncodeLabelValue for LabelValue {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let mut rest = self.0.as_str();
        while let Some(at) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..at])?;
            encoder.write_str(match rest.as_bytes()[at] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[at + 1..];
        }
        encoder.write_str(rest)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PipelineLabels {
    pipeline: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    pipeline: LabelValue,
    stage: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    pipeline: LabelValue,
    stage: LabelValue,
    version: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    source: LabelValue,
    topic: LabelValue,
    partition: LabelValue,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn histogram_family<L: Clone + std::hash::Hash + Eq>() -> HistogramFamily<L> {
    Family::new_with_constructor(latency_histogram)
}

fn partition_labels(source: &str, topic: &str, partition: i32) -> PartitionLabels {
    PartitionLabels {
        source: LabelValue(source.to_owned()),
        topic: LabelValue(topic.to_owned()),
        partition: LabelValue(partition.to_string()),
    }
}

/// The series of one pipeline. Clone it once per task that counts; clones share the series.
#[derive(Clone, Debug)]
pub struct PipelineMetrics {
    /// Events that entered the pipeline.
    pub events_in: Counter,
    /// Batches that entered the pipeline.
    pub batches_in: Counter,
    /// Batches acknowledged to their producer.
    pub batches_acked: Counter,
    /// Events that left the last stage and that no sink took.
    pub unmatched: Counter,
    /// Unmatched events dropped, as the pipeline's config asks.
    pub unmatched_dropped: Counter,
    /// Events sent to the pipeline's dead-letter destination.
    pub dead_letters: Counter,
    /// Events that arrived after their window had closed.
    pub late_events: Counter,
    /// Events dropped as duplicates of events already taken.
    pub duplicates_dropped: Counter,
    /// Events that left the last stage (fanned out to the sinks).
    pub events_out: Counter,
}

/// The series of one source (the QUIC listener is `quic`). Clones share the series.
#[derive(Clone, Debug)]
pub struct SourceMetrics {
    /// Connections whose `hello` was accepted.
    pub connections_accepted: Counter,
    /// Connections refused in the handshake.
    pub connections_refused: Counter,
    /// Connections refused because `max_connections` were open.
    pub connections_over_limit: Counter,
    /// Batch frames read off streams (duplicates and later-failed ones included).
    pub batches_received: Counter,
    /// Batch streams failed with an error.
    pub stream_errors: Counter,
}

/// The series of one stage of one pipeline. Clones share the series.
#[derive(Clone, Debug)]
pub struct StageMetrics {
    /// Events handed to the stage.
    pub events_in: Counter,
    /// Events the stage passed on.
    pub events_out: Counter,
    /// Events the stage filtered out.
    pub dropped: Counter,
    /// Events the stage failed on, which were dead-lettered.
    pub errors: Counter,
    /// Batches retried event by event after the call on the whole batch failed.
    pub retried: Counter,
    /// Seconds the stage spent on one batch.
    pub latency: Histogram,
    /// Plugin versions swapped in.
    pub swaps: Counter,
    /// Versions rolled back automatically after failing on probation.
    pub rollbacks: Counter,
    /// Seconds batches waited for a swap.
    pub swap_pause: Histogram,
}

/// The series of one plugin version of one stage. Clones share the series.
#[derive(Clone, Debug)]
pub struct VersionMetrics {
    /// Batches the version processed.
    pub batches: Counter,
    /// Events the version failed on.
    pub failed_events: Counter,
}

/// The series of one sink, shared by every pipeline that writes to it. Clones share the
/// series.
#[derive(Clone, Debug)]
pub struct SinkMetrics {
    /// Events accepted into the sink's buffer.
    pub events_in: Counter,
    /// Events delivered to the destination.
    pub events_out: Counter,
    /// Events dropped by the sink's `when_full` policy.
    pub dropped: Counter,
    /// Failed send attempts.
    pub errors: Counter,
    /// Events the destination rejected, sent to the dead-letter destination.
    pub dead_lettered: Counter,
    /// Events in the memory buffer now.
    pub buffer_events: Gauge,
    /// Bytes in the memory buffer now.
    pub buffer_bytes: Gauge,
    /// Bytes in the disk spill buffer now.
    pub spill_bytes: Gauge,
    /// Seconds from an event entering the buffer to its delivery.
    pub latency: Histogram,
    /// Seconds one send call to the destination took.
    pub send_latency: Histogram,
}

#[derive(Debug, Default)]
struct PipelineFamilies {
    events_in: Family<PipelineLabels, Counter>,
    batches_in: Family<PipelineLabels, Counter>,
    batches_acked: Family<PipelineLabels, Counter>,
    unmatched: Family<PipelineLabels, Counter>,
    unmatched_dropped: Family<PipelineLabels, Counter>,
    dead_letters: Family<PipelineLabels, Counter>,
    late_events: Family<PipelineLabels, Counter>,
    duplicates_dropped: Family<PipelineLabels, Counter>,
    events_out: Family<PipelineLabels, Counter>,
}

#[derive(Debug, Default)]
struct SourceFamilies {
    connections_accepted: Family<SourceLabels, Counter>,
    connections_refused: Family<SourceLabels, Counter>,
    connections_over_limit: Family<SourceLabels, Counter>,
    batches_received: Family<SourceLabels, Counter>,
    stream_errors: Family<SourceLabels, Counter>,
    kafka_lag: Family<PartitionLabels, Gauge>,
}

#[derive(Debug)]
struct StageFamilies {
    events_in: Family<StageLabels, Counter>,
    events_out: Family<StageLabels, Counter>,
    dropped: Family<StageLabels, Counter>,
    errors: Family<StageLabels, Counter>,
    retried: Family<StageLabels, Counter>,
    latency: HistogramFamily<StageLabels>,
    swaps: Family<StageLabels, Counter>,
    rollbacks: Family<StageLabels, Counter>,
    swap_pause: HistogramFamily<StageLabels>,
    version_batches: Family<VersionLabels, Counter>,
    version_failed: Family<VersionLabels, Counter>,
}

#[derive(Debug)]
struct SinkFamilies {
    events_in: Family<SinkLabels, Counter>,
    events_out: Family<SinkLabels, Counter>,
    dropped: Family<SinkLabels, Counter>,
    errors: Family<SinkLabels, Counter>,
    dead_lettered: Family<SinkLabels, Counter>,
    buffer_events: Family<SinkLabels, Gauge>,
    buffer_bytes: Family<SinkLabels, Gauge>,
    spill_bytes: Family<SinkLabels, Gauge>,
    latency: HistogramFamily<SinkLabels>,
    send_latency: HistogramFamily<SinkLabels>,
}

/// Every metric of `weir serve`: the registry and its families. See the module doc for the
/// list.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pipelines: PipelineFamilies,
    stages: StageFamilies,
    sinks: SinkFamilies,
    sources: SourceFamilies,
}

impl Metrics {
    /// A registry with every family registered and no series yet. A family shows in
    /// [`Metrics::render`] once it has a series: once its pipeline, stage or sink was asked for.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("weir");

        let pipelines = PipelineFamilies::default();
        let p = &pipelines;
        for (name, help, family) in [
            (
                "pipeline_events_in",
                "Events that entered the pipeline",
                &p.events_in,
            ),
            (
                "pipeline_batches_in",
                "Batches that entered the pipeline",
                &p.batches_in,
            ),
            (
                "pipeline_batches_acked",
                "Batches acknowledged to their producer",
                &p.batches_acked,
            ),
            (
                "pipeline_unmatched_events",
                "Events that left the last stage and that no sink took",
                &p.unmatched,
            ),
            (
                "pipeline_unmatched_dropped_events",
                "Unmatched events dropped, as the pipeline's config asks",
                &p.unmatched_dropped,
            ),
            (
                "pipeline_dead_lettered_events",
                "Events sent to the pipeline's dead-letter destination",
                &p.dead_letters,
            ),
            (
                "pipeline_late_events",
                "Events that arrived after their window had closed",
                &p.late_events,
            ),
            (
                "pipeline_duplicate_events_dropped",
                "Events dropped as duplicates of events already taken",
                &p.duplicates_dropped,
            ),
            (
                "pipeline_events_out",
                "Events that left the last stage (fanned out to the sinks)",
                &p.events_out,
            ),
        ] {
            registry.register(name, help, family.clone());
        }

        let stages = StageFamilies {
            events_in: Family::default(),
            events_out: Family::default(),
            dropped: Family::default(),
            errors: Family::default(),
            retried: Family::default(),
            latency: histogram_family(),
            swaps: Family::default(),
            rollbacks: Family::default(),
            swap_pause: histogram_family(),
            version_batches: Family::default(),
            version_failed: Family::default(),
        };
        let s = &stages;
        for (name, help, family) in [
            (
                "stage_events_in",
                "Events handed to the stage",
                &s.events_in,
            ),
            (
                "stage_events_out",
                "Events the stage passed on",
                &s.events_out,
            ),
            (
                "stage_dropped_events",
                "Events the stage filtered out",
                &s.dropped,
            ),
            (
                "stage_failed_events",
                "Events the stage failed on, which were dead-lettered",
                &s.errors,
            ),
            (
                "stage_batches_retried",
                "Batches whose call failed as a whole and that were retried event by event",
                &s.retried,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register_with_unit(
            "stage_latency",
            "Seconds the stage spent on one batch",
            Unit::Seconds,
            s.latency.clone(),
        );
        for (name, help, family) in [
            ("stage_swaps", "Plugin versions swapped in", &s.swaps),
            (
                "stage_rollbacks",
                "Versions rolled back automatically after failing on probation",
                &s.rollbacks,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register_with_unit(
            "stage_swap_pause",
            "Seconds batches waited for a swap",
            Unit::Seconds,
            s.swap_pause.clone(),
        );
        for (name, help, family) in [
            (
                "stage_version_batches",
                "Batches a plugin version processed",
                &s.version_batches,
            ),
            (
                "stage_version_failed_events",
                "Events a plugin version failed on",
                &s.version_failed,
            ),
        ] {
            registry.register(name, help, family.clone());
        }

        let sinks = SinkFamilies {
            events_in: Family::default(),
            events_out: Family::default(),
            dropped: Family::default(),
            errors: Family::default(),
            dead_lettered: Family::default(),
            buffer_events: Family::default(),
            buffer_bytes: Family::default(),
            spill_bytes: Family::default(),
            latency: histogram_family(),
            send_latency: histogram_family(),
        };
        let k = &sinks;
        for (name, help, family) in [
            (
                "sink_events_in",
                "Events accepted into the sink's buffer",
                &k.events_in,
            ),
            (
                "sink_events_out",
                "Events delivered to the destination",
                &k.events_out,
            ),
            (
                "sink_dropped_events",
                "Events dropped by the sink's when_full policy",
                &k.dropped,
            ),
            (
                "sink_send_errors",
                "Failed send attempts to the destination",
                &k.errors,
            ),
            (
                "sink_dead_lettered_events",
                "Events the destination rejected, sent to the dead-letter destination",
                &k.dead_lettered,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "sink_buffer_events",
            "Events in the sink's memory buffer",
            k.buffer_events.clone(),
        );
        registry.register_with_unit(
            "sink_buffer",
            "Bytes in the sink's memory buffer",
            Unit::Bytes,
            k.buffer_bytes.clone(),
        );
        registry.register_with_unit(
            "sink_spill",
            "Bytes in the sink's disk spill buffer",
            Unit::Bytes,
            k.spill_bytes.clone(),
        );
        registry.register_with_unit(
            "sink_latency",
            "Seconds from an event entering the sink's buffer to its delivery",
            Unit::Seconds,
            k.latency.clone(),
        );
        registry.register_with_unit(
            "sink_send_latency",
            "Seconds one send call to the destination took",
            Unit::Seconds,
            k.send_latency.clone(),
        );

        let sources = SourceFamilies::default();
        let q = &sources;
        for (name, help, family) in [
            (
                "source_connections_accepted",
                "Connections whose hello was accepted",
                &q.connections_accepted,
            ),
            (
                "source_connections_refused",
                "Connections refused in the handshake",
                &q.connections_refused,
            ),
            (
                "source_connections_over_limit",
                "Connections refused because max_connections were open",
                &q.connections_over_limit,
            ),
            (
                "source_batches_received",
                "Batch frames read off streams (duplicates included)",
                &q.batches_received,
            ),
            (
                "source_stream_errors",
                "Batch streams failed with an error",
                &q.stream_errors,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "source_kafka_lag",
            "Records of a partition the Kafka source owns that it has not read yet",
            q.kafka_lag.clone(),
        );

        Arc::new(Metrics {
            registry,
            pipelines,
            stages,
            sinks,
            sources,
        })
    }

    /// The series of pipeline `pipeline`, created at zero the first time it is asked for.
    pub fn pipeline(&self, pipeline: &str) -> PipelineMetrics {
        let labels = PipelineLabels {
            pipeline: LabelValue(pipeline.to_owned()),
        };
        let f = &self.pipelines;
        PipelineMetrics {
            events_in: f.events_in.get_or_create_owned(&labels),
            batches_in: f.batches_in.get_or_create_owned(&labels),
            batches_acked: f.batches_acked.get_or_create_owned(&labels),
            unmatched: f.unmatched.get_or_create_owned(&labels),
            unmatched_dropped: f.unmatched_dropped.get_or_create_owned(&labels),
            dead_letters: f.dead_letters.get_or_create_owned(&labels),
            late_events: f.late_events.get_or_create_owned(&labels),
            duplicates_dropped: f.duplicates_dropped.get_or_create_owned(&labels),
            events_out: f.events_out.get_or_create_owned(&labels),
        }
    }

    /// The series of source `source`, created at zero the first time they are asked for.
    pub fn source(&self, source: &str) -> SourceMetrics {
        let labels = SourceLabels {
            source: LabelValue(source.to_owned()),
        };
        let f = &self.sources;
        SourceMetrics {
            connections_accepted: f.connections_accepted.get_or_create_owned(&labels),
            connections_refused: f.connections_refused.get_or_create_owned(&labels),
            connections_over_limit: f.connections_over_limit.get_or_create_owned(&labels),
            batches_received: f.batches_received.get_or_create_owned(&labels),
            stream_errors: f.stream_errors.get_or_create_owned(&labels),
        }
    }

    /// The lag of partition `partition` of `topic` read by Kafka source `source`, created at
    /// zero the first time it is asked for.
    pub fn kafka_lag(&self, source: &str, topic: &str, partition: i32) -> Gauge {
        self.sources
            .kafka_lag
            .get_or_create_owned(&partition_labels(source, topic, partition))
    }

    /// Drops the lag series of a partition the source no longer owns.
    pub fn forget_kafka_lag(&self, source: &str, topic: &str, partition: i32) {
        self.sources
            .kafka_lag
            .remove(&partition_labels(source, topic, partition));
    }

    /// The series of stage `stage` of pipeline `pipeline`, created at zero the first time they
    /// are asked for.
    pub fn stage(&self, pipeline: &str, stage: &str) -> StageMetrics {
        let labels = StageLabels {
            pipeline: LabelValue(pipeline.to_owned()),
            stage: LabelValue(stage.to_owned()),
        };
        let f = &self.stages;
        StageMetrics {
            events_in: f.events_in.get_or_create_owned(&labels),
            events_out: f.events_out.get_or_create_owned(&labels),
            dropped: f.dropped.get_or_create_owned(&labels),
            errors: f.errors.get_or_create_owned(&labels),
            retried: f.retried.get_or_create_owned(&labels),
            latency: f.latency.get_or_create_owned(&labels),
            swaps: f.swaps.get_or_create_owned(&labels),
            rollbacks: f.rollbacks.get_or_create_owned(&labels),
            swap_pause: f.swap_pause.get_or_create_owned(&labels),
        }
    }

    /// The series of version `version` of stage `stage` of pipeline `pipeline`.
    pub fn stage_version(&self, pipeline: &str, stage: &str, version: &str) -> VersionMetrics {
        let labels = VersionLabels {
            pipeline: LabelValue(pipeline.to_owned()),
            stage: LabelValue(stage.to_owned()),
            version: LabelValue(version.to_owned()),
        };
        let f = &self.stages;
        VersionMetrics {
            batches: f.version_batches.get_or_create_owned(&labels),
            failed_events: f.version_failed.get_or_create_owned(&labels),
        }
    }

    /// The series of sink `sink`, created at zero the first time they are asked for.
    pub fn sink(&self, sink: &str) -> SinkMetrics {
        let labels = SinkLabels {
            sink: LabelValue(sink.to_owned()),
        };
        let f = &self.sinks;
        SinkMetrics {
            events_in: f.events_in.get_or_create_owned(&labels),
            events_out: f.events_out.get_or_create_owned(&labels),
            dropped: f.dropped.get_or_create_owned(&labels),
            errors: f.errors.get_or_create_owned(&labels),
            dead_lettered: f.dead_lettered.get_or_create_owned(&labels),
            buffer_events: f.buffer_events.get_or_create_owned(&labels),
            buffer_bytes: f.buffer_bytes.get_or_create_owned(&labels),
            spill_bytes: f.spill_bytes.get_or_create_owned(&labels),
            latency: f.latency.get_or_create_owned(&labels),
            send_latency: f.send_latency.get_or_create_owned(&labels),
        }
    }

    /// Every series in the OpenMetrics text format ([`CONTENT_TYPE_OPENMETRICS`]), ending in
    /// `# EOF`.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("encoding metrics into a String cannot fail: neither the String nor a label value fails a write");
        text
    }
}

/// The running metrics endpoint that [`serve`] started. Dropping it stops the endpoint
/// without waiting; [`MetricsServer::stop`] waits until it has stopped.
#[derive(Debug)]
pub struct MetricsServer(HttpServer);

impl MetricsServer {
    /// The address the endpoint listens on (the port the system chose if it was asked for
    /// port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr()
    }

    /// Stops accepting connections, lets responses in flight finish (for up to 5 s), closes
    /// every connection and returns once all of that is done.
    pub async fn stop(self) {
        self.0.stop().await;
    }
}

/// Listens on `addr` and answers `GET /metrics` (and `HEAD`) with [`Metrics::render`], `405`
/// to other methods there and `404` to every other path.
///
/// Fails if `addr` cannot be bound; the error names the address.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> io::Result<MetricsServer> {
    let handler: Handler = Arc::new(move |request| {
        let response = respond(&metrics, &request).map(BodyExt::boxed);
        Box::pin(async move { response })
    });
    HttpServer::start("metrics endpoint", addr, SHUTDOWN_GRACE, handler)
        .await
        .map(MetricsServer)
}

fn respond(metrics: &Metrics, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    if request.uri().path() != "/metrics" {
        *response.status_mut() = StatusCode::NOT_FOUND;
        *response.body_mut() = Full::new(Bytes::from(format!(
            "weir: no such path {}; metrics are at /metrics\n",
            request.uri().path()
        )));
    } else if request.method() == Method::GET || request.method() == Method::HEAD {
        response.headers_mut().insert(
            CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(CONTENT_TYPE_OPENMETRICS),
        );
        *response.body_mut() = Full::new(Bytes::from(metrics.render()));
    } else {
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        response
            .headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        *response.body_mut() = Full::new(Bytes::from(format!(
            "weir: /metrics answers GET and HEAD, not {}\n",
            request.method()
        )));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn render_has_exact_lines_for_known_increments() {
        let metrics = Metrics::new();
        let sink = metrics.sink("a");
        sink.events_out.inc_by(3);
        sink.dropped.inc();
        sink.buffer_events.set(7);
        sink.buffer_bytes.set(4096);
        let pipeline = metrics.pipeline("orders");
        pipeline.events_in.inc_by(10);
        pipeline.unmatched.inc_by(2);
        let stage = metrics.stage("orders", "drop-bots");
        stage.events_in.inc_by(10);
        stage.dropped.inc_by(4);
        stage.events_out.inc_by(6);

        let text = metrics.render();
        let lines = lines(&text);
        for expected in [
            "weir_sink_events_out_total{sink=\"a\"} 3",
            "weir_sink_dropped_events_total{sink=\"a\"} 1",
            "weir_sink_events_in_total{sink=\"a\"} 0",
            "weir_sink_buffer_events{sink=\"a\"} 7",
            "weir_sink_buffer_bytes{sink=\"a\"} 4096",
            "weir_sink_spill_bytes{sink=\"a\"} 0",
            "weir_pipeline_events_in_total{pipeline=\"orders\"} 10",
            "weir_pipeline_unmatched_events_total{pipeline=\"orders\"} 2",
            "weir_pipeline_batches_acked_total{pipeline=\"orders\"} 0",
            "weir_stage_events_in_total{pipeline=\"orders\",stage=\"drop-bots\"} 10",
            "weir_stage_dropped_events_total{pipeline=\"orders\",stage=\"drop-bots\"} 4",
            "weir_stage_events_out_total{pipeline=\"orders\",stage=\"drop-bots\"} 6",
            "# HELP weir_sink_events_out Events delivered to the destination.",
            "# TYPE weir_sink_events_out counter",
            "# TYPE weir_sink_buffer_bytes gauge",
            "# UNIT weir_sink_buffer_bytes bytes",
            "# TYPE weir_sink_latency_seconds histogram",
            "# UNIT weir_sink_latency_seconds seconds",
        ] {
            assert!(
                lines.contains(&expected),
                "missing {expected:?} in:\n{text}"
            );
        }
        assert_eq!(lines.last(), Some(&"# EOF"));
    }

    #[test]
    fn every_family_is_listed_once_it_has_a_series() {
        let metrics = Metrics::new();
        // prometheus-client leaves out families without series.
        assert_eq!(metrics.render(), "# EOF\n");
        metrics.pipeline("p");
        metrics.stage("p", "s");
        metrics.sink("k");
        metrics.source("quic");
        metrics.kafka_lag("kafka/k", "t", 0);
        let text = metrics.render();
        let families: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            families,
            [
                "weir_pipeline_events_in counter",
                "weir_pipeline_batches_in counter",
                "weir_pipeline_batches_acked counter",
                "weir_pipeline_unmatched_events counter",
                "weir_pipeline_unmatched_dropped_events counter",
                "weir_pipeline_dead_lettered_events counter",
                "weir_pipeline_late_events counter",
                "weir_pipeline_duplicate_events_dropped counter",
                "weir_pipeline_events_out counter",
                "weir_stage_events_in counter",
                "weir_stage_events_out counter",
                "weir_stage_dropped_events counter",
                "weir_stage_failed_events counter",
                "weir_stage_batches_retried counter",
                "weir_stage_latency_seconds histogram",
                "weir_stage_swaps counter",
                "weir_stage_rollbacks counter",
                "weir_stage_swap_pause_seconds histogram",
                "weir_sink_events_in counter",
                "weir_sink_events_out counter",
                "weir_sink_dropped_events counter",
                "weir_sink_send_errors counter",
                "weir_sink_dead_lettered_events counter",
                "weir_sink_buffer_events gauge",
                "weir_sink_buffer_bytes gauge",
                "weir_sink_spill_bytes gauge",
                "weir_sink_latency_seconds histogram",
                "weir_sink_send_latency_seconds histogram",
                "weir_source_connections_accepted counter",
                "weir_source_connections_refused counter",
                "weir_source_connections_over_limit counter",
                "weir_source_batches_received counter",
                "weir_source_stream_errors counter",
                "weir_source_kafka_lag gauge",
            ]
        );
        // Every series starts at zero (a histogram's sum is a float).
        assert!(
            text.lines()
                .filter(|line| !line.starts_with('#'))
                .all(|line| line.ends_with(" 0")
                    || (line.contains("_seconds_sum{") && line.ends_with(" 0.0"))),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics::new();
        metrics.sink("a\\b \"quoted\"\nnext").events_out.inc_by(5);
        metrics.stage("p\"1", "s\\").errors.inc();
        let text = metrics.render();
        let lines = lines(&text);
        for expected in [
            r#"weir_sink_events_out_total{sink="a\\b \"quoted\"\nnext"} 5"#,
            r#"weir_stage_failed_events_total{pipeline="p\"1",stage="s\\"} 1"#,
        ] {
            assert!(
                lines.contains(&expected),
                "missing {expected:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn a_histogram_observation_lands_in_its_bucket() {
        let metrics = Metrics::new();
        let sink = metrics.sink("a");
        // 3 ms: above the 1.6 ms bound, within the 3.2 ms one.
        sink.latency.observe(0.003);
        sink.send_latency.observe(100.0);
        let text = metrics.render();
        let latency: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("weir_sink_latency_seconds_"))
            .collect();
        let mut expected: Vec<String> =
            ["0.00005", "0.0001", "0.0002", "0.0004", "0.0008", "0.0016"]
                .iter()
                .map(|le| format!("weir_sink_latency_seconds_bucket{{le=\"{le}\",sink=\"a\"}} 0"))
                .collect();
        expected.extend(
            [
                "0.0032", "0.0064", "0.0128", "0.0256", "0.0512", "0.1024", "0.2048", "0.4096",
                "0.8192", "1.6384", "3.2768", "6.5536", "13.1072", "26.2144", "+Inf",
            ]
            .iter()
            .map(|le| format!("weir_sink_latency_seconds_bucket{{le=\"{le}\",sink=\"a\"}} 1")),
        );
        expected.insert(
            0,
            "weir_sink_latency_seconds_count{sink=\"a\"} 1".to_owned(),
        );
        expected.insert(
            0,
            "weir_sink_latency_seconds_sum{sink=\"a\"} 0.003".to_owned(),
        );
        assert_eq!(latency, expected);

        // Past the last bound: only +Inf counts it.
        let lines = lines(&text);
        for expected in [
            "weir_sink_send_latency_seconds_bucket{le=\"26.2144\",sink=\"a\"} 0",
            "weir_sink_send_latency_seconds_bucket{le=\"+Inf\",sink=\"a\"} 1",
        ] {
            assert!(
                lines.contains(&expected),
                "missing {expected:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn asking_twice_returns_the_same_series() {
        let metrics = Metrics::new();
        metrics.pipeline("p").events_in.inc_by(2);
        metrics.pipeline("p").events_in.inc_by(3);
        metrics.stage("p", "s").latency.observe(0.5);
        metrics.stage("p", "s").latency.observe(0.25);
        metrics.sink("k").buffer_bytes.inc_by(10);
        metrics.sink("k").buffer_bytes.dec_by(4);
        metrics.pipeline("other").events_in.inc();

        assert_eq!(metrics.pipeline("p").events_in.get(), 5);
        assert_eq!(metrics.pipeline("other").events_in.get(), 1);
        assert_eq!(metrics.sink("k").buffer_bytes.get(), 6);

        let text = metrics.render();
        let mut series: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("weir_pipeline_events_in_total"))
            .collect();
        series.sort_unstable();
        assert_eq!(
            series,
            [
                "weir_pipeline_events_in_total{pipeline=\"other\"} 1",
                "weir_pipeline_events_in_total{pipeline=\"p\"} 5",
            ]
        );
        let lines = lines(&text);
        for expected in [
            "weir_stage_latency_seconds_sum{pipeline=\"p\",stage=\"s\"} 0.75",
            "weir_stage_latency_seconds_count{pipeline=\"p\",stage=\"s\"} 2",
            "weir_sink_buffer_bytes{sink=\"k\"} 6",
        ] {
            assert!(
                lines.contains(&expected),
                "missing {expected:?} in:\n{text}"
            );
        }
        assert_eq!(
            lines
                .iter()
                .filter(|line| line.starts_with("weir_stage_latency_seconds_count"))
                .count(),
            1,
            "{text}"
        );
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("reqwest client")
    }

    #[tokio::test]
    async fn endpoint_answers_metrics_and_404_elsewhere() {
        let metrics = Metrics::new();
        metrics.sink("a").events_out.inc_by(3);
        let server = serve("127.0.0.1:0".parse().expect("addr"), metrics.clone())
            .await
            .expect("serve");
        let base = format!("http://{}", server.local_addr());
        let client = client();

        let response = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        assert_eq!(
            response.headers()[reqwest::header::CONTENT_TYPE],
            CONTENT_TYPE_OPENMETRICS
        );
        let body = response.text().await.expect("body");
        assert_eq!(body, metrics.render());
        assert!(
            body.lines()
                .any(|line| line == "weir_sink_events_out_total{sink=\"a\"} 3")
        );

        // A scrape sees what was counted since the last one.
        metrics.sink("a").events_out.inc();
        let body = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("second GET /metrics")
            .text()
            .await
            .expect("body");
        assert!(
            body.lines()
                .any(|line| line == "weir_sink_events_out_total{sink=\"a\"} 4")
        );

        let response = client
            .head(format!("{base}/metrics"))
            .send()
            .await
            .expect("HEAD /metrics");
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        assert_eq!(
            response.headers()[reqwest::header::CONTENT_TYPE],
            CONTENT_TYPE_OPENMETRICS
        );
        assert_eq!(response.text().await.expect("body"), "");

        let response = client.get(format!("{base}/")).send().await.expect("GET /");
        assert_eq!(response.status(), reqwest::StatusCode::NOT_FOUND);
        assert_eq!(
            response.text().await.expect("body"),
            "weir: no such path /; metrics are at /metrics\n"
        );

        let response = client
            .get(format!("{base}/metrics/extra"))
            .send()
            .await
            .expect("GET /metrics/extra");
        assert_eq!(response.status(), reqwest::StatusCode::NOT_FOUND);

        let response = client
            .post(format!("{base}/metrics"))
            .body("x")
            .send()
            .await
            .expect("POST /metrics");
        assert_eq!(response.status(), reqwest::StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[reqwest::header::ALLOW], "GET, HEAD");
        assert_eq!(
            response.text().await.expect("body"),
            "weir: /metrics answers GET and HEAD, not POST\n"
        );

        let addr = server.local_addr();
        server.stop().await;
        let refused = tokio::net::TcpStream::connect(addr)
            .await
            .expect_err("the endpoint is stopped");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn stop_closes_idle_keep_alive_connections() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let server = serve("127.0.0.1:0".parse().expect("addr"), Metrics::new())
            .await
            .expect("serve");
        let mut stream = tokio::net::TcpStream::connect(server.local_addr())
            .await
            .expect("connect");
        stream
            .write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let expected_head = "HTTP/1.1 404 Not Found\r\n";
        let mut head = vec![0; expected_head.len()];
        stream.read_exact(&mut head).await.expect("read");
        assert_eq!(String::from_utf8_lossy(&head), expected_head);

        // The connection stays open (keep-alive) until stop closes it.
        server.stop().await;
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.expect("read to end");
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.ends_with("\r\n\r\nweir: no such path /nothing; metrics are at /metrics\n"),
            "{rest}"
        );
    }

    #[tokio::test]
    async fn serve_names_the_address_it_cannot_bind() {
        let first = serve("127.0.0.1:0".parse().expect("addr"), Metrics::new())
            .await
            .expect("serve");
        let taken = first.local_addr();
        let err = serve(taken, Metrics::new())
            .await
            .expect_err("the port is taken");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let os_error = std::net::TcpListener::bind(taken).expect_err("the port is taken");
        assert_eq!(
            err.to_string(),
            format!("metrics endpoint: cannot listen on {taken}: {os_error}")
        );
        first.stop().await;
    }
}
