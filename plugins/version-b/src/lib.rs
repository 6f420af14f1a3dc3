//! version-b: a test plugin, an enrich that tags every event `version: b` (see
//! `../shared/version_tag.rs`); with version-a it is two versions of one stage.

const VERSION: &str = "b";

include!("../../shared/version_tag.rs");
