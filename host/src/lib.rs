//! weir: a stream router that runs events through sandboxed WebAssembly plugins.
//!
//! The library half of the `weir` binary. [`runtime`] holds wasmtime (engine, plugins,
//! instances, limits, the sandbox); [`pipeline`] holds what runs batches through plugins
//! (stages, chains of stages, poison isolation, host-side windows). [`examples`] carries the
//! example plugins compiled into every binary, [`workload`] generates realistic events, and
//! [`baseline`] is native Rust doing the example plugins' work, for side-by-side measurement.
//! [`server`] is `weir serve` as a library: it builds the [`topology`] (sinks and running
//! pipelines) from the TOML [`config`] and feeds it from the [`sources`] (the QUIC server of
//! docs/PROTOCOL.md); [`sinks`] are where pipelines write.
//! See `DESIGN.md` for the architecture and `wit/weir.wit` for the plugin contract.

pub mod admin;
pub mod baseline;
pub mod checkpoint;
pub mod config;
pub mod files;
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod receiver;
pub mod runtime;
pub mod server;
pub mod sinks;
pub mod sources;
pub mod topology;
pub mod utc;
pub mod workload;

/// The example plugins of plugins/ (drop-bots, geo-enrich, count-sum), built by host/build.rs
/// and embedded as WASI 0.2 components, so that `weir demo` needs no files.
pub mod examples {
    include!(concat!(env!("OUT_DIR"), "/examples.rs"));
}
