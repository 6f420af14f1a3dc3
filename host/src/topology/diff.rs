//! What a new config changes of a running one, component by component: the plan a reload
//! follows (`reload.rs`) and what `weir reload` prints. Pure: configs in, a diff out; whether
//! a stage's plugin file changed on disk is the caller's to say.
//!
//! Decisions (docs/SERVE.md, "Reloading the config", has the user's view):
//!
//! - **Sinks** are added, removed, or changed in place: a sink whose destination, buffer limits
//!   or retries change keeps its buffer (and disk buffer) and delivers it to the new
//!   destination, so the pipelines writing to it never notice. A sink whose `when_full` changes
//!   is replaced (another policy is another buffer): the pipelines writing to it get new
//!   outputs, and the old one delivers what it holds.
//! - **Pipelines** are added or removed; a changed one is changed in the smallest way that
//!   keeps its state: a stage whose plugin, `with` values or limits change is swapped, as a
//!   deploy swaps it (window state carries over); new routes, `unmatched`, dead-letter sink or
//!   version header are new outputs from the next round on; a new producer list applies to
//!   connections made from then on. Only a change of its stages' shape (a stage added,
//!   removed, renamed or moved, a window changed) restarts it: the old one finishes what it
//!   took and flushes its windows, and the new one goes on from there.
//! - **What cannot change live** (the listener's address, TLS and limits, the data directory,
//!   the metrics and admin endpoints) is reported as needing a restart, and left as it is.

use crate::config::Config;
use crate::pipeline::config::{PipelineConfig, StageSpec};
use std::fmt;

/// What changes of one stage that stays where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageChange {
    /// The stage's name.
    pub stage: String,
    /// What changed: `plugin`, `with`, `limits`.
    pub what: Vec<&'static str>,
}

/// What changes of one pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipelineChange {
    /// A new pipeline.
    Added(String),
    /// A pipeline that is no more.
    Removed(String),
    /// Its stages changed shape: it is restarted.
    Restarted {
        /// The pipeline.
        name: String,
        /// Why, for the report.
        why: String,
    },
    /// Changed in place.
    Changed {
        /// The pipeline.
        name: String,
        /// Stages swapped.
        stages: Vec<StageChange>,
        /// New outputs: its routes, `unmatched`, dead-letter sink or version header changed, or
        /// a sink it writes to is replaced.
        outputs: bool,
        /// Its producer list changed.
        producers: bool,
    },
}

impl PipelineChange {
    /// The pipeline's name.
    pub fn name(&self) -> &str {
        match self {
            PipelineChange::Added(name) | PipelineChange::Removed(name) => name,
            PipelineChange::Restarted { name, .. } | PipelineChange::Changed { name, .. } => name,
        }
    }
}

/// What changes of one sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkChange {
    /// A new sink.
    Added(String),
    /// A sink that is no more.
    Removed(String),
    /// New destination, limits or retries; same policy: changed in place.
    Reconfigured(String),
    /// Another `when_full`: replaced.
    Replaced(String),
}

impl SinkChange {
    /// The sink's name.
    pub fn name(&self) -> &str {
        match self {
            SinkChange::Added(name)
            | SinkChange::Removed(name)
            | SinkChange::Reconfigured(name)
            | SinkChange::Replaced(name) => name,
        }
    }
}

/// Everything a new config changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigDiff {
    /// Sinks, in the new config's order (removed ones last).
    pub sinks: Vec<SinkChange>,
    /// Pipelines, in the new config's order (removed ones last).
    pub pipelines: Vec<PipelineChange>,
    /// The producers' tokens or `anonymous` changed (for connections made from now on).
    pub producers: bool,
    /// Changes left alone until a restart, each saying what and how.
    pub restart: Vec<String>,
}

