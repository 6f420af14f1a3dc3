//! `weir send`: streams events from a JSON-lines file, or generated ones, into a pipeline of a
//! `weir serve`, with a progress bar, then prints what was sent and acked. Built on weir-client.
//!
//! Exit status 0 means every event was acked: held by every required sink of the pipeline.

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use std::fs::File;
use std::io::BufReader;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weir::workload::WorkloadSpec;
use weir_client::{ConnectOptions, Event, Producer, Stats, Trust};
use weir_format::json::read_lines;

/// Arguments of `weir send`.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// The server's address, `HOST:PORT` (as `weir serve` printed it).
    #[arg(long, value_name = "ADDR")]
    to: String,
    /// The pipeline to write to.
    #[arg(long, value_name = "NAME")]
    pipeline: String,
    /// Events to send: a JSON-lines file, one event per line (see `weir test --help`).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "generate",
        conflicts_with = "generate"
    )]
    file: Option<PathBuf>,
    /// Send this many generated clickstream events instead of a file.
    #[arg(long, value_name = "N")]
    generate: Option<u64>,
    /// Value size of generated events, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    size: usize,
    /// Distinct keys of generated events.
    #[arg(long, value_name = "K", default_value_t = 100)]
    keys: u64,
    /// The server certificate's SHA-256 fingerprint, as `weir serve` printed it.
    #[arg(long, value_name = "FINGERPRINT", conflicts_with = "ca")]
    pin: Option<String>,
    /// Verify the server against the CA certificates of this PEM file instead of a pin.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The name the server's certificate must hold (with --ca; default: the address).
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// Auth token (default: the WEIR_TOKEN environment variable).
    #[arg(long, value_name = "T")]
    token: Option<String>,
    /// Client certificate chain (PEM) for mutual TLS; needs --key.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// The producer's id (default: `weir-send-` and the process id).
    #[arg(long, value_name = "ID")]
    producer_id: Option<String>,
    /// Most events per batch.
    #[arg(long, value_name = "N")]
    batch_events: Option<u32>,
    /// How long a batch waits for more events before it is sent, in milliseconds.
    #[arg(long, value_name = "MS")]
    linger_ms: Option<u64>,
}

/// Where the events come from.
enum Source {
    /// A JSON-lines file that was read once to check every line and count them.
    File { path: PathBuf, events: u64 },
    /// Generated events.
    Generated(WorkloadSpec),
}

impl Source {
    fn events(&self) -> u64 {
        match self {
            Source::File { events, .. } => *events,
            Source::Generated(spec) => spec.events,
        }
    }
}

/// Runs the command.
pub fn run(args: &SendArgs) -> Result<()> {
    let trust = match (&args.pin, &args.ca) {
        (Some(pin), _) => Trust::pin(pin)?,
        (None, Some(ca)) => Trust::CaFile(ca.clone()),
        (None, None) => bail!(
            "no way to verify the server at {}: pass --pin with the certificate fingerprint `weir serve` printed (or --ca FILE for a certificate signed by a CA)",
            args.to
        ),
    };
    let source = match (&args.file, args.generate) {
        (Some(path), _) => Source::File {
            path: path.clone(),
            events: check_file(path)?,
        },
        (None, Some(events)) => Source::Generated(WorkloadSpec {
            events,
            value_size: args.size,
            keys: args.keys,
            ..WorkloadSpec::default()
        }),
        (None, None) => bail!("pass --file FILE or --generate N"),
    };
    let addr = resolve(&args.to)?;
    let producer_id = args
        .producer_id
        .clone()
        .unwrap_or_else(|| format!("weir-send-{}", std::process::id()));
    let mut options = ConnectOptions::new(addr, producer_id, [args.pipeline.clone()]).trust(trust);
    if let Some(name) = &args.server_name {
        options = options.server_name(name);
    }
    if let Some(token) = args
        .token
        .clone()
        .or_else(|| std::env::var("WEIR_TOKEN").ok())
    {
        options = options.token(token);
    }
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        options = options.client_cert(cert, key);
    }
    if let Some(events) = args.batch_events {
        options = options.batch_events(events);
    }
    if let Some(ms) = args.linger_ms {
        options = options.linger(Duration::from_millis(ms));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(send(options, &args.pipeline, &source))
}

/// Reads every line of `path` once: a bad line fails the command before anything is sent.
fn check_file(path: &Path) -> Result<u64> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut events = 0;
    for event in read_lines(BufReader::new(file), weir::utc::now_ms()) {
        event.with_context(|| path.display().to_string())?;
        events += 1;
    }
    Ok(events)
}

fn resolve(to: &str) -> Result<SocketAddr> {
    to.to_socket_addrs()
        .with_context(|| format!("--to `{to}`: not an address (HOST:PORT)"))?
        .next()
        .with_context(|| format!("--to `{to}`: resolves to no address"))
}

async fn send(options: ConnectOptions, pipeline: &str, source: &Source) -> Result<()> {
    let server = options.addr();
    let total = source.events();
    let producer = Arc::new(Producer::connect(options).await?);
    let index = producer.pipeline_index(pipeline)?;
    let started = Instant::now();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} events acked  {per_sec}  eta {eta}")
            .context("progress bar template")?,
    );
    let ticker = {
        let producer = producer.clone();
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(100));
            loop {
                interval.tick().await;
                bar.set_position(producer.stats().events_acked);
            }
        })
    };
    let result = produce(&producer, index, source).await;
    let result = match result {
        Ok(()) => producer.close().await.map_err(anyhow::Error::from),
        Err(error) => Err(error),
    };
    ticker.abort();
    let stats = producer.stats();
    bar.set_position(stats.events_acked);
    bar.finish_and_clear();
    print_summary(&stats, total, pipeline, server, started.elapsed());
    result?;
    if stats.events_acked != total {
        bail!("{} of {total} events acked", stats.events_acked);
    }
    Ok(())
}

/// Sends every event of `source`; the first error stops it.
async fn produce(producer: &Producer, index: u16, source: &Source) -> Result<()> {
    let send = |event: Event| async move {
        producer
            .send_to(index, &event)
            .await
            .map(drop)
            .map_err(anyhow::Error::from)
    };
    match source {
        Source::Generated(spec) => {
            for i in 0..spec.events {
                send(spec.event(i)).await?;
            }
        }
        Source::File { path, .. } => {
            let file =
                File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            for event in read_lines(BufReader::new(file), weir::utc::now_ms()) {
                send(event.with_context(|| path.display().to_string())?).await?;
            }
        }
    }
    producer.flush().await.map_err(anyhow::Error::from)
}

fn print_summary(stats: &Stats, total: u64, pipeline: &str, server: SocketAddr, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64().max(1e-9);
    println!(
        "sent {} of {total} events to pipeline `{pipeline}` at {server}: {} acked in {}, {}",
        stats.events_sent,
        stats.events_acked,
        count(stats.batches_acked, "batch", "batches"),
        count(stats.reconnects, "reconnect", "reconnects")
    );
    println!(
        "elapsed {:.2} s: {:.0} events/s, {:.2} MB/s",
        seconds,
        stats.events_acked as f64 / seconds,
        stats.bytes_sent as f64 / seconds / 1e6
    );
}

/// `1 batch`, `2 batches`.
pub(super) fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}
