//! The file destination: one JSON line per event (`weir_format::json`), appended to a file.
//!
//! - **Writes.** A send renders all of its events, writes them with one `write_all` at the end
//!   of the file and, with `fsync = "on_ack"`, syncs the data (`fdatasync`) before it succeeds.
//!   Rendering and writing run on the sink's own thread (`io_thread.rs`), so a slow disk (an
//!   `fsync` can take tens of milliseconds) or a stalled FIFO holds this sink and never a
//!   worker that other tasks need, and sinks render their lines in parallel.
//! - **No torn lines.** The destination remembers the length of the file after its last whole
//!   send. A write that fails part way is cut back to that length before the send returns
//!   [`SendError::Retry`], and the runner sends the same events again. If even the cut fails,
//!   the file is closed and reopened before the next write, and opening a file cuts off
//!   anything after its last newline (a line torn by a crash or a failed cut; its events were
//!   not acknowledged, so their producer sends them again). Delivery is at least once: events
//!   whose lines were written and synced but whose send still failed are written again.
//! - **Rotation.** Before each send, the file is rotated if it holds at least `rotate_bytes`
//!   bytes or was opened at least `rotate_interval` ago (an empty file is never rotated, and an
//!   idle sink rotates at its next send, not on a timer). Rotating renames `PATH` to
//!   `PATH.<UTC time of the rotation>`, e.g. `out.jsonl.20261122T014502.123Z` (basic ISO 8601,
//!   milliseconds); if that name is taken, `.1`, `.2`, ... is appended
//!   (`out.jsonl.20261122T014502.123Z.1`), so the names sort in rotation order while the
//!   clock moves forward. A fresh `PATH` is then opened and, with `on_ack`, the directory is
//!   synced so the rename and the new file survive a power loss. A send's lines are never
//!   split across files. Rotated files are never deleted by weir.

use super::io_thread::IoThread;
use super::{Destination, OpenError, Outgoing, SendError, SendFuture};

use serde::Deserialize;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// `type = "file"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileConfig {
    /// The file (resolved against the config file's directory).
    pub path: PathBuf,
    /// When the file is synced to disk.
    pub fsync: Fsync,
    /// Rotate once the file holds at least this many bytes.
    pub rotate_bytes: Option<u64>,
    /// Rotate once the file is this old.
    pub rotate_interval: Option<Duration>,
}

/// When a file sink syncs its file to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    /// Before a send counts as delivered (the default); with `when_full = "block"` that is
    /// before the ack, so an acked batch survives a power loss.
    OnAck,
    /// Never explicitly: delivered lines are in the OS page cache (they survive a crash of
    /// weir, not of the machine).
    Never,
}

/// Bytes read at a time when looking for the last newline of a file being opened.
const TAIL_CHUNK: usize = 8 * 1024;

/// Appends events as JSON lines to a file, rotating it by size or age.
pub struct FileDestination {
    name: String,
    path: PathBuf,
    fsync: Fsync,
    writer: IoThread<FileWriter>,
}

impl std::fmt::Debug for FileDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileDestination")
            .field("name", &self.name)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The file's state, owned by the sink's thread.
#[derive(Debug)]
struct FileWriter {
    name: String,
    path: PathBuf,
    fsync: Fsync,
    rotate_bytes: Option<u64>,
    rotate_interval: Option<Duration>,
    /// The open file; `None` after a failure that left its state unknown (reopened on the next
    /// send) or after a rotation that could not open the new file.
    current: Option<Current>,
    /// The rendered lines of the send in progress (kept to reuse its allocation).
    lines: Vec<u8>,
}

/// The file being appended to.
#[derive(Debug)]
struct Current {
    file: File,
    /// The length after the last whole send: the file holds only whole lines up to here.
    len: u64,
    opened: Instant,
}

