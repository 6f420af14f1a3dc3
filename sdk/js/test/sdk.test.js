// The JavaScript SDK natively: batches written and read back, filters and enrich functions run
// through the same batch code as in the sandbox, and the errors they give.

import assert from "node:assert/strict";
import { test } from "node:test";

import * as weir from "../weir.js";
import { Batch, BatchBuilder, BatchError } from "../weir.js";
import * as testing from "../testing.js";
import * as enrichApp from "./enrich_app.js";
import * as filterApp from "./filter_app.js";

const bytes = (text) => new TextEncoder().encode(text);

test("a filter keeps what its function keeps", () => {
  const lines = [
    '{"value":{"n":1},"timestamp_ms":1,"headers":{"user-agent":"curl/8"}}',
    '{"value":{"n":2},"timestamp_ms":2,"headers":{"user-agent":"GoogleBot"}}',
    '{"value":{"n":3},"timestamp_ms":3}',
  ];
  let out = testing.run(filterApp.keep, lines);
  assert.deepEqual(out.map((e) => weir.text(e.value)), ['{"n":1}', '{"n":3}']);
  out = testing.run(filterApp.keep, lines, { words: ["curl"] });
  assert.deepEqual(out.map((e) => e.timestampMs), [2, 3]);
});

test("the exports are the world's, and init takes the config once", () => {
  const exports = weir.filter((event, config) => event.text() !== config.drop);
  assert.deepEqual(Object.keys(exports).sort(), ["filter", "init"]);
  assert.deepEqual(Object.keys(weir.enrich(() => {})).sort(), ["enrich", "init"]);
  exports.init([["drop", '"b"']]);
  const bits = exports.filter(testing.batch(['{"value_text":"a"}', '{"value_text":"b"}', '{"value_text":"c"}']));
  assert.deepEqual([...bits], [0b101]);
  assert.throws(() => exports.init([]), { payload: "plugin already initialised: `init` was called twice" });
  assert.throws(() => weir.filter().init([]), { message: "weir.filter takes the plugin function, got undefined" });
  assert.throws(() => weir.filter(() => true).init([["n", "{not json"]]), (e) => e.payload.startsWith("config `n`: not JSON: "));
});

test("events read back as they were written", () => {
  const builder = new BatchBuilder();
  builder.push({ value: bytes("v1"), key: "k", timestampMs: -5, headers: [["a", "1"], ["a", "2"]], route: "eu", source: 7 });
  builder.push({ value: "", timestampMs: 2 ** 40 });
  builder.push({ value: Uint8Array.from({ length: 256 }, (_, i) => i), headers: [["empty", ""]] });
  const batch = new Batch(builder.finish());
  assert.equal(batch.length, 3);
  const [first, second, third] = batch;
  assert.deepEqual(first.toObject(), {
    key: bytes("k"),
    value: bytes("v1"),
    timestampMs: -5,
    headers: [["a", bytes("1")], ["a", bytes("2")]],
    route: "eu",
  });
  assert.equal(first.source, 7);
  assert.deepEqual(first.header("a"), bytes("1"));
  assert.equal(first.headerText("a"), "1");
  assert.equal(first.header("b"), null);
  assert.deepEqual([second.key, second.value, second.timestampMs, second.route], [null, new Uint8Array(0), 2 ** 40, null]);
  assert.deepEqual(second.headers, []);
  assert.deepEqual(third.value, Uint8Array.from({ length: 256 }, (_, i) => i));
  assert.deepEqual(third.header("empty"), new Uint8Array(0));
  assert.deepEqual(batch.at(-1).value, third.value);
  assert.throws(() => batch.at(3), RangeError);
});

test("only text and bytes are written", () => {
  const builder = new BatchBuilder();
  for (const bad of [{ value: 5 }, { headers: [["n", 5]] }, { route: 7 }, { key: 1.5 }, { timestampMs: 1.5 }]) {
    assert.throws(() => builder.push(bad), TypeError);
  }
  assert.equal(builder.length, 0);
});

test("an empty batch and a foreign buffer", () => {
  assert.equal(new Batch(new BatchBuilder().finish()).length, 0);
  for (const junk of ["", "junk", "\0\0\0\0NOPE"]) {
    assert.throws(() => new Batch(bytes(junk)), BatchError);
  }
  assert.throws(() => new Batch("WEIR"), TypeError);
});

test("an enrich emits zero, one or more events, each with its source", () => {
  const lines = [
    '{"value_text":"once","key":"k","timestamp_ms":1,"headers":{"h":"1"}}',
    '{"value_text":"drop","timestamp_ms":2}',
    '{"value_text":"twice","timestamp_ms":3}',
  ];
  const out = new Batch(weir.enrichBatch(enrichApp.tag, { team: "ops" }, testing.batch(lines)));
  assert.deepEqual([...out].map((e) => e.source), [0, 2, 2]);
  assert.deepEqual(
    [...out].map((e) => e.toObject()),
    [
      { key: bytes("k"), value: bytes("once"), timestampMs: 1, headers: [["h", bytes("1")], ["team", bytes("ops")]], route: "tagged" },
      { key: null, value: bytes("twice"), timestampMs: 3, headers: [["team", bytes("ops")]], route: "tagged" },
      { key: null, value: bytes("copy"), timestampMs: 3, headers: [], route: null },
    ],
  );
});

