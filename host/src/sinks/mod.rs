//! Sinks: where a pipeline's output goes (docs/SINKS.md is the user's reference).
//!
//! A sink is two halves:
//!
//! - a [`Destination`]: the client of one real system (a file, stdout, an HTTP endpoint,
//!   another weir, PostgreSQL, Kafka). It is handed a slice of [`Outgoing`] deliveries and either
//!   delivers all of them or says why not, as a [`SendError`] that is either worth retrying
//!   (the system is down, overloaded, timed out) or not (the system refused these events).
//!   A destination does not retry or buffer on its own: that is the runner's job, the same
//!   for every destination.
//! - the runner (`runner.rs`): the sink's bounded buffer, its `when_full` policy, the disk
//!   spill, retries with backoff, and dead-lettering of refused events.
//!
//! Decisions:
//!
//! - **Sinks share the batch.** A pipeline's output batch is verified once and shared by
//!   every sink that takes any of its events ([`SharedBatch`], reference counted); a sink
//!   that takes only some of the events gets a [`Selection`] of indices, never a copy.
//! - **Destinations are async** and run on the server's tokio runtime, each sink on its own
//!   task: one slow destination never holds a thread another sink needs. File and stdout
//!   destinations render and write on a thread of their own (`io_thread.rs`).

mod file;
mod http;
mod io_thread;
mod kafka;
mod postgres;
mod quic;
pub(crate) mod runner;
pub mod spill;
mod stdout;

pub use file::{FileConfig, FileDestination, Fsync};
pub use http::{HttpConfig, HttpDestination};
pub use kafka::{
    KafkaConfig, KafkaDestination, TopicFrom, check_properties, client_config, record,
};
pub use postgres::{PostgresConfig, PostgresDestination, check_columns, check_table};
pub use quic::{QuicConfig, QuicDestination};
pub use runner::{BufferConfig, RetryConfig, WhenFull};
pub use stdout::StdoutDestination;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use weir_format::json::event_ref_to_line;
use weir_format::{Batch, EventRef};

/// A named sink: a destination and how its buffer behaves (docs/SINKS.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    /// Its name, as pipelines list it.
    pub name: String,
    /// What it delivers to.
    pub kind: SinkKind,
    /// Its buffer and `when_full` policy.
    pub buffer: BufferConfig,
    /// How failed deliveries are retried.
    pub retry: RetryConfig,
}

/// The kinds of sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkKind {
    /// JSON lines appended to a file.
    File(FileConfig),
    /// JSON lines on the router's standard output.
    Stdout,
    /// Batches POSTed as JSON to a URL.
    Http(HttpConfig),
    /// Batches forwarded to a pipeline of another weir over QUIC.
    Quic(QuicConfig),
    /// Rows inserted into a PostgreSQL table.
    Postgres(PostgresConfig),
    /// Records produced to a Kafka topic.
    Kafka(KafkaConfig),
    /// Discards every event (counts them).
    Null,
}

/// A boxed future a destination returns.
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SendError>> + Send + 'a>>;

/// A verified output batch shared by every sink that takes events of it, with its JSON
/// lines, rendered once by the first sink that asks for them (file, stdout and http sinks
/// all write the same lines: four such sinks render each event once, not four times).
#[derive(Clone)]
pub struct SharedBatch(Arc<Inner>);

struct Inner {
    bytes: Vec<u8>,
    json: OnceLock<JsonLines>,
}

/// Every event's JSON line (`weir_format::json`), newline-terminated, back to back.
struct JsonLines {
    text: Vec<u8>,
    /// Where each event's line ends (after its newline).
    ends: Vec<usize>,
}

impl SharedBatch {
    /// Verifies `bytes` as a batch.
    pub fn verify(bytes: Vec<u8>) -> Result<SharedBatch, weir_format::FormatError> {
        Batch::verify(&bytes)?;
        // SAFETY: just verified.
        Ok(unsafe { SharedBatch::trusted(bytes) })
    }

    /// Wraps bytes that are known to hold a valid batch.
    ///
    /// # Safety
    ///
    /// `bytes` must have passed [`Batch::verify`] (or be built by `BatchBuilder`).
    pub unsafe fn trusted(bytes: Vec<u8>) -> SharedBatch {
        SharedBatch(Arc::new(Inner {
            bytes,
            json: OnceLock::new(),
        }))
    }

