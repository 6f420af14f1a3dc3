//! Writing a batch.

use crate::generated::weir::batch as fb;
use crate::{Event, EventRef, FILE_IDENTIFIER};
use flatbuffers::{FlatBufferBuilder, WIPOffset};

/// Builds one batch buffer event by event. Reusable: [`BatchBuilder::finish`] resets it.
pub struct BatchBuilder {
    fbb: FlatBufferBuilder<'static>,
    events: Vec<WIPOffset<fb::Event<'static>>>,
    headers: Vec<WIPOffset<fb::Header<'static>>>,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::with_capacity(1024)
    }

    /// An empty builder whose buffer starts with room for `bytes`.
    pub fn with_capacity(bytes: usize) -> Self {
        BatchBuilder {
            fbb: FlatBufferBuilder::with_capacity(bytes),
            events: Vec::new(),
            headers: Vec::new(),
        }
    }

    /// Events pushed since the last `finish`.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether no event was pushed since the last `finish`.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Appends an owned event.
    pub fn push(&mut self, event: &Event) {
        self.push_parts(
            event.key.as_deref(),
            &event.value,
            event.timestamp_ms,
            event.header_pairs(),
            event.route.as_deref(),
            0,
        );
    }

    /// Appends a copy of an event read from another batch, with `source` set.
    pub fn push_ref(&mut self, event: &EventRef<'_>, source: u32) {
        self.push_parts(
            event.key(),
            event.value(),
            event.timestamp_ms(),
            event.headers(),
            event.route(),
            source,
        );
    }

    /// Appends an event given field by field.
    pub fn push_parts<'h>(
        &mut self,
        key: Option<&[u8]>,
        value: &[u8],
        timestamp_ms: i64,
        headers: impl IntoIterator<Item = (&'h str, &'h [u8])>,
        route: Option<&str>,
        source: u32,
    ) {
        self.headers.clear();
        for (name, value) in headers {
            let name = self.fbb.create_string(name);
            let value = self.fbb.create_vector(value);
            let header = fb::Header::create(
                &mut self.fbb,
                &fb::HeaderArgs {
                    name: Some(name),
                    value: Some(value),
                },
            );
            self.headers.push(header);
        }
        let headers = (!self.headers.is_empty()).then(|| self.fbb.create_vector(&self.headers));
        let key = key.map(|k| self.fbb.create_vector(k));
        let value = self.fbb.create_vector(value);
        let route = route.map(|r| self.fbb.create_string(r));
        let event = fb::Event::create(
            &mut self.fbb,
            &fb::EventArgs {
                key,
                value: Some(value),
                timestamp_ms,
                headers,
                route,
                source,
            },
        );
        self.events.push(event);
    }

    /// Finishes the batch, returns its bytes and resets the builder for the next batch.
    pub fn finish(&mut self) -> Vec<u8> {
        let events = self.fbb.create_vector(&self.events);
        let batch = fb::Batch::create(
            &mut self.fbb,
            &fb::BatchArgs {
                events: Some(events),
            },
        );
        self.fbb.finish(batch, Some(FILE_IDENTIFIER));
        let bytes = self.fbb.finished_data().to_vec();
        self.fbb.reset();
        self.events.clear();
        bytes
    }
}