impl ConfigDiff {
    /// What `new` changes of `old`. `plugin_changed(pipeline, stage)` says whether the plugin
    /// a stage of `new` names differs from the one its running version came from (the file's
    /// content may change under the same path).
    pub fn new(
        old: &Config,
        new: &Config,
        plugin_changed: impl Fn(&str, &StageSpec) -> bool,
    ) -> ConfigDiff {
        let mut diff = ConfigDiff::default();
        for sink in &new.sinks {
            match old.sinks.iter().find(|s| s.name == sink.name) {
                None => diff.sinks.push(SinkChange::Added(sink.name.clone())),
                Some(before) if before == sink => {}
                Some(before) if before.buffer.when_full == sink.buffer.when_full => {
                    diff.sinks.push(SinkChange::Reconfigured(sink.name.clone()));
                }
                Some(_) => diff.sinks.push(SinkChange::Replaced(sink.name.clone())),
            }
        }
        for sink in &old.sinks {
            if !new.sinks.iter().any(|s| s.name == sink.name) {
                diff.sinks.push(SinkChange::Removed(sink.name.clone()));
            }
        }
        let replaced: Vec<&str> = diff
            .sinks
            .iter()
            .filter_map(|c| match c {
                SinkChange::Replaced(name) => Some(name.as_str()),
                _ => None,
            })
            .collect();
        for pipeline in &new.pipelines {
            let change = match old.pipeline(&pipeline.name) {
                None => Some(PipelineChange::Added(pipeline.name.clone())),
                Some(before) => pipeline_change(before, pipeline, &replaced, &plugin_changed),
            };
            diff.pipelines.extend(change);
        }
        for pipeline in &old.pipelines {
            if new.pipeline(&pipeline.name).is_none() {
                diff.pipelines
                    .push(PipelineChange::Removed(pipeline.name.clone()));
            }
        }
        let (a, b) = (&old.listener, &new.listener);
        diff.producers = a.producers != b.producers || a.allow_anonymous != b.allow_anonymous;
        let mut restart = |what: &str, changed: bool, from: String, to: String| {
            if changed {
                diff.restart.push(format!("{what}: {from} → {to}"));
            }
        };
        restart(
            "[listener] listen",
            a.listen != b.listen,
            a.listen.to_string(),
            b.listen.to_string(),
        );
        restart(
            "[listener] data_dir",
            old.data_dir != new.data_dir,
            old.data_dir.display().to_string(),
            new.data_dir.display().to_string(),
        );
        restart(
            "[tls]",
            a.tls != b.tls,
            "the certificate or client CA".into(),
            "others".into(),
        );
        restart(
            "[limits]",
            a.limits != b.limits,
            "the limits".into(),
            "others".into(),
        );
        let endpoint = |addr: Option<String>| addr.unwrap_or_else(|| "none".into());
        restart(
            "[metrics] listen",
            old.metrics != new.metrics,
            endpoint(old.metrics.map(|a| a.to_string())),
            endpoint(new.metrics.map(|a| a.to_string())),
        );
        restart(
            "[admin]",
            old.admin != new.admin,
            endpoint(old.admin.as_ref().map(|a| a.listen.to_string())),
            endpoint(new.admin.as_ref().map(|a| a.listen.to_string())),
        );
        let mut names: Vec<&str> = old
            .sources
            .iter()
            .chain(&new.sources)
            .map(|s| s.name())
            .collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            let find = |config: &Config| config.sources.iter().position(|s| s.name() == name);
            let what = match (find(old), find(new)) {
                (Some(a), Some(b)) if old.sources[a] != new.sources[b] => "changed",
                (Some(_), None) => "removed",
                (None, Some(_)) => "added",
                _ => continue,
            };
            diff.restart.push(format!("[sources.{name}]: {what}"));
        }
        diff
    }

    /// Whether the new config changes nothing at all.
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
            && self.pipelines.is_empty()
            && !self.producers
            && self.restart.is_empty()
    }

    /// The change of sink `name`, if it changes.
    pub fn sink(&self, name: &str) -> Option<&SinkChange> {
        self.sinks.iter().find(|c| c.name() == name)
    }
}