impl FileDestination {
    /// Opens the file `config` names for sink `name`, creating it and its directory if needed.
    /// A line torn by a crash at the end of an existing file is cut off.
    pub fn open(name: &str, config: &FileConfig) -> Result<FileDestination, OpenError> {
        let error = |message| OpenError {
            sink: name.to_owned(),
            what: format!("file {}", config.path.display()),
            message,
        };
        let writer = FileWriter::open(name, config).map_err(error)?;
        let writer = IoThread::spawn(name, writer)
            .map_err(|e| error(format!("cannot start its thread: {e}")))?;
        Ok(FileDestination {
            name: name.to_owned(),
            path: config.path.clone(),
            fsync: config.fsync,
            writer,
        })
    }
}

impl FileWriter {
    fn open(name: &str, config: &FileConfig) -> Result<FileWriter, String> {
        let current = open_current(&config.path, config.fsync)?;
        Ok(FileWriter {
            name: name.to_owned(),
            path: config.path.clone(),
            fsync: config.fsync,
            rotate_bytes: config.rotate_bytes,
            rotate_interval: config.rotate_interval,
            current: Some(current),
            lines: Vec::new(),
        })
    }

    /// Writes (and, with `on_ack`, syncs) the rendered lines of one send.
    fn send_blocking(&mut self, batch: &[Outgoing]) -> Result<(), SendError> {
        self.lines.clear();
        for out in batch {
            for line in out.json_lines() {
                self.lines.extend_from_slice(line);
            }
        }
        if self.lines.is_empty() {
            return Ok(());
        }
        if self.current.as_ref().is_some_and(|c| self.due(c)) {
            self.rotate()?;
        }
        let (name, path) = (&self.name, &self.path);
        let current = match self.current.take() {
            Some(current) => current,
            None => {
                open_current(path, self.fsync).map_err(|m| retry(name, path, "cannot open", m))?
            }
        };
        let current = self.current.insert(current);
        match append(&mut current.file, current.len, &self.lines) {
            Ok(()) => current.len += self.lines.len() as u64,
            Err(AppendError::Write(e)) => {
                return Err(retry(
                    name,
                    path,
                    "cannot write",
                    format!("{e} (cut back to its last whole line)"),
                ));
            }
            Err(AppendError::Cut { write, cut }) => {
                self.current = None;
                return Err(retry(
                    name,
                    path,
                    "cannot write",
                    format!(
                        "{write}; cutting it back to its last whole line also failed: {cut} \
                         (it is reopened and repaired before the next write)"
                    ),
                ));
            }
        }
        if self.fsync == Fsync::OnAck {
            current
                .file
                .sync_data()
                .map_err(|e| retry(name, path, "cannot sync", e.to_string()))?;
        }
        Ok(())
    }

    /// Whether `current` is due for rotation.
    fn due(&self, current: &Current) -> bool {
        current.len > 0
            && (self.rotate_bytes.is_some_and(|max| current.len >= max)
                || self
                    .rotate_interval
                    .is_some_and(|age| current.opened.elapsed() >= age))
    }

    /// Renames the file to its rotated name and opens a fresh one.
    fn rotate(&mut self) -> Result<(), SendError> {
        let rotated = rotated_name(&self.path, SystemTime::now());
        std::fs::rename(&self.path, &rotated).map_err(|e| {
            retry(
                &self.name,
                &self.path,
                "cannot rotate",
                format!("renaming it to {}: {e}", rotated.display()),
            )
        })?;
        self.current = None;
        let current = open_current(&self.path, self.fsync)
            .map_err(|m| retry(&self.name, &self.path, "cannot open", m))?;
        self.current = Some(current);
        Ok(())
    }
}

impl Destination for FileDestination {
    fn describe(&self) -> String {
        let fsync = match self.fsync {
            Fsync::OnAck => "fsync on ack",
            Fsync::Never => "no fsync",
        };
        format!("file {} ({fsync})", self.path.display())
    }

    fn send<'a>(&'a mut self, batch: &'a [Outgoing]) -> SendFuture<'a> {
        let batch = batch.to_vec();
        Box::pin(async move {
            match self.writer.run(move |w| w.send_blocking(&batch)).await {
                Some(result) => result,
                None => Err(retry(
                    &self.name,
                    &self.path,
                    "cannot write",
                    "its writer thread stopped".into(),
                )),
            }
        })
    }
}

