//! panic-on-mark: a misbehaving filter for tests. It panics on an event whose value contains
//! the bytes `poison` and keeps every other event. The panic message reaches the host log
//! (the SDK's panic hook), then the instance traps.

use weir_sdk::Event;

/// Keeps the event, or panics on a marked one.
#[weir_sdk::filter]
pub fn keep(e: &Event) -> bool {
    if e.value().windows(6).any(|w| w == b"poison") {
        panic!("poison event at timestamp {}", e.timestamp_ms());
    }
    true
}
