//! record-filter: a bench-only plugin that does not use weir-sdk. It implements the world
//! `record-filter` of `benches/wit/record.wit`: one component call per event, with the event
//! lifted as a typed record (the shape Redpanda and most plugin systems use). It runs the same
//! check as drop-bots, so the benches can compare the two ABIs on equal work.

/// The export, built only for the component (wit-bindgen's exports are wasm symbols).
#[cfg(target_arch = "wasm32")]
#[allow(clippy::too_many_arguments)] // the generated lowering of a record takes its fields flat
mod component {
    wit_bindgen::generate!({ path: "../../benches/wit", world: "record-filter" });

    struct Plugin;

    impl Guest for Plugin {
        fn filter(e: Event) -> bool {
            let agent = e.headers.iter().find(|(name, _)| name == "user-agent");
            agent.is_none_or(|(_, agent)| !super::is_bot(agent))
        }
    }

    export!(Plugin);
}

/// Whether a user agent contains `bot`, `crawler` or `spider`, ignoring ASCII case.
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
