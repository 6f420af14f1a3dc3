//! Verification of a batch buffer: a walk specialised for `wit/batch.fbs`, and the flatbuffers
//! crate's generic verifier, which names the error when the walk rejects a buffer.
//!
//! The walk makes the checks the crate's verifier (25.12.19) makes for this schema with weir's
//! options, in one pass over the buffer: the root uoffset; each table's soffset (4-aligned, in
//! the buffer) and vtable (2-aligned, an even length, in the buffer; any length, so that a
//! future writer's longer vtable and a vtable too short to hold a field both read as the crate
//! reads them); each present field at its type's alignment relative to the start of the buffer
//! and in the buffer; each vector's uoffset and length, its elements in the buffer; strings'
//! UTF-8 and NUL terminator; the header's required `name`; and the crate's limits on tables
//! visited and bytes checked ("apparent size"), counted as the crate counts them (a shared
//! table, vector or vtable counts at every visit). Depth needs no count: the schema nests three
//! tables, under the limit. Like the crate, it does not check the table size in the vtable, nor
//! that tables or vectors do not overlap.
//!
//! It is faster because it returns a one-word `Option` from each check where the crate returns
//! a large `Result` (and appends an error trace to it at each field and vector element), it
//! checks an event's or header's vtable once when the next one shares it, and the compiler
//! inlines the whole walk.
//!
//! Its contract: **every buffer the walk accepts, the crate's verifier accepts** (so it is safe
//! to read through the generated accessors); the tests and the `batch_verify` fuzz target also
//! check the converse. [`crate::Batch::verify`] runs the crate's verifier when the walk
//! rejects, for its error, so that `Batch::verify` accepts exactly what the crate accepts and
//! reports the crate's errors.

use crate::generated::weir::batch as fb;
use flatbuffers::{InvalidFlatbuffer, VOffsetT, VerifierOptions};

/// Most tables the verifier visits. A batch is bounded by its frame size upstream; this and
/// [`MAX_APPARENT_SIZE`] bound the work the verifier does on a hostile buffer of that size
/// (offsets may share a table, so a small buffer can describe a huge tree).
const MAX_TABLES: usize = 1 << 24;
/// Batch → events → event → headers → header is three nested tables; leave room for schema
/// growth.
const MAX_DEPTH: usize = 16;
/// The crate's default: most bytes the verifier checks, counting shared parts at every visit.
const MAX_APPARENT_SIZE: usize = 1 << 31;

/// The walk never counts depth: that only holds while the schema nests tables at most this
/// deep (batch, event, header).
const SCHEMA_DEPTH: usize = 3;
const _: () = assert!(SCHEMA_DEPTH <= MAX_DEPTH);

/// The limits both verifiers apply on the work a buffer makes them do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most tables visited (a table reached twice counts twice).
    pub max_tables: usize,
    /// Most bytes checked (bytes checked twice count twice), as the crate counts them.
    pub max_apparent_size: usize,
}

impl Limits {
    /// The limits [`crate::Batch::verify`] applies.
    pub const WEIR: Limits = Limits {
        max_tables: MAX_TABLES,
        max_apparent_size: MAX_APPARENT_SIZE,
    };
}

/// What the walk counted on a buffer it accepted: the two quantities [`Limits`] bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Tables visited.
    pub tables: usize,
    /// Bytes checked.
    pub apparent_size: usize,
}

/// Runs the crate's generic verifier on `buf` as a batch with weir's options
/// ([`Limits::WEIR`]), the file identifier aside.
pub fn generic(buf: &[u8]) -> Result<(), InvalidFlatbuffer> {
    generic_with(buf, Limits::WEIR)
}

/// Runs the crate's generic verifier on `buf` as a batch with weir's options but `limits`.
pub fn generic_with(buf: &[u8], limits: Limits) -> Result<(), InvalidFlatbuffer> {
    let options = VerifierOptions {
        max_depth: MAX_DEPTH,
        max_tables: limits.max_tables,
        max_apparent_size: limits.max_apparent_size,
        ignore_missing_null_terminator: false,
    };
    fb::root_as_batch_with_opts(&options, buf).map(|_| ())
}

/// Whether the walk specialised for the batch schema accepts `buf` ([`Limits::WEIR`]), the
/// file identifier aside.
pub fn fast(buf: &[u8]) -> bool {
    walk(buf, Limits::WEIR).is_some()
}

/// Runs the walk on `buf` with `limits`: what it counted if it accepts the buffer.
pub fn walk(buf: &[u8], limits: Limits) -> Option<Counts> {
    let mut walk = Walk {
        buf,
        limits,
        tables: 0,
        apparent: 0,
        event_vtable: None,
        header_vtable: None,
    };
    walk.batch()?;
    (walk.apparent <= limits.max_apparent_size).then_some(Counts {
        tables: walk.tables,
        apparent_size: walk.apparent,
    })
}

