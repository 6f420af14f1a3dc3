//! One live plugin instance for one worker: its own `Store`, its stage config, its limits, and
//! the raw batch calls.
//!
//! Decisions:
//!
//! - **One store per instance.** The store holds the WASI context, the memory cap and the log
//!   tags; dropping it frees the pool slot. Instances are not shared between threads: each
//!   worker of a stage instantiates its own (`Instance` is `Send`, not `Sync`).
//! - **Lazy recycling.** A trap marks the instance dead; the next call (or [`Instance::recycle`])
//!   builds a fresh one from the plugin's `InstancePre` and calls `init` again. The call that
//!   follows [`Limits::max_calls_per_instance`] calls does the same. An `init` that fails on
//!   recycle is returned as [`PluginError::Init`] from that call.
//! - **Outputs are checked, never trusted.** A filter's bitmap must have `ceil(n / 8)` bytes;
//!   an enrich or finish output must pass [`weir_format::Batch::verify`] and name sources that
//!   exist; a fold must return one accumulator per group. Anything else is
//!   [`PluginError::BadOutput`] naming the plugin.
//! - **Input is lent, not copied.** A batch goes to the guest as the caller's `&[u8]`: the only
//!   copy is the one into guest memory that the canonical ABI makes.
//! - **`init` failures.** `init` returning `Err` is [`PluginError::Init`] with the plugin's
//!   message; a trap or deadline during `init` is reported the same way, with the trap's words.
//! - **Inputs are verified before the guest sees them.** The SDK reads batches without
//!   verifying them again (it trusts the host), so every call that takes a batch verifies it
//!   first ([`PluginError::BadInput`]), and `fold` also checks that every group's event indices
//!   are inside the batch ([`PluginError::BadGroups`]). The `*_counted` variants are for a
//!   caller that has just verified the batch.
//! - **Deadlines are capped at `MAX_DEADLINE_TICKS` ticks** (about 2^63: longer than any
//!   process lives), because wasmtime adds the ticks to the current epoch: `Duration::MAX`
//!   must not overflow there.

use super::bindings::{aggregate, enrich, filter, types};
use super::error::{Millis, PluginError};
use super::plugin::{Plugin, Pre};
use super::sandbox::{GuestLog, HostState, Tags};
use std::sync::Arc;
use std::time::Duration;
use wasmtime::Store;
use weir_format::{Batch, KeepBitmap};

/// The most epoch ticks a deadline may span. wasmtime adds them to the current epoch (which
/// counts up from zero, one tick every few ms), so half the range leaves room for any epoch a
/// process reaches, and is still longer than any process lives: a longer deadline is none.
const MAX_DEADLINE_TICKS: u64 = u64::MAX / 2;

/// The limits a stage puts on each of its instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory the instance may use in all (default 64 MiB); at most the runtime's
    /// [`super::RuntimeConfig::max_memory_bytes`].
    pub memory_bytes: u64,
    /// Wall time one call may take before it is interrupted (default 100 ms).
    pub deadline: Duration,
    /// Calls after which the instance is replaced by a fresh one (default 1 000 000).
    pub max_calls_per_instance: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            deadline: Duration::from_millis(100),
            max_calls_per_instance: 1_000_000,
        }
    }
}

/// What a stage gives its plugin: a name (for logs and dead letters), config values and limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageConfig {
    /// The stage's name in its pipeline (defaults to the plugin's name when empty).
    pub name: String,
    /// `(key, JSON text of the value)`, as `init` and the `host.config` import receive them.
    pub values: Vec<(String, String)>,
    /// Per-instance limits.
    pub limits: Limits,
}

impl StageConfig {
    /// A config with this stage name, no values and the default limits.
    pub fn new(name: impl Into<String>) -> Self {
        StageConfig {
            name: name.into(),
            ..StageConfig::default()
        }
    }

    /// Adds a value, JSON-encoded (`true`, `5`, `"US"`, `{"a": 1}`).
    pub fn with(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.values.push((key.into(), value.into().to_string()));
        self
    }

