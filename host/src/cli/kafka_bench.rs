//! `weir bench --kafka BROKERS`: what weir's kafka sink costs against a plain rdkafka producer
//! writing the same records, measured in one run against the broker at BROKERS.
//!
//! - **plain rdkafka**: one producer with the sink's settings (idempotent, `acks = all`,
//!   `murmur2_random`) produces every event of the prepared batches as a record (value, key,
//!   headers, timestamp) and waits for every delivery report;
//! - **weir**: a router on loopback with pipeline `bench` (the identity plugin) writing to a
//!   kafka sink; a producer streams the same prepared batches over QUIC (64 unacked) and waits
//!   for every ack, each of which comes once the broker acked the batch's records.
//!
//! Each round writes to a topic of its own (4 partitions); the two alternate, five rounds
//! each, and the figure is the median of the per-round ratios. Then the kafka source:
//! `kafka_pipe_bench.rs`.

use super::ingest_bench::{ROUNDS, workload};
use super::loopback::{self, stop};
use anyhow::{Context, Result, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::FutureProducer;
use std::time::{Duration, Instant};
use weir::sinks::{KafkaConfig, TopicFrom, client_config, record};
use weir_client::EncodedBatch;
use weir_format::Batch;

/// Arguments of `weir bench --kafka`.
pub struct KafkaBenchArgs {
    /// The broker(s).
    pub brokers: String,
    /// Events per round.
    pub events: u64,
    /// Value size.
    pub size: usize,
    /// Events per batch.
    pub batch: usize,
    /// Distinct keys.
    pub keys: u64,
}

/// Batches the weir side keeps unacked.
const IN_FLIGHT: usize = 64;
/// Partitions of each round's topic.
pub(super) const PARTITIONS: i32 = 4;

/// Runs the rounds and prints them.
pub fn run(args: &KafkaBenchArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(rounds(args))
}

async fn rounds(args: &KafkaBenchArgs) -> Result<()> {
    let (_, batches) = workload(args.events, args.size, args.keys, args.batch)?;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .create()
        .context("an admin client")?;
    let dir = tempfile::tempdir()?;
    let (server, _) = loopback::start(dir.path(), &config_text(dir.path(), &args.brokers)).await?;
    println!(
        "weir bench --kafka {}: {} events of {} B per round in batches of {}, {} keys, topics of {PARTITIONS} partitions; {ROUNDS} rounds each way, alternating:",
        args.brokers, args.events, args.size, args.batch, args.keys
    );
    let mut ratios = Vec::new();
    for round in 1..=ROUNDS {
        let topic = format!("weir-bench-plain-{round}-{}", std::process::id());
        create(&admin, &topic).await?;
        let plain = plain(&args.brokers, &topic, &batches).await?;
        // The router's sink takes each event's topic from its route tag: a fresh one each round.
        let topic = format!("weir-bench-sink-{round}-{}", std::process::id());
        create(&admin, &topic).await?;
        let weir = through_weir(&server, &topic, &batches).await?;
        let (plain, weir) = (
            args.events as f64 / plain.as_secs_f64(),
            args.events as f64 / weir.as_secs_f64(),
        );
        ratios.push(weir / plain);
        println!(
            "  round {round}: plain rdkafka {:.0} events/s; weir (QUIC → identity → kafka sink) {:.0} events/s ({:.1}%)",
            plain,
            weir,
            100.0 * weir / plain
        );
    }
    stop(server).await?;
    ratios.sort_by(f64::total_cmp);
    println!(
        "  weir / plain rdkafka: median {:.1}%",
        100.0 * ratios[ratios.len() / 2]
    );
    super::kafka_pipe_bench::run(&args.brokers, &admin, &batches, args.events).await
}

fn config_text(dir: &std::path::Path, brokers: &str) -> String {
    format!(
        r#"
[listener]
listen = "127.0.0.1:0"
data_dir = "{}"

[auth]
anonymous = true

[pipelines.bench]
sinks = ["topic"]

[[pipelines.bench.stages]]
plugin = "example:identity"

[sinks.topic]
type = "kafka"
brokers = "{brokers}"
topic_from = "route"
"#,
        dir.join("data").display()
    )
}

pub(super) async fn create(admin: &AdminClient<DefaultClientContext>, topic: &str) -> Result<()> {
    create_with(admin, topic, PARTITIONS).await
}

/// Creates `topic` with `partitions` partitions (one replica); an error names the topic.
pub(super) async fn create_with(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    partitions: i32,
) -> Result<()> {
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .context("creating a topic")?;
    for result in results {
        if let Err((topic, e)) = result {
            bail!("cannot create topic {topic}: {e}");
        }
    }
    Ok(())
}

/// The kafka sink's producer settings for `topic`, exactly.
pub(super) fn sink_settings(brokers: &str, topic: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: brokers.to_owned(),
        topic: Some(topic.to_owned()),
        topic_from: TopicFrom::Config,
        properties: Vec::new(),
        timeout: Duration::from_secs(30),
    }
}

/// A producer with the kafka sink's settings for `topic`.
pub(super) fn sink_producer(name: &str, brokers: &str, topic: &str) -> Result<FutureProducer> {
    client_config(name, &sink_settings(brokers, topic))
        .create()
        .context("a producer")
}

/// Produces every event of `batches` to `topic` and waits for every delivery report.
pub(super) async fn produce_all(
    producer: &FutureProducer,
    topic: &str,
    batches: &[EncodedBatch],
) -> Result<()> {
    let mut pending = Vec::new();
    for encoded in batches {
        let batch = Batch::verify(encoded.payload()).context("a prepared batch")?;
        for event in batch.iter() {
            pending.push(
                producer
                    .send_result(record(topic, &event))
                    .map_err(|(e, _)| anyhow::anyhow!("producing: {e}"))?,
            );
        }
    }
    for delivery in pending {
        delivery
            .await
            .context("the producer went away")?
            .map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
    }
    Ok(())
}

/// Produces every event of `batches` to `topic` with a plain producer; the time until every
/// delivery report came.
async fn plain(brokers: &str, topic: &str, batches: &[EncodedBatch]) -> Result<Duration> {
    let producer = sink_producer("bench-plain", brokers, topic)?;
    let started = Instant::now();
    produce_all(&producer, topic, batches).await?;
    Ok(started.elapsed())
}

/// Streams `batches` into the router's pipeline with every event routed to `topic`; the time
/// until every batch was acked.
async fn through_weir(
    server: &weir::server::Server,
    topic: &str,
    batches: &[EncodedBatch],
) -> Result<Duration> {
    let routed: Vec<EncodedBatch> = batches
        .iter()
        .map(|encoded| {
            let batch = Batch::verify(encoded.payload()).context("a prepared batch")?;
            let mut builder = weir_format::BatchBuilder::new();
            for event in batch.iter() {
                builder.push_parts(
                    event.key(),
                    event.value(),
                    event.timestamp_ms(),
                    event.headers(),
                    Some(topic),
                    event.source(),
                );
            }
            Ok(EncodedBatch::new(bytes::Bytes::from(builder.finish()))?)
        })
        .collect::<Result<_>>()?;
    let producer = loopback::connect(server, &format!("bench-{topic}"), "bench").await?;
    let started = Instant::now();
    let mut next = routed.iter();
    loopback::stream(&producer, IN_FLIGHT, || Ok(next.next().cloned())).await?;
    let took = started.elapsed();
    producer.close().await?;
    Ok(took)
}
