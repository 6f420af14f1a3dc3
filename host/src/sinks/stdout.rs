//! The stdout destination: one JSON line per event (`weir_format::json`) on the router's
//! standard output.
//!
//! A send renders all of its lines, writes them under one lock of standard output (so lines of
//! other writers never interleave with them) and flushes before it succeeds. Like the file
//! destination, rendering and writing run on the sink's own thread (`io_thread.rs`): a slow
//! reader holds this sink, not a worker.
//!
//! A failed write (a broken pipe: whatever read weir's standard output has gone; a full disk
//! under a redirection) is [`SendError::Retry`]. If it failed in the middle of a line, the
//! rest of that line is written first on the next send, before the resent lines, so the
//! output never holds a torn line (at least once: lines written before the failure are
//! written again).

use super::io_thread::IoThread;
use super::{Destination, OpenError, Outgoing, SendError, SendFuture};
use std::io::{self, Write};

/// Writes events as JSON lines to standard output.
pub struct StdoutDestination {
    writer: IoThread<StdoutWriter>,
}

impl std::fmt::Debug for StdoutDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StdoutDestination")
    }
}

/// What the sink's thread keeps between sends.
#[derive(Debug, Default)]
struct StdoutWriter {
    /// The rendered lines of the send in progress (kept to reuse its allocation).
    lines: Vec<u8>,
    /// The rest of a line a failed write cut, written before anything else.
    torn: Vec<u8>,
}

impl StdoutDestination {
    /// A destination writing to the router's standard output, for sink `name`.
    pub fn open(name: &str) -> Result<StdoutDestination, OpenError> {
        let writer = IoThread::spawn(name, StdoutWriter::default()).map_err(|e| OpenError {
            sink: name.to_owned(),
            what: "stdout".into(),
            message: format!("cannot start its thread: {e}"),
        })?;
        Ok(StdoutDestination { writer })
    }
}

impl StdoutWriter {
    /// Renders `batch` and writes it to `out`, completing a line an earlier failure cut.
    fn deliver(&mut self, out: &mut impl Write, batch: &[Outgoing]) -> Result<(), SendError> {
        self.lines.clear();
        for outgoing in batch {
            for line in outgoing.json_lines() {
                self.lines.extend_from_slice(line);
            }
        }
        if self.lines.is_empty() && self.torn.is_empty() {
            return Ok(());
        }
        write_lines(out, &mut self.torn, &self.lines).map_err(|e| {
            let mut message = format!("stdout: cannot write: {e}");
            if e.kind() == io::ErrorKind::BrokenPipe {
                message.push_str(" (whatever reads weir's standard output has closed it)");
            }
            SendError::Retry(message)
        })
    }
}

impl Destination for StdoutDestination {
    fn describe(&self) -> String {
        "stdout".into()
    }

    fn send<'a>(&'a mut self, batch: &'a [Outgoing]) -> SendFuture<'a> {
        let batch = batch.to_vec();
        Box::pin(async move {
            let delivered = self
                .writer
                .run(move |w| w.deliver(&mut io::stdout().lock(), &batch))
                .await;
            delivered.unwrap_or_else(|| {
                Err(SendError::Retry("stdout: its writer thread stopped".into()))
            })
        })
    }
}

