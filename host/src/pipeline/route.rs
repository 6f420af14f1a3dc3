//! Routing: which of a pipeline's sinks takes which events of its output, and where the events
//! that no sink takes go.

use weir_format::EventRef;

/// Which events a pipeline sends to one of its sinks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// Every event.
    All,
    /// Events whose route tag is one of these.
    Route(Vec<String>),
    /// Events that carry every one of these headers with exactly this value.
    Headers(Vec<(String, String)>),
}

/// One of a pipeline's sinks and which events it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The sink's name.
    pub sink: String,
    /// Which events it takes.
    pub condition: Condition,
}

/// Where events that no sink of a pipeline takes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmatched {
    /// There are none: some sink takes every event.
    Impossible,
    /// Dropped, and counted (`unmatched = "drop"`).
    Drop,
    /// To this sink (`unmatched = "NAME"`).
    Sink(String),
}

impl Condition {
    /// Whether `event` meets the condition.
    pub fn matches(&self, event: &EventRef<'_>) -> bool {
        match self {
            Condition::All => true,
            Condition::Route(tags) => event.route().is_some_and(|r| tags.iter().any(|t| t == r)),
            Condition::Headers(headers) => headers
                .iter()
                .all(|(name, value)| event.header(name) == Some(value.as_bytes())),
        }
    }
}