    /// The batch.
    pub fn batch(&self) -> Batch<'_> {
        // SAFETY: every constructor verified the bytes or was promised they verify.
        unsafe { Batch::trusted(&self.0.bytes) }
    }

    /// The encoded batch.
    pub fn bytes(&self) -> &[u8] {
        &self.0.bytes
    }

    fn json(&self) -> &JsonLines {
        self.0.json.get_or_init(|| {
            let batch = self.batch();
            let mut lines = JsonLines {
                text: Vec::with_capacity(self.0.bytes.len() * 2),
                ends: Vec::with_capacity(batch.len()),
            };
            for event in batch.iter() {
                lines
                    .text
                    .extend_from_slice(event_ref_to_line(&event).as_bytes());
                lines.text.push(b'\n');
                lines.ends.push(lines.text.len());
            }
            lines
        })
    }

    /// Event `index`'s JSON line, with its newline.
    fn json_line(&self, index: usize) -> Option<&[u8]> {
        let json = self.json();
        let end = *json.ends.get(index)?;
        let start = index.checked_sub(1).map_or(0, |i| json.ends[i]);
        json.text.get(start..end)
    }
}

impl std::fmt::Debug for SharedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBatch({} bytes)", self.0.bytes.len())
    }
}

/// Which events of a batch a sink takes.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every event.
    All,
    /// These indices, ascending.
    Some(Arc<[u32]>),
}

/// One delivery: the events of a shared batch that one sink takes, and the pipeline they came
/// from (for dead letters).
#[derive(Debug, Clone)]
pub struct Outgoing {
    batch: SharedBatch,
    selection: Selection,
    pipeline: Arc<str>,
    events: usize,
}

impl Outgoing {
    /// The events `selection` picks out of `batch`. Indices past the end are ignored.
    pub fn new(batch: SharedBatch, selection: Selection, pipeline: Arc<str>) -> Outgoing {
        let len = batch.batch().len();
        let (selection, events) = match selection {
            Selection::All => (Selection::All, len),
            Selection::Some(indices) => {
                let n = indices.iter().filter(|&&i| (i as usize) < len).count();
                (Selection::Some(indices), n)
            }
        };
        Outgoing {
            batch,
            selection,
            pipeline,
            events,
        }
    }

    /// Every event of `batch`.
    pub fn all(batch: SharedBatch, pipeline: Arc<str>) -> Outgoing {
        Outgoing::new(batch, Selection::All, pipeline)
    }

    /// The number of events.
    pub fn len(&self) -> usize {
        self.events
    }

    /// Whether there are no events.
    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// The pipeline the events came from.
    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    /// The pipeline's name, shared.
    pub fn pipeline_name(&self) -> &Arc<str> {
        &self.pipeline
    }

    /// The shared batch.
    pub fn shared(&self) -> &SharedBatch {
        &self.batch
    }

    /// The selection.
    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    /// The events, in batch order.
    pub fn events(&self) -> impl Iterator<Item = EventRef<'_>> + '_ {
        let batch = self.batch.batch();
        let indices: Box<dyn Iterator<Item = usize> + Send + '_> = match &self.selection {
            Selection::All => Box::new(0..batch.len()),
            Selection::Some(indices) => Box::new(indices.iter().map(|&i| i as usize)),
        };
        indices.filter_map(move |i| batch.get(i))
    }

    /// The events' JSON lines (`weir_format::json`), each ending in a newline, in batch order:
    /// with [`Selection::All`] one slice, else one per event. Rendered once per shared batch,
    /// whichever sink asks first.
    pub fn json_lines(&self) -> impl Iterator<Item = &[u8]> + Send + '_ {
        let whole: Option<&[u8]> = match self.selection {
            Selection::All => Some(&self.batch.json().text),
            Selection::Some(_) => None,
        };
        let picked: Box<dyn Iterator<Item = &[u8]> + Send + '_> = match &self.selection {
            Selection::All => Box::new(std::iter::empty()),
            Selection::Some(indices) => Box::new(
                indices
                    .iter()
                    .filter_map(|&i| self.batch.json_line(i as usize)),
            ),
        };
        whole.into_iter().chain(picked)
    }

    /// An approximate size in bytes of the events (what buffers count): the batch's bytes
    /// shared out by event.
    pub fn approx_bytes(&self) -> usize {
        let total = self.batch.batch().len().max(1);
        self.batch.bytes().len() * self.events / total
    }

    /// Splits into two deliveries of (about) half the events each; `None` for fewer than two.
    pub fn split(&self) -> Option<(Outgoing, Outgoing)> {
        if self.events < 2 {
            return None;
        }
        let len = self.batch.batch().len() as u32;
        let indices: Vec<u32> = match &self.selection {
            Selection::All => (0..len).collect(),
            Selection::Some(indices) => indices.iter().copied().filter(|&i| i < len).collect(),
        };
        let (a, b) = indices.split_at(indices.len() / 2);
        let part = |i: &[u32]| {
            Outgoing::new(
                self.batch.clone(),
                Selection::Some(i.into()),
                self.pipeline.clone(),
            )
        };
        Some((part(a), part(b)))
    }
}

