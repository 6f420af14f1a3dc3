//! Per-event cost of a filter, three ways, in one run (DESIGN §8), on 256 B events:
//!
//! - `native`: drop-bots' check as a Rust closure over the batch, building the same keep-bitmap
//!   ([`weir::baseline::NativeFilter::bitmap`]).
//! - `batch_abi/B`: weir's batch ABI, one component call per batch of B events (B = 1, 16, 256,
//!   1024, 4096): the drop-bots plugin through [`weir::pipeline::Stage::filter_bitmap`] (copy
//!   in, call, bitmap out, its length checked).
//! - `record_per_event`: one component call per event with the event as a typed record, the
//!   shape Redpanda Data Transforms and most plugin systems use (`benches/wit/record.wit`, the
//!   record-filter plugin, the same check); the host lifts each event into the record.
//!
//! In these three the batches are verified once, before timing, as ingest verifies a batch
//! once at the network boundary: verification is the same work for every variant (about
//! 21 ns per event, docs/BENCHMARKS.md) and would only blur the differences measured here. The `stage/*` pair then measures what a pipeline stage costs per batch of 1024,
//! verification and output included: [`weir::pipeline::Stage::process`] on the bytes (verify,
//! call, re-encode the kept events) against native Rust doing the same
//! ([`weir::baseline::NativeFilter::process`] after verifying).
//!
//! Every variant processes the same 256 B events and reports throughput in events, so
//! criterion's time per element is the per-event cost. The record variant runs on
//! `Engine::default()` (no epoch checks, 4 GiB reservations: no bounds checks), the batch ABI
//! on weir's runtime (epoch interruption, bounds-checked 256 MiB slots), so the comparison
//! favours the per-event shape. Run: `cargo bench -p weir-benches --bench filter`.

// criterion_group! and criterion_main! generate undocumented public functions.
#![allow(missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use weir::baseline::NativeFilter;
use weir::pipeline::Stage;
use weir::runtime::{Runtime, RuntimeConfig, StageConfig};
use weir::workload::WorkloadSpec;
use weir_format::Batch;

mod plugins {
    include!(concat!(env!("OUT_DIR"), "/plugin_paths.rs"));
}

/// The bench-only per-event world.
mod record {
    wasmtime::component::bindgen!({ path: "wit/record.wit", world: "record-filter" });
}

/// Events per measured iteration: a multiple of every batch size.
const EVENTS: u64 = 16_384;
const BATCH_SIZES: [usize; 5] = [1, 16, 256, 1024, 4096];

fn workload() -> WorkloadSpec {
    WorkloadSpec {
        events: EVENTS,
        value_size: 256,
        ..WorkloadSpec::default()
    }
}

/// The record-filter component with a sandboxed WASI context (no files, env or network).
struct RecordFilter {
    store: Store<Ctx>,
    bindings: record::RecordFilter,
}

struct Ctx {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for Ctx {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl RecordFilter {
    fn new() -> Self {
        let engine = Engine::default();
        let component = Component::from_file(&engine, plugins::RECORD_FILTER).expect("component");
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).expect("wasi");
        let ctx = Ctx {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
        };
        let mut store = Store::new(&engine, ctx);
        let bindings =
            record::RecordFilter::instantiate(&mut store, &component, &linker).expect("instance");
        RecordFilter { store, bindings }
    }

    /// One call per event; the host lifts each event into the record, as such systems do.
    fn run(&mut self, batch: &Batch<'_>) -> usize {
        let mut kept = 0;
        for event in batch.iter() {
            let record = record::Event {
                key: event.key().map(<[u8]>::to_vec),
                value: event.value().to_vec(),
                timestamp_ms: event.timestamp_ms(),
                headers: event
                    .headers()
                    .map(|(n, v)| (n.to_owned(), v.to_vec()))
                    .collect(),
            };
            if self
                .bindings
                .call_filter(&mut self.store, &record)
                .expect("call")
            {
                kept += 1;
            }
        }
        kept
    }
}

/// Views of batches verified once, as ingest verifies them.
fn verified(batches: &[Vec<u8>]) -> Vec<Batch<'_>> {
    batches
        .iter()
        .map(|b| Batch::verify(b).expect("valid"))
        .collect()
}

