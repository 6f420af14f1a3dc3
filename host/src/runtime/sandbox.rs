//! What a plugin instance sees of the world: the store data behind every instance.
//!
//! Decisions:
//!
//! - **WASI p2, closed by default.** Every store gets a `WasiCtx` with no preopened directory, no
//!   environment variable, no argument, closed stdin and every socket address denied (the
//!   `wasi:sockets` interfaces are linked so that a component built with a full libc loads, but
//!   every bind, connect and name lookup is refused). Randomness is left on: it reveals nothing.
//! - **No clock.** The wall clock is fixed at the Unix epoch and the monotonic clock at zero, and
//!   a monotonic-clock subscription (what `sleep` is built on) is ready at once: the guest cannot
//!   read time, and cannot park a worker thread in a host call where the epoch deadline would not
//!   reach it. Event time is in the events; processing time is the host's business.
//! - **stdout and stderr become log lines.** Each stream is cut at `\n` and every line is a
//!   `tracing` event on target `weir::plugin` tagged `plugin`, `version` and `stage` (stdout at
//!   info, stderr at warn). The host `log` import goes to the same target at the level the
//!   guest asked for.
//! - **Lines are bounded.** A line longer than [`MAX_LINE`] bytes, from either source, is cut
//!   there and ends with `… (cut at 8192 bytes)`, so the log says it is incomplete; the rest of
//!   a cut stdout/stderr line, up to its `\n`, is dropped (however the guest split its writes),
//!   and a cut `log` message is cut before it is logged or kept for panic messages.
//! - **Panic messages are kept.** The last stderr lines and error-level log lines of the current
//!   call are kept (at most [`RECENT_LINES`]) so that a trap can be reported with the guest's
//!   panic message next to the wasm trap ([`GuestLog::panic_message`]).
//! - **Memory cap per instance, not per memory.** [`MemoryCap`] adds up every linear memory of
//!   the instance (a store holds exactly one instance) and refuses a growth past the cap by
//!   trapping, recording that the cap was the cause so the error can say so.

use super::bindings;
use bytes::Bytes;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;
use wasmtime::component::{HasData, Resource, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock;
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

/// Longest stdout/stderr line or `log` message forwarded to the log, in bytes; the rest of a
/// longer one is cut (a log line is for people; a guest could otherwise make the host copy
/// up to its whole memory into every line it keeps).
pub(crate) const MAX_LINE: usize = 8 * 1024;
/// Lines of stderr / error logs kept per call to find a panic message in.
pub(crate) const RECENT_LINES: usize = 16;
/// How much a guest may write to stdout/stderr in one `write` (the WASI permit).
const WRITE_PERMIT: usize = 64 * 1024;

/// Who is speaking: the tags every log line of an instance carries.
#[derive(Debug, Clone)]
pub(crate) struct Tags {
    pub plugin: Arc<str>,
    pub version: Arc<str>,
    pub stage: Arc<str>,
}

/// The guest's log: tags, and the recent lines a panic message is looked for in.
#[derive(Debug)]
pub(crate) struct GuestLog {
    pub tags: Tags,
    recent: Mutex<VecDeque<String>>,
}

/// The log levels of the `host` interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl GuestLog {
    pub fn new(tags: Tags) -> Self {
        GuestLog {
            tags,
            recent: Mutex::new(VecDeque::new()),
        }
    }

    fn recent(&self) -> MutexGuard<'_, VecDeque<String>> {
        // A poisoned lock only means another thread panicked while logging; the lines are fine.
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the lines of the previous call.
    pub fn start_call(&self) {
        self.recent().clear();
    }

    fn remember(&self, line: &str) {
        let mut recent = self.recent();
        if recent.len() == RECENT_LINES {
            recent.pop_front();
        }
        recent.push_back(line.to_owned());
    }

    /// Writes one guest line to the host log.
    pub fn line(&self, level: Level, line: &str) {
        let Tags {
            plugin,
            version,
            stage,
        } = &self.tags;
        let (plugin, version, stage) = (&**plugin, &**version, &**stage);
        match level {
            Level::Trace => {
                tracing::trace!(target: "weir::plugin", plugin, version, stage, "{line}")
            }
            Level::Debug => {
                tracing::debug!(target: "weir::plugin", plugin, version, stage, "{line}")
            }
            Level::Info => tracing::info!(target: "weir::plugin", plugin, version, stage, "{line}"),
            Level::Warn => tracing::warn!(target: "weir::plugin", plugin, version, stage, "{line}"),
            Level::Error => {
                tracing::error!(target: "weir::plugin", plugin, version, stage, "{line}")
            }
        }
    }

    /// A line from stderr (kept for panic messages) or an error-level log line.
    pub fn remembered_line(&self, level: Level, line: &str) {
        self.remember(line);
        self.line(level, line);
    }

    /// The panic message among this call's stderr / error lines, if the guest printed one.
    ///
    /// Understands Rust's default hook (`thread '…' panicked at src/lib.rs:3:5:` followed by the
    /// message lines and a `note: run with RUST_BACKTRACE=1` line) and any single line that
    /// contains `panicked` (an SDK hook logging `panicked at src/lib.rs:3:5: message` or
    /// `panicked: message`).
    pub fn panic_message(&self) -> Option<String> {
        let recent = self.recent();
        let lines: Vec<&str> = recent.iter().map(String::as_str).collect();
        panic_message(&lines)
    }
}

