//! [`Fanout`]: a pipeline's output shared out to its sinks, each offered the events its
//! condition selects; what no sink takes goes to the `unmatched` output; dead letters go to the
//! pipeline's dead-letter sink.
//!
//! The output batch is verified once and shared by every sink that takes events of it
//! ([`SharedBatch`]): a sink that takes only some events gets a [`Selection`] of indices, never
//! a copy. When the pipeline's last stages were filters, the batch is the pipeline's input and
//! what they kept is a selection of it too, so no event is copied between the source and the
//! sinks. Each `block` offer adds to the round's [`Ticket`] (`sinks/runner.rs` says when a
//! sink has accepted a delivery).

use super::route::Condition;
use crate::metrics::PipelineMetrics;
use crate::sinks::runner::{Sink, Ticket};
use crate::sinks::{Outgoing, Selection, SharedBatch};
use std::sync::Arc;
use weir_format::KeepBitmap;

/// Where a pipeline's events that no sink takes go.
#[derive(Clone)]
pub(crate) enum UnmatchedOut {
    /// Some sink takes every event.
    Impossible,
    /// Dropped and counted.
    Drop,
    /// To this sink.
    Sink(Arc<Sink>),
}

/// A pipeline's sinks, the events each takes, and where the rest and the dead letters go.
#[derive(Clone)]
pub(crate) struct Fanout {
    pipeline: Arc<str>,
    routes: Vec<(Arc<Sink>, Condition)>,
    unmatched: UnmatchedOut,
    dead_letters: Arc<Sink>,
}

impl Fanout {
    /// The fan-out of pipeline `pipeline`.
    pub fn new(
        pipeline: Arc<str>,
        routes: Vec<(Arc<Sink>, Condition)>,
        unmatched: UnmatchedOut,
        dead_letters: Arc<Sink>,
    ) -> Fanout {
        Fanout {
            pipeline,
            routes,
            unmatched,
            dead_letters,
        }
    }

    /// Offers each sink the events of `out` that `kept` holds (`None`: every one) and its
    /// condition selects, the rest of them to `unmatched`; returns why a sink did not take its
    /// events (only once the router is stopping).
    pub fn offer(
        &self,
        out: &SharedBatch,
        kept: Option<&KeepBitmap>,
        ticket: &Arc<Ticket>,
        metrics: &PipelineMetrics,
    ) -> Vec<String> {
        let mut refused = Vec::new();
        let batch = out.batch();
        let n = batch.len();
        let picked: Option<Arc<[u32]>> = kept.map(|k| k.kept().map(|i| i as u32).collect());
        let events = picked.as_ref().map_or(n, |p| p.len());
        if events == 0 {
            return refused;
        }
        // Every event that is in, as a selection.
        let every = match &picked {
            Some(picked) => Selection::Some(picked.clone()),
            None => Selection::All,
        };
        let candidates = || -> Box<dyn Iterator<Item = u32> + '_> {
            match &picked {
                Some(picked) => Box::new(picked.iter().copied()),
                None => Box::new(0..n as u32),
            }
        };
        let mut taken = match self.unmatched {
            UnmatchedOut::Impossible => Vec::new(),
            _ => vec![false; n],
        };
        for (sink, condition) in &self.routes {
            let selection = match condition {
                Condition::All => every.clone(),
                _ => {
                    let indices: Vec<u32> = candidates()
                        .filter(|&i| batch.get(i as usize).is_some_and(|e| condition.matches(&e)))
                        .collect();
                    if indices.is_empty() {
                        continue;
                    }
                    for &i in &indices {
                        if let Some(t) = taken.get_mut(i as usize) {
                            *t = true;
                        }
                    }
                    if indices.len() == events {
                        every.clone()
                    } else {
                        Selection::Some(indices.into())
                    }
                }
            };
            let delivery = Outgoing::new(out.clone(), selection, self.pipeline.clone());
            if let Err(e) = sink.offer(delivery, ticket) {
                refused.push(e);
            }
        }
        if taken.is_empty() {
            return refused;
        }
        let rest: Vec<u32> = candidates().filter(|&i| !taken[i as usize]).collect();
        if rest.is_empty() {
            return refused;
        }
        metrics.unmatched.inc_by(rest.len() as u64);
        match &self.unmatched {
            UnmatchedOut::Sink(sink) => {
                let selection = if rest.len() == events {
                    every
                } else {
                    Selection::Some(rest.into())
                };
                let delivery = Outgoing::new(out.clone(), selection, self.pipeline.clone());
                if let Err(e) = sink.offer(delivery, ticket) {
                    refused.push(e);
                }
            }
            _ => {
                metrics.unmatched_dropped.inc_by(rest.len() as u64);
            }
        }
        refused
    }

    /// Offers a batch of dead letters to the dead-letter sink.
    pub fn offer_dead_letters(
        &self,
        letters: SharedBatch,
        ticket: &Arc<Ticket>,
    ) -> Result<(), String> {
        self.dead_letters
            .offer(Outgoing::all(letters, self.pipeline.clone()), ticket)
    }

    /// Every sink this pipeline offers to, each once.
    pub fn sinks(&self) -> Vec<&Arc<Sink>> {
        let mut sinks: Vec<&Arc<Sink>> = Vec::new();
        let unmatched = match &self.unmatched {
            UnmatchedOut::Sink(sink) => Some(sink),
            _ => None,
        };
        let all = self.routes.iter().map(|(s, _)| s);
        for sink in all.chain(unmatched).chain([&self.dead_letters]) {
            if !sinks.iter().any(|s| Arc::ptr_eq(s, sink)) {
                sinks.push(sink);
            }
        }
        sinks
    }
}
