//! trap-always: a test plugin, an enrich that panics on every event (the instance traps): a
//! version that can never serve, for the tests of deploys that must roll back.

/// Panics.
#[weir_sdk::enrich]
pub fn tag(e: &weir_sdk::Event, _out: &mut weir_sdk::Emitter) {
    panic!(
        "trap-always traps on every event (this one at {})",
        e.timestamp_ms()
    );
}
