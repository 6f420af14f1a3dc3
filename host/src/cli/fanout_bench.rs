//! `weir bench --fanout`: what fanning a pipeline out to more sinks costs. The same workload
//! goes through a pipeline into 1, 2 and 4 sinks of one kind, each taking every event (the
//! worst case for sharing: every sink handles every batch), and each count of sinks is
//! reported as events/s and as its time over the time with 1 sink.
//!
//! Each run starts its own in-process weir server (`ingest_bench.rs`'s start and send): one
//! pipeline `bench` with **no stages**, so that the batch the sinks share is the verified frame
//! itself and nothing but ingest and the fan-out is timed (a plugin would add the same time per
//! batch to every configuration and flatten the ratio). weir-client sends the pre-encoded
//! batches over one loopback QUIC connection; the clock stops when the last batch is acked,
//! which with the sinks' default `when_full = "block"` means every sink has delivered it. The
//! server is then shut down and every sink's count checked: the runner's delivered events
//! and what reached the destination must both be every event sent.
//!
//! Kinds: `null` (the fan-out machinery alone: the shared batch, one delivery per sink, the
//! sinks' buffers, tasks and acks), `file` (JSON lines with `fsync = "never"` into a temporary
//! directory, a file per sink: each sink renders its own lines) and `http` (each sink POSTs
//! JSON to its own `weir::receiver::Receiver`, started in this process: the receivers' parsing
//! shares the machine's cores with the server).
//!
//! The three configurations alternate in each of [`ROUNDS`] rounds (1, 2, 4 sinks, then 4, 2,
//! 1), so that none always gets the quieter moment; the ratio reported for k sinks is the
//! median over the rounds of time(k) / time(1) of the same round.

use super::ingest_bench::{ROUNDS, start_server, weir_batches, workload};
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use weir::receiver::{Receiver, ReceiverOptions};
use weir_client::EncodedBatch;

/// The sinks' counts compared, in the order runs go in a round.
const SINKS: [usize; 3] = [1, 2, 4];
/// The target: fan-out to 4 sinks costs less than this times the time of 1.
const TARGET: f64 = 1.5;

/// Which kind of sink `weir bench --fanout` fans out to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KindChoice {
    /// Null sinks: the fan-out machinery alone.
    Null,
    /// File sinks, JSON lines, never synced, a file each.
    File,
    /// HTTP sinks, each to its own in-process receiver.
    Http,
    /// Each of the three, one after the other.
    All,
}

impl KindChoice {
    fn kinds(self) -> Vec<Kind> {
        match self {
            KindChoice::Null => vec![Kind::Null],
            KindChoice::File => vec![Kind::File],
            KindChoice::Http => vec![Kind::Http],
            KindChoice::All => vec![Kind::Null, Kind::File, Kind::Http],
        }
    }
}

/// One kind of sink measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    File,
    Http,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::File => "file",
            Kind::Http => "http",
        }
    }
}

/// Arguments of `weir bench --fanout`.
pub struct FanoutArgs {
    /// Events sent in each run.
    pub events: u64,
    /// Size of each event's value.
    pub size: usize,
    /// Events per batch.
    pub batch: usize,
    /// Distinct keys.
    pub keys: u64,
    /// The sinks' kind (or all three).
    pub kind: KindChoice,
}

/// One run: the time until the last ack, and per sink (`out1`, `out2`, ...) the events its
/// runner delivered and the events that reached its destination (the file's lines, the
/// receiver's events; for `null`, the runner's count again).
#[derive(Debug)]
struct Run {
    took: Duration,
    delivered: Vec<(u64, u64)>,
}