    /// Adds a value given as JSON text, passed through as is.
    pub fn with_json(mut self, key: impl Into<String>, json: impl Into<String>) -> Self {
        self.values.push((key.into(), json.into()));
        self
    }

    /// Replaces the limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

/// A live plugin instance with its own store: one per worker of a stage.
pub struct Instance {
    plugin: Plugin,
    config: StageConfig,
    log: Arc<GuestLog>,
    deadline_ticks: u64,
    memory_cap: usize,
    live: Option<Live>,
    calls: u64,
    recycles: u64,
    /// Tests only: how many more times a live instance may be created before creating one
    /// fails as if the instance pool were exhausted (`None`: no limit).
    #[cfg(test)]
    pub(crate) starts_left: Option<u32>,
    /// Tests only: how many of the next starts fail as if the pool were exhausted, before
    /// starts work again.
    #[cfg(test)]
    pub(crate) failing_starts: u32,
}

struct Live {
    store: Store<HostState>,
    exports: Exports,
}

enum Exports {
    Filter(filter::Filter),
    Enrich(enrich::Enrich),
    Aggregate(aggregate::Aggregate),
}

/// How a wasmtime call failed, before it is worded for a call or for `init`.
enum Failure {
    Trap { trap: String, panic: Option<String> },
    Deadline,
    MemoryCap,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("plugin", &self.plugin)
            .field("stage", &self.config.name)
            .field("calls", &self.calls)
            .field("recycles", &self.recycles)
            .finish_non_exhaustive()
    }
}

