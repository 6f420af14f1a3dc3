//! The plugin runtime: wasmtime set up once per process, plugins compiled once per version,
//! instances that run one batch at a time inside a sandbox with limits (DESIGN §4).
//!
//! - [`Runtime`]: one per process. One wasmtime `Engine` (Cranelift, pooling instance
//!   allocator, copy-on-write memory images, epoch interruption driven by a background ticker
//!   thread), one `Linker` with WASI 0.2 (sync) and the weir `host` interface.
//! - [`Plugin`]: a compiled component of a known kind ([`PluginKind`]) with its `InstancePre`,
//!   named after its file and versioned by a digest of its bytes. Cheap to clone.
//! - [`Instance`]: one live instance for one worker, created from a [`StageConfig`]; it owns
//!   its `Store`, calls `init` once, then runs raw batch calls (`filter`, `enrich`, `fold`,
//!   `finish`) under the stage's [`Limits`].
//! - [`PluginError`]: every failure at this boundary, as one enum; a guest can never panic or
//!   kill the host.
//!
//! Decisions:
//!
//! - **Pool sizing.** The pooling allocator reserves its slots up front, so
//!   [`RuntimeConfig::max_instances`] bounds the live instances of the process (each worker of
//!   each stage holds one; a recycle frees its slot before taking a new one). Each memory slot
//!   reserves [`RuntimeConfig::max_memory_bytes`] (plus a guard), not the 4 GiB that would let
//!   Cranelift drop bounds checks: several runtimes in one test process would otherwise reserve
//!   terabytes. [`RuntimeConfig::elide_bounds_checks`] switches to 4 GiB reservations for
//!   production and benchmarks.
//! - **Deadlines.** A ticker thread bumps the engine's epoch every
//!   [`RuntimeConfig::epoch_tick`]; before every call the store's deadline is set to
//!   `ceil(deadline / tick) + 1` ticks, so a call is never interrupted before its deadline and
//!   at most one tick after it. The ticker stops when the runtime and every plugin and
//!   instance made from it are dropped (they share it: an instance whose deadline could no
//!   longer fire would be a hang waiting to happen).
//! - **Recycling.** After any trap (panic, deadline, memory cap, `exit`) the instance is thrown
//!   away and the next call gets a fresh one from the `InstancePre` (with `init` called again);
//!   also after [`Limits::max_calls_per_instance`] calls, so a slow leak in a guest cannot grow
//!   without bound. Copy-on-write images and the pool make that cheap (tens of µs).
//! - **Kinds.** A plugin's kind is read from its exports (`filter`, `enrich`, or `fold` +
//!   `finish`, each with `init`); loading "as" a kind names the world and the missing export.
//! - **Versions.** A plugin version is addressed by the SHA-256 of its bytes ([`Digest`]); its
//!   printed version is the first 8 hex digits: the same bytes always get the same version.
//! - **Compile cache.** With [`RuntimeConfig::cache_dir`], compiled components are kept on
//!   disk by digest and engine (`cache.rs`), checked before use, so a restart does not
//!   compile again.

mod bindings;
mod cache;
mod error;
mod instance;
mod plugin;
mod sandbox;

pub use cache::{CompileCache, Compiled, Digest, weir_cache_home};
pub use error::PluginError;
pub use error::PluginKind;
pub use instance::{Instance, Limits, StageConfig};
pub use plugin::Plugin;

/// The window of an aggregate as the plugin sees it (see `wit/weir.wit`, `types.window`).
pub use bindings::types::Window;

/// The events of one batch that fall into one window (see `wit/weir.wit`, `types.group`).
pub use bindings::types::Group;

