//! `weir demo`: a router with two pipelines of the example plugins, fed a generated clickstream
//! over QUIC, with live counts; no setup, no arguments.
//!
//! The demo writes its config to `DIR/weir-demo.toml` (what `weir serve --config` runs) and
//! starts, in this process: an HTTP receiver (`weir::receiver`, the other end of sink `eu`),
//! the router (`weir::server::Server`) on loopback with its Prometheus endpoint, and a
//! weir-client producer that pins the router's certificate and sends every generated event to
//! both pipelines:
//!
//! - `clicks`: drop-bots → geo-enrich, fanned out to `archive` (a JSON-lines file, every event)
//!   and `eu` (HTTP to the receiver, only the events geo-enrich routed `fr` or `de`);
//! - `totals`: drop-bots → count-sum over tumbling one-minute windows of event time, to
//!   `console` (stdout): each window's result is printed as the window closes.
//!
//! Halfway through, it deploys geo-enrich's next version into `clicks/geo-enrich` through the
//! router's admin endpoint, as `weir deploy` does (`hotload.rs`); `clicks` tags every event
//! with the versions that made it, so the archive shows the split.
//!
//! While it streams, stderr shows per-stage and per-sink counts (`live.rs`). Then the router
//! stops gracefully (windows still open are flushed, sinks drained) and the summary gives the
//! final counts (`counts.rs`), the throughput, the deploy and where the files are (`setup.rs`).
//!
//! `weir demo --kafka BROKERS` runs another demo: routers joined by a Kafka topic (`kafka.rs`).

mod counts;
mod hotload;
mod kafka;
mod live;
mod setup;

use anyhow::{Context, Result, bail};
use counts::Table;
use hotload::Midway;
use setup::{Files, PIPELINES};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use weir::admin::DeployReport;
use weir::config::Config;
use weir::receiver::{Receiver, ReceiverOptions};
use weir::runtime::Digest;
use weir::server::{Server, ShutdownReport};
use weir::workload::{BOT_EVERY, WorkloadSpec};
use weir_client::{ConnectOptions, Producer, Trust};

/// Distinct users in the workload: few, so that the console shows a readable number of window
/// results (one per user and minute).
const USERS: u64 = 10;
/// The producer's id.
const PRODUCER: &str = "weir-demo";

/// Arguments of `weir demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Events to generate; each is sent to both pipelines.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    events: u64,
    /// The demo's directory: its config, output files and the router's data (default:
    /// weir-demo in the system's temp directory). What an earlier demo wrote there is
    /// replaced; nothing else is touched.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Instead: an edge router writing to a Kafka topic on these brokers and two central
    /// routers sharing it as one consumer group (`host:port[,host:port…]`).
    #[arg(long, value_name = "BROKERS")]
    kafka: Option<String>,
}

/// What the producer did.
struct Streamed {
    /// Events acked, over both pipelines.
    acked: u64,
    /// From the first send to the last ack.
    elapsed: Duration,
    /// The deploy made halfway, or why it failed.
    deployed: Result<DeployReport, String>,
}

/// A token for the demo router's admin endpoint, new on every run.
fn admin_token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = format!("{}-{nanos}", std::process::id());
    Digest::of(seed.as_bytes()).hex()[..32].to_owned()
}

/// Runs the command.
pub fn run(args: &DemoArgs) -> Result<()> {
    if let Some(brokers) = &args.kafka {
        let dir = args
            .dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("weir-demo-kafka"));
        return kafka::run(brokers, &dir, args.events);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let files = Files::new(args.dir.as_deref())?;
    files.clear()?;
    files.write_components()?;
    let receiver = runtime.block_on(Receiver::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        ReceiverOptions {
            output: Some(files.received.clone()),
            ..ReceiverOptions::default()
        },
    ))?;
    let token = admin_token();
    let text = setup::config_text(&files, &receiver.url(), &token);
    std::fs::write(&files.config, &text)
        .with_context(|| format!("cannot write {}", files.config.display()))?;
    let config = Config::parse(&text, &files.config)?;
    let server = runtime.block_on(Server::start(config.clone()))?;
    let table = Table::new(&config, server.metrics());
    let spec = WorkloadSpec {
        events: args.events,
        keys: USERS,
        ..WorkloadSpec::default()
    };
    let admin = server
        .admin_addr()
        .context("the demo's config has an admin endpoint")?;
    let midway = Midway::new(admin, &token, &files)?;
    print(&banner(&server, &config, &files, &spec, &midway)?)?;

    // Connected and closed outside the live view, so that the router's log lines about it
    // do not land inside the view.
    let producer = runtime.block_on(connect(&server))?;
    let expected = spec.events * PIPELINES.len() as u64;
    let streamed = live::show_while(&server, &table, expected, || {
        runtime.block_on(stream(&producer, &spec, &midway))
    });
    let deployed = match &streamed {
        Ok(s) => match &s.deployed {
            Ok(report) => Ok(runtime.block_on(midway.verdict(report.clone()))),
            Err(e) => Err(e.clone()),
        },
        Err(e) => Err(format!("{e:#}")),
    };
    let closed = runtime.block_on(producer.close());
    // The router stops gracefully even when streaming failed.
    let report = runtime.block_on(server.shutdown())?;
    let received = receiver.events();
    runtime.block_on(receiver.stop());
    let streamed = streamed?;
    closed?;
    print(&summary(
        &report, &table, &streamed, received, &files, &spec,
    )?)?;
    print(&hotload::summary(&deployed, &files)?)?;
    if !report.problems.is_empty() {
        bail!(
            "the router stopped with problems: {}",
            report.problems.join("; ")
        );
    }
    if streamed.acked != expected {
        bail!("{} of {expected} events acked", streamed.acked);
    }
    Ok(())
}

