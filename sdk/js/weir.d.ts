// Types of weir's JavaScript SDK (weir.js).

/** Bytes: a string is written as UTF-8. */
export type Bytes = Uint8Array | string;

/** Headers to write: an object, or [name, value] pairs in order (names may repeat). */
export type Headers = Record<string, Bytes> | Array<[string, Bytes]>;

/** A stage's config: its `with` table, each value decoded from JSON. */
export type Config = Record<string, any>;

/** A buffer that is not a weir batch. */
export class BatchError extends Error {}

/** Throw it (or any error) from a plugin function: the event becomes a dead letter with this
 * message. */
export class PluginError extends Error {}

/** UTF-8 text of `bytes` (null stays null). */
export function text(bytes: Uint8Array): string;
export function text(bytes: null): null;
export function text(bytes: Uint8Array | null): string | null;

/** One event of a batch, read in place: byte fields are views into the batch. */
export class Event {
  /** The key, or null when the producer set none. */
  readonly key: Uint8Array | null;
  /** The payload (empty when absent). */
  readonly value: Uint8Array;
  /** Event time, milliseconds since the Unix epoch (rounded beyond 2^53: see timestampBig). */
  readonly timestampMs: number;
  /** Event time, exact. */
  readonly timestampBig: bigint;
  /** The route tag, or null. */
  readonly route: string | null;
  /** The headers in order. */
  readonly headers: Array<[string, Uint8Array]>;
  /** In a plugin's output: the index of the input event (or window) it came from. */
  readonly source: number;
  /** The value of the first header called `name`, or null. */
  header(name: string): Uint8Array | null;
  /** The first header called `name` as text, or null. */
  headerText(name: string): string | null;
  /** The value as text (UTF-8). */
  text(): string;
  /** The value parsed as JSON. */
  json(): any;
  /** The event as a plain object. */
  toObject(): EventFields;
}

/** An event's fields, as read. */
export interface EventFields {
  key: Uint8Array | null;
  value: Uint8Array;
  timestampMs: number;
  headers: Array<[string, Uint8Array]>;
  route: string | null;
}

/** A read-only view of a batch buffer. */
export class Batch implements Iterable<Event> {
  constructor(buf: Uint8Array);
  readonly length: number;
  /** Event `index` (negative counts from the end). */
  at(index: number): Event;
  [Symbol.iterator](): Iterator<Event>;
}

/** The fields of an event to write; absent ones take their defaults. */
export interface NewEvent {
  value?: Bytes;
  key?: Bytes | null;
  /** An integer: a number up to 2^53, a bigint beyond. */
  timestampMs?: number | bigint;
  headers?: Array<[Bytes, Bytes]>;
  route?: Bytes | null;
  source?: number;
}

/** Builds a batch, event by event. */
export class BatchBuilder {
  constructor();
  readonly length: number;
  push(event?: NewEvent): void;
  /** The batch's bytes; the builder is empty again. */
  finish(): Uint8Array;
}

/** What `emit` changes in the input event. `headers` replaces the input's. */
export interface Changes {
  value?: Bytes;
  key?: Bytes | null;
  timestampMs?: number | bigint;
  headers?: Headers;
  route?: string | null;
}

/** Where an enrich function puts its output events. */
export class Emitter {
  /** Emits the input event with `changes`. */
  emit(changes?: Changes): void;
  /** Emits the input event with `headers` added after its own, and `changes`. */
  addHeaders(headers: Headers, changes?: Omit<Changes, "headers">): void;
}

export type Level = "trace" | "debug" | "info" | "warn" | "error";

/** Writes `message` to the host's log; to stderr outside the sandbox. */
export function log(level: Level, message: unknown): void;

/** The stage's config from [key, JSON text] pairs. */
export function parseConfig(pairs: Array<[string, string]>): Config;

export type FilterFunction = (event: Event, config: Config) => unknown;
export type EnrichFunction = (event: Event, out: Emitter, config: Config) => void;

/** The exports of the `filter` world. */
export interface FilterExports {
  init(config: Array<[string, string]>): void;
  filter(batch: Uint8Array): Uint8Array;
}

/** The exports of the `enrich` world. */
export interface EnrichExports {
  init(config: Array<[string, string]>): void;
  enrich(batch: Uint8Array): Uint8Array;
}

/** `export const { init, filter } = weir.filter(fn);` */
export function filter(fn: FilterFunction): FilterExports;

/** `export const { init, enrich } = weir.enrich(fn);` */
export function enrich(fn: EnrichFunction): EnrichExports;

/** The keep-bitmap of `fn` over `batch`. */
export function keepBitmap(fn: FilterFunction, config: Config, batch: Uint8Array): Uint8Array;

/** The output batch of `fn` over `batch`. */
export function enrichBatch(fn: EnrichFunction, config: Config, batch: Uint8Array): Uint8Array;

/** Connects the SDK to the host's log (done by the module `weir build` wraps around a plugin). */
export function connectHost(log: (level: Level, message: string) => void): void;
