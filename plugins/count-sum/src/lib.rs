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
    #[serde(default = "default_field")]
    field: String,
}

fn default_field() -> String {
    "amount".into()
}

/// The accumulator of one window; the host keeps it between batches.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CountSum {
    count: u64,
    sum: f64,
}

#[weir_sdk::aggregate]
impl Aggregate for CountSum {
    type Config = SumConfig;

    fn fold(&mut self, e: &Event, cfg: &SumConfig) -> Result<()> {
        let value: serde_json::Value = e.json()?;
        let n = value.get(&cfg.field).and_then(|n| n.as_f64());
        self.sum += n.with_context(|| format!("`{}` is not a number", cfg.field))?;
        self.count += 1;
        Ok(())
    }

    fn finish(self, w: &Window, out: &mut Emitter, _: &SumConfig) -> Result<()> {
        #[derive(Serialize)]
        struct Total {
            count: u64,
            sum: f64,
            start_ms: i64,
            end_ms: i64,
        }
        let total = Total {
            count: self.count,
            sum: self.sum,
            start_ms: w.start_ms,
            end_ms: w.end_ms,
        };
        let mut event = OwnedEvent::json(&total, w.end_ms - 1)?;
        event.key = w.key.clone();
        out.emit(event);
        Ok(())
    }
}
