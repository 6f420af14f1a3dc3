//! The second half of `weir bench --kafka BROKERS`: a router whose kafka source feeds the
//! identity plugin and a kafka sink, against a plain rdkafka consume-and-produce loop of the
//! same records, in one run.
//!
//! - The records (the workload's events) are produced once to an input topic; each round reads
//!   all of it with a consumer group of its own and writes to a fresh output topic.
//! - **plain rdkafka**: one `BaseConsumer` (the group, manual commits) and one producer with the
//!   kafka sink's settings; each record consumed is produced as it is (value, key, headers,
//!   timestamp); the time from the consumer's creation until every delivery report came, then
//!   the offsets are committed.
//! - **weir**: a router started with a kafka source on the input topic, pipeline `bench` (the
//!   identity plugin) and a kafka sink on the output topic; the time from the router's start
//!   until the sink counted every record delivered (acked by the broker).
//! - **Latency**: records produced at a steady rate with their create time, through each of
//!   the two in turn, read back from the output topic: the time from produce to read.

use super::ingest_bench::ROUNDS;
use super::kafka_bench::{PARTITIONS, create, produce_all, sink_producer, sink_settings};
use super::loopback::{self, stop};
use anyhow::{Context, Result, anyhow, bail};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use weir::sinks::client_config;
use weir_client::EncodedBatch;

/// Events per second of the latency runs, and how long each runs.
const LATENCY_RATE: u64 = 2_000;
const LATENCY_RUN: Duration = Duration::from_secs(5);
/// How long the reader of a latency run waits for stragglers after the producing ended.
const READ_AFTER: Duration = Duration::from_secs(15);
/// How long a round may take before the bench gives up.
const ROUND_LIMIT: Duration = Duration::from_secs(300);