/// See [`GuestLog::panic_message`]; pure so it can be tested.
pub(crate) fn panic_message(lines: &[&str]) -> Option<String> {
    let at = lines.iter().rposition(|l| l.contains("panicked"))?;
    let line = lines[at].trim();
    let from = line.find("panicked")?;
    let rest = line[from + "panicked".len()..].trim_start();
    if let Some(location) = rest.strip_prefix("at ") {
        // `panicked at FILE:LINE:COL:` + message lines, or `panicked at FILE:LINE:COL: message`.
        if let Some(location) = location.strip_suffix(':') {
            let message: Vec<&str> = lines[at + 1..]
                .iter()
                .map(|l| l.trim_end())
                .take_while(|l| !l.starts_with("note:") && !l.starts_with("stack backtrace"))
                .collect();
            let message = message.join("\n");
            return Some(if message.is_empty() {
                format!("panicked at {location}")
            } else {
                format!("panicked at {location}: {message}")
            });
        }
        return Some(format!("panicked at {location}"));
    }
    let message = rest.trim_start_matches(':').trim();
    Some(if message.is_empty() {
        "panicked".to_owned()
    } else {
        format!("panicked: {message}")
    })
}

/// A guest stdout or stderr: cut into lines, each one a log event.
#[derive(Clone)]
pub(crate) struct LineStream {
    log: Arc<GuestLog>,
    stderr: bool,
    partial: Arc<Mutex<Partial>>,
}

/// The line being written, across writes.
#[derive(Default)]
struct Partial {
    /// Its bytes so far (at most [`MAX_LINE`]).
    line: Vec<u8>,
    /// It was already logged, cut: drop what comes until its `\n`.
    cut: bool,
}

impl LineStream {
    pub fn new(log: Arc<GuestLog>, stderr: bool) -> Self {
        LineStream {
            log,
            stderr,
            partial: Arc::default(),
        }
    }

    fn emit(&self, line: &[u8], cut: bool) {
        let text = String::from_utf8_lossy(line);
        let text = if cut {
            std::borrow::Cow::Owned(format!("{text}{}", cut_marker()))
        } else {
            text
        };
        let text = text.trim_end_matches('\r');
        if self.stderr {
            self.log.remembered_line(Level::Warn, text);
        } else {
            self.log.line(Level::Info, text);
        }
    }

