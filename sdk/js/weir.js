// weir's JavaScript SDK: plugins for the weir stream router, built with componentize-js.
//
// A filter in a few lines (`app.js`):
//
//     import * as weir from "weir";
//
//     export function keep(event, config) {
//       return !(event.headerText("user-agent") ?? "").toLowerCase().includes("bot");
//     }
//
//     export const { init, filter } = weir.filter(keep);
//
// `weir.filter(fn)` and `weir.enrich(fn)` return the exports of the world of wit/weir.wit that
// componentize-js builds (`init` and `filter`, or `init` and `enrich`); the function stays a
// plain function that `weir/testing` runs in Node.js over JSON-lines events.
//
// - `weir.filter(fn)`: `fn(event, config) -> boolean`.
// - `weir.enrich(fn)`: `fn(event, out, config)`, calling `out.emit(...)` zero or more times.
//
// `config` is the stage's `with` table as an object (each value decoded from JSON). Events are
// `weir.Event`. `weir.log(level, message)` writes to the host's log.
//
// The batch (wit/batch.fbs) is read and written here by hand, for the one schema: a field is
// read only when asked for, and bytes are handed out as views into the batch, not copies.
//
// Layout (FlatBuffers): the buffer starts with the root table's offset and the identifier
// `WEIR`. A table starts with a signed offset back to its vtable; the vtable lists each field's
// offset in the table (0: absent). Offsets to vectors, strings and tables point forward.
// - Batch { events: [Event] }
// - Event { key: [ubyte], value: [ubyte], timestamp_ms: long, headers: [Header],
//   route: string, source: uint32 }
// - Header { name: string (required), value: [ubyte] }

const IDENTIFIER = [0x57, 0x45, 0x49, 0x52]; // "WEIR"
const EMPTY = new Uint8Array(0);
const encoder = new TextEncoder();
const decoder = new TextDecoder();
const LEVELS = ["trace", "debug", "info", "warn", "error"];

/** A buffer that is not a weir batch. */
export class BatchError extends Error {}

/** Throw it (or any error) from a plugin function: the event becomes a dead letter with this
 * message. */
export class PluginError extends Error {}

/** UTF-8 text of `bytes` (null stays null). */
export function text(bytes) {
  return bytes === null ? null : decoder.decode(bytes);
}

// Reads go through 16- and 32-bit views of the batch (FlatBuffers aligns every scalar, offset
// and vtable entry to its size; wasm and every platform Node.js runs on are little-endian), and
// the hot paths are written out without calls: inside the sandbox JavaScript is interpreted,
// where each element read and each call costs far more than the arithmetic around it.

/** The position of field `index` of the table at `table`, or 0 when absent. */
function field(h, w, table, index) {
  const vtable = table - (w[table >> 2] | 0);
  const entry = 4 + 2 * index;
  if (entry >= h[vtable >> 1]) {
    return 0;
  }
  const offset = h[(vtable + entry) >> 1];
  return offset ? table + offset : 0;
}

/** A byte vector (or string) field's bytes as a view into the batch, or null when absent. */
function bytesOf(event, index) {
  const w = event.w;
  const at = field(event.h, w, event.table, index);
  if (!at) {
    return null;
  }
  const vector = at + w[at >> 2];
  // Not `subarray`: the engine implements it in JavaScript, which the sandbox interprets.
  const b = event.buf;
  return new Uint8Array(b.buffer, b.byteOffset + vector + 4, w[vector >> 2]);
}

/** A header name to look for: its bytes as little-endian words, the last one masked. */
class Name {
  constructor(name) {
    const bytes = encoder.encode(name);
    const padded = new Uint8Array((bytes.length + 3) & ~3);
    padded.set(bytes);
    this.size = bytes.length;
    this.words = new Uint32Array(padded.buffer);
    this.full = bytes.length >> 2;
    // The bytes of the last, partial word (0 when there is none).
    this.mask = bytes.length & 3 ? (1 << (8 * (bytes.length & 3))) - 1 : 0;
  }
}

const names = new Map();
// The name `header` looked up last.
let lastName = null;
let lastWanted = null;

/** `name` to look for, made once per name. */
function wanted(name) {
  let found = names.get(name);
  if (found === undefined) {
    found = new Name(name);
    if (names.size < 256) {
      names.set(name, found);
    }
  }
  return found;
}

