//! [`Stage`]: one plugin instance and its stage config, for one worker; runs a batch through
//! the plugin and isolates poison events.
//!
//! Decisions:
//!
//! - **Poison isolation** (DESIGN §4). When the batch call fails with an event failure (a trap,
//!   the deadline, the memory cap, the plugin's `Err`, or output that does not verify), the
//!   instance is recycled and the batch is retried **event by event**, each event as a batch of
//!   one. Events that fail alone become [`DeadLetter`]s (original event, its index in the
//!   input, the error, plugin name and version, stage); every other event's output is
//!   delivered, in input order. Errors that are not about the batch (the plugin's `init`
//!   refusing its config on recycle, the pool exhausted) are returned as `Err`: the stage
//!   cannot run, and the caller decides what happens to the batch.
//! - **Filter output** is the kept events re-encoded into a new batch (`source` = the event's
//!   index in this stage's input); when every event is kept, the input bytes are passed on as
//!   they are, and when none is, the output is an empty batch. The bitmap itself is available
//!   without re-encoding through [`Stage::filter_bitmap`] (benchmarks).
//! - **Enrich output** is the plugin's batch as it returned it (verified). After isolation, the
//!   per-event outputs are re-encoded into one batch with `source` pointing at the original
//!   input index.
//! - **Aggregate** (see `window.rs` for the watermark rule): plan the batch's events into
//!   (key, window) groups against the host-held [`WindowState`], `fold` with the current
//!   accumulators, commit the new accumulators and the event time only when the fold
//!   succeeded, then `finish` every window the watermark has passed. Late events are returned
//!   in [`StageOutput::late`], not folded. Isolation applies to `fold` (per event, committing
//!   each success) and to `finish` (per window; a window whose `finish` fails is a dead letter
//!   carrying its key and accumulator, and is dropped from the state).
//! - An empty batch calls no plugin.

use super::window::{Plan, WindowConfig, WindowId, WindowState};
use crate::runtime::{Group, Instance, Plugin, PluginError, PluginKind, StageConfig, Window};
use weir_format::{Batch, BatchBuilder, Event, EventRef, KeepBitmap};

/// An event a stage could not process, with why and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The event as it entered the stage. For a window whose `finish` failed: key = the
    /// window's key, value = its accumulator, timestamp = the window's start.
    pub event: Event,
    /// The event's index in the stage's input batch (for a window: its index among the
    /// windows finished together).
    pub index: usize,
    /// Set when a window's `finish` failed rather than an event.
    pub window: Option<WindowId>,
    /// The error, as text.
    pub error: String,
    /// The plugin's name.
    pub plugin: String,
    /// The plugin's version.
    pub version: String,
    /// The stage's name.
    pub stage: String,
}

/// An event that arrived after every window it belongs to had finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LateEvent {
    /// The event.
    pub event: Event,
    /// Its index in the stage's input batch.
    pub index: usize,
    /// The stage's name.
    pub stage: String,
}

/// What a stage made of one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageOutput {
    /// The output batch (verified or built by the host): what the next stage consumes.
    pub batch: Vec<u8>,
    /// Events (or windows) the plugin failed on.
    pub dead_letters: Vec<DeadLetter>,
    /// Aggregates only: events too late for any open window.
    pub late: Vec<LateEvent>,
}

impl StageOutput {
    fn new(batch: Vec<u8>) -> Self {
        StageOutput {
            batch,
            dead_letters: Vec::new(),
            late: Vec::new(),
        }
    }
}

/// One plugin instance with its stage config, for one worker.
pub struct Stage {
    instance: Instance,
    windows: Option<WindowState>,
    builder: BatchBuilder,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("instance", &self.instance)
            .field("windows", &self.windows)
            .finish_non_exhaustive()
    }
}

impl Stage {
    /// Instantiates `plugin` for this stage. An aggregate needs a `window`; the other kinds
    /// take none.
    pub fn new(
        plugin: &Plugin,
        config: StageConfig,
        window: Option<WindowConfig>,
    ) -> Result<Stage, PluginError> {
        let bad = |message: String| PluginError::Config {
            plugin: plugin.name().to_owned(),
            version: plugin.version().to_owned(),
            message,
        };
        let stage = if config.name.is_empty() {
            plugin.name().to_owned()
        } else {
            config.name.clone()
        };
        let windows = match (plugin.kind(), window) {
            (PluginKind::Aggregate, Some(window)) => Some(WindowState::new(window)),
            (PluginKind::Aggregate, None) => {
                return Err(bad(format!(
                    "stage `{stage}`: an aggregate stage needs a window (e.g. `tumbling:60s`)"
                )));
            }
            (kind, Some(_)) => {
                return Err(bad(format!(
                    "stage `{stage}`: a {kind} stage takes no window (only aggregates do)"
                )));
            }
            (_, None) => None,
        };
        Ok(Stage {
            instance: plugin.instantiate(config)?,
            windows,
            builder: BatchBuilder::new(),
        })
    }