    fn push(&self, mut bytes: &[u8]) {
        let mut partial = self.partial.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    self.piece(&mut partial, &bytes[..nl], true);
                    bytes = &bytes[nl + 1..];
                }
                None => {
                    self.piece(&mut partial, bytes, false);
                    return;
                }
            }
        }
    }

    /// Adds a piece of the current line; `ends` when a `\n` followed it.
    fn piece(&self, partial: &mut Partial, piece: &[u8], ends: bool) {
        if partial.cut {
            // The rest of a line that was logged cut.
            partial.cut = !ends;
            return;
        }
        let room = MAX_LINE - partial.line.len();
        if piece.len() > room {
            partial.line.extend_from_slice(&piece[..room]);
            self.emit(&partial.line, true);
            partial.line.clear();
            partial.cut = !ends;
        } else if ends && partial.line.is_empty() {
            self.emit(piece, false);
        } else {
            partial.line.extend_from_slice(piece);
            if ends {
                self.emit(&partial.line, false);
                partial.line.clear();
            }
        }
    }

    /// Logs a last line that had no `\n` (at the end of a call that trapped, or on drop).
    pub fn flush_partial(&self) {
        let mut partial = self.partial.lock().unwrap_or_else(|e| e.into_inner());
        if !partial.line.is_empty() {
            self.emit(&partial.line, false);
            partial.line.clear();
        }
        partial.cut = false;
    }
}

/// What ends a line cut at [`MAX_LINE`].
fn cut_marker() -> String {
    format!("… (cut at {MAX_LINE} bytes)")
}

/// Cuts a `log` message at [`MAX_LINE`] bytes (on a character boundary), marking the cut.
fn cut_message(mut message: String) -> String {
    if message.len() > MAX_LINE {
        message.truncate(message.floor_char_boundary(MAX_LINE));
        message.push_str(&cut_marker());
    }
    message
}

impl IsTerminal for LineStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LineStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for LineStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LineStream {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LineStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The guest's clocks: the Unix epoch, forever.
pub(crate) struct FixedClock;

impl HostWallClock for FixedClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }

    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FixedClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        0
    }
}

/// The memory cap of one instance: the sum of its linear memories.
#[derive(Debug)]
pub(crate) struct MemoryCap {
    cap: usize,
    used: usize,
    /// Set when a growth was refused; read and cleared around every call.
    pub hit: bool,
}

/// Table elements an instance may grow to (the pooling allocator bounds them too).
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl MemoryCap {
    pub fn new(cap: usize) -> Self {
        MemoryCap {
            cap,
            used: 0,
            hit: false,
        }
    }
}

impl wasmtime::ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let more = desired.saturating_sub(current);
        let total = self.used.saturating_add(more);
        if total > self.cap {
            self.hit = true;
            wasmtime::bail!("memory cap of {} bytes reached", self.cap);
        }
        self.used = total;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        // The pool's slot is smaller than the growth: the runtime ceiling is the cap here.
        self.hit = true;
        Err(error.context("memory growth failed"))
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// The data of every plugin store.
pub(crate) struct HostState {
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub cap: MemoryCap,
    pub log: Arc<GuestLog>,
    pub stdout: LineStream,
    pub stderr: LineStream,
    /// The stage's config values, as `init` received them.
    pub config: Vec<(String, String)>,
}

impl HostState {
    pub fn new(log: Arc<GuestLog>, config: Vec<(String, String)>, memory_cap: usize) -> Self {
        let stdout = LineStream::new(log.clone(), false);
        let stderr = LineStream::new(log.clone(), true);
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .wall_clock(FixedClock)
            .monotonic_clock(FixedClock)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        HostState {
            wasi,
            table: ResourceTable::new(),
            cap: MemoryCap::new(memory_cap),
            log,
            stdout,
            stderr,
            config,
        }
    }

