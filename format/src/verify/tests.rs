//! The walk against the crate's verifier: the same verdict on valid batches from two builders,
//! on every kind of malformed buffer, on every truncation and single-byte mutation, and at the
//! table-count and apparent-size limits, counted the same way.

use super::*;
use crate::{Batch, BatchBuilder, Event, FormatError, encode};
use flatbuffers::FlatBufferBuilder;

/// Runs both verifiers, asserts they agree and returns the crate verifier's verdict. Also checks
/// that `Batch::verify` agrees, and that a batch it accepts reads in full.
fn agree(buf: &[u8]) -> Result<(), InvalidFlatbuffer> {
    let generic = generic(buf);
    assert_eq!(fast(buf), generic.is_ok(), "{generic:?} on {buf:?}");
    if buf.get(4..8) == Some(b"WEIR") {
        match Batch::verify(buf) {
            Ok(batch) => {
                assert!(generic.is_ok());
                for event in batch.iter() {
                    let _ = (event.to_event(), event.source());
                }
            }
            Err(err) => assert_eq!(Err(err), generic.clone().map_err(FormatError::from)),
        }
    }
    generic
}

/// Asserts both verifiers reject `buf` and returns the crate's error.
fn rejected(buf: &[u8]) -> InvalidFlatbuffer {
    match agree(buf) {
        Ok(()) => panic!("accepted: {buf:?}"),
        Err(err) => err,
    }
}

fn sample() -> Vec<u8> {
    encode(&[
        Event::new(&b"{\"n\":1}"[..], 1_700_000_000_000)
            .with_key("user-1")
            .with_header("user-agent", "curl/8")
            .with_header("bin", vec![0xff, 0x00]),
        Event::new(Vec::new(), -5).with_route("eu"),
    ])
}

/// A batch Python's flatbuffers Builder wrote (`format/testdata/python_batch.py`).
const PYTHON_BATCH: &[u8] = include_bytes!("../../testdata/python_batch.bin");

fn u16_at(buf: &[u8], pos: usize) -> usize {
    usize::from(u16::from_le_bytes([buf[pos], buf[pos + 1]]))
}

fn u32_at(buf: &[u8], pos: usize) -> usize {
    u32::from_le_bytes([buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]]) as usize
}

fn put_u16(buf: &mut [u8], pos: usize, value: u16) {
    buf[pos..pos + 2].copy_from_slice(&value.to_le_bytes());
}

fn put_u32(buf: &mut [u8], pos: usize, value: u32) {
    buf[pos..pos + 4].copy_from_slice(&value.to_le_bytes());
}

/// The vtable of the table at `table`.
fn vtable_of(buf: &[u8], table: usize) -> usize {
    let soffset = i32::from_le_bytes([buf[table], buf[table + 1], buf[table + 2], buf[table + 3]]);
    (table as i64 - i64::from(soffset)) as usize
}

/// Where field `field` of the table at `table` is (it must be present).
fn field(buf: &[u8], table: usize, field: VOffsetT) -> usize {
    let offset = u16_at(buf, vtable_of(buf, table) + usize::from(field));
    assert_ne!(offset, 0, "field {field} absent");
    table + offset
}

/// Where the vector (or string) whose uoffset is at `pos` is: its length, then its elements.
fn target(buf: &[u8], pos: usize) -> usize {
    pos + u32_at(buf, pos)
}

/// Where the events vector of a valid batch is.
fn events_vector(buf: &[u8]) -> usize {
    let root = u32_at(buf, 0);
    target(buf, field(buf, root, fb::Batch::VT_EVENTS))
}

/// Where event `index` of a valid batch is.
fn event(buf: &[u8], index: usize) -> usize {
    target(buf, events_vector(buf) + 4 + 4 * index)
}

/// Where header `index` of event `event_index` of a valid batch is.
fn header(buf: &[u8], event_index: usize, index: usize) -> usize {
    let headers = target(
        buf,
        field(buf, event(buf, event_index), fb::Event::VT_HEADERS),
    );
    target(buf, headers + 4 + 4 * index)
}

