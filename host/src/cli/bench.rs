//! `weir bench PLUGIN.wasm --events N --size B --batch N`: measures a plugin batch by batch on
//! generated events, then native Rust doing the same work over the same batches, in the same
//! run, and prints both with their ratio. `weir bench CRATE_DIR` builds the crate's component
//! and measures it beside the crate's own code built natively (`native_bench.rs`): the same
//! work on both sides, whatever the plugin.
//!
//! The plugin side is what a pipeline pays per batch: the batch verified (as ingest does once),
//! then for a filter [`weir::pipeline::Stage::filter_kept`] (copy in, one call, the keep-bitmap
//! checked: a filter's output is a selection of its input), for the other kinds
//! [`weir::pipeline::Stage::process`] (copy in, one call, the output batch checked). The
//! native side of a component is [`weir::baseline`]: the example plugin of the same kind, which
//! produces the same output (a keep-bitmap, or the output batch) in-process from the verified
//! batch; for another plugin that is other work, and the output says so. Both are timed per batch after a warm-up pass on a separate instance;
//! events/s and ns/event come from the total time, p50/p99 from the per-batch times.
//!
//! `weir bench --e2e` measures ingest over QUIC instead: see `ingest_bench.rs`; `weir bench
//! --fanout` measures fanning out to 1, 2 and 4 sinks: see `fanout_bench.rs`; `weir bench
//! --deploy` measures hot load: see `deploy_bench.rs`; `weir bench --checkpoint` measures what
//! checkpointing aggregate state costs: see `checkpoint_bench.rs`; `weir bench --kafka BROKERS`
//! measures the kafka sink against a plain rdkafka producer: see `kafka_bench.rs`; `weir bench
//! --workers` measures a pipeline on 2 workers against 1: see `workers_bench.rs`.

use super::fanout_bench::KindChoice;
use super::{PluginDir, StageArgs};
use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use weir::baseline::{NativeAggregate, NativeEnrich, NativeFilter};
use weir::runtime::PluginKind;
use weir::workload::WorkloadSpec;
use weir_format::Batch;

/// Arguments of `weir bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The plugin component (.wasm), or a plugin's directory (a Rust crate, a Python or a
    /// JavaScript plugin): its component is built (as `weir build` does) and, for a filter or
    /// an enrich, its own code is also run natively (built for this machine, in CPython, in
    /// Node.js) and timed over the same batches.
    #[arg(required_unless_present_any = ["e2e", "fanout", "deploy", "checkpoint", "kafka", "workers"])]
    plugin: Option<PathBuf>,
    /// Instead of a plugin: ingest over QUIC on loopback, weir (identity plugin, null sink)
    /// against raw quinn sending the same bytes, then weir's ack latency at half its rate.
    #[arg(long, conflicts_with = "plugin")]
    e2e: bool,
    /// Instead of a plugin: fan-out over QUIC on loopback, a pipeline (no stages) into 1, 2
    /// and 4 sinks of `--kind`, each taking every event; events/s and time as a ratio to 1 sink.
    #[arg(long, conflicts_with_all = ["plugin", "e2e"])]
    fanout: bool,
    /// Instead of a plugin: hot load on loopback routers: start time compiling and from the
    /// compile cache, deploy-to-serving time of the example plugins, throughput with and
    /// without a deploy every second, and the pause each swap causes under load.
    #[arg(long, conflicts_with_all = ["plugin", "e2e", "fanout"])]
    deploy: bool,
    /// Instead of a plugin: aggregate checkpoints on loopback routers: throughput of count-sum
    /// with checkpoints against without, and the start time with --windows open windows.
    #[arg(long, conflicts_with_all = ["plugin", "e2e", "fanout", "deploy"])]
    checkpoint: bool,
    /// Instead of a plugin: the kafka sink against a plain rdkafka producer writing the same
    /// records to the broker(s) at BROKERS (`host:port`), in alternating rounds of --events.
    #[arg(long, value_name = "BROKERS", conflicts_with_all = ["plugin", "e2e", "fanout", "deploy", "checkpoint"])]
    kafka: Option<String>,
    /// Instead of a plugin: the pipeline geo-enrich + count-sum on 1 worker and on 2,
    /// in-process: the window results compared, then --events per round through each in
    /// alternating rounds; the throughput ratio.
    #[arg(long, conflicts_with_all = ["plugin", "e2e", "fanout", "deploy", "checkpoint", "kafka"])]
    workers: bool,
    /// With --deploy or --checkpoint: seconds each throughput round lasts.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// With --checkpoint: open windows at the restart.
    #[arg(long, default_value_t = 1_000_000, requires = "checkpoint")]
    windows: u64,
    /// With --fanout: the sinks' kind.
    #[arg(long, value_enum, default_value_t = KindChoice::Null, requires = "fanout")]
    kind: KindChoice,
    /// Number of events to generate.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Size of each event's value in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Events per batch.
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    #[command(flatten)]
    stage: StageArgs,
}