    /// Logs what is left of unfinished stdout/stderr lines.
    pub fn flush_output(&self) {
        self.stdout.flush_partial();
        self.stderr.flush_partial();
    }
}

impl Drop for HostState {
    fn drop(&mut self) {
        self.flush_output();
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::host::Host for HostState {
    fn log(&mut self, level: bindings::host::Level, message: String) {
        use bindings::host::Level as L;
        let level = match level {
            L::Trace => Level::Trace,
            L::Debug => Level::Debug,
            L::Info => Level::Info,
            L::Warn => Level::Warn,
            L::Error => Level::Error,
        };
        // One event per call, even for a multi-line message (a panic message with its
        // location, a backtrace): it is one thing the guest said.
        let message = cut_message(message);
        if level == Level::Error {
            self.log.remembered_line(level, &message);
        } else {
            self.log.line(level, &message);
        }
    }

    fn config(&mut self) -> Vec<(String, String)> {
        self.config.clone()
    }
}

/// The monotonic clock the guest is linked against, replacing wasmtime-wasi's: reads zero, and
/// a subscription is ready at once (so `sleep` returns at once instead of blocking the worker).
pub(crate) struct FixedMonotonic<'a> {
    table: &'a mut ResourceTable,
}

/// [`HasData`] for [`FixedMonotonic`].
pub(crate) struct FixedMonotonicData;

impl HasData for FixedMonotonicData {
    type Data<'a> = FixedMonotonic<'a>;
}

impl FixedMonotonic<'_> {
    /// The clock's view of a store's data.
    pub fn of(state: &mut HostState) -> FixedMonotonic<'_> {
        FixedMonotonic {
            table: &mut state.table,
        }
    }

    fn ready(&mut self) -> wasmtime::Result<Resource<DynPollable>> {
        let ready = self.table.push(Ready)?;
        wasmtime_wasi::p2::subscribe(self.table, ready)
    }
}

/// A pollable that is always ready.
struct Ready;

#[wasmtime_wasi::async_trait]
impl Pollable for Ready {
    async fn ready(&mut self) {}
}

