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

BatchError.prototype.name = "BatchError";
PluginError.prototype.name = "PluginError";

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

  /** Event time as a BigInt: exact where `timestampMs` is not (beyond 2^53). */
  get timestampBig() {
    const w = this.w;
    const at = field(this.h, w, this.table, 2);
    return at ? (BigInt(w[(at >> 2) + 1] | 0) << 32n) | BigInt(w[at >> 2]) : 0n;
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

/** Builds a batch, event by event (each with its `source`), front to back: every offset points
 * forward, every scalar at its alignment, as the host's verifier requires. */
export class BatchBuilder {
  constructor() {
    this.events = [];
  }

  /** Adds an event. `value` and `key` are Uint8Arrays or strings (UTF-8 encoded); `headers`
   * are [name, value] pairs; `source` is the input event's (or window's) index. */
  push({ value = EMPTY, key = null, timestampMs = 0, headers = [], route = null, source = 0 } = {}) {
    let low;
    let high;
    if (typeof timestampMs === "bigint" && BigInt.asIntN(64, timestampMs) === timestampMs) {
      low = Number(BigInt.asUintN(32, timestampMs));
      high = Number(BigInt.asIntN(32, timestampMs >> 32n));
    } else if (Number.isSafeInteger(timestampMs)) {
      low = timestampMs % 4294967296 >>> 0;
      high = Math.floor(timestampMs / 4294967296);
    } else {
      throw new TypeError(`timestampMs: expected an integer (a BigInt beyond 2^53), got ${timestampMs}`);
    }
    const pairs = [];
    for (let i = 0; i < headers.length; i++) {
      pairs.push(asBytes(headers[i][0], "header name"), asBytes(headers[i][1], "header value"));
    }
    this.events.push({
      value: asBytes(value, "value"),
      key: key === null ? null : asBytes(key, "key"),
      low,
      high,
      headers: pairs,
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
    const n = events.length;
    // Room for everything, counted first: the buffer is made once (zeroed), and then written
    // through 16- and 32-bit views at aligned places, without a check per write.
    let size = 32 + 4 * n;
    for (let i = 0; i < n; i++) {
      const e = events[i];
      size += 72 + e.value.length + (e.key === null ? 0 : 8 + e.key.length);
      size += e.route === null ? 0 : 8 + e.route.length;
      const pairs = e.headers;
      size += 8;
      for (let j = 0; j < pairs.length; j += 2) {
        size += 48 + pairs[j].length + pairs[j + 1].length;
      }
    }
    const buffer = new ArrayBuffer((size + 7) & ~7);
    const b = new Uint8Array(buffer);
    const u16 = new Uint16Array(buffer);
    const u32 = new Uint32Array(buffer);
    const i32 = new Int32Array(buffer);
    let p = 0;
    // A byte vector (a string: with its NUL) at the next 4-aligned place, pointed to from `at`.
    const vector = (at, data, string) => {
      p = (p + 3) & ~3;
      u32[at >> 2] = p - at;
      u32[p >> 2] = data.length;
      b.set(data, p + 4);
      p += 4 + data.length + (string ? 1 : 0);
    };
    // The identifier, then the Batch's vtable (events at 4) and table.
    b.set(IDENTIFIER, 4);
    u16[4] = 6;
    u16[5] = 8;
    u16[6] = 4;
    const root = 16;
    u32[0] = root;
    i32[root >> 2] = root - 8;
    // The events vector, its offsets filled in as each event is written.
    p = root + 8;
    u32[(root + 4) >> 2] = p - (root + 4);
    u32[p >> 2] = n;
    const slots = p + 4;
    p = slots + 4 * n;
    for (let i = 0; i < n; i++) {
      const e = events[i];
      const pairs = e.headers;
      // Event: vtable, then a table of 32 bytes at an 8-aligned place: soffset, source,
      // timestamp (8-aligned), key, value, headers, route.
      p = (p + 1) & ~1;
      const vtable = p;
      const v = vtable >> 1;
      u16[v] = 16;
      u16[v + 1] = 32;
      u16[v + 2] = e.key !== null ? 16 : 0;
      u16[v + 3] = 20;
      u16[v + 4] = 8;
      u16[v + 5] = pairs.length ? 24 : 0;
      u16[v + 6] = e.route !== null ? 28 : 0;
      u16[v + 7] = 4;
      p = (vtable + 16 + 7) & ~7;
      const table = p;
      const slot = slots + 4 * i;
      u32[slot >> 2] = table - slot;
      const t = table >> 2;
      i32[t] = table - vtable;
      u32[t + 1] = e.source;
      u32[t + 2] = e.low;
      i32[t + 3] = e.high;
      p = table + 32;
      if (e.key !== null) {
        vector(table + 16, e.key, false);
      }
      vector(table + 20, e.value, false);
      if (e.route !== null) {
        vector(table + 28, e.route, true);
      }
      if (pairs.length) {
        p = (p + 3) & ~3;
        u32[(table + 24) >> 2] = p - (table + 24);
        u32[p >> 2] = pairs.length >> 1;
        const headerSlots = p + 4;
        p = headerSlots + 2 * pairs.length;
        for (let j = 0; j < pairs.length; j += 2) {
          // Header: vtable (name at 4, value at 8), then a table of 12 bytes.
          p = (p + 1) & ~1;
          const headerVtable = p;
          const hv = p >> 1;
          u16[hv] = 8;
          u16[hv + 1] = 12;
          u16[hv + 2] = 4;
          u16[hv + 3] = 8;
          p = (p + 8 + 3) & ~3;
          const header = p;
          const headerSlot = headerSlots + 2 * j;
          u32[headerSlot >> 2] = header - headerSlot;
          i32[header >> 2] = header - headerVtable;
          p = header + 12;
          vector(header + 4, pairs[j], true);
          vector(header + 8, pairs[j + 1], false);
        }
      }
    }
    return new Uint8Array(buffer, 0, p);
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
      // Defined, not assigned: a key such as `__proto__` is a key like any other.
      Object.defineProperty(config, key, { value: JSON.parse(json), enumerable: true, writable: true, configurable: true });
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
      timestampMs: changes.timestampMs ?? time(e),
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

/** The event's time, exact: a BigInt where a number would round. */
function time(event) {
  const ms = event.timestampMs;
  return Number.isSafeInteger(ms) ? ms : event.timestampBig;
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
  try {
    if (error instanceof PluginError) {
      return error.message;
    }
    if (error instanceof Error) {
      return `${error.name}: ${error.message}`;
    }
    return String(error);
  } catch {
    return "a thrown value that cannot be shown";
  }
}

/** `batch` read, or an error for the host. */
function readable(batch) {
  try {
    return new Batch(batch);
  } catch (e) {
    throw failure(`the input batch: ${describe(e)}`);
  }
}

/** Calls `fn(event, config)` on every event of `batch`; the keep-bitmap. An error names the
 * event. */
export function keepBitmap(fn, config, batch) {
  const events = readable(batch);
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
  const events = readable(batch);
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
