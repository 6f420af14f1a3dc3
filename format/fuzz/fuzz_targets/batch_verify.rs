//! Differential fuzzing of batch verification.
//!
//! Input: the buffer. Checked: the walk specialised for the batch schema
//! (`weir_format::verify::fast`) accepts exactly the buffers the flatbuffers crate's generic
//! verifier accepts with weir's options (`verify::generic`); on a buffer both accept, they count
//! the same tables and bytes against their limits (with the limits set to the walk's counts the
//! crate accepts, with one less it rejects); `Batch::verify` accepts exactly the buffers that
//! also carry the `WEIR` identifier; and every field of a batch it accepts reads through the
//! accessors without a panic.

#![no_main]

use flatbuffers::InvalidFlatbuffer;
use libfuzzer_sys::fuzz_target;
use weir_format::verify::{self, Limits};
use weir_format::{Batch, FILE_IDENTIFIER};

fuzz_target!(|data: &[u8]| {
    let fast = verify::fast(data);
    let generic = verify::generic(data);
    assert_eq!(
        fast,
        generic.is_ok(),
        "the walk and the crate's verifier disagree: {generic:?}"
    );
    if let Some(counts) = verify::walk(data, Limits::WEIR) {
        let exact = Limits {
            max_tables: counts.tables,
            max_apparent_size: counts.apparent_size,
        };
        assert_eq!(verify::generic_with(data, exact), Ok(()));
        let fewer_tables = Limits {
            max_tables: counts.tables - 1,
            ..exact
        };
        assert_eq!(
            verify::generic_with(data, fewer_tables),
            Err(InvalidFlatbuffer::TooManyTables)
        );
        let fewer_bytes = Limits {
            max_apparent_size: counts.apparent_size - 1,
            ..exact
        };
        assert_eq!(
            verify::generic_with(data, fewer_bytes),
            Err(InvalidFlatbuffer::ApparentSizeTooLarge)
        );
    }
    let identified = data.get(4..8) == Some(FILE_IDENTIFIER.as_bytes());
    let Ok(batch) = Batch::verify(data) else {
        assert!(
            !(identified && fast),
            "Batch::verify rejects a buffer both verifiers accept"
        );
        return;
    };
    assert!(
        identified && fast,
        "Batch::verify accepts a buffer the verifiers reject"
    );
    for event in batch.iter() {
        let read = event.to_event();
        assert_eq!(read.headers.len(), event.headers().len());
        let _ = event.source();
    }
});