/// The walk's state: the counters the crate's verifier keeps for its limits.
///
/// Every check returns `None` on failure; the walk stops at the first.
struct Walk<'b> {
    buf: &'b [u8],
    limits: Limits,
    /// Tables visited (a table reached twice counts twice).
    tables: usize,
    /// Bytes checked, counted as the crate's verifier counts them: each `range_in_buffer` call
    /// adds its size. Checked against the limit at every table and at the end; it only grows,
    /// so that accepts the same buffers as checking after every addition.
    apparent: usize,
    /// The vtable of the last event checked: events usually share one.
    event_vtable: Option<Vtable<EVENT_FIELDS>>,
    /// The vtable of the last header checked.
    header_vtable: Option<Vtable<HEADER_FIELDS>>,
}

/// The index of a field in its table's vtable, from its vtable offset (a field's slot comes
/// after the vtable's own length and the table's, 2 bytes each).
const fn index(field: VOffsetT) -> usize {
    (field as usize - 4) / 2
}

/// The schema's fields, each table's last: the index of each must match its order in the
/// schema and the walk below checks every field up to it.
const BATCH_FIELDS: usize = index(fb::Batch::VT_EVENTS) + 1;
const EVENT_FIELDS: usize = index(fb::Event::VT_SOURCE) + 1;
const HEADER_FIELDS: usize = index(fb::Header::VT_VALUE) + 1;

/// A vtable the walk checked: where it is, its length, and the slots of the `N` fields the
/// schema knows (0 where the vtable is too short to hold one or the field is absent).
#[derive(Clone, Copy)]
struct Vtable<const N: usize> {
    pos: usize,
    len: usize,
    slots: [u16; N],
}

impl<const N: usize> Vtable<N> {
    /// The offset from its table of the field whose vtable offset is `field`, if present.
    #[inline(always)]
    fn field(&self, field: VOffsetT) -> Option<usize> {
        match self.slots[index(field)] {
            0 => None,
            offset => Some(usize::from(offset)),
        }
    }
}

impl<'b> Walk<'b> {
    /// The `N` bytes of a `T` at `pos`, which must be a multiple of `T`'s alignment (relative
    /// to the start of the buffer, as the crate's verifier checks it).
    #[inline(always)]
    fn scalar<T, const N: usize>(&self, pos: usize) -> Option<[u8; N]> {
        const { assert!(size_of::<T>() == N) };
        if !pos.is_multiple_of(align_of::<T>()) {
            return None;
        }
        self.buf.get(pos..)?.first_chunk::<N>().copied()
    }

    /// Adds `bytes` to the apparent size.
    #[inline(always)]
    fn count(&mut self, bytes: usize) {
        self.apparent += bytes;
    }

    /// Follows the `uoffset` at `pos` (`ForwardsUOffset`): the position it points to.
    #[inline(always)]
    fn follow(&mut self, pos: usize) -> Option<usize> {
        let offset = u32::from_le_bytes(self.scalar::<u32, 4>(pos)?);
        self.count(4);
        pos.checked_add(usize::try_from(offset).ok()?)
    }

    /// The table at `pos`: checks its soffset, its vtable (unless it is `last`, checked
    /// before in this buffer) and the limits, and returns its vtable.
    #[inline(always)]
    fn table<const N: usize>(&mut self, pos: usize, last: Option<Vtable<N>>) -> Option<Vtable<N>> {
        let soffset = i32::from_le_bytes(self.scalar::<i32, 4>(pos)?);
        // A positive soffset points backwards, a negative one forwards.
        let distance = usize::try_from(soffset.unsigned_abs()).ok()?;
        let at = if soffset > 0 {
            pos.checked_sub(distance)?
        } else {
            pos.checked_add(distance)?
        };
        let vtable = match last {
            Some(last) if last.pos == at => last,
            _ => self.vtable(at)?,
        };
        // The crate counts the soffset, the vtable's length field, the vtable, and 2 bytes for
        // each of the schema's slots the vtable holds (it reads each field's).
        let slots_read = (vtable.len.saturating_sub(4) / 2).min(N);
        self.count(4 + 2 + vtable.len + 2 * slots_read);
        self.tables += 1;
        let limits = &self.limits;
        (self.tables <= limits.max_tables && self.apparent <= limits.max_apparent_size)
            .then_some(vtable)
    }

