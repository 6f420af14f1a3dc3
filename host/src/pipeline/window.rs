//! Event-time windows, held by the host: assignment, watermark, lateness and the state that
//! outlives a plugin version. Pure: event times come in as arguments, nothing reads a clock.
//!
//! # Windows
//!
//! - **Tumbling** `size`: `[k·size, (k+1)·size)` for every integer `k` (aligned to the Unix
//!   epoch, like Flink's and Kafka Streams' defaults). An event is in exactly one window.
//! - **Sliding** `size/slide`: windows of length `size` starting at every multiple of `slide`;
//!   an event at `t` is in every window whose start `s` satisfies `s <= t < s + size`, that is
//!   `ceil(size / slide)` windows (fewer when `slide` does not divide `size`). `slide` may not
//!   exceed `size` (that would leave events in no window), and `ceil(size / slide)` may not
//!   exceed [`MAX_WINDOWS_PER_EVENT`] (`sliding:24h/1ms` would put every event in 86.4 million
//!   windows: one batch would plan gigabytes of groups).
//! - Windows are keyed by the event's key (an event without a key is in the `None` group).
//!
//! # Watermark and lateness (the exact rule)
//!
//! - `watermark = max event time seen − allowed lateness` (none before the first event).
//! - It advances **event by event**, in batch order, so the outcome does not depend on how the
//!   input was cut into batches: event `i` is judged against the watermark after events
//!   `0..i`.
//! - A window `[start, end)` is **finished** when `watermark >= end`.
//! - An event is folded into each of its windows that is not finished. An event **all** of
//!   whose windows are finished is **late**: it is reported separately and folded nowhere.
//! - A finished window is taken out of the state (and handed to the plugin's `finish`) after
//!   the batch that finished it; [`WindowState::take_all`] takes every window at end of input.
//! - Events the stage failed on (dead letters) do not advance the watermark; only events the
//!   stage accepted move event time.
//! - Times are `i64` milliseconds; arithmetic saturates at the ends of the range.
//!
//! # Config syntax (`--window`, `window = "..."`)
//!
//! ```text
//! spec     := kind [ sep "lateness:" duration ]
//! kind     := "tumbling:" duration | "sliding:" duration "/" duration
//! sep      := "," | whitespace          (e.g. "tumbling:60s,lateness:5s")
//! duration := digits unit              unit := "ms" | "s" | "m" | "h"
//! ```
//!
//! Examples: `tumbling:60s`, `tumbling:1m,lateness:5s`, `sliding:60s/10s lateness:500ms`.
//! Sizes must be longer than zero; lateness may be zero (the default).
//!
//! Every way to make a config checks it: parsing, [`WindowConfig::sliding`] (which returns a
//! `Result`) and `Stage::new` (which refuses a config built field by field, or by
//! [`WindowConfig::tumbling`] with a size under 1 ms, through [`WindowConfig::validate`]).
//!
//! # State
//!
//! [`WindowState`] holds the accumulator bytes per (key, window) and the maximum event time
//! seen, and the layout id of those accumulators (declared by the plugin version that wrote
//! them: a version never reads accumulators of another layout). [`WindowState::to_bytes`] /
//! [`WindowState::from_bytes`] (postcard, with a format number first) carry it across a hot
//! swap or a restart; each stored window keeps its own start and end, so state stays
//! meaningful if the window config changes in between.
//!
//! A stage changes the state in steps it may have to undo (a batch is all or nothing, see
//! `stage.rs`): [`Journal`] records what each step replaced, and [`WindowState::rollback`]
//! puts the state back as it was when the journal was opened.
//!
//! # Cost
//!
//! Planning allocates per group, not per event: [`WindowConfig::windows_of`] is an iterator,
//! the group index is probed with the key borrowed from the batch, and a window's key is copied
//! once, when its group is created. Accumulators move between the state and the plugin calls;
//! they are not copied.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A window spec that does not parse, or window state that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// A window spec that does not follow the syntax.
    #[error(
        "bad window `{spec}`: {message} (expected e.g. `tumbling:60s`, `sliding:60s/10s`, \
         `tumbling:1m,lateness:5s`)"
    )]
    Syntax {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        message: String,
    },
    /// A window config whose values cannot be used (built in code rather than parsed).
    #[error("bad window `{window}`: {message}")]
    Invalid {
        /// The config, in the spec syntax.
        window: String,
        /// What is wrong with it.
        message: String,
    },
    /// Bytes that are not window state this build can read.
    #[error("bad window state: {0}")]
    State(String),
}

/// The most windows one event may fall into (`ceil(size / slide)` of a sliding window): each
/// is a (key, window) group to plan, fold and finish, so this bounds the work and memory one
/// event can cause. A minute in 10 s steps is 6; an hour in 1 s steps is 3600 and refused.
pub const MAX_WINDOWS_PER_EVENT: i64 = 1000;

/// Tumbling or sliding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WindowKind {
    /// Back-to-back windows of `size_ms`.
    Tumbling {
        /// Window length in milliseconds.
        size_ms: i64,
    },
    /// Windows of `size_ms` starting every `slide_ms`.
    Sliding {
        /// Window length in milliseconds.
        size_ms: i64,
        /// Distance between window starts in milliseconds.
        slide_ms: i64,
    },
}

/// How an aggregate stage cuts event time into windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowConfig {
    /// Tumbling or sliding, with sizes.
    pub kind: WindowKind,
    /// How far behind the newest event time the watermark trails, in milliseconds.
    pub lateness_ms: i64,
}

/// One keyed window.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WindowId {
    /// The events' key (`None` for events without one).
    pub key: Option<Vec<u8>>,
    /// Start in event time, inclusive.
    pub start_ms: i64,
    /// End in event time, exclusive.
    pub end_ms: i64,
}

/// Which windows the events of a batch go to: the input of one `fold` call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// The groups in order of first appearance, each with its events' batch indices in order.
    pub groups: Vec<(WindowId, Vec<u32>)>,
    /// Indices of the late events, in order.
    pub late: Vec<usize>,
    /// The maximum event time after the batch (what [`WindowState::commit`] records).
    pub max_event_ms: Option<i64>,
}

