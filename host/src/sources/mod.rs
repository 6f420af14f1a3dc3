//! Where batches come from. Each source turns its own input into verified batches, hands them
//! to a pipeline, and learns from the pipeline when the sinks accepted them: [`quic`] is the
//! `weir/1` server (producers, sequences, acks), [`kafka`] a member of a Kafka consumer group
//! (partitions, offsets committed once the sinks accepted the records).

pub mod kafka;
pub mod quic;

use kafka::config::KafkaSourceConfig;

/// A named source of the config file (`[sources.NAME]`); the QUIC listener is configured by
/// `[listener]` instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    /// `type = "kafka"`.
    Kafka(KafkaSourceConfig),
}

impl SourceConfig {
    /// The source's name.
    pub fn name(&self) -> &str {
        match self {
            SourceConfig::Kafka(c) => &c.name,
        }
    }

    /// The pipeline it feeds.
    pub fn pipeline(&self) -> &str {
        match self {
            SourceConfig::Kafka(c) => &c.pipeline,
        }
    }
}
