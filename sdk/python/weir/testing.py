"""Runs a plugin function natively, in plain CPython, over events in weir's JSON-lines mapping
(the one `weir test` reads and prints), through the same batch code as in the sandbox::

    from weir import testing
    from app import keep

    out = testing.run(keep, ['{"value":{"amount":5},"timestamp_ms":1}'], {"min": 3})

A line's `value` (any JSON) becomes its compact JSON text; `value_text` and `value_b64`,
`key` and `key_b64`, `headers` (an object, or [name, value] pairs; a value may be
{"b64": ...}), `route` and `timestamp_ms` (default 0) are read as `weir test` reads them.
"""

import base64
import json

from . import enrich_batch, keep_bitmap, parse_config
from .batch import Batch, BatchBuilder


def _b64(text):
    return base64.b64decode(text.encode("ascii"), validate=True)


def _header_value(value):
    if isinstance(value, dict):
        return _b64(value["b64"])
    return value.encode("utf-8")


def event(line):
    """One JSON line as the event fields `BatchBuilder.push` takes."""
    fields = json.loads(line)
    known = {"key", "key_b64", "value", "value_text", "value_b64", "timestamp_ms", "headers", "route"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError("unknown field(s) %s in %s" % (", ".join(unknown), line))
    if "value" in fields:
        value = json.dumps(fields["value"], separators=(",", ":")).encode("utf-8")
    elif "value_text" in fields:
        value = fields["value_text"].encode("utf-8")
    elif "value_b64" in fields:
        value = _b64(fields["value_b64"])
    else:
        value = b""
    key = fields.get("key")
    key = _b64(fields["key_b64"]) if "key_b64" in fields else key
    headers = fields.get("headers") or {}
    pairs = headers.items() if isinstance(headers, dict) else headers
    return {
        "value": value,
        "key": key,
        "timestamp_ms": fields.get("timestamp_ms", 0),
        "headers": [(name, _header_value(v)) for name, v in pairs],
        "route": fields.get("route"),
    }


def batch(lines):
    """A batch of the events on `lines` (JSON strings or dicts of event fields)."""
    builder = BatchBuilder()
    for line in lines:
        builder.push(**(event(line) if isinstance(line, str) else line))
    return builder.finish()


def run(function, lines, config=None):
    """Runs a `@weir.filter` or `@weir.enrich` function over the events on `lines` with
    `config` (a dict, as the stage's `with` table); the output events as dicts (key, value,
    timestamp_ms, headers, route). An event the function fails on raises, naming it."""
    plugin = getattr(function, "__weir_plugin__", None)
    if plugin is None:
        raise TypeError("%s is not a @weir.filter or @weir.enrich function" % function.__name__)
    pairs = [(k, json.dumps(v)) for k, v in (config or {}).items()]
    settings = parse_config(pairs)
    data = batch(lines)
    if hasattr(plugin.world, "filter"):
        bits = keep_bitmap(plugin.function, settings, data)
        return [e.to_dict() for i, e in enumerate(Batch(data)) if bits[i >> 3] >> (i & 7) & 1]
    return [e.to_dict() for e in Batch(enrich_batch(plugin.function, settings, data))]
