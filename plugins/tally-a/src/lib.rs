//! tally-a: a test plugin, an aggregate that counts the events of each window and tags its
//! results `version: a` (see `../shared/tally.rs`); with tally-b it is two versions of one stage
//! with the same state layout.

const VERSION: &str = "a";

include!("../../shared/tally.rs");
