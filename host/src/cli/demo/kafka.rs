//! `weir demo --kafka BROKERS`: weir beyond one router. Producers stream over QUIC into an edge
//! router, which filters and writes to a Kafka topic; two central routers in one consumer
//! group share the topic's partitions and aggregate, with live counts per router.
//!
//! - **edge**: QUIC in, drop-bots, a kafka sink on topic `weir-demo-PID` (6 partitions, keyed by
//!   user, so that one user's events stay on one partition and so reach one central router).
//! - **central-1, central-2**: a kafka source in group `weir-demo-PID` on that topic, count-sum
//!   over tumbling one-minute windows, a file sink of window results each.
//!
//! All three run in this process on loopback, each with its config written to `DIR/NAME.toml`
//! (`weir serve --config` runs them as they are). At the end: what each router took and wrote,
//! and a check that the window results of both central routers together count every event the
//! edge wrote to the topic.

use anyhow::{Context, Result, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use weir::config::Config;
use weir::server::Server;
use weir::workload::WorkloadSpec;
use weir_client::{ConnectOptions, Producer, Trust};

/// Partitions of the demo's topic.
const PARTITIONS: i32 = 6;
/// Distinct users: enough that both central routers get some.
const USERS: u64 = 24;
/// The longest the central routers may take to read what the edge wrote.
const CATCH_UP: Duration = Duration::from_secs(120);
/// How often the live line is redrawn.
const REDRAW: Duration = Duration::from_millis(500);

fn edge_config(dir: &Path, brokers: &str, topic: &str) -> String {
    format!(
        r#"# weir demo --kafka: the edge router. Producers stream over QUIC; drop-bots; every
# event kept goes to a Kafka topic, keyed by user.
[listener]
listen = "127.0.0.1:0"
data_dir = "{data}"

[auth]
anonymous = true

[pipelines.clicks]
sinks = ["log"]

[[pipelines.clicks.stages]]
plugin = "example:drop-bots"

[sinks.log]
type = "kafka"
brokers = "{brokers}"
topic = "{topic}"
"#,
        data = dir.join("edge").display()
    )
}

fn central_config(dir: &Path, name: &str, brokers: &str, topic: &str) -> String {
    format!(
        r#"# weir demo --kafka: a central router. It takes its share of the topic's partitions as a
# member of group `{topic}`, and counts and sums each user's events per minute.
[listener]
listen = "127.0.0.1:0"
data_dir = "{data}"

[sources.log]
type = "kafka"
brokers = "{brokers}"
topic = "{topic}"
group = "{topic}"
pipeline = "totals"

[pipelines.totals]
sinks = ["windows"]
# Finished at the stop, so that the demo's files hold every window.
checkpoint = false

[[pipelines.totals.stages]]
plugin = "example:count-sum"
# One partition's records can run minutes of event time ahead of another's (each is read
# in batches of its own): windows close only once every partition is past them.
window = "tumbling:1m,lateness:10m"

[sinks.windows]
type = "file"
path = "{windows}"
"#,
        data = dir.join(name).display(),
        windows = dir.join(format!("{name}-windows.jsonl")).display(),
    )
}

/// Writes `text` to `DIR/NAME.toml` and starts a router from it.
async fn start(dir: &Path, name: &str, text: &str) -> Result<Server> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    let config = Config::parse(text, &path)?;
    Server::start(config)
        .await
        .with_context(|| format!("router `{name}`"))
}

/// Events a router's pipelines took in, and those its sink `sink` delivered.
fn counts(server: &Server, sink: &str) -> (u64, u64) {
    let stats = server.stats();
    let out = stats.sinks.get(sink).map_or(0, |s| s.events_out);
    (stats.events_accepted, out)
}

/// Runs the demo against the brokers at `brokers`, in `dir`.
pub(super) fn run(brokers: &str, dir: &Path, events: u64) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(demo(brokers, dir, events))
}