#[test]
fn the_walk_checks_every_field_the_generated_verifier_checks() {
    // A change to wit/batch.fbs changes these lines; the walk must then change with them.
    let generated = include_str!("../generated/batch_generated.rs");
    let checked: Vec<&str> = generated
        .lines()
        .filter_map(|line| line.trim().strip_prefix(".visit_"))
        .collect();
    assert_eq!(
        checked,
        [
            r#"field::<::flatbuffers::ForwardsUOffset<&str>>("name", Self::VT_NAME, true)?"#,
            r#"field::<::flatbuffers::ForwardsUOffset<::flatbuffers::Vector<'_, u8>>>("value", Self::VT_VALUE, false)?"#,
            r#"field::<::flatbuffers::ForwardsUOffset<::flatbuffers::Vector<'_, u8>>>("key", Self::VT_KEY, false)?"#,
            r#"field::<::flatbuffers::ForwardsUOffset<::flatbuffers::Vector<'_, u8>>>("value", Self::VT_VALUE, false)?"#,
            r#"field::<i64>("timestamp_ms", Self::VT_TIMESTAMP_MS, false)?"#,
            r#"field::<::flatbuffers::ForwardsUOffset<::flatbuffers::Vector<'_, ::flatbuffers::ForwardsUOffset<Header>>>>("headers", Self::VT_HEADERS, false)?"#,
            r#"field::<::flatbuffers::ForwardsUOffset<&str>>("route", Self::VT_ROUTE, false)?"#,
            r#"field::<u32>("source", Self::VT_SOURCE, false)?"#,
            r#"field::<::flatbuffers::ForwardsUOffset<::flatbuffers::Vector<'_, ::flatbuffers::ForwardsUOffset<Event>>>>("events", Self::VT_EVENTS, false)?"#,
        ],
        "the generated verifier changed: update the walk in format/src/verify.rs"
    );
}

#[test]
fn batches_from_the_rust_builder_are_accepted() {
    let mut builder = BatchBuilder::new();
    builder.push_parts(Some(b"k"), b"v", 7, [("h", &b"1"[..])], Some("r\u{e9}"), 9);
    builder.push_parts(None, b"", 0, [], None, 0);
    for buf in [sample(), BatchBuilder::new().finish(), builder.finish()] {
        assert_eq!(agree(&buf), Ok(()));
    }
}

#[test]
fn a_batch_from_the_python_builder_is_accepted_and_reads_back() {
    // Its vtables come after the tables that use them, and its fields in other orders.
    let root = u32_at(PYTHON_BATCH, 0);
    assert!(vtable_of(PYTHON_BATCH, root) > root);
    assert_eq!(agree(PYTHON_BATCH), Ok(()));
    let batch = Batch::verify(PYTHON_BATCH).expect("valid");
    assert_eq!(
        batch.to_events(),
        [
            Event::new(&b"{\"n\":1}"[..], 1_700_000_000_000)
                .with_key("user-1")
                .with_header("user-agent", "curl/8")
                .with_header("bin", vec![0xff, 0x00]),
            Event::new(Vec::new(), -5).with_route("eu"),
            Event::new(&b"abc"[..], 7)
                .with_key("k")
                .with_header("h", Vec::new())
                .with_route("r\u{e9}"),
            Event::new(&b"abcd"[..], 8)
                .with_key("k2")
                .with_header("h2", "x"),
        ]
    );
    let sources: Vec<u32> = batch.iter().map(|e| e.source()).collect();
    assert_eq!(sources, [0, 3, 9, 0]);
}

#[test]
fn unknown_fields_and_short_vtables_are_accepted() {
    // A future writer's event: the known fields plus one at a slot this schema does not have,
    // so its vtable is longer than the schema's; and an event whose vtable has no slot at all.
    let mut fbb = FlatBufferBuilder::new();
    let value = fbb.create_vector(b"payload");
    let route = fbb.create_string("eu");
    let future = fbb.start_table();
    fbb.push_slot_always(fb::Event::VT_VALUE, value);
    fbb.push_slot::<i64>(fb::Event::VT_TIMESTAMP_MS, 42, 0);
    fbb.push_slot_always(fb::Event::VT_ROUTE, route);
    fbb.push_slot::<u64>(fb::Event::VT_SOURCE + 20, u64::MAX, 0);
    let future = fbb.end_table(future);
    let empty = fbb.start_table();
    let empty = fbb.end_table(empty);
    let events = fbb.create_vector(&[future, empty]);
    let batch = fbb.start_table();
    fbb.push_slot_always(fb::Batch::VT_EVENTS, events);
    let batch = fbb.end_table(batch);
    fbb.finish(batch, Some("WEIR"));
    let mut buf = fbb.finished_data().to_vec();
    assert_eq!(agree(&buf), Ok(()));
    let events = Batch::verify(&buf).expect("valid").to_events();
    assert_eq!(
        events,
        [
            Event::new(&b"payload"[..], 42).with_route("eu"),
            Event::default()
        ]
    );
    // A vtable of length 0 or 2 (shorter than its own header) has no field either.
    let vtable = vtable_of(&buf, event(&buf, 0));
    for len in [0, 2] {
        put_u16(&mut buf, vtable, len);
        assert_eq!(agree(&buf), Ok(()));
    }
}

