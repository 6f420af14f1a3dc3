//! `weir bench --checkpoint`: what checkpointing aggregate state costs, measured in one run
//! against in-process routers on loopback, each with one pipeline `sums` (count-sum per key
//! over one-second tumbling windows, a null sink):
//!
//! 1. **Throughput** with checkpoints against without: two routers, identical but for
//!    `checkpoint`; producers stream generated batches (`--keys` keys, event time advancing
//!    a millisecond per batch, so a window spans a thousand batches) at full speed into one of
//!    them for a round of `--seconds`, then into the other, alternating, five rounds each; the
//!    figure is the median of the per-round ratios.
//! 2. **Restart time with `--windows` open windows** (default 1 million: one event for each of
//!    as many keys, in an hour-long window): a router folds them, stops (the checkpoint keeps
//!    them), and starts again on that directory, alternating with starts on the same directory
//!    without its checkpoint, three times each; the difference is the restore.

use super::loopback::{self, stop};
use anyhow::{Context, Result};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use weir::server::Server;
use weir_client::{EncodedBatch, Producer};
use weir_format::{BatchBuilder, Event};

/// Arguments of `weir bench --checkpoint`.
pub struct CheckpointBenchArgs {
    /// Seconds each throughput round lasts.
    pub seconds: u64,
    /// Rounds each way.
    pub rounds: u32,
    /// Events per batch.
    pub batch: usize,
    /// Distinct keys of the throughput stream.
    pub keys: u64,
    /// Open windows at the restart.
    pub windows: u64,
}

/// Batches a stream keeps unacked.
const IN_FLIGHT: usize = 64;
/// Starts each way.
const STARTS: usize = 3;

fn config_text(data_dir: &Path, window: &str, checkpoint: bool) -> String {
    format!(
        r#"
[listener]
listen = "127.0.0.1:0"
data_dir = "{}"

[auth]
anonymous = true

[pipelines.sums]
sinks = ["discard"]
checkpoint = {checkpoint}

[[pipelines.sums.stages]]
plugin = "example:count-sum"
window = "{window}"

[sinks.discard]
type = "null"
"#,
        data_dir.display()
    )
}

async fn start(dir: &Path, window: &str, checkpoint: bool) -> Result<(Server, Duration)> {
    loopback::start(dir, &config_text(dir, window, checkpoint)).await
}

/// Batch `n`: `batch` events with keys `k0`.. cycling through `keys`, all at event time `n`
/// ms, amounts 1 to 7.
fn batch(n: u64, batch: usize, keys: u64) -> Result<EncodedBatch> {
    let mut b = BatchBuilder::new();
    for i in 0..batch as u64 {
        let e = n * batch as u64 + i;
        b.push(
            &Event::new(format!("{{\"amount\":{}}}", e % 7 + 1), n as i64)
                .with_key(format!("k{}", e % keys)),
        );
    }
    Ok(EncodedBatch::new(bytes::Bytes::from(b.finish()))?)
}

/// Streams batches `next`, `next + 1`, … into pipeline 0 until `stop`, [`IN_FLIGHT`] unacked.
async fn stream(
    producer: &Producer,
    (size, keys): (usize, u64),
    next: &AtomicU64,
    stop: &AtomicBool,
) -> Result<()> {
    loopback::stream(producer, IN_FLIGHT, || {
        if stop.load(Ordering::Acquire) {
            return Ok(None);
        }
        batch(next.fetch_add(1, Ordering::AcqRel), size, keys).map(Some)
    })
    .await
}

/// Events acked by `producer` while it streams for `seconds` from batch `next` on.
async fn round(
    producer: &Arc<Producer>,
    args: &CheckpointBenchArgs,
    next: &Arc<AtomicU64>,
) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let before = producer.stats().events_acked;
    let started = Instant::now();
    let task = {
        let (producer, next, stop) = (producer.clone(), next.clone(), stop.clone());
        let shape = (args.batch, args.keys);
        tokio::spawn(async move { stream(&producer, shape, &next, &stop).await })
    };
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Release);
    task.await.context("the stream")??;
    let events = producer.stats().events_acked - before;
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

