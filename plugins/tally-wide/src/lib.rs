//! tally-wide: a test plugin, the aggregate of tally-a and tally-b with a wider accumulator
//! (the count and the first event time), so another state layout: a deploy of it over tally-a
//! with windows open is refused, or drains them (`weir deploy --state drain`). A finished
//! window emits `count=N` tagged `version: wide`.

use weir_sdk::{Aggregate, Emitter, Event, NoConfig, OwnedEvent, Result, Window};

/// Events folded into one window, and the first one's time.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    count: u64,
    first_ms: i64,
}

#[weir_sdk::aggregate]
impl Aggregate for Tally {
    type Config = NoConfig;

    fn fold(&mut self, e: &Event, _: &NoConfig) -> Result<()> {
        if self.count == 0 {
            self.first_ms = e.timestamp_ms();
        }
        self.count += 1;
        Ok(())
    }

    fn finish(self, w: &Window, out: &mut Emitter, _: &NoConfig) -> Result<()> {
        let mut event = OwnedEvent::new(format!("count={}", self.count), w.end_ms - 1)
            .with_header("version", "wide");
        event.key = w.key.clone();
        out.emit(event);
        Ok(())
    }
}