#[test]
fn wrong_identifier_is_rejected_before_the_walk() {
    let mut buf = sample();
    buf[4..8].copy_from_slice(b"WEIX");
    assert_eq!(
        Batch::verify(&buf).map(|b| b.len()),
        Err(FormatError::MissingIdentifier { len: buf.len() })
    );
    // The identifier is weir's check, not the verifiers'.
    assert_eq!(agree(&buf), Ok(()));
}

#[test]
fn offsets_out_of_bounds_are_rejected() {
    // The root offset past the end.
    let mut buf = sample();
    put_u32(&mut buf, 0, u32::MAX - 3);
    assert!(matches!(
        rejected(&buf),
        InvalidFlatbuffer::RangeOutOfBounds { .. }
    ));
    // An event's offset past the end: the table would lie outside the buffer.
    let mut buf = sample();
    let element = events_vector(&buf) + 4;
    let past_end = (buf.len() - element) as u32;
    put_u32(&mut buf, element, past_end);
    assert!(matches!(
        rejected(&buf),
        InvalidFlatbuffer::RangeOutOfBounds { .. }
    ));
    // A table whose last bytes are past the end.
    let buf = sample();
    let cut = &buf[..event(&buf, 1) + 2];
    assert!(matches!(
        rejected(cut),
        InvalidFlatbuffer::RangeOutOfBounds { .. }
    ));
    // A key's offset pointing past the end.
    let mut buf = sample();
    let key = field(&buf, event(&buf, 0), fb::Event::VT_KEY);
    put_u32(&mut buf, key, 0x1000_0000);
    assert!(matches!(
        rejected(&buf),
        InvalidFlatbuffer::RangeOutOfBounds { .. }
    ));
}

#[test]
fn soffsets_out_of_bounds_are_rejected() {
    for soffset in [i32::MAX, i32::MIN, -0x1000] {
        let mut buf = sample();
        let table = event(&buf, 0);
        buf[table..table + 4].copy_from_slice(&soffset.to_le_bytes());
        assert!(matches!(
            rejected(&buf),
            InvalidFlatbuffer::SignedOffsetOutOfBounds { .. }
        ));
    }
}

#[test]
fn misaligned_tables_vtables_and_fields_are_rejected() {
    // An odd root offset: the batch table is not 4-aligned.
    let mut buf = sample();
    let root = u32_at(&buf, 0);
    put_u32(&mut buf, 0, root as u32 + 1);
    assert!(matches!(
        rejected(&buf),
        InvalidFlatbuffer::Unaligned { .. }
    ));
    // A vtable at an odd position.
    let mut buf = sample();
    let table = event(&buf, 0);
    let soffset = u32_at(&buf, table) as u32;
    put_u32(&mut buf, table, soffset.wrapping_add(1));
    assert!(matches!(
        rejected(&buf),
        InvalidFlatbuffer::Unaligned { .. }
    ));
    // The timestamp (an i64, 8-aligned) moved 4 bytes, onto the next field.
    let mut buf = sample();
    let table = event(&buf, 0);
    let slot = vtable_of(&buf, table) + usize::from(fb::Event::VT_TIMESTAMP_MS);
    let at = u16_at(&buf, slot);
    let moved = if (table + at).is_multiple_of(8) {
        at + 4
    } else {
        at - 4
    };
    put_u16(&mut buf, slot, moved as u16);
    assert!(matches!(
        rejected(&buf),
        InvalidFlatbuffer::Unaligned { .. }
    ));
    // A key vector whose length is not 4-aligned.
    let mut buf = sample();
    let key = field(&buf, event(&buf, 0), fb::Event::VT_KEY);
    let offset = u32_at(&buf, key) as u32;
    put_u32(&mut buf, key, offset + 2);
    assert!(matches!(
        rejected(&buf),
        InvalidFlatbuffer::Unaligned { .. }
    ));
}

