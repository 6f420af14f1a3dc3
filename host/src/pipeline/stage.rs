//! [`Stage`]: one plugin instance and its stage config, for one worker; runs a batch through
//! the plugin and isolates poison events.
//!
//! Decisions:
//!
//! - **All or nothing per call.** [`Stage::process`] and [`Stage::flush`] either return `Ok`
//!   with everything the call made of its input, or `Err` having changed nothing: no output,
//!   no dead letter, no late event, and an aggregate's window state exactly as before the call
//!   (accumulators folded during the call are put back as they were, windows taken out to be
//!   finished go back in, event time goes back; see `WindowState`'s journal). The caller still
//!   holds the input and can hand it to the stage again once the stage can run: nothing is
//!   lost and nothing is counted twice. An `Err` is never about one event (that is a dead
//!   letter): it means the stage cannot run (its plugin's `init` refusing the config on
//!   recycle, the instance pool exhausted, input that is not a weir batch). This is also the
//!   simplest rule that makes a [`super::Chain`] exact: a failed stage leaves nothing half
//!   done.
//! - **Poison isolation** (DESIGN §4). When the batch call fails with an event failure (a trap,
//!   the deadline, the memory cap, the plugin's `Err`, or output that does not verify), the
//!   instance is recycled and the batch is retried **event by event**, each event as a batch of
//!   one. Events that fail alone become [`DeadLetter`]s (original event, its index in the
//!   input, the error, plugin name and version, stage); every other event's output is
//!   delivered, in input order. Since the plugin saw the event as the only one of its batch, a
//!   message of the plugin's own that starts with `event 0: ` is renumbered to the event's
//!   index in the stage's input (`window 0: ` likewise, for a window whose `finish` failed).
//! - **Isolated output is bounded.** One call's output is bounded by the instance's memory cap,
//!   but a batch retried event by event makes one call per event. Their outputs together may
//!   hold at most the stage's memory limit (`Limits::memory_bytes`): the event (or window)
//!   whose output would pass it, and every one after it, become dead letters with
//!   [`PluginError::OutputLimit`] instead of being delivered (those after it are not even
//!   called).
//! - **A filter's output is a selection of its input** ([`Stage::filter_kept`]): the
//!   keep-bitmap, ANDed with the selection it was given, and no event copied. A chain hands
//!   that selection from filter to filter and on to the sinks; a batch is built of the kept
//!   events only where something needs one (the next stage of another kind, a tap, the
//!   output of [`Stage::process`]). A filter is called on the whole batch even when an earlier
//!   filter dropped some of it, and its answers for those events are ignored; a filter whose
//!   call fails on an event the selection leaves out (one that cannot read what an earlier
//!   filter drops) gets the selected events alone as a batch, then and from then on. Either
//!   way a filter is judged, dead-lettered and numbered on the events it is given.
//! - **`source`** of output events: a **filter** passes the events it keeps on unchanged,
//!   `source` included; an **enrich** sets it to the input event's index in this stage's
//!   input, as the contract says, also after isolation (the per-event outputs are re-encoded
//!   into one batch with `source` = the original index); an **aggregate** sets it to the
//!   window's index among the windows finished together. When no event is kept, a filter
//!   outputs an empty selection (an empty batch from [`Stage::process`]). The raw call, one
//!   bitmap and no isolation, is [`Stage::filter_bitmap`] (benchmarks).
//! - **Aggregate** (see `window.rs` for the watermark rule): plan the batch's events into
//!   (key, window) groups against the host-held [`WindowState`], move the groups'
//!   accumulators into one `fold` call, write the new accumulators and the event time back
//!   when it succeeds (put the old ones back when it fails), then `finish` every window the
//!   watermark has passed. Late events are returned in [`StageOutput::late`], not folded.
//!   Isolation applies to `fold` (per event, each success written) and to `finish` (per window;
//!   a window whose `finish` fails is a dead letter carrying its key and accumulator, and
//!   leaves the state). A window leaves the state only with the call that finished it or
//!   dead-lettered it, when that call returns `Ok`.
//! - An empty batch calls no plugin.

use super::window::{Journal, Plan, WindowConfig, WindowId, WindowState};
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