impl Instance {
    pub(crate) fn new(plugin: Plugin, mut config: StageConfig) -> Result<Instance, PluginError> {
        if config.name.is_empty() {
            config.name = plugin.name().to_owned();
        }
        let runtime = &plugin.inner.runtime.config;
        let limits = &config.limits;
        let bad = |message: String| PluginError::Config {
            plugin: plugin.name().to_owned(),
            version: plugin.version().to_owned(),
            message,
        };
        if limits.memory_bytes > runtime.max_memory_bytes {
            return Err(bad(format!(
                "stage `{}`: memory limit of {} exceeds the runtime's ceiling of {}",
                config.name,
                super::error::Bytes(limits.memory_bytes),
                super::error::Bytes(runtime.max_memory_bytes)
            )));
        }
        if limits.deadline.is_zero() {
            return Err(bad(format!(
                "stage `{}`: the deadline must be longer than zero",
                config.name
            )));
        }
        if limits.max_calls_per_instance == 0 {
            return Err(bad(format!(
                "stage `{}`: max_calls_per_instance must be at least 1",
                config.name
            )));
        }
        let memory_cap = usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX);
        // Never interrupt before the deadline, at most one tick after it.
        let tick = runtime.epoch_tick.as_nanos().max(1);
        let ticks = limits.deadline.as_nanos().div_ceil(tick) + 1;
        let deadline_ticks = u64::try_from(ticks)
            .unwrap_or(u64::MAX)
            .min(MAX_DEADLINE_TICKS);
        let log = Arc::new(GuestLog::new(Tags {
            plugin: plugin.name().into(),
            version: plugin.version().into(),
            stage: config.name.as_str().into(),
        }));
        let mut instance = Instance {
            plugin,
            config,
            log,
            deadline_ticks,
            memory_cap,
            live: None,
            calls: 0,
            recycles: 0,
            #[cfg(test)]
            starts_left: None,
            #[cfg(test)]
            failing_starts: 0,
        };
        instance.start()?;
        Ok(instance)
    }

    /// The plugin this is an instance of.
    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    /// The stage config the instance was created with.
    pub fn config(&self) -> &StageConfig {
        &self.config
    }

    /// Calls made on the current live instance since it was (re)created.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// Times the instance was replaced by a fresh one (after a trap, or after
    /// [`Limits::max_calls_per_instance`] calls, or by [`Instance::recycle`]).
    pub fn recycles(&self) -> u64 {
        self.recycles
    }

    /// Replaces the live instance with a fresh one and calls `init` again.
    pub fn recycle(&mut self) -> Result<(), PluginError> {
        self.live = None;
        self.recycles += 1;
        self.start()
    }

    /// Runs the filter on a batch; returns the keep-bitmap (its length checked).
    pub fn filter(&mut self, batch: &[u8]) -> Result<KeepBitmap, PluginError> {
        let n = self.count(batch)?;
        self.filter_counted(batch, n)
    }

    /// [`Instance::filter`] for a batch already verified to hold `n` events.
    pub(crate) fn filter_counted(
        &mut self,
        batch: &[u8],
        n: usize,
    ) -> Result<KeepBitmap, PluginError> {
        let bits = self.call("filter", |exports, store| match exports {
            Exports::Filter(f) => Ok(f.call_filter(store, batch)),
            _ => Err("filter"),
        })?;
        KeepBitmap::from_bytes(bits, n).map_err(|e| self.bad_output("filter", e.to_string()))
    }

    /// Runs the enrich on a batch; returns its output batch, verified, each event's `source`
    /// naming an input event.
    pub fn enrich(&mut self, batch: &[u8]) -> Result<Vec<u8>, PluginError> {
        let n = self.count(batch)?;
        self.enrich_counted(batch, n)
    }

    /// [`Instance::enrich`] for a batch already verified to hold `n` events.
    pub(crate) fn enrich_counted(
        &mut self,
        batch: &[u8],
        n: usize,
    ) -> Result<Vec<u8>, PluginError> {
        let out = self.call("enrich", |exports, store| match exports {
            Exports::Enrich(f) => Ok(f.call_enrich(store, batch)),
            _ => Err("enrich"),
        })?;
        self.check_batch("enrich", &out, n, "input event")?;
        Ok(out)
    }

    /// Folds a batch into the groups' accumulators; returns one new accumulator per group.
    /// The batch is verified and every group's event indices checked against it first.
    pub fn fold(
        &mut self,
        batch: &[u8],
        groups: &[types::Group],
    ) -> Result<Vec<Vec<u8>>, PluginError> {
        let n = self.count(batch)?;
        self.fold_counted(batch, n, groups)
    }

    /// [`Instance::fold`] for a batch already verified to hold `n` events.
    pub(crate) fn fold_counted(
        &mut self,
        batch: &[u8],
        n: usize,
        groups: &[types::Group],
    ) -> Result<Vec<Vec<u8>>, PluginError> {
        for (g, group) in groups.iter().enumerate() {
            if let Some(&event) = group.events.iter().find(|&&i| i as usize >= n) {
                return Err(PluginError::BadGroups {
                    plugin: self.plugin.name().to_owned(),
                    version: self.plugin.version().to_owned(),
                    group: g,
                    event,
                    len: n,
                });
            }
        }
        let accs = self.call("fold", |exports, store| match exports {
            Exports::Aggregate(f) => Ok(f.call_fold(store, batch, groups)),
            _ => Err("fold"),
        })?;
        if accs.len() != groups.len() {
            return Err(self.bad_output(
                "fold",
                format!("{} accumulators for {} groups", accs.len(), groups.len()),
            ));
        }
        Ok(accs)
    }

    /// Turns finished windows into events; returns a verified batch whose events' `source`
    /// names a window.
    pub fn finish(&mut self, windows: &[types::Window]) -> Result<Vec<u8>, PluginError> {
        let out = self.call("finish", |exports, store| match exports {
            Exports::Aggregate(f) => Ok(f.call_finish(store, windows)),
            _ => Err("finish"),
        })?;
        self.check_batch("finish", &out, windows.len(), "window")?;
        Ok(out)
    }

    /// The layout id of the accumulators an aggregate writes (its `state-layout` export). A
    /// layout id must be 1 to 256 bytes of printable text.
    pub fn state_layout(&mut self) -> Result<String, PluginError> {
        let layout = self.call("state-layout", |exports, store| match exports {
            Exports::Aggregate(f) => Ok(f.call_state_layout(store).map(Ok)),
            _ => Err("state-layout"),
        })?;
        if layout.is_empty() || layout.len() > 256 || layout.chars().any(char::is_control) {
            return Err(self.bad_output(
                "state-layout",
                format!(
                    "`{}` is not a layout id (1 to 256 printable bytes)",
                    layout.escape_debug()
                ),
            ));
        }
        Ok(layout)
    }

    /// Verifies an input batch and counts its events.
    pub(crate) fn count(&self, batch: &[u8]) -> Result<usize, PluginError> {
        Batch::verify(batch)
            .map(|b| b.len())
            .map_err(|e| PluginError::BadInput {
                plugin: self.plugin.name().to_owned(),
                version: self.plugin.version().to_owned(),
                message: e.to_string(),
            })
    }

    fn check_batch(
        &self,
        call: &'static str,
        out: &[u8],
        sources: usize,
        what: &str,
    ) -> Result<(), PluginError> {
        let batch = Batch::verify(out).map_err(|e| self.bad_output(call, e.to_string()))?;
        if let Some((i, e)) = batch
            .iter()
            .enumerate()
            .find(|(_, e)| e.source() as usize >= sources)
        {
            return Err(self.bad_output(
                call,
                format!("output event {i} names {what} {} of {sources}", e.source()),
            ));
        }
        Ok(())
    }

    fn bad_output(&self, call: &'static str, message: String) -> PluginError {
        PluginError::BadOutput {
            plugin: self.plugin.name().to_owned(),
            version: self.plugin.version().to_owned(),
            call,
            message,
        }
    }

    /// Creates the live instance and calls `init`.
    fn start(&mut self) -> Result<(), PluginError> {
        self.calls = 0;
        #[cfg(test)]
        if self.failing_starts > 0 {
            self.failing_starts -= 1;
            return Err(PluginError::Instantiate {
                plugin: self.plugin.name().to_owned(),
                version: self.plugin.version().to_owned(),
                message: "instance pool exhausted (test)".to_owned(),
            });
        }
        #[cfg(test)]
        if let Some(left) = self.starts_left.as_mut() {
            if *left == 0 {
                return Err(PluginError::Instantiate {
                    plugin: self.plugin.name().to_owned(),
                    version: self.plugin.version().to_owned(),
                    message: "instance pool exhausted (test)".to_owned(),
                });
            }
            *left -= 1;
        }
        let runtime = &self.plugin.inner.runtime;
        let state = HostState::new(
            self.log.clone(),
            self.config.values.clone(),
            self.memory_cap,
        );
        let mut store = Store::new(&runtime.engine, state);
        store.limiter(|s| &mut s.cap);
        store.set_epoch_deadline(self.deadline_ticks);
        let instantiated = match &self.plugin.inner.pre {
            Pre::Filter(pre) => pre.instantiate(&mut store).map(Exports::Filter),
            Pre::Enrich(pre) => pre.instantiate(&mut store).map(Exports::Enrich),
            Pre::Aggregate(pre) => pre.instantiate(&mut store).map(Exports::Aggregate),
        };
        let exports = match instantiated {
            Ok(exports) => exports,
            Err(e) => {
                let message = match self.failure(&store, &e) {
                    Failure::MemoryCap => self.memory_cap_text(),
                    _ => format!("{e:#}"),
                };
                return Err(PluginError::Instantiate {
                    plugin: self.plugin.name().to_owned(),
                    version: self.plugin.version().to_owned(),
                    message,
                });
            }
        };
        self.log.start_call();
        store.set_epoch_deadline(self.deadline_ticks);
        let values = &self.config.values;
        let init = match &exports {
            Exports::Filter(f) => f.call_init(&mut store, values),
            Exports::Enrich(f) => f.call_init(&mut store, values),
            Exports::Aggregate(f) => f.call_init(&mut store, values),
        };
        let refused = |message: String| PluginError::Init {
            plugin: self.plugin.name().to_owned(),
            version: self.plugin.version().to_owned(),
            message,
        };
        match init {
            Ok(Ok(())) => {
                self.live = Some(Live { store, exports });
                Ok(())
            }
            Ok(Err(message)) => Err(refused(message)),
            Err(e) => {
                let failure = self.failure(&store, &e);
                Err(refused(self.describe(failure)))
            }
        }
    }

    /// Runs one export under the deadline and the memory cap; recycles on a trap.
    ///
    /// `f` returns `Err(call)` when the export does not belong to this plugin's kind.
    fn call<R>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(
            &Exports,
            &mut Store<HostState>,
        ) -> Result<wasmtime::Result<Result<R, String>>, &'static str>,
    ) -> Result<R, PluginError> {
        if self.live.is_none() || self.calls >= self.config.limits.max_calls_per_instance {
            self.recycle()?;
        }
        let Some(live) = self.live.as_mut() else {
            // `recycle` either set `live` or returned its error; this is not reached.
            return Err(PluginError::Instantiate {
                plugin: self.plugin.name().to_owned(),
                version: self.plugin.version().to_owned(),
                message: "no live instance".to_owned(),
            });
        };
        live.store.set_epoch_deadline(self.deadline_ticks);
        live.store.data_mut().cap.hit = false;
        self.log.start_call();
        self.calls += 1;
        let result = match f(&live.exports, &mut live.store) {
            Ok(result) => result,
            Err(call) => return Err(self.wrong_call(call)),
        };
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(message)) => Err(PluginError::Failed {
                plugin: self.plugin.name().to_owned(),
                version: self.plugin.version().to_owned(),
                call,
                message,
            }),
            Err(e) => {
                let failure = match self.live.take() {
                    Some(live) => self.failure(&live.store, &e),
                    None => Failure::Trap {
                        trap: format!("{e:#}"),
                        panic: None,
                    },
                };
                Err(self.call_error(failure))
            }
        }
    }

    /// Classifies a wasmtime error: the memory cap, the epoch deadline, or another trap.
    fn failure(&self, store: &Store<HostState>, e: &wasmtime::Error) -> Failure {
        if store.data().cap.hit {
            return Failure::MemoryCap;
        }
        if e.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
            return Failure::Deadline;
        }
        store.data().flush_output();
        let trap = if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
            trap.to_string()
        } else if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
            format!("exited with status {}", exit.0)
        } else {
            format!("{e:#}")
        };
        Failure::Trap {
            trap,
            panic: self.log.panic_message(),
        }
    }

    fn call_error(&self, failure: Failure) -> PluginError {
        let plugin = self.plugin.name().to_owned();
        let version = self.plugin.version().to_owned();
        match failure {
            Failure::Trap { trap, panic } => PluginError::Trap {
                plugin,
                version,
                trap,
                panic,
            },
            Failure::Deadline => PluginError::Deadline {
                plugin,
                version,
                deadline: self.config.limits.deadline,
            },
            Failure::MemoryCap => PluginError::MemoryCap {
                plugin,
                version,
                cap: self.config.limits.memory_bytes,
            },
        }
    }

    /// A failure as words after a plugin's prefix (for `init` errors).
    fn describe(&self, failure: Failure) -> String {
        match failure {
            Failure::Trap {
                trap,
                panic: Some(panic),
            } => format!("trapped: {trap} ({panic})"),
            Failure::Trap { trap, panic: None } => format!("trapped: {trap}"),
            Failure::Deadline => format!(
                "exceeded its {} deadline",
                Millis(self.config.limits.deadline)
            ),
            Failure::MemoryCap => self.memory_cap_text(),
        }
    }

    fn memory_cap_text(&self) -> String {
        format!(
            "memory cap of {} reached",
            super::error::Bytes(self.config.limits.memory_bytes)
        )
    }

    fn wrong_call(&self, call: &'static str) -> PluginError {
        PluginError::WrongCall {
            plugin: self.plugin.name().to_owned(),
            version: self.plugin.version().to_owned(),
            kind: self.plugin.kind(),
            call,
        }
    }
}
