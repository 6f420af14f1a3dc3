//! The Python SDK (`sdk/python`) against the format's own code: its unit tests run under
//! `cargo test`, a batch its builder writes passes the host's verifier and reads back as
//! written, and a batch the host builds reads the same in Python.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use common::events;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use weir_format::{Batch, BatchBuilder};

mod common;

/// `sdk/python`.
fn package() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// Runs `python3 ARGS` in `sdk/python` with `stdin`.
fn python(args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write as _;
    let mut child = Command::new("python3")
        .args(args)
        .current_dir(package())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs (`apt-get install python3`; .ci/run installs it)");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "python3 {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn the_python_unit_tests_pass() {
    let output = python(&["-m", "unittest", "discover", "-s", "tests"], b"");
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(report.trim_end().ends_with("OK"), "{report}");
}

/// The Python side of [`events`].
const PUSH: &str = r#"
import sys
from weir.batch import BatchBuilder
b = BatchBuilder()
b.push(value=b"v1", key=b"k", timestamp_ms=-5, headers=[("a", b"1"), ("a", b"2")], route="eu", source=4)
b.push(value=b"", timestamp_ms=1 << 40, source=5)
b.push(value=bytes(range(256)), timestamp_ms=3, headers=[("bin", bytes([0, 255, 10])), ("é", "ü".encode())], source=6)
sys.stdout.buffer.write(b.finish())
"#;

#[test]
fn a_batch_written_in_python_verifies_and_reads_as_written() {
    let output = python(&["-c", PUSH], b"");
    let batch = Batch::verify(&output.stdout).expect("the host's verifier accepts it");
    assert_eq!(batch.to_events(), events());
    let sources: Vec<u32> = batch.iter().map(|e| e.source()).collect();
    assert_eq!(sources, [4, 5, 6]);
}

/// Prints each event of the batch on stdin as one line of Python `repr`.
const READ: &str = r#"
import sys
from weir.batch import Batch
for e in Batch(sys.stdin.buffer.read()):
    print(repr((e.key, e.value, e.timestamp_ms, e.headers, e.route, e.header("a"))))
"#;

#[test]
fn a_batch_the_host_builds_reads_the_same_in_python() {
    let mut builder = BatchBuilder::new();
    for event in events() {
        builder.push(&event);
    }
    let output = python(&["-c", READ], &builder.finish());
    let lines: Vec<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let all_bytes = (0..=255u8)
        .map(|b| match b {
            b'\t' => "\\t".to_owned(),
            b'\n' => "\\n".to_owned(),
            b'\r' => "\\r".to_owned(),
            b'\\' => "\\\\".to_owned(),
            b'\'' => "\\'".to_owned(),
            0x20..=0x7e => (b as char).to_string(),
            _ => format!("\\x{b:02x}"),
        })
        .collect::<String>();
    assert_eq!(
        lines,
        [
            "(b'k', b'v1', -5, [('a', b'1'), ('a', b'2')], 'eu', b'1')".to_owned(),
            "(None, b'', 1099511627776, [], None, None)".to_owned(),
            format!(
                "(None, b'{all_bytes}', 3, [('bin', b'\\x00\\xff\\n'), ('é', b'\\xc3\\xbc')], None, None)"
            ),
        ]
    );
}