/// Writes `torn` (the rest of a line an earlier failure cut), then `lines`, then flushes. If
/// a write fails in the middle of a line, `torn` is left holding the rest of that line.
fn write_lines(out: &mut impl Write, torn: &mut Vec<u8>, lines: &[u8]) -> io::Result<()> {
    if let Err((written, e)) = write_counted(out, torn) {
        torn.drain(..written);
        return Err(e);
    }
    torn.clear();
    if let Err((written, e)) = write_counted(out, lines) {
        if written > 0 && lines[written - 1] != b'\n' {
            let end = lines[written..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(lines.len(), |i| written + i + 1);
            torn.extend_from_slice(&lines[written..end]);
        }
        return Err(e);
    }
    out.flush()
}

/// Writes all of `bytes`; on failure, says how many were written (taken by `out`) before it.
fn write_counted(out: &mut impl Write, bytes: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut written = 0;
    while written < bytes.len() {
        match out.write(&bytes[written..]) {
            Ok(0) => return Err((written, io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((written, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::{Selection, SharedBatch};
    use std::sync::Arc;
    use weir_format::{BatchBuilder, Event};

    fn outgoing(values: &[&str], selection: Selection) -> Outgoing {
        let mut b = BatchBuilder::new();
        for (i, v) in values.iter().enumerate() {
            b.push(&Event::new(*v, i as i64));
        }
        let batch = SharedBatch::verify(b.finish()).expect("built batches verify");
        Outgoing::new(batch, selection, "p".into())
    }

    /// Takes `room` more bytes, then fails with `error`.
    struct Pipe {
        data: Vec<u8>,
        room: usize,
        error: io::ErrorKind,
        flushes: usize,
    }

    impl Pipe {
        fn new(room: usize, error: io::ErrorKind) -> Pipe {
            Pipe {
                data: Vec::new(),
                room,
                error,
                flushes: 0,
            }
        }
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(self.error.into());
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.data.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            self.flushes += 1;
            Ok(())
        }
    }

    #[test]
    fn a_selection_is_written_as_json_lines_and_flushed_once_per_send() {
        assert_eq!(
            StdoutDestination::open("console").expect("open").describe(),
            "stdout"
        );
        let mut dest = StdoutWriter::default();
        let mut out = Pipe::new(usize::MAX, io::ErrorKind::Other);
        let first = outgoing(&["1", "two", "[3]"], Selection::Some(Arc::from([0, 2])));
        let second = outgoing(&["{\"x\":true}"], Selection::All);
        dest.deliver(&mut out, &[first, second]).expect("deliver");
        assert_eq!(
            String::from_utf8(out.data).expect("utf-8"),
            "{\"value\":1,\"timestamp_ms\":0}\n\
             {\"value\":[3],\"timestamp_ms\":2}\n\
             {\"value\":{\"x\":true},\"timestamp_ms\":0}\n"
        );
        assert_eq!(out.flushes, 1);
    }

    #[test]
    fn a_broken_pipe_is_retried_and_never_leaves_a_torn_line() {
        let mut dest = StdoutWriter::default();
        let batch = [outgoing(&["1", "2"], Selection::All)];
        let one = "{\"value\":1,\"timestamp_ms\":0}\n";
        let two = "{\"value\":2,\"timestamp_ms\":1}\n";
        // Room for the first line and five bytes of the second.
        let mut out = Pipe::new(one.len() + 5, io::ErrorKind::BrokenPipe);
        let e = dest.deliver(&mut out, &batch).expect_err("the pipe breaks");
        assert_eq!(
            e,
            SendError::Retry(format!(
                "stdout: cannot write: {} (whatever reads weir's standard output has closed it)",
                io::Error::from(io::ErrorKind::BrokenPipe)
            ))
        );
        assert_eq!(out.flushes, 0);
        // The resend completes the cut line first, then writes the whole send again.
        out.room = 3;
        dest.deliver(&mut out, &batch).expect_err("broken again");
        out.room = usize::MAX;
        dest.deliver(&mut out, &batch).expect("room again");
        assert_eq!(
            String::from_utf8(out.data).expect("utf-8"),
            format!("{one}{two}{one}{two}")
        );
        assert_eq!(out.flushes, 1);
    }

    #[test]
    fn a_failure_at_a_line_boundary_leaves_nothing_to_complete() {
        let mut torn = Vec::new();
        let mut out = Pipe::new(2, io::ErrorKind::Other);
        write_lines(&mut out, &mut torn, b"a\nb\n").expect_err("no room");
        assert!(torn.is_empty());
        out.room = usize::MAX;
        write_lines(&mut out, &mut torn, b"a\nb\n").expect("room");
        assert_eq!(out.data, b"a\na\nb\n");
    }
}
