//! What runs inside the component's exports: config once in `init`, then one loop per batch.
//!
//! The attribute macros generate the component's exports (through wit-bindgen, in the plugin's
//! crate) and make each one call a function here with the author's function as a closure, so
//! that the per-event call is monomorphized and inlined into the batch loop. The functions
//! here do not depend on the target: the same code runs in the component and under
//! [`crate::testing`].
//!
//! They take a [`Batch`], not bytes, so that every one of them is sound to call from safe code
//! on any target: the only ways to get a `Batch` are [`Batch::verify`] (safe, checks every
//! offset) and the `unsafe` [`Batch::trusted`], whose caller vouches for the buffer. Natively
//! (a plugin's `cargo test`, the generated `__weir_*` functions) buffers are verified.
//!
//! Only the component's export glue, generated on `wasm32` inside a private module of the
//! plugin crate, calls [`Batch::trusted`] on the `list<u8>` the host passed in, without
//! verifying it again. SAFETY: the host verifies every buffer before it hands it to a guest
//! (buffers from the network are verified at ingest, a plugin's output is verified when it
//! comes back, and the rest the host built with `BatchBuilder`), and the `list<u8>` is copied
//! into this instance's memory whole, so the buffer cannot change under the reader. Nothing
//! else can reach that glue: the export is called by the canonical ABI alone. Skipping the check
//! is what keeps a filter at a few nanoseconds per event.

use crate::aggregate::{decode_acc, encode_acc};
use crate::{Aggregate, Config, Emitter, Error, Event, Result, Window};
use serde::de::DeserializeOwned;
use std::cell::Cell;
use std::sync::OnceLock;
use weir_format::Batch;

/// What a filter function may return: `bool`, or `Result<bool, E>` with `E` convertible into
/// [`Error`].
pub trait FilterOutput {
    /// Whether to keep the event, or why the batch fails.
    fn into_keep(self) -> Result<bool>;
}

impl FilterOutput for bool {
    #[inline]
    fn into_keep(self) -> Result<bool> {
        Ok(self)
    }
}

impl<E> FilterOutput for std::result::Result<bool, E>
where
    Error: From<E>,
{
    #[inline]
    fn into_keep(self) -> Result<bool> {
        self.map_err(Error::from)
    }
}

/// What an enrich function may return: `()`, or `Result<(), E>` with `E` convertible into
/// [`Error`].
pub trait EnrichOutput {
    /// Success, or why the batch fails.
    fn into_done(self) -> Result<()>;
}

impl EnrichOutput for () {
    #[inline]
    fn into_done(self) -> Result<()> {
        Ok(())
    }
}

impl<E> EnrichOutput for std::result::Result<(), E>
where
    Error: From<E>,
{
    #[inline]
    fn into_done(self) -> Result<()> {
        self.map_err(Error::from)
    }
}

/// The plugin instance's config, set once by `init`. The macros declare one per plugin.
pub struct ConfigCell<C>(OnceLock<C>);

impl<C> ConfigCell<C> {
    /// An empty cell (before `init`).
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        ConfigCell(OnceLock::new())
    }

    fn get(&self) -> Result<&C, String> {
        self.0
            .get()
            .ok_or_else(|| "plugin not initialised: the host must call `init` first".to_owned())
    }
}

/// The `init` export: installs the panic hook and builds the config from (key, JSON) pairs.
pub fn init<C: DeserializeOwned>(
    cell: &ConfigCell<C>,
    pairs: Vec<(String, String)>,
) -> Result<(), String> {
    crate::log::install_panic_hook();
    let config: C = Config::from_pairs(pairs)?.parse()?;
    cell.0
        .set(config)
        .map_err(|_| "plugin already initialised: `init` was called twice".to_owned())
}

