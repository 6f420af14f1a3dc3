//! [`PluginError`]: everything that can go wrong at the plugin boundary, as one enum.
//!
//! Decisions:
//!
//! - Load errors name the plugin by name and, when it came from a file, by path
//!   ([`PluginError::origin`]'s `who`): a load has no version the user knows yet.
//! - Run errors name the plugin and its version (``plugin `geo` 3f2a91c0: ...``), so that a
//!   dead letter or a log line says which build misbehaved.
//! - Messages are lowercase with no trailing period; a guest's own text is carried verbatim.
//! - [`PluginError::is_event_failure`] tells the pipeline which errors a batch can be retried
//!   event by event for (traps, deadlines, the memory cap, the plugin's own `Err`, a bad output)
//!   and which mean the stage itself cannot run (init refused, instantiation failed).
//! - A call made on one event alone (poison isolation) makes the SDK number it `event 0`;
//!   [`PluginError::renumbered`] puts the event's real index back into the plugin's message.

use std::fmt;
use std::time::Duration;

/// An error at the plugin boundary: loading, instantiating or calling a plugin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// The plugin file could not be read.
    #[error("plugin {who}: cannot read the file: {message}")]
    Read {
        /// The plugin and where it came from.
        who: String,
        /// The I/O error.
        message: String,
    },
    /// The plugin runtime itself could not be set up (engine, pool, linker).
    #[error("plugin runtime: {message}")]
    Runtime {
        /// What failed.
        message: String,
    },
    /// The bytes are not WebAssembly at all.
    #[error("plugin {who}: not a wasm binary (no `\\0asm` header)")]
    NotWasm {
        /// The plugin and where it came from.
        who: String,
    },
    /// A core module where a component is needed.
    #[error("plugin {who}: is a core wasm module, not a component: build it for wasm32-wasip2")]
    CoreModule {
        /// The plugin and where it came from.
        who: String,
    },
    /// The component does not validate or compile.
    #[error("plugin {who}: invalid component: {message}")]
    Compile {
        /// The plugin and where it came from.
        who: String,
        /// What wasmtime said.
        message: String,
    },
    /// The component implements none of the weir worlds.
    #[error(
        "plugin {who}: implements no weir world: expected the exports of world \
         `weir:plugin/filter@0.1.0` (`init`, `filter`), `weir:plugin/enrich@0.1.0` \
         (`init`, `enrich`) or `weir:plugin/aggregate@0.1.0` (`init`, `fold`, `finish`, \
         `state-layout`); it exports {exports}"
    )]
    NoWorld {
        /// The plugin and where it came from.
        who: String,
        /// What the component exports, listed.
        exports: String,
    },
    /// The component has the exports of more than one world.
    #[error("plugin {who}: implements more than one weir world ({kinds}): load it as one kind")]
    Ambiguous {
        /// The plugin and where it came from.
        who: String,
        /// The worlds it could be.
        kinds: String,
    },
    /// An export of the expected world is missing.
    #[error(
        "plugin {who}: export `{export}` of world `weir:plugin/{world}@0.1.0` not found; \
         it exports {exports}"
    )]
    MissingExport {
        /// The plugin and where it came from.
        who: String,
        /// The world expected.
        world: PluginKind,
        /// The missing export.
        export: String,
        /// What the component exports, listed.
        exports: String,
    },
    /// The exports are there but do not have the world's types.
    #[error("plugin {who}: does not match world `weir:plugin/{world}@0.1.0`: {message}")]
    Signature {
        /// The plugin and where it came from.
        who: String,
        /// The world expected.
        world: PluginKind,
        /// What wasmtime said.
        message: String,
    },
    /// The component imports something the sandbox does not offer.
    #[error(
        "plugin {who}: imports what the sandbox does not provide: {message} (the sandbox \
         provides weir:plugin/host and wasi:cli, wasi:clocks, wasi:filesystem, wasi:io, \
         wasi:random, wasi:sockets 0.2)"
    )]
    Import {
        /// The plugin and where it came from.
        who: String,
        /// What wasmtime said about the import.
        message: String,
    },
    /// A stage's configuration cannot be used with this plugin or runtime.
    #[error("plugin `{plugin}` {version}: {message}")]
    Config {
        /// Plugin name.
        plugin: String,
        /// Plugin version.
        version: String,
        /// What is wrong.
        message: String,
    },
    /// A new instance could not be created (e.g. the instance pool is exhausted).
    #[error("plugin `{plugin}` {version}: cannot instantiate: {message}")]
    Instantiate {
        /// Plugin name.
        plugin: String,
        /// Plugin version.
        version: String,
        /// What wasmtime said.
        message: String,
    },
    /// `init` refused the stage's config.
    #[error("plugin `{plugin}` {version}: init refused the config: {message}")]
    Init {
        /// Plugin name.
        plugin: String,
        /// Plugin version.
        version: String,
        /// The plugin's message.
        message: String,
    },
    /// The guest trapped (a panic, an out-of-bounds access, `exit`, ...).
    #[error("plugin `{plugin}` {version}: trapped: {trap}{}", panic_suffix(.panic))]
    Trap {
        /// Plugin name.
        plugin: String,
        /// Plugin version.
        version: String,
        /// The trap, as wasmtime words it.
        trap: String,
        /// The guest's panic message, when it printed or logged one.
        panic: Option<String>,
    },
    /// The call ran past the stage's deadline and was interrupted.
    #[error("plugin `{plugin}` {version}: exceeded its {} deadline", Millis(*.deadline))]
    Deadline {
        /// Plugin name.
        plugin: String,
        /// Plugin version.
        version: String,
        /// The stage's deadline per call.
        deadline: Duration,
    },
    /// The guest tried to grow its memory past the stage's cap.
    #[error("plugin `{plugin}` {version}: memory cap of {} reached", Bytes(*.cap))]
    MemoryCap {
        /// Plugin name.
        plugin: String,
        /// Plugin version.
        version: String,
        /// The cap in bytes.
        cap: u64,
    },
    /// The plugin returned an error for the batch.
    #[error("plugin `{plugin}` {version}: {call} failed: {message}")]
    Failed {
        /// Plugin name.
        plugin: String,
        /// Plugin version.
        version: String,
        /// The export called.
        call: &'static str,
        /// The plugin's message.
        message: String,
    },
    /// The plugin returned something that is not a valid answer.
    #[error("plugin `{plugin}` {version}: {call} returned garbage: {message}")]
    BadOutput {
        /// Plugin name.
        plugin: String,
        /// Plugin version.
        version: String,
        /// The export called.
        call: &'static str,
        /// What is wrong with the output.
        message: String,
    },
    /// The batch handed to the plugin is not a weir batch (a caller bug, not the plugin's).
    #[error("plugin `{plugin}` {version}: input is not a weir batch: {message}")]
    BadInput {
        /// Plugin name.
        plugin: String,
        /// Plugin version.
        version: String,
        /// What the verifier said.
        message: String,
    },
    /// A batch retried event by event (or window by window) produced more output, all calls
    /// together, than the stage's memory limit: the event or window that went past it and
    /// every one after it are not delivered.
    #[error(
        "plugin `{plugin}` {version}: output of the batch retried one by one exceeds the \
         stage's memory limit of {}",
        Bytes(*.limit)
    )]
    OutputLimit {
        /// Plugin name.
        plugin: String,
        /// Plugin version.
        version: String,
        /// The stage's memory limit in bytes.
        limit: u64,
    },
    /// The groups handed to `fold` name an event the batch does not have (a caller bug, not
    /// the plugin's).
    #[error(
        "plugin `{plugin}` {version}: fold input: group {group} names event {event} of a batch \
         of {len}"
    )]
    BadGroups {
        /// Plugin name.
        plugin: String,
        /// Plugin version.
        version: String,
        /// The group's index.
        group: usize,
        /// The event index it names.
        event: u32,
        /// Events in the batch.
        len: usize,
    },
    /// A call that the plugin's kind does not have (e.g. `enrich` on a filter).
    #[error("plugin `{plugin}` {version}: is a {kind} plugin and has no `{call}`")]
    WrongCall {
        /// Plugin name.
        plugin: String,
        /// Plugin version.
        version: String,
        /// The plugin's kind.
        kind: PluginKind,
        /// The export called.
        call: &'static str,
    },
}

