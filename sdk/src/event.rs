//! Events as a plugin sees them: [`Event`], a zero-copy view into the batch the host passed in,
//! and [`OwnedEvent`], an event the plugin builds and emits.
//!
//! An event is `key: optional bytes`, `value: bytes`, `timestamp_ms: i64` (event time, never
//! rewritten by weir), `headers: list of (name, bytes)` (names may repeat and compare exactly)
//! and a `route` tag that sinks can select on. Reading any field of an [`Event`] copies nothing;
//! [`Event::to_owned`] copies everything.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;
use weir_format::EventRef;

pub use weir_format::Headers;

/// One event of the batch being processed, read in place. Borrowed for the duration of a call.
#[derive(Clone)]
pub struct Event<'a> {
    inner: EventRef<'a>,
}

impl<'a> Event<'a> {
    pub(crate) fn new(inner: EventRef<'a>) -> Self {
        Event { inner }
    }

    pub(crate) fn inner(&self) -> &EventRef<'a> {
        &self.inner
    }

    /// The key, if the producer set one.
    #[inline]
    pub fn key(&self) -> Option<&'a [u8]> {
        self.inner.key()
    }

    /// The key as UTF-8 text; `None` when absent or not UTF-8.
    #[inline]
    pub fn key_str(&self) -> Option<&'a str> {
        self.key().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The payload bytes (empty when absent).
    #[inline]
    pub fn value(&self) -> &'a [u8] {
        self.inner.value()
    }

    /// The payload as UTF-8 text.
    pub fn value_str(&self) -> Result<&'a str> {
        std::str::from_utf8(self.value()).map_err(|e| Error::new(format!("value: {e}")))
    }

    /// The payload parsed as JSON into `T`. `T` may borrow from the batch (`&'a str` fields).
    pub fn json<T: Deserialize<'a>>(&self) -> Result<T> {
        serde_json::from_slice(self.value()).map_err(|e| Error::new(format!("value: {e}")))
    }

    /// Event time in milliseconds since the Unix epoch.
    #[inline]
    pub fn timestamp_ms(&self) -> i64 {
        self.inner.timestamp_ms()
    }

    /// The headers in order, as `(name, value)`.
    #[inline]
    pub fn headers(&self) -> Headers<'a> {
        self.inner.headers()
    }

    /// The value of the first header named exactly `name`. Allocates nothing.
    #[inline]
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.inner.header(name)
    }

    /// The value of the first header named `name`, as UTF-8 text; `None` when absent or not
    /// UTF-8.
    #[inline]
    pub fn header_str(&self, name: &str) -> Option<&'a str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The route tag, if a plugin earlier in the pipeline set one.
    #[inline]
    pub fn route(&self) -> Option<&'a str> {
        self.inner.route()
    }

    /// Copies the event out of the batch, to change it and emit it.
    pub fn to_owned(&self) -> OwnedEvent {
        self.inner.to_event().into()
    }
}

impl fmt::Debug for Event<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

/// An event owned by the plugin: built from scratch ([`OwnedEvent::new`], [`OwnedEvent::json`])
/// or copied from the input ([`Event::to_owned`]), then emitted with [`crate::Emitter::emit`].
///
/// The `with_*` / `without_*` / `add_header` methods take and return the event, for chaining:
/// `e.to_owned().with_key("k").with_header("country", "FR")`. The fields are public too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnedEvent {
    /// Partitioning / grouping key.
    pub key: Option<Vec<u8>>,
    /// The payload.
    pub value: Vec<u8>,
    /// Event time in milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Headers in order; names may repeat.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Route tag; sinks can select on it.
    pub route: Option<String>,
}

impl OwnedEvent {
    /// An event with this value and timestamp and nothing else.
    pub fn new(value: impl IntoBytes, timestamp_ms: i64) -> Self {
        OwnedEvent {
            value: value.into_bytes(),
            timestamp_ms,
            ..OwnedEvent::default()
        }
    }

    /// An event whose value is `value` serialized as JSON.
    pub fn json<T: Serialize + ?Sized>(value: &T, timestamp_ms: i64) -> Result<Self> {
        Ok(OwnedEvent::new(serde_json::to_vec(value)?, timestamp_ms))
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl IntoBytes) -> Self {
        self.key = Some(key.into_bytes());
        self
    }

    /// Removes the key.
    pub fn without_key(mut self) -> Self {
        self.key = None;
        self
    }

    /// Replaces the value.
    pub fn with_value(mut self, value: impl IntoBytes) -> Self {
        self.value = value.into_bytes();
        self
    }

    /// Replaces the value with `value` serialized as JSON.
    pub fn with_json<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self> {
        self.value = serde_json::to_vec(value)?;
        Ok(self)
    }

    /// Sets the event time.
    pub fn with_timestamp_ms(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = timestamp_ms;
        self
    }

    /// Sets header `name`: replaces the first header of that name in place and removes any
    /// other of that name, or appends one when there is none.
    pub fn with_header(mut self, name: impl Into<String>, value: impl IntoBytes) -> Self {
        set_header(&mut self.headers, name.into(), value.into_bytes());
        self
    }

