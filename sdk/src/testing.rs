//! Test a plugin natively, with `cargo test` in its own crate.
//!
//! The attribute leaves the author's function callable by name, so a test can call it directly
//! on events built in the test. These helpers run it the way the component runs it: the events
//! are encoded into a real batch, the SDK's batch loop calls the function, and the output (a
//! keep-bitmap, a batch, accumulator bytes) is decoded back.
//!
//! ```
//! use weir_sdk::{Event, OwnedEvent, testing};
//!
//! #[weir_sdk::filter]
//! fn keep(e: &Event) -> bool {
//!     e.header("user-agent").is_none_or(|agent| !agent.ends_with(b"bot"))
//! }
//!
//! // In the plugin crate: #[test] fn drops_bots() { ... }
//! fn drops_bots() {
//!     let events = [
//!         OwnedEvent::new("{}", 0).with_header("user-agent", "Googlebot"),
//!         OwnedEvent::new("{}", 0).with_header("user-agent", "curl/8"),
//!     ];
//!     let kept = testing::filter(&events, keep).unwrap();
//!     assert_eq!(kept, [events[1].clone()]);
//!     testing::with_event(&events[0], |e| assert!(!keep(e)));
//! }
//! # fn main() { drops_bots() }
//! ```

use crate::runtime::{enrich_batch, filter_batch, finish_windows, fold_groups};
use crate::{Aggregate, Config, Emitter, EnrichOutput, Error, Event, FilterOutput, OwnedEvent};
use crate::{Result, Window};
use serde::de::DeserializeOwned;
use weir_format::{Batch, BatchBuilder};

/// Encodes events into one batch buffer, as the host would pass it.
pub fn batch(events: &[OwnedEvent]) -> Vec<u8> {
    let mut builder = BatchBuilder::new();
    for e in events {
        builder.push_parts(
            e.key.as_deref(),
            &e.value,
            e.timestamp_ms,
            e.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
            e.route.as_deref(),
            0,
        );
    }
    builder.finish()
}

/// Verifies a batch buffer and returns views of its events.
pub fn events(buf: &[u8]) -> Result<Vec<Event<'_>>> {
    Ok(Batch::verify(buf)?.iter().map(Event::new).collect())
}

/// Verifies a batch buffer and copies its events out, each with its `source` field.
pub fn decode(buf: &[u8]) -> Result<Vec<(u32, OwnedEvent)>> {
    Ok(Batch::verify(buf)?
        .iter()
        .map(|e| (e.source(), e.to_event().into()))
        .collect())
}

/// Calls `f` with a view of `event` (encoded into a one-event batch).
pub fn with_event<T>(event: &OwnedEvent, f: impl FnOnce(&Event<'_>) -> T) -> T {
    let buf = batch(std::slice::from_ref(event));
    // SAFETY: `buf` was just built by `BatchBuilder`.
    let batch = unsafe { Batch::trusted(&buf) };
    match batch.get(0) {
        Some(e) => f(&Event::new(e)),
        None => unreachable!("a one-event batch has an event"),
    }
}

/// Builds a config type exactly as `init` does, from a JSON object of the stage's `with`
/// values: `testing::config::<Cfg>(r#"{"field": "country_code"}"#)`.
pub fn config<C: DeserializeOwned>(with: &str) -> Result<C> {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(with)
        .map_err(|e| Error::new(format!("config is not a JSON object: {e}")))?;
    // The host sends each value as its own JSON text; go through the same path.
    let pairs = object.into_iter().map(|(k, v)| (k, v.to_string()));
    Config::from_pairs(pairs)?.parse()
}

/// Runs a filter over `events` as one batch and returns the kept events.
pub fn filter<F, R>(events: &[OwnedEvent], keep: F) -> Result<Vec<OwnedEvent>>
where
    F: FnMut(&Event<'_>) -> R,
    R: FilterOutput,
{
    let buf = batch(events);
    // SAFETY: `buf` was just built by `BatchBuilder`.
    let bits = filter_batch(unsafe { Batch::trusted(&buf) }, keep)?;
    Ok(events
        .iter()
        .enumerate()
        .filter(|(i, _)| bits[i / 8] & (1 << (i % 8)) != 0)
        .map(|(_, e)| e.clone())
        .collect())
}

/// Runs an enrich function over `events` as one batch and returns the emitted events.
/// Use [`enrich_with_sources`] to see which input each came from.
pub fn enrich<F, R>(events: &[OwnedEvent], map: F) -> Result<Vec<OwnedEvent>>
where
    F: FnMut(&Event<'_>, &mut Emitter) -> R,
    R: EnrichOutput,
{
    Ok(enrich_with_sources(events, map)?
        .into_iter()
        .map(|(_, e)| e)
        .collect())
}

/// Like [`enrich`], with each output's `source`: the index of the input event it came from.
pub fn enrich_with_sources<F, R>(events: &[OwnedEvent], map: F) -> Result<Vec<(u32, OwnedEvent)>>
where
    F: FnMut(&Event<'_>, &mut Emitter) -> R,
    R: EnrichOutput,
{
    let buf = batch(events);
    // SAFETY: `buf` was just built by `BatchBuilder`.
    let out = enrich_batch(unsafe { Batch::trusted(&buf) }, map)?;
    decode(&out)
}

/// Folds `events` into one window and finishes it, returning the window's output events.
///
/// Each event is folded in its own call, and the accumulator goes through its byte encoding
/// between calls, as it does when the host holds it: state the encoding loses shows up here.
pub fn aggregate<A: Aggregate>(
    events: &[OwnedEvent],
    window: &Window,
    config: &A::Config,
) -> Result<Vec<OwnedEvent>> {
    let mut acc: Option<Vec<u8>> = None;
    for event in events {
        let buf = batch(std::slice::from_ref(event));
        // SAFETY: `buf` was just built by `BatchBuilder`.
        let batch = unsafe { Batch::trusted(&buf) };
        let mut accs = fold_groups::<A>(batch, [(acc.take(), vec![0])], config)?;
        acc = accs.pop();
    }
    let out = finish_windows::<A>([(window.clone(), acc)], config)?;
    Ok(decode(&out)?.into_iter().map(|(_, e)| e).collect())
}
