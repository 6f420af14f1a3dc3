//! Live views of the events leaving a pipeline or one of its stages (`weir tap`).
//!
//! Decisions:
//!
//! - **Never slows the pipeline.** A worker offers a batch to a tap with a non-blocking send
//!   into a bounded queue ([`QUEUE`] batches per reader); when the reader has not taken what
//!   was queued, the batch is not queued and its events are counted as dropped, and the reader
//!   is told how many where they went missing: before the next batch it gets. Nothing else
//!   waits on a reader.
//! - **Free when nobody looks.** With no reader, an offer is one atomic load. The pipeline's
//!   output is offered as the batch the sinks share (no copy); a stage's output is copied only
//!   when a reader taps that stage and has room.
//! - **The reader's side does the work**: rendering JSON lines and sampling happen in the
//!   reader's task, never on the pipeline thread.
//! - **By name, across restarts.** Taps are kept per pipeline name by the router, so a reload
//!   that restarts a pipeline keeps its readers (one that removes it ends them); a stage is
//!   matched by its name.

use super::stage::kept_batch;
use crate::sinks::SharedBatch;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use weir_format::{BatchBuilder, KeepBitmap};

/// Batches queued for one reader at most.
pub const QUEUE: usize = 64;

/// The router's taps, by pipeline name.
#[derive(Debug, Default)]
pub struct Taps {
    pipelines: Mutex<HashMap<String, Arc<PipelineTap>>>,
}

impl Taps {
    /// The taps of pipeline `name` (what its worker offers to).
    pub fn pipeline(&self, name: &str) -> Arc<PipelineTap> {
        self.pipelines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// A reader of what leaves `stage` of `pipeline` (`None`: what the pipeline fans out to
    /// its sinks), every `sample`th event (1: all).
    pub fn subscribe(&self, pipeline: &str, stage: Option<&str>, sample: u64) -> TapReader {
        self.pipeline(pipeline).subscribe(stage, sample)
    }

    /// Ends the readers of every pipeline not in `kept` (a reload removed it).
    pub fn retain(&self, kept: &[&str]) {
        let mut pipelines = self
            .pipelines
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        pipelines.retain(|name, tap| {
            let keep = kept.contains(&name.as_str());
            if !keep {
                tap.close();
            }
            keep
        });
    }

    /// Ends every reader (the router is stopping).
    pub fn close(&self) {
        for tap in self
            .pipelines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            tap.close();
        }
    }
}

/// The readers of one pipeline.
#[derive(Debug, Default)]
pub struct PipelineTap {
    readers: AtomicUsize,
    subscribers: Mutex<Vec<Subscriber>>,
}

#[derive(Debug)]
struct Subscriber {
    stage: Option<String>,
    /// Each batch with the events dropped for this reader before it.
    tx: mpsc::Sender<(u64, SharedBatch)>,
    dropped: u64,
}

impl PipelineTap {
    fn subscribe(&self, stage: Option<&str>, sample: u64) -> TapReader {
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut subscribers = self
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        subscribers.push(Subscriber {
            stage: stage.map(str::to_owned),
            tx,
            dropped: 0,
        });
        self.readers.store(subscribers.len(), Ordering::Release);
        TapReader {
            rx,
            reported: 0,
            sample: sample.max(1),
            seen: 0,
        }
    }

    fn close(&self) {
        let mut subscribers = self
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        subscribers.clear();
        self.readers.store(0, Ordering::Release);
    }

    /// Whether anyone reads this pipeline's taps.
    pub fn is_read(&self) -> bool {
        self.readers.load(Ordering::Acquire) > 0
    }

    /// Offers the pipeline's output, as its sinks get it.
    pub fn offer_output(&self, batch: &SharedBatch, kept: Option<&KeepBitmap>) {
        if !self.is_read() {
            return;
        }
        match kept {
            None => self.offer(None, batch.batch().len(), || batch.clone()),
            Some(kept) => self.offer(None, kept.count(), || {
                let picked = kept_batch(&mut BatchBuilder::new(), &batch.batch(), Some(kept));
                // SAFETY: built from a verified batch.
                unsafe { SharedBatch::trusted(picked) }
            }),
        }
    }

    /// Offers what stage `stage` output.
    pub fn offer_stage(&self, stage: &str, bytes: &[u8]) {
        if !self.is_read() {
            return;
        }
        // SAFETY: a stage's output is a batch the host built or verified.
        let events = unsafe { weir_format::Batch::trusted(bytes) }.len();
        // SAFETY: as above.
        self.offer(Some(stage), events, || unsafe {
            SharedBatch::trusted(bytes.to_vec())
        });
    }

    fn offer(&self, stage: Option<&str>, events: usize, batch: impl FnOnce() -> SharedBatch) {
        if events == 0 {
            return;
        }
        let mut subscribers = self
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut batch = Some(batch);
        let mut made: Option<SharedBatch> = None;
        subscribers.retain_mut(|s| {
            if s.stage.as_deref() != stage {
                return !s.tx.is_closed();
            }
            match s.tx.try_reserve() {
                Ok(permit) => {
                    let shared = match (&made, batch.take()) {
                        (Some(shared), _) => shared.clone(),
                        (None, Some(make)) => made.insert(make()).clone(),
                        // `batch` is taken only when `made` is set.
                        (None, None) => return true,
                    };
                    permit.send((s.dropped, shared));
                    true
                }
                Err(mpsc::error::TrySendError::Full(())) => {
                    s.dropped += events as u64;
                    true
                }
                Err(mpsc::error::TrySendError::Closed(())) => false,
            }
        });
        self.readers.store(subscribers.len(), Ordering::Release);
    }
}

