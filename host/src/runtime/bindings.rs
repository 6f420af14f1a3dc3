//! Host bindings of the three worlds of `wit/weir.wit`, one module per world.
//!
//! `bindgen!` reads the one copy of the contract in `wit/` (path relative to `host/`). The
//! `host` and `types` interfaces are generated once, in the aggregate module (the world that
//! uses every type), and the filter and enrich modules reuse them through `with`, so that one
//! `Host` implementation and one linker serve every world.

#![allow(missing_docs, reason = "generated code: the docs are in wit/weir.wit")]

pub(crate) mod aggregate {
    wasmtime::component::bindgen!({
        world: "aggregate",
        path: "../wit",
    });
}

pub(crate) mod filter {
    wasmtime::component::bindgen!({
        world: "filter",
        path: "../wit",
        with: {
            "weir:plugin/host": crate::runtime::bindings::aggregate::weir::plugin::host,
            "weir:plugin/types": crate::runtime::bindings::aggregate::weir::plugin::types,
        },
    });
}

pub(crate) mod enrich {
    wasmtime::component::bindgen!({
        world: "enrich",
        path: "../wit",
        with: {
            "weir:plugin/host": crate::runtime::bindings::aggregate::weir::plugin::host,
            "weir:plugin/types": crate::runtime::bindings::aggregate::weir::plugin::types,
        },
    });
}

pub(crate) use aggregate::weir::plugin::host;
pub(crate) use aggregate::weir::plugin::types;
