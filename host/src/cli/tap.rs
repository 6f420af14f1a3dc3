//! `weir tap PIPELINE[/STAGE]`: the events leaving a running router's pipeline (what it fans
//! out to its sinks) or one of its stages, live, as JSON lines on stdout, from its admin
//! endpoint (`GET /v1/tap`).
//!
//! The router never waits for a tap: when this reader falls behind, the router drops what it
//! cannot queue and says how many; `weir tap` reports that on stderr, so stdout holds events
//! only. `--sample N` prints every Nth event, `--limit N` stops after N.

use super::AdminArgs;
use anyhow::{Context, Result, bail};
use std::io::Write as _;

/// Arguments of `weir tap`.
#[derive(Debug, clap::Args)]
pub struct TapArgs {
    /// `PIPELINE` (what it fans out to its sinks) or `PIPELINE/STAGE` (what that stage outputs).
    target: String,
    /// Print every Nth event.
    #[arg(long, value_name = "N", default_value_t = 1)]
    sample: u64,
    /// Stop after N events.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    #[command(flatten)]
    admin: AdminArgs,
}

/// Runs the command.
pub fn run(args: &TapArgs) -> Result<()> {
    if args.sample == 0 {
        bail!("--sample must be at least 1");
    }
    let (pipeline, stage) = match args.target.split_once('/') {
        Some((p, s)) => (p, Some(s)),
        None => (args.target.as_str(), None),
    };
    if pipeline.is_empty() || stage.is_some_and(str::is_empty) {
        bail!(
            "`{}`: name a pipeline, or a pipeline and a stage as PIPELINE/STAGE",
            args.target
        );
    }
    let client = args.admin.client()?;
    let runtime = super::admin_runtime()?;
    runtime.block_on(async {
        let mut tap = client.tap(pipeline, stage, args.sample).await?;
        eprintln!(
            "weir tap: events leaving {} at {}, as JSON lines (Ctrl-C stops)",
            args.target,
            client.addr()
        );
        let mut lines = Lines::default();
        let mut out = std::io::stdout().lock();
        let mut printed = 0u64;
        while let Some(chunk) = tap.next().await? {
            for line in lines.take(&chunk) {
                if let Some(dropped) = dropped(&line) {
                    eprintln!(
                        "weir tap: {dropped} events not shown here: this reader fell behind (the pipeline did not wait)"
                    );
                    continue;
                }
                if args.limit.is_some_and(|limit| printed >= limit) {
                    return Ok(());
                }
                if let Err(e) = writeln!(out, "{line}") {
                    return quiet_on_broken_pipe(e);
                }
                printed += 1;
            }
            if let Err(e) = out.flush() {
                return quiet_on_broken_pipe(e);
            }
            if args.limit.is_some_and(|limit| printed >= limit) {
                return Ok(());
            }
        }
        eprintln!("weir tap: the router ended the tap (it is stopping, or a reload removed the pipeline)");
        Ok(())
    })
}

/// A reader that went away (`weir tap … | head`) ends the tap; any other write error is one.
fn quiet_on_broken_pipe(e: std::io::Error) -> Result<()> {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(e).context("writing to stdout")
    }
}

/// The count in a `{"tap":{"dropped":N}}` line (an event's line starts with its `key` or
/// `value`).
fn dropped(line: &str) -> Option<u64> {
    if !line.starts_with("{\"tap\":") {
        return None;
    }
    let notice: serde_json::Value = serde_json::from_str(line).ok()?;
    notice.get("tap")?.get("dropped")?.as_u64()
}

/// Whole lines out of pieces of a stream.
#[derive(Default)]
struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    fn take(&mut self, chunk: &[u8]) -> Vec<String> {
        self.partial.extend_from_slice(chunk);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        let rest = self.partial.split_off(end + 1);
        let whole = std::mem::replace(&mut self.partial, rest);
        String::from_utf8_lossy(&whole)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_whole_across_pieces_and_dropped_notices_are_told_apart() {
        let mut lines = Lines::default();
        assert!(lines.take(b"{\"value\":1,").is_empty());
        assert_eq!(
            lines.take(b"\"timestamp\":0}\n{\"tap\":{\"dropped\":7}}\n{\"va"),
            ["{\"value\":1,\"timestamp\":0}", "{\"tap\":{\"dropped\":7}}"]
        );
        assert_eq!(lines.take(b"lue\":2}\n"), ["{\"value\":2}"]);
        assert_eq!(dropped("{\"tap\":{\"dropped\":7}}"), Some(7));
        assert_eq!(dropped("{\"value\":{\"tap\":1}}"), None);
        assert_eq!(dropped("{\"value\":1}"), None);
    }
}