/// Why a destination did not deliver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth retrying: the system is unreachable, overloaded, timed out, or answered with a
    /// server error. The runner retries with backoff; nothing is lost.
    #[error("{0}")]
    Retry(String),
    /// Not worth retrying: the system refused these events (an HTTP 4xx, a constraint
    /// violation). The runner isolates the refused events and dead-letters them with this
    /// message.
    #[error("{0}")]
    Reject(String),
}

/// The client of one real system.
pub trait Destination: Send + 'static {
    /// What it delivers to, for messages (`file target/out.jsonl`, `http://host/ingest`).
    fn describe(&self) -> String;

    /// Delivers `batch` (every delivery, in order), as durably as the destination promises
    /// (a file: written and, with `fsync = "on_ack"`, synced). After `Err`, the runner calls
    /// it again with the same deliveries (or, after a `Reject`, a part of them): a destination
    /// that delivered some of them before failing may deliver those again (at least once).
    fn send<'a>(&'a mut self, batch: &'a [Outgoing]) -> SendFuture<'a>;

    /// Called once when the router stops, after the last `send`.
    fn close(&mut self) -> SendFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}

/// A sink cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("sink `{sink}`: cannot open {what}: {message}")]
pub struct OpenError {
    /// The sink's name.
    pub sink: String,
    /// What could not be opened (`file target/out.jsonl`).
    pub what: String,
    /// Why.
    pub message: String,
}

/// Opens the destination a sink's config describes. Nothing connects here: destinations
/// connect on their first send (and reconnect after failures), so a router starts while a
/// destination is down and its buffer policy applies.
pub fn open(config: &SinkConfig) -> Result<Box<dyn Destination>, OpenError> {
    Ok(match &config.kind {
        SinkKind::File(c) => Box::new(FileDestination::open(&config.name, c)?),
        SinkKind::Stdout => Box::new(StdoutDestination::open(&config.name)?),
        SinkKind::Http(c) => Box::new(HttpDestination::open(&config.name, c)?),
        SinkKind::Quic(c) => Box::new(QuicDestination::open(&config.name, c)?),
        SinkKind::Postgres(c) => Box::new(PostgresDestination::open(&config.name, c)?),
        SinkKind::Kafka(c) => Box::new(KafkaDestination::open(&config.name, c)?),
        SinkKind::Null => Box::new(NullDestination),
    })
}

/// Discards every event.
#[derive(Debug, Default)]
pub struct NullDestination;

impl Destination for NullDestination {
    fn describe(&self) -> String {
        "null (discards events)".into()
    }

    fn send<'a>(&'a mut self, _batch: &'a [Outgoing]) -> SendFuture<'a> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_format::{BatchBuilder, Event};

    fn batch(n: usize) -> SharedBatch {
        let mut b = BatchBuilder::new();
        for i in 0..n {
            b.push(&Event::new(format!("{i}").into_bytes(), i as i64));
        }
        SharedBatch::verify(b.finish()).expect("built batches verify")
    }

    #[test]
    fn a_selection_yields_its_events_in_order_and_splits_in_halves() {
        let out = Outgoing::new(
            batch(10),
            Selection::Some(vec![1, 4, 7, 99].into()),
            "p".into(),
        );
        assert_eq!(out.len(), 3);
        let values: Vec<&[u8]> = out.events().map(|e| e.value()).collect();
        assert_eq!(values, vec![b"1" as &[u8], b"4", b"7"]);
        let (a, b) = out.split().expect("three events split");
        assert_eq!((a.len(), b.len()), (1, 2));
        let all = Outgoing::all(batch(5), "p".into());
        assert_eq!(all.len(), 5);
        let (a, b) = all.split().expect("five events split");
        let a: Vec<&[u8]> = a.events().map(|e| e.value()).collect();
        let b: Vec<&[u8]> = b.events().map(|e| e.value()).collect();
        assert_eq!(a, vec![b"0" as &[u8], b"1"]);
        assert_eq!(b, vec![b"2" as &[u8], b"3", b"4"]);
        assert!(Outgoing::all(batch(1), "p".into()).split().is_none());
    }

    #[test]
    fn json_lines_are_rendered_once_and_follow_the_selection() {
        let shared = batch(3);
        let all = Outgoing::all(shared.clone(), "p".into());
        let some = Outgoing::new(shared, Selection::Some(vec![2, 0].into()), "p".into());
        let text = |out: &Outgoing| -> String {
            out.json_lines()
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .collect()
        };
        assert_eq!(
            text(&all),
            "{\"value\":0,\"timestamp_ms\":0}\n{\"value\":1,\"timestamp_ms\":1}\n{\"value\":2,\"timestamp_ms\":2}\n"
        );
        assert_eq!(
            text(&some),
            "{\"value\":2,\"timestamp_ms\":2}\n{\"value\":0,\"timestamp_ms\":0}\n"
        );
        assert!(std::ptr::eq(
            all.shared().json().text.as_ptr(),
            some.shared().json().text.as_ptr()
        ));
    }
}
