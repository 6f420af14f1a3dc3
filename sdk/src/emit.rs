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

use crate::event::{Event, IntoBytes, OwnedEvent, set_header};
use weir_format::{BatchBuilder, EventRef};

/// Collects the output events of one call.
pub struct Emitter {
    builder: BatchBuilder,
    source: u32,
}

impl Emitter {
    pub(crate) fn new(builder: BatchBuilder) -> Self {
        Emitter { builder, source: 0 }
    }

    /// Sets the index of the input event or window that the next emitted events come from.
    pub(crate) fn set_source(&mut self, source: u32) {
        self.source = source;
    }

    /// Finishes the output batch and hands back the builder for reuse.
    pub(crate) fn finish(mut self) -> (Vec<u8>, BatchBuilder) {
        let bytes = self.builder.finish();
        (bytes, self.builder)
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
            headers: Vec::new(),
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

/// A change to one header, applied in order by [`Edit::emit`].
enum HeaderChange {
    Set(String, Vec<u8>),
    Add(String, Vec<u8>),
    Remove(String),
}

/// A copy of an input event with some fields changed, from [`Emitter::edit`]. Methods chain;
/// [`Edit::emit`] writes it out. The methods mean what they mean on [`OwnedEvent`].
#[must_use = "an edit emits nothing until `.emit()`"]
pub struct Edit<'o, 'e> {
    out: &'o mut Emitter,
    event: EventRef<'e>,
    key: Option<Option<Vec<u8>>>,
    value: Option<Vec<u8>>,
    timestamp_ms: Option<i64>,
    route: Option<Option<String>>,
    headers: Vec<HeaderChange>,
}

impl Edit<'_, '_> {
    /// Sets the key.
    pub fn with_key(mut self, key: impl IntoBytes) -> Self {
        self.key = Some(Some(key.into_bytes()));
        self
    }

    /// Removes the key.
    pub fn without_key(mut self) -> Self {
        self.key = Some(None);
        self
    }

    /// Replaces the value.
    pub fn with_value(mut self, value: impl IntoBytes) -> Self {
        self.value = Some(value.into_bytes());
        self
    }

    /// Sets the event time.
    pub fn with_timestamp_ms(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }

    /// Sets header `name`: replaces the first header of that name in place and removes any
    /// other of that name, or appends one when there is none.
    pub fn with_header(mut self, name: impl Into<String>, value: impl IntoBytes) -> Self {
        self.headers
            .push(HeaderChange::Set(name.into(), value.into_bytes()));
        self
    }

    /// Appends a header, even when one of that name exists.
    pub fn add_header(mut self, name: impl Into<String>, value: impl IntoBytes) -> Self {
        self.headers
            .push(HeaderChange::Add(name.into(), value.into_bytes()));
        self
    }

    /// Removes every header named `name`.
    pub fn without_header(mut self, name: impl AsRef<str>) -> Self {
        self.headers
            .push(HeaderChange::Remove(name.as_ref().to_owned()));
        self
    }

    /// Sets the route tag.
    pub fn with_route(mut self, route: impl Into<String>) -> Self {
        self.route = Some(Some(route.into()));
        self
    }

    /// Removes the route tag.
    pub fn without_route(mut self) -> Self {
        self.route = Some(None);
        self
    }

    /// Emits the changed copy.
    pub fn emit(self) {
        let event = self.event;
        let key = match &self.key {
            Some(key) => key.as_deref(),
            None => event.key(),
        };
        let value = self.value.as_deref().unwrap_or(event.value());
        let timestamp_ms = self.timestamp_ms.unwrap_or(event.timestamp_ms());
        let route = match &self.route {
            Some(route) => route.as_deref(),
            None => event.route(),
        };
        let source = self.out.source;
        if self.headers.is_empty() {
            self.out
                .builder
                .push_parts(key, value, timestamp_ms, event.headers(), route, source);
            return;
        }
        let mut headers: Vec<(&str, &[u8])> = event.headers().collect();
        for change in &self.headers {
            match change {
                HeaderChange::Set(n, v) => set_header(&mut headers, n.as_str(), v.as_slice()),
                HeaderChange::Add(n, v) => headers.push((n.as_str(), v.as_slice())),
                HeaderChange::Remove(name) => headers.retain(|(n, _)| n != name),
            }
        }
        self.out
            .builder
            .push_parts(key, value, timestamp_ms, headers, route, source);
    }
}