/// A retryable error naming the sink and the file.
fn retry(name: &str, path: &Path, what: &str, message: String) -> SendError {
    SendError::Retry(format!(
        "sink `{name}`: {what} file {}: {message}",
        path.display()
    ))
}

/// Creates the directory of `path` and opens `path` for appending, cutting off a torn last
/// line; with `on_ack`, syncs the directory (a new file's entry, a rotation's rename). The
/// error says what failed, without the sink or the file (the caller names them).
fn open_current(path: &Path, fsync: Fsync) -> Result<Current, String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    crate::files::create_dir_all(dir)
        .map_err(|e| format!("creating its directory {}: {e}", dir.display()))?;
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| e.to_string())?;
    let len = cut_torn_tail(&mut file).map_err(|e| format!("cutting a torn last line off: {e}"))?;
    if fsync == Fsync::OnAck {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("syncing its directory {}: {e}", dir.display()))?;
    }
    Ok(Current {
        file,
        len,
        opened: Instant::now(),
    })
}

/// Cuts off whatever follows the last newline of `file` (a line torn by a crash or a failed
/// write) and returns the length left.
fn cut_torn_tail(file: &mut File) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let mut end = len;
    let mut chunk = vec![0; TAIL_CHUNK];
    while end > 0 {
        let start = end.saturating_sub(TAIL_CHUNK as u64);
        let part = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(part)?;
        if let Some(i) = part.iter().rposition(|&b| b == b'\n') {
            end = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if end < len {
        file.set_len(end)?;
        tracing::warn!(
            "cut a torn last line of {} bytes off the end of a file being opened",
            len - end
        );
    }
    Ok(end)
}

/// Something appended to: a [`File`], or in tests a writer that fails on purpose.
trait Append: Write {
    /// Cuts the contents back to `len` bytes.
    fn cut(&mut self, len: u64) -> io::Result<()>;
}

impl Append for File {
    fn cut(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
}

/// Why [`append`] failed.
#[derive(Debug)]
enum AppendError {
    /// The write failed and the output was cut back to its last whole line.
    Write(io::Error),
    /// The write failed and so did the cut: the output may end with a torn line.
    Cut { write: io::Error, cut: io::Error },
}

/// Writes `lines` at the end of `out`, whose whole lines end at `good`; if the write fails
/// part way, cuts `out` back to `good` so no torn line is left.
fn append(out: &mut impl Append, good: u64, lines: &[u8]) -> Result<(), AppendError> {
    let Err(write) = out.write_all(lines) else {
        return Ok(());
    };
    match out.cut(good) {
        Ok(()) => Err(AppendError::Write(write)),
        Err(cut) => Err(AppendError::Cut { write, cut }),
    }
}

/// `PATH.<UTC time>`, with `.1`, `.2`, ... appended if that name is taken.
fn rotated_name(path: &Path, now: SystemTime) -> PathBuf {
    let mut base = OsString::from(path.as_os_str());
    base.push(".");
    base.push(crate::utc::Utc::of(now).compact());
    let free = |p: &Path| std::fs::symlink_metadata(p).is_err();
    let first = PathBuf::from(&base);
    if free(&first) {
        return first;
    }
    (1u64..)
        .map(|n| {
            let mut name = base.clone();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        })
        .find(|p| free(p))
        .unwrap_or(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::{Selection, SharedBatch};
    use std::sync::Arc;
    use weir_format::{BatchBuilder, Event};

    fn config(path: &Path, fsync: Fsync) -> FileConfig {
        FileConfig {
            path: path.to_path_buf(),
            fsync,
            rotate_bytes: None,
            rotate_interval: None,
        }
    }

    /// A batch of events `first..first + n` with values `{"n":i}` and timestamps `i`.
    fn numbered(first: usize, n: usize) -> Outgoing {
        let mut b = BatchBuilder::new();
        for i in first..first + n {
            b.push(&Event::new(format!("{{\"n\":{i}}}"), i as i64));
        }
        let batch = SharedBatch::verify(b.finish()).expect("built batches verify");
        Outgoing::all(batch, "p".into())
    }

    fn line(i: usize) -> String {
        format!("{{\"value\":{{\"n\":{i}}},\"timestamp_ms\":{i}}}\n")
    }

    fn lines(range: std::ops::Range<usize>) -> String {
        range.map(line).collect()
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).expect("read the file")
    }

    /// The files in `dir`, sorted by name.
    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("read the directory")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_selection_is_written_as_exact_json_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/out.jsonl");
        let mut dest = FileDestination::open("out", &config(&path, Fsync::OnAck)).expect("open");
        assert_eq!(
            dest.describe(),
            format!("file {} (fsync on ack)", path.display())
        );
        let mut b = BatchBuilder::new();
        b.push(&Event::new("{\"a\":1}", 5).with_key("k"));
        b.push(&Event::new("skipped", 6));
        b.push(
            &Event::new("plain text", 7)
                .with_header("h", "v")
                .with_route("audit"),
        );
        let batch = SharedBatch::verify(b.finish()).expect("verify");
        let out = Outgoing::new(batch, Selection::Some(Arc::from([0, 2])), "p".into());
        dest.send(std::slice::from_ref(&out)).await.expect("send");
        dest.send(&[out]).await.expect("send again");
        let expected = concat!(
            "{\"key\":\"k\",\"value\":{\"a\":1},\"timestamp_ms\":5}\n",
            "{\"value_text\":\"plain text\",\"timestamp_ms\":7,",
            "\"headers\":{\"h\":\"v\"},\"route\":\"audit\"}\n",
        );
        assert_eq!(read(&path), expected.repeat(2));
    }

    #[tokio::test]
    async fn an_existing_file_is_appended_to_after_its_torn_last_line_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, format!("{}{{\"value\":{{\"n\"", line(0))).expect("write");
        let mut dest = FileDestination::open("out", &config(&path, Fsync::Never)).expect("open");
        assert_eq!(read(&path), line(0));
        dest.send(&[numbered(1, 2)]).await.expect("send");
        assert_eq!(read(&path), lines(0..3));

        std::fs::write(&path, "no newline at all").expect("write");
        let mut dest = FileDestination::open("out", &config(&path, Fsync::Never)).expect("open");
        assert_eq!(read(&path), "");
        dest.send(&[numbered(0, 1)]).await.expect("send");
        assert_eq!(read(&path), line(0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rotation_by_size_splits_files_between_whole_sends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.jsonl");
        let cfg = FileConfig {
            // Every line of events 0..10 is the same length: rotate once three lines are in.
            rotate_bytes: Some(3 * line(0).len() as u64),
            ..config(&path, Fsync::OnAck)
        };
        let mut dest = FileDestination::open("out", &cfg).expect("open");
        // Sends of two events: 2 lines, 4 lines (rotate), 2, 4 (rotate), 2.
        for i in 0..5 {
            dest.send(&[numbered(2 * i, 2)]).await.expect("send");
        }
        let names = files(dir.path());
        assert_eq!(names.len(), 3, "{names:?}");
        assert_eq!(names[0], "out.jsonl");
        for rotated in &names[1..] {
            let stamp = rotated
                .strip_prefix("out.jsonl.")
                .expect("rotated files are named after the file");
            let (stamp, counter) = stamp.split_at(20);
            assert!(counter.is_empty() || counter == ".1", "{rotated}");
            assert_eq!(stamp.len(), 20, "{rotated}");
            assert_eq!(&stamp[8..9], "T", "{rotated}");
            assert_eq!(&stamp[15..16], ".", "{rotated}");
            assert!(stamp.ends_with('Z'), "{rotated}");
        }
        assert_eq!(read(&dir.path().join(&names[1])), lines(0..4));
        assert_eq!(read(&dir.path().join(&names[2])), lines(4..8));
        assert_eq!(read(&path), lines(8..10));
    }

    #[tokio::test]
    async fn rotation_by_interval_starts_a_new_file_for_a_later_send() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.jsonl");
        let cfg = FileConfig {
            rotate_interval: Some(Duration::from_millis(1)),
            ..config(&path, Fsync::Never)
        };
        let mut dest = FileDestination::open("out", &cfg).expect("open");
        dest.send(&[numbered(0, 3)]).await.expect("send");
        std::thread::sleep(Duration::from_millis(5));
        dest.send(&[numbered(3, 1)]).await.expect("send");
        let names = files(dir.path());
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(read(&dir.path().join(&names[1])), lines(0..3));
        assert_eq!(read(&path), lines(3..4));
    }

    #[test]
    fn a_rotated_name_that_is_taken_gets_a_counter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.jsonl");
        let at = std::time::UNIX_EPOCH + Duration::from_millis(1_795_311_902_123);
        let first = rotated_name(&path, at);
        assert_eq!(first, dir.path().join("out.jsonl.20261122T014502.123Z"));
        std::fs::write(&first, "").expect("write");
        let second = rotated_name(&path, at);
        assert_eq!(second, dir.path().join("out.jsonl.20261122T014502.123Z.1"));
        std::fs::write(&second, "").expect("write");
        assert_eq!(
            rotated_name(&path, at),
            dir.path().join("out.jsonl.20261122T014502.123Z.2")
        );
    }

    /// A writer that takes `room` more bytes, then fails; `cut` fails if `cut_fails`.
    struct Failing {
        data: Vec<u8>,
        room: usize,
        cut_fails: bool,
    }

    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::from_raw_os_error(28));
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.data.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Append for Failing {
        fn cut(&mut self, len: u64) -> io::Result<()> {
            if self.cut_fails {
                return Err(io::Error::from_raw_os_error(5));
            }
            self.data.truncate(len as usize);
            Ok(())
        }
    }

    #[test]
    fn a_write_that_fails_half_way_is_cut_back_to_the_last_whole_line() {
        let mut out = Failing {
            data: b"a\n".to_vec(),
            room: 3,
            cut_fails: false,
        };
        let e = append(&mut out, 2, b"bb\ncc\n").expect_err("no room");
        assert!(
            matches!(&e, AppendError::Write(w) if w.raw_os_error() == Some(28)),
            "{e:?}"
        );
        assert_eq!(out.data, b"a\n");
        out.room = 100;
        append(&mut out, 2, b"bb\ncc\n").expect("room again");
        assert_eq!(out.data, b"a\nbb\ncc\n");

        let mut out = Failing {
            data: b"a\n".to_vec(),
            room: 1,
            cut_fails: true,
        };
        let e = append(&mut out, 2, b"bb\n").expect_err("no room");
        assert!(
            matches!(&e, AppendError::Cut { write, cut }
                if write.raw_os_error() == Some(28) && cut.raw_os_error() == Some(5)),
            "{e:?}"
        );
    }

    #[test]
    fn a_failed_write_names_the_sink_and_file_and_the_retry_succeeds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.jsonl");
        let mut dest = FileWriter::open("out", &config(&path, Fsync::OnAck)).expect("open");
        dest.send_blocking(&[numbered(0, 1)]).expect("send");
        // A read-only handle to the same file: every write fails, nothing is written.
        if let Some(current) = &mut dest.current {
            current.file = File::open(&path).expect("open read-only");
        }
        let e = dest
            .send_blocking(&[numbered(1, 1)])
            .expect_err("read-only");
        let os = io::Error::from_raw_os_error(9);
        assert_eq!(
            e,
            SendError::Retry(format!(
                "sink `out`: cannot write file {}: {os}; cutting it back to its last whole line \
                 also failed: {} (it is reopened and repaired before the next write)",
                path.display(),
                io::Error::from_raw_os_error(22),
            ))
        );
        assert!(dest.current.is_none());
        dest.send_blocking(&[numbered(1, 1)]).expect("reopened");
        assert_eq!(read(&path), lines(0..2));
    }

    #[test]
    fn an_open_error_names_the_sink_and_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "x").expect("write");
        let path = blocker.join("x.jsonl");
        let e = FileDestination::open("out", &config(&path, Fsync::Never))
            .expect_err("a file is not a directory");
        assert_eq!(
            e.to_string(),
            format!(
                "sink `out`: cannot open file {}: creating its directory {}: {} is a file, not a directory",
                path.display(),
                blocker.display(),
                blocker.display()
            )
        );
    }
}