    /// The stage's name.
    pub fn name(&self) -> &str {
        &self.instance.config().name
    }

    /// The plugin the stage runs.
    pub fn plugin(&self) -> &Plugin {
        self.instance.plugin()
    }

    /// The instance (raw calls, counters).
    pub fn instance_mut(&mut self) -> &mut Instance {
        &mut self.instance
    }

    /// The window state of an aggregate stage.
    pub fn window_state(&self) -> Option<&WindowState> {
        self.windows.as_ref()
    }

    /// Replaces the window state of an aggregate stage (after a hot swap or a restart);
    /// returns the previous one. `None` for other kinds, which keep no state.
    pub fn replace_window_state(&mut self, state: WindowState) -> Option<WindowState> {
        let previous = self.windows.as_mut()?;
        Some(std::mem::replace(previous, state))
    }

    /// The raw filter call: one plugin call, the bitmap as returned (length checked), no
    /// retry and no re-encoding.
    pub fn filter_bitmap(&mut self, batch: &[u8]) -> Result<KeepBitmap, PluginError> {
        self.instance.filter(batch)
    }

    /// Runs one batch through the stage, isolating poison events.
    pub fn process(&mut self, batch: &[u8]) -> Result<StageOutput, PluginError> {
        let input = self.verified(batch)?;
        if input.is_empty() {
            return Ok(StageOutput::new(self.builder.finish()));
        }
        match self.plugin().kind() {
            PluginKind::Filter => self.process_filter(batch, input),
            PluginKind::Enrich => self.process_enrich(batch, input),
            PluginKind::Aggregate => self.process_aggregate(batch, input),
        }
    }

    /// End of input: an aggregate finishes every open window; other kinds output nothing.
    pub fn flush(&mut self) -> Result<StageOutput, PluginError> {
        let windows = match self.windows.as_mut() {
            Some(state) => state.take_all(),
            None => Vec::new(),
        };
        let mut output = StageOutput::new(Vec::new());
        output.batch = self.finish_windows(windows, &mut output.dead_letters)?;
        Ok(output)
    }

    fn process_filter(
        &mut self,
        batch: &[u8],
        input: Batch<'_>,
    ) -> Result<StageOutput, PluginError> {
        let n = input.len();
        let mut dead_letters = Vec::new();
        let keep = match self.instance.filter_counted(batch, n) {
            Ok(keep) => keep,
            Err(e) if e.is_event_failure() => {
                let mut keep = KeepBitmap::none(n);
                for (i, event) in input.iter().enumerate() {
                    let single = self.single(&event);
                    match self.instance.filter_counted(&single, 1) {
                        Ok(bits) => keep.set(i, bits.get(0)),
                        Err(e) if e.is_event_failure() => {
                            dead_letters.push(self.dead_letter(&event, i, e));
                        }
                        Err(e) => return Err(e),
                    }
                }
                keep
            }
            Err(e) => return Err(e),
        };
        let batch = if keep.count() == n {
            batch.to_vec()
        } else {
            for (i, event) in input.iter().enumerate() {
                if keep.get(i) {
                    self.builder.push_ref(&event, source(i));
                }
            }
            self.builder.finish()
        };
        Ok(StageOutput {
            batch,
            dead_letters,
            late: Vec::new(),
        })
    }

    fn process_enrich(
        &mut self,
        batch: &[u8],
        input: Batch<'_>,
    ) -> Result<StageOutput, PluginError> {
        let n = input.len();
        match self.instance.enrich_counted(batch, n) {
            Ok(out) => return Ok(StageOutput::new(out)),
            Err(e) if e.is_event_failure() => {}
            Err(e) => return Err(e),
        }
        let mut dead_letters = Vec::new();
        let mut outputs = Vec::with_capacity(n);
        for (i, event) in input.iter().enumerate() {
            let single = self.single(&event);
            match self.instance.enrich_counted(&single, 1) {
                Ok(out) => outputs.push((i, out)),
                Err(e) if e.is_event_failure() => {
                    dead_letters.push(self.dead_letter(&event, i, e));
                }
                Err(e) => return Err(e),
            }
        }
        for (i, out) in &outputs {
            for event in self.verified(out)?.iter() {
                self.builder.push_ref(&event, source(*i));
            }
        }
        Ok(StageOutput {
            batch: self.builder.finish(),
            dead_letters,
            late: Vec::new(),
        })
    }

