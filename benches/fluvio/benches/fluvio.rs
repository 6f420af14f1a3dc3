//! Per-event cost of the same trivial filter on the same events, weir against Fluvio, in one
//! run (DESIGN §8). The filter keeps an event when the last byte of its key is an even ASCII
//! digit: half of `weir::workload`'s 256 B events (keys `user-<n>`). 16 384 events, in batches
//! of 1024, every variant reporting throughput in events, so that criterion's time per element
//! is the per-event cost.
//!
//! - `native`: the check as a plain Rust loop over each verified weir batch, building a
//!   keep-bitmap (as `weir::baseline::NativeFilter::bitmap` does for drop-bots): the floor.
//! - `weir_stage`: plugins/even-key loaded with weir's runtime, each batch through
//!   [`weir::pipeline::Stage::filter_kept`]: one component call with the batch's bytes copied
//!   in and the keep-bitmap back, checked; the output is a selection of the input, what a
//!   chain hands to the next filter and to the sinks. The batches are verified once, before
//!   timing, as ingest verifies a batch once at the network boundary.
//! - `weir_stage_copy`: the same through [`weir::pipeline::Stage::process_batch`], which also
//!   re-encodes the kept events into a batch of their own (what a stage of another kind after
//!   the filter gets).
//! - `fluvio_smartengine`: the same filter as a Fluvio SmartModule (even-key-smartmodule/,
//!   `fluvio-smartmodule` 0.50.1, `#[smartmodule(filter)]` over `SmartModuleRecord`) run by
//!   `fluvio-smartengine` 0.50.1 (wasmtime 34, fuel metering on, as `SmartEngine::new` sets
//!   it): `SmartModuleChainInstance::process` on a `SmartModuleInput` of 1024 records, what
//!   Fluvio's SPU does per batch. Inside that call: the input encoded once more and copied
//!   into the guest, the guest decoding every record (key and value) and encoding the kept
//!   ones, the host copying the output out and decoding it into `Record`s. Outside it: building
//!   the input from the events (`SmartModuleInput::try_from_records`, the records encoded in
//!   Fluvio's wire format), done once before timing as a broker receives them encoded.
//!   `process` consumes its input, so each iteration's 16 inputs are cloned in criterion's
//!   `iter_batched` setup, which is not timed.
//!
//! Fluvio records are built from the same events: key, value, and the event time as the
//! record's timestamp delta from the batch's base timestamp (offset deltas too). Fluvio records
//! carry no string headers, so the events' `user-agent` header is not in them: Fluvio's input
//! is about 60 B per event smaller than weir's. weir's runtime checks an epoch deadline and
//! bounds-checks a 256 MiB slot; Fluvio's wasmtime counts fuel. Both produce what the next
//! step takes: weir a selection of its input (or, in `weir_stage_copy`, re-encoded events),
//! Fluvio decoded records. Run:
//! `cargo bench --manifest-path benches/fluvio/Cargo.toml`.

// criterion_group! and criterion_main! generate undocumented public functions.
#![allow(missing_docs)]

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use fluvio_smartengine::{
    DEFAULT_SMARTENGINE_VERSION, SmartEngine, SmartModuleChainBuilder, SmartModuleChainInstance,
    SmartModuleConfig,
};
use fluvio_smartmodule::Record;
use fluvio_smartmodule::dataplane::smartmodule::SmartModuleInput;
use std::hint::black_box;
use std::time::Duration;
use weir::pipeline::Stage;
use weir::runtime::{Runtime, RuntimeConfig, StageConfig};
use weir::workload::WorkloadSpec;
use weir_format::{Batch, KeepBitmap};

mod plugins {
    include!(concat!(env!("OUT_DIR"), "/plugin_paths.rs"));
}

mod smartmodules {
    include!(concat!(env!("OUT_DIR"), "/smartmodule_paths.rs"));
}

/// Events per measured iteration: 16 batches.
const EVENTS: u64 = 16_384;
/// Events per batch, weir's and Fluvio's.
const BATCH: usize = 1024;

fn workload() -> WorkloadSpec {
    WorkloadSpec {
        events: EVENTS,
        value_size: 256,
        ..WorkloadSpec::default()
    }
}

/// The filter's check: whether `key` ends in an even ASCII digit.
fn ends_even(key: &[u8]) -> bool {
    key.last()
        .is_some_and(|last| last.is_ascii_digit() && last % 2 == 0)
}

/// The keep-bitmap of the check over a verified batch, natively.
fn native_bitmap(batch: &Batch<'_>) -> KeepBitmap {
    let mut bitmap = KeepBitmap::none(batch.len());
    for (i, event) in batch.iter().enumerate() {
        if event.key().is_some_and(ends_even) {
            bitmap.set(i, true);
        }
    }
    bitmap
}