impl PluginError {
    /// Whether this error came from running one batch (retrying the batch event by event can
    /// isolate the cause), as opposed to the stage being unable to run at all.
    pub fn is_event_failure(&self) -> bool {
        matches!(
            self,
            PluginError::Trap { .. }
                | PluginError::Deadline { .. }
                | PluginError::MemoryCap { .. }
                | PluginError::Failed { .. }
                | PluginError::BadOutput { .. }
                | PluginError::OutputLimit { .. }
        )
    }

    /// This error of a call made on one event (`what` = `"event"`) or one window
    /// (`"window"`) alone, as the error of item `index` of the batch it was isolated from: a
    /// plugin's own message that starts with `event 0: ` (how the SDK names the only event of
    /// the call) is renumbered to `event {index}: `. Other errors are returned as they are.
    pub(crate) fn renumbered(self, what: &str, index: usize) -> PluginError {
        match self {
            PluginError::Failed {
                plugin,
                version,
                call,
                message,
            } => {
                let message = match message
                    .strip_prefix(what)
                    .and_then(|rest| rest.strip_prefix(" 0: "))
                {
                    Some(rest) => format!("{what} {index}: {rest}"),
                    None => message,
                };
                PluginError::Failed {
                    plugin,
                    version,
                    call,
                    message,
                }
            }
            other => other,
        }
    }

    /// How a load error names a plugin: `` `name` `` or `` `name` (path) ``.
    pub(crate) fn origin(name: &str, path: Option<&std::path::Path>) -> String {
        match path {
            Some(path) => format!("`{name}` ({})", path.display()),
            None => format!("`{name}`"),
        }
    }
}

/// The kind of a plugin: which world it implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PluginKind {
    /// World `filter`: keeps or drops events.
    Filter,
    /// World `enrich`: maps each event to zero or more events.
    Enrich,
    /// World `aggregate`: keyed, windowed fold.
    Aggregate,
}

