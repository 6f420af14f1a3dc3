//! geo-enrich-v2: version 2 of geo-enrich, which `weir demo` deploys into its running router.
//! The same config, header and route tag, and one more header: `region`, `eu` for a code of a
//! member state of the European Union, `other` for any other code the table knows.

use weir_sdk::Emitter;

include!("../../shared/geo.rs");

/// Country codes of the member states of the European Union.
const EU: [&str; 27] = [
    "AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU", "IE", "IT",
    "LT", "LU", "LV", "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK",
];

/// Adds the headers and route tag when the code is known; passes the event through otherwise.
#[weir_sdk::enrich]
pub fn geo(e: &Event, out: &mut Emitter, cfg: &Geo) -> Result<()> {
    match lookup(e, cfg)? {
        Some((code, name)) => {
            let region = if EU.contains(&code.as_str()) {
                "eu"
            } else {
                "other"
            };
            out.edit(e)
                .with_header(cfg.header(), name)
                .with_header("region", region)
                .with_route(code.to_ascii_lowercase())
                .emit();
        }
        None => out.pass(e),
    }
    Ok(())
}
