//! alloc-unbounded: a misbehaving filter for tests. On an event whose value contains the bytes
//! `poison` it allocates 1 MiB chunks without end, writing to every page so that the memory is
//! really used, until the host's memory cap makes an allocation fail (a trap). It keeps every
//! other event.

use weir_sdk::Event;

/// Keeps the event, or hoards memory on a marked one.
#[weir_sdk::filter]
pub fn keep(e: &Event) -> bool {
    if e.value().windows(6).any(|w| w == b"poison") {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut chunk = vec![0u8; 1 << 20];
            chunk.iter_mut().step_by(4096).for_each(|byte| *byte = 1);
            hoard.push(std::hint::black_box(chunk));
        }
    }
    true
}
