// geo-enrich in JavaScript: adds a country name header, looked up from a code in the event's
// JSON value, and the code lowercased as the route tag (what plugins/geo-enrich does in Rust).
//
// Config: `table` (code -> name, required), `field` (default `country_code`), `header` (default
// `country`) and `default` (the name for codes not in the table; without it those events pass
// through unchanged). A value that is not JSON fails the event.

import * as weir from "weir";

export function geo(event, out, config) {
  const value = event.json();
  const code = value !== null && typeof value === "object" ? value[config.field ?? "country_code"] : undefined;
  const name = typeof code === "string" ? (Object.hasOwn(config.table, code) ? config.table[code] : config.default) : undefined;
  if (name === undefined) {
    out.emit();
  } else {
    out.addHeaders({ [config.header ?? "country"]: name }, { route: code.toLowerCase() });
  }
}

export const { init, enrich } = weir.enrich(geo);
