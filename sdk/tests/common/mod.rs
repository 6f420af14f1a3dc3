//! What the SDK tests of other languages share.

use weir_format::Event;

/// The events both sides write and read: absent and empty fields, repeated and binary headers,
/// negative and large timestamps, non-ASCII text.
pub fn events() -> Vec<Event> {
    vec![
        Event::new("v1", -5)
            .with_key("k")
            .with_header("a", "1")
            .with_header("a", "2")
            .with_route("eu"),
        Event::new("", 1 << 40),
        Event::new((0..=255u8).collect::<Vec<u8>>(), 3)
            .with_header("bin", [0u8, 255, 10])
            .with_header("é", "ü"),
    ]
}
