//! bad-finish: a misbehaving aggregate for tests. It counts events per window, and:
//!
//! - `fold` panics on an event whose value contains `poison`, and spins forever on one whose
//!   value contains `forever` (the host's deadline must stop it);
//! - `finish` panics on a window whose key is `poison`, and fails with an `Err` on a window
//!   whose key is `refuse`.
//!
//! A finished window emits one event: key = the window's key, timestamp = window end - 1,
//! value `count=N`.

use weir_sdk::{Aggregate, Emitter, Error, Event, NoConfig, OwnedEvent, Result, Window};

/// Events folded into one window.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Count(u64);

fn marked(bytes: &[u8], mark: &[u8]) -> bool {
    bytes.windows(mark.len()).any(|w| w == mark)
}

#[weir_sdk::aggregate]
impl Aggregate for Count {
    type Config = NoConfig;

    fn fold(&mut self, e: &Event, _: &NoConfig) -> Result<()> {
        if marked(e.value(), b"poison") {
            panic!("poison event at timestamp {}", e.timestamp_ms());
        }
        if marked(e.value(), b"forever") {
            loop {
                std::hint::spin_loop();
            }
        }
        self.0 += 1;
        Ok(())
    }

    fn finish(self, w: &Window, out: &mut Emitter, _: &NoConfig) -> Result<()> {
        match w.key.as_deref() {
            Some(b"poison") => panic!("poison window starting at {}", w.start_ms),
            Some(b"refuse") => return Err(Error::new("refused")),
            _ => {}
        }
        let mut event = OwnedEvent::new(format!("count={}", self.0), w.end_ms - 1);
        event.key = w.key.clone();
        out.emit(event);
        Ok(())
    }
}
