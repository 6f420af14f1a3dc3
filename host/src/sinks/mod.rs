//! Sinks: where a pipeline's output goes. This revision has the file sink (JSON lines) and the
//! null sink; issue 4 adds destinations, buffers and `when_full` policies.
//!
//! Decisions:
//!
//! - **Two steps, write then flush.** [`Sink::write`] takes a verified batch and may only
//!   buffer it; [`Sink::flush`] makes everything written so far as durable as the sink can
//!   (the file sink: written to the file, flushed, and synced with `fsync = "on_ack"`, the
//!   default). The pipeline writes every batch of a round, flushes each sink once, and only
//!   then acks: one flush (one fsync) covers many batches under load.
//! - **A failed flush loses nothing and duplicates nothing.** The file sink keeps the bytes it
//!   has not written yet and how far it got, so flushing again continues where the failed
//!   flush stopped. The pipeline retries a failing flush (with backoff) and holds its acks
//!   meanwhile: a sink that cannot write is backpressure, never silent loss.
//! - Sinks run on the pipeline's thread (blocking I/O is fine there), never on the async
//!   workers.

mod file;

pub use file::FileSink;

use crate::config::{SinkConfig, SinkKind};
use weir_format::Batch;

/// A sink failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The sink cannot be opened.
    #[error("sink `{sink}`: cannot open {path}: {source}")]
    Open {
        /// The sink's name.
        sink: String,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Writing or syncing failed.
    #[error("sink `{sink}`: cannot {action} {path}: {source}")]
    Io {
        /// The sink's name.
        sink: String,
        /// What it was doing (`write`, `sync`).
        action: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A destination for a pipeline's output.
pub trait Sink: Send {
    /// The sink's name.
    fn name(&self) -> &str;

    /// Takes a verified batch; may buffer it until [`Sink::flush`]. An `Err` must leave the
    /// sink failing its flushes until the batch is held: the pipeline logs write errors and
    /// acks once a flush succeeds, so a batch a write dropped would be acked unwritten.
    fn write(&mut self, batch: &Batch<'_>) -> Result<(), SinkError>;

    /// Makes everything written so far durable; after `Ok`, every batch written is held.
    /// After `Err`, calling it again continues where it stopped.
    fn flush(&mut self) -> Result<(), SinkError>;

    /// Events taken by [`Sink::write`] so far.
    fn events(&self) -> u64;
}

/// Discards every event, counting them.
#[derive(Debug)]
pub struct NullSink {
    name: String,
    events: u64,
}

impl NullSink {
    /// A null sink with this name.
    pub fn new(name: impl Into<String>) -> Self {
        NullSink {
            name: name.into(),
            events: 0,
        }
    }
}

impl Sink for NullSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn write(&mut self, batch: &Batch<'_>) -> Result<(), SinkError> {
        self.events += batch.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    fn events(&self) -> u64 {
        self.events
    }
}

/// Opens the sink a config describes.
pub fn open(config: &SinkConfig) -> Result<Box<dyn Sink>, SinkError> {
    Ok(match &config.kind {
        SinkKind::File { path, fsync } => Box::new(FileSink::open(&config.name, path, *fsync)?),
        SinkKind::Null => Box::new(NullSink::new(&config.name)),
    })
}
