//! Per-event cost of verifying a batch: the flatbuffers crate's generic verifier (what
//! `Batch::verify` ran before) against the walk specialised for the batch schema, and
//! `Batch::verify` itself (identifier, then the walk), in one run.
//!
//! The batch holds 1024 events shaped like `weir::workload`'s (which this crate cannot depend
//! on): a 256 B JSON value, a `user-<n>` key, one `user-agent` header. Throughput is in events,
//! so criterion's time per element is the per-event cost.
//! Run: `cargo bench -p weir-format --bench verify`.

// criterion_group! and criterion_main! generate undocumented public functions.
#![allow(missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use weir_format::{Batch, Event, encode, verify};

const EVENTS: usize = 1024;
const VALUE_SIZE: usize = 256;

fn batch() -> Vec<u8> {
    let events: Vec<Event> = (0..EVENTS)
        .map(|i| {
            let mut value = format!(
                r#"{{"user":"user-{}","country_code":"FR","amount":{}.5,"path":"/p/{i}","pad":""#,
                i % 100,
                i % 100
            );
            let pad = VALUE_SIZE.saturating_sub(value.len() + 2);
            value.extend(std::iter::repeat_n('x', pad));
            value.push_str("\"}");
            let agent = if i % 10 == 9 {
                "Baiduspider/2.0"
            } else {
                "Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0"
            };
            Event::new(value, 1_700_000_000_000 + 10 * i as i64)
                .with_key(format!("user-{}", i % 100))
                .with_header("user-agent", agent)
        })
        .collect();
    encode(&events)
}

fn bench(c: &mut Criterion) {
    let bytes = batch();
    assert!(verify::generic(&bytes).is_ok() && verify::fast(&bytes));
    let mut group = c.benchmark_group("verify");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.bench_function("flatbuffers", |b| {
        b.iter(|| verify::generic(black_box(&bytes)).is_ok())
    });
    group.bench_function("fast", |b| b.iter(|| verify::fast(black_box(&bytes))));
    group.bench_function("batch_verify", |b| {
        b.iter(|| Batch::verify(black_box(&bytes)).map(|batch| batch.len()))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
