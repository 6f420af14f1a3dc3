//! `GET /v1/status`: a running router at a glance, as `weir top` shows it: every pipeline,
//! stage and sink with their counters since the router started, the plugin version each stage
//! runs, and the last reload. Counters, not rates: a reader takes two answers and divides.

use crate::server::{PipelineStats, SinkStats};
use serde::{Deserialize, Serialize};

/// The answer to `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    /// When the answer was made, ms since the Unix epoch.
    pub now_ms: i64,
    /// When the router started, ms since the Unix epoch.
    pub started_ms: i64,
    /// The config file it runs.
    pub config: String,
    /// Every pipeline, in config order.
    pub pipelines: Vec<PipelineStatus>,
    /// Every sink, by name (dead-letter files included, named `PIPELINE/dead-letters`).
    pub sinks: Vec<SinkStatus>,
    /// The sources besides the QUIC listener (`[sources]`), in config order.
    #[serde(default)]
    pub sources: Vec<SourceStatus>,
    /// The last reload (file change, SIGHUP or `weir reload`), if any.
    pub last_reload: Option<ReloadRecord>,
}

/// One pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineStatus {
    /// Its name.
    pub name: String,
    /// Its counters.
    #[serde(flatten)]
    pub counts: PipelineStats,
    /// Its stages, in order.
    pub stages: Vec<StageStatus>,
    /// The sinks it writes to.
    pub sinks: Vec<String>,
}

/// One stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageStatus {
    /// Its name.
    pub name: String,
    /// Its world (`filter`, `enrich`, `aggregate`).
    pub kind: String,
    /// Events handed to it.
    pub events_in: u64,
    /// Events it passed on.
    pub events_out: u64,
    /// Events it filtered out.
    pub dropped: u64,
    /// Events it failed on (dead letters).
    pub dead_lettered: u64,
    /// The plugin it runs.
    pub plugin: String,
    /// The version it runs (8 hex digits).
    pub version: String,
    /// When that version was deployed, ms since the Unix epoch.
    pub deployed_ms: i64,
}

/// One sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkStatus {
    /// Its name.
    pub name: String,
    /// What it delivers to.
    pub destination: String,
    /// Its counters.
    #[serde(flatten)]
    pub counts: SinkStats,
    /// The most events its memory buffer holds (0: a `spill` sink, whose buffer is on disk).
    pub capacity: u64,
    /// What it does when the buffer is full (`block`, `drop_newest`, `spill`, ...).
    pub when_full: String,
}

/// A source of `[sources]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// Its name.
    pub name: String,
    /// What it reads (`kafka BROKERS topics T as group G`).
    pub describe: String,
    /// The pipeline it feeds.
    pub pipeline: String,
    /// Batches it handed to the pipeline.
    pub batches: u64,
    /// The partitions it owns now, with their lag.
    pub partitions: Vec<PartitionStatus>,
}

/// A partition a source owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionStatus {
    /// Its topic.
    pub topic: String,
    /// Its number.
    pub partition: i32,
    /// Records not read yet (0 until librdkafka first reports it).
    pub lag: i64,
}

/// A reload and what came of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadRecord {
    /// When it ended, ms since the Unix epoch.
    pub at_ms: i64,
    /// Whether the new config serves.
    pub applied: bool,
    /// What it changed, or why it changed nothing.
    pub summary: String,
}