/// The events of an output batch (none when it is not one).
fn events_in(batch: &[u8]) -> usize {
    Batch::verify(batch).map_or(0, |b| b.len())
}

/// Timings of one side.
struct Side {
    total: Duration,
    batches: Histogram<u64>,
    events_out: usize,
}

impl Side {
    fn new() -> Result<Self> {
        Ok(Side {
            total: Duration::ZERO,
            batches: Histogram::new(3).context("histogram")?,
            events_out: 0,
        })
    }

    fn record(&mut self, took: Duration, events_out: usize) -> Result<()> {
        self.total += took;
        self.batches
            .record(took.as_nanos().max(1) as u64)
            .context("recording a batch time")?;
        self.events_out += events_out;
        Ok(())
    }

    fn ns_per_event(&self, events: u64) -> f64 {
        self.total.as_nanos() as f64 / events.max(1) as f64
    }

    fn row(&self, label: &str, events: u64) -> String {
        let rate = events as f64 / self.total.as_secs_f64().max(1e-9);
        format!(
            "  {label:<16}{:>10.2} M{:>12.1}{:>11.1} µs{:>11.1} µs{:>12}",
            rate / 1e6,
            self.ns_per_event(events),
            self.batches.value_at_quantile(0.5) as f64 / 1e3,
            self.batches.value_at_quantile(0.99) as f64 / 1e3,
            self.events_out
        )
    }
}

/// The demo's lookup table; the native enrich's table when `--with table=...` gives none.
pub fn demo_table() -> HashMap<String, String> {
    [
        ("US", "United States"),
        ("FR", "France"),
        ("DE", "Germany"),
        ("JP", "Japan"),
    ]
    .into_iter()
    .map(|(code, name)| (code.to_owned(), name.to_owned()))
    .collect()
}

