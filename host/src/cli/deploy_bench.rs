//! `weir bench --deploy`: what a hot load costs, measured in one run against in-process routers
//! on loopback shaped like `weir demo`'s (`clicks`: drop-bots → geo-enrich, `totals`:
//! drop-bots → count-sum, null sinks, an admin endpoint):
//!
//! 1. **Start time**: a router started on an empty data directory (every plugin compiled) and
//!    again on that directory (every plugin from the compile cache), alternating, three times.
//! 2. **Deploy to serving** (the request until the swap is done, no probation): each example
//!    plugin deployed to its stage as a new version (its component with a custom section
//!    appended: a new digest that behaves the same, so it is compiled), then the version it
//!    replaced deployed back (from the compile cache).
//! 3. **Under load** (prepared batches streaming into `clicks` at full speed, a bounded number
//!    unacked): throughput in rounds without deploys and with a deploy every second (geo-enrich
//!    and geo-enrich-v2 alternating, on probation for 10 batches), alternating; then 100
//!    deploys back to back. The swap pause of every deploy under load: how long batches waited
//!    for it, from the end of the last batch of the old version to the moment the worker could
//!    take the first of the new (`pipeline/worker.rs`).

use super::ingest_bench::workload;
use super::loopback::{self, stop};
use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use weir::admin::client::{AdminClient, DeployRequest};
use weir::admin::{DeployReport, Outcome};
use weir::server::Server;
use weir_client::{EncodedBatch, Producer};

/// Arguments of `weir bench --deploy`.
pub struct DeployBenchArgs {
    /// Seconds each throughput round lasts.
    pub seconds: u64,
    /// Rounds each way (without and with deploys).
    pub rounds: u32,
    /// Size of each event's value.
    pub size: usize,
    /// Events per batch.
    pub batch: usize,
}

/// The admin token of the bench routers.
const TOKEN: &str = "weir-bench";
/// Batches a stream keeps unacked.
const IN_FLIGHT: usize = 64;
/// Prepared batches, sent round and round.
const PREPARED: u64 = 64;
/// Deploys back to back under load, after the rounds.
const BURST: usize = 100;
/// Starts each way.
const STARTS: usize = 3;

fn config_text(data_dir: &Path) -> String {
    format!(
        r#"
[listener]
listen = "127.0.0.1:0"
data_dir = "{}"

[auth]
anonymous = true

[admin]
listen = "127.0.0.1:0"
token = "{TOKEN}"

[pipelines.clicks]
sinks = ["discard"]

[[pipelines.clicks.stages]]
plugin = "example:drop-bots"

[[pipelines.clicks.stages]]
plugin = "example:geo-enrich"
with = {{ table = {{ US = "United States", FR = "France", DE = "Germany", JP = "Japan" }} }}

[pipelines.totals]
sinks = ["discard"]

[[pipelines.totals.stages]]
plugin = "example:drop-bots"

[[pipelines.totals.stages]]
plugin = "example:count-sum"
window = "tumbling:1m"

[sinks.discard]
type = "null"
"#,
        data_dir.display()
    )
}

async fn start(dir: &Path) -> Result<(Server, Duration)> {
    loopback::start(dir, &config_text(dir)).await
}

/// `bytes` with a custom section appended: the same plugin under a new digest.
fn variant(bytes: &[u8], n: u32) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"weir-bench-variant";
    let payload = n.to_le_bytes();
    let mut content = Vec::new();
    leb(name.len(), &mut content);
    content.extend_from_slice(name);
    content.extend_from_slice(&payload);
    let mut out = bytes.to_vec();
    out.push(0);
    leb(content.len(), &mut out);
    out.extend_from_slice(&content);
    out
}

fn admin(server: &Server) -> Result<AdminClient> {
    let addr = server.admin_addr().context("an admin endpoint")?;
    AdminClient::new(&addr.to_string(), TOKEN).map_err(anyhow::Error::msg)
}

async fn deploy(
    admin: &AdminClient,
    target: &str,
    name: &str,
    component: Vec<u8>,
    probation: u64,
) -> Result<DeployReport> {
    let (pipeline, stage) = target.split_once('/').context("PIPELINE/STAGE")?;
    let report = admin
        .deploy(DeployRequest {
            pipeline: pipeline.to_owned(),
            stage: stage.to_owned(),
            name: name.to_owned(),
            component,
            probation: Some(probation),
            drain: false,
            wait: Duration::from_secs(30),
        })
        .await?;
    if report.outcome != Outcome::Serving {
        bail!("deploying `{name}` to {target}: {report:?}");
    }
    Ok(report)
}

/// Runs the three measurements and prints them.
pub fn run(args: &DeployBenchArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        println!(
            "weir bench --deploy: routers on loopback (clicks: drop-bots → geo-enrich, totals: drop-bots → count-sum, null sinks)"
        );
        starts().await?;
        let dir = tempfile::tempdir().context("a temporary data directory")?;
        let (server, _) = start(dir.path()).await?;
        deploys_to_serving(&server).await?;
        under_load(&server, args).await?;
        stop(server).await
    })
}