/** One event of a batch, read in place. A plugin function gets one `Event` object moved along
 * the batch: what it keeps beyond its call, it copies (`toObject()`). */
export class Event {
  constructor(batch, table) {
    this.buf = batch.buf;
    this.h = batch.h;
    this.w = batch.w;
    this.table = table;
  }

  /** The key (Uint8Array), or null when the producer set none. */
  get key() {
    return bytesOf(this, 0);
  }

  /** The payload (Uint8Array; empty when absent). */
  get value() {
    return bytesOf(this, 1) ?? EMPTY;
  }

  /** Event time, milliseconds since the Unix epoch. */
  get timestampMs() {
    const w = this.w;
    const at = field(this.h, w, this.table, 2);
    return at ? w[at >> 2] + (w[(at >> 2) + 1] | 0) * 4294967296 : 0;
  }

  /** The route tag, or null. */
  get route() {
    return text(bytesOf(this, 4));
  }

  /** The headers in order, as [name, value: Uint8Array] pairs. */
  get headers() {
    const { buf, h, w } = this;
    const at = field(h, w, this.table, 3);
    if (!at) {
      return [];
    }
    const vector = at + w[at >> 2];
    const out = [];
    const header = new Event(this, 0);
    for (let i = 0, n = w[vector >> 2]; i < n; i++) {
      const slot = vector + 4 + 4 * i;
      header.table = slot + w[slot >> 2];
      out.push([text(bytesOf(header, 0)) ?? "", bytesOf(header, 1) ?? EMPTY]);
    }
    return out;
  }

  /** The value (Uint8Array) of the first header called `name`, or null. */
  header(name) {
    // Written out in full: this runs once per event in most filters.
    const h = this.h;
    const w = this.w;
    const t = this.table;
    const vt = t - (w[t >> 2] | 0);
    if (h[vt >> 1] <= 10) {
      return null;
    }
    const offset = h[(vt + 10) >> 1];
    if (!offset) {
      return null;
    }
    if (name !== lastName) {
      lastWanted = wanted(name);
      lastName = name;
    }
    const { size, words, full, mask } = lastWanted;
    const at = t + offset;
    const vector = at + w[at >> 2];
    const end = vector + 4 + 4 * w[vector >> 2];
    for (let slot = vector + 4; slot < end; slot += 4) {
      const hd = slot + w[slot >> 2];
      const hvt = hd - (w[hd >> 2] | 0);
      // The name (a required field, the first): its length, then its bytes a word at a time.
      const named = hd + h[(hvt + 4) >> 1];
      const str = named + w[named >> 2];
      if (w[str >> 2] !== size) {
        continue;
      }
      const first = (str >> 2) + 1;
      let k = 0;
      while (k < full && w[first + k] === words[k]) {
        k++;
      }
      if (k < full || (mask && (w[first + k] & mask) !== words[k])) {
        continue;
      }
      // The value: absent is empty.
      const valued = h[hvt >> 1] > 6 ? h[(hvt + 6) >> 1] : 0;
      if (!valued) {
        return EMPTY;
      }
      const v = hd + valued;
      const bytes = v + w[v >> 2];
      const b = this.buf;
      return new Uint8Array(b.buffer, b.byteOffset + bytes + 4, w[bytes >> 2]);
    }
    return null;
  }

  /** The first header called `name` as text, or null. */
  headerText(name) {
    return text(this.header(name));
  }

  /** The value as text (UTF-8). */
  text() {
    return decoder.decode(this.value);
  }

  /** The value parsed as JSON. */
  json() {
    return JSON.parse(this.text());
  }

  /** In a plugin's output: the index of the input event (or window) it came from. */
  get source() {
    const at = field(this.h, this.w, this.table, 5);
    return at ? this.w[at >> 2] : 0;
  }

  /** The event as a plain object, copied out of the batch: key, value, timestampMs, headers,
   * route. */
  toObject() {
    const copy = (bytes) => (bytes === null ? null : bytes.slice());
    return {
      key: copy(this.key),
      value: copy(this.value),
      timestampMs: this.timestampMs,
      headers: this.headers.map(([name, value]) => [name, copy(value)]),
      route: this.route,
    };
  }
}

