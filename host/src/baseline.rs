//! Native Rust doing the work of the example plugins, for side-by-side measurement.
//!
//! `weir bench` and the criterion benches run a plugin and then these functions over the same
//! batches in the same process, and report the ratio (DESIGN §8: compare in one run, never
//! against a figure from another day). Each mirrors its plugin in plugins/ step by step, and
//! produces the same output a [`crate::pipeline::Stage`] produces for that plugin (same events,
//! same `source` indices), so that the ratio measures the sandbox and the batch ABI, not a
//! difference in work:
//!
//! - [`NativeFilter`]: plugins/drop-bots (the `user-agent` header contains `bot`, `crawler` or
//!   `spider`, ASCII case-insensitive), kept events re-encoded.
//! - [`NativeEnrich`]: plugins/geo-enrich with the demo's config (field `country_code`, header
//!   `country`, no default): parse the JSON value, look the code up, add the header and the
//!   route tag, every event re-encoded.
//! - [`NativeAggregate`]: plugins/count-sum (parse the JSON value, count and sum `amount` per
//!   key per window, emit finished windows as JSON).
//!
//! For a plugin that is not one of the examples, the native side is the example of the same
//! kind: a typical plugin's work, which `weir bench` says in its output.

use crate::pipeline::WindowConfig;
use std::collections::{BTreeMap, HashMap};
use weir_format::{Batch, BatchBuilder, EventRef, KeepBitmap};

/// Whether a user agent contains `bot`, `crawler` or `spider`, ignoring ASCII case.
pub fn is_bot(agent: &[u8]) -> bool {
    agent.iter().enumerate().any(|(i, byte)| {
        let mark: &[u8] = match byte.to_ascii_lowercase() {
            b'b' => b"bot",
            b'c' => b"crawler",
            b's' => b"spider",
            _ => return false,
        };
        agent
            .get(i..i + mark.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(mark))
    })
}

/// Whether drop-bots keeps this event.
pub fn keep(event: &EventRef<'_>) -> bool {
    event
        .header("user-agent")
        .is_none_or(|agent| !is_bot(agent))
}

/// drop-bots, natively.
#[derive(Default)]
pub struct NativeFilter {
    builder: BatchBuilder,
}

impl NativeFilter {
    /// The keep-bitmap drop-bots returns for `batch`.
    pub fn bitmap(batch: &Batch<'_>) -> KeepBitmap {
        let mut bitmap = KeepBitmap::none(batch.len());
        for (i, event) in batch.iter().enumerate() {
            if keep(&event) {
                bitmap.set(i, true);
            }
        }
        bitmap
    }

    /// The stage output for `batch`: the kept events re-encoded, their `source` passed on as
    /// a filter stage passes it.
    pub fn process(&mut self, batch: &Batch<'_>) -> Vec<u8> {
        for event in batch.iter() {
            if keep(&event) {
                self.builder.push_ref(&event, event.source());
            }
        }
        self.builder.finish()
    }
}

/// geo-enrich, natively, with the demo's lookup table.
pub struct NativeEnrich {
    table: HashMap<String, String>,
    builder: BatchBuilder,
}

impl NativeEnrich {
    /// Looks codes up in `table` (code → name) from the `country_code` field into `country`.
    pub fn new(table: HashMap<String, String>) -> Self {
        NativeEnrich {
            table,
            builder: BatchBuilder::new(),
        }
    }

    /// The stage output for `batch`. Events whose value is not JSON are skipped (the plugin
    /// dead-letters them).
    pub fn process(&mut self, batch: &Batch<'_>) -> Vec<u8> {
        for (i, event) in batch.iter().enumerate() {
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(event.value()) else {
                continue;
            };
            let code = value.get("country_code").and_then(|c| c.as_str());
            match code.and_then(|c| Some((c, self.table.get(c)?))) {
                Some((code, name)) => {
                    let route = code.to_ascii_lowercase();
                    let headers = event
                        .headers()
                        .filter(|(n, _)| *n != "country")
                        .chain([("country", name.as_bytes())]);
                    self.builder.push_parts(
                        event.key(),
                        event.value(),
                        event.timestamp_ms(),
                        headers,
                        Some(&route),
                        i as u32,
                    );
                }
                None => self.builder.push_ref(&event, i as u32),
            }
        }
        self.builder.finish()
    }
}

/// A window by its start and key.
type WindowKey = (i64, Option<Vec<u8>>);

/// count-sum, natively: count and sum of `amount` per key per window.
pub struct NativeAggregate {
    window: WindowConfig,
    open: BTreeMap<WindowKey, (u64, f64)>,
    max_event_ms: Option<i64>,
    builder: BatchBuilder,
}

impl NativeAggregate {
    /// An empty aggregate over `window`.
    pub fn new(window: WindowConfig) -> Self {
        NativeAggregate {
            window,
            open: BTreeMap::new(),
            max_event_ms: None,
            builder: BatchBuilder::new(),
        }
    }

    /// Folds `batch` and returns the windows it finished, as count-sum emits them.
    pub fn process(&mut self, batch: &Batch<'_>) -> Vec<u8> {
        for event in batch.iter() {
            let t = event.timestamp_ms();
            let watermark = self.window.watermark(self.max_event_ms);
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(event.value()) else {
                continue;
            };
            let Some(amount) = value.get("amount").and_then(|n| n.as_f64()) else {
                continue;
            };
            for (start, end) in self.window.windows_of(t) {
                if watermark.is_some_and(|w| w >= end) {
                    continue;
                }
                let acc = self
                    .open
                    .entry((start, event.key().map(<[u8]>::to_vec)))
                    .or_default();
                acc.0 += 1;
                acc.1 += amount;
            }
            self.max_event_ms = self.max_event_ms.max(Some(t));
        }
        let watermark = self.window.watermark(self.max_event_ms);
        let size = self.window.size_ms();
        let finished: Vec<_> = self
            .open
            .keys()
            .filter(|(start, _)| watermark.is_some_and(|w| w >= start + size))
            .cloned()
            .collect();
        for (i, id) in finished.into_iter().enumerate() {
            if let Some((count, sum)) = self.open.remove(&id) {
                let (start, key) = id;
                let value = serde_json::json!({
                    "count": count, "sum": sum, "start_ms": start, "end_ms": start + size
                });
                self.builder.push_parts(
                    key.as_deref(),
                    value.to_string().as_bytes(),
                    start + size - 1,
                    [],
                    None,
                    i as u32,
                );
            }
        }
        self.builder.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bot_marks_match_in_any_case() {
        assert!(is_bot(b"Mozilla/5.0 (compatible; Googlebot/2.1)"));
        assert!(is_bot(b"BaiduSPIDER"));
        assert!(is_bot(b"x-Crawler"));
        assert!(!is_bot(b"Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0"));
        assert!(!is_bot(b"bo"));
    }
}
