//! The JavaScript SDK (`sdk/js`) against the format's own code: its unit tests run under
//! `cargo test` (`node --test`), a batch its builder writes passes the host's verifier and reads
//! back as written, and a batch the host builds reads the same in JavaScript.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use common::events;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use weir_format::{Batch, BatchBuilder};

mod common;

/// `sdk/js`.
fn package() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js")
}

/// Runs `node ARGS` in `sdk/js` with `stdin`.
fn node(args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write as _;
    let mut child = Command::new("node")
        .args(args)
        .current_dir(package())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs (`apt-get install nodejs`; .ci/run installs it)");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "node {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn the_javascript_unit_tests_pass() {
    let output = node(&["--test", "--test-reporter=tap", "test/sdk.test.js"], b"");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(report.contains("\n# fail 0\n"), "{report}");
    assert!(!report.contains("\n# pass 0\n"), "{report}");
}

/// The JavaScript side of [`events`].
const PUSH: &str = r#"
import { BatchBuilder } from "./weir.js";
const b = new BatchBuilder();
b.push({ value: "v1", key: "k", timestampMs: -5, headers: [["a", "1"], ["a", "2"]], route: "eu", source: 4 });
b.push({ value: new Uint8Array(0), timestampMs: 2 ** 40, source: 5 });
b.push({ value: Uint8Array.from({ length: 256 }, (_, i) => i), timestampMs: 3, headers: [["bin", new Uint8Array([0, 255, 10])], ["é", "ü"]], source: 6 });
process.stdout.write(b.finish());
"#;

#[test]
fn a_batch_written_in_javascript_verifies_and_reads_as_written() {
    let output = node(&["--input-type=module", "-e", PUSH], b"");
    let batch = Batch::verify(&output.stdout).expect("the host's verifier accepts it");
    assert_eq!(batch.to_events(), events());
    let sources: Vec<u32> = batch.iter().map(|e| e.source()).collect();
    assert_eq!(sources, [4, 5, 6]);
}

/// Prints each event of the batch on stdin as one line of JSON (bytes as arrays).
const READ: &str = r#"
import { readFileSync } from "node:fs";
import { Batch } from "./weir.js";
const bytes = (b) => (b === null ? null : [...b]);
for (const e of new Batch(new Uint8Array(readFileSync(0)))) {
  const headers = e.headers.map(([name, value]) => [name, bytes(value)]);
  console.log(JSON.stringify([bytes(e.key), bytes(e.value), e.timestampMs, headers, e.route, bytes(e.header("a"))]));
}
"#;

#[test]
fn a_batch_the_host_builds_reads_the_same_in_javascript() {
    let mut builder = BatchBuilder::new();
    for event in events() {
        builder.push(&event);
    }
    let output = node(&["--input-type=module", "-e", READ], &builder.finish());
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    assert_eq!(
        lines,
        [
            serde_json::json!([[107], [118, 49], -5, [["a", [49]], ["a", [50]]], "eu", [49]]),
            serde_json::json!([null, [], 1u64 << 40, [], null, null]),
            serde_json::json!([
                null,
                all_bytes,
                3,
                [["bin", [0, 255, 10]], ["é", [0xc3, 0xbc]]],
                null,
                null
            ]),
        ]
    );
}

/// Writes 600 events whose key, value, route and headers take every length modulo 8.
const PUSH_MANY: &str = r#"
import { BatchBuilder } from "./weir.js";
const b = new BatchBuilder();
for (let i = 0; i < 600; i++) {
  const headers = [];
  for (let j = 0; j < i % 4; j++) {
    headers.push(["h".repeat(1 + ((i + j) % 9)), "v".repeat((i * j) % 7)]);
  }
  b.push({
    value: "x".repeat(i % 13),
    key: i % 5 ? "k".repeat(i % 8) : null,
    timestampMs: i * 1000 - 300000,
    headers,
    route: i % 3 ? "r".repeat(i % 6) : null,
    source: i,
  });
}
process.stdout.write(b.finish());
"#;

#[test]
fn a_big_batch_of_every_field_length_written_in_javascript_verifies_and_reads_as_written() {
    let output = node(&["--input-type=module", "-e", PUSH_MANY], b"");
    let batch = Batch::verify(&output.stdout).expect("the host's verifier accepts it");
    assert_eq!(batch.len(), 600);
    for (i, event) in batch.iter().enumerate() {
        let n = i as i64;
        assert_eq!(event.value(), "x".repeat(i % 13).as_bytes());
        let key = (i % 5 != 0).then(|| "k".repeat(i % 8));
        assert_eq!(event.key(), key.as_deref().map(str::as_bytes));
        assert_eq!(event.timestamp_ms(), n * 1000 - 300000);
        let route = (i % 3 != 0).then(|| "r".repeat(i % 6));
        assert_eq!(event.route(), route.as_deref());
        let headers: Vec<(String, Vec<u8>)> = (0..i % 4)
            .map(|j| {
                (
                    "h".repeat(1 + (i + j) % 9),
                    "v".repeat((i * j) % 7).into_bytes(),
                )
            })
            .collect();
        let read: Vec<(String, Vec<u8>)> = event
            .headers()
            .map(|(name, value)| (name.to_owned(), value.to_vec()))
            .collect();
        assert_eq!(read, headers, "event {i}");
        assert_eq!(event.source() as usize, i);
    }
}
