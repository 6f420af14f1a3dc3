//! An `Edit` that sets a header and a route allocates nothing per event once the emitter's
//! buffers have grown (the enrich hot path). Counted with a counting global allocator, on this
//! test's thread only.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use weir_sdk::{OwnedEvent, testing};

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|n| n.set(n.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|n| n.set(n.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn allocs() -> usize {
    ALLOCS.with(Cell::get)
}

#[test]
fn an_edit_allocates_nothing_per_event() {
    let country = String::from("country");
    let events: Vec<OwnedEvent> = (0..200)
        .map(|i| {
            OwnedEvent::new(format!(r#"{{"n":{i}}}"#), i)
                .with_key("user")
                .with_header("user-agent", "curl/8")
                .with_header("country", "??")
        })
        .collect();
    let mut edit_allocs = 0;
    let mut run = |count: bool| {
        testing::enrich(&events, |e, out| {
            let before = allocs();
            out.edit(e)
                .with_header(&country, "France")
                .with_header("seen", b"1")
                .with_route("fr")
                .emit();
            if count {
                edit_allocs += allocs() - before;
            }
        })
        .unwrap()
    };
    // The first call grows the emitter's buffers; the SDK keeps them for the next call.
    let warm = run(false);
    let out = run(true);
    assert_eq!(out, warm);
    assert_eq!(
        out[7],
        events[7]
            .clone()
            .with_header("country", "France")
            .with_header("seen", "1")
            .with_route("fr")
    );
    assert_eq!(edit_allocs, 0);
}