    /// Appends a header, even when one of that name exists.
    pub fn add_header(mut self, name: impl Into<String>, value: impl IntoBytes) -> Self {
        self.headers.push((name.into(), value.into_bytes()));
        self
    }

    /// Removes every header named `name`.
    pub fn without_header(mut self, name: impl AsRef<str>) -> Self {
        self.headers.retain(|(n, _)| n != name.as_ref());
        self
    }

    /// Sets the route tag.
    pub fn with_route(mut self, route: impl Into<String>) -> Self {
        self.route = Some(route.into());
        self
    }

    /// Removes the route tag.
    pub fn without_route(mut self) -> Self {
        self.route = None;
        self
    }

    /// The value of the first header named `name`.
    #[inline]
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The value as UTF-8 text.
    pub fn value_str(&self) -> Result<&str> {
        std::str::from_utf8(&self.value).map_err(|e| Error::new(format!("value: {e}")))
    }
}

/// Anything that can become the bytes of a key, a value or a header value: `&str`, `String`,
/// `&String`, `&[u8]`, `Vec<u8>`, `&Vec<u8>`, byte strings (`b"..."`), byte arrays and `Cow`s
/// of those. Owned buffers move; borrowed ones are copied into an [`OwnedEvent`], and borrowed
/// as they are by an [`crate::Edit`].
pub trait IntoBytes: Sized {
    /// The bytes, owned.
    fn into_bytes(self) -> Vec<u8> {
        self.into_cow().into_owned()
    }

    /// The bytes, borrowed when `self` is a reference (no copy), owned otherwise.
    fn into_cow<'a>(self) -> Cow<'a, [u8]>
    where
        Self: 'a;
}

impl IntoBytes for Vec<u8> {
    fn into_cow<'a>(self) -> Cow<'a, [u8]> {
        Cow::Owned(self)
    }
}

impl IntoBytes for String {
    fn into_cow<'a>(self) -> Cow<'a, [u8]> {
        Cow::Owned(String::into_bytes(self))
    }
}

impl IntoBytes for &str {
    fn into_cow<'a>(self) -> Cow<'a, [u8]>
    where
        Self: 'a,
    {
        Cow::Borrowed(self.as_bytes())
    }
}

impl IntoBytes for &String {
    fn into_cow<'a>(self) -> Cow<'a, [u8]>
    where
        Self: 'a,
    {
        Cow::Borrowed(self.as_bytes())
    }
}

impl IntoBytes for &[u8] {
    fn into_cow<'a>(self) -> Cow<'a, [u8]>
    where
        Self: 'a,
    {
        Cow::Borrowed(self)
    }
}

impl IntoBytes for &Vec<u8> {
    fn into_cow<'a>(self) -> Cow<'a, [u8]>
    where
        Self: 'a,
    {
        Cow::Borrowed(self)
    }
}

impl<const N: usize> IntoBytes for [u8; N] {
    fn into_cow<'a>(self) -> Cow<'a, [u8]> {
        Cow::Owned(self.to_vec())
    }
}

impl<const N: usize> IntoBytes for &[u8; N] {
    fn into_cow<'a>(self) -> Cow<'a, [u8]>
    where
        Self: 'a,
    {
        Cow::Borrowed(self)
    }
}

impl IntoBytes for Cow<'_, str> {
    fn into_cow<'a>(self) -> Cow<'a, [u8]>
    where
        Self: 'a,
    {
        match self {
            Cow::Borrowed(text) => Cow::Borrowed(text.as_bytes()),
            Cow::Owned(text) => Cow::Owned(text.into_bytes()),
        }
    }
}

impl IntoBytes for Cow<'_, [u8]> {
    fn into_cow<'a>(self) -> Cow<'a, [u8]>
    where
        Self: 'a,
    {
        self
    }
}

/// Replaces the first header named `name` and drops later ones, or appends.
pub(crate) fn set_header<N, V>(headers: &mut Vec<(N, V)>, name: N, value: V)
where
    N: AsRef<str>,
{
    match headers
        .iter()
        .position(|(n, _)| n.as_ref() == name.as_ref())
    {
        Some(first) => {
            let mut i = 0;
            headers.retain(|(n, _)| {
                let keep = i <= first || n.as_ref() != name.as_ref();
                i += 1;
                keep
            });
            headers[first] = (name, value);
        }
        None => headers.push((name, value)),
    }
}

impl From<weir_format::Event> for OwnedEvent {
    fn from(e: weir_format::Event) -> Self {
        OwnedEvent {
            key: e.key,
            value: e.value,
            timestamp_ms: e.timestamp_ms,
            headers: e.headers,
            route: e.route,
        }
    }
}

impl From<OwnedEvent> for weir_format::Event {
    fn from(e: OwnedEvent) -> Self {
        weir_format::Event {
            key: e.key,
            value: e.value,
            timestamp_ms: e.timestamp_ms,
            headers: e.headers,
            route: e.route,
        }
    }
}