impl WindowConfig {
    /// Tumbling windows of `size` with no lateness.
    ///
    /// Every size of at least 1 ms makes a valid config (longer than `i64::MAX` ms is cut
    /// there); a shorter one makes a config that [`WindowConfig::validate`] and `Stage::new`
    /// refuse.
    pub fn tumbling(size: Duration) -> Self {
        WindowConfig {
            kind: WindowKind::Tumbling {
                size_ms: millis(size),
            },
            lateness_ms: 0,
        }
    }

    /// Sliding windows of `size` every `slide`, with no lateness; refused like the spec
    /// `sliding:SIZE/SLIDE` would be (a size or slide under 1 ms, a slide longer than the
    /// size, more than [`MAX_WINDOWS_PER_EVENT`] windows per event).
    pub fn sliding(size: Duration, slide: Duration) -> Result<Self, WindowError> {
        let config = WindowConfig {
            kind: WindowKind::Sliding {
                size_ms: millis(size),
                slide_ms: millis(slide),
            },
            lateness_ms: 0,
        };
        config.validate()?;
        Ok(config)
    }

    /// The same windows with this allowed lateness.
    pub fn with_lateness(mut self, lateness: Duration) -> Self {
        self.lateness_ms = millis(lateness);
        self
    }

    /// Window length in milliseconds.
    pub fn size_ms(&self) -> i64 {
        match self.kind {
            WindowKind::Tumbling { size_ms } | WindowKind::Sliding { size_ms, .. } => size_ms,
        }
    }

    /// The windows `[start, end)` that contain event time `t`, in start order.
    pub fn windows_of(&self, t: i64) -> Windows {
        // In i128, so that windows at the ends of the i64 range need no special case; the
        // bounds are clamped back into i64 as they are yielded.
        let (size, slide) = match self.kind {
            WindowKind::Tumbling { size_ms } => (size_ms, size_ms),
            WindowKind::Sliding { size_ms, slide_ms } => (size_ms, slide_ms),
        };
        let (t, size, slide) = (
            i128::from(t),
            i128::from(size.max(1)),
            i128::from(slide.max(1)),
        );
        // The last window starts at the multiple of `slide` at or before `t`; the first is the
        // earliest start `s` on that grid with `s + size > t`.
        let last = t - t.rem_euclid(slide);
        let count = (last + size - t + slide - 1) / slide;
        Windows {
            next: last - (count - 1) * slide,
            last,
            size,
            slide,
        }
    }

    /// The watermark after seeing events up to `max_event_ms`.
    pub fn watermark(&self, max_event_ms: Option<i64>) -> Option<i64> {
        max_event_ms.map(|m| m.saturating_sub(self.lateness_ms))
    }

    /// Checks the values: sizes of at least 1 ms, a slide no longer than the size, at most
    /// [`MAX_WINDOWS_PER_EVENT`] windows per event, no negative lateness.
    pub fn validate(&self) -> Result<(), WindowError> {
        self.problem().map_or(Ok(()), |message| {
            Err(WindowError::Invalid {
                window: self.to_string(),
                message,
            })
        })
    }

    /// What is wrong with the values, if anything.
    fn problem(&self) -> Option<String> {
        let (size_ms, slide_ms) = match self.kind {
            WindowKind::Tumbling { size_ms } => (size_ms, None),
            WindowKind::Sliding { size_ms, slide_ms } => (size_ms, Some(slide_ms)),
        };
        if size_ms <= 0 {
            return Some("the window size must be longer than zero".into());
        }
        if let Some(slide_ms) = slide_ms {
            if slide_ms <= 0 {
                return Some("the slide must be longer than zero".into());
            }
            if slide_ms > size_ms {
                return Some(format!(
                    "the slide ({}) is longer than the window ({}): some events would be in \
                     no window",
                    Span(slide_ms),
                    Span(size_ms)
                ));
            }
            let per_event = ceil_div(size_ms, slide_ms);
            if per_event > MAX_WINDOWS_PER_EVENT {
                return Some(format!(
                    "a window of {} sliding every {} puts each event in {per_event} windows; \
                     the cap is {MAX_WINDOWS_PER_EVENT} (slide by at least {})",
                    Span(size_ms),
                    Span(slide_ms),
                    Span(ceil_div(size_ms, MAX_WINDOWS_PER_EVENT))
                ));
            }
        }
        if self.lateness_ms < 0 {
            return Some("the lateness must not be negative".into());
        }
        None
    }
}

/// The windows that contain one event time, in start order: see [`WindowConfig::windows_of`].
#[derive(Debug, Clone)]
pub struct Windows {
    next: i128,
    last: i128,
    size: i128,
    slide: i128,
}

impl Iterator for Windows {
    type Item = (i64, i64);

    fn next(&mut self) -> Option<(i64, i64)> {
        if self.next > self.last {
            return None;
        }
        let start = self.next;
        self.next += self.slide;
        Some((clamp(start), clamp(start + self.size)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = if self.next > self.last {
            0
        } else {
            (self.last - self.next) / self.slide + 1
        };
        let left = usize::try_from(left).unwrap_or(usize::MAX);
        (left, Some(left))
    }
}

impl ExactSizeIterator for Windows {}

impl FromStr for WindowConfig {
    type Err = WindowError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = |message: String| WindowError::Syntax {
            spec: spec.to_owned(),
            message,
        };
        let mut parts = spec
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|p| !p.is_empty());
        let kind = parts.next().ok_or_else(|| bad("no window given".into()))?;
        let kind = if let Some(size) = kind.strip_prefix("tumbling:") {
            WindowKind::Tumbling {
                size_ms: duration(size).map_err(bad)?,
            }
        } else if let Some(sizes) = kind.strip_prefix("sliding:") {
            let (size, slide) = sizes.split_once('/').ok_or_else(|| {
                bad("a sliding window needs a size and a slide: `sliding:SIZE/SLIDE`".into())
            })?;
            WindowKind::Sliding {
                size_ms: duration(size).map_err(bad)?,
                slide_ms: duration(slide).map_err(bad)?,
            }
        } else {
            return Err(bad(format!(
                "unknown window kind `{}`: expected `tumbling:` or `sliding:`",
                kind.split(':').next().unwrap_or(kind)
            )));
        };
        let mut config = WindowConfig {
            kind,
            lateness_ms: 0,
        };
        let mut lateness_seen = false;
        for part in parts {
            match part.strip_prefix("lateness:") {
                Some(_) if lateness_seen => return Err(bad("lateness given twice".into())),
                Some(lateness) => {
                    config.lateness_ms = duration(lateness).map_err(bad)?;
                    lateness_seen = true;
                }
                None => {
                    return Err(bad(format!(
                        "unexpected `{part}`: only `lateness:DURATION` may follow the window"
                    )));
                }
            }
        }
        if let Some(message) = config.problem() {
            return Err(bad(message));
        }
        Ok(config)
    }
}

