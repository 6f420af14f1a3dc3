// The config and the lookup of geo-enrich and its version 2, geo-enrich-v2 (`include!`d by
// both): the two versions read the same `with` values, so that one can be deployed over the
// other in a running router.

use std::collections::HashMap;
use weir_sdk::{Event, Result};

/// The stage's config.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Geo {
    table: HashMap<String, String>,
    field: Option<String>,
    header: Option<String>,
    default: Option<String>,
}

impl Geo {
    /// The header the country name goes into.
    fn header(&self) -> &str {
        self.header.as_deref().unwrap_or("country")
    }
}

/// The event's country code and the name it maps to, if the table (or the default) has one.
/// A value that is not JSON fails the event.
fn lookup<'c>(e: &Event, cfg: &'c Geo) -> Result<Option<(String, &'c str)>> {
    let value: serde_json::Value = e.json()?;
    let code = value[cfg.field.as_deref().unwrap_or("country_code")].as_str();
    Ok(code.and_then(|c| {
        let name = cfg.table.get(c).or(cfg.default.as_ref())?;
        Some((c.to_owned(), name.as_str()))
    }))
}
