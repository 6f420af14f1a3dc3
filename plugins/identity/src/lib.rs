//! identity: a filter that keeps every event.
//!
//! The cheapest possible stage: one plugin call per batch and a bitmap of ones back, so the
//! stage hands on the input batch as it is. The ingest benchmark runs it to measure what weir
//! adds around a plugin, and a pipeline can use it to check a setup end to end.

use weir_sdk::Event;

/// Keeps every event.
#[weir_sdk::filter]
pub fn keep(_event: &Event) -> bool {
    true
}

#[cfg(test)]
mod tests {
    use weir_sdk::OwnedEvent;
    use weir_sdk::testing::filter;

    #[test]
    fn keeps_every_event_in_order() {
        let events = vec![
            OwnedEvent::new("a", 1).with_header("user-agent", "Googlebot"),
            OwnedEvent::new("b", 2),
        ];
        assert_eq!(filter(&events, super::keep).expect("filter runs"), events);
    }
}
