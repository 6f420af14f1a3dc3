//! tally-b: a test plugin, an aggregate that counts the events of each window and tags its
//! results `version: b` (see `../shared/tally.rs`); with tally-a it is two versions of one stage
//! with the same state layout.

const VERSION: &str = "b";

include!("../../shared/tally.rs");