/// Runs the rounds and the latency runs and prints them.
pub(super) async fn run(
    brokers: &str,
    admin: &AdminClient<DefaultClientContext>,
    batches: &[EncodedBatch],
    events: u64,
) -> Result<()> {
    let id = std::process::id();
    let input = format!("weir-bench-in-{id}");
    create(admin, &input).await?;
    let producer = sink_producer("bench-input", brokers, &input)?;
    produce_all(&producer, &input, batches).await?;
    println!(
        "kafka source → identity → kafka sink, against a plain consume-and-produce loop ({events} records, topics of {PARTITIONS} partitions; {ROUNDS} rounds each way, alternating):"
    );
    let dir = tempfile::tempdir()?;
    let mut ratios = Vec::new();
    for round in 1..=ROUNDS {
        let out = format!("weir-bench-loop-{round}-{id}");
        create(admin, &out).await?;
        let stop = AtomicBool::new(false);
        let started = Instant::now();
        plain_loop(
            brokers,
            &input,
            &out,
            &format!("plain-{round}-{id}"),
            Some(events),
            &stop,
        )
        .await?;
        let plain = started.elapsed();
        let out = format!("weir-bench-pipe-{round}-{id}");
        create(admin, &out).await?;
        let weir = through_weir(
            &dir.path().join(format!("round-{round}")),
            brokers,
            &input,
            &out,
            &format!("weir-{round}-{id}"),
            events,
        )
        .await?;
        let (plain, weir) = (
            events as f64 / plain.as_secs_f64(),
            events as f64 / weir.as_secs_f64(),
        );
        ratios.push(weir / plain);
        println!(
            "  round {round}: plain loop {plain:.0} records/s; weir {weir:.0} records/s ({:.1}%)",
            100.0 * weir / plain
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "  weir / plain loop: median {:.1}%",
        100.0 * ratios[ratios.len() / 2]
    );
    latency(brokers, admin, dir.path()).await
}

/// The plain loop: consumes `input` as `group` and produces each record to `out` until
/// `count` records were delivered (or, without a count, until `stop`), then commits.
async fn plain_loop(
    brokers: &str,
    input: &str,
    out: &str,
    group: &str,
    count: Option<u64>,
    stop: &AtomicBool,
) -> Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("a consumer")?;
    consumer.subscribe(&[input]).context("subscribing")?;
    let producer: FutureProducer = sink_producer("bench-loop", brokers, out)?;
    let deadline = Instant::now() + ROUND_LIMIT;
    let mut pending = Vec::new();
    let mut read = 0u64;
    while count.is_none_or(|n| read < n) && !stop.load(Ordering::Relaxed) {
        if Instant::now() > deadline {
            bail!("the plain loop read {read} records in {ROUND_LIMIT:?}");
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message.context("consuming")?;
        let mut outgoing = FutureRecord::to(out).payload(message.payload().unwrap_or_default());
        if let Some(headers) = message.headers() {
            outgoing = outgoing.headers(headers.detach());
        }
        if let Some(ts) = message.timestamp().to_millis() {
            outgoing = outgoing.timestamp(ts);
        }
        if let Some(key) = message.key() {
            outgoing = outgoing.key(key);
        }
        pending.push(
            producer
                .send_result(outgoing)
                .map_err(|(e, _)| anyhow!("producing: {e}"))?,
        );
        read += 1;
    }
    for delivery in pending {
        delivery
            .await
            .context("the producer went away")?
            .map_err(|(e, _)| anyhow!("delivery: {e}"))?;
    }
    consumer
        .commit_consumer_state(CommitMode::Sync)
        .context("committing")?;
    Ok(())
}

fn router_config(
    dir: &std::path::Path,
    brokers: &str,
    input: &str,
    out: &str,
    group: &str,
) -> String {
    format!(
        r#"
[listener]
listen = "127.0.0.1:0"
data_dir = "{data}"

[sources.input]
type = "kafka"
brokers = "{brokers}"
topic = "{input}"
group = "{group}"
pipeline = "bench"

[pipelines.bench]
sinks = ["topic"]

[[pipelines.bench.stages]]
plugin = "example:identity"

[sinks.topic]
type = "kafka"
brokers = "{brokers}"
topic = "{out}"
"#,
        data = dir.join("data").display()
    )
}

/// A router reading `input` as `group` into a kafka sink on `out`: the time from its start
/// until the sink delivered `events`.
async fn through_weir(
    dir: &std::path::Path,
    brokers: &str,
    input: &str,
    out: &str,
    group: &str,
    events: u64,
) -> Result<Duration> {
    let started = Instant::now();
    let (server, _) = loopback::start(dir, &router_config(dir, brokers, input, out, group)).await?;
    loop {
        let delivered = server
            .stats()
            .sinks
            .get("topic")
            .map_or(0, |s| s.events_out);
        if delivered >= events {
            break;
        }
        if started.elapsed() > ROUND_LIMIT {
            bail!("weir delivered {delivered} of {events} records in {ROUND_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = started.elapsed();
    stop(server).await?;
    Ok(took)
}

/// Produce-to-read latency through weir and through the plain loop, one after the other.
async fn latency(
    brokers: &str,
    admin: &AdminClient<DefaultClientContext>,
    dir: &std::path::Path,
) -> Result<()> {
    let id = std::process::id();
    println!(
        "latency from produce to the output topic, {LATENCY_RATE} records/s for {}s each:",
        LATENCY_RUN.as_secs()
    );
    for side in ["weir", "plain loop"] {
        let input = format!("weir-bench-lat-in-{}-{id}", side.replace(' ', "-"));
        let out = format!("weir-bench-lat-out-{}-{id}", side.replace(' ', "-"));
        create(admin, &input).await?;
        create(admin, &out).await?;
        let group = format!("lat-{}-{id}", side.replace(' ', "-"));
        let stop_loop = Arc::new(AtomicBool::new(false));
        let runner = if side == "weir" {
            let path = dir.join("latency");
            let (server, _) =
                loopback::start(&path, &router_config(&path, brokers, &input, &out, &group))
                    .await?;
            Runner::Weir(Box::new(server))
        } else {
            let (brokers, input, out, stop) = (
                brokers.to_owned(),
                input.clone(),
                out.clone(),
                stop_loop.clone(),
            );
            Runner::Plain(tokio::spawn(async move {
                plain_loop(&brokers, &input, &out, &group, None, &stop).await
            }))
        };
        let mut latencies = measure(brokers, &input, &out).await?;
        match runner {
            Runner::Weir(server) => stop(*server).await?,
            Runner::Plain(task) => {
                stop_loop.store(true, Ordering::Relaxed);
                task.await.context("the plain loop")??;
            }
        }
        latencies.sort_unstable();
        if latencies.is_empty() {
            bail!("{side}: no record came through");
        }
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
        println!(
            "  {side}: p50 {} ms, p99 {} ms, max {} ms ({} records)",
            at(0.5),
            at(0.99),
            at(1.0),
            latencies.len()
        );
    }
    Ok(())
}

enum Runner {
    Weir(Box<weir::server::Server>),
    Plain(tokio::task::JoinHandle<Result<()>>),
}

/// Produces to `input` at [`LATENCY_RATE`] for [`LATENCY_RUN`], each record stamped with the
/// time it is produced, while reading `out` from its start; each record's latency in ms (the
/// time it was read minus its stamp), once all came or [`READ_AFTER`] after the producing
/// ended.
async fn measure(brokers: &str, input: &str, out: &str) -> Result<Vec<i64>> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{out}-reader"))
        .set("fetch.wait.max.ms", "5")
        .create()
        .context("a reader")?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        assignment
            .add_partition_offset(out, p, Offset::Beginning)
            .context("a partition")?;
    }
    reader.assign(&assignment).context("assigning")?;
    let producer: FutureProducer = client_config("bench-latency", &sink_settings(brokers, input))
        .set("linger.ms", "0")
        .create()
        .context("a producer")?;
    let total = LATENCY_RATE * LATENCY_RUN.as_secs();
    let value = vec![b'x'; 256];
    let send = |n: u64| {
        let key = format!("k{}", n % 64);
        producer
            .send_result(
                FutureRecord::to(input)
                    .payload(&value)
                    .key(&key)
                    .timestamp(weir::utc::now_ms()),
            )
            .map(drop)
            .map_err(|(e, _)| anyhow!("producing: {e}"))
    };
    // Warm up: the group joined and records flow before anything is measured.
    let warm = Instant::now();
    let mut warmed = 0u64;
    loop {
        send(warmed)?;
        warmed += 1;
        if let Some(Ok(_)) = reader.poll(Duration::from_millis(50)) {
            break;
        }
        if warm.elapsed() > ROUND_LIMIT {
            bail!("no record came through in {ROUND_LIMIT:?}");
        }
    }
    // What the warm-up left in flight is read and not counted.
    let drain = Instant::now();
    while drain.elapsed() < Duration::from_secs(1) {
        let _ = reader.poll(Duration::from_millis(10));
    }
    let reading = tokio::task::spawn_blocking(move || {
        let mut latencies = Vec::with_capacity(total as usize);
        let started = Instant::now();
        while (latencies.len() as u64) < total && started.elapsed() < LATENCY_RUN + READ_AFTER {
            let Some(Ok(message)) = reader.poll(Duration::from_millis(10)) else {
                continue;
            };
            if let Some(stamp) = message.timestamp().to_millis() {
                latencies.push(weir::utc::now_ms() - stamp);
            }
        }
        latencies
    });
    let started = Instant::now();
    for n in 0..total {
        let due = started + Duration::from_secs_f64(n as f64 / LATENCY_RATE as f64);
        tokio::time::sleep_until(due.into()).await;
        send(n)?;
    }
    reading.await.context("the reader")
}