impl monotonic_clock::Host for FixedMonotonic<'_> {
    fn now(&mut self) -> wasmtime::Result<monotonic_clock::Instant> {
        Ok(0)
    }

    fn resolution(&mut self) -> wasmtime::Result<monotonic_clock::Duration> {
        Ok(1)
    }

    fn subscribe_instant(
        &mut self,
        _when: monotonic_clock::Instant,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        self.ready()
    }

    fn subscribe_duration(
        &mut self,
        _duration: monotonic_clock::Duration,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        self.ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> Arc<GuestLog> {
        Arc::new(GuestLog::new(Tags {
            plugin: "p".into(),
            version: "v".into(),
            stage: "s".into(),
        }))
    }

    fn recent(log: &GuestLog) -> Vec<String> {
        log.recent().iter().cloned().collect()
    }

    #[test]
    fn output_is_cut_into_lines() {
        let log = log();
        let stderr = LineStream::new(log.clone(), true);
        stderr.push(b"one\ntw");
        assert_eq!(recent(&log), ["one"]);
        stderr.push(b"o\r\nthree");
        assert_eq!(recent(&log), ["one", "two"]);
        stderr.flush_partial();
        assert_eq!(recent(&log), ["one", "two", "three"]);
        stderr.flush_partial();
        assert_eq!(recent(&log).len(), 3);
        // stdout is logged, not kept for panic messages.
        LineStream::new(log.clone(), false).push(b"hello\n");
        assert_eq!(recent(&log).len(), 3);
    }

    fn cut(line: &str) -> String {
        format!("{line}… (cut at 8192 bytes)")
    }

    #[test]
    fn long_lines_are_cut_and_recent_lines_are_bounded() {
        let log = log();
        let stderr = LineStream::new(log.clone(), true);
        stderr.push(&vec![b'x'; MAX_LINE + 10]);
        assert_eq!(recent(&log), [cut(&"x".repeat(MAX_LINE))]);
        // The rest of the cut line is dropped up to its `\n`.
        stderr.push(b"xxxx\nnext\n");
        assert_eq!(
            recent(&log),
            [cut(&"x".repeat(MAX_LINE)), "next".to_owned()]
        );
        log.start_call();
        for i in 0..RECENT_LINES + 5 {
            stderr.push(format!("line {i}\n").as_bytes());
        }
        let kept = recent(&log);
        assert_eq!(kept.len(), RECENT_LINES);
        assert_eq!(kept.last().map(String::as_str), Some("line 20"));
        log.start_call();
        assert!(recent(&log).is_empty());
    }

    #[test]
    fn a_long_line_inside_one_write_is_cut() {
        let log = log();
        let stderr = LineStream::new(log.clone(), true);
        let mut write = vec![b'y'; MAX_LINE + 100];
        write.extend_from_slice(b"\nshort\n");
        stderr.push(&write);
        assert_eq!(
            recent(&log),
            [cut(&"y".repeat(MAX_LINE)), "short".to_owned()]
        );
    }

    #[test]
    fn a_long_line_over_several_writes_is_cut_once() {
        let log = log();
        let stderr = LineStream::new(log.clone(), true);
        stderr.push(&vec![b'a'; MAX_LINE - 5]);
        stderr.push(b"bbbbbbbbbb");
        stderr.push(b"cccc\nafter");
        stderr.flush_partial();
        let line = format!("{}bbbbb", "a".repeat(MAX_LINE - 5));
        assert_eq!(recent(&log), [cut(&line), "after".to_owned()]);
        // Exactly MAX_LINE bytes is not cut.
        log.start_call();
        stderr.push(&vec![b'z'; MAX_LINE]);
        stderr.push(b"\n");
        assert_eq!(recent(&log), ["z".repeat(MAX_LINE)]);
    }

    #[test]
    fn long_log_messages_are_cut() {
        use bindings::host::{Host, Level as L};
        let log = log();
        let mut state = HostState::new(log.clone(), Vec::new(), 1 << 20);
        // 3-byte characters: the cut falls inside one and moves back to its start.
        state.log(L::Error, "€".repeat(MAX_LINE));
        let kept = recent(&log);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0], cut(&"€".repeat(MAX_LINE / 3)));
        state.log(L::Error, "short".to_owned());
        assert_eq!(recent(&log)[1], "short");
    }

    #[test]
    fn memory_cap_counts_every_memory_of_the_instance() {
        use wasmtime::ResourceLimiter;
        let mut cap = MemoryCap::new(100);
        assert!(cap.memory_growing(0, 60, None).is_ok_and(|ok| ok));
        assert!(cap.memory_growing(0, 40, None).is_ok_and(|ok| ok));
        assert!(!cap.hit);
        assert!(cap.memory_growing(40, 41, None).is_err());
        assert!(cap.hit);
    }

    #[test]
    fn panic_message_of_the_default_hook() {
        let lines = [
            "",
            "thread '<unnamed>' panicked at plugins/panic_on_mark/src/lib.rs:12:9:",
            "poison event",
            "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace",
        ];
        assert_eq!(
            panic_message(&lines).as_deref(),
            Some("panicked at plugins/panic_on_mark/src/lib.rs:12:9: poison event")
        );
    }

    #[test]
    fn panic_message_of_a_one_line_hook() {
        assert_eq!(
            panic_message(&["panicked at src/lib.rs:3:5: boom"]).as_deref(),
            Some("panicked at src/lib.rs:3:5: boom")
        );
        assert_eq!(
            panic_message(&["other", "panicked: boom"]).as_deref(),
            Some("panicked: boom")
        );
        assert_eq!(panic_message(&["nothing to see"]), None);
        assert_eq!(panic_message(&[]), None);
    }
}