/** A read-only view of a batch buffer. The host verified every buffer it hands a plugin; the
 * constructor checks the identifier and that the root is inside the buffer, not the rest. */
export class Batch {
  constructor(buf) {
    // The host's bytes arrive as a typed array that is not always this realm's Uint8Array.
    if (!ArrayBuffer.isView(buf)) {
      throw new TypeError("a batch is a Uint8Array");
    }
    let b = new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);
    if (b.length < 8 || b[4] !== 0x57 || b[5] !== 0x45 || b[6] !== 0x49 || b[7] !== 0x52) {
      throw new BatchError("not a weir batch (no WEIR identifier)");
    }
    // Word reads need the buffer aligned to 4 and its length a multiple of 4: else a copy.
    if (b.byteOffset & 3 || b.length & 3) {
      const copy = new Uint8Array((b.length + 3) & ~3);
      copy.set(b);
      b = copy.subarray(0, b.length);
    }
    this.buf = b;
    this.h = new Uint16Array(b.buffer, b.byteOffset, (b.length + 1) >> 1);
    this.w = new Uint32Array(b.buffer, b.byteOffset, (b.length + 3) >> 2);
    const root = this.w[0];
    if (root + 4 > b.length) {
      throw new BatchError("not a weir batch (root outside the buffer)");
    }
    const at = field(this.h, this.w, root, 0);
    this.vector = at ? at + this.w[at >> 2] : 0;
    this.length = at ? this.w[this.vector >> 2] : 0;
  }

  /** Where event `index`'s table is. */
  table(index) {
    const slot = this.vector + 4 + 4 * index;
    return slot + this.w[slot >> 2];
  }

  /** Event `index` (negative counts from the end). */
  at(index) {
    if (index < 0) {
      index += this.length;
    }
    if (!(index >= 0 && index < this.length)) {
      throw new RangeError(`event ${index} of a batch of ${this.length}`);
    }
    return new Event(this, this.table(index));
  }

  *[Symbol.iterator]() {
    for (let i = 0; i < this.length; i++) {
      yield new Event(this, this.table(i));
    }
  }
}

/** `data` as bytes: a string is UTF-8 encoded, a Uint8Array taken as is; anything else (a
 * number, null) is a TypeError rather than bytes nobody meant. */
function asBytes(data, what) {
  if (typeof data === "string") {
    return encoder.encode(data);
  }
  if (data instanceof Uint8Array) {
    return data;
  }
  throw new TypeError(`${what}: expected a string or a Uint8Array, got ${data === null ? "null" : typeof data}`);
}

/** A buffer written front to back. */
class Writer {
  constructor() {
    this.bytes = new Uint8Array(4096);
    this.view = new DataView(this.bytes.buffer);
    this.length = 0;
  }

  reserve(n) {
    if (this.length + n > this.bytes.length) {
      let size = this.bytes.length * 2;
      while (size < this.length + n) {
        size *= 2;
      }
      const bigger = new Uint8Array(size);
      bigger.set(this.bytes.subarray(0, this.length));
      this.bytes = bigger;
      this.view = new DataView(bigger.buffer);
    }
  }

  /** Zeroes up to the next multiple of `align`. */
  pad(align) {
    const n = -this.length & (align - 1);
    this.reserve(n);
    this.bytes.fill(0, this.length, this.length + n);
    this.length += n;
  }

  /** Appends `n` zero bytes; where they start. */
  zeros(n) {
    this.reserve(n);
    const at = this.length;
    this.bytes.fill(0, at, at + n);
    this.length += n;
    return at;
  }

  // Each write takes its place before it reads `view`: making room may replace the buffer.
  u16(value) {
    const at = this.zeros(2);
    this.view.setUint16(at, value, true);
  }

  u32(value) {
    const at = this.zeros(4);
    this.view.setUint32(at, value, true);
  }

  /** Points the offset at `at` to here. */
  point(at) {
    this.view.setUint32(at, this.length - at, true);
  }

  /** Writes `data` as a byte vector (a string: with its NUL), pointed to from `at`. */
  vector(at, data, string) {
    this.pad(4);
    this.point(at);
    this.u32(data.length);
    this.reserve(data.length + 1);
    this.bytes.set(data, this.length);
    this.length += data.length;
    if (string) {
      this.zeros(1);
    }
  }
}

