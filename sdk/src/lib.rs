//! Write weir plugins as plain Rust functions.
//!
//! A weir plugin is a WASI 0.2 component that implements one world of `wit/weir.wit`: `filter`,
//! `enrich` or `aggregate`. With this crate an author writes one function (or one `impl`) and one
//! attribute; the attribute generates the component's exports, decodes the batch the host passes
//! in, calls the function once per event and encodes the answer. Authors never see wit-bindgen or
//! FlatBuffers.
//!
//! ```
//! use weir_sdk::Event;
//!
//! /// Drops health checks.
//! #[weir_sdk::filter]
//! fn keep(e: &Event) -> bool {
//!     e.header_str("path") != Some("/health")
//! }
//! # fn main() {}
//! ```
//!
//! ```
//! use weir_sdk::{Emitter, Event, Result};
//!
//! #[derive(serde::Deserialize)]
//! struct Tag {
//!     name: String,
//! }
//!
//! /// Adds a header to every event, and drops events that are not JSON.
//! #[weir_sdk::enrich]
//! fn tag(e: &Event, out: &mut Emitter, cfg: &Tag) -> Result<()> {
//!     e.json::<serde_json::Value>()?;
//!     out.edit(e).with_header(&cfg.name, "yes").emit();
//!     Ok(())
//! }
//! # fn main() {}
//! ```
//!
//! The three kinds and their signatures (the config parameter is optional everywhere; it is any
//! `serde::de::DeserializeOwned + Send + Sync` type, built once in `init`, see [`Config`]):
//!
//! - [`filter`]: `fn(&Event, &C) -> bool` or `-> Result<bool>`: keep (`true`) or drop.
//! - [`enrich`]: `fn(&Event, &mut Emitter, &C) -> ()` or `-> Result<()>`: emit 0..n events per
//!   event through the [`Emitter`].
//! - [`aggregate`](macro@aggregate): on an `impl Aggregate for T`: a keyed, windowed fold
//!   whose accumulator `T` the host owns between calls (see [`Aggregate`]).
//!
//! An error returned for one event fails the whole batch call with the message `event I: ...`;
//! the host then retries the batch event by event to isolate the poison event. A panic is
//! written to the host log at error level (see [`log`]) and then traps the instance. Because of
//! that retry, the events before a failing one run a second time: keep the functions pure per
//! event (state that must persist belongs in an aggregate's accumulator, which the host owns).
//!
//! The crate also builds natively, so a plugin crate's `cargo test` can call the author's
//! function on events built in the test (see [`testing`]). Log lines go to stderr there.
//!
//! One attribute per crate: a component exports exactly one world. The guide for plugin authors
//! is `docs/PLUGINS.md`.

#![deny(missing_docs)]

mod aggregate;
mod config;
mod emit;
mod error;
mod event;
pub mod log;
pub mod testing;

pub use aggregate::{Aggregate, Window};
pub use config::{Config, NoConfig};
pub use emit::{Edit, Emitter};
pub use error::{Context, Error, Result};
pub use event::{Event, Headers, IntoBytes, OwnedEvent};
pub use runtime::{EnrichOutput, FilterOutput};

/// Marks `fn(&Event[, &C]) -> bool | Result<bool>` as the plugin's filter.
///
/// The function stays callable by name. The optional second parameter is the config type,
/// built once in `init` from the stage's `with` values.
pub use weir_sdk_macros::filter;

/// Marks `fn(&Event, &mut Emitter[, &C]) -> () | Result<()>` as the plugin's enrich function.
///
/// The function stays callable by name. The optional third parameter is the config type,
/// built once in `init` from the stage's `with` values.
pub use weir_sdk_macros::enrich;

/// Marks an `impl weir_sdk::Aggregate for T` as the plugin's aggregate; `T` is the accumulator.
///
/// The impl is kept as written. The config type is `T::Config`.
pub use weir_sdk_macros::aggregate;

mod runtime;
mod shape;

/// What the attribute macros expand to. Not a public API: it changes without notice.
#[doc(hidden)]
pub mod __private {
    pub use crate::runtime::{ConfigCell, enrich, filter, finish, fold, init};

    /// A view of a batch: natively made with `Batch::verify`; in the component's export glue
    /// with `Batch::trusted` on the buffer the host verified.
    pub use weir_format::Batch;

    /// How many of `n` events a filter's keep-bitmap keeps.
    pub fn kept(bits: &[u8], n: usize) -> usize {
        (0..n)
            .filter(|i| bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
            .count()
    }

    /// How many events an output batch holds (0 when it is not one).
    pub fn events(bytes: &[u8]) -> usize {
        Batch::verify(bytes).map_or(0, |b| b.len())
    }

    /// The host interface, shared by the plugin's own bindings (`with:` in its `generate!`).
    #[cfg(target_arch = "wasm32")]
    pub use crate::bindings::weir::plugin::host;

    /// The bindings runtime the generated code refers to (`runtime_path`), so that a plugin
    /// crate needs no dependency of its own on wit-bindgen.
    #[cfg(target_arch = "wasm32")]
    pub use wit_bindgen;
}

/// Bindings to the `host` interface only: an imports-only world, so that linking the SDK adds
/// no export to a plugin's component (a component exports exactly the one world its attribute
/// names). The plugin's own `generate!` reuses these through `with:`.
#[cfg(target_arch = "wasm32")]
#[allow(missing_docs, clippy::all, unsafe_op_in_unsafe_fn)]
mod bindings {
    wit_bindgen::generate!({
        inline: "
            package weir:sdk;
            world host-imports {
                import weir:plugin/host@0.1.0;
            }
        ",
        path: "../wit",
        world: "weir:sdk/host-imports",
        with: { "weir:plugin/host@0.1.0": generate },
    });
}

#[cfg(test)]
mod tests;