use sandbox::{FixedMonotonic, FixedMonotonicData, HostState};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;
use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Core instances one component may hold in the pool. A Rust component has 3 (the module and
/// two shims); interpreters built with componentize-py or -js have more.
const CORE_INSTANCES_PER_COMPONENT: u32 = 16;
/// Linear memories one component may hold. Rust components have one; leave room for two.
const MEMORIES_PER_COMPONENT: u32 = 2;
/// Tables one component may hold (the module's function table and the shims' tables).
const TABLES_PER_COMPONENT: u32 = 8;
/// Guard pages after each linear memory. Small: the reservations are bounds-checked anyway
/// unless [`RuntimeConfig::elide_bounds_checks`] is set.
const MEMORY_GUARD: u64 = 2 << 20;
/// The reservation that lets Cranelift skip bounds checks on 32-bit memories.
const FULL_RESERVATION: u64 = 4 << 30;
/// Guard used with [`FULL_RESERVATION`] (wasmtime's default).
const FULL_GUARD: u64 = 32 << 20;

/// How the process-wide runtime is sized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Live plugin instances the pool holds at most, across every stage and worker.
    pub max_instances: u32,
    /// How often the epoch ticks: the resolution of every deadline.
    pub epoch_tick: Duration,
    /// The most linear memory any instance may use: the ceiling of every stage's
    /// [`Limits::memory_bytes`], and the size of a memory slot in the pool.
    pub max_memory_bytes: u64,
    /// Reserve 4 GiB of address space per memory so compiled code needs no bounds checks
    /// (faster; needs `max_instances * 2 * 4 GiB` of virtual address space).
    pub elide_bounds_checks: bool,
    /// Where compiled plugins are cached (`cache.rs`); `None`: compile at every load.
    pub cache_dir: Option<std::path::PathBuf>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_instances: 64,
            epoch_tick: Duration::from_millis(5),
            max_memory_bytes: 256 << 20,
            elide_bounds_checks: false,
            cache_dir: None,
        }
    }
}

/// The process-wide plugin runtime. Cheap to clone; every clone shares one engine.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) inner: Arc<RuntimeInner>,
}

pub(crate) struct RuntimeInner {
    pub engine: Engine,
    pub linker: Linker<HostState>,
    pub config: RuntimeConfig,
    pub cache: Option<CompileCache>,
    _ticker: Ticker,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Sets up the engine, the instance pool, the linker and the epoch ticker.
    pub fn new(config: RuntimeConfig) -> Result<Runtime, PluginError> {
        let fail = |what: &str, e: wasmtime::Error| PluginError::Runtime {
            message: format!("{what}: {e:#}"),
        };
        if config.max_instances == 0 {
            return Err(PluginError::Runtime {
                message: "max_instances must be at least 1".into(),
            });
        }
        if config.epoch_tick.is_zero() {
            return Err(PluginError::Runtime {
                message: "epoch_tick must be longer than zero".into(),
            });
        }
        if config.max_memory_bytes > FULL_RESERVATION {
            return Err(PluginError::Runtime {
                message: format!(
                    "max_memory_bytes of {} exceeds the 4 GiB of a 32-bit memory",
                    error::Bytes(config.max_memory_bytes)
                ),
            });
        }
        let slot = usize::try_from(config.max_memory_bytes).map_err(|_| PluginError::Runtime {
            message: "max_memory_bytes does not fit this platform".into(),
        })?;

        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(config.max_instances)
            .total_core_instances(config.max_instances * CORE_INSTANCES_PER_COMPONENT)
            .total_memories(config.max_instances * MEMORIES_PER_COMPONENT)
            .total_tables(config.max_instances * TABLES_PER_COMPONENT)
            .max_memory_size(slot);

        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .memory_init_cow(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        if config.elide_bounds_checks {
            wasm.memory_reservation(FULL_RESERVATION)
                .memory_guard_size(FULL_GUARD);
        } else {
            wasm.memory_reservation(config.max_memory_bytes)
                .memory_guard_size(MEMORY_GUARD);
        }
        // Pooled memories cannot move: every growth happens inside the slot's reservation.
        wasm.memory_reservation_for_growth(0);
        let engine = Engine::new(&wasm).map_err(|e| fail("cannot create the engine", e))?;

        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| fail("cannot link WASI", e))?;
        // Replace the monotonic clock: no real time for guests, and no sleeping in host code.
        linker.allow_shadowing(true);
        wasmtime_wasi::p2::bindings::clocks::monotonic_clock::add_to_linker::<
            HostState,
            FixedMonotonicData,
        >(&mut linker, FixedMonotonic::of)
        .map_err(|e| fail("cannot link the fixed clock", e))?;
        linker.allow_shadowing(false);
        bindings::host::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| fail("cannot link the host interface", e))?;