/** Builds a batch, event by event (each with its `source`), front to back: every offset points
 * forward, every scalar at its alignment, as the host's verifier requires. */
export class BatchBuilder {
  constructor() {
    this.events = [];
  }

  /** Adds an event. `value` and `key` are Uint8Arrays or strings (UTF-8 encoded); `headers`
   * are [name, value] pairs; `source` is the input event's (or window's) index. */
  push({ value = EMPTY, key = null, timestampMs = 0, headers = [], route = null, source = 0 } = {}) {
    if (!Number.isSafeInteger(timestampMs)) {
      throw new TypeError(`timestampMs: expected an integer, got ${timestampMs}`);
    }
    this.events.push({
      value: asBytes(value, "value"),
      key: key === null ? null : asBytes(key, "key"),
      timestampMs,
      headers: headers.map(([name, v]) => [asBytes(name, "header name"), asBytes(v, "header value")]),
      route: route === null ? null : asBytes(route, "route"),
      source,
    });
  }

  get length() {
    return this.events.length;
  }

  /** The batch's bytes; the builder is empty again. */
  finish() {
    const events = this.events;
    this.events = [];
    const w = new Writer();
    w.zeros(8);
    w.bytes.set(IDENTIFIER, 4);
    // Batch: vtable (events at 4), then the table.
    const batchVtable = w.length;
    w.u16(6);
    w.u16(8);
    w.u16(4);
    w.pad(4);
    const root = w.length;
    w.view.setUint32(0, root, true);
    w.u32(root - batchVtable);
    w.u32(0);
    // The events vector, its offsets filled in as each event is written.
    w.pad(4);
    w.point(root + 4);
    w.u32(events.length);
    const slots = w.zeros(4 * events.length);
    events.forEach((e, i) => {
      // Event: vtable, then a table of 32 bytes at an 8-aligned position: soffset, source,
      // timestamp (8-aligned), key, value, headers, route.
      w.pad(2);
      const vtable = w.length;
      for (const entry of [16, 32, e.key !== null ? 16 : 0, 20, 8, e.headers.length ? 24 : 0, e.route !== null ? 28 : 0, 4]) {
        w.u16(entry);
      }
      w.pad(8);
      const table = w.length;
      w.point(slots + 4 * i);
      const at = w.zeros(32);
      w.view.setInt32(at, table - vtable, true);
      w.view.setUint32(at + 4, e.source, true);
      w.view.setUint32(at + 8, e.timestampMs % 4294967296 >>> 0, true);
      w.view.setInt32(at + 12, Math.floor(e.timestampMs / 4294967296), true);
      if (e.key !== null) {
        w.vector(table + 16, e.key, false);
      }
      w.vector(table + 20, e.value, false);
      if (e.route !== null) {
        w.vector(table + 28, e.route, true);
      }
      if (e.headers.length) {
        w.pad(4);
        w.point(table + 24);
        w.u32(e.headers.length);
        const headerSlots = w.zeros(4 * e.headers.length);
        e.headers.forEach(([name, value], j) => {
          // Header: vtable (name at 4, value at 8), then a table of 12 bytes.
          w.pad(2);
          const headerVtable = w.length;
          for (const entry of [8, 12, 4, 8]) {
            w.u16(entry);
          }
          w.pad(4);
          const header = w.length;
          w.point(headerSlots + 4 * j);
          const at = w.zeros(12);
          w.view.setInt32(at, header - headerVtable, true);
          w.vector(header + 4, name, true);
          w.vector(header + 8, value, false);
        });
      }
    });
    return w.bytes.slice(0, w.length);
  }
}

let hostLog = null;

/** Connects the SDK to the host's `log` (called by the module `weir build` wraps around the
 * plugin; not by plugins). */
export function connectHost(log) {
  hostLog = log;
}

/** Writes `message` to the host's log at `level` (trace, debug, info, warn, error); to stderr
 * outside the sandbox. */
export function log(level, message) {
  if (!LEVELS.includes(level)) {
    throw new RangeError(`log level ${JSON.stringify(level)}: one of ${LEVELS.join(", ")}`);
  }
  if (hostLog === null) {
    console.error(`[${level}] ${message}`);
  } else {
    hostLog(level, String(message));
  }
}

