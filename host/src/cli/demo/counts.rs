//! The counts `weir demo` shows, live while it streams and in its summary: per stage what it
//! took in, passed on, dropped and dead-lettered (the server's metrics), per sink what it
//! delivered, dropped, buffers and dead-lettered (the server's stats).

use std::fmt::Write as _;
use weir::config::Config;
use weir::metrics::{Metrics, SinkMetrics, StageMetrics};
use weir::server::Stats;
use weir::sinks::SinkKind;

/// One stage, as the table shows it.
struct StageRow {
    /// `PIPELINE/STAGE`.
    label: String,
    pipeline: String,
    /// Whether it is its pipeline's last stage.
    last: bool,
    /// Whether it is an aggregate (it folds events into windows: "dropped" means nothing).
    aggregate: bool,
    metrics: StageMetrics,
}

/// The stages and sinks of a running demo router, and the handles to read their counts.
pub(super) struct Table {
    stages: Vec<StageRow>,
    /// Sink names: the configured ones in file order, then each pipeline's dead-letter file.
    sinks: Vec<String>,
    /// The sinks that write to standard output.
    stdout_sinks: Vec<SinkMetrics>,
}

impl Table {
    /// The table of `config`'s pipelines and sinks, read from `metrics`.
    pub fn new(config: &Config, metrics: &Metrics) -> Table {
        let mut stages = Vec::new();
        for pipeline in &config.pipelines {
            for (i, stage) in pipeline.stages.iter().enumerate() {
                stages.push(StageRow {
                    label: format!("{}/{}", pipeline.name, stage.name),
                    pipeline: pipeline.name.clone(),
                    last: i + 1 == pipeline.stages.len(),
                    aggregate: stage.window.is_some(),
                    metrics: metrics.stage(&pipeline.name, &stage.name),
                });
            }
        }
        let mut sinks: Vec<String> = config.sinks.iter().map(|s| s.name.clone()).collect();
        sinks.extend(
            config
                .pipelines
                .iter()
                .filter(|p| p.dead_letters.is_none())
                .map(|p| format!("{}/dead-letters", p.name)),
        );
        let stdout_sinks = config
            .sinks
            .iter()
            .filter(|s| matches!(s.kind, SinkKind::Stdout))
            .map(|s| metrics.sink(&s.name))
            .collect();
        Table {
            stages,
            sinks,
            stdout_sinks,
        }
    }

    /// Whether a sink holds events for standard output that it has not written yet.
    pub fn stdout_pending(&self) -> bool {
        self.stdout_sinks.iter().any(|m| {
            m.events_in.get() > m.events_out.get() + m.dropped.get() + m.dead_lettered.get()
        })
    }

    /// The table as text, one row per stage and per sink, each line indented by two spaces.
    ///
    /// The last stage's `out` is what its pipeline fanned out (`stats`), which also counts the
    /// windows an aggregate flushes at shutdown.
    pub fn render(&self, stats: &Stats) -> String {
        let width = self
            .stages
            .iter()
            .map(|s| s.label.len())
            .chain(self.sinks.iter().map(String::len))
            .max()
            .unwrap_or(0)
            .max("stage".len());
        let mut text = String::new();
        let mut row = |label: &str, cells: [String; 4]| {
            let [a, b, c, d] = cells;
            // Writing to a String cannot fail.
            let _ = writeln!(text, "  {label:<width$} {a:>10} {b:>10} {c:>10} {d:>14}");
        };
        row(
            "stage",
            ["in", "out", "dropped", "dead-lettered"].map(String::from),
        );
        for stage in &self.stages {
            let m = &stage.metrics;
            let out = match stats.pipelines.get(&stage.pipeline) {
                Some(p) if stage.last => p.events_out,
                _ => m.events_out.get(),
            };
            let dropped = if stage.aggregate {
                "-".to_owned()
            } else {
                m.dropped.get().to_string()
            };
            row(
                &stage.label,
                [
                    m.events_in.get().to_string(),
                    out.to_string(),
                    dropped,
                    m.errors.get().to_string(),
                ],
            );
        }
        row(
            "sink",
            ["delivered", "dropped", "buffered", "dead-lettered"].map(String::from),
        );
        for name in &self.sinks {
            let s = stats.sinks.get(name).cloned().unwrap_or_default();
            row(
                name,
                [s.events_out, s.dropped, s.buffered, s.dead_lettered].map(|n| n.to_string()),
            );
        }
        text
    }
}