        let ticker =
            Ticker::start(engine.clone(), config.epoch_tick).map_err(|e| PluginError::Runtime {
                message: format!("cannot start the epoch ticker: {e}"),
            })?;
        Ok(Runtime {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                cache: config.cache_dir.clone().map(CompileCache::new),
                config,
                _ticker: ticker,
            }),
        })
    }

    /// The configuration the runtime was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// Loads a plugin from a file; its name is the file stem, its kind read from its exports.
    pub fn load_file(&self, path: impl AsRef<std::path::Path>) -> Result<Plugin, PluginError> {
        Plugin::load_file(self, path.as_ref(), None)
    }

    /// Loads a plugin from a file that must implement the world of `kind`.
    pub fn load_file_as(
        &self,
        path: impl AsRef<std::path::Path>,
        kind: PluginKind,
    ) -> Result<Plugin, PluginError> {
        Plugin::load_file(self, path.as_ref(), Some(kind))
    }

    /// Loads a plugin from bytes, under `name`; its kind is read from its exports.
    pub fn load_bytes(&self, name: &str, bytes: &[u8]) -> Result<Plugin, PluginError> {
        Plugin::load_bytes(self, name, bytes, None, None)
    }

    /// Loads a plugin from bytes, under `name`, that must implement the world of `kind`.
    pub fn load_bytes_as(
        &self,
        name: &str,
        bytes: &[u8],
        kind: PluginKind,
    ) -> Result<Plugin, PluginError> {
        Plugin::load_bytes(self, name, bytes, None, Some(kind))
    }
}

/// The thread that advances the engine's epoch; stops and joins on drop.
struct Ticker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// Alive exactly as long as the thread runs (the thread holds the only strong count), so
    /// that "the thread has stopped" can be checked.
    running: Weak<()>,
}

impl Ticker {
    fn start(engine: Engine, tick: Duration) -> std::io::Result<Ticker> {
        let (stop, stopped) = mpsc::channel::<()>();
        let sentinel = Arc::new(());
        let running = Arc::downgrade(&sentinel);
        let thread = std::thread::Builder::new()
            .name("weir-epoch".into())
            .spawn(move || {
                let _sentinel = sentinel;
                // Ends when the sender is dropped (or sends): the runtime is gone.
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(tick) {
                    engine.increment_epoch();
                }
            })?;
        Ok(Ticker {
            stop: Some(stop),
            thread: Some(thread),
            running,
        })
    }

    /// Whether the ticker thread is still running.
    fn is_running(&self) -> bool {
        self.running.strong_count() > 0
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            // The thread only sleeps and ticks; it cannot panic in a way worth reporting.
            let _ = thread.join();
        }
        debug_assert!(!self.is_running(), "the epoch ticker outlived its join");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticker_stops_when_the_runtime_is_dropped() {
        let runtime = Runtime::new(RuntimeConfig {
            max_instances: 2,
            ..RuntimeConfig::default()
        })
        .expect("runtime");
        let running = runtime.inner._ticker.running.clone();
        assert!(runtime.inner._ticker.is_running());
        // Clones (plugins and instances too) share the runtime, and so the ticker.
        let clone = runtime.clone();
        drop(runtime);
        assert_eq!(running.strong_count(), 1, "a clone still holds the runtime");
        drop(clone);
        // The last drop joined the thread: its sentinel is gone, at once.
        assert_eq!(running.strong_count(), 0, "the ticker thread still runs");
    }

    #[test]
    fn bad_configs_are_errors() {
        let e = Runtime::new(RuntimeConfig {
            max_instances: 0,
            ..RuntimeConfig::default()
        })
        .expect_err("zero instances");
        assert_eq!(
            e.to_string(),
            "plugin runtime: max_instances must be at least 1"
        );
        let e = Runtime::new(RuntimeConfig {
            max_memory_bytes: 8 << 30,
            ..RuntimeConfig::default()
        })
        .expect_err("8 GiB");
        assert_eq!(
            e.to_string(),
            "plugin runtime: max_memory_bytes of 8 GiB exceeds the 4 GiB of a 32-bit memory"
        );
    }
}