#[test]
fn bad_vtable_lengths_are_rejected() {
    let buf = sample();
    let vtable = vtable_of(&buf, event(&buf, 0));
    // Odd: the crate reports the end of the vtable as unaligned.
    let mut odd = buf.clone();
    put_u16(&mut odd, vtable, 15);
    assert!(matches!(
        rejected(&odd),
        InvalidFlatbuffer::Unaligned { .. }
    ));
    // Longer than what is left of the buffer.
    let mut long = buf.clone();
    put_u16(&mut long, vtable, (buf.len() - vtable + 2) as u16);
    assert!(matches!(
        rejected(&long),
        InvalidFlatbuffer::RangeOutOfBounds { .. }
    ));
}

#[test]
fn vector_lengths_past_the_end_are_rejected() {
    // The events vector claims u32::MAX tables (4 bytes each, an overflow on 32 bits).
    let mut buf = sample();
    let events = events_vector(&buf);
    put_u32(&mut buf, events, u32::MAX);
    assert!(matches!(
        rejected(&buf),
        InvalidFlatbuffer::RangeOutOfBounds { .. }
    ));
    // One element more than there is room for, in a headers vector and a value.
    for (len, pos) in [
        (
            buf.len(),
            target(&buf, field(&buf, event(&buf, 0), fb::Event::VT_HEADERS)),
        ),
        (
            buf.len(),
            target(&buf, field(&buf, event(&buf, 0), fb::Event::VT_VALUE)),
        ),
    ] {
        let mut buf = sample();
        put_u32(&mut buf, pos, (len - pos) as u32);
        assert!(matches!(
            rejected(&buf),
            InvalidFlatbuffer::RangeOutOfBounds { .. }
        ));
    }
}

#[test]
fn bad_strings_are_rejected() {
    let buf = sample();
    let route = target(&buf, field(&buf, event(&buf, 1), fb::Event::VT_ROUTE));
    let name = target(&buf, field(&buf, header(&buf, 0, 0), fb::Header::VT_NAME));
    for string in [route, name] {
        let len = u32_at(&buf, string);
        // Not UTF-8: a lone continuation byte, then a truncated two-byte sequence.
        for bad in [0x80, 0xc3] {
            let mut bad_utf8 = buf.clone();
            bad_utf8[string + 4 + len - 1] = bad;
            assert!(matches!(
                rejected(&bad_utf8),
                InvalidFlatbuffer::Utf8Error { .. }
            ));
        }
        // Valid UTF-8 that is not ASCII is fine.
        let mut two_bytes = buf.clone();
        two_bytes[string + 4..string + 6].copy_from_slice("\u{e9}".as_bytes());
        assert_eq!(agree(&two_bytes), Ok(()));
        // No NUL after the last byte.
        let mut unterminated = buf.clone();
        unterminated[string + 4 + len] = b'x';
        assert!(matches!(
            rejected(&unterminated),
            InvalidFlatbuffer::MissingNullTerminator { .. }
        ));
    }
}

#[test]
fn a_header_without_its_required_name_is_rejected() {
    let buf = sample();
    let vtable = vtable_of(&buf, header(&buf, 0, 0));
    // The slot is 0, or the vtable is too short to hold it.
    let mut zero = buf.clone();
    put_u16(&mut zero, vtable + usize::from(fb::Header::VT_NAME), 0);
    let mut short = buf.clone();
    put_u16(&mut short, vtable, 4);
    for buf in [zero, short] {
        assert!(matches!(
            rejected(&buf),
            InvalidFlatbuffer::MissingRequiredField { .. }
        ));
    }
}

#[test]
fn every_truncation_gets_the_same_verdict() {
    for buf in [sample(), PYTHON_BATCH.to_vec()] {
        // Cutting only trailing padding may leave a valid batch; the verdicts must match.
        let accepted = (0..buf.len())
            .filter(|&cut| agree(&buf[..cut]).is_ok())
            .count();
        assert!(accepted < 8, "{accepted} prefixes accepted");
        assert_eq!(agree(&buf), Ok(()));
    }
}

#[test]
fn every_single_byte_mutation_gets_the_same_verdict() {
    for buf in [sample(), PYTHON_BATCH.to_vec()] {
        let mut accepted = 0;
        for pos in 0..buf.len() {
            let mut mutated = buf.clone();
            for byte in 0..=u8::MAX {
                mutated[pos] = byte;
                accepted += usize::from(agree(&mutated).is_ok());
            }
        }
        // Payload bytes, padding and many offsets may change: both sides must see some of each.
        assert!(accepted > buf.len() && accepted < buf.len() * 256);
    }
}

