//! Aggregates: a keyed, windowed fold whose state the host owns.
//!
//! The host groups events by key and event-time window; the plugin only folds events into an
//! accumulator and turns a finished window's accumulator into events. Between calls the
//! accumulator lives in the host as bytes (the `acc` of a `window` in `wit/weir.wit`), so that
//! window state survives a hot swap and a restart. The SDK encodes the author's accumulator type
//! with [postcard](https://docs.rs/postcard) (compact, not self-describing) and decodes it on the
//! next call; a window that was never folded starts from `Default::default()`.
//!
//! Because the bytes outlive the plugin version that wrote them, the accumulator type is a
//! contract between versions (postcard cannot skip or default unknown fields). Each version
//! declares its layout ([`Aggregate::state_layout`], by default derived from the type's shape)
//! and the host never hands a version an accumulator written under another layout.
//! A decode failure fails the call: in `fold` with ``group G: accumulator does not decode: ...``
//! (G: the group's index among the call's groups), in `finish` with ``window W: accumulator does
//! not decode: ...`` (W: the window's index among the call's windows).

use crate::{Emitter, Error, Event, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A keyed, windowed fold. `Self` is the accumulator of one window.
///
/// ```
/// use weir_sdk::{Aggregate, Emitter, Event, NoConfig, OwnedEvent, Result, Window};
///
/// #[derive(Default, serde::Serialize, serde::Deserialize)]
/// struct Count(u64);
///
/// #[weir_sdk::aggregate]
/// impl Aggregate for Count {
///     type Config = NoConfig;
///
///     fn fold(&mut self, _: &Event, _: &NoConfig) -> Result<()> {
///         self.0 += 1;
///         Ok(())
///     }
///
///     fn finish(self, w: &Window, out: &mut Emitter, _: &NoConfig) -> Result<()> {
///         out.emit(OwnedEvent::new(self.0.to_string(), w.end_ms - 1));
///         Ok(())
///     }
/// }
/// # fn main() {}
/// ```
pub trait Aggregate: Default + Serialize + DeserializeOwned {
    /// The stage's config, built once in `init` (use [`crate::NoConfig`] for none).
    type Config: DeserializeOwned + Send + Sync + 'static;

    /// Folds one event of this window into the accumulator.
    fn fold(&mut self, event: &Event<'_>, config: &Self::Config) -> Result<()>;

    /// Turns the accumulator of a finished window into 0..n events.
    fn finish(self, window: &Window, out: &mut Emitter, config: &Self::Config) -> Result<()>;

    /// The layout id of this accumulator's encoding. The host keeps every window's
    /// accumulator with the layout id of the version that wrote it and never hands a version
    /// an accumulator of another layout: deploying a version whose id differs while windows
    /// are open is refused, or (as the deploy chooses) the previous version finishes the
    /// windows it opened.
    ///
    /// The default is derived from the type's shape as serde sees its default value: its name,
    /// field names and primitive types (`auto:` and a hash). Override it to say yourself when
    /// the encoding changes, e.g. to keep the id across a rename:
    ///
    /// ```
    /// use weir_sdk::{Aggregate, Emitter, Event, NoConfig, Result, Window};
    ///
    /// #[derive(Default, serde::Serialize, serde::Deserialize)]
    /// struct Totals {
    ///     count: u64,
    ///     sum: i64,
    /// }
    ///
    /// impl Aggregate for Totals {
    ///     type Config = NoConfig;
    ///
    ///     fn fold(&mut self, _: &Event, _: &NoConfig) -> Result<()> {
    ///         self.count += 1;
    ///         Ok(())
    ///     }
    ///
    ///     fn finish(self, _: &Window, _: &mut Emitter, _: &NoConfig) -> Result<()> {
    ///         Ok(())
    ///     }
    ///
    ///     fn state_layout() -> String {
    ///         "count-sum/2".into()
    ///     }
    /// }
    ///
    /// assert_eq!(Totals::state_layout(), "count-sum/2");
    /// ```
    fn state_layout() -> String {
        format!(
            "auto:{}",
            crate::shape::hash(&crate::shape::of(&Self::default()))
        )
    }
}

/// One keyed window of an aggregate, as the host assigned it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    /// The grouping key: the events' key, `None` for events without one.
    pub key: Option<Vec<u8>>,
    /// Start of the window in event time, milliseconds since the Unix epoch, inclusive.
    pub start_ms: i64,
    /// End of the window in event time, exclusive.
    pub end_ms: i64,
}

impl Window {
    /// A window of `key` covering `[start_ms, end_ms)`.
    pub fn new(key: Option<Vec<u8>>, start_ms: i64, end_ms: i64) -> Self {
        Window {
            key,
            start_ms,
            end_ms,
        }
    }

    /// The key as UTF-8 text; `None` when absent or not UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }
}

/// Decodes an accumulator the host held; `None` (never folded) is the default.
pub(crate) fn decode_acc<A: Aggregate>(acc: Option<&[u8]>) -> Result<A> {
    let Some(bytes) = acc else {
        return Ok(A::default());
    };
    let (acc, rest) = postcard::take_from_bytes::<A>(bytes)
        .map_err(|e| Error::new(format!("accumulator does not decode: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::new(format!(
            "accumulator does not decode: {} trailing bytes",
            rest.len()
        )));
    }
    Ok(acc)
}

/// Encodes an accumulator for the host to hold.
pub(crate) fn encode_acc<A: Aggregate>(acc: &A) -> Result<Vec<u8>> {
    postcard::to_allocvec(acc).map_err(|e| Error::new(format!("accumulator does not encode: {e}")))
}
