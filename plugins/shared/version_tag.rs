// The body of version-a and version-b (`include!`d with `VERSION` defined): an enrich that
// passes every event on with the header `version` set to `VERSION`, so that a test can tell
// which of two versions of a stage processed each event.

/// Passes the event on, tagged with this version.
#[weir_sdk::enrich]
pub fn tag(e: &weir_sdk::Event, out: &mut weir_sdk::Emitter) {
    out.edit(e).with_header("version", VERSION).emit();
}