    /// Checks the vtable at `pos` (aligned, an even length, in the buffer) and reads the slots
    /// of the schema's `N` fields.
    #[inline(always)]
    fn vtable<const N: usize>(&self, pos: usize) -> Option<Vtable<N>> {
        let len = usize::from(u16::from_le_bytes(self.scalar::<u16, 2>(pos)?));
        if !len.is_multiple_of(2) {
            return None;
        }
        // `pos` is in the buffer (2 bytes were read there), so this cannot overflow.
        let bytes = self.buf.get(pos..pos + len)?;
        let mut slots = [0; N];
        for (i, slot) in slots.iter_mut().enumerate() {
            if let Some(field) = bytes.get(4 + 2 * i..).and_then(<[u8]>::first_chunk::<2>) {
                *slot = u16::from_le_bytes(*field);
            }
        }
        Some(Vtable { pos, len, slots })
    }

    /// The vector whose uoffset is at `pos`, of elements of `size` bytes: the range of its
    /// elements.
    #[inline(always)]
    fn vector(&mut self, pos: usize, size: usize) -> Option<(usize, usize)> {
        let at = self.follow(pos)?;
        let len = u32::from_le_bytes(self.scalar::<u32, 4>(at)?);
        let start = at + 4;
        let bytes = usize::try_from(len).ok()?.checked_mul(size)?;
        let end = start.checked_add(bytes)?;
        if end > self.buf.len() {
            return None;
        }
        self.count(4 + bytes);
        Some((start, end))
    }

    /// A `[ubyte]` field whose uoffset is at `pos`.
    #[inline(always)]
    fn bytes(&mut self, pos: usize) -> Option<()> {
        self.vector(pos, 1).map(|_| ())
    }

    /// A `string` field whose uoffset is at `pos`: in bounds, UTF-8, NUL-terminated.
    #[inline(always)]
    fn string(&mut self, pos: usize) -> Option<()> {
        let (start, end) = self.vector(pos, 1)?;
        if self.buf.get(end) != Some(&0) {
            return None;
        }
        let text = self.buf.get(start..end)?;
        (text.is_ascii() || std::str::from_utf8(text).is_ok()).then_some(())
    }

    /// A scalar field, a `T` of `N` bytes, at `pos`.
    #[inline(always)]
    fn scalar_field<T, const N: usize>(&mut self, pos: usize) -> Option<()> {
        self.scalar::<T, N>(pos)?;
        self.count(N);
        Some(())
    }

    /// A vector of tables whose uoffset is at `pos`, each checked by `table`.
    #[inline(always)]
    fn table_vector(
        &mut self,
        pos: usize,
        table: impl Fn(&mut Self, usize) -> Option<()>,
    ) -> Option<()> {
        let (start, end) = self.vector(pos, 4)?;
        for element in (start..end).step_by(4) {
            let at = self.follow(element)?;
            table(self, at)?;
        }
        Some(())
    }

    /// The root: the batch table the buffer's first uoffset points to.
    fn batch(&mut self) -> Option<()> {
        let pos = self.follow(0)?;
        let vtable = self.table::<BATCH_FIELDS>(pos, None)?;
        if let Some(field) = vtable.field(fb::Batch::VT_EVENTS) {
            self.table_vector(pos + field, Self::event)?;
        }
        Some(())
    }

    /// An event table at `pos`.
    #[inline(always)]
    fn event(&mut self, pos: usize) -> Option<()> {
        let vtable = self.table(pos, self.event_vtable)?;
        self.event_vtable = Some(vtable);
        if let Some(field) = vtable.field(fb::Event::VT_KEY) {
            self.bytes(pos + field)?;
        }
        if let Some(field) = vtable.field(fb::Event::VT_VALUE) {
            self.bytes(pos + field)?;
        }
        if let Some(field) = vtable.field(fb::Event::VT_TIMESTAMP_MS) {
            self.scalar_field::<i64, 8>(pos + field)?;
        }
        if let Some(field) = vtable.field(fb::Event::VT_HEADERS) {
            self.table_vector(pos + field, Self::header)?;
        }
        if let Some(field) = vtable.field(fb::Event::VT_ROUTE) {
            self.string(pos + field)?;
        }
        if let Some(field) = vtable.field(fb::Event::VT_SOURCE) {
            self.scalar_field::<u32, 4>(pos + field)?;
        }
        Some(())
    }

    /// A header table at `pos`; its name is required.
    #[inline(always)]
    fn header(&mut self, pos: usize) -> Option<()> {
        let vtable = self.table(pos, self.header_vtable)?;
        self.header_vtable = Some(vtable);
        self.string(pos + vtable.field(fb::Header::VT_NAME)?)?;
        if let Some(field) = vtable.field(fb::Header::VT_VALUE) {
            self.bytes(pos + field)?;
        }
        Some(())
    }
}

#[cfg(test)]
mod tests;
