//! geo-enrich: adds a country name header, looked up from a code in the event's JSON value.
//!
//! Config (`with` in the pipeline): `table` (code → name, required), `field` (the value's
//! field holding the code, default `country_code`), `header` (default `country`) and `default`
//! (the name for codes not in the table; without it those events pass through unchanged). An
//! event that gets the header also gets the route tag: its code lowercased. A value that is not
//! JSON fails the event.

use std::collections::HashMap;
use weir_sdk::{Emitter, Event, Result};

/// The stage's config.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Geo {
    table: HashMap<String, String>,
    field: Option<String>,
    header: Option<String>,
    default: Option<String>,
}

/// Adds the header and route tag when the code is known; passes the event through otherwise.
#[weir_sdk::enrich]
pub fn geo(e: &Event, out: &mut Emitter, cfg: &Geo) -> Result<()> {
    let value: serde_json::Value = e.json()?;
    let code = value[cfg.field.as_deref().unwrap_or("country_code")].as_str();
    match code.and_then(|c| Some((c, cfg.table.get(c).or(cfg.default.as_ref())?))) {
        Some((code, name)) => out
            .edit(e)
            .with_header(cfg.header.as_deref().unwrap_or("country"), name)
            .with_route(code.to_ascii_lowercase())
            .emit(),
        None => out.pass(e),
    }
    Ok(())
}