/** The stage's config: [key, JSON text] pairs as the host passes them, as an object. */
export function parseConfig(pairs) {
  const config = {};
  for (const [key, json] of pairs) {
    try {
      config[key] = JSON.parse(json);
    } catch (e) {
      throw new PluginError(`config \`${key}\`: not JSON: ${e.message}`);
    }
  }
  return config;
}

/** Where an enrich function puts its output events; each records the input event it came from
 * (`source`). */
export class Emitter {
  constructor(builder) {
    this.builder = builder;
    this.event = null;
    this.source = 0;
  }

  /** Emits an event: the input event, with what `changes` gives changed (value, key,
   * timestampMs, headers, route). `headers`, when given, replaces the input's (an object or
   * [name, value] pairs); `addHeaders` adds. */
  emit(changes = {}) {
    const e = this.event;
    this.builder.push({
      value: changes.value ?? e.value,
      key: changes.key !== undefined ? changes.key : e.key,
      timestampMs: changes.timestampMs ?? e.timestampMs,
      headers: changes.headers !== undefined ? pairs(changes.headers) : e.headers,
      route: changes.route !== undefined ? changes.route : e.route,
      source: this.source,
    });
  }

  /** Emits the input event with `headers` added after its own (and `changes` as in `emit`). */
  addHeaders(headers, changes = {}) {
    this.emit({ ...changes, headers: this.event.headers.concat(pairs(headers)) });
  }
}

function pairs(headers) {
  return Array.isArray(headers) ? headers : Object.entries(headers);
}

/** What an export throws to return `err(message)` to the host: componentize-js takes an
 * error's `payload` as the err value. */
function failure(message) {
  const error = new PluginError(message);
  error.payload = message;
  return error;
}

function describe(error) {
  if (error instanceof PluginError) {
    return error.message;
  }
  if (error instanceof Error) {
    return `${error.name}: ${error.message}`;
  }
  return String(error);
}

/** Calls `fn(event, config)` on every event of `batch`; the keep-bitmap. An error names the
 * event. */
export function keepBitmap(fn, config, batch) {
  const events = new Batch(batch);
  const w = events.w;
  const n = events.length;
  const bits = new Uint8Array((n + 7) >> 3);
  const event = new Event(events, 0);
  let i = 0;
  try {
    for (let slot = events.vector + 4; i < n; i++, slot += 4) {
      event.table = slot + w[slot >> 2];
      if (fn(event, config)) {
        bits[i >> 3] |= 1 << (i & 7);
      }
    }
  } catch (e) {
    throw failure(`event ${i}: ${describe(e)}`);
  }
  return bits;
}

/** Calls `fn(event, out, config)` on every event of `batch`; the output batch. */
export function enrichBatch(fn, config, batch) {
  const events = new Batch(batch);
  const w = events.w;
  const n = events.length;
  const builder = new BatchBuilder();
  const out = new Emitter(builder);
  const event = new Event(events, 0);
  out.event = event;
  let i = 0;
  try {
    for (let slot = events.vector + 4; i < n; i++, slot += 4) {
      event.table = slot + w[slot >> 2];
      out.source = i;
      fn(event, out, config);
    }
  } catch (e) {
    throw failure(`event ${i}: ${describe(e)}`);
  }
  try {
    return builder.finish();
  } catch (e) {
    throw failure(`the output batch: ${describe(e)}`);
  }
}

/** The world's exports around `fn`: `init` and the call named `kind`. */
function world(fn, kind, call) {
  if (typeof fn !== "function") {
    throw new TypeError(`weir.${kind} takes the plugin function, got ${typeof fn}`);
  }
  let config = null;
  fn.weirKind = kind;
  return {
    init(pairs) {
      if (config !== null) {
        throw failure("plugin already initialised: `init` was called twice");
      }
      try {
        config = parseConfig(pairs);
      } catch (e) {
        throw failure(describe(e));
      }
    },
    [kind](batch) {
      return call(fn, config, batch);
    },
  };
}

/** Makes `fn(event, config) -> boolean` a filter: `export const { init, filter } =
 * weir.filter(fn)`. */
export function filter(fn) {
  return world(fn, "filter", keepBitmap);
}

/** Makes `fn(event, out, config)` an enrich function: `export const { init, enrich } =
 * weir.enrich(fn)`. */
export function enrich(fn) {
  return world(fn, "enrich", enrichBatch);
}