/// What a stage made of one batch: its output events as `B`, a batch of their own (verified
/// or built by the host: what the next stage consumes) unless said otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageOutput<B = Vec<u8>> {
    /// The output events.
    pub batch: B,
    /// Events (or windows) the plugin failed on.
    pub dead_letters: Vec<DeadLetter>,
    /// Aggregates only: events too late for any open window.
    pub late: Vec<LateEvent>,
    /// Why the call on the whole batch (or on every finished window) failed, when it was
    /// retried event by event (window by window): a cost `weir test`, `weir bench` and the
    /// metrics report, since a batch that always fails as a whole (a deadline too short for
    /// it) runs event by event at a fraction of its speed.
    pub retried: Option<String>,
}

/// What a filter kept of its input batch: `None` for every event, else the events whose bit
/// is set. A selection of the input, not a copy of it.
pub type Kept = Option<KeepBitmap>;

impl<B> StageOutput<B> {
    fn new(batch: B) -> Self {
        StageOutput {
            batch,
            dead_letters: Vec::new(),
            late: Vec::new(),
            retried: None,
        }
    }
}

/// Which windows an aggregate stage folds a batch's events into.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Every window the events belong to (the usual case).
    All,
    /// Only the windows open in its own state: a previous version finishing the windows it
    /// opened (it reports no late events: those are the new version's).
    Opened,
    /// Every window but those open in this other state (the new version beside a previous one
    /// that finishes its windows).
    Except(&'a WindowState),
}