impl PluginKind {
    /// The world's name in `wit/weir.wit`.
    pub fn world(self) -> &'static str {
        match self {
            PluginKind::Filter => "filter",
            PluginKind::Enrich => "enrich",
            PluginKind::Aggregate => "aggregate",
        }
    }

    /// The exports the world requires, `init` first.
    pub fn exports(self) -> &'static [&'static str] {
        match self {
            PluginKind::Filter => &["init", "filter"],
            PluginKind::Enrich => &["init", "enrich"],
            PluginKind::Aggregate => &["init", "fold", "finish", "state-layout"],
        }
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.world())
    }
}

impl std::str::FromStr for PluginKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "filter" => Ok(PluginKind::Filter),
            "enrich" => Ok(PluginKind::Enrich),
            "aggregate" => Ok(PluginKind::Aggregate),
            other => Err(format!(
                "unknown plugin kind `{other}`: expected filter, enrich or aggregate"
            )),
        }
    }
}

fn panic_suffix(panic: &Option<String>) -> String {
    match panic {
        Some(message) => format!(" ({message})"),
        None => String::new(),
    }
}

/// A duration as people write deadlines: `100 ms`, `1.5 ms`, `2 s`.
pub(crate) struct Millis(pub Duration);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.as_nanos().is_multiple_of(1_000_000) {
            let ms = d.as_millis();
            if ms >= 1000 && ms.is_multiple_of(1000) {
                write!(f, "{} s", ms / 1000)
            } else {
                write!(f, "{ms} ms")
            }
        } else {
            write!(f, "{} ms", d.as_secs_f64() * 1e3)
        }
    }
}

/// A size as people write limits: `64 MiB`, `512 KiB`, `1000 bytes`.
pub(crate) struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * KIB;
        const GIB: u64 = 1024 * MIB;
        match self.0 {
            0 => write!(f, "0 bytes"),
            n if n % GIB == 0 => write!(f, "{} GiB", n / GIB),
            n if n % MIB == 0 => write!(f, "{} MiB", n / MIB),
            n if n % KIB == 0 => write!(f, "{} KiB", n / KIB),
            n => write!(f, "{n} bytes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(Millis(Duration::from_millis(100)).to_string(), "100 ms");
        assert_eq!(Millis(Duration::from_secs(2)).to_string(), "2 s");
        assert_eq!(Millis(Duration::from_micros(1500)).to_string(), "1.5 ms");
        assert_eq!(Bytes(64 << 20).to_string(), "64 MiB");
        assert_eq!(Bytes(1 << 30).to_string(), "1 GiB");
        assert_eq!(Bytes(512 << 10).to_string(), "512 KiB");
        assert_eq!(Bytes(1000).to_string(), "1000 bytes");
    }

    #[test]
    fn messages() {
        let e = PluginError::Deadline {
            plugin: "loop_forever".into(),
            version: "3f2a91c0".into(),
            deadline: Duration::from_millis(100),
        };
        assert_eq!(
            e.to_string(),
            "plugin `loop_forever` 3f2a91c0: exceeded its 100 ms deadline"
        );
        let e = PluginError::Trap {
            plugin: "p".into(),
            version: "v".into(),
            trap: "wasm trap: wasm `unreachable` instruction executed".into(),
            panic: Some("panicked: boom".into()),
        };
        assert_eq!(
            e.to_string(),
            "plugin `p` v: trapped: wasm trap: wasm `unreachable` instruction executed \
             (panicked: boom)"
        );
        let e = PluginError::MemoryCap {
            plugin: "p".into(),
            version: "v".into(),
            cap: 64 << 20,
        };
        assert_eq!(e.to_string(), "plugin `p` v: memory cap of 64 MiB reached");
        let e = PluginError::OutputLimit {
            plugin: "p".into(),
            version: "v".into(),
            limit: 8 << 20,
        };
        assert_eq!(
            e.to_string(),
            "plugin `p` v: output of the batch retried one by one exceeds the stage's memory \
             limit of 8 MiB"
        );
    }

    #[test]
    fn isolated_errors_name_the_real_index() {
        let failed = |message: &str| PluginError::Failed {
            plugin: "p".into(),
            version: "v".into(),
            call: "enrich",
            message: message.into(),
        };
        let text = |e: PluginError| e.to_string();
        assert_eq!(
            text(failed("event 0: not json").renumbered("event", 7)),
            "plugin `p` v: enrich failed: event 7: not json"
        );
        assert_eq!(
            text(failed("window 0: refused").renumbered("window", 2)),
            "plugin `p` v: enrich failed: window 2: refused"
        );
        // Only a leading `event 0: ` of the plugin's own message.
        for message in [
            "event 01: x",
            "event 0 x",
            "group 0: event 0: x",
            "window 0: x",
        ] {
            assert_eq!(
                failed(message).renumbered("event", 3),
                failed(message),
                "{message}"
            );
        }
        let trap = PluginError::Trap {
            plugin: "p".into(),
            version: "v".into(),
            trap: "event 0: x".into(),
            panic: None,
        };
        assert_eq!(trap.clone().renumbered("event", 3), trap);
    }
}
