//! count-sum: count and sum of a numeric JSON field, per key per window.
//!
//! Config: `field` (default `amount`). An event whose value has no such number fails. A
//! finished window emits one event: key = the window's key, timestamp = window end - 1, value
//! `{"count":N,"sum":S,"start_ms":...,"end_ms":...}`.

use serde::{Deserialize, Serialize};
use weir_sdk::{Aggregate, Context, Emitter, Event, OwnedEvent, Result, Window};

/// The stage's config.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SumConfig {
    field: Option<String>,
}

/// The accumulator of one window, which the host keeps between batches. `finish` fills in the
/// window's bounds and emits it as the window's total.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CountSum {
    count: u64,
    sum: f64,
    start_ms: i64,
    end_ms: i64,
}

#[weir_sdk::aggregate]
impl Aggregate for CountSum {
    type Config = SumConfig;

    fn fold(&mut self, e: &Event, cfg: &SumConfig) -> Result<()> {
        let field = cfg.field.as_deref().unwrap_or("amount");
        let n = e.json::<serde_json::Value>()?[field].as_f64();
        self.sum += n.with_context(|| format!("`{field}` is not a number"))?;
        self.count += 1;
        Ok(())
    }

    fn finish(mut self, w: &Window, out: &mut Emitter, _: &SumConfig) -> Result<()> {
        (self.start_ms, self.end_ms) = (w.start_ms, w.end_ms);
        let mut total = OwnedEvent::json(&self, w.end_ms - 1)?;
        total.key = w.key.clone();
        out.emit(total);
        Ok(())
    }
}
