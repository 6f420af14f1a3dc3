//! geo-enrich: adds a country name header, looked up from a code in the event's JSON value.
//!
//! Config (`with` in the pipeline): `table` (code → name, required), `field` (the value's
//! field holding the code, default `country_code`), `header` (default `country`) and `default`
//! (the name for codes not in the table; without it those events pass through unchanged). An
//! event that gets the header also gets the route tag: its code lowercased. A value that is not
//! JSON fails the event. (geo-enrich-v2 is its next version, with the same config.)

use weir_sdk::Emitter;

include!("../../shared/geo.rs");

/// Adds the header and route tag when the code is known; passes the event through otherwise.
#[weir_sdk::enrich]
pub fn geo(e: &Event, out: &mut Emitter, cfg: &Geo) -> Result<()> {
    match lookup(e, cfg)? {
        Some((code, name)) => out
            .edit(e)
            .with_header(cfg.header(), name)
            .with_route(code.to_ascii_lowercase())
            .emit(),
        None => out.pass(e),
    }
    Ok(())
}