/// The events of a weir batch as the input Fluvio's SmartEngine takes for one batch.
fn smartmodule_input(batch: &Batch<'_>, base_offset: i64) -> SmartModuleInput {
    let base_timestamp = batch.get(0).map_or(0, |event| event.timestamp_ms());
    let records = batch
        .iter()
        .enumerate()
        .map(|(i, event)| {
            let key = event.key().expect("workload events have keys").to_vec();
            let mut record = Record::new_key_value(key, event.value().to_vec());
            let header = record.get_mut_header();
            header.set_timestamp_delta(event.timestamp_ms() - base_timestamp);
            header.set_offset_delta(i as i64);
            record
        })
        .collect();
    let mut input = SmartModuleInput::try_from_records(records, DEFAULT_SMARTENGINE_VERSION)
        .expect("encode records");
    input.set_base_offset(base_offset);
    input.set_base_timestamp(base_timestamp);
    input
}

/// The even-key SmartModule, instantiated by Fluvio's engine as a chain of one.
fn smartmodule_chain() -> SmartModuleChainInstance {
    let engine = SmartEngine::new();
    let module = std::fs::read(smartmodules::EVEN_KEY_SMARTMODULE).expect("read SmartModule");
    let config = SmartModuleConfig::builder()
        .smartmodule_names(vec!["even-key".to_owned()])
        .build()
        .expect("SmartModule config");
    let mut builder = SmartModuleChainBuilder::default();
    builder.add_smart_module(config, module);
    builder.initialize(&engine).expect("initialize SmartModule")
}

/// The keys of the events or records a filter kept, to check that the variants agree.
fn kept_keys<'k>(keys: impl Iterator<Item = Option<&'k [u8]>>) -> Vec<Vec<u8>> {
    keys.map(|key| key.unwrap_or_default().to_vec()).collect()
}

fn filter(c: &mut Criterion) {
    let batches = workload().batches(BATCH);
    let views: Vec<Batch<'_>> = batches
        .iter()
        .map(|b| Batch::verify(b).expect("valid"))
        .collect();
    let inputs: Vec<SmartModuleInput> = views
        .iter()
        .enumerate()
        .map(|(i, view)| smartmodule_input(view, (i * BATCH) as i64))
        .collect();

    let runtime = Runtime::new(RuntimeConfig::default()).expect("runtime");
    let plugin = runtime.load_file(plugins::EVEN_KEY).expect("even_key");
    let mut stage = Stage::new(&plugin, StageConfig::new("even_key"), None).expect("stage");
    let mut chain = smartmodule_chain();

    // The variants must agree, and keep half the events, before their times mean anything.
    for (view, input) in views.iter().zip(&inputs) {
        let bitmap = native_bitmap(view);
        assert_eq!(bitmap.count(), BATCH / 2);
        let native_kept = kept_keys(
            view.iter()
                .enumerate()
                .filter(|(i, _)| bitmap.get(*i))
                .map(|(_, event)| event.key()),
        );
        let selection = stage.filter_kept(view, None).expect("filter").batch;
        assert_eq!(selection.as_ref(), Some(&bitmap));
        let weir_out = stage.process_batch(view).expect("process");
        let weir_kept = Batch::verify(&weir_out.batch).expect("valid output");
        assert_eq!(kept_keys(weir_kept.iter().map(|e| e.key())), native_kept);
        let fluvio_out = chain.process(input.clone()).expect("process");
        assert!(fluvio_out.error.is_none(), "{:?}", fluvio_out.error);
        let fluvio_kept = kept_keys(
            fluvio_out
                .successes
                .iter()
                .map(|record| record.key().map(|key| key.as_ref())),
        );
        assert_eq!(fluvio_kept, native_kept);
    }

    let mut group = c.benchmark_group("even_key_256B");
    group.throughput(Throughput::Elements(EVENTS));
    group.bench_function("native", |b| {
        b.iter(|| {
            for view in &views {
                black_box(native_bitmap(view));
            }
        })
    });
    group.bench_function("weir_stage", |b| {
        b.iter(|| {
            for view in &views {
                black_box(stage.filter_kept(view, None).expect("filter"));
            }
        })
    });
    group.bench_function("weir_stage_copy", |b| {
        b.iter(|| {
            for view in &views {
                black_box(stage.process_batch(view).expect("process"));
            }
        })
    });
    group.bench_function("fluvio_smartengine", |b| {
        b.iter_batched(
            || inputs.clone(),
            |inputs| {
                for input in inputs {
                    black_box(chain.process(input).expect("process"));
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = filter
}
criterion_main!(benches);
