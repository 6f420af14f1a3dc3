//! version-a: a test plugin, an enrich that tags every event `version: a` (see
//! `../shared/version_tag.rs`); with version-b it is two versions of one stage.

const VERSION: &str = "a";

include!("../../shared/version_tag.rs");
