//! drop-bots: a filter that drops bot traffic.
//!
//! An event is dropped when its `user-agent` header contains `bot`, `crawler` or `spider`, in
//! any ASCII case. The check allocates nothing: it is the filter weir's benchmarks compare
//! against a native closure.

use weir_sdk::Event;

/// Keeps every event that is not from a bot.
#[weir_sdk::filter]
pub fn keep(e: &Event) -> bool {
    e.header("user-agent").is_none_or(|agent| !is_bot(agent))
}

/// Whether a user agent contains one of the marks, ignoring ASCII case.
pub fn is_bot(agent: &[u8]) -> bool {
    agent.iter().enumerate().any(|(i, byte)| {
        let mark: &[u8] = match byte.to_ascii_lowercase() {
            b'b' => b"bot",
            b'c' => b"crawler",
            b's' => b"spider",
            _ => return false,
        };
        agent
            .get(i..i + mark.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(mark))
    })
}
