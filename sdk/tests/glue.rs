//! The code `#[weir_sdk::filter]` generates, compiled and called natively: the `__weir_*`
//! functions take a `Batch`, so native callers go through `Batch::verify` and junk is an error,
//! never an unchecked read.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use weir_sdk::__private::Batch;
use weir_sdk::{Event, OwnedEvent, testing};

/// Keeps events with an even timestamp.
#[weir_sdk::filter]
fn keep(e: &Event) -> bool {
    e.timestamp_ms() % 2 == 0
}

#[test]
fn generated_functions_run_on_verified_batches() {
    __weir_init(vec![]).unwrap();
    let events: Vec<OwnedEvent> = (0..10).map(|t| OwnedEvent::new("{}", t)).collect();
    let buf = testing::batch(&events);
    let bits = __weir_filter(Batch::verify(&buf).unwrap()).unwrap();
    assert_eq!(bits, [0b0101_0101, 0b01]);
    // The entry `weir bench CRATE_DIR` calls: the events kept.
    assert_eq!(__weir_native::call(&buf), Ok(5));
    assert!(__weir_native::call(b"junk").is_err());

    // Junk does not become a `Batch` natively: it is an error before the plugin runs.
    for junk in [&b""[..], b"junk", &[0xff; 64], &buf[..buf.len() / 2]] {
        assert!(Batch::verify(junk).is_err(), "{junk:?}");
    }
}