fn pipeline_change(
    old: &PipelineConfig,
    new: &PipelineConfig,
    replaced: &[&str],
    plugin_changed: &impl Fn(&str, &StageSpec) -> bool,
) -> Option<PipelineChange> {
    let names = |p: &PipelineConfig| p.stages.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    let (before, after) = (names(old), names(new));
    if before != after {
        let list = |names: &[String]| {
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        };
        return Some(PipelineChange::Restarted {
            name: new.name.clone(),
            why: format!("stages {} → {}", list(&before), list(&after)),
        });
    }
    if let Some((a, _)) = old
        .stages
        .iter()
        .zip(&new.stages)
        .find(|(a, b)| a.window != b.window)
    {
        return Some(PipelineChange::Restarted {
            name: new.name.clone(),
            why: format!("stage `{}`: another window", a.name),
        });
    }
    if old.workers != new.workers {
        return Some(PipelineChange::Restarted {
            name: new.name.clone(),
            why: format!("workers {} → {}", old.workers, new.workers),
        });
    }
    let stages: Vec<StageChange> = old
        .stages
        .iter()
        .zip(&new.stages)
        .filter_map(|(a, b)| {
            let mut what = Vec::new();
            if a.plugin != b.plugin || plugin_changed(&new.name, b) {
                what.push("plugin");
            }
            if a.with != b.with {
                what.push("with");
            }
            if (a.memory_bytes, a.deadline) != (b.memory_bytes, b.deadline) {
                what.push("limits");
            }
            (!what.is_empty()).then(|| StageChange {
                stage: b.name.clone(),
                what,
            })
        })
        .collect();
    let uses_replaced = replaced.iter().any(|sink| {
        new.sinks.iter().any(|r| r.sink == *sink)
            || new.unmatched == crate::pipeline::route::Unmatched::Sink((*sink).to_owned())
            || new.dead_letters.as_deref() == Some(*sink)
    });
    let outputs = old.sinks != new.sinks
        || old.unmatched != new.unmatched
        || old.dead_letters != new.dead_letters
        || old.version_header != new.version_header
        || uses_replaced;
    let producers = old.producers != new.producers;
    (!stages.is_empty() || outputs || producers).then(|| PipelineChange::Changed {
        name: new.name.clone(),
        stages,
        outputs,
        producers,
    })
}

impl fmt::Display for SinkChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SinkChange::Added(name) => write!(f, "sink `{name}`: added"),
            SinkChange::Removed(name) => write!(f, "sink `{name}`: removed"),
            SinkChange::Reconfigured(name) => {
                write!(
                    f,
                    "sink `{name}`: changed in place (its buffer carries over)"
                )
            }
            SinkChange::Replaced(name) => write!(
                f,
                "sink `{name}`: replaced (another when_full; the old one delivers what it holds)"
            ),
        }
    }
}

impl fmt::Display for PipelineChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PipelineChange::Added(name) => write!(f, "pipeline `{name}`: added"),
            PipelineChange::Removed(name) => write!(f, "pipeline `{name}`: removed"),
            PipelineChange::Restarted { name, why } => {
                write!(f, "pipeline `{name}`: restarted ({why})")
            }
            PipelineChange::Changed {
                name,
                stages,
                outputs,
                producers,
            } => {
                let mut parts: Vec<String> = stages
                    .iter()
                    .map(|s| format!("stage `{}` swapped ({})", s.stage, s.what.join(", ")))
                    .collect();
                if *outputs {
                    parts.push("new outputs".into());
                }
                if *producers {
                    parts.push("new producer list".into());
                }
                write!(f, "pipeline `{name}`: {}", parts.join("; "))
            }
        }
    }
}

impl fmt::Display for ConfigDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "no changes");
        }
        for change in &self.sinks {
            writeln!(f, "{change}")?;
        }
        for change in &self.pipelines {
            writeln!(f, "{change}")?;
        }
        if self.producers {
            writeln!(
                f,
                "producers: new tokens or `anonymous` (for new connections)"
            )?;
        }
        for restart in &self.restart {
            writeln!(f, "needs a restart, not applied: {restart}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
