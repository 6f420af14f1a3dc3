//! A producer streaming numbered batches into a router in the background, for the suites that
//! change a running router under load (hot load, reload, crash and restart):
//! `#[path = "common/stream.rs"] mod stream;`.

// Each test binary uses the part it needs.
#![allow(dead_code)]

use bytes::Bytes;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use weir_client::{ConnectOptions, EncodedBatch, Producer};
use weir_format::{BatchBuilder, Event};

/// The bound of every wait.
pub const WAIT: Duration = Duration::from_secs(120);
/// Events per batch.
pub const BATCH: u64 = 20;
/// Batches a stream keeps unacked: enough to keep the pipeline busy, few enough that it stops
/// soon after it is told to.
const IN_FLIGHT: usize = 32;

pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// A producer `id` connected to `pipeline` of the router at `addr`.
pub async fn connect(addr: SocketAddr, fingerprint: &str, id: &str, pipeline: &str) -> Producer {
    let options = ConnectOptions::new(addr, id, [pipeline])
        .pin(fingerprint)
        .expect("a fingerprint");
    within("the producer to connect", Producer::connect(options))
        .await
        .expect("the producer connects")
}

/// Batch `n`: [`BATCH`] events `"bN-eI"` (JSON strings), keyed `k0`..`k3`, event time
/// `start_ms + n * BATCH + i`.
pub fn batch(n: u64, start_ms: i64) -> EncodedBatch {
    let mut b = BatchBuilder::new();
    for i in 0..BATCH {
        let t = start_ms + (n * BATCH + i) as i64;
        b.push(&Event::new(format!("\"b{n}-e{i}\""), t).with_key(format!("k{}", i % 4)));
    }
    EncodedBatch::new(Bytes::from(b.finish())).expect("a batch")
}

/// `bN` of an event `"bN-eI"`.
pub fn batch_of(event: &Event) -> u64 {
    let text = String::from_utf8_lossy(&event.value);
    let digits: String = text
        .trim_start_matches("\"b")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().expect("a batch number")
}

/// Streams batches `make(0)`, `make(1)`, … into pipeline 0, [`IN_FLIGHT`] unacked at a time,
/// until `stop` is set and at least `min` were sent, at most `max`; `sent` counts them.
async fn stream(
    producer: &Producer,
    make: fn(u64) -> EncodedBatch,
    stop: &AtomicBool,
    sent: &AtomicU64,
    min: u64,
    max: u64,
) {
    let mut acks = std::collections::VecDeque::new();
    for n in 0..max {
        if n >= min && stop.load(Ordering::Acquire) {
            break;
        }
        let ack = producer
            .send_batch(0, &make(n))
            .await
            .expect("the producer takes the batch");
        acks.push_back(ack);
        sent.store(n + 1, Ordering::Release);
        if acks.len() > IN_FLIGHT
            && let Some(oldest) = acks.pop_front()
        {
            oldest.await.expect("acked");
        }
    }
}

/// A producer streaming into one pipeline in the background.
pub struct Streaming {
    pub producer: Arc<Producer>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Streaming {
    /// Connects as producer `pipeline` to `pipeline` of the router at `addr` and streams (see
    /// [`stream`]) at least `min` batches, at most 20 000; returns once 10 are sent.
    pub async fn start(addr: SocketAddr, fingerprint: &str, pipeline: &str, min: u64) -> Streaming {
        Streaming::start_with(addr, fingerprint, pipeline, min, |n| batch(n, 0)).await
    }

    /// [`Streaming::start`] with batches `make(0)`, `make(1)`, ….
    pub async fn start_with(
        addr: SocketAddr,
        fingerprint: &str,
        pipeline: &str,
        min: u64,
        make: fn(u64) -> EncodedBatch,
    ) -> Streaming {
        let producer = Arc::new(connect(addr, fingerprint, pipeline, pipeline).await);
        let (stop, sent) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let task = {
            let (producer, stop, sent) = (producer.clone(), stop.clone(), sent.clone());
            tokio::spawn(async move { stream(&producer, make, &stop, &sent, min, 20_000).await })
        };
        within("batches sent", async {
            while sent.load(Ordering::Acquire) < 10 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        Streaming {
            producer,
            stop,
            sent,
            task,
        }
    }

    /// Batches sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }

    /// Stops the stream once `min` batches are sent and waits for their acks; the producer and
    /// the batches sent.
    pub async fn finish(self) -> (Arc<Producer>, u64) {
        self.stop.store(true, Ordering::Release);
        within("the stream", self.task).await.expect("streamed");
        within("every ack", self.producer.flush())
            .await
            .expect("acked");
        (self.producer, self.sent.load(Ordering::Acquire))
    }
}
