//! `weir test PLUGIN.wasm... --input events.jsonl`: runs one plugin or a chain over JSON-lines
//! events and prints the output events as JSON lines on stdout.
//!
//! The input is read and checked whole before any plugin runs, so a malformed line fails the
//! run (naming the file and line) without partial output. Events are cut into batches of
//! `--batch`. Dead letters and late events go to stderr, each naming the stage, plugin, version
//! and (for the first stage) the input line; a summary line closes the run, and a warning for
//! each stage whose batches failed as a whole and ran event by event. Dead letters are
//! the plugin's failures on particular events, not a failure of the run: the exit code is 0.

use super::StageArgs;
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use weir::pipeline::{Chain, ChainOutput, Stage};
use weir::utc::now_ms;
use weir_format::json::{event_ref_to_line, event_to_line, parse_line};
use weir_format::{Batch, BatchBuilder, Event};

/// Arguments of `weir test`.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Plugin components (.wasm), run as a chain in this order.
    #[arg(required = true)]
    plugins: Vec<PathBuf>,
    /// JSON-lines input (`-` for stdin); the mapping is in docs/PLUGINS.md.
    #[arg(long, short)]
    input: PathBuf,
    /// Events per batch.
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    #[command(flatten)]
    stage: StageArgs,
}

/// Reads and checks every input line; each event comes with its line number.
fn read_input(path: &Path) -> Result<Vec<(usize, Event)>> {
    let reader: Box<dyn BufRead> = if path == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open input {}", path.display()))?;
        Box::new(std::io::BufReader::new(file))
    };
    let default_ms = now_ms();
    let mut events = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let text = line.with_context(|| format!("{}:{line_no}: cannot read", path.display()))?;
        if text.trim().is_empty() {
            continue;
        }
        let event = parse_line(&text, default_ms)
            .map_err(|message| anyhow::anyhow!("{}:{line_no}: {message}", path.display()))?;
        events.push((line_no, event));
    }
    Ok(events)
}

/// Runs the command.
pub fn run(args: &TestArgs) -> Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let input = read_input(&args.input)?;
    let runtime = super::author_runtime()?;
    let plugins = args
        .plugins
        .iter()
        .map(|path| super::load_plugin(&runtime, path, "test"))
        .collect::<Result<Vec<_>>>()?;
    let mut chain = Chain::new(args.stage.stages(&plugins)?);
    let first_stage = chain.stages().first().map(|s| s.name().to_owned());

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut report = Report::default();
    let mut builder = BatchBuilder::new();
    for chunk in input.chunks(args.batch) {
        for (_, event) in chunk {
            builder.push(event);
        }
        let batch = builder.finish();
        let output = chain.process(&batch)?;
        let lines: Vec<usize> = chunk.iter().map(|(line, _)| *line).collect();
        report.record(
            &output,
            &batch,
            &mut out,
            |stage, index| {
                (Some(stage) == first_stage.as_deref())
                    .then(|| lines.get(index).copied())
                    .flatten()
            },
            &args.input,
        )?;
    }
    let flushed = chain.flush()?;
    report.record(&flushed, &[], &mut out, |_, _| None, &args.input)?;
    out.flush().context("writing output")?;
    warn_retried(chain.stages(), &report);
    eprintln!(
        "weir test: {} events in, {} out, {} dead-lettered, {} late ({} stage{})",
        input.len(),
        report.out,
        report.dead,
        report.late,
        chain.stages().len(),
        if chain.stages().len() == 1 { "" } else { "s" }
    );
    Ok(())
}

/// Counts and prints what came out of the chain.
#[derive(Default)]
struct Report {
    out: usize,
    dead: usize,
    late: usize,
    /// Per stage index: its calls (a batch, or the flush at the end of input).
    calls: BTreeMap<usize, usize>,
    /// Per stage index: calls retried event by event, and why the first one was.
    retried: BTreeMap<usize, (usize, String)>,
}

impl Report {
    /// `batch`: what the chain was given (a flush was given nothing).
    fn record(
        &mut self,
        output: &ChainOutput,
        batch: &[u8],
        out: &mut impl Write,
        line_of: impl Fn(&str, usize) -> Option<usize>,
        input: &Path,
    ) -> Result<()> {
        let events = output.events.to_batch(batch);
        let batch = Batch::verify(&events).context("chain output")?;
        for event in batch.iter() {
            writeln!(out, "{}", event_ref_to_line(&event)).context("writing output")?;
        }
        self.out += batch.len();
        for dead in &output.dead_letters {
            let place = match line_of(&dead.stage, dead.index) {
                Some(line) => format!("{}:{line}", input.display()),
                None => format!("event {} of the stage's batch", dead.index),
            };
            eprintln!(
                "dead letter: stage `{}` (plugin `{}` {}), {place}: {}\n  event: {}",
                dead.stage,
                dead.plugin,
                dead.version,
                dead.error,
                event_to_line(&dead.event)
            );
        }
        self.dead += output.dead_letters.len();
        for late in &output.late {
            let place = match line_of(&late.stage, late.index) {
                Some(line) => format!("{}:{line}", input.display()),
                None => format!("event {} of the stage's batch", late.index),
            };
            eprintln!(
                "late event: stage `{}`, {place}: every window it belongs to had finished\n  event: {}",
                late.stage,
                event_to_line(&late.event)
            );
        }
        self.late += output.late.len();
        for run in &output.runs {
            // A flush with no window to finish calls no plugin.
            if run.events_in + run.events_out + run.failed > 0 || run.retried.is_some() {
                *self.calls.entry(run.stage).or_default() += 1;
            }
            if let Some(why) = &run.retried {
                self.retried
                    .entry(run.stage)
                    .or_insert_with(|| (0, why.clone()))
                    .0 += 1;
            }
        }
        Ok(())
    }
}

/// Says loudly, for each stage whose calls failed as a whole and were retried event by event,
/// how many and why: every event came out, but at the speed of one call per event.
fn warn_retried(stages: &[Stage], report: &Report) {
    for (stage, (count, why)) in &report.retried {
        let Some(name) = stages.get(*stage).map(Stage::name) else {
            continue;
        };
        let calls = report.calls.get(stage).copied().unwrap_or(*count);
        eprintln!(
            "warning: stage `{name}`: {count} of {calls} calls failed as a whole and were retried event by event, one call per event (the first: {why}); {}",
            RETRY_ADVICE
        );
    }
}

/// What to do about batches that run event by event, after the first reason.
pub(super) const RETRY_ADVICE: &str = "a batch that fails as a whole every time (one too big for the stage's deadline or memory cap) runs event by event every time: give the stage a longer deadline (--deadline-ms), more memory (--memory-mib) or smaller batches (--batch)";
