// Runs a plugin function natively, in Node.js, over events in weir's JSON-lines mapping (the one
// `weir test` reads and prints), through the same batch code as in the sandbox:
//
//     import { run } from "weir/testing";
//     import { keep } from "./app.js";
//
//     const out = run(keep, ['{"value":{"amount":5},"timestamp_ms":1}'], { min: 3 });
//
// A line's `value` (any JSON) becomes its compact JSON text; `value_text` and `value_b64`, `key`
// and `key_b64`, `headers` (an object, or [name, value] pairs; a value may be {"b64": ...}),
// `route` and `timestamp_ms` (default 0) are read as `weir test` reads them.

import { Batch, BatchBuilder, enrichBatch, keepBitmap, parseConfig } from "./weir.js";

const KNOWN = new Set(["key", "key_b64", "value", "value_text", "value_b64", "timestamp_ms", "headers", "route"]);

function b64(text) {
  return new Uint8Array(Buffer.from(text, "base64"));
}

function headerValue(value) {
  return typeof value === "object" && value !== null ? b64(value.b64) : value;
}

/** One JSON line as the event fields `BatchBuilder.push` takes. */
export function event(line) {
  const fields = JSON.parse(line);
  const unknown = Object.keys(fields).filter((name) => !KNOWN.has(name)).sort();
  if (unknown.length) {
    throw new Error(`unknown field(s) ${unknown.join(", ")} in ${line}`);
  }
  let value = "";
  if ("value" in fields) {
    value = JSON.stringify(fields.value);
  } else if ("value_text" in fields) {
    value = fields.value_text;
  } else if ("value_b64" in fields) {
    value = b64(fields.value_b64);
  }
  const headers = fields.headers ?? {};
  const pairs = Array.isArray(headers) ? headers : Object.entries(headers);
  return {
    value,
    key: "key_b64" in fields ? b64(fields.key_b64) : (fields.key ?? null),
    timestampMs: fields.timestamp_ms ?? 0,
    headers: pairs.map(([name, v]) => [name, headerValue(v)]),
    route: fields.route ?? null,
  };
}

/** A batch of the events on `lines` (JSON strings, or objects of event fields). */
export function batch(lines) {
  const builder = new BatchBuilder();
  for (const line of lines) {
    builder.push(typeof line === "string" ? event(line) : line);
  }
  return builder.finish();
}

/** Runs a `weir.filter` or `weir.enrich` function over the events on `lines` with `config` (an
 * object, as the stage's `with` table); the output events as objects (key, value, timestampMs,
 * headers, route). An event the function fails on throws, naming it. */
export function run(fn, lines, config = {}) {
  if (fn.weirKind !== "filter" && fn.weirKind !== "enrich") {
    throw new TypeError(`${fn.name || "this function"} is not passed to weir.filter or weir.enrich`);
  }
  const settings = parseConfig(Object.entries(config).map(([k, v]) => [k, JSON.stringify(v)]));
  const data = batch(lines);
  if (fn.weirKind === "filter") {
    const bits = keepBitmap(fn, settings, data);
    return [...new Batch(data)].filter((_, i) => (bits[i >> 3] >> (i & 7)) & 1).map((e) => e.toObject());
  }
  return [...new Batch(enrichBatch(fn, settings, data))].map((e) => e.toObject());
}
