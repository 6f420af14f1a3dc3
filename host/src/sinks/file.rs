//! The file sink: one JSON line per event (`weir_format::json`), appended to a file.

use super::{Sink, SinkError};
use crate::config::Fsync;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use weir_format::Batch;
use weir_format::json::event_ref_to_line;

/// Appends events as JSON lines. Lines are rendered into a buffer on [`Sink::write`] and
/// written, flushed and (with [`Fsync::OnAck`]) synced on [`Sink::flush`].
#[derive(Debug)]
pub struct FileSink {
    name: String,
    path: PathBuf,
    file: File,
    fsync: Fsync,
    /// Lines not yet written to the file.
    pending: Vec<u8>,
    /// Bytes of `pending` already written (a failed flush continues from here).
    written: usize,
    /// Whether the file has data not synced yet.
    unsynced: bool,
    events: u64,
}

impl FileSink {
    /// Opens (creating it and its directory if needed) `path` for appending.
    pub fn open(name: &str, path: &Path, fsync: Fsync) -> Result<FileSink, SinkError> {
        let open_error = |source| SinkError::Open {
            sink: name.to_owned(),
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(open_error)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(open_error)?;
        Ok(FileSink {
            name: name.to_owned(),
            path: path.to_path_buf(),
            file,
            fsync,
            pending: Vec::new(),
            written: 0,
            unsynced: false,
            events: 0,
        })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io_error(&self, action: &'static str, source: std::io::Error) -> SinkError {
        SinkError::Io {
            sink: self.name.clone(),
            action,
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Appends one line (no newline in `line`) to the pending buffer.
    pub fn write_line(&mut self, line: &str) {
        self.pending.extend_from_slice(line.as_bytes());
        self.pending.push(b'\n');
    }
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn write(&mut self, batch: &Batch<'_>) -> Result<(), SinkError> {
        for event in batch.iter() {
            let line = event_ref_to_line(&event);
            self.write_line(&line);
        }
        self.events += batch.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        while self.written < self.pending.len() {
            match self.file.write(&self.pending[self.written..]) {
                Ok(0) => {
                    return Err(self.io_error(
                        "write",
                        std::io::Error::new(std::io::ErrorKind::WriteZero, "wrote 0 bytes"),
                    ));
                }
                Ok(n) => {
                    self.written += n;
                    self.unsynced = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error("write", e)),
            }
        }
        self.pending.clear();
        self.written = 0;
        if self.unsynced && self.fsync == Fsync::OnAck {
            self.file
                .sync_data()
                .map_err(|e| self.io_error("sync", e))?;
        }
        self.unsynced = false;
        Ok(())
    }

    fn events(&self) -> u64 {
        self.events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_format::{Event, encode};

    #[test]
    fn lines_reach_the_file_on_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/out.jsonl");
        let mut sink = FileSink::open("out", &path, Fsync::OnAck).expect("open");
        let batch = encode(&[Event::new("{\"a\":1}", 5).with_key("k")]);
        sink.write(&Batch::verify(&batch).expect("batch"))
            .expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "");
        sink.flush().expect("flush");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "{\"key\":\"k\",\"value\":{\"a\":1},\"timestamp_ms\":5}\n"
        );
        assert_eq!(sink.events(), 1);
    }

    #[test]
    fn open_errors_name_the_sink_and_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "x").expect("write");
        let e = FileSink::open("out", &blocker.join("x.jsonl"), Fsync::Never)
            .expect_err("a file is not a directory");
        assert!(
            e.to_string()
                .starts_with(&format!("sink `out`: cannot open {}", blocker.display())),
            "{e}"
        );
    }
}
