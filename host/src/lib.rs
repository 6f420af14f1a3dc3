//! weir: a stream router that runs events through sandboxed WebAssembly plugins.
//!
//! The library half of the `weir` binary. [`runtime`] holds wasmtime (engine, plugins,
//! instances, limits, the sandbox); [`pipeline`] holds what runs batches through plugins
//! (stages, chains of stages, poison isolation, host-side windows). [`examples`] carries the
//! example plugins compiled into every binary, [`workload`] generates realistic events, and
//! [`baseline`] is native Rust doing the example plugins' work, for side-by-side measurement.
//! [`config`], [`sources`] and [`sinks`] are `weir serve`: the TOML config, where batches come
//! from (the QUIC server of docs/PROTOCOL.md) and where pipelines write.
//! See `DESIGN.md` for the architecture and `wit/weir.wit` for the plugin contract.

pub mod baseline;
pub mod config;
pub mod metrics;
pub mod pipeline;
pub mod receiver;
pub mod runtime;
pub mod sinks;
pub mod sources;
pub mod workload;

/// The example plugins of plugins/ (drop-bots, geo-enrich, count-sum), built by host/build.rs
/// and embedded as WASI 0.2 components, so that `weir demo` needs no files.
pub mod examples {
    include!(concat!(env!("OUT_DIR"), "/examples.rs"));
}
