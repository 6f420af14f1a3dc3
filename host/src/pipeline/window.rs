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
//!   exceed `size` (that would leave events in no window).
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
//! # State
//!
//! [`WindowState`] holds the accumulator bytes per (key, window) and the maximum event time
//! seen. [`WindowState::to_bytes`] / [`WindowState::from_bytes`] (postcard, with a format
//! number first) carry it across a hot swap or a restart; each stored window keeps its own
//! start and end, so state stays meaningful if the window config changes in between.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::collections::HashMap;
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
    /// Bytes that are not window state this build can read.
    #[error("bad window state: {0}")]
    State(String),
}

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
    pub fn tumbling(size: Duration) -> Self {
        WindowConfig {
            kind: WindowKind::Tumbling {
                size_ms: millis(size),
            },
            lateness_ms: 0,
        }
    }

    /// Sliding windows of `size` every `slide`, with no lateness.
    pub fn sliding(size: Duration, slide: Duration) -> Self {
        WindowConfig {
            kind: WindowKind::Sliding {
                size_ms: millis(size),
                slide_ms: millis(slide),
            },
            lateness_ms: 0,
        }
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
    pub fn windows_of(&self, t: i64) -> Vec<(i64, i64)> {
        // In i128, so that windows at the ends of the i64 range need no special case; the
        // bounds are clamped back into i64 at the end.
        let (size, slide) = match self.kind {
            WindowKind::Tumbling { size_ms } => (size_ms, size_ms),
            WindowKind::Sliding { size_ms, slide_ms } => (size_ms, slide_ms),
        };
        let (t, size, slide) = (
            i128::from(t),
            i128::from(size.max(1)),
            i128::from(slide.max(1)),
        );
        let mut start = t - t.rem_euclid(slide);
        let mut windows = Vec::new();
        while start + size > t {
            windows.push((clamp(start), clamp(start + size)));
            start -= slide;
        }
        windows.reverse();
        windows
    }

    /// The watermark after seeing events up to `max_event_ms`.
    pub fn watermark(&self, max_event_ms: Option<i64>) -> Option<i64> {
        max_event_ms.map(|m| m.saturating_sub(self.lateness_ms))
    }

    fn validate(&self) -> Result<(), String> {
        match self.kind {
            WindowKind::Tumbling { size_ms } if size_ms <= 0 => {
                Err("the window size must be longer than zero".into())
            }
            WindowKind::Sliding { size_ms, .. } if size_ms <= 0 => {
                Err("the window size must be longer than zero".into())
            }
            WindowKind::Sliding { slide_ms, .. } if slide_ms <= 0 => {
                Err("the slide must be longer than zero".into())
            }
            WindowKind::Sliding { size_ms, slide_ms } if slide_ms > size_ms => Err(format!(
                "the slide ({}) is longer than the window ({}): some events would be in no window",
                Span(slide_ms),
                Span(size_ms)
            )),
            _ if self.lateness_ms < 0 => Err("the lateness must not be negative".into()),
            _ => Ok(()),
        }
    }
}

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
        config.validate().map_err(bad)?;
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
fn duration(text: &str) -> Result<i64, String> {
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
}

/// The serialized form; `format` first so that a later layout can be told apart.
#[derive(Serialize, Deserialize)]
struct Stored {
    format: u32,
    max_event_ms: Option<i64>,
    windows: Vec<StoredWindow>,
}

#[derive(Serialize, Deserialize)]
struct StoredWindow {
    key: Option<Vec<u8>>,
    start_ms: i64,
    end_ms: i64,
    acc: Vec<u8>,
}

/// The state layout this build writes and reads.
const STATE_FORMAT: u32 = 1;