/// One plugin instance with its stage config, for one worker.
pub struct Stage {
    instance: Instance,
    windows: Option<WindowState>,
    /// The layout id its plugin declares (aggregates).
    layout: Option<String>,
    /// Whether a failing batch is retried event by event (off only inside
    /// [`Stage::process_batch_strict`] and [`Stage::flush_strict`]).
    isolate: bool,
    /// Whether this filter is called on the selected events alone, as a batch of their own,
    /// rather than on the whole batch: set once a whole-batch call failed on an event where
    /// the selected events alone passed (a filter that cannot read what an earlier one
    /// drops), so that later batches do not pay for a failing call and a recycle each.
    narrow: bool,
    /// Builds output batches.
    builder: BatchBuilder,
    /// Builds the one-event batches of isolation.
    scratch: BatchBuilder,
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
    /// Instantiates `plugin` for this stage. An aggregate needs a `window`, which must be
    /// valid ([`WindowConfig::validate`]); the other kinds take none.
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
            (PluginKind::Aggregate, Some(window)) => {
                window
                    .validate()
                    .map_err(|e| bad(format!("stage `{stage}`: {e}")))?;
                Some(WindowState::new(window))
            }
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
        let mut instance = plugin.instantiate(config)?;
        let layout = match windows {
            Some(_) => Some(instance.state_layout()?),
            None => None,
        };
        let windows = windows.map(|mut state| {
            state.set_layout(layout.clone());
            state
        });
        Ok(Stage {
            instance,
            windows,
            layout,
            isolate: true,
            narrow: false,
            builder: BatchBuilder::new(),
            scratch: BatchBuilder::new(),
        })
    }

    /// The layout id of the accumulators an aggregate stage's plugin writes; `None` for other
    /// kinds.
    pub fn layout(&self) -> Option<&str> {
        self.layout.as_deref()
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

    /// The window state of an aggregate stage, mutably.
    pub(crate) fn window_state_mut(&mut self) -> Option<&mut WindowState> {
        self.windows.as_mut()
    }

    /// From now on, an aggregate stage's window state remembers what changes.
    pub(crate) fn track_changes(&mut self) {
        if let Some(windows) = self.windows.as_mut() {
            windows.track_changes();
        }
    }

    /// Replaces the window state of an aggregate stage (after a hot swap or a restart);
    /// returns the previous one, or `None` for other kinds, which keep no state. The state's
    /// window config must be valid ([`WindowConfig::validate`]).
    pub fn replace_window_state(
        &mut self,
        state: WindowState,
    ) -> Result<Option<WindowState>, PluginError> {
        state.config().validate().map_err(|e| PluginError::Config {
            plugin: self.plugin().name().to_owned(),
            version: self.plugin().version().to_owned(),
            message: format!("stage `{}`: {e}", self.name()),
        })?;
        Ok(self
            .windows
            .as_mut()
            .map(|previous| std::mem::replace(previous, state)))
    }

    /// Takes an aggregate stage's window state out, leaving it empty (no window, no event
    /// seen); `None` for other kinds.
    pub fn take_window_state(&mut self) -> Option<WindowState> {
        self.windows
            .as_mut()
            .map(|state| std::mem::replace(state, WindowState::new(*state.config())))
    }

    /// Puts window state back (taken with [`Stage::take_window_state`] from this stage or from
    /// another version of it with the same window config and, unless no window is open, the
    /// same layout); ignored for other kinds. An empty state takes this stage's layout.
    pub(crate) fn set_window_state(&mut self, mut state: WindowState) {
        if let Some(windows) = self.windows.as_mut() {
            if state.open_windows() == 0 {
                state.set_layout(self.layout.clone());
            }
            *windows = state;
        }
    }

    /// Like [`Stage::process_batch`], but a batch the plugin fails on is an `Err` instead of
    /// being retried event by event (with everything as it was before the call): how a
    /// version on probation is tried (see `chain.rs`).
    pub fn process_batch_strict(&mut self, input: &Batch<'_>) -> Result<StageOutput, PluginError> {
        self.isolate = false;
        let result = self.process_batch(input);
        self.isolate = true;
        result
    }

    /// Like [`Stage::flush`], without isolating a window whose `finish` fails.
    pub fn flush_strict(&mut self) -> Result<StageOutput, PluginError> {
        self.isolate = false;
        let result = self.flush();
        self.isolate = true;
        result
    }

    /// The raw filter call on a verified batch: one plugin call, the bitmap as returned
    /// (length checked), no retry and no re-encoding.
    pub fn filter_bitmap(&mut self, batch: &Batch<'_>) -> Result<KeepBitmap, PluginError> {
        self.instance.filter_counted(batch.bytes(), batch.len())
    }

    /// Verifies `batch` and runs it through the stage (see [`Stage::process_batch`]).
    pub fn process(&mut self, batch: &[u8]) -> Result<StageOutput, PluginError> {
        let input = self.verified(batch)?;
        self.process_batch(&input)
    }

    /// Runs one verified batch through the stage, isolating poison events. All or nothing:
    /// on `Err` the stage is as it was before the call (see the module docs). The output
    /// batch is verified or built by the host, so it can be handed to the next stage as is.
    pub fn process_batch(&mut self, input: &Batch<'_>) -> Result<StageOutput, PluginError> {
        self.process_batch_in(input, Scope::All)
    }

    /// Like [`Stage::process_batch`], folding an aggregate's events only into the windows of
    /// `scope` (see [`Scope`]).
    pub fn process_batch_in(
        &mut self,
        input: &Batch<'_>,
        scope: Scope<'_>,
    ) -> Result<StageOutput, PluginError> {
        let batch = input.bytes();
        // An aggregate's empty part of a batch split by key still moves its event time.
        if input.is_empty() && self.plugin().kind() != PluginKind::Aggregate {
            return Ok(StageOutput::new(self.builder.finish()));
        }
        let result = match self.plugin().kind() {
            PluginKind::Filter => self.process_filter(input),
            PluginKind::Enrich => self.process_enrich(batch, input),
            PluginKind::Aggregate => self.process_aggregate(batch, input, scope),
        };
        if result.is_err() {
            self.discard();
        }
        result
    }

    /// End of input: an aggregate finishes every open window; other kinds output nothing.
    /// All or nothing: on `Err` every window is still in the state.
    pub fn flush(&mut self) -> Result<StageOutput, PluginError> {
        let Some(mut state) = self.windows.take() else {
            return Ok(StageOutput::new(self.builder.finish()));
        };
        let mut journal = state.journal();
        let mut output = StageOutput::new(Vec::new());
        let finished = state.take_all();
        let result = match self.finish_windows(finished, &mut journal, &mut output) {
            Ok(batch) => {
                output.batch = batch;
                Ok(output)
            }
            Err(e) => {
                state.rollback(journal);
                self.discard();
                Err(e)
            }
        };
        self.windows = Some(state);
        result
    }

    fn process_filter(&mut self, input: &Batch<'_>) -> Result<StageOutput, PluginError> {
        let out = self.filter_kept(input, None)?;
        Ok(StageOutput {
            batch: kept_batch(&mut self.builder, input, out.batch.as_ref()),
            dead_letters: out.dead_letters,
            late: out.late,
            retried: out.retried,
        })
    }

    /// Runs a filter stage on the events of `input` that `selected` holds (`None`: every one;
    /// an earlier filter's output): its output is what it kept of them, as a selection of
    /// `input`, without copying an event. Dead letters are indexed among the selected events
    /// (the events the stage was given). All or nothing, as [`Stage::process_batch`].
    ///
    /// The plugin is called on the whole batch and its answers for events outside `selected`
    /// are ignored, so that no batch is re-encoded between filters. When that call fails on an
    /// event, the selected events alone are tried as a batch of their own (an event an earlier
    /// filter dropped may be one this plugin cannot read), and only then one by one. A stage
    /// whose selected events passed alone where the whole batch failed is called on the
    /// selected events alone from then on.
    pub fn filter_kept(
        &mut self,
        input: &Batch<'_>,
        selected: Option<&KeepBitmap>,
    ) -> Result<StageOutput<Kept>, PluginError> {
        let result = self.filter_kept_in(input, selected);
        if result.is_err() {
            self.discard();
        }
        result
    }

    /// Like [`Stage::filter_kept`], without isolating events: an event failure is an `Err`.
    pub fn filter_kept_strict(
        &mut self,
        input: &Batch<'_>,
        selected: Option<&KeepBitmap>,
    ) -> Result<StageOutput<Kept>, PluginError> {
        self.isolate = false;
        let result = self.filter_kept(input, selected);
        self.isolate = true;
        result
    }

    fn filter_kept_in(
        &mut self,
        input: &Batch<'_>,
        selected: Option<&KeepBitmap>,
    ) -> Result<StageOutput<Kept>, PluginError> {
        let n = input.len();
        if n == 0 || selected.is_some_and(|s| s.count() == 0) {
            return Ok(StageOutput::new(selected.cloned()));
        }
        let narrowed = self.narrow && selected.is_some_and(|s| s.count() < n);
        let mut failure = None;
        if !narrowed {
            match self.instance.filter_counted(input.bytes(), n) {
                Ok(bits) => {
                    let kept = match selected {
                        Some(selected) => bits.and(selected),
                        None => bits,
                    };
                    return Ok(StageOutput::new((kept.count() < n).then_some(kept)));
                }
                // An event the selection leaves out may be the one it failed on: the selected
                // events are tried alone, also by a strict call (the version on probation is
                // judged on the events it is given, as the one it replaces).
                Err(e) if e.is_event_failure() && (selected.is_some() || self.isolate) => {
                    failure = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        self.filter_selected(input, selected, failure)
    }

    /// The filter on the selected events alone, as a batch of their own (when some are left
    /// out), then, isolating, on each selected event alone; not isolating, the failure is the
    /// result. `whole`: how a call on the whole batch failed on an event (`None`: the stage is
    /// narrowed and made none), so that the selected events passing alone narrow the stage
    /// (see `narrow`). Dead letters are indexed among the selected events: the events this
    /// stage was given.
    fn filter_selected(
        &mut self,
        input: &Batch<'_>,
        selected: Option<&KeepBitmap>,
        whole: Option<PluginError>,
    ) -> Result<StageOutput<Kept>, PluginError> {
        let n = input.len();
        let picked: Vec<usize> = (0..n)
            .filter(|&i| selected.is_none_or(|s| s.get(i)))
            .collect();
        let mut kept = KeepBitmap::none(n);
        let narrows = whole.is_some();
        let mut failure = whole;
        if picked.len() < n {
            let only = kept_batch(&mut self.builder, input, selected);
            match self.instance.filter_counted(&only, picked.len()) {
                Ok(bits) => {
                    self.narrow |= narrows;
                    for (j, &i) in picked.iter().enumerate() {
                        kept.set(i, bits.get(j));
                    }
                    return Ok(StageOutput::new(Some(kept)));
                }
                Err(e) if e.is_event_failure() => failure = Some(e),
                Err(e) => return Err(e),
            }
        }
        if !self.isolate
            && let Some(e) = failure
        {
            return Err(e);
        }
        let retried = failure.map(|e| e.to_string());
        let mut dead_letters = Vec::new();
        for (j, i) in picked.into_iter().enumerate() {
            let Some(event) = input.get(i) else { continue };
            let single = self.single(&event);
            match self.instance.filter_counted(&single, 1) {
                Ok(bits) => kept.set(i, bits.get(0)),
                Err(e) if e.is_event_failure() => {
                    dead_letters.push(self.dead_letter(&event, j, e));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(StageOutput {
            batch: (kept.count() < n).then_some(kept),
            dead_letters,
            late: Vec::new(),
            retried,
        })
    }

    fn process_enrich(
        &mut self,
        batch: &[u8],
        input: &Batch<'_>,
    ) -> Result<StageOutput, PluginError> {
        let n = input.len();
        let retried = match self.instance.enrich_counted(batch, n) {
            Ok(out) => return Ok(StageOutput::new(out)),
            Err(e) if e.is_event_failure() && self.isolate => e.to_string(),
            Err(e) => return Err(e),
        };
        let mut dead_letters = Vec::new();
        let mut budget = self.output_budget();
        for (i, event) in input.iter().enumerate() {
            let error = if budget.spent() {
                self.output_limit()
            } else {
                let single = self.single(&event);
                match self.instance.enrich_counted(&single, 1) {
                    Ok(out) if budget.take(out.len()) => {
                        for output in self.verified(&out)?.iter() {
                            self.builder.push_ref(&output, source(i));
                        }
                        continue;
                    }
                    Ok(_) => self.output_limit(),
                    Err(e) if e.is_event_failure() => e,
                    Err(e) => return Err(e),
                }
            };
            dead_letters.push(self.dead_letter(&event, i, error));
        }
        Ok(StageOutput {
            batch: self.builder.finish(),
            dead_letters,
            late: Vec::new(),
            retried: Some(retried),
        })
    }

    /// Runs an aggregate batch against the state, which is taken out of `self` for the call
    /// and rolled back if the call fails.
    fn process_aggregate(
        &mut self,
        batch: &[u8],
        input: &Batch<'_>,
        scope: Scope<'_>,
    ) -> Result<StageOutput, PluginError> {
        let Some(mut state) = self.windows.take() else {
            return Ok(StageOutput::new(self.builder.finish()));
        };
        if state.open_windows() > 0 && state.layout() != self.layout.as_deref() {
            // Never reached through `Chain`, which keeps layouts apart: a stage that cannot
            // run rather than one that misreads accumulators.
            let error = PluginError::Config {
                plugin: self.plugin().name().to_owned(),
                version: self.plugin().version().to_owned(),
                message: format!(
                    "stage `{}`: its windows hold accumulators of state layout `{}`, and this version reads `{}`",
                    self.name(),
                    state.layout().unwrap_or_default(),
                    self.layout.as_deref().unwrap_or_default()
                ),
            };
            self.windows = Some(state);
            return Err(error);
        }
        let mut journal = state.journal();
        let result = self.aggregate(&mut state, &mut journal, batch, input, scope);
        if result.is_err() {
            state.rollback(journal);
        }
        self.windows = Some(state);
        result
    }

    fn aggregate(
        &mut self,
        state: &mut WindowState,
        journal: &mut Journal,
        batch: &[u8],
        input: &Batch<'_>,
        scope: Scope<'_>,
    ) -> Result<StageOutput, PluginError> {
        let mut output = StageOutput::new(Vec::new());
        let plan = |state: &WindowState, events: &mut dyn Iterator<Item = (Option<&[u8]>, i64)>| {
            let mut plan = match scope {
                Scope::All => state.plan(events),
                Scope::Opened => state.plan_some(events, |w| state.contains(w)),
                Scope::Except(other) => state.plan_some(events, |w| !other.contains(w)),
            };
            // A version finishing the windows it opened leaves late events to the other.
            if matches!(scope, Scope::Opened) {
                plan.late.clear();
            }
            plan
        };
        let Plan {
            groups,
            late,
            max_event_ms,
        } = plan(
            state,
            &mut input.iter().map(|e| (e.key(), e.timestamp_ms())),
        );
        match self.fold(state, journal, batch, input.len(), groups, max_event_ms) {
            Ok(()) => {
                for i in late {
                    if let Some(event) = input.get(i) {
                        output.late.push(self.late(&event, i));
                    }
                }
            }
            Err(e) if e.is_event_failure() && self.isolate => {
                output.retried = Some(e.to_string());
                for (i, event) in input.iter().enumerate() {
                    let plan = plan(
                        state,
                        &mut std::iter::once((event.key(), event.timestamp_ms())),
                    );
                    if !plan.late.is_empty() {
                        output.late.push(self.late(&event, i));
                        continue;
                    }
                    let single = self.single(&event);
                    let folded =
                        self.fold(state, journal, &single, 1, plan.groups, plan.max_event_ms);
                    match folded {
                        Ok(()) => {}
                        Err(e) if e.is_event_failure() => {
                            output.dead_letters.push(self.dead_letter(&event, i, e));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => return Err(e),
        }
        state.reach_batch_time();
        let finished = state.take_finished();
        output.batch = self.finish_windows(finished, journal, &mut output)?;
        Ok(output)
    }

    /// Folds a verified batch of `n` events into the planned groups. The groups'
    /// accumulators move out of the state into the call; when it succeeds the new ones are
    /// written (noted in the journal) and event time advances to `max_event_ms`, when it fails
    /// the old ones go back and the state is as it was.
    fn fold(
        &mut self,
        state: &mut WindowState,
        journal: &mut Journal,
        batch: &[u8],
        n: usize,
        planned: Vec<(WindowId, Vec<u32>)>,
        max_event_ms: Option<i64>,
    ) -> Result<(), PluginError> {
        if planned.is_empty() {
            // Nothing to fold here. Event time moves as far as events with an open window went
            // (none, when every event was late; the journal notes where it was).
            state.observe(max_event_ms);
            return Ok(());
        }
        let groups: Vec<Group> = planned
            .into_iter()
            .map(|(id, events)| {
                let (id, acc) = state.take_acc(id);
                Group {
                    window: window(id, acc),
                    events,
                }
            })
            .collect();
        match self.instance.fold_counted(batch, n, &groups) {
            Ok(accs) => {
                // `fold_counted` checked there is one accumulator per group.
                for (group, acc) in groups.into_iter().zip(accs) {
                    let (id, previous) = unwindow(group.window);
                    state.write_acc(id, acc, previous, journal);
                }
                state.observe(max_event_ms);
                Ok(())
            }
            Err(e) => {
                for group in groups {
                    let (id, acc) = unwindow(group.window);
                    state.put_back(id, acc);
                }
                Err(e)
            }
        }
    }

    /// Calls `finish` on windows taken out of the state; isolates a window whose `finish`
    /// fails (its dead letters and why into `output`). On `Err` the windows are noted in the
    /// journal, to go back into the state.
    fn finish_windows(
        &mut self,
        finished: Vec<(WindowId, Vec<u8>)>,
        journal: &mut Journal,
        output: &mut StageOutput,
    ) -> Result<Vec<u8>, PluginError> {
        if finished.is_empty() {
            return Ok(self.builder.finish());
        }
        let windows: Vec<Window> = finished
            .into_iter()
            .map(|(id, acc)| window(id, Some(acc)))
            .collect();
        let result = self.finish_all(&windows, output);
        if result.is_err() {
            journal.taken(windows.into_iter().map(|w| {
                let (id, acc) = unwindow(w);
                (id, acc.unwrap_or_default())
            }));
        }
        result
    }

    fn finish_all(
        &mut self,
        windows: &[Window],
        output: &mut StageOutput,
    ) -> Result<Vec<u8>, PluginError> {
        match self.instance.finish(windows) {
            Ok(out) => return Ok(out),
            Err(e) if e.is_event_failure() && self.isolate => {
                output.retried.get_or_insert_with(|| e.to_string());
            }
            Err(e) => return Err(e),
        }
        let mut budget = self.output_budget();
        for (i, w) in windows.iter().enumerate() {
            let error = if budget.spent() {
                self.output_limit()
            } else {
                match self.instance.finish(std::slice::from_ref(w)) {
                    Ok(out) if budget.take(out.len()) => {
                        for output in self.verified(&out)?.iter() {
                            self.builder.push_ref(&output, source(i));
                        }
                        continue;
                    }
                    Ok(_) => self.output_limit(),
                    Err(e) if e.is_event_failure() => e.renumbered("window", i),
                    Err(e) => return Err(e),
                }
            };
            output.dead_letters.push(DeadLetter {
                event: Event {
                    key: w.key.clone(),
                    value: w.acc.clone().unwrap_or_default(),
                    timestamp_ms: w.start_ms,
                    ..Event::default()
                },
                index: i,
                window: Some(WindowId {
                    key: w.key.clone(),
                    start_ms: w.start_ms,
                    end_ms: w.end_ms,
                }),
                error: error.to_string(),
                plugin: self.plugin().name().to_owned(),
                version: self.plugin().version().to_owned(),
                stage: self.name().to_owned(),
            });
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

    /// Drops what a failed call left in the output builder.
    fn discard(&mut self) {
        drop(self.builder.finish());
    }

    /// A batch holding just this event.
    fn single(&mut self, event: &EventRef<'_>) -> Vec<u8> {
        self.scratch.push_ref(event, 0);
        self.scratch.finish()
    }

    /// How much output the calls of one isolated batch may return together.
    fn output_budget(&self) -> Budget {
        Budget {
            left: self.instance.config().limits.memory_bytes,
            spent: false,
        }
    }

    fn output_limit(&self) -> PluginError {
        PluginError::OutputLimit {
            plugin: self.plugin().name().to_owned(),
            version: self.plugin().version().to_owned(),
            limit: self.instance.config().limits.memory_bytes,
        }
    }

    /// A dead letter for an event the plugin failed on alone (`error` renumbered to `index`).
    fn dead_letter(&self, event: &EventRef<'_>, index: usize, error: PluginError) -> DeadLetter {
        DeadLetter {
            event: event.to_event(),
            index,
            window: None,
            error: error.renumbered("event", index).to_string(),
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

/// The bytes the outputs of one isolated batch may still take.
struct Budget {
    left: u64,
    spent: bool,
}

impl Budget {
    /// Takes `bytes` if they fit; once something did not fit, nothing more does.
    fn take(&mut self, bytes: usize) -> bool {
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        match self.left.checked_sub(bytes) {
            Some(left) if !self.spent => {
                self.left = left;
                true
            }
            _ => {
                self.spent = true;
                false
            }
        }
    }

    /// Whether an output already did not fit.
    fn spent(&self) -> bool {
        self.spent
    }
}

/// A window as the plugin sees it, from the host's id and accumulator (moved, not copied).
fn window(id: WindowId, acc: Option<Vec<u8>>) -> Window {
    Window {
        key: id.key,
        start_ms: id.start_ms,
        end_ms: id.end_ms,
        acc,
    }
}

/// The inverse of [`window`].
fn unwindow(window: Window) -> (WindowId, Option<Vec<u8>>) {
    let id = WindowId {
        key: window.key,
        start_ms: window.start_ms,
        end_ms: window.end_ms,
    };
    (id, window.acc)
}

/// The events of `input` that `kept` holds (`None`: every one) as a batch of their own, each
/// with its `source` unchanged; a copy of the bytes when every event is kept.
pub(crate) fn kept_batch(
    builder: &mut BatchBuilder,
    input: &Batch<'_>,
    kept: Option<&KeepBitmap>,
) -> Vec<u8> {
    let Some(kept) = kept else {
        return input.bytes().to_vec();
    };
    for (i, event) in input.iter().enumerate() {
        if kept.get(i) {
            builder.push_ref(&event, event.source());
        }
    }
    builder.finish()
}

/// A batch index as a `source` field (batches hold far fewer than 2^32 events).
fn source(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    //! What integration tests cannot set up: a stage that cannot run *in the middle* of a call
    //! (the instance pool exhausted on a recycle, through the instance's test-only
    //! `starts_left`). The call must then change nothing, and running the batch again must
    //! count every event once.

    use super::*;
    use crate::runtime::{Limits, Runtime, RuntimeConfig};
    use std::time::Duration;
    use weir_format::encode;

    mod plugins {
        include!(concat!(env!("OUT_DIR"), "/plugin_paths.rs"));
    }

    fn bad_finish(limits: Limits) -> Stage {
        let runtime = Runtime::new(RuntimeConfig {
            max_instances: 2,
            ..RuntimeConfig::default()
        })
        .expect("runtime");
        let plugin = runtime.load_file(plugins::BAD_FINISH).expect("bad_finish");
        let window = WindowConfig::tumbling(Duration::from_secs(60));
        let config = StageConfig::new("counts").limits(limits);
        Stage::new(&plugin, config, Some(window)).expect("stage")
    }

    fn events(batch: &[u8]) -> Vec<Event> {
        Batch::verify(batch).expect("a batch").to_events()
    }

    fn count(key: &str, end_ms: i64, n: u64) -> Event {
        Event::new(format!("count={n}"), end_ms - 1).with_key(key)
    }

    #[test]
    fn a_finish_that_cannot_run_undoes_the_fold_and_keeps_the_windows() {
        // One call per instance: the fold and the finish of a batch each need a new one.
        let mut stage = bad_finish(Limits {
            max_calls_per_instance: 1,
            ..Limits::default()
        });
        stage
            .process(&encode(&[Event::new("x", 1_000).with_key("a")]))
            .expect("first batch");
        let before = stage.window_state().cloned();
        // `a` at 2 s and `b` at 61 s: the fold succeeds, then [0, 60 s) of `a` finishes.
        let batch = encode(&[
            Event::new("y", 2_000).with_key("a"),
            Event::new("z", 61_000).with_key("b"),
        ]);
        stage.instance_mut().starts_left = Some(1);
        let e = stage.process(&batch).expect_err("no instance for finish");
        assert!(matches!(e, PluginError::Instantiate { .. }), "{e}");
        assert_eq!(stage.window_state().cloned(), before);

        // Once the stage can run, the same batch counts each event once.
        stage.instance_mut().starts_left = None;
        let out = stage.process(&batch).expect("second try");
        assert_eq!(events(&out.batch), vec![count("a", 60_000, 2)]);
        let flushed = stage.flush().expect("flush");
        assert_eq!(events(&flushed.batch), vec![count("b", 120_000, 1)]);
    }

    #[test]
    fn a_failure_during_isolation_undoes_every_fold() {
        let mut stage = bad_finish(Limits::default());
        let before = stage.window_state().cloned();
        let batch = encode(&[
            Event::new("x", 1_000).with_key("a"),
            Event::new("poison", 2_000).with_key("a"),
            Event::new("y", 3_000).with_key("a"),
        ]);
        // The batch traps; isolation recycles for event 0 (folded), event 1 traps again, and
        // event 2 finds no instance.
        stage.instance_mut().starts_left = Some(1);
        let e = stage.process(&batch).expect_err("no instance for event 2");
        assert!(matches!(e, PluginError::Instantiate { .. }), "{e}");
        assert_eq!(stage.window_state().cloned(), before);

        stage.instance_mut().starts_left = None;
        let out = stage.process(&batch).expect("second try");
        assert_eq!(out.dead_letters.len(), 1);
        assert_eq!(out.dead_letters[0].index, 1);
        let flushed = stage.flush().expect("flush");
        assert_eq!(events(&flushed.batch), vec![count("a", 60_000, 2)]);
    }

    #[test]
    fn a_flush_that_cannot_run_keeps_every_window() {
        let mut stage = bad_finish(Limits::default());
        let batch = encode(&[
            Event::new("x", 1_000).with_key("a"),
            Event::new("x", 2_000).with_key("b"),
        ]);
        stage.process(&batch).expect("batch");
        stage.instance_mut().starts_left = Some(0);
        // Kill the live instance: the flush has to start a new one.
        let poison = encode(&[Event::new("poison", 3_000)]);
        let group = Group {
            window: window(
                WindowId {
                    key: None,
                    start_ms: 0,
                    end_ms: 60_000,
                },
                None,
            ),
            events: vec![0],
        };
        let trapped = stage.instance_mut().fold(&poison, &[group]);
        assert!(
            matches!(trapped, Err(PluginError::Trap { .. })),
            "{trapped:?}"
        );
        let e = stage.flush().expect_err("no instance");
        assert!(matches!(e, PluginError::Instantiate { .. }), "{e}");
        assert_eq!(stage.window_state().map(WindowState::open_windows), Some(2));

        stage.instance_mut().starts_left = None;
        let flushed = stage.flush().expect("flush");
        assert_eq!(
            events(&flushed.batch),
            vec![count("a", 60_000, 1), count("b", 60_000, 1)]
        );
    }
}
