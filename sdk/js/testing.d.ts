// Types of weir/testing (testing.js).

import type { EnrichFunction, EventFields, FilterFunction, NewEvent } from "./weir.js";

/** One JSON line (weir test's mapping) as the fields `BatchBuilder.push` takes. */
export function event(line: string): NewEvent;

/** A batch of the events on `lines`. */
export function batch(lines: Array<string | NewEvent>): Uint8Array;

/** Runs a `weir.filter` or `weir.enrich` function over `lines` with `config`; the output
 * events. */
export function run(
  fn: FilterFunction | EnrichFunction,
  lines: Array<string | NewEvent>,
  config?: Record<string, unknown>,
): EventFields[];