/// The `filter` export: calls `keep` on every event and returns the keep-bitmap.
#[inline]
pub fn filter<C, F, R>(
    cell: &ConfigCell<C>,
    batch: Batch<'_>,
    mut keep: F,
) -> Result<Vec<u8>, String>
where
    F: FnMut(&Event<'_>, &C) -> R,
    R: FilterOutput,
{
    let config = cell.get()?;
    Ok(filter_batch(batch, |e| keep(e, config))?)
}

/// The `enrich` export: calls `map` on every event and returns the emitted events as a batch.
#[inline]
pub fn enrich<C, F, R>(
    cell: &ConfigCell<C>,
    batch: Batch<'_>,
    mut map: F,
) -> Result<Vec<u8>, String>
where
    F: FnMut(&Event<'_>, &mut Emitter, &C) -> R,
    R: EnrichOutput,
{
    let config = cell.get()?;
    Ok(enrich_batch(batch, |e, out| map(e, out, config))?)
}

/// The `fold` export: folds each group's events into its accumulator. A group is the
/// window's accumulator as the host holds it and the indices of its events in `batch`.
pub fn fold<A: Aggregate>(
    cell: &ConfigCell<A::Config>,
    batch: Batch<'_>,
    groups: impl IntoIterator<Item = (Option<Vec<u8>>, Vec<u32>)>,
) -> Result<Vec<Vec<u8>>, String> {
    let config = cell.get()?;
    Ok(fold_groups::<A>(batch, groups, config)?)
}

/// The `finish` export: turns finished windows (with their accumulators) into a batch.
pub fn finish<A: Aggregate>(
    cell: &ConfigCell<A::Config>,
    windows: impl IntoIterator<Item = (Window, Option<Vec<u8>>)>,
) -> Result<Vec<u8>, String> {
    let config = cell.get()?;
    Ok(finish_windows::<A>(windows, config)?)
}

/// The keep-bitmap of `batch`: bit `i % 8` of byte `i / 8` is set when event `i` is kept.
#[inline]
pub(crate) fn filter_batch<F, R>(batch: Batch<'_>, mut keep: F) -> Result<Vec<u8>>
where
    F: FnMut(&Event<'_>) -> R,
    R: FilterOutput,
{
    let mut bits = vec![0u8; batch.len().div_ceil(8)];
    for (i, event) in batch.iter().enumerate() {
        let kept = keep(&Event::new(event))
            .into_keep()
            .map_err(|e| e.context(format_args!("event {i}")))?;
        if kept {
            bits[i / 8] |= 1 << (i % 8);
        }
    }
    Ok(bits)
}

/// The events `map` emits for the events of `batch`, each with its input's index as `source`.
#[inline]
pub(crate) fn enrich_batch<F, R>(batch: Batch<'_>, mut map: F) -> Result<Vec<u8>>
where
    F: FnMut(&Event<'_>, &mut Emitter) -> R,
    R: EnrichOutput,
{
    let mut out = emitter();
    for (i, event) in batch.iter().enumerate() {
        out.set_source(index(i)?);
        map(&Event::new(event), &mut out)
            .into_done()
            .map_err(|e| e.context(format_args!("event {i}")))?;
    }
    Ok(recycle(out))
}

/// The new accumulator of every group, in order.
pub(crate) fn fold_groups<A: Aggregate>(
    batch: Batch<'_>,
    groups: impl IntoIterator<Item = (Option<Vec<u8>>, Vec<u32>)>,
    config: &A::Config,
) -> Result<Vec<Vec<u8>>> {
    let groups = groups.into_iter();
    let mut accs = Vec::with_capacity(groups.size_hint().0);
    for (g, (acc, events)) in groups.enumerate() {
        let mut acc: A =
            decode_acc(acc.as_deref()).map_err(|e| e.context(format_args!("group {g}")))?;
        for i in events {
            let event = batch.get(i as usize).ok_or_else(|| {
                Error::new(format!(
                    "group {g}: event index {i} out of a batch of {} events",
                    batch.len()
                ))
            })?;
            acc.fold(&Event::new(event), config)
                .map_err(|e| e.context(format_args!("event {i}")))?;
        }
        accs.push(encode_acc(&acc).map_err(|e| e.context(format_args!("group {g}")))?);
    }
    Ok(accs)
}

/// The events of every finished window, each with its window's index as `source`.
pub(crate) fn finish_windows<A: Aggregate>(
    windows: impl IntoIterator<Item = (Window, Option<Vec<u8>>)>,
    config: &A::Config,
) -> Result<Vec<u8>> {
    let mut out = emitter();
    for (w, (window, acc)) in windows.into_iter().enumerate() {
        out.set_source(index(w)?);
        let acc: A =
            decode_acc(acc.as_deref()).map_err(|e| e.context(format_args!("window {w}")))?;
        acc.finish(&window, &mut out, config)
            .map_err(|e| e.context(format_args!("window {w}")))?;
    }
    Ok(recycle(out))
}

fn index(i: usize) -> Result<u32> {
    u32::try_from(i).map_err(|_| Error::new(format!("index {i} does not fit the `source` field")))
}

thread_local! {
    /// The emitter (the output builder and the buffers edits reuse), kept between calls so
    /// that its buffers are allocated once per instance rather than once per call.
    static EMITTER: Cell<Option<Emitter>> = const { Cell::new(None) };
}

fn emitter() -> Emitter {
    EMITTER.take().unwrap_or_else(Emitter::new)
}

/// Finishes the output and keeps the emitter for the next call. An emitter dropped on an
/// error is not recycled, so a failed call leaves nothing behind.
fn recycle(mut out: Emitter) -> Vec<u8> {
    let bytes = out.finish();
    EMITTER.set(Some(out));
    bytes
}
