//! The [`Emitter`]: where an enrich function (and an aggregate's `finish`) puts its output.
//!
//! Three ways to emit, cheapest first:
//!
//! - [`Emitter::pass`]: the input event unchanged (copied straight from the input batch into the
//!   output batch, no intermediate allocation);
//! - [`Emitter::edit`]: the input event with a few fields changed (header, key, value, timestamp,
//!   route); unchanged fields are copied straight from the input;
//! - [`Emitter::emit`]: any [`OwnedEvent`].
//!
//! Every output event carries `source` = the index of the input event being processed (enrich)
//! or of the window being finished (aggregate), as `wit/weir.wit` requires; the SDK sets it, the
//! author never does.
//!
//! An [`Edit`] allocates nothing per event. A new key, value or route is borrowed (or moved,
//! when the author passes an owned buffer) until the event is written. Header changes are
//! applied in order to a copy of the input's headers that lives in buffers the emitter keeps
//! from event to event (and, in the component, from call to call), so those buffers stop
//! growing once they hold the largest event's headers.

use crate::event::{Event, IntoBytes, OwnedEvent};
use std::borrow::Cow;
use std::ops::Range;
use weir_format::{BatchBuilder, EventRef, Headers};

/// Collects the output events of one call.
pub struct Emitter {
    builder: BatchBuilder,
    source: u32,
    /// The headers of the event being edited, reused by every [`Edit`].
    headers: HeaderScratch,
}

impl Emitter {
    pub(crate) fn new() -> Self {
        Emitter {
            builder: BatchBuilder::new(),
            source: 0,
            headers: HeaderScratch::default(),
        }
    }

    /// Sets the index of the input event or window that the next emitted events come from.
    pub(crate) fn set_source(&mut self, source: u32) {
        self.source = source;
    }

    /// Finishes the output batch and resets the emitter for the next call.
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        self.source = 0;
        self.builder.finish()
    }

    /// Emits an owned event.
    pub fn emit(&mut self, event: OwnedEvent) {
        self.builder.push_parts(
            event.key.as_deref(),
            &event.value,
            event.timestamp_ms,
            event
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_slice())),
            event.route.as_deref(),
            self.source,
        );
    }

    /// Emits `event` unchanged.
    pub fn pass(&mut self, event: &Event<'_>) {
        self.builder.push_ref(event.inner(), self.source);
    }

    /// Starts a changed copy of `event`; nothing is emitted until [`Edit::emit`].
    pub fn edit<'o, 'e>(&'o mut self, event: &Event<'e>) -> Edit<'o, 'e> {
        Edit {
            out: self,
            event: *event.inner(),
            key: None,
            value: None,
            timestamp_ms: None,
            route: None,
            headers_changed: false,
        }
    }

    /// Events emitted so far in this call.
    pub fn len(&self) -> usize {
        self.builder.len()
    }

    /// Whether nothing was emitted yet in this call.
    pub fn is_empty(&self) -> bool {
        self.builder.is_empty()
    }
}

/// A copy of an input event with some fields changed, from [`Emitter::edit`]. Methods chain;
/// [`Edit::emit`] writes it out. The methods mean what they mean on [`OwnedEvent`].
///
/// `'e` is the input event's lifetime; a key, value or route given by reference must live as
/// long as the edit (until `.emit()`), and is not copied before the event is written. Header
/// names and values are copied at once.
#[must_use = "an edit emits nothing until `.emit()`"]
pub struct Edit<'o, 'e> {
    out: &'o mut Emitter,
    event: EventRef<'e>,
    key: Option<Option<Cow<'e, [u8]>>>,
    value: Option<Cow<'e, [u8]>>,
    timestamp_ms: Option<i64>,
    route: Option<Option<Cow<'e, str>>>,
    /// Whether `out.headers` holds this event's headers, changed: set by the first header
    /// method; until then the input's headers are copied straight from the input.
    headers_changed: bool,
}