impl WindowState {
    /// Empty state: no window open, no event seen.
    pub fn new(config: WindowConfig) -> Self {
        WindowState {
            config,
            max_event_ms: None,
            accs: BTreeMap::new(),
        }
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
        let mut plan = Plan {
            max_event_ms: self.max_event_ms,
            ..Plan::default()
        };
        let mut index: HashMap<WindowId, usize> = HashMap::new();
        for (i, (key, t)) in events.into_iter().enumerate() {
            let watermark = self.config.watermark(plan.max_event_ms);
            let open: Vec<(i64, i64)> = self
                .config
                .windows_of(t)
                .into_iter()
                .filter(|&(_, end)| watermark.is_none_or(|w| w < end))
                .collect();
            if open.is_empty() {
                plan.late.push(i);
                continue;
            }
            // Batch indices are u32 in the contract; a batch never holds 4 billion events.
            let i32 = u32::try_from(i).unwrap_or(u32::MAX);
            for (start_ms, end_ms) in open {
                let id = WindowId {
                    key: key.map(<[u8]>::to_vec),
                    start_ms,
                    end_ms,
                };
                match index.get(&id) {
                    Some(&g) => plan.groups[g].1.push(i32),
                    None => {
                        index.insert(id.clone(), plan.groups.len());
                        plan.groups.push((id, vec![i32]));
                    }
                }
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
        self.accs
            .insert((window.end_ms, window.start_ms, window.key), acc);
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
        finished.into_iter().map(unslot).collect()
    }

    /// Takes out every open window (end of input), in (end, start, key) order.
    pub fn take_all(&mut self) -> Vec<(WindowId, Vec<u8>)> {
        std::mem::take(&mut self.accs)
            .into_iter()
            .map(unslot)
            .collect()
    }

    /// Serializes the state (accumulators and event time; the config is not included).
    pub fn to_bytes(&self) -> Vec<u8> {
        let stored = Stored {
            format: STATE_FORMAT,
            max_event_ms: self.max_event_ms,
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

fn unslot(((end_ms, start_ms, key), acc): (Slot, Vec<u8>)) -> (WindowId, Vec<u8>) {
    (
        WindowId {
            key,
            start_ms,
            end_ms,
        },
        acc,
    )
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
    fn tumbling_windows_are_aligned_to_the_epoch() {
        let c = tumbling(60_000, 0);
        assert_eq!(c.windows_of(0), vec![(0, 60_000)]);
        assert_eq!(c.windows_of(59_999), vec![(0, 60_000)]);
        assert_eq!(c.windows_of(60_000), vec![(60_000, 120_000)]);
        assert_eq!(c.windows_of(-1), vec![(-60_000, 0)]);
        assert_eq!(
            c.windows_of(1_700_000_012_345),
            vec![(1_699_999_980_000, 1_700_000_040_000)]
        );
    }

    #[test]
    fn sliding_windows_cover_every_start_within_size() {
        let c = sliding(60_000, 20_000, 0);
        assert_eq!(
            c.windows_of(45_000),
            vec![(0, 60_000), (20_000, 80_000), (40_000, 100_000)]
        );
        assert_eq!(
            c.windows_of(60_000),
            vec![(20_000, 80_000), (40_000, 100_000), (60_000, 120_000)]
        );
        assert_eq!(
            c.windows_of(-5_000),
            vec![(-60_000, 0), (-40_000, 20_000), (-20_000, 40_000)]
        );
        // A slide that does not divide the size: 2 or 3 windows.
        let c = sliding(50_000, 20_000, 0);
        assert_eq!(
            c.windows_of(5_000),
            vec![(-40_000, 10_000), (-20_000, 30_000), (0, 50_000)]
        );
        assert_eq!(c.windows_of(15_000), vec![(-20_000, 30_000), (0, 50_000)]);
        // slide == size is tumbling.
        assert_eq!(sliding(10, 10, 0).windows_of(25), vec![(20, 30)]);
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        let c = sliding(60_000, 10_000, i64::MAX);
        assert!(!c.windows_of(i64::MAX).is_empty());
        assert!(!c.windows_of(i64::MIN).is_empty());
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
    fn state_round_trips_through_bytes() {
        let config = tumbling(60_000, 5_000);
        let mut state = WindowState::new(config);
        let list = [(Some("a"), 1_000), (None, 61_000), (Some("a"), 62_000)];
        let plan = state.plan(events(&list));
        state.commit(&plan, vec![b"x".to_vec(), b"yy".to_vec(), vec![]]);
        let bytes = state.to_bytes();
        let back = WindowState::from_bytes(config, &bytes).expect("decodes");
        assert_eq!(back, state);
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
                "bad window state: format 9 is not known to this build (it reads format 1)"
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
}
