//! `weir demo`: the example plugins over a generated workload, with no setup.
//!
//! A chain of the three example plugins embedded in the binary: drop-bots (filter) →
//! geo-enrich (enrich, with a lookup table) → count-sum (aggregate, tumbling one-minute
//! windows), over generated clickstream events. It prints what each stage took in and gave
//! out, the first window results, and writes every result to a JSON-lines file.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use weir::examples;
use weir::pipeline::{Stage, StageOutput, WindowConfig};
use weir::runtime::{Runtime, RuntimeConfig, StageConfig};
use weir::workload::WorkloadSpec;
use weir_format::Batch;
use weir_format::json::event_ref_to_line;

/// Arguments of `weir demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Number of events to generate.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Where to write the window results (default: weir-demo/windows.jsonl in the temp dir).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Per-stage counters. A stage's output count is derived: the next stage's input, or the
/// results written for the last stage.
#[derive(Default)]
struct Counts {
    events_in: usize,
    dead: usize,
    late: usize,
    time: Duration,
}

/// The window results: all of them to the file, the first few kept for the screen.
struct Results {
    out: std::io::BufWriter<std::fs::File>,
    first: Vec<String>,
    written: usize,
}

impl Results {
    fn write(&mut self, batch: &[u8]) -> Result<()> {
        for event in Batch::verify(batch)?.iter() {
            let line = event_ref_to_line(&event);
            writeln!(self.out, "{line}").context("writing the window results")?;
            if self.first.len() < 5 {
                self.first.push(line);
            }
            self.written += 1;
        }
        Ok(())
    }
}

fn count(output: &StageOutput, counts: &mut Counts) {
    counts.dead += output.dead_letters.len();
    counts.late += output.late.len();
}

/// Runs the command.
pub fn run(args: &DemoArgs) -> Result<()> {
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let table = super::bench::demo_table();
    let mut stages = [
        Stage::new(
            &runtime.load_bytes("drop_bots", examples::DROP_BOTS)?,
            StageConfig::new("drop_bots"),
            None,
        )?,
        Stage::new(
            &runtime.load_bytes("geo_enrich", examples::GEO_ENRICH)?,
            StageConfig::new("geo_enrich").with("table", serde_json::to_value(&table)?),
            None,
        )?,
        Stage::new(
            &runtime.load_bytes("count_sum", examples::COUNT_SUM)?,
            StageConfig::new("count_sum"),
            Some(WindowConfig::tumbling(Duration::from_secs(60))),
        )?,
    ];
    let spec = WorkloadSpec {
        events: args.events,
        ..WorkloadSpec::default()
    };
    println!(
        "weir demo: {} generated clickstream events ({} B values, {} users, one every 10 ms of event time)",
        spec.events, spec.value_size, spec.keys
    );
    println!(
        "pipeline: drop_bots (filter) -> geo_enrich (enrich) -> count_sum (aggregate, tumbling:60s)"
    );

    let out_path = match &args.out {
        Some(path) => path.clone(),
        None => std::env::temp_dir().join("weir-demo").join("windows.jsonl"),
    };
    if let Some(dir) = out_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let file = std::fs::File::create(&out_path)
        .with_context(|| format!("cannot create {}", out_path.display()))?;
    let mut results = Results {
        out: std::io::BufWriter::new(file),
        first: Vec::new(),
        written: 0,
    };

    let mut counts: Vec<Counts> = stages.iter().map(|_| Counts::default()).collect();
    let batches = spec.batches(1024);
    let started = Instant::now();
    for batch in batches {
        let mut input = batch;
        for (stage, counts) in stages.iter_mut().zip(counts.iter_mut()) {
            // Verified once: for the count and for the stage.
            let view = Batch::verify(&input)?;
            counts.events_in += view.len();
            let start = Instant::now();
            let output = stage.process_batch(&view)?;
            counts.time += start.elapsed();
            count(&output, counts);
            input = output.batch;
        }
        results.write(&input)?;
    }
    // End of input: the aggregate finishes its open windows.
    let last = stages.len() - 1;
    let flushed = stages[last].flush()?;
    count(&flushed, &mut counts[last]);
    results.write(&flushed.batch)?;
    results.out.flush().context("writing the window results")?;
    let elapsed = started.elapsed();

    println!();
    println!(
        "  {:<12}{:>10}{:>10}{:>8}{:>8}{:>12}",
        "stage", "in", "out", "dead", "late", "time"
    );
    let outs = counts.iter().skip(1).map(|c| c.events_in);
    let outs: Vec<usize> = outs.chain([results.written]).collect();
    for ((stage, c), events_out) in stages.iter().zip(&counts).zip(outs) {
        println!(
            "  {:<12}{:>10}{:>10}{:>8}{:>8}{:>9.1} ms",
            stage.name(),
            c.events_in,
            events_out,
            c.dead,
            c.late,
            c.time.as_secs_f64() * 1e3
        );
    }
    println!();
    println!("first window results:");
    for line in &results.first {
        println!("  {line}");
    }
    println!();
    println!(
        "{} events through 3 plugins in {:.1} ms ({:.2} M events/s); {} window results in {}",
        spec.events,
        elapsed.as_secs_f64() * 1e3,
        spec.events as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6,
        results.written,
        out_path.display()
    );
    Ok(())
}
