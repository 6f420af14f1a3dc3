//! `weir bench --workers`: one pipeline on 1 worker against the same pipeline on 2, measured in
//! one run, in-process. The pipeline is the plugin-heavy chain geo-enrich + count-sum (per key,
//! one-minute tumbling windows), in routers on loopback; its batches are handed straight to the
//! pipeline's input ([`Server::input`]) with a completion each, as a source does, so the figure
//! is the pipeline's and not the network's.
//!
//! 1. **Results**: the same workload goes through a 1-worker and a 2-worker pipeline, each
//!    with a file sink; both stop (their open windows finished) and the window results must be
//!    the same lines, or the bench fails.
//! 2. **Throughput**: rounds alternate between the two (a null sink each), `--rounds` each; a
//!    round hands over the whole workload (event time moved on past the last round's, so that
//!    no event is late) and ends when every batch completed. The figure is the median of the
//!    per-round ratios.

use super::loopback;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use weir::pipeline::{Completion, Input, PipelineInput};
use weir::server::Server;
use weir::sinks::SharedBatch;
use weir::workload::WorkloadSpec;

/// Arguments of `weir bench --workers`.
pub struct WorkersBenchArgs {
    /// Events per round.
    pub events: u64,
    /// Events per batch.
    pub batch: usize,
    /// Distinct keys.
    pub keys: u64,
    /// Value size in bytes.
    pub size: usize,
    /// Rounds each way.
    pub rounds: u32,
}

fn config_text(data_dir: &Path, workers: usize, sink: &str) -> String {
    format!(
        r#"
[listener]
listen = "127.0.0.1:0"
data_dir = "{}"

[auth]
anonymous = true

[pipelines.p]
sinks = ["out"]
checkpoint = false
workers = {workers}

[[pipelines.p.stages]]
plugin = "example:geo-enrich"
with = {{ table = {{ US = "United States", FR = "France", DE = "Germany", JP = "Japan" }} }}

[[pipelines.p.stages]]
plugin = "example:count-sum"
window = "tumbling:60s"

[sinks.out]
{sink}
"#,
        data_dir.display()
    )
}

/// A router on loopback from `text`, and the input of its pipeline `p`.
async fn start(dir: &Path, text: &str) -> Result<(Server, PipelineInput)> {
    let (server, _) = loopback::start(dir, text).await?;
    let input = server
        .input("p")
        .await
        .context("the bench config names pipeline `p`")?;
    Ok((server, input))
}

/// The workload of round `round`: its event time starts after the previous round's ends.
fn workload(args: &WorkersBenchArgs, round: u64) -> Result<Vec<SharedBatch>> {
    let spec = WorkloadSpec {
        events: args.events,
        value_size: args.size,
        keys: args.keys,
        start_ms: WorkloadSpec::default().start_ms
            + round as i64 * (10 * args.events as i64 + 3_600_000),
    };
    spec.batches(args.batch)
        .into_iter()
        .map(|b| SharedBatch::verify(b).context("a generated batch"))
        .collect()
}

/// Hands every batch to `input` as a source would and waits until all completed; the time.
async fn feed(input: &PipelineInput, batches: &[SharedBatch]) -> Result<Duration> {
    let started = Instant::now();
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let all = Arc::new(tokio::sync::Notify::new());
    let total = batches.len() as u64;
    for batch in batches {
        let (done, failed, all) = (done.clone(), failed.clone(), all.clone());
        let completion = Completion::new(move |result| {
            if result.is_err() {
                failed.fetch_add(1, Ordering::AcqRel);
            }
            if done.fetch_add(1, Ordering::AcqRel) + 1 == total {
                all.notify_one();
            }
        });
        let handed = input
            .send(Input {
                batch: batch.clone(),
                completion,
                position: None,
                rejected: Vec::new(),
                batch_ms: None,
                event_next: None,
            })
            .await;
        if handed.is_err() {
            bail!("the pipeline stopped taking batches");
        }
    }
    if done.load(Ordering::Acquire) < total {
        all.notified().await;
    }
    if failed.load(Ordering::Acquire) > 0 {
        bail!("{} batches failed", failed.load(Ordering::Acquire));
    }
    Ok(started.elapsed())
}

/// The window results of the workload on `workers` workers, sorted.
async fn results(dir: &Path, args: &WorkersBenchArgs, workers: usize) -> Result<Vec<String>> {
    let dir = dir.join(format!("results-{workers}"));
    let out = dir.join("out.jsonl");
    let sink = format!("type = \"file\"\npath = \"{}\"", out.display());
    let (server, input) = start(&dir, &config_text(&dir.join("data"), workers, &sink)).await?;
    feed(&input, &workload(args, 0)?).await?;
    drop(input);
    loopback::stop(server).await?;
    let text =
        std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.sort();
    Ok(lines)
}

/// Runs the bench and prints its report.
pub fn run(args: &WorkersBenchArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: &WorkersBenchArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    println!(
        "pipeline geo-enrich + count-sum (tumbling 60s), {} events of {} B per round in batches of {}, {} keys; batches handed to the pipeline in-process",
        args.events, args.size, args.batch, args.keys
    );
    let one = results(dir.path(), args, 1).await?;
    let two = results(dir.path(), args, 2).await?;
    if one.is_empty() || one != two {
        bail!(
            "window results differ: {} from 1 worker, {} from 2 ({} in common)",
            one.len(),
            two.len(),
            one.iter().filter(|l| two.binary_search(l).is_ok()).count()
        );
    }
    println!(
        "results: {} window results, identical on 1 and 2 workers",
        one.len()
    );

    let mut pipelines = Vec::new();
    for workers in [1, 2] {
        let dir = dir.path().join(format!("throughput-{workers}"));
        let text = config_text(&dir.join("data"), workers, "type = \"null\"");
        pipelines.push(start(&dir, &text).await?);
    }
    let mut ratios = Vec::new();
    let mut round = 1;
    for r in 0..args.rounds.max(1) {
        let mut rates = [0.0; 2];
        for (i, (_, input)) in pipelines.iter().enumerate() {
            let batches = workload(args, round)?;
            round += 1;
            let elapsed = feed(input, &batches).await?;
            rates[i] = args.events as f64 / elapsed.as_secs_f64();
        }
        let ratio = rates[1] / rates[0];
        println!(
            "round {}: 1 worker {:.0} events/s, 2 workers {:.0} events/s: {ratio:.2}x",
            r + 1,
            rates[0],
            rates[1]
        );
        ratios.push(ratio);
    }
    for (server, input) in pipelines {
        drop(input);
        loopback::stop(server).await?;
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    println!(
        "2 workers / 1 worker, median of {} rounds: {median:.2}x",
        ratios.len()
    );
    Ok(())
}