/// Runs the command.
pub fn run(args: &BenchArgs) -> Result<()> {
    if args.batch == 0 || args.events == 0 {
        bail!("--events and --batch must be at least 1");
    }
    if args.deploy {
        return super::deploy_bench::run(&super::deploy_bench::DeployBenchArgs {
            seconds: args.seconds,
            rounds: super::ingest_bench::ROUNDS,
            size: args.size,
            batch: args.batch,
        });
    }
    if args.checkpoint {
        return super::checkpoint_bench::run(&super::checkpoint_bench::CheckpointBenchArgs {
            seconds: args.seconds,
            rounds: super::ingest_bench::ROUNDS,
            batch: args.batch,
            keys: args.keys,
            windows: args.windows,
        });
    }
    if args.workers {
        return super::workers_bench::run(&super::workers_bench::WorkersBenchArgs {
            events: args.events,
            batch: args.batch,
            keys: args.keys,
            size: args.size,
            rounds: super::ingest_bench::ROUNDS,
        });
    }
    if let Some(brokers) = &args.kafka {
        return super::kafka_bench::run(&super::kafka_bench::KafkaBenchArgs {
            brokers: brokers.clone(),
            events: args.events,
            size: args.size,
            batch: args.batch,
            keys: args.keys,
        });
    }
    if args.fanout {
        return super::fanout_bench::run(&super::fanout_bench::FanoutArgs {
            events: args.events,
            size: args.size,
            batch: args.batch,
            keys: args.keys,
            kind: args.kind,
        });
    }
    let Some(plugin) = &args.plugin else {
        return super::ingest_bench::run(&super::ingest_bench::E2eArgs {
            events: args.events,
            size: args.size,
            batch: args.batch,
            keys: args.keys,
        });
    };
    let spec = WorkloadSpec {
        events: args.events,
        value_size: args.size,
        keys: args.keys,
        ..WorkloadSpec::default()
    };
    let batches = spec.batches(args.batch);
    // A plugin's folder: its component, and its own code to run natively.
    let (component, own_code) = if plugin.is_dir() {
        let own = PluginDir::open(plugin)?;
        (own.compile()?, Some(own))
    } else {
        (plugin.clone(), None)
    };
    let runtime = super::author_runtime()?;
    let plugin = super::load_plugin(&runtime, &component, "bench")?;
    if own_code.is_some() && plugin.kind() == PluginKind::Aggregate {
        bail!(
            "plugin `{}` is an aggregate: `weir bench DIR` runs filters and enrich functions natively, not yet an aggregate's folds (their windows are the host's); bench its component, `weir bench {}`, whose native column is count-sum's work",
            plugin.name(),
            component.display()
        );
    }
    eprintln!(
        "weir bench: {} `{}` {}, {} events of {} B in batches of {}, {} keys",
        plugin.kind(),
        plugin.name(),
        plugin.version(),
        args.events,
        args.size,
        args.batch,
        args.keys
    );

    // Warm-up on its own instance (aggregate state must start empty for the timed pass).
    let mut warm = args.stage.stages(std::slice::from_ref(&plugin))?;
    for batch in batches.iter().take(16) {
        for stage in &mut warm {
            stage.process(batch)?;
        }
    }
    let mut stage = args
        .stage
        .stages(std::slice::from_ref(&plugin))?
        .pop()
        .context("one stage")?;
    let mut wasm = Side::new()?;
    let mut dead = 0;
    // Batches retried event by event, and why the first one was.
    let mut retried: Option<(usize, String)> = None;
    for batch in &batches {
        let start = Instant::now();
        let (out, dead_letters, why) = if plugin.kind() == PluginKind::Filter {
            let view = Batch::verify(batch)?;
            let output = stage.filter_kept(&view, None)?;
            let out = output.batch.map_or(view.len(), |kept| kept.count());
            (out, output.dead_letters.len(), output.retried)
        } else {
            let output = stage.process(batch)?;
            let out = events_in(&output.batch);
            (out, output.dead_letters.len(), output.retried)
        };
        wasm.record(start.elapsed(), out)?;
        dead += dead_letters;
        if let Some(why) = why {
            retried.get_or_insert((0, why)).0 += 1;
        }
    }

    let mut native = Side::new()?;
    if let Some(own) = &own_code {
        let program = match own {
            PluginDir::Rust(dir) => super::native_bench::build(dir)?,
            PluginDir::Python(dir) => {
                super::native_bench::python(dir, &super::build_python::sdk_dir(dir))?
            }
            PluginDir::JavaScript(dir) => super::native_bench::javascript(dir)?,
        };
        let withs = args.stage.withs()?;
        let config = args
            .stage
            .config(&withs, plugin.name(), plugin.name().to_owned())?;
        for (took, out) in super::native_bench::run(&program, &batches, &config.values)? {
            native.record(took, out)?;
        }
        print_sides(&wasm, &native, "native, own code", args.events);
        let how = match own {
            PluginDir::Rust(_) => "built for this machine with the plugin's release profile",
            PluginDir::Python(_) => "run by python3 with the same SDK",
            PluginDir::JavaScript(_) => "run by node with the same SDK",
        };
        println!(
            "  (native: `{}`'s own code in {}, {how}, over the same batches)",
            plugin.name(),
            program.language
        );
        return report(dead, retried, batches.len());
    }
    let (native_of, twin) = match plugin.kind() {
        PluginKind::Filter => ("drop-bots", "drop_bots"),
        PluginKind::Enrich => ("geo-enrich", "geo_enrich"),
        PluginKind::Aggregate => ("count-sum", "count_sum"),
    };
    let table = match args.stage.value("table")? {
        Some(json) => {
            serde_json::from_str(&json).context("--with table: not a table of strings")?
        }
        None => demo_table(),
    };
    let mut enrich = NativeEnrich::new(table);
    let mut aggregate = args.stage.window()?.map(NativeAggregate::new);
    for batch in &batches {
        let start = Instant::now();
        let view = Batch::verify(batch)?;
        let out = match (plugin.kind(), aggregate.as_mut()) {
            (PluginKind::Filter, _) => NativeFilter::bitmap(&view).count(),
            (PluginKind::Enrich, _) => events_in(&enrich.process(&view)),
            (PluginKind::Aggregate, Some(aggregate)) => events_in(&aggregate.process(&view)),
            (PluginKind::Aggregate, None) => bail!("an aggregate needs --window"),
        };
        native.record(start.elapsed(), out)?;
    }

    print_sides(&wasm, &native, "native Rust", args.events);
    if plugin.name() == twin {
        println!("  (native: {native_of}'s work as a Rust closure, see weir::baseline)");
    } else {
        println!(
            "  (native: {native_of}'s work as a Rust closure, not this plugin's: `weir bench CRATE_DIR` on the plugin's crate times its own code natively)"
        );
    }
    report(dead, retried, batches.len())
}

/// The table: the plugin's row, the native row (labelled `native`), their ratio.
fn print_sides(wasm: &Side, native: &Side, label: &str, events: u64) {
    println!(
        "  {:<16}{:>12}{:>12}{:>14}{:>14}{:>12}",
        "", "events/s", "ns/event", "batch p50", "batch p99", "events out"
    );
    println!("{}", wasm.row("plugin (wasm)", events));
    println!("{}", native.row(label, events));
    println!(
        "  wasm / native: {:.2}x",
        wasm.ns_per_event(events) / native.ns_per_event(events).max(1e-9)
    );
}

/// What the component failed on, and the batches it ran event by event.
fn report(dead: usize, retried: Option<(usize, String)>, batches: usize) -> Result<()> {
    if dead > 0 {
        println!("  dead letters: {dead} (the plugin failed on these events; see the log)");
    }
    if let Some((count, why)) = retried {
        let pct = 100.0 * count as f64 / batches.max(1) as f64;
        println!(
            "  WARNING: {count} of {batches} batches ({pct:.1}%) failed as a whole and were retried event by event, one call per event (the first: {why}); the wasm figures above include those retries; {}",
            super::test::RETRY_ADVICE
        );
    }
    Ok(())
}