test("an error names the event", () => {
  assert.throws(() => testing.run(enrichApp.tag, ['{"value_text":"ok"}', '{"value_text":"fail"}']), {
    payload: "event 1: cannot tag this one",
  });
  const failing = (event) => {
    if (event.text() === "type") {
      throw new TypeError("not this type");
    }
    throw "a plain string";
  };
  weir.filter(failing);
  assert.throws(() => testing.run(failing, ['{"value_text":"type"}']), { payload: "event 0: TypeError: not this type" });
  assert.throws(() => testing.run(failing, ['{"value_text":"other"}']), { payload: "event 0: a plain string" });
  assert.throws(() => testing.run(() => true, []), { message: "this function is not passed to weir.filter or weir.enrich" });
});

test("headers are found by whole name, whatever the name's length", () => {
  const names = ["a", "ab", "abc", "abcd", "abcde", "abcdefgh", "abcdefghi", "user-agent", "user-agenT"];
  const builder = new BatchBuilder();
  builder.push({ headers: names.map((name, i) => [name, String(i)]) });
  builder.push({ headers: [["abcd", ""], ["x", "y"]] });
  const [first, second] = new Batch(builder.finish());
  for (const [i, name] of names.entries()) {
    assert.equal(first.headerText(name), String(i), name);
  }
  for (const absent of ["", "b", "abcdef", "user-agen", "user-agents", "USER-AGENT"]) {
    assert.equal(first.header(absent), null, absent);
  }
  assert.deepEqual(second.header("abcd"), new Uint8Array(0));
  assert.equal(second.headerText("x"), "y");
  assert.equal(second.header("a"), null);
});

test("a batch at an odd place in its buffer reads the same", () => {
  const built = testing.batch(['{"value_text":"v","key":"k","timestamp_ms":-7,"headers":{"h":"1"},"route":"r"}']);
  for (const shift of [1, 2, 3, 4]) {
    const bigger = new Uint8Array(built.length + shift + 1);
    bigger.set(built, shift);
    const [event] = new Batch(bigger.subarray(shift, shift + built.length));
    assert.deepEqual(event.toObject(), {
      key: bytes("k"),
      value: bytes("v"),
      timestampMs: -7,
      headers: [["h", bytes("1")]],
      route: "r",
    });
  }
});

test("a big batch of every field length is written whole", () => {
  // Lengths that leave every kind of field at every alignment.
  for (const size of [0, 1, 2, 3, 5, 7, 300]) {
    const builder = new BatchBuilder();
    const value = "x".repeat(size);
    for (let i = 0; i < 700; i++) {
      builder.push({ value, key: i % 2 ? `k${i}` : null, timestampMs: i, headers: [["n", String(i)]], route: i % 3 !== 1 ? "r" : null, source: i });
    }
    const batch = new Batch(builder.finish());
    assert.equal(batch.length, 700);
    const last = batch.at(-1);
    assert.deepEqual(
      [last.text(), weir.text(last.key), last.timestampMs, last.headerText("n"), last.route, last.source],
      [value, "k699", 699, "699", "r", 699],
    );
  }
});

test("times beyond 2^53 pass through an enrich exactly, and __proto__ is a config key", () => {
  const builder = new BatchBuilder();
  builder.push({ value: "v", timestampMs: 1700000000123456789n });
  builder.push({ value: "w", timestampMs: -(2n ** 63n) });
  const out = new Batch(weir.enrichBatch((event, out) => out.emit(), {}, builder.finish()));
  assert.deepEqual([...out].map((e) => e.timestampBig), [1700000000123456789n, -(2n ** 63n)]);
  assert.throws(() => new BatchBuilder().push({ timestampMs: 2n ** 63n }), TypeError);
  const config = weir.parseConfig([["__proto__", '"x"'], ["a", "1"]]);
  assert.deepEqual(Object.keys(config), ["__proto__", "a"]);
  assert.equal(Object.getPrototypeOf(config), Object.prototype);
});

test("what a plugin throws is an error for the host, whatever it is", () => {
  const { filter } = weir.filter(() => {
    throw Object.create(null);
  });
  assert.throws(() => filter(testing.batch(['{"value_text":"a"}'])), { payload: "event 0: a thrown value that cannot be shown" });
  assert.throws(() => weir.keepBitmap(() => true, {}, new Uint8Array(8)), { payload: "the input batch: BatchError: not a weir batch (no WEIR identifier)" });
});