async fn demo(brokers: &str, dir: &Path, events: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // What an earlier run wrote is replaced; nothing else in `dir` is touched.
    for name in ["edge", "central-1", "central-2"] {
        let data = dir.join(name);
        if data.exists() {
            std::fs::remove_dir_all(&data)
                .with_context(|| format!("cannot remove {}", data.display()))?;
        }
        let windows = dir.join(format!("{name}-windows.jsonl"));
        if windows.exists() {
            std::fs::remove_file(&windows)
                .with_context(|| format!("cannot remove {}", windows.display()))?;
        }
    }
    let topic = format!("weir-demo-{}", std::process::id());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("a Kafka admin client")?;
    super::super::kafka_bench::create_with(&admin, &topic, PARTITIONS)
        .await
        .with_context(|| format!("on the Kafka brokers at {brokers}"))?;
    let edge = start(dir, "edge", &edge_config(dir, brokers, &topic)).await?;
    let central = [
        start(
            dir,
            "central-1",
            &central_config(dir, "central-1", brokers, &topic),
        )
        .await?,
        start(
            dir,
            "central-2",
            &central_config(dir, "central-2", brokers, &topic),
        )
        .await?,
    ];
    println!(
        "weir demo --kafka {brokers}: {events} clickstream events ({USERS} users) over QUIC into `edge` \
         ({}), drop-bots, to topic {topic} ({PARTITIONS} partitions); `central-1` and `central-2` \
         share it as consumer group {topic}, count-sum per user and minute into files",
        edge.local_addr()
    );
    println!(
        "configs: {}",
        dir.join("{edge,central-1,central-2}.toml").display()
    );

    let options = ConnectOptions::new(edge.local_addr(), "weir-demo", ["clicks"])
        .trust(Trust::pin(&edge.fingerprint())?);
    let producer = Producer::connect(options).await?;
    let spec = WorkloadSpec {
        events,
        keys: USERS,
        ..WorkloadSpec::default()
    };
    let started = Instant::now();
    let mut last_draw = Instant::now();
    for i in 0..events {
        producer.send_to(0, &spec.event(i)).await?;
        if last_draw.elapsed() >= REDRAW {
            draw(&edge, &central, started);
            last_draw = Instant::now();
        }
    }
    producer.flush().await?;
    producer.close().await?;
    // The central routers catch up with what the edge wrote.
    let written = counts(&edge, "log").1;
    let deadline = Instant::now() + CATCH_UP;
    while central.iter().map(|s| counts(s, "windows").0).sum::<u64>() < written {
        if Instant::now() > deadline {
            bail!(
                "the central routers read {} of the {written} records in {CATCH_UP:?}",
                central.iter().map(|s| counts(s, "windows").0).sum::<u64>()
            );
        }
        draw(&edge, &central, started);
        tokio::time::sleep(REDRAW).await;
    }
    draw(&edge, &central, started);
    eprintln!();
    let (edge_in, _) = counts(&edge, "log");
    let read: Vec<u64> = central.iter().map(|s| counts(s, "windows").0).collect();
    let late: u64 = central.iter().map(|s| s.stats().dead_letters).sum();
    edge.shutdown().await?;
    let mut problems = Vec::new();
    for server in central {
        problems.extend(server.shutdown().await?.problems);
    }
    if !problems.is_empty() {
        bail!(
            "the central routers stopped with problems: {}",
            problems.join("; ")
        );
    }
    let files: Vec<PathBuf> = ["central-1", "central-2"]
        .iter()
        .map(|name| dir.join(format!("{name}-windows.jsonl")))
        .collect();
    let mut counted = 0;
    let mut results = Vec::new();
    for file in &files {
        let (windows, events) = window_counts(file)?;
        counted += events;
        results.push(windows);
    }
    println!(
        "edge: {edge_in} events in over QUIC, {written} written to {topic} (drop-bots dropped {})",
        edge_in - written
    );
    for (i, (read, windows)) in read.iter().zip(&results).enumerate() {
        println!(
            "central-{}: {read} records read, {windows} window results in {}",
            i + 1,
            files[i].display()
        );
    }
    println!(
        "the window results of both count {counted} events: {}",
        if counted == written {
            "every record the edge wrote, once"
        } else {
            "NOT the records the edge wrote"
        }
    );
    if late > 0 {
        println!("{late} events came after their window had closed: dead letters");
    }
    if counted != written {
        bail!("the window results count {counted} events, the edge wrote {written}");
    }
    Ok(())
}

/// The window results in `file`, and the events they count together.
fn window_counts(file: &Path) -> Result<(u64, u64)> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut windows = 0;
    let mut events = 0;
    for line in text.lines() {
        let event = weir_format::json::parse_line(line, 0).map_err(anyhow::Error::msg)?;
        let value: serde_json::Value = serde_json::from_slice(&event.value)
            .with_context(|| format!("a window result in {}", file.display()))?;
        windows += 1;
        events += value["count"].as_u64().unwrap_or(0);
    }
    Ok((windows, events))
}

/// One status line on stderr: what each router took in and wrote out so far.
fn draw(edge: &Server, central: &[Server; 2], started: Instant) {
    let (edge_in, edge_out) = counts(edge, "log");
    let mut line = format!(
        "\r{:>5.1}s  edge: {edge_in} in, {edge_out} to Kafka",
        started.elapsed().as_secs_f64()
    );
    for (i, server) in central.iter().enumerate() {
        let (read, out) = counts(server, "windows");
        line.push_str(&format!(" | central-{}: {read} read, {out} windows", i + 1));
    }
    let mut stderr = std::io::stderr().lock();
    let _ = write!(stderr, "{line}   ");
    let _ = stderr.flush();
}