impl fmt::Display for WindowConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            WindowKind::Tumbling { size_ms } => write!(f, "tumbling:{}", Span(size_ms))?,
            WindowKind::Sliding { size_ms, slide_ms } => {
                write!(f, "sliding:{}/{}", Span(size_ms), Span(slide_ms))?
            }
        }
        if self.lateness_ms != 0 {
            write!(f, ",lateness:{}", Span(self.lateness_ms))?;
        }
        Ok(())
    }
}

/// Milliseconds written with the largest unit that divides them: `90s`, `2m`, `1500ms`.
struct Span(i64);

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        for (unit, per) in [("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
            if ms != 0 && ms % per == 0 {
                return write!(f, "{}{unit}", ms / per);
            }
        }
        write!(f, "{ms}ms")
    }
}

/// Parses `digits unit` into milliseconds.
pub(crate) fn duration(text: &str) -> Result<i64, String> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    if number.is_empty() {
        return Err(format!(
            "`{text}` is not a duration: expected a whole number and a unit (ms, s, m, h), \
             e.g. `10s`"
        ));
    }
    let per: i64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => {
            return Err(format!(
                "`{text}` has no unit: write `{text}s` or `{text}ms`"
            ));
        }
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}`: expected ms, s, m or h"
            ));
        }
    };
    number
        .parse::<i64>()
        .ok()
        .and_then(|n| n.checked_mul(per))
        .ok_or_else(|| format!("`{text}` is too long"))
}

/// `ceil(a / b)` for positive `a` and `b` (`i64::div_ceil` is not stable).
fn ceil_div(a: i64, b: i64) -> i64 {
    a / b + i64::from(a % b != 0)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn clamp(t: i128) -> i64 {
    i64::try_from(t).unwrap_or(if t < 0 { i64::MIN } else { i64::MAX })
}

/// The key under which a window's accumulator is stored: ordered by end, then start, then key,
/// which is the order windows finish and are emitted in.
type Slot = (i64, i64, Option<Vec<u8>>);

/// The host-held state of one aggregate stage: accumulators per (key, window) and event time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowState {
    config: WindowConfig,
    max_event_ms: Option<i64>,
    accs: BTreeMap<Slot, Vec<u8>>,
    /// The layout id of every accumulator here (the plugin version that wrote them declares
    /// it); `None` until a stage sets it.
    layout: Option<String>,
    /// The windows written or removed since [`WindowState::take_changes`], when changes are
    /// tracked (a checkpointed pipeline: only what changed is written).
    changes: Option<BTreeSet<Slot>>,
    /// The latest event time of the whole batch under way, of which this state's worker folds
    /// a part (a pipeline split by key among workers): event time reaches it once the part is
    /// folded, so that every worker's windows close as one worker's would.
    batch_ms: Option<i64>,
}

/// What changed in a [`WindowState`] since [`WindowState::journal`], for
/// [`WindowState::rollback`].
#[derive(Debug)]
pub(crate) struct Journal {
    /// Event time when the journal was opened.
    max_event_ms: Option<i64>,
    /// Every accumulator written, in order, with what the window held before.
    written: Vec<(WindowId, Option<Vec<u8>>)>,
    /// Windows taken out of the state (to be finished) that must go back on a rollback.
    taken: Vec<(WindowId, Vec<u8>)>,
}

impl Journal {
    /// Notes windows taken out of the state whose `finish` did not complete.
    pub(crate) fn taken(&mut self, windows: impl IntoIterator<Item = (WindowId, Vec<u8>)>) {
        self.taken.extend(windows);
    }
}

/// The serialized form; `format` first so that a later layout can be told apart.
#[derive(Serialize, Deserialize)]
struct Stored {
    format: u32,
    max_event_ms: Option<i64>,
    /// The layout id the accumulators were written under.
    layout: Option<String>,
    windows: Vec<StoredWindow>,
}

#[derive(Serialize, Deserialize)]
struct StoredWindow {
    key: Option<Vec<u8>>,
    start_ms: i64,
    end_ms: i64,
    acc: Vec<u8>,
}

/// The state layout this build writes and reads (2: with the accumulators' layout id).
const STATE_FORMAT: u32 = 2;

impl WindowState {
    /// Empty state: no window open, no event seen.
    pub fn new(config: WindowConfig) -> Self {
        WindowState {
            config,
            max_event_ms: None,
            accs: BTreeMap::new(),
            layout: None,
            changes: None,
            batch_ms: None,
        }
    }

    /// State restored from a checkpoint: these windows open, event time at `max_event_ms`,
    /// accumulators of layout `layout`; changes tracked from here on.
    pub fn restore(
        config: WindowConfig,
        layout: Option<String>,
        max_event_ms: Option<i64>,
        windows: impl IntoIterator<Item = (WindowId, Vec<u8>)>,
    ) -> Self {
        WindowState {
            config,
            max_event_ms,
            accs: windows
                .into_iter()
                .map(|(w, acc)| (slot_of(w), acc))
                .collect(),
            layout,
            changes: Some(BTreeSet::new()),
            batch_ms: None,
        }
    }

    /// From now on, remembers which windows change, for [`WindowState::take_changes`].
    pub fn track_changes(&mut self) {
        self.changes.get_or_insert_with(BTreeSet::new);
    }

    /// The windows written or removed since the last call (when changes are tracked): each
    /// with its accumulator now, `None` when it is no longer open.
    pub fn take_changes(&mut self) -> Vec<(WindowId, Option<Vec<u8>>)> {
        let Some(changes) = self.changes.as_mut() else {
            return Vec::new();
        };
        std::mem::take(changes)
            .into_iter()
            .map(|slot| {
                let acc = self.accs.get(&slot).cloned();
                (window_of(slot), acc)
            })
            .collect()
    }

    fn touched(&mut self, slot: &Slot) {
        if let Some(changes) = self.changes.as_mut()
            && !changes.contains(slot)
        {
            changes.insert(slot.clone());
        }
    }

    /// No window open, event time where `other`'s is, accumulators of layout `layout`: where
    /// a version with another layout starts while `other`'s version finishes its windows.
    pub fn continuing(other: &WindowState, layout: Option<String>) -> Self {
        WindowState {
            config: other.config,
            max_event_ms: other.max_event_ms,
            accs: BTreeMap::new(),
            layout,
            changes: other.changes.as_ref().map(|_| BTreeSet::new()),
            batch_ms: None,
        }
    }

    /// The layout id of the accumulators.
    pub fn layout(&self) -> Option<&str> {
        self.layout.as_deref()
    }

    /// Sets the layout id of the accumulators (a stage does, from its plugin).
    pub fn set_layout(&mut self, layout: Option<String>) {
        self.layout = layout;
    }

    /// Whether `window` is open here (has an accumulator).
    pub fn contains(&self, window: &WindowId) -> bool {
        self.accs
            .contains_key(&(window.end_ms, window.start_ms, window.key.clone()))
    }

    /// The window config.
    pub fn config(&self) -> &WindowConfig {
        &self.config
    }

    /// The maximum event time seen so far.
    pub fn max_event_ms(&self) -> Option<i64> {
        self.max_event_ms
    }

    /// The current watermark: max event time seen − lateness.
    pub fn watermark(&self) -> Option<i64> {
        self.config.watermark(self.max_event_ms)
    }

    /// Number of open (key, window) pairs.
    pub fn open_windows(&self) -> usize {
        self.accs.len()
    }

    /// The accumulator of a window, if it was folded into.
    pub fn acc(&self, window: &WindowId) -> Option<&[u8]> {
        self.accs
            .get(&(window.end_ms, window.start_ms, window.key.clone()))
            .map(Vec::as_slice)
    }

    /// Assigns the events of a batch, given as `(key, event time)` in batch order, to windows,
    /// applying the watermark rule event by event. Does not change the state.
    pub fn plan<'a>(&self, events: impl IntoIterator<Item = (Option<&'a [u8]>, i64)>) -> Plan {
        self.plan_some(events, |_| true)
    }

    /// Like [`WindowState::plan`], but assigns events only to the windows `accept` takes. An
    /// event is late only when every window it belongs to has finished, whether accepted or
    /// not, and it moves event time if any of them is open.
    pub fn plan_some<'a>(
        &self,
        events: impl IntoIterator<Item = (Option<&'a [u8]>, i64)>,
        accept: impl Fn(&WindowId) -> bool,
    ) -> Plan {
        let mut plan = Plan {
            max_event_ms: self.max_event_ms,
            ..Plan::default()
        };
        // Probed with the key as the batch holds it: no allocation per event.
        let mut index: HashMap<(Option<&'a [u8]>, i64, i64), usize> = HashMap::new();
        for (i, (key, t)) in events.into_iter().enumerate() {
            let watermark = self.config.watermark(plan.max_event_ms);
            // Batch indices are u32 in the contract; a batch never holds 4 billion events.
            let i32 = u32::try_from(i).unwrap_or(u32::MAX);
            let mut open = false;
            for (start_ms, end_ms) in self.config.windows_of(t) {
                if watermark.is_some_and(|w| w >= end_ms) {
                    continue;
                }
                open = true;
                match index.entry((key, start_ms, end_ms)) {
                    Entry::Occupied(group) => {
                        if let Some(group) = plan.groups.get_mut(*group.get()) {
                            group.1.push(i32);
                        }
                    }
                    Entry::Vacant(slot) => {
                        let id = WindowId {
                            key: key.map(<[u8]>::to_vec),
                            start_ms,
                            end_ms,
                        };
                        if accept(&id) {
                            slot.insert(plan.groups.len());
                            plan.groups.push((id, vec![i32]));
                        } else {
                            // Not taken: later events of this window are skipped likewise.
                            slot.insert(usize::MAX);
                        }
                    }
                }
            }
            if !open {
                plan.late.push(i);
                continue;
            }
            plan.max_event_ms = Some(plan.max_event_ms.map_or(t, |m| m.max(t)));
        }
        plan
    }

    /// Records a fold's result: the new accumulator of each planned group (in plan order) and
    /// the event time the plan reached.
    pub fn commit(&mut self, plan: &Plan, accs: Vec<Vec<u8>>) {
        for ((window, _), acc) in plan.groups.iter().zip(accs) {
            self.set_acc(window.clone(), acc);
        }
        self.observe(plan.max_event_ms);
    }

    /// Stores a window's accumulator.
    pub fn set_acc(&mut self, window: WindowId, acc: Vec<u8>) {
        let slot = slot_of(window);
        self.touched(&slot);
        self.accs.insert(slot, acc);
    }

    /// The latest event time of the whole batch under way, when the stage folds a part of it
    /// (see the field); `None`: the batch is all the stage's.
    pub(crate) fn set_batch_time(&mut self, batch_ms: Option<i64>) {
        self.batch_ms = batch_ms;
    }

    /// Event time reaches the whole batch's, once the stage folded its part of it.
    pub(crate) fn reach_batch_time(&mut self) {
        self.observe(self.batch_ms);
    }

    /// Advances the maximum event time (never moves it back).
    pub fn observe(&mut self, event_ms: Option<i64>) {
        if let Some(t) = event_ms {
            self.max_event_ms = Some(self.max_event_ms.map_or(t, |m| m.max(t)));
        }
    }

    /// Takes out every window the watermark has passed, in (end, start, key) order.
    pub fn take_finished(&mut self) -> Vec<(WindowId, Vec<u8>)> {
        let Some(watermark) = self.watermark() else {
            return Vec::new();
        };
        // Windows with end <= watermark come first in the map's order.
        let rest = match watermark.checked_add(1) {
            Some(after) => self.accs.split_off(&(after, i64::MIN, None)),
            None => BTreeMap::new(),
        };
        let finished = std::mem::replace(&mut self.accs, rest);
        for slot in finished.keys() {
            self.touched(slot);
        }
        finished.into_iter().map(unslot).collect()
    }

    /// Takes out every open window (end of input), in (end, start, key) order.
    pub fn take_all(&mut self) -> Vec<(WindowId, Vec<u8>)> {
        let all = std::mem::take(&mut self.accs);
        for slot in all.keys() {
            self.touched(slot);
        }
        all.into_iter().map(unslot).collect()
    }

    /// Opens a journal of the changes to come, so that [`WindowState::rollback`] can undo
    /// them.
    pub(crate) fn journal(&self) -> Journal {
        Journal {
            max_event_ms: self.max_event_ms,
            written: Vec::new(),
            taken: Vec::new(),
        }
    }

    /// Takes a window's accumulator out of the state (`None` when it holds none), to hand it
    /// to a fold; the id is given back. The caller puts an accumulator back for it, the fold's
    /// ([`WindowState::write_acc`]) or this one ([`WindowState::put_back`]), which notes the
    /// change: taking it out is not one.
    pub(crate) fn take_acc(&mut self, window: WindowId) -> (WindowId, Option<Vec<u8>>) {
        let slot = slot_of(window);
        let acc = self.accs.remove(&slot);
        (window_of(slot), acc)
    }

    /// Puts back what [`WindowState::take_acc`] took (the fold failed).
    pub(crate) fn put_back(&mut self, window: WindowId, acc: Option<Vec<u8>>) {
        if let Some(acc) = acc {
            self.set_acc(window, acc);
        }
    }

    /// Stores the accumulator a fold returned for a window whose previous accumulator
    /// ([`WindowState::take_acc`]) was `previous`, and notes `previous` in the journal.
    pub(crate) fn write_acc(
        &mut self,
        window: WindowId,
        acc: Vec<u8>,
        previous: Option<Vec<u8>>,
        journal: &mut Journal,
    ) {
        journal.written.push((window.clone(), previous));
        self.set_acc(window, acc);
    }

    /// Undoes every change since `journal` was opened: windows taken out to be finished go
    /// back, accumulators written go back to what they were, event time goes back.
    pub(crate) fn rollback(&mut self, journal: Journal) {
        for (window, acc) in journal.taken {
            self.set_acc(window, acc);
        }
        for (window, previous) in journal.written.into_iter().rev() {
            match previous {
                Some(acc) => self.set_acc(window, acc),
                None => {
                    let slot = slot_of(window);
                    self.touched(&slot);
                    self.accs.remove(&slot);
                }
            }
        }
        self.max_event_ms = journal.max_event_ms;
    }

    /// Serializes the state (accumulators and event time; the config is not included).
    pub fn to_bytes(&self) -> Vec<u8> {
        let stored = Stored {
            format: STATE_FORMAT,
            max_event_ms: self.max_event_ms,
            layout: self.layout.clone(),
            windows: self
                .accs
                .iter()
                .map(|((end_ms, start_ms, key), acc)| StoredWindow {
                    key: key.clone(),
                    start_ms: *start_ms,
                    end_ms: *end_ms,
                    acc: acc.clone(),
                })
                .collect(),
        };
        // Serializing plain owned data into a Vec cannot fail.
        postcard::to_allocvec(&stored).unwrap_or_default()
    }

    /// Restores state written by [`WindowState::to_bytes`], under `config`.
    pub fn from_bytes(config: WindowConfig, bytes: &[u8]) -> Result<Self, WindowError> {
        let (stored, rest): (Stored, &[u8]) =
            postcard::take_from_bytes(bytes).map_err(|e| WindowError::State(e.to_string()))?;
        if stored.format != STATE_FORMAT {
            return Err(WindowError::State(format!(
                "format {} is not known to this build (it reads format {STATE_FORMAT})",
                stored.format
            )));
        }
        if !rest.is_empty() {
            return Err(WindowError::State(format!(
                "{} bytes after the end of the state",
                rest.len()
            )));
        }
        let mut state = WindowState::new(config);
        state.max_event_ms = stored.max_event_ms;
        state.layout = stored.layout;
        for w in stored.windows {
            if w.end_ms <= w.start_ms {
                return Err(WindowError::State(format!(
                    "window [{}, {}) ends before it starts",
                    w.start_ms, w.end_ms
                )));
            }
            state.accs.insert((w.end_ms, w.start_ms, w.key), w.acc);
        }
        Ok(state)
    }
}

fn unslot<T>((slot, acc): (Slot, T)) -> (WindowId, T) {
    (window_of(slot), acc)
}

/// Where `window` is kept: ordered by end, then start, then key.
fn slot_of(window: WindowId) -> Slot {
    (window.end_ms, window.start_ms, window.key)
}

/// The window kept at `slot`.
fn window_of((end_ms, start_ms, key): Slot) -> WindowId {
    WindowId {
        key,
        start_ms,
        end_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tumbling(size_ms: i64, lateness_ms: i64) -> WindowConfig {
        WindowConfig {
            kind: WindowKind::Tumbling { size_ms },
            lateness_ms,
        }
    }

    fn sliding(size_ms: i64, slide_ms: i64, lateness_ms: i64) -> WindowConfig {
        WindowConfig {
            kind: WindowKind::Sliding { size_ms, slide_ms },
            lateness_ms,
        }
    }

    fn id(key: Option<&str>, start_ms: i64, end_ms: i64) -> WindowId {
        WindowId {
            key: key.map(|k| k.as_bytes().to_vec()),
            start_ms,
            end_ms,
        }
    }

    /// The windows of `t`, collected.
    fn windows(c: &WindowConfig, t: i64) -> Vec<(i64, i64)> {
        c.windows_of(t).collect()
    }

    /// `(key, t)` pairs as the planner takes them.
    fn events<'a>(list: &'a [(Option<&'a str>, i64)]) -> Vec<(Option<&'a [u8]>, i64)> {
        list.iter()
            .map(|(k, t)| (k.map(str::as_bytes), *t))
            .collect()
    }

    #[test]
    fn parses_the_documented_syntax() {
        assert_eq!(
            "tumbling:60s".parse::<WindowConfig>(),
            Ok(tumbling(60_000, 0))
        );
        assert_eq!(
            "tumbling:1m,lateness:5s".parse::<WindowConfig>(),
            Ok(tumbling(60_000, 5_000))
        );
        assert_eq!(
            "sliding:60s/10s".parse::<WindowConfig>(),
            Ok(sliding(60_000, 10_000, 0))
        );
        assert_eq!(
            "sliding:1h/15m lateness:500ms".parse::<WindowConfig>(),
            Ok(sliding(3_600_000, 900_000, 500))
        );
        assert_eq!(
            " tumbling:250ms , lateness:0s ".parse::<WindowConfig>(),
            Ok(tumbling(250, 0))
        );
    }

    #[test]
    fn displays_in_the_same_syntax() {
        for spec in [
            "tumbling:60s",
            "tumbling:1m,lateness:5s",
            "sliding:1h/15m,lateness:500ms",
            "tumbling:1500ms",
        ] {
            let config: WindowConfig = spec.parse().expect(spec);
            let canonical = match spec {
                "tumbling:60s" => "tumbling:1m",
                other => other,
            };
            assert_eq!(config.to_string(), canonical);
            assert_eq!(config.to_string().parse::<WindowConfig>(), Ok(config));
        }
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let err = |spec: &str| match spec.parse::<WindowConfig>() {
            Err(WindowError::Syntax { message, .. }) => message,
            other => panic!("{spec}: {other:?}"),
        };
        assert_eq!(
            err("hopping:5s"),
            "unknown window kind `hopping`: expected `tumbling:` or `sliding:`"
        );
        assert_eq!(
            err("tumbling:60"),
            "`60` has no unit: write `60s` or `60ms`"
        );
        assert_eq!(
            err("tumbling:60d"),
            "unknown unit `d` in `60d`: expected ms, s, m or h"
        );
        assert_eq!(
            err("tumbling:s"),
            "`s` is not a duration: expected a whole number and a unit (ms, s, m, h), e.g. `10s`"
        );
        assert_eq!(
            err("tumbling:0s"),
            "the window size must be longer than zero"
        );
        assert_eq!(
            err("sliding:60s"),
            "a sliding window needs a size and a slide: `sliding:SIZE/SLIDE`"
        );
        assert_eq!(
            err("sliding:10s/60s"),
            "the slide (1m) is longer than the window (10s): some events would be in no window"
        );
        assert_eq!(
            err("tumbling:1m,late:5s"),
            "unexpected `late:5s`: only `lateness:DURATION` may follow the window"
        );
        assert_eq!(
            err("tumbling:1m,lateness:1s,lateness:2s"),
            "lateness given twice"
        );
        assert_eq!(err(""), "no window given");
        assert_eq!(
            "x".parse::<WindowConfig>().map_err(|e| e.to_string()),
            Err(
                "bad window `x`: unknown window kind `x`: expected `tumbling:` or `sliding:` \
                 (expected e.g. `tumbling:60s`, `sliding:60s/10s`, `tumbling:1m,lateness:5s`)"
                    .to_owned()
            )
        );
    }

    #[test]
    fn too_many_windows_per_event_are_refused() {
        let err = |spec: &str| spec.parse::<WindowConfig>().map_err(|e| e.to_string());
        assert_eq!(
            err("sliding:24h/1ms"),
            Err(
                "bad window `sliding:24h/1ms`: a window of 24h sliding every 1ms puts each \
                 event in 86400000 windows; the cap is 1000 (slide by at least 86400ms) \
                 (expected e.g. `tumbling:60s`, `sliding:60s/10s`, `tumbling:1m,lateness:5s`)"
                    .to_owned()
            )
        );
        assert!(err("sliding:1h/1s").is_err());
        // Exactly at the cap is fine.
        let config: WindowConfig = "sliding:1000s/1s".parse().expect("1000 windows");
        assert_eq!(config.windows_of(123_456).len(), 1000);
        assert_eq!(windows(&config, 123_456).len(), 1000);
    }

    #[test]
    fn constructors_and_validate_refuse_what_parsing_refuses() {
        let e = WindowConfig::sliding(Duration::from_secs(10), Duration::from_secs(60))
            .expect_err("slide longer than the window");
        assert_eq!(
            e.to_string(),
            "bad window `sliding:10s/1m`: the slide (1m) is longer than the window (10s): some \
             events would be in no window"
        );
        let e = WindowConfig::sliding(Duration::from_secs(86_400), Duration::from_millis(1))
            .expect_err("too many windows");
        assert!(e.to_string().contains("the cap is 1000"), "{e}");
        assert_eq!(
            WindowConfig::sliding(Duration::from_secs(60), Duration::from_secs(10)),
            Ok(sliding(60_000, 10_000, 0))
        );
        assert_eq!(
            WindowConfig::tumbling(Duration::from_secs(60)).validate(),
            Ok(())
        );
        assert_eq!(
            WindowConfig::tumbling(Duration::from_micros(500))
                .validate()
                .map_err(|e| e.to_string()),
            Err("bad window `tumbling:0ms`: the window size must be longer than zero".to_owned())
        );
        assert!(tumbling(10, -1).validate().is_err());
    }

    #[test]
    fn tumbling_windows_are_aligned_to_the_epoch() {
        let c = tumbling(60_000, 0);
        assert_eq!(windows(&c, 0), vec![(0, 60_000)]);
        assert_eq!(windows(&c, 59_999), vec![(0, 60_000)]);
        assert_eq!(windows(&c, 60_000), vec![(60_000, 120_000)]);
        assert_eq!(windows(&c, -1), vec![(-60_000, 0)]);
        assert_eq!(
            windows(&c, 1_700_000_012_345),
            vec![(1_699_999_980_000, 1_700_000_040_000)]
        );
    }

    #[test]
    fn sliding_windows_cover_every_start_within_size() {
        let c = sliding(60_000, 20_000, 0);
        assert_eq!(
            windows(&c, 45_000),
            vec![(0, 60_000), (20_000, 80_000), (40_000, 100_000)]
        );
        assert_eq!(
            windows(&c, 60_000),
            vec![(20_000, 80_000), (40_000, 100_000), (60_000, 120_000)]
        );
        assert_eq!(
            windows(&c, -5_000),
            vec![(-60_000, 0), (-40_000, 20_000), (-20_000, 40_000)]
        );
        // A slide that does not divide the size: 2 or 3 windows.
        let c = sliding(50_000, 20_000, 0);
        assert_eq!(
            windows(&c, 5_000),
            vec![(-40_000, 10_000), (-20_000, 30_000), (0, 50_000)]
        );
        assert_eq!(windows(&c, 15_000), vec![(-20_000, 30_000), (0, 50_000)]);
        // slide == size is tumbling.
        assert_eq!(windows(&sliding(10, 10, 0), 25), vec![(20, 30)]);
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        let c = sliding(60_000, 10_000, i64::MAX);
        assert!(c.windows_of(i64::MAX).next().is_some());
        assert!(c.windows_of(i64::MIN).next().is_some());
        assert_eq!(c.watermark(Some(i64::MIN)), Some(i64::MIN));
        let c = tumbling(60_000, 0);
        assert_eq!(c.windows_of(i64::MAX).len(), 1);
    }

    #[test]
    fn plan_groups_by_key_and_window_in_first_appearance_order() {
        let state = WindowState::new(tumbling(10, 0));
        let list = [
            (Some("a"), 1),
            (Some("b"), 2),
            (None, 3),
            (Some("a"), 9),
            (Some("a"), 11),
        ];
        let plan = state.plan(events(&list));
        assert_eq!(
            plan.groups,
            vec![
                (id(Some("a"), 0, 10), vec![0, 3]),
                (id(Some("b"), 0, 10), vec![1]),
                (id(None, 0, 10), vec![2]),
                (id(Some("a"), 10, 20), vec![4]),
            ]
        );
        assert_eq!(plan.late, Vec::<usize>::new());
        assert_eq!(plan.max_event_ms, Some(11));
    }

    #[test]
    fn watermark_advances_event_by_event_and_late_events_are_reported() {
        let state = WindowState::new(tumbling(10, 0));
        // After t=25 the watermark is 25: [0,10) and [10,20) are finished; t=5 and t=19 are late,
        // t=20 is in the open window [20,30).
        let list = [(None, 25), (None, 5), (None, 19), (None, 20)];
        let plan = state.plan(events(&list));
        assert_eq!(plan.groups, vec![(id(None, 20, 30), vec![0, 3])]);
        assert_eq!(plan.late, vec![1, 2]);
        assert_eq!(plan.max_event_ms, Some(25));
    }

    #[test]
    fn lateness_keeps_windows_open_longer() {
        let state = WindowState::new(tumbling(10, 5));
        // Watermark after t=14 is 9: [0,10) still open, so t=3 is folded.
        // After t=15 the watermark is 10: [0,10) finished, t=4 is late.
        let list = [(None, 14), (None, 3), (None, 15), (None, 4)];
        let plan = state.plan(events(&list));
        assert_eq!(
            plan.groups,
            vec![(id(None, 10, 20), vec![0, 2]), (id(None, 0, 10), vec![1])]
        );
        assert_eq!(plan.late, vec![3]);
    }

    #[test]
    fn sliding_events_go_to_their_open_windows_only() {
        let state = WindowState::new(sliding(20, 10, 0));
        // t=35: windows [20,40) and [30,50). Then t=25: [10,30) finished (wm 35 >= 30), [20,40)
        // open. Then t=12: [0,20) and [10,30) both finished: late.
        let list = [(None, 35), (None, 25), (None, 12)];
        let plan = state.plan(events(&list));
        assert_eq!(
            plan.groups,
            vec![(id(None, 20, 40), vec![0, 1]), (id(None, 30, 50), vec![0])]
        );
        assert_eq!(plan.late, vec![2]);
    }

    #[test]
    fn commit_then_take_finished_in_end_order() {
        let mut state = WindowState::new(tumbling(10, 0));
        let list = [(Some("b"), 1), (Some("a"), 2), (Some("a"), 12)];
        let plan = state.plan(events(&list));
        state.commit(&plan, vec![b"b0".to_vec(), b"a0".to_vec(), b"a1".to_vec()]);
        assert_eq!(state.watermark(), Some(12));
        assert_eq!(state.acc(&id(Some("a"), 0, 10)), Some(&b"a0"[..]));
        // Watermark 12 >= 10: both keys' [0,10) finish, key order within the same window.
        assert_eq!(
            state.take_finished(),
            vec![
                (id(Some("a"), 0, 10), b"a0".to_vec()),
                (id(Some("b"), 0, 10), b"b0".to_vec()),
            ]
        );
        assert_eq!(state.open_windows(), 1);
        assert_eq!(state.take_finished(), vec![]);

        // A window finishes exactly when the watermark reaches its end.
        state.observe(Some(19));
        assert_eq!(state.take_finished(), vec![]);
        state.observe(Some(20));
        assert_eq!(
            state.take_finished(),
            vec![(id(Some("a"), 10, 20), b"a1".to_vec())]
        );
        // Event time never goes back.
        state.observe(Some(3));
        assert_eq!(state.max_event_ms(), Some(20));
    }

    #[test]
    fn take_all_flushes_every_open_window() {
        let mut state = WindowState::new(sliding(20, 10, 100));
        let list = [(Some("k"), 5), (Some("k"), 31)];
        let plan = state.plan(events(&list));
        assert_eq!(plan.groups.len(), 4);
        let accs = (0..4).map(|i| vec![i]).collect();
        state.commit(&plan, accs);
        assert_eq!(state.take_finished(), vec![]);
        assert_eq!(
            state.take_all(),
            vec![
                (id(Some("k"), -10, 10), vec![0]),
                (id(Some("k"), 0, 20), vec![1]),
                (id(Some("k"), 20, 40), vec![2]),
                (id(Some("k"), 30, 50), vec![3]),
            ]
        );
        assert_eq!(state.open_windows(), 0);
    }

    #[test]
    fn rollback_undoes_writes_takes_and_event_time() {
        let mut state = WindowState::new(tumbling(10, 0));
        let plan = state.plan(events(&[(Some("a"), 1), (Some("b"), 2)]));
        state.commit(&plan, vec![b"a0".to_vec(), b"b0".to_vec()]);
        let before = state.clone();

        let mut journal = state.journal();
        // A batch folds into `a`'s window (replacing its accumulator) and opens `c`'s ...
        let plan = state.plan(events(&[(Some("a"), 3), (Some("c"), 12)]));
        for ((id, _), acc) in plan
            .groups
            .into_iter()
            .zip([b"a1".to_vec(), b"c1".to_vec()])
        {
            let (id, previous) = state.take_acc(id);
            state.write_acc(id, acc, previous, &mut journal);
        }
        state.observe(plan.max_event_ms);
        // ... then takes out the windows it finished, and fails before they are finished.
        let finished = state.take_finished();
        assert_eq!(finished.len(), 2);
        journal.taken(finished);
        assert_ne!(state, before);
        state.rollback(journal);
        assert_eq!(state, before);
        assert_eq!(state.acc(&id(Some("a"), 0, 10)), Some(&b"a0"[..]));
        assert_eq!(state.acc(&id(Some("c"), 10, 20)), None);
    }

    #[test]
    fn take_acc_and_put_back_move_the_accumulator() {
        let mut state = WindowState::new(tumbling(10, 0));
        state.set_acc(id(Some("a"), 0, 10), b"x".to_vec());
        let (window, acc) = state.take_acc(id(Some("a"), 0, 10));
        assert_eq!(
            (&window, acc.as_deref()),
            (&id(Some("a"), 0, 10), Some(&b"x"[..]))
        );
        assert_eq!(state.open_windows(), 0);
        state.put_back(window, acc);
        assert_eq!(state.acc(&id(Some("a"), 0, 10)), Some(&b"x"[..]));
        let (window, acc) = state.take_acc(id(None, 0, 10));
        assert_eq!(acc, None);
        state.put_back(window, acc);
        assert_eq!(state.open_windows(), 1);
    }

    #[test]
    fn state_round_trips_through_bytes() {
        let config = tumbling(60_000, 5_000);
        let mut state = WindowState::new(config);
        state.set_layout(Some("count/1".into()));
        let list = [(Some("a"), 1_000), (None, 61_000), (Some("a"), 62_000)];
        let plan = state.plan(events(&list));
        state.commit(&plan, vec![b"x".to_vec(), b"yy".to_vec(), vec![]]);
        let bytes = state.to_bytes();
        let back = WindowState::from_bytes(config, &bytes).expect("decodes");
        assert_eq!(back, state);
        assert_eq!(back.layout(), Some("count/1"));
        assert_eq!(back.watermark(), Some(57_000));
        // Empty state too.
        let empty = WindowState::new(config);
        assert_eq!(
            WindowState::from_bytes(config, &empty.to_bytes()),
            Ok(empty)
        );
    }

    #[test]
    fn bad_state_bytes_are_errors() {
        let config = tumbling(10, 0);
        assert!(matches!(
            WindowState::from_bytes(config, &[]),
            Err(WindowError::State(_))
        ));
        let mut bytes = WindowState::new(config).to_bytes();
        bytes[0] = 9;
        assert_eq!(
            WindowState::from_bytes(config, &bytes).map_err(|e| e.to_string()),
            Err(
                "bad window state: format 9 is not known to this build (it reads format 2)"
                    .to_owned()
            )
        );
        let mut bytes = WindowState::new(config).to_bytes();
        bytes.push(0);
        assert_eq!(
            WindowState::from_bytes(config, &bytes).map_err(|e| e.to_string()),
            Err("bad window state: 1 bytes after the end of the state".to_owned())
        );
    }

    #[test]
    fn tracked_changes_are_the_windows_written_or_finished_since_the_last_take() {
        let mut state = WindowState::new(tumbling(10, 0));
        state.set_acc(id(Some("untracked"), 0, 10), b"x".to_vec());
        state.track_changes();
        assert_eq!(state.take_changes(), []);
        state.set_acc(id(Some("a"), 0, 10), b"1".to_vec());
        state.set_acc(id(Some("a"), 0, 10), b"2".to_vec());
        state.set_acc(id(Some("b"), 10, 20), b"3".to_vec());
        assert_eq!(
            state.take_changes(),
            [
                (id(Some("a"), 0, 10), Some(b"2".to_vec())),
                (id(Some("b"), 10, 20), Some(b"3".to_vec())),
            ]
        );
        // The watermark passes 10: both windows ending there finish.
        state.observe(Some(15));
        let finished: Vec<WindowId> = state.take_finished().into_iter().map(|(w, _)| w).collect();
        assert_eq!(
            finished,
            [id(Some("a"), 0, 10), id(Some("untracked"), 0, 10)]
        );
        // A fold taken out and put back changed nothing, but is written again (harmless).
        let (w, acc) = state.take_acc(id(Some("b"), 10, 20));
        state.put_back(w, acc);
        assert_eq!(
            state.take_changes(),
            [
                (id(Some("a"), 0, 10), None),
                (id(Some("untracked"), 0, 10), None),
                (id(Some("b"), 10, 20), Some(b"3".to_vec())),
            ]
        );
        // Restored state tracks from the start, and a rollback's removals count.
        let mut restored = WindowState::restore(
            tumbling(10, 0),
            Some("auto:1".into()),
            Some(15),
            [(id(None, 10, 20), b"r".to_vec())],
        );
        let journal = restored.journal();
        let (w, previous) = restored.take_acc(id(None, 20, 30));
        restored.write_acc(w, b"new".to_vec(), previous, &mut { journal });
        let mut journal = restored.journal();
        let (w, previous) = restored.take_acc(id(None, 30, 40));
        restored.write_acc(w, b"gone".to_vec(), previous, &mut journal);
        restored.rollback(journal);
        assert_eq!(
            restored.take_changes(),
            [
                (id(None, 20, 30), Some(b"new".to_vec())),
                (id(None, 30, 40), None),
            ]
        );
        assert_eq!(restored.layout(), Some("auto:1"));
        assert_eq!(restored.max_event_ms(), Some(15));
    }
}
