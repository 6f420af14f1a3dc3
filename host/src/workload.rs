//! Generated workloads: realistic clickstream events for `weir demo`, `weir bench`, the
//! criterion benches and tests.
//!
//! Every event has a key `user-<n>` (n below the key cardinality), a `user-agent` header (one
//! in ten is a crawler), event time advancing 10 ms per event, and a JSON value padded to the
//! requested size:
//! `{"user":"user-7","country_code":"FR","amount":12.5,"path":"/p/42","pad":"xx…"}`.
//! The generator is deterministic: the same spec gives the same events, so figures and test
//! outputs repeat.

use weir_format::{BatchBuilder, Event};

/// One in this many events comes from a crawler.
pub const BOT_EVERY: u64 = 10;

/// Country codes cycled through the events; the demo's lookup table covers all but the last,
/// so that the enrich stage also shows its pass-through case.
const COUNTRIES: [&str; 5] = ["US", "FR", "DE", "JP", "ZZ"];

const BOT_AGENTS: [&str; 3] = [
    "Mozilla/5.0 (compatible; Googlebot/2.1)",
    "Baiduspider/2.0",
    "AhrefsCrawler/7.0",
];
const HUMAN_AGENT: &str = "Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0";

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// Number of events.
    pub events: u64,
    /// Size of each event's value in bytes (at least the JSON skeleton, ~80 bytes).
    pub value_size: usize,
    /// Number of distinct keys.
    pub keys: u64,
    /// Event time of the first event, ms since the Unix epoch.
    pub start_ms: i64,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            events: 1000,
            value_size: 256,
            keys: 100,
            start_ms: 1_700_000_000_000,
        }
    }
}

impl WorkloadSpec {
    /// The `i`-th event of the workload.
    pub fn event(&self, i: u64) -> Event {
        let user = i % self.keys.max(1);
        let country = COUNTRIES[(i % COUNTRIES.len() as u64) as usize];
        let agent = if i % BOT_EVERY == BOT_EVERY - 1 {
            BOT_AGENTS[((i / BOT_EVERY) % BOT_AGENTS.len() as u64) as usize]
        } else {
            HUMAN_AGENT
        };
        let amount = (i % 100) as f64 + 0.5;
        let mut value = format!(
            r#"{{"user":"user-{user}","country_code":"{country}","amount":{amount},"path":"/p/{i}","pad":""#
        );
        let pad = self.value_size.saturating_sub(value.len() + 2);
        value.extend(std::iter::repeat_n('x', pad));
        value.push_str("\"}");
        Event::new(value, self.start_ms + 10 * i as i64)
            .with_key(format!("user-{user}"))
            .with_header("user-agent", agent)
    }

    /// The workload as encoded batches of at most `batch` events.
    pub fn batches(&self, batch: usize) -> Vec<Vec<u8>> {
        let batch = batch.max(1) as u64;
        let mut builder = BatchBuilder::with_capacity(batch as usize * (self.value_size + 128));
        let mut out = Vec::with_capacity(self.events.div_ceil(batch) as usize);
        for i in 0..self.events {
            builder.push(&self.event(i));
            if builder.len() as u64 == batch {
                out.push(builder.finish());
            }
        }
        if !builder.is_empty() {
            out.push(builder.finish());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_format::Batch;

    #[test]
    fn values_have_the_requested_size_and_parse_as_json() {
        let spec = WorkloadSpec {
            value_size: 256,
            ..WorkloadSpec::default()
        };
        for i in [0, 9, 123_456] {
            let event = spec.event(i);
            assert_eq!(event.value.len(), 256);
            let json: serde_json::Value = serde_json::from_slice(&event.value).expect("json");
            assert_eq!(json["path"], format!("/p/{i}"));
        }
        assert_eq!(
            spec.event(9).header("user-agent"),
            Some(BOT_AGENTS[0].as_bytes())
        );
        assert_eq!(
            spec.event(8).header("user-agent"),
            Some(HUMAN_AGENT.as_bytes())
        );
    }

    #[test]
    fn batches_split_exactly() {
        let spec = WorkloadSpec {
            events: 10,
            ..WorkloadSpec::default()
        };
        let batches = spec.batches(4);
        let sizes: Vec<usize> = batches
            .iter()
            .map(|b| Batch::verify(b).map(|b| b.len()).unwrap_or(0))
            .collect();
        assert_eq!(sizes, vec![4, 4, 2]);
        let last = Batch::verify(&batches[2]).expect("valid");
        assert_eq!(last.get(1).map(|e| e.to_event()), Some(spec.event(9)));
    }
}
