"""geo-enrich in Python: adds a country name header, looked up from a code in the event's JSON
value, and the code lowercased as the route tag (what plugins/geo-enrich does in Rust).

Config: `table` (code -> name, required), `field` (default `country_code`), `header` (default
`country`) and `default` (the name for codes not in the table; without it those events pass
through unchanged). A value that is not JSON fails the event."""

import json

import weir


@weir.enrich
def geo(event, out, config):
    value = json.loads(event.value)
    code = value.get(config.get("field", "country_code")) if isinstance(value, dict) else None
    name = config["table"].get(code, config.get("default")) if isinstance(code, str) else None
    if name is None:
        out.emit()
    else:
        out.add_headers({config.get("header", "country"): name}, route=code.lower())