/// Runs both measurements and prints them.
pub fn run(args: &CheckpointBenchArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        println!(
            "weir bench --checkpoint: routers on loopback, pipeline sums: count-sum per key, null sink"
        );
        throughput(args).await?;
        restart(args).await
    })
}

/// Throughput with and without checkpoints, alternating rounds.
async fn throughput(args: &CheckpointBenchArgs) -> Result<()> {
    let (with_dir, without_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (with, _) = start(with_dir.path(), "tumbling:1s", true).await?;
    let (without, _) = start(without_dir.path(), "tumbling:1s", false).await?;
    let producers = [
        Arc::new(loopback::connect(&with, "bench-with", "sums").await?),
        Arc::new(loopback::connect(&without, "bench-without", "sums").await?),
    ];
    let next = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    println!(
        "throughput: batches of {} events, {} keys, event time 1 ms per batch (1 s windows), {IN_FLIGHT} unacked; {} rounds of {} s each way, alternating:",
        args.batch, args.keys, args.rounds, args.seconds
    );
    let mut ratios = Vec::new();
    for r in 1..=args.rounds {
        let checkpointed = round(&producers[0], args, &next[0]).await?;
        let in_memory = round(&producers[1], args, &next[1]).await?;
        ratios.push(checkpointed / in_memory);
        println!(
            "  round {r}: checkpoints {:.2} M events/s; in memory {:.2} M events/s ({:.1}%)",
            checkpointed / 1e6,
            in_memory / 1e6,
            100.0 * checkpointed / in_memory
        );
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    println!(
        "  with checkpoints / without: median {:.1}% ({:.2}x the time per event)",
        100.0 * median,
        1.0 / median
    );
    for producer in &producers {
        producer.close().await?;
    }
    let size = std::fs::metadata(with_dir.path().join(weir::checkpoint::FILE))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "  checkpoint file after the rounds: {:.1} MB",
        size as f64 / 1e6
    );
    stop(with).await?;
    stop(without).await
}

/// Start time with `--windows` open windows in the checkpoint, and without.
async fn restart(args: &CheckpointBenchArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let window = "tumbling:1h";
    let (server, _) = start(dir.path(), window, true).await?;
    let producer = loopback::connect(&server, "bench-windows", "sums").await?;
    let folding = Instant::now();
    let per_batch = args.batch as u64;
    let mut batches = (0..args.windows.div_ceil(per_batch)).map(|n| {
        let mut b = BatchBuilder::new();
        for i in n * per_batch..((n + 1) * per_batch).min(args.windows) {
            b.push(&Event::new("{\"amount\":1}", 1000).with_key(format!("key-{i}")));
        }
        EncodedBatch::new(bytes::Bytes::from(b.finish()))
    });
    loopback::stream(&producer, IN_FLIGHT, || Ok(batches.next().transpose()?)).await?;
    producer.close().await?;
    let folded = folding.elapsed();
    stop(server).await?;
    let file = dir.path().join(weir::checkpoint::FILE);
    let aside = dir.path().join("checkpoints.aside");
    let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    println!(
        "restart with {} open windows (folded and checkpointed in {:.1} s; checkpoint {:.0} MB), {STARTS} times each way, alternating:",
        args.windows,
        folded.as_secs_f64(),
        size as f64 / 1e6
    );
    let (mut restoring, mut empty) = (Vec::new(), Vec::new());
    for _ in 0..STARTS {
        let (server, took) = start(dir.path(), window, true).await?;
        restoring.push(took);
        stop(server).await?;
        std::fs::rename(&file, &aside)?;
        let (server, took) = start(dir.path(), window, true).await?;
        empty.push(took);
        stop(server).await?;
        std::fs::remove_file(&file)?;
        std::fs::rename(&aside, &file)?;
    }
    let list = |times: &[Duration]| {
        times
            .iter()
            .map(|t| format!("{:.2} s", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("  start, restoring them:          {}", list(&restoring));
    println!("  start, without the checkpoint:  {}", list(&empty));
    Ok(())
}
