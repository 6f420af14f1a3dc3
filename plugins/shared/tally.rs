// The body of tally-a and tally-b (`include!`d with `VERSION` defined): counts the events of
// each window; a finished window emits `count=N` with the header `version` set to `VERSION`.
// Both versions have the same accumulator (`Count(u64)`), so the same state layout: a swap
// carries the open windows over.

use weir_sdk::{Aggregate, Emitter, Event, NoConfig, OwnedEvent, Result, Window};

/// Events folded into one window.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Count(u64);

#[weir_sdk::aggregate]
impl Aggregate for Count {
    type Config = NoConfig;

    fn fold(&mut self, _: &Event, _: &NoConfig) -> Result<()> {
        self.0 += 1;
        Ok(())
    }

    fn finish(self, w: &Window, out: &mut Emitter, _: &NoConfig) -> Result<()> {
        let mut event = OwnedEvent::new(format!("count={}", self.0), w.end_ms - 1)
            .with_header("version", VERSION);
        event.key = w.key.clone();
        out.emit(event);
        Ok(())
    }
}