/// One reader of a tap: JSON lines of the events it taps, and a notice of what it missed.
#[derive(Debug)]
pub struct TapReader {
    rx: mpsc::Receiver<(u64, SharedBatch)>,
    /// The events dropped before the last batch taken.
    reported: u64,
    sample: u64,
    seen: u64,
}

/// The line a reader gets before its next events when it missed `n`.
pub fn dropped_line(n: u64) -> String {
    format!("{{\"tap\":{{\"dropped\":{n}}}}}")
}

impl TapReader {
    /// The next batch's lines: a [`dropped_line`] first if events were dropped between the
    /// last batch and this one, then one JSON line (`weir_format::json`) per sampled event,
    /// each newline-ended. `None` once the tap is closed.
    pub fn poll_lines(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        loop {
            let Some((dropped, batch)) = std::task::ready!(self.rx.poll_recv(cx)) else {
                return Poll::Ready(None);
            };
            let mut out = Vec::new();
            if dropped > self.reported {
                out.extend_from_slice(dropped_line(dropped - self.reported).as_bytes());
                out.push(b'\n');
                self.reported = dropped;
            }
            for event in batch.batch().iter() {
                if self.seen.is_multiple_of(self.sample) {
                    out.extend_from_slice(weir_format::json::event_ref_to_line(&event).as_bytes());
                    out.push(b'\n');
                }
                self.seen += 1;
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Bytes::from(out)));
            }
        }
    }

    /// [`TapReader::poll_lines`] as a future.
    pub async fn lines(&mut self) -> Option<Bytes> {
        std::future::poll_fn(|cx| self.poll_lines(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_format::Event;

    fn batch(values: &[&str]) -> SharedBatch {
        let mut b = BatchBuilder::new();
        for (i, v) in values.iter().enumerate() {
            b.push(&Event::new(*v, i as i64));
        }
        SharedBatch::verify(b.finish()).expect("a batch")
    }

    fn text(bytes: Option<Bytes>) -> String {
        String::from_utf8(bytes.expect("lines").to_vec()).expect("utf-8")
    }

    #[tokio::test]
    async fn an_unread_tap_takes_nothing_and_a_reader_gets_json_lines_of_its_stage() {
        let taps = Taps::default();
        let tap = taps.pipeline("p");
        assert!(!tap.is_read());
        let mut reader = taps.subscribe("p", Some("enrich"), 1);
        assert!(tap.is_read());
        tap.offer_stage("filter", batch(&["\"no\""]).bytes());
        tap.offer_stage("enrich", batch(&["1", "2"]).bytes());
        tap.offer_output(&batch(&["\"out\""]), None);
        assert_eq!(
            text(reader.lines().await),
            "{\"value\":1,\"timestamp_ms\":0}\n{\"value\":2,\"timestamp_ms\":1}\n"
        );
        taps.close();
        assert_eq!(reader.lines().await, None);
        assert!(!tap.is_read());
    }

    #[tokio::test]
    async fn the_readers_of_a_removed_pipeline_end_and_the_others_go_on() {
        let taps = Taps::default();
        let mut gone = taps.subscribe("gone", None, 1);
        let mut kept = taps.subscribe("kept", None, 1);
        taps.retain(&["kept"]);
        assert_eq!(gone.lines().await, None);
        // What a filter kept: a selection of the batch, rendered alone.
        let mut second = KeepBitmap::none(2);
        second.set(1, true);
        taps.pipeline("kept")
            .offer_output(&batch(&["0", "1"]), Some(&second));
        assert_eq!(
            text(kept.lines().await),
            "{\"value\":1,\"timestamp_ms\":1}\n"
        );
    }

    #[tokio::test]
    async fn a_slow_reader_loses_batches_counted_and_is_told_before_its_next_events() {
        let taps = Taps::default();
        let tap = taps.pipeline("p");
        let mut reader = taps.subscribe("p", None, 1);
        for _ in 0..QUEUE + 3 {
            tap.offer_output(&batch(&["1", "2"]), None);
        }
        for _ in 0..QUEUE {
            assert_eq!(text(reader.lines().await).lines().count(), 2);
        }
        tap.offer_output(&batch(&["3"]), None);
        assert_eq!(
            text(reader.lines().await),
            format!("{}\n{{\"value\":3,\"timestamp_ms\":0}}\n", dropped_line(6))
        );
    }

    #[tokio::test]
    async fn sampling_keeps_every_nth_event_across_batches_and_a_gone_reader_is_forgotten() {
        let taps = Taps::default();
        let tap = taps.pipeline("p");
        let mut reader = taps.subscribe("p", None, 3);
        tap.offer_output(&batch(&["0", "1"]), None);
        tap.offer_output(&batch(&["2", "3", "4", "5", "6"]), None);
        assert_eq!(
            text(reader.lines().await),
            "{\"value\":0,\"timestamp_ms\":0}\n"
        );
        assert_eq!(
            text(reader.lines().await),
            "{\"value\":3,\"timestamp_ms\":1}\n{\"value\":6,\"timestamp_ms\":4}\n"
        );
        drop(reader);
        tap.offer_output(&batch(&["7"]), None);
        assert!(!tap.is_read());
    }
}