fn filter(c: &mut Criterion) {
    let spec = workload();
    let mut group = c.benchmark_group("filter_256B");
    group.throughput(Throughput::Elements(EVENTS));

    let batches = spec.batches(1024);
    let views = verified(&batches);
    group.bench_function("native", |b| {
        b.iter(|| {
            for view in &views {
                black_box(NativeFilter::bitmap(view));
            }
        })
    });

    let runtime = Runtime::new(RuntimeConfig::default()).expect("runtime");
    let plugin = runtime.load_file(plugins::DROP_BOTS).expect("drop_bots");
    let mut stage = Stage::new(&plugin, StageConfig::new("drop_bots"), None).expect("stage");
    for size in BATCH_SIZES {
        let batches = spec.batches(size);
        let sized = verified(&batches);
        group.bench_with_input(BenchmarkId::new("batch_abi", size), &sized, |b, views| {
            b.iter(|| {
                for view in views {
                    black_box(stage.filter_bitmap(view).expect("filter"));
                }
            })
        });
    }

    let mut record = RecordFilter::new();
    // The variants must agree before their times mean anything.
    let mut native_stage = NativeFilter::default();
    for (batch, view) in batches.iter().zip(&views) {
        let native = NativeFilter::bitmap(view);
        assert_eq!(stage.filter_bitmap(view).expect("filter"), native);
        assert_eq!(record.run(view), native.count());
        assert_eq!(
            stage.process(batch).expect("process").batch,
            native_stage.process(view)
        );
    }
    group.bench_function("record_per_event", |b| {
        b.iter(|| {
            for view in &views {
                black_box(record.run(view));
            }
        })
    });

    group.bench_function("stage/native", |b| {
        b.iter(|| {
            for batch in &batches {
                let view = Batch::verify(batch).expect("valid");
                black_box(native_stage.process(&view));
            }
        })
    });
    group.bench_function("stage/wasm", |b| {
        b.iter(|| {
            for batch in &batches {
                black_box(stage.process(batch).expect("process"));
            }
        })
    });
    group.finish();
}

/// The trivial filter of the Fluvio comparison (plugins/even-key, half of the events kept) on
/// verified batches of 1024: the call alone (`call`: copy in, check, bitmap out); the stage as
/// a chain runs it (`stage`: [`Stage::filter_kept`], its output a selection of the input, dead
/// letters and isolation included); and the stage re-encoding the kept events into a batch of
/// their own (`stage_copy`: [`Stage::process_batch`], what every filter stage did before).
fn trivial(c: &mut Criterion) {
    let spec = workload();
    let mut group = c.benchmark_group("trivial_256B");
    group.throughput(Throughput::Elements(EVENTS));
    let batches = spec.batches(1024);
    let views = verified(&batches);
    let runtime = Runtime::new(RuntimeConfig::default()).expect("runtime");
    let plugin = runtime.load_file(plugins::EVEN_KEY).expect("even_key");
    let mut stage = Stage::new(&plugin, StageConfig::new("even_key"), None).expect("stage");
    let kept: usize = views
        .iter()
        .map(|view| stage.filter_bitmap(view).expect("filter").count())
        .sum();
    assert_eq!(
        kept as u64,
        EVENTS / 2,
        "even-key keeps half of the workload"
    );
    group.bench_function("call", |b| {
        b.iter(|| {
            for view in &views {
                black_box(stage.filter_bitmap(view).expect("filter"));
            }
        })
    });
    group.bench_function("stage", |b| {
        b.iter(|| {
            for view in &views {
                black_box(stage.filter_kept(view, None).expect("filter"));
            }
        })
    });
    group.bench_function("stage_copy", |b| {
        b.iter(|| {
            for view in &views {
                black_box(stage.process_batch(view).expect("process"));
            }
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = filter, trivial
}
criterion_main!(benches);
