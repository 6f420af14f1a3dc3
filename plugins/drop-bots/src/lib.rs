//! drop-bots: a filter that drops bot traffic.
//!
//! An event is dropped when its `user-agent` header contains `bot`, `crawler` or `spider`, in
//! any ASCII case. The check allocates nothing: it is the filter weir's benchmarks compare
//! against a native closure.

use weir_sdk::Event;

const BOT_MARKS: [&[u8]; 3] = [b"bot", b"crawler", b"spider"];

/// Keeps every event that is not from a bot.
#[weir_sdk::filter]
pub fn keep(e: &Event) -> bool {
    e.header("user-agent").is_none_or(|agent| !is_bot(agent))
}

/// Whether a user agent contains one of the marks, ignoring ASCII case.
pub fn is_bot(agent: &[u8]) -> bool {
    BOT_MARKS.iter().any(|mark| {
        agent
            .windows(mark.len())
            .any(|w| w.eq_ignore_ascii_case(mark))
    })
}
