//! even-key as a Fluvio SmartModule, for the Fluvio comparison bench (`benches/fluvio`): keeps a
//! record when the last byte of its key is an even ASCII digit, the check plugins/even-key makes
//! on weir's events.

use fluvio_smartmodule::{Result, SmartModuleRecord, smartmodule};

/// Keeps records whose key ends in 0, 2, 4, 6 or 8.
#[smartmodule(filter)]
pub fn keep(record: &SmartModuleRecord) -> Result<bool> {
    Ok(record
        .key()
        .is_some_and(|key| ends_even(key.as_ref())))
}

/// Whether `key` ends in an even ASCII digit.
fn ends_even(key: &[u8]) -> bool {
    key.last()
        .is_some_and(|last| last.is_ascii_digit() && last % 2 == 0)
}