/// Connects a producer to both pipelines that pins the server's certificate, as
/// `weir send --pin` does.
async fn connect(server: &Server) -> Result<Producer> {
    let options = ConnectOptions::new(server.local_addr(), PRODUCER, PIPELINES)
        .trust(Trust::pin(&server.fingerprint())?);
    Ok(Producer::connect(options).await?)
}

/// Sends every event of `spec` to each pipeline, deploying geo-enrich's next version
/// halfway; returns once all are acked.
async fn stream(producer: &Producer, spec: &WorkloadSpec, midway: &Midway) -> Result<Streamed> {
    let pipelines = PIPELINES
        .iter()
        .map(|p| producer.pipeline_index(p))
        .collect::<Result<Vec<u16>, _>>()?;
    let started = Instant::now();
    let mut deployed = Err("the stream ended before halfway".to_owned());
    for i in 0..spec.events {
        if i == spec.events / 2 {
            // The first half acked (so processed by the version serving), then the deploy.
            producer.flush().await?;
            deployed = midway.deploy().await.map_err(|e| format!("{e:#}"));
        }
        let event = spec.event(i);
        for &pipeline in &pipelines {
            producer.send_to(pipeline, &event).await?;
        }
    }
    producer.flush().await?;
    Ok(Streamed {
        acked: producer.stats().events_acked,
        elapsed: started.elapsed(),
        deployed,
    })
}

/// What runs where, printed before the events stream.
fn banner(
    server: &Server,
    config: &Config,
    files: &Files,
    spec: &WorkloadSpec,
    midway: &Midway,
) -> Result<String> {
    let mut text = String::new();
    writeln!(
        text,
        "weir demo: {} generated clickstream events ({USERS} users, one event every 10 ms of \
         event time, one in {BOT_EVERY} from a crawler), each sent to both pipelines of a \
         router on {} (QUIC)",
        spec.events,
        server.local_addr()
    )?;
    for (pipeline, info) in config.pipelines.iter().zip(server.pipelines()) {
        let stages: Vec<String> = pipeline
            .stages
            .iter()
            .map(|s| match &s.window {
                Some(window) => format!("{} ({window})", s.name),
                None => s.name.clone(),
            })
            .collect();
        writeln!(text, "pipeline `{}`: {}", pipeline.name, stages.join(" → "))?;
        for sink in &info.sinks {
            writeln!(text, "  sink {sink}")?;
        }
        writeln!(text, "  dead letters: {}", info.dead_letters)?;
    }
    writeln!(text, "config: {}", files.config.display())?;
    if let Some(metrics) = server.metrics_addr() {
        writeln!(
            text,
            "metrics: http://{metrics}/metrics (Prometheus, while the demo runs)"
        )?;
    }
    text.push_str(&midway.banner());
    writeln!(
        text,
        "\nwindow results of `totals` (count and sum of `amount` per user), as each minute of \
         event time closes:"
    )?;
    Ok(text)
}

/// The final counts, the throughput and the files.
fn summary(
    report: &ShutdownReport,
    table: &Table,
    streamed: &Streamed,
    received: u64,
    files: &Files,
    spec: &WorkloadSpec,
) -> Result<String> {
    let stats = &report.stats;
    let delivered = |sink: &str| stats.sinks.get(sink).map_or(0, |s| s.events_out);
    let seconds = streamed.elapsed.as_secs_f64().max(1e-9);
    let mut text = String::new();
    writeln!(
        text,
        "\nweir demo: {} events × {} pipelines in {seconds:.2} s: {:.0} events/s, acked end to end",
        spec.events,
        PIPELINES.len(),
        streamed.acked as f64 / seconds
    )?;
    text.push_str(&table.render(stats));
    writeln!(
        text,
        "  receiver: {received} events (what sink eu delivered: the events routed fr or de)"
    )?;
    let dead: u64 = PIPELINES
        .iter()
        .map(|p| delivered(&format!("{p}/dead-letters")))
        .sum();
    writeln!(text, "files:")?;
    let listed = [
        (
            "archive",
            files.archive.display().to_string(),
            Some(delivered("archive")),
        ),
        (
            "received",
            files.received.display().to_string(),
            Some(received),
        ),
        (
            "dead letters",
            format!("{}/", files.dead_letters.display()),
            Some(dead),
        ),
        ("config", files.config.display().to_string(), None),
    ];
    for (what, path, events) in listed {
        match events {
            Some(n) => writeln!(text, "  {what:<13} {path} ({n} events)")?,
            None => writeln!(text, "  {what:<13} {path}")?,
        }
    }
    writeln!(
        text,
        "run the same router: weir serve --config {}\n  (sink eu posts to this demo's receiver, \
         which has stopped: point its url at a receiver of yours)",
        files.config.display()
    )?;
    Ok(text)
}

/// Writes to stdout and flushes; an error (a closed pipe) is returned, not a panic.
fn print(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}
