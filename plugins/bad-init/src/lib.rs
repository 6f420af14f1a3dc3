//! bad-init: a filter for tests whose `init` fails when its config sets `fail = true`, with
//! the message ``config: `fail` is true: bad-init refuses to start``; otherwise it keeps every
//! event. It shows how a plugin validates its config: deserialize through `try_from`, and the
//! conversion's error becomes the `init` error.

use serde::Deserialize;
use weir_sdk::Event;

/// The config as written in the pipeline.
#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    fail: bool,
}

/// The validated config.
#[derive(Deserialize)]
#[serde(try_from = "Raw")]
pub struct Checked;

impl TryFrom<Raw> for Checked {
    type Error = &'static str;

    fn try_from(raw: Raw) -> Result<Self, Self::Error> {
        if raw.fail {
            Err("`fail` is true: bad-init refuses to start")
        } else {
            Ok(Checked)
        }
    }
}

/// Keeps every event.
#[weir_sdk::filter]
pub fn keep(_: &Event, _: &Checked) -> bool {
    true
}
