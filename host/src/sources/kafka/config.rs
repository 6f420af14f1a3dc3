//! A Kafka source's config: `[sources.NAME]` with `type = "kafka"` (docs/SERVE.md).

use std::time::Duration;

/// Where a group with no committed offset for a partition starts reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest record the broker keeps.
    Earliest,
    /// Records produced after the source joined.
    Latest,
}

impl StartAt {
    /// librdkafka's `auto.offset.reset` value.
    pub fn as_str(self) -> &'static str {
        match self {
            StartAt::Earliest => "earliest",
            StartAt::Latest => "latest",
        }
    }
}

/// `[sources.NAME] type = "kafka"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSourceConfig {
    /// The source's name (logs, metrics, dead letters).
    pub name: String,
    /// The brokers to bootstrap from (`host:port,host:port`).
    pub brokers: String,
    /// The topics it consumes.
    pub topics: Vec<String>,
    /// The consumer group it joins.
    pub group: String,
    /// The pipeline it feeds.
    pub pipeline: String,
    /// Events per batch at most.
    pub batch_events: usize,
    /// How long a partition's first record waits for more before its batch is handed over.
    pub linger: Duration,
    /// Where the group starts on a partition it has no offset for.
    pub start: StartAt,
    /// How long a rebalance waits for the revoked partitions' batches to be accepted before
    /// it lets them go uncommitted (their next owner reads them again).
    pub rebalance_wait: Duration,
    /// Further librdkafka settings (security, fetch sizes), by name.
    pub properties: Vec<(String, String)>,
}

/// Settings the source keeps for itself, and why.
const FIXED: [(&str, &str); 7] = [
    ("bootstrap.servers", "give the brokers in `brokers`"),
    ("metadata.broker.list", "give the brokers in `brokers`"),
    ("group.id", "give the group in `group`"),
    (
        "enable.auto.commit",
        "offsets are committed once the sinks accepted the records",
    ),
    (
        "enable.auto.offset.store",
        "offsets are committed once the sinks accepted the records",
    ),
    ("auto.offset.reset", "say where to start with `start`"),
    (
        "enable.partition.eof",
        "the source reads partitions without end",
    ),
];

/// Refuses the librdkafka settings a source keeps for itself.
pub fn check_properties(properties: &[(String, String)]) -> Result<(), String> {
    for (key, _) in properties {
        if let Some((_, why)) = FIXED.iter().find(|(k, _)| k == key) {
            return Err(format!("properties: `{key}` is not yours to set: {why}"));
        }
    }
    Ok(())
}