/// Runs every configuration of every kind asked for and prints the table.
pub fn run(args: &FanoutArgs) -> Result<()> {
    let (_, batches) = workload(args.events, args.size, args.keys, args.batch)?;
    let bytes: usize = batches.iter().map(|b| b.payload().len()).sum();
    eprintln!(
        "weir bench --fanout: {} events of {} B in batches of {} ({:.1} MB), one connection on loopback; \
         pipeline `bench` with no stages, every sink takes every event; {ROUNDS} rounds of 1, 2 and 4 sinks alternating",
        args.events,
        args.size,
        args.batch,
        bytes as f64 / 1e6
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let mut summary = Vec::new();
    for kind in args.kind.kinds() {
        let times = runtime.block_on(measure(kind, &batches, args.events))?;
        summary.push(table(kind, &times, args.events));
    }
    println!();
    println!(
        "  {:<6}{:>6}{:>18}{:>22}   time / 1 sink, per round",
        "kind", "sinks", "median events/s", "time / 1 sink (med.)"
    );
    for table in &summary {
        for row in &table.rows {
            println!("{row}");
        }
    }
    println!();
    for table in &summary {
        println!(
            "  {}: fan-out to 4 sinks takes {:.2}x the time of 1 (target < {TARGET}x): {}",
            table.kind.name(),
            table.four,
            if table.four < TARGET { "met" } else { "missed" }
        );
    }
    Ok(())
}

/// One kind's part of the table.
struct KindTable {
    kind: Kind,
    /// A row per count of sinks.
    rows: Vec<String>,
    /// The median time(4) / time(1).
    four: f64,
}

/// Per count of sinks ([`SINKS`] order), the time of each round.
async fn measure(kind: Kind, batches: &[EncodedBatch], events: u64) -> Result<Vec<Vec<Duration>>> {
    // A warm-up on a tenth of the batches, not timed: the first run in the process otherwise
    // pays for growing the allocator's arenas and the like.
    let warm = &batches[..batches.len().div_ceil(10)];
    let warm_events: u64 = warm.iter().map(|b| u64::from(b.events())).sum();
    check(kind, 4, &run_once(kind, 4, warm, 0).await?, warm_events)?;
    let mut times = vec![Vec::new(); SINKS.len()];
    let mut id = 0;
    for round in 1..=ROUNDS {
        let mut order: Vec<usize> = (0..SINKS.len()).collect();
        if round % 2 == 0 {
            order.reverse();
        }
        let mut line = format!("  {} round {round}:", kind.name());
        for &i in &order {
            id += 1;
            let run = run_once(kind, SINKS[i], batches, id).await?;
            check(kind, SINKS[i], &run, events)?;
            line += &format!(
                "  {} sink{} {:.3} s ({:.2} M/s)",
                SINKS[i],
                if SINKS[i] == 1 { "" } else { "s" },
                run.took.as_secs_f64(),
                events as f64 / run.took.as_secs_f64() / 1e6
            );
            times[i].push(run.took);
        }
        println!("{line}");
    }
    Ok(times)
}

/// Fails unless every sink of `run` delivered `events` events and they all reached its
/// destination.
fn check(kind: Kind, sinks: usize, run: &Run, events: u64) -> Result<()> {
    if run.delivered.len() != sinks {
        bail!(
            "{} with {sinks} sinks: counts of {} sinks",
            kind.name(),
            run.delivered.len()
        );
    }
    for (i, &(delivered, arrived)) in run.delivered.iter().enumerate() {
        if delivered != events || arrived != events {
            bail!(
                "{} with {sinks} sinks: sink `out{}` delivered {delivered} of {events} events and its destination has {arrived}",
                kind.name(),
                i + 1
            );
        }
    }
    Ok(())
}

/// The median of `values` (the upper one of an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The table rows of one kind: per count of sinks, the median events/s and the median over
/// the rounds of time(k) / time(1).
fn table(kind: Kind, times: &[Vec<Duration>], events: u64) -> KindTable {
    let mut rows = Vec::new();
    let mut four = 0.0;
    for (i, &sinks) in SINKS.iter().enumerate() {
        let rate = median(
            times[i]
                .iter()
                .map(|t| events as f64 / t.as_secs_f64())
                .collect(),
        );
        let ratios: Vec<f64> = times[i]
            .iter()
            .zip(&times[0])
            .map(|(t, one)| t.as_secs_f64() / one.as_secs_f64())
            .collect();
        let ratio = median(ratios.clone());
        if sinks == 4 {
            four = ratio;
        }
        rows.push(format!(
            "  {:<6}{sinks:>6}{:>16.3} M{:>21.2}x   {}",
            kind.name(),
            rate / 1e6,
            ratio,
            ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    KindTable { kind, rows, four }
}

/// The server's config: pipeline `bench`, no stages, every event to each of the sinks
/// `out1`, `out2`, ... whose table bodies `tables` gives.
fn config_text(tables: &[String]) -> String {
    let names: Vec<String> = (1..=tables.len()).map(|i| format!("\"out{i}\"")).collect();
    let mut text = format!(
        "[listener]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\n[auth]\nanonymous = true\n\n\
         [pipelines.bench]\nsinks = [{}]\n",
        names.join(", ")
    );
    for (i, table) in tables.iter().enumerate() {
        text += &format!("\n[sinks.out{}]\n{table}\n", i + 1);
    }
    text
}

/// Starts a server fanning out to `sinks` sinks of `kind` (and, for `http`, their receivers)
/// in a fresh temporary directory, sends `batches` through it, shuts it down and counts.
async fn run_once(kind: Kind, sinks: usize, batches: &[EncodedBatch], id: u32) -> Result<Run> {
    let dir = tempfile::tempdir().context("a temporary directory for the server")?;
    let mut receivers = Vec::new();
    if kind == Kind::Http {
        for _ in 0..sinks {
            let receiver = Receiver::start(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                ReceiverOptions::default(),
            )
            .await
            .context("starting an HTTP receiver")?;
            receivers.push(receiver);
        }
    }
    let tables: Vec<String> = (1..=sinks)
        .map(|i| match kind {
            Kind::Null => "type = \"null\"".to_owned(),
            Kind::File => format!("type = \"file\"\npath = \"out{i}.jsonl\"\nfsync = \"never\""),
            Kind::Http => format!("type = \"http\"\nurl = \"{}\"", receivers[i - 1].url()),
        })
        .collect();
    let server = start_server(dir.path(), &config_text(&tables)).await?;
    let took = weir_batches(&server, batches, id).await?;
    let report = server.shutdown().await?;
    if !report.problems.is_empty() {
        bail!(
            "{} with {sinks} sinks: the server reported problems: {:?}",
            kind.name(),
            report.problems
        );
    }
    let mut delivered = Vec::with_capacity(sinks);
    for i in 1..=sinks {
        let runner = report
            .stats
            .sinks
            .get(&format!("out{i}"))
            .map_or(0, |s| s.events_out);
        let arrived = match kind {
            Kind::Null => runner,
            Kind::File => lines(&dir.path().join(format!("out{i}.jsonl"))).await?,
            Kind::Http => receivers[i - 1].events(),
        };
        delivered.push((runner, arrived));
    }
    for receiver in receivers {
        receiver.stop().await;
    }
    Ok(Run { took, delivered })
}

/// The number of lines (newlines) in a file.
async fn lines(path: &Path) -> Result<u64> {
    let mut file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut lines = 0u64;
    loop {
        let n = file
            .read(&mut buffer)
            .await
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(lines);
        }
        lines += buffer[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir::workload::WorkloadSpec;

    /// Every sink of every kind and count gets every event: the runner delivers all 1000 and
    /// all 1000 reach the destination (lines in the file, events at the receiver).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_sink_of_every_kind_delivers_every_event() {
        let defaults = WorkloadSpec::default();
        let (_, batches) =
            workload(1000, defaults.value_size, defaults.keys, 128).expect("the workload encodes");
        let mut id = 0;
        for kind in KindChoice::All.kinds() {
            for sinks in SINKS {
                id += 1;
                let run = run_once(kind, sinks, &batches, id)
                    .await
                    .unwrap_or_else(|e| panic!("{} with {sinks} sinks: {e:#}", kind.name()));
                assert_eq!(
                    run.delivered,
                    vec![(1000, 1000); sinks],
                    "{} with {sinks} sinks",
                    kind.name()
                );
                check(kind, sinks, &run, 1000).expect("the counts check");
            }
        }
    }

    #[test]
    fn the_config_fans_out_every_event_to_each_sink() {
        let text = config_text(&["type = \"null\"".into(), "type = \"null\"".into()]);
        let config = weir::config::Config::parse(&text, "/tmp/bench.toml").expect("it parses");
        let pipeline = config.pipeline("bench").expect("pipeline `bench`");
        assert!(pipeline.stages.is_empty());
        let routes: Vec<(&str, &weir::pipeline::route::Condition)> = pipeline
            .sinks
            .iter()
            .map(|r| (r.sink.as_str(), &r.condition))
            .collect();
        assert_eq!(
            routes,
            vec![
                ("out1", &weir::pipeline::route::Condition::All),
                ("out2", &weir::pipeline::route::Condition::All)
            ]
        );
    }

    #[test]
    fn a_missing_event_fails_the_check_naming_the_sink() {
        let run = Run {
            took: Duration::from_secs(1),
            delivered: vec![(10, 10), (10, 9)],
        };
        let error = check(Kind::File, 2, &run, 10).expect_err("one file is short");
        assert_eq!(
            error.to_string(),
            "file with 2 sinks: sink `out2` delivered 10 of 10 events and its destination has 9"
        );
    }
}