/// Start times, compiling and from the cache, alternating.
async fn starts() -> Result<()> {
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    // The certificate is made once and copied, so a cold start times the plugins.
    let template = tempfile::tempdir().context("a temporary data directory")?;
    let (server, _) = start(template.path()).await?;
    stop(server).await?;
    for _ in 0..STARTS {
        let dir = tempfile::tempdir().context("a temporary data directory")?;
        let tls = dir.path().join("tls");
        std::fs::create_dir_all(&tls)?;
        for file in ["cert.pem", "key.pem"] {
            std::fs::copy(template.path().join("tls").join(file), tls.join(file))?;
        }
        let (server, took) = start(dir.path()).await?;
        stop(server).await?;
        cold.push(took);
        let (server, took) = start(dir.path()).await?;
        stop(server).await?;
        warm.push(took);
    }
    let list = |times: &[Duration]| {
        times
            .iter()
            .map(|t| format!("{:.0} ms", t.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("start ({STARTS} times each way, alternating):");
    println!(
        "  empty data directory (every plugin compiled):   {}",
        list(&cold)
    );
    println!(
        "  same directory again (from the compile cache):  {}",
        list(&warm)
    );
    Ok(())
}

/// Deploy-to-serving times of the example plugins, compiled and from the cache.
async fn deploys_to_serving(server: &Server) -> Result<()> {
    let admin = admin(server)?;
    println!("deploy to serving (the request until the swap is done; no probation):");
    let examples = [
        ("clicks/drop-bots", "drop-bots", weir::examples::DROP_BOTS),
        (
            "clicks/geo-enrich",
            "geo-enrich",
            weir::examples::GEO_ENRICH,
        ),
        ("totals/count-sum", "count-sum", weir::examples::COUNT_SUM),
    ];
    for (target, name, bytes) in examples {
        let new = deploy(&admin, target, name, variant(bytes, 1), 0).await?;
        let back = deploy(&admin, target, name, bytes.to_vec(), 0).await?;
        println!(
            "  {name:<11} new version: {:>7.1} ms (compiled in {:.1} ms); back to the previous: {:>5.1} ms ({})",
            new.serving_ms,
            new.compile_ms,
            back.serving_ms,
            if back.from_cache {
                "from the compile cache"
            } else {
                "compiled"
            }
        );
    }
    Ok(())
}

/// Streams `batches` round and round into pipeline 0 until `stop`, [`IN_FLIGHT`] unacked.
async fn stream(producer: &Producer, batches: &[EncodedBatch], stop: &AtomicBool) -> Result<()> {
    let mut cycle = batches.iter().cycle();
    loopback::stream(producer, IN_FLIGHT, || {
        Ok((!stop.load(Ordering::Acquire))
            .then(|| cycle.next().cloned())
            .flatten())
    })
    .await
}

/// Throughput with and without a deploy every second, and the swap pauses under load.
async fn under_load(server: &Server, args: &DeployBenchArgs) -> Result<()> {
    let (_, batches) = workload(PREPARED * args.batch as u64, args.size, 1000, args.batch)?;
    let producer = Arc::new(loopback::connect(server, "bench-load", "clicks").await?);
    let stop = Arc::new(AtomicBool::new(false));
    let streaming = {
        let (producer, stop) = (producer.clone(), stop.clone());
        tokio::spawn(async move { stream(&producer, &batches, &stop).await })
    };
    let admin = admin(server)?;
    let versions = [
        ("geo-enrich", weir::examples::GEO_ENRICH),
        ("geo-enrich-v2", weir::examples::GEO_ENRICH_V2),
    ];
    let mut next = 1;
    let mut pauses = Histogram::<u64>::new(3).context("histogram")?;
    let mut deploy_next = async |pauses: &mut Histogram<u64>| -> Result<()> {
        let (name, bytes) = versions[next % 2];
        next += 1;
        let report = deploy(&admin, "clicks/geo-enrich", name, bytes.to_vec(), 10).await?;
        pauses
            .record(report.pause_us.round().max(1.0) as u64)
            .context("recording a pause")?;
        Ok(())
    };
    // Warm up: the stream runs, both versions are compiled once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    deploy_next(&mut pauses).await?;
    deploy_next(&mut pauses).await?;
    pauses.reset();
    println!(
        "under load (batches of {} events of {} B streaming into clicks, {IN_FLIGHT} unacked), {} rounds of {} s each way, alternating:",
        args.batch, args.size, args.rounds, args.seconds
    );
    let round = Duration::from_secs(args.seconds);
    let mut ratios = Vec::new();
    for r in 1..=args.rounds {
        let rate = |events: u64, took: Duration| events as f64 / took.as_secs_f64();
        let (before, started) = (producer.stats().events_acked, Instant::now());
        tokio::time::sleep(round).await;
        let plain = rate(producer.stats().events_acked - before, started.elapsed());
        let (before, started) = (producer.stats().events_acked, Instant::now());
        let mut deploys = 0;
        while started.elapsed() < round {
            let tick = Instant::now();
            deploy_next(&mut pauses).await?;
            deploys += 1;
            tokio::time::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed())).await;
        }
        let deploying = rate(producer.stats().events_acked - before, started.elapsed());
        ratios.push(deploying / plain);
        println!(
            "  round {r}: no deploys {:.2} M events/s; {deploys} deploys, one a second: {:.2} M events/s ({:.1}%)",
            plain / 1e6,
            deploying / 1e6,
            100.0 * deploying / plain
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "  with deploys / without: median {:.1}%",
        100.0 * ratios[ratios.len() / 2]
    );
    for _ in 0..BURST {
        deploy_next(&mut pauses).await?;
    }
    stop.store(true, Ordering::Release);
    streaming.await.context("the stream")??;
    println!(
        "swap pause (batches waiting for a swap), {} deploys under load: p50 {} µs, p99 {} µs, max {} µs",
        pauses.len(),
        pauses.value_at_quantile(0.5),
        pauses.value_at_quantile(0.99),
        pauses.max()
    );
    producer.close().await?;
    Ok(())
}
