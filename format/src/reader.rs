//! Zero-copy reading of a batch.

use crate::generated::weir::batch as fb;
use crate::{Event, FormatError, verify};
use flatbuffers::{ForwardsUOffset, Vector};

/// A read-only view of a batch buffer.
#[derive(Clone, Copy)]
pub struct Batch<'a> {
    buf: &'a [u8],
    events: Option<Vector<'a, ForwardsUOffset<fb::Event<'a>>>>,
}

impl<'a> Batch<'a> {
    /// Verifies `buf` (identifier, offsets, required fields) and returns a view of it.
    ///
    /// Accepts exactly the buffers the flatbuffers crate's verifier accepts (with weir's limits
    /// on tables and size), checked by a walk specialised for the batch schema; a rejected
    /// buffer's error is the crate verifier's, which names the field and position.
    pub fn verify(buf: &'a [u8]) -> Result<Self, FormatError> {
        // The root offset and the identifier come first; flatbuffers asserts on a shorter buffer.
        let header_len = flatbuffers::SIZE_UOFFSET + flatbuffers::FILE_IDENTIFIER_LENGTH;
        if buf.len() < header_len || !fb::batch_buffer_has_identifier(buf) {
            return Err(FormatError::MissingIdentifier { len: buf.len() });
        }
        if !verify::fast(buf) {
            // The walk accepts only buffers the generic verifier accepts; this either finds the
            // error or accepts a layout the walk does not (none is known).
            verify::generic(buf)?;
        }
        // SAFETY: the flatbuffers verifier accepts `buf` (the walk accepts no buffer it would
        // reject), which is what `trusted` needs: every offset the accessors follow is checked.
        Ok(unsafe { Batch::trusted(buf) })
    }

    /// A view of a buffer that was verified before, without checking it again.
    ///
    /// # Safety
    ///
    /// `buf` must be a buffer that [`Batch::verify`] accepted (or that [`crate::BatchBuilder`]
    /// produced). The plugin SDK uses this for the buffers the host hands a guest: the host
    /// built or verified every one of them.
    pub unsafe fn trusted(buf: &'a [u8]) -> Self {
        // SAFETY: the caller guarantees `buf` is a verified batch.
        let root = unsafe { fb::root_as_batch_unchecked(buf) };
        Batch {
            buf,
            events: root.events(),
        }
    }

    /// The buffer the view reads: verified bytes, to hand on without verifying them again.
    pub fn bytes(&self) -> &'a [u8] {
        self.buf
    }

    /// Number of events.
    #[inline]
    pub fn len(&self) -> usize {
        self.events.map_or(0, |v| v.len())
    }

    /// Whether the batch has no event.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The event at `index`, if there is one.
    #[inline]
    pub fn get(&self, index: usize) -> Option<EventRef<'a>> {
        let events = self.events?;
        (index < events.len()).then(|| EventRef(events.get(index)))
    }

    /// The events in order.
    #[inline]
    pub fn iter(&self) -> Events<'a> {
        Events {
            events: self.events,
            next: 0,
        }
    }

    /// Copies every event out of the buffer.
    pub fn to_events(&self) -> Vec<Event> {
        self.iter().map(|e| e.to_event()).collect()
    }
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Iterator over a batch's events.
#[derive(Clone)]
pub struct Events<'a> {
    events: Option<Vector<'a, ForwardsUOffset<fb::Event<'a>>>>,
    next: usize,
}

impl<'a> Iterator for Events<'a> {
    type Item = EventRef<'a>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let events = self.events?;
        if self.next >= events.len() {
            return None;
        }
        let event = events.get(self.next);
        self.next += 1;
        Some(EventRef(event))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.events.map_or(0, |v| v.len()) - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Events<'_> {}

/// A read-only view of one event inside a batch buffer.
#[derive(Clone, Copy)]
pub struct EventRef<'a>(fb::Event<'a>);

impl<'a> EventRef<'a> {
    /// The key, if the producer set one.
    #[inline]
    pub fn key(&self) -> Option<&'a [u8]> {
        self.0.key().map(|v| v.bytes())
    }

    /// The payload (empty when absent).
    #[inline]
    pub fn value(&self) -> &'a [u8] {
        self.0.value().map_or(&[], |v| v.bytes())
    }

    /// Event time in milliseconds since the Unix epoch.
    #[inline]
    pub fn timestamp_ms(&self) -> i64 {
        self.0.timestamp_ms()
    }

    /// The route tag, if a plugin set one.
    #[inline]
    pub fn route(&self) -> Option<&'a str> {
        self.0.route()
    }

    /// In a plugin's output: the index of the input event or window this event came from.
    #[inline]
    pub fn source(&self) -> u32 {
        self.0.source()
    }

    /// The headers in order.
    #[inline]
    pub fn headers(&self) -> Headers<'a> {
        Headers {
            headers: self.0.headers(),
            next: 0,
        }
    }

    /// The value of the first header with this name.
    #[inline]
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Copies the event out of the buffer.
    pub fn to_event(&self) -> Event {
        Event {
            key: self.key().map(<[u8]>::to_vec),
            value: self.value().to_vec(),
            timestamp_ms: self.timestamp_ms(),
            headers: self
                .headers()
                .map(|(n, v)| (n.to_owned(), v.to_vec()))
                .collect(),
            route: self.route().map(str::to_owned),
        }
    }
}

impl std::fmt::Debug for EventRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.to_event().fmt(f)
    }
}

/// Iterator over an event's headers as (name, value).
#[derive(Clone)]
pub struct Headers<'a> {
    headers: Option<Vector<'a, ForwardsUOffset<fb::Header<'a>>>>,
    next: usize,
}

impl<'a> Iterator for Headers<'a> {
    type Item = (&'a str, &'a [u8]);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let headers = self.headers?;
        if self.next >= headers.len() {
            return None;
        }
        let h = headers.get(self.next);
        self.next += 1;
        Some((h.name(), h.value().map_or(&[], |v| v.bytes())))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.headers.map_or(0, |h| h.len()) - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Headers<'_> {}
