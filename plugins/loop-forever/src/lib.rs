//! loop-forever: a misbehaving filter for tests. It never returns from an event whose value
//! contains the bytes `poison` (the host's epoch deadline must stop it) and keeps every other
//! event.

use weir_sdk::Event;

/// Keeps the event, or spins forever on a marked one.
#[weir_sdk::filter]
pub fn keep(e: &Event) -> bool {
    if e.value().windows(6).any(|w| w == b"poison") {
        loop {
            std::hint::spin_loop();
        }
    }
    true
}