impl<'e> Edit<'_, 'e> {
    /// Sets the key.
    pub fn with_key(mut self, key: impl IntoBytes + 'e) -> Self {
        self.key = Some(Some(key.into_cow()));
        self
    }

    /// Removes the key.
    pub fn without_key(mut self) -> Self {
        self.key = Some(None);
        self
    }

    /// Replaces the value.
    pub fn with_value(mut self, value: impl IntoBytes + 'e) -> Self {
        self.value = Some(value.into_cow());
        self
    }

    /// Sets the event time.
    pub fn with_timestamp_ms(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }

    /// Sets header `name`: replaces the first header of that name in place and removes any
    /// other of that name, or appends one when there is none.
    pub fn with_header(mut self, name: impl AsRef<str>, value: impl IntoBytes) -> Self {
        self.headers().set(name.as_ref(), &value.into_cow());
        self
    }

    /// Appends a header, even when one of that name exists.
    pub fn add_header(mut self, name: impl AsRef<str>, value: impl IntoBytes) -> Self {
        self.headers().push(name.as_ref(), &value.into_cow());
        self
    }

    /// Removes every header named `name`.
    pub fn without_header(mut self, name: impl AsRef<str>) -> Self {
        self.headers().remove(name.as_ref());
        self
    }

    /// Sets the route tag.
    pub fn with_route(mut self, route: impl Into<Cow<'e, str>>) -> Self {
        self.route = Some(Some(route.into()));
        self
    }

    /// Removes the route tag.
    pub fn without_route(mut self) -> Self {
        self.route = Some(None);
        self
    }

    /// The headers being edited, loaded from the input on first use.
    fn headers(&mut self) -> &mut HeaderScratch {
        if !self.headers_changed {
            self.out.headers.load(self.event.headers());
            self.headers_changed = true;
        }
        &mut self.out.headers
    }

    /// Emits the changed copy.
    pub fn emit(self) {
        let Edit {
            out,
            event,
            key,
            value,
            timestamp_ms,
            route,
            headers_changed,
        } = self;
        let key = match &key {
            Some(key) => key.as_deref(),
            None => event.key(),
        };
        let value = value.as_deref().unwrap_or(event.value());
        let timestamp_ms = timestamp_ms.unwrap_or(event.timestamp_ms());
        let route = match &route {
            Some(route) => route.as_deref(),
            None => event.route(),
        };
        let source = out.source;
        if headers_changed {
            let headers = out.headers.iter();
            out.builder
                .push_parts(key, value, timestamp_ms, headers, route, source);
        } else {
            out.builder
                .push_parts(key, value, timestamp_ms, event.headers(), route, source);
        }
    }
}

/// The headers of the event being edited, as ranges of two byte buffers. Cleared, not freed,
/// for each edit: after the first few events an edit allocates nothing.
#[derive(Default)]
struct HeaderScratch {
    /// Header names, one after another.
    names: String,
    /// Header values, one after another.
    values: Vec<u8>,
    /// The headers in order: (name range in `names`, value range in `values`).
    list: Vec<(Range<usize>, Range<usize>)>,
}

impl HeaderScratch {
    /// Replaces the contents with `headers`.
    fn load(&mut self, headers: Headers<'_>) {
        self.names.clear();
        self.values.clear();
        self.list.clear();
        for (name, value) in headers {
            self.push(name, value);
        }
    }

    /// Appends a header.
    fn push(&mut self, name: &str, value: &[u8]) {
        let start = self.names.len();
        self.names.push_str(name);
        let name = start..self.names.len();
        let value = self.store(value);
        self.list.push((name, value));
    }

    /// Replaces the first header named `name` and drops later ones, or appends.
    fn set(&mut self, name: &str, value: &[u8]) {
        let names = &self.names;
        let Some(first) = self
            .list
            .iter()
            .position(|(n, _)| names[n.clone()] == *name)
        else {
            return self.push(name, value);
        };
        let mut seen = false;
        self.list.retain(|(n, _)| {
            let other = names[n.clone()] != *name;
            let keep = other || !seen;
            seen |= !other;
            keep
        });
        self.list[first].1 = self.store(value);
    }

    /// Removes every header named `name`.
    fn remove(&mut self, name: &str) {
        let names = &self.names;
        self.list.retain(|(n, _)| names[n.clone()] != *name);
    }

    fn store(&mut self, value: &[u8]) -> Range<usize> {
        let start = self.values.len();
        self.values.extend_from_slice(value);
        start..self.values.len()
    }

    /// The headers in order, as `(name, value)`.
    fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.list
            .iter()
            .map(|(n, v)| (&self.names[n.clone()], &self.values[v.clone()]))
    }
}