/// A batch of `shared` copies of one event holding `headers` copies of one header, then
/// `plain` copies of an event without headers: every copy is visited, so the tables and bytes
/// the verifiers count grow with `shared * headers` while the buffer grows with their sum.
/// The header's vtable is `vtable_len` bytes long (padded with unknown fields); `key` sets the
/// length of the plain events' key.
fn dag(shared: usize, headers: usize, plain: usize, vtable_len: u16, key: usize) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let name = fbb.create_string("h");
    let header = fbb.start_table();
    fbb.push_slot_always(fb::Header::VT_NAME, name);
    if vtable_len > 6 {
        fbb.push_slot::<u8>(vtable_len - 2, 1, 0);
    }
    let header = fbb.end_table(header);
    let headers = fbb.create_vector(&vec![header; headers]);
    let shared_event = fbb.start_table();
    fbb.push_slot_always(fb::Event::VT_HEADERS, headers);
    let shared_event = fbb.end_table(shared_event);
    let key = fbb.create_vector(&vec![b'k'; key]);
    let plain_event = fbb.start_table();
    fbb.push_slot_always(fb::Event::VT_KEY, key);
    let plain_event = fbb.end_table(plain_event);
    let mut events = vec![shared_event; shared];
    events.extend(std::iter::repeat_n(plain_event, plain));
    let events = fbb.create_vector(&events);
    let batch = fbb.start_table();
    fbb.push_slot_always(fb::Batch::VT_EVENTS, events);
    let batch = fbb.end_table(batch);
    fbb.finish(batch, Some("WEIR"));
    fbb.finished_data().to_vec()
}

/// Asserts both verifiers stop at the same counts on `buf`, a valid batch: with the limits set
/// to what the walk counted, the crate's verifier accepts it; with one table or one byte less,
/// both reject it, the crate with the matching error.
fn counted_the_same(buf: &[u8]) {
    let counts = walk(buf, Limits::WEIR).expect("valid");
    let exact = Limits {
        max_tables: counts.tables,
        max_apparent_size: counts.apparent_size,
    };
    assert_eq!(generic_with(buf, exact), Ok(()));
    let fewer_tables = Limits {
        max_tables: counts.tables - 1,
        ..exact
    };
    assert_eq!(
        generic_with(buf, fewer_tables),
        Err(InvalidFlatbuffer::TooManyTables)
    );
    assert_eq!(walk(buf, fewer_tables), None);
    let fewer_bytes = Limits {
        max_apparent_size: counts.apparent_size - 1,
        ..exact
    };
    assert_eq!(
        generic_with(buf, fewer_bytes),
        Err(InvalidFlatbuffer::ApparentSizeTooLarge)
    );
    assert_eq!(walk(buf, fewer_bytes), None);
}

#[test]
fn tables_and_bytes_are_counted_the_same() {
    counted_the_same(&sample());
    counted_the_same(PYTHON_BATCH);
    counted_the_same(&BatchBuilder::new().finish());
    counted_the_same(&dag(3, 5, 2, 6, 7));
    counted_the_same(&dag(2, 3, 1, 0x100, 0));
    let counts = walk(&dag(3, 5, 2, 6, 7), Limits::WEIR).expect("valid");
    assert_eq!(counts.tables, 1 + 3 * (1 + 5) + 2);
}

/// The largest `n` in `range` for which `accepts(n)` holds, `accepts` holding up to some point.
fn last_accepted(mut range: std::ops::Range<usize>, accepts: impl Fn(usize) -> bool) -> usize {
    assert!(accepts(range.start) && !accepts(range.end));
    while range.end - range.start > 1 {
        let mid = range.start + (range.end - range.start) / 2;
        if accepts(mid) {
            range.start = mid;
        } else {
            range.end = mid;
        }
    }
    range.start
}

#[test]
fn the_apparent_size_limit_is_the_same() {
    // Headers whose 64 KiB vtable is counted at each visit: about 2^15 visits reach 2^31 bytes.
    let coarse = |headers| generic(&dag(1, headers, 1, 0xfffe, 0)).is_ok();
    let headers = last_accepted(1..40_000, coarse);
    // Then the plain event's key, counted byte by byte, lands exactly on the limit.
    let fine = |key| generic(&dag(1, headers, 1, 0xfffe, key)).is_ok();
    let key = last_accepted(0..70_000, fine);
    assert_eq!(agree(&dag(1, headers, 1, 0xfffe, key)), Ok(()));
    assert_eq!(
        rejected(&dag(1, headers, 1, 0xfffe, key + 1)),
        InvalidFlatbuffer::ApparentSizeTooLarge
    );
}