    fn process_aggregate(
        &mut self,
        batch: &[u8],
        input: Batch<'_>,
    ) -> Result<StageOutput, PluginError> {
        let Some(state) = self.windows.as_ref() else {
            return Ok(StageOutput::new(self.builder.finish()));
        };
        let plan = state.plan(input.iter().map(|e| (e.key(), e.timestamp_ms())));
        let mut dead_letters = Vec::new();
        let mut late = Vec::new();

        let folded = if plan.groups.is_empty() {
            Ok(Vec::new())
        } else {
            self.instance.fold(batch, &groups(state, &plan))
        };
        match folded {
            Ok(accs) => {
                if let Some(state) = self.windows.as_mut() {
                    state.commit(&plan, accs);
                }
                for &i in &plan.late {
                    if let Some(event) = input.get(i) {
                        late.push(self.late(&event, i));
                    }
                }
            }
            Err(e) if e.is_event_failure() => {
                for (i, event) in input.iter().enumerate() {
                    let Some(state) = self.windows.as_ref() else {
                        break;
                    };
                    let plan = state.plan([(event.key(), event.timestamp_ms())]);
                    if !plan.late.is_empty() {
                        late.push(self.late(&event, i));
                        continue;
                    }
                    let groups = groups(state, &plan);
                    let single = self.single(&event);
                    match self.instance.fold(&single, &groups) {
                        Ok(accs) => {
                            if let Some(state) = self.windows.as_mut() {
                                state.commit(&plan, accs);
                            }
                        }
                        Err(e) if e.is_event_failure() => {
                            dead_letters.push(self.dead_letter(&event, i, e));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => return Err(e),
        }

        let finished = match self.windows.as_mut() {
            Some(state) => state.take_finished(),
            None => Vec::new(),
        };
        let batch = self.finish_windows(finished, &mut dead_letters)?;
        Ok(StageOutput {
            batch,
            dead_letters,
            late,
        })
    }

    /// Calls `finish` on finished windows; isolates a window whose `finish` fails.
    fn finish_windows(
        &mut self,
        finished: Vec<(WindowId, Vec<u8>)>,
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Result<Vec<u8>, PluginError> {
        if finished.is_empty() {
            return Ok(self.builder.finish());
        }
        let windows: Vec<Window> = finished
            .iter()
            .map(|(id, acc)| window(id, Some(acc.clone())))
            .collect();
        match self.instance.finish(&windows) {
            Ok(out) => return Ok(out),
            Err(e) if e.is_event_failure() => {}
            Err(e) => return Err(e),
        }
        let mut outputs = Vec::with_capacity(windows.len());
        for (i, ((id, acc), window)) in finished.into_iter().zip(windows).enumerate() {
            match self.instance.finish(std::slice::from_ref(&window)) {
                Ok(out) => outputs.push((i, out)),
                Err(e) if e.is_event_failure() => dead_letters.push(DeadLetter {
                    event: Event {
                        key: id.key.clone(),
                        value: acc,
                        timestamp_ms: id.start_ms,
                        ..Event::default()
                    },
                    index: i,
                    window: Some(id),
                    error: e.to_string(),
                    plugin: self.plugin().name().to_owned(),
                    version: self.plugin().version().to_owned(),
                    stage: self.name().to_owned(),
                }),
                Err(e) => return Err(e),
            }
        }
        for (i, out) in &outputs {
            for event in self.verified(out)?.iter() {
                self.builder.push_ref(&event, source(*i));
            }
        }
        Ok(self.builder.finish())
    }

    /// Verifies a batch handed to the stage, or one the plugin returned and the instance
    /// already checked (which cannot fail; an error rather than a panic all the same).
    fn verified<'b>(&self, buf: &'b [u8]) -> Result<Batch<'b>, PluginError> {
        Batch::verify(buf).map_err(|e| PluginError::BadInput {
            plugin: self.plugin().name().to_owned(),
            version: self.plugin().version().to_owned(),
            message: e.to_string(),
        })
    }

    /// A batch holding just this event.
    fn single(&mut self, event: &EventRef<'_>) -> Vec<u8> {
        self.builder.push_ref(event, 0);
        self.builder.finish()
    }

    fn dead_letter(&self, event: &EventRef<'_>, index: usize, error: PluginError) -> DeadLetter {
        DeadLetter {
            event: event.to_event(),
            index,
            window: None,
            error: error.to_string(),
            plugin: self.plugin().name().to_owned(),
            version: self.plugin().version().to_owned(),
            stage: self.name().to_owned(),
        }
    }

    fn late(&self, event: &EventRef<'_>, index: usize) -> LateEvent {
        LateEvent {
            event: event.to_event(),
            index,
            stage: self.name().to_owned(),
        }
    }
}

/// The fold groups of a plan, with the accumulators the state holds.
fn groups(state: &WindowState, plan: &Plan) -> Vec<Group> {
    plan.groups
        .iter()
        .map(|(id, events)| Group {
            window: window(id, state.acc(id).map(<[u8]>::to_vec)),
            events: events.clone(),
        })
        .collect()
}

fn window(id: &WindowId, acc: Option<Vec<u8>>) -> Window {
    Window {
        key: id.key.clone(),
        start_ms: id.start_ms,
        end_ms: id.end_ms,
        acc,
    }
}

/// A batch index as a `source` field (batches hold far fewer than 2^32 events).
fn source(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}
