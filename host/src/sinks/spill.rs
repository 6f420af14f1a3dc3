//! The disk buffer of a sink with `when_full = "spill"`: a durable FIFO queue of records,
//! each the encoded batch of the events spilled, their count and the pipeline they came from.
//!
//! One thread appends records ([`SpillLog::append`]) and makes them durable
//! ([`SpillLog::sync`]) before it acks their producers; another reads the oldest records
//! ([`SpillLog::peek`]), delivers them and consumes them ([`SpillLog::commit`]). A
//! [`SpillLog`] is `Send + Sync`; the appending and the reading half have locks of their own,
//! so a read never waits for an fsync. The log does not wake a reader waiting for records:
//! the caller pairs it with a notification of its own.
//!
//! On disk, in the log's directory:
//!
//! - `NNNNNNNNNNNNNNNNNNNN.spill`: segments, named by their id (a zero-padded u64), each a
//!   sequence of records `[u32 body length][u32 crc32][u32 events][u16 pipeline length]
//!   [pipeline][batch]`, little endian, where the body is everything after the crc and the
//!   crc covers the length and the body. Records are appended to the newest segment; a
//!   record that would take it past the segment size starts a new one.
//! - `cursor`: the position (segment id, offset) of the first unconsumed record and its
//!   crc32, replaced atomically (written to `cursor.tmp`, then renamed).
//! - `lock`: locked while the log is open, so two routers never share a directory.
//!
//! Decisions:
//!
//! - **Durability.** `sync` fsyncs the newest segment, and the directory when a segment was
//!   created since the last sync. A segment is fsynced before the next one is created, so
//!   only the newest segment can end in a torn record. Records appended but not yet synced
//!   can already be read (and delivered): a crash may lose them, but they were never acked.
//!   After a failed fsync the log refuses further appends and syncs ([`SpillError::Broken`])
//!   until it is opened again: the kernel may have dropped the unsynced pages, and a later
//!   fsync that succeeds would not bring them back.
//! - **Recovery.** `open` reads every record and checks its crc. A bad record at the end of
//!   the newest segment is what an append interrupted by a crash leaves (never synced, so
//!   never acked): it is cut off with a warning. A bad record anywhere else damages records
//!   that were acked, and `open` fails naming the file and offset instead of skipping them.
//! - **Consumption is at least once.** `commit` replaces the cursor file without fsyncing
//!   it (an fsync per delivery costs more than the duplicates it would save): after a crash
//!   the cursor may be older than the last commit, and the records after it are delivered
//!   again. Fully consumed segments are deleted after the cursor has moved past them; a
//!   deletion a crash undoes is redone by the next `open`, which deletes every segment
//!   before the cursor's. A damaged cursor file (a crash while it was replaced) is ignored
//!   with a warning: every record on disk is delivered again.
//! - **Accounting.** [`SpillLog::bytes`], [`SpillLog::records`] and [`SpillLog::events`]
//!   count the unconsumed records (their whole encoded size, header included), not the
//!   consumed records of the oldest segment that still wait for the segment's deletion.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The record header: body length and crc32.
const HEADER_BYTES: usize = 8;
/// The fixed part of a record body: events (u32) and pipeline length (u16).
const BODY_FIXED_BYTES: usize = 6;
/// The cursor file: segment id (u64), offset (u64), crc32 of both.
const CURSOR_BYTES: usize = 20;
const SEGMENT_SUFFIX: &str = ".spill";
const CURSOR_FILE: &str = "cursor";
const CURSOR_TEMP_FILE: &str = "cursor.tmp";
const LOCK_FILE: &str = "lock";

/// One record of a spill log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpillRecord {
    /// The pipeline the events came from.
    pub pipeline: String,
    /// How many events `batch` holds.
    pub events: u32,
    /// The encoded batch.
    pub batch: Vec<u8>,
}

/// Why a spill log cannot be opened, written or read.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    /// A file system operation failed.
    #[error("spill {}: cannot {action}: {error}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done (`create the directory`, `fsync`).
        action: &'static str,
        /// The I/O error.
        error: io::Error,
    },
    /// A record that was synced (and acked) is damaged.
    #[error(
        "spill segment {} is corrupt at offset {offset}: {problem} (the records from there on \
         cannot be read; move the file away to start without them)",
        file.display()
    )]
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// Where the damaged record starts.
        offset: u64,
        /// What is wrong with it.
        problem: String,
    },
    /// Another process (or another log in this one) has the directory open.
    #[error("spill directory {} is in use by another spill log (it holds {})", dir.display(), dir.join(LOCK_FILE).display())]
    Locked {
        /// The log's directory.
        dir: PathBuf,
    },
    /// A record the format cannot hold.
    #[error("spill {}: cannot append a record of pipeline `{pipeline}`: {problem}", dir.display())]
    TooLarge {
        /// The log's directory.
        dir: PathBuf,
        /// The record's pipeline (cut to 100 bytes).
        pipeline: String,
        /// What is too large.
        problem: String,
    },
    /// A commit of more records than are unconsumed.
    #[error("spill {}: cannot commit {requested} records: {available} are unconsumed", dir.display())]
    CommitTooMany {
        /// The log's directory.
        dir: PathBuf,
        /// How many records the commit named.
        requested: usize,
        /// How many records are unconsumed.
        available: u64,
    },
    /// An earlier fsync failed: the log takes no records until it is opened again.
    #[error(
        "spill {}: takes no records after an earlier failure ({cause}); restart weir to \
         recover what was synced (its pipelines wait until then)",
        dir.display()
    )]
    Broken {
        /// The log's directory.
        dir: PathBuf,
        /// The failure.
        cause: String,
    },
}

/// A durable FIFO queue of [`SpillRecord`]s in a directory (see the module documentation).
pub struct SpillLog {
    dir: PathBuf,
    segment_bytes: u64,
    writer: Mutex<Writer>,
    reader: Mutex<Reader>,
    shared: Mutex<Shared>,
    /// Holds the directory's lock until the log is dropped.
    _lock: File,
}

/// A position in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    segment: u64,
    offset: u64,
}

/// The appending half.
struct Writer {
    /// The newest segment.
    id: u64,
    file: File,
    /// Its length (all of it whole records).
    len: u64,
    /// Records were appended since the last fsync.
    unsynced: bool,
    /// A segment was created since the last directory fsync.
    dir_unsynced: bool,
    /// Why the log takes no more records, after a failed fsync.
    broken: Option<String>,
}

/// The reading half.
struct Reader {
    /// The first unconsumed record (or the end of the newest segment).
    cursor: Position,
    /// The segment file being read.
    file: Option<(u64, File)>,
    /// What the last `peek` read from the cursor on, so `commit` need not read it again.
    peeked: VecDeque<Step>,
}

/// One record read: where it ends and what it counts.
#[derive(Debug, Clone, Copy)]
struct Step {
    end: Position,
    bytes: u64,
    events: u32,
}

/// What both halves see.
#[derive(Default)]
struct Shared {
    /// The segments on disk, oldest first, with the length of their whole records.
    segments: VecDeque<Segment>,
    bytes: u64,
    records: u64,
    events: u64,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    id: u64,
    len: u64,
}

impl Shared {
    /// The first position at or after `at` that holds a record, or the end of the newest
    /// segment; and the length of that position's segment.
    fn first_unread(&self, at: Position) -> (Position, u64) {
        let start = at.segment;
        let mut at = at;
        let mut len = 0;
        for segment in self.segments.iter().skip_while(|s| s.id < start) {
            if segment.id > at.segment {
                at = Position {
                    segment: segment.id,
                    offset: 0,
                };
            }
            len = segment.len;
            if at.offset < len {
                break;
            }
        }
        (at, len)
    }
}

impl SpillLog {
    /// Opens the log in `dir` (created if missing), recovering the records appended and
    /// synced before and not yet consumed. New segments start when a record would take the
    /// newest past `segment_bytes`.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<SpillLog, SpillError> {
        create_dir_durably(dir)?;
        let lock = lock_dir(dir)?;
        remove_if_present(&dir.join(CURSOR_TEMP_FILE))?;
        let mut ids = list_segments(dir)?;
        let start = start_position(dir, read_cursor(dir)?, &ids);
        for id in ids.iter().filter(|id| **id < start.segment) {
            let path = segment_path(dir, *id);
            fs::remove_file(&path).map_err(io_error(&path, "delete a consumed segment"))?;
        }
        ids.retain(|id| *id >= start.segment);

        let mut shared = Shared::default();
        let mut cursor = start;
        let mut writer = None;
        for (i, &id) in ids.iter().enumerate() {
            let newest = i + 1 == ids.len();
            let path = segment_path(dir, id);
            let mut boundary = 0;
            let scanned = scan(&path, newest, |offset, bytes, events| {
                if id == start.segment && offset + bytes <= start.offset {
                    boundary = offset + bytes;
                } else {
                    shared.bytes += bytes;
                    shared.records += 1;
                    shared.events += u64::from(events);
                }
            })?;
            if id == start.segment && boundary != start.offset {
                tracing::warn!(
                    "spill {}: the cursor (offset {}) is not at the end of a record of {} \
                     after recovery; reading resumes at offset {boundary}",
                    dir.display(),
                    start.offset,
                    path.display()
                );
                cursor.offset = boundary;
            }
            if newest {
                writer = Some(open_newest(&path, id, &scanned)?);
            }
            shared.segments.push_back(Segment {
                id,
                len: scanned.len,
            });
        }
        let writer = match writer {
            Some(writer) => writer,
            None => {
                let path = segment_path(dir, start.segment);
                let file = create_segment(&path)?;
                sync_dir(dir)?;
                shared.segments.push_back(Segment {
                    id: start.segment,
                    len: 0,
                });
                Writer {
                    id: start.segment,
                    file,
                    len: 0,
                    unsynced: false,
                    dir_unsynced: false,
                    broken: None,
                }
            }
        };
        Ok(SpillLog {
            dir: dir.to_path_buf(),
            segment_bytes,
            writer: Mutex::new(writer),
            reader: Mutex::new(Reader {
                cursor,
                file: None,
                peeked: VecDeque::new(),
            }),
            shared: Mutex::new(shared),
            _lock: lock,
        })
    }

    /// Appends a record of `events` events of pipeline `pipeline`, encoded as `batch`. It can
    /// be read at once, and survives a crash once [`SpillLog::sync`] returns. A failed append
    /// leaves the log as it was.
    pub fn append(&self, pipeline: &str, events: u32, batch: &[u8]) -> Result<(), SpillError> {
        let frame = encode(pipeline, events, batch).map_err(|problem| SpillError::TooLarge {
            dir: self.dir.clone(),
            pipeline: pipeline.chars().take(100).collect(),
            problem,
        })?;
        let frame_bytes = frame.len() as u64;
        let mut writer = lock(&self.writer);
        self.usable(&writer)?;
        if writer.len > 0 && writer.len + frame_bytes > self.segment_bytes {
            self.roll(&mut writer)?;
        }
        let start = writer.len;
        if let Err(e) = writer.file.write_all(&frame) {
            // Cut off what was written of the record, so the segment stays whole records.
            let path = segment_path(&self.dir, writer.id);
            let undo = writer.file.set_len(start);
            let undo = undo.and_then(|()| writer.file.seek(SeekFrom::Start(start)));
            if let Err(undo) = undo {
                writer.broken = Some(format!(
                    "cannot cut a partly appended record off {}: {undo}",
                    path.display()
                ));
            }
            return Err(SpillError::Io {
                path,
                action: "append a record",
                error: e,
            });
        }
        writer.len += frame_bytes;
        writer.unsynced = true;
        let mut shared = lock(&self.shared);
        if let Some(newest) = shared.segments.back_mut() {
            newest.len = writer.len;
        }
        shared.bytes += frame_bytes;
        shared.records += 1;
        shared.events += u64::from(events);
        Ok(())
    }

    /// Makes every record appended so far durable (it survives a crash or power loss).
    pub fn sync(&self) -> Result<(), SpillError> {
        let mut writer = lock(&self.writer);
        self.usable(&writer)?;
        self.sync_segment(&mut writer)?;
        if writer.dir_unsynced {
            if let Err(e) = sync_dir(&self.dir) {
                writer.broken = Some(e.to_string());
                return Err(e);
            }
            writer.dir_unsynced = false;
        }
        Ok(())
    }

    /// The oldest unconsumed records, at most `max_records` of them and no more than it takes
    /// to reach `max_events` events, without consuming them: the next `peek` returns them
    /// again until they are committed.
    pub fn peek(
        &self,
        max_records: usize,
        max_events: u64,
    ) -> Result<Vec<SpillRecord>, SpillError> {
        let mut reader = lock(&self.reader);
        let mut records = Vec::new();
        let mut steps = VecDeque::new();
        let mut next = reader.cursor;
        let mut events = 0u64;
        while records.len() < max_records && events < max_events {
            let (at, len) = lock(&self.shared).first_unread(next);
            if at.offset >= len {
                break;
            }
            let (record, bytes) = reader.read(&self.dir, at, len)?;
            next = Position {
                segment: at.segment,
                offset: at.offset + bytes,
            };
            events += u64::from(record.events);
            steps.push_back(Step {
                end: next,
                bytes,
                events: record.events,
            });
            records.push(record);
        }
        reader.peeked = steps;
        Ok(records)
    }

    /// Consumes the oldest `records` records: no later `peek`, and no `peek` after the log
    /// is opened again, returns them (unless a crash undid the commit: see the module
    /// documentation). Segments left fully consumed are deleted. If writing the cursor or
    /// deleting a segment fails, the records are consumed all the same and the error says
    /// what failed: the records may be returned again after the log is next opened.
    pub fn commit(&self, records: usize) -> Result<(), SpillError> {
        if records == 0 {
            return Ok(());
        }
        let mut reader = lock(&self.reader);
        let available = lock(&self.shared).records;
        if records as u64 > available {
            return Err(SpillError::CommitTooMany {
                dir: self.dir.clone(),
                requested: records,
                available,
            });
        }
        let cached = reader.peeked.len().min(records);
        let mut end = reader.cursor;
        let (mut bytes, mut events) = (0, 0);
        for step in reader.peeked.iter().take(cached) {
            end = step.end;
            bytes += step.bytes;
            events += u64::from(step.events);
        }
        for _ in cached..records {
            let (at, len) = lock(&self.shared).first_unread(end);
            let (record, record_bytes) = reader.read(&self.dir, at, len)?;
            end = Position {
                segment: at.segment,
                offset: at.offset + record_bytes,
            };
            bytes += record_bytes;
            events += u64::from(record.events);
        }
        reader.peeked.drain(..cached);

        let (cursor, consumed) = {
            let mut shared = lock(&self.shared);
            shared.bytes = shared.bytes.saturating_sub(bytes);
            shared.records = shared.records.saturating_sub(records as u64);
            shared.events = shared.events.saturating_sub(events);
            let (cursor, _) = shared.first_unread(end);
            let mut consumed = Vec::new();
            while let Some(oldest) = shared.segments.front() {
                if oldest.id >= cursor.segment {
                    break;
                }
                consumed.push(oldest.id);
                shared.segments.pop_front();
            }
            (cursor, consumed)
        };
        reader.cursor = cursor;
        if matches!(reader.file, Some((id, _)) if id < cursor.segment) {
            reader.file = None;
        }
        let mut result = write_cursor(&self.dir, cursor);
        for id in consumed {
            let path = segment_path(&self.dir, id);
            if let Err(e) = fs::remove_file(&path) {
                result = result.and(Err(SpillError::Io {
                    path,
                    action: "delete a consumed segment",
                    error: e,
                }));
            }
        }
        result
    }

    /// The encoded size of the unconsumed records, headers included.
    pub fn bytes(&self) -> u64 {
        lock(&self.shared).bytes
    }

    /// How many records are unconsumed.
    pub fn records(&self) -> u64 {
        lock(&self.shared).records
    }

    /// How many events the unconsumed records hold.
    pub fn events(&self) -> u64 {
        lock(&self.shared).events
    }

    /// Fails if an earlier fsync failed.
    fn usable(&self, writer: &Writer) -> Result<(), SpillError> {
        match &writer.broken {
            Some(cause) => Err(SpillError::Broken {
                dir: self.dir.clone(),
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Fsyncs the newest segment if it has unsynced records.
    fn sync_segment(&self, writer: &mut Writer) -> Result<(), SpillError> {
        if !writer.unsynced {
            return Ok(());
        }
        if let Err(e) = writer.file.sync_data() {
            let e = SpillError::Io {
                path: segment_path(&self.dir, writer.id),
                action: "fsync",
                error: e,
            };
            writer.broken = Some(e.to_string());
            return Err(e);
        }
        writer.unsynced = false;
        Ok(())
    }

    /// Starts a new segment, after making the newest one durable.
    fn roll(&self, writer: &mut Writer) -> Result<(), SpillError> {
        self.sync_segment(writer)?;
        let id = writer.id + 1;
        writer.file = create_segment(&segment_path(&self.dir, id))?;
        writer.id = id;
        writer.len = 0;
        writer.dir_unsynced = true;
        lock(&self.shared)
            .segments
            .push_back(Segment { id, len: 0 });
        Ok(())
    }
}

impl std::fmt::Debug for SpillLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shared = lock(&self.shared);
        f.debug_struct("SpillLog")
            .field("dir", &self.dir)
            .field("records", &shared.records)
            .field("events", &shared.events)
            .field("bytes", &shared.bytes)
            .finish()
    }
}

impl Reader {
    /// Reads the record at `at`, in a segment whose whole records end at `len`; returns it
    /// and its encoded size.
    fn read(
        &mut self,
        dir: &Path,
        at: Position,
        len: u64,
    ) -> Result<(SpillRecord, u64), SpillError> {
        let path = segment_path(dir, at.segment);
        let file = match &mut self.file {
            Some((id, file)) if *id == at.segment => file,
            slot => {
                let file = File::open(&path).map_err(io_error(&path, "open a segment"))?;
                &mut slot.insert((at.segment, file)).1
            }
        };
        let corrupt = |problem: String| SpillError::Corrupt {
            file: path.clone(),
            offset: at.offset,
            problem,
        };
        let mut header = [0; HEADER_BYTES];
        file.seek(SeekFrom::Start(at.offset))
            .and_then(|_| file.read_exact(&mut header))
            .map_err(io_error(&path, "read a record"))?;
        let (body_len, crc) = parse_header(&header);
        let bytes = (HEADER_BYTES + body_len) as u64;
        if at.offset + bytes > len {
            return Err(corrupt(format!(
                "a record of {bytes} bytes runs past the end of the records ({len} bytes)"
            )));
        }
        let mut body = vec![0; body_len];
        file.read_exact(&mut body)
            .map_err(io_error(&path, "read a record"))?;
        let actual = checksum(&header, &body);
        if actual != crc {
            return Err(corrupt(crc_mismatch(actual, crc)));
        }
        let (events, pipeline, batch) = decode(&body).map_err(corrupt)?;
        let record = SpillRecord {
            pipeline: pipeline.to_owned(),
            events,
            batch: batch.to_vec(),
        };
        Ok((record, bytes))
    }
}

/// Encodes a record.
fn encode(pipeline: &str, events: u32, batch: &[u8]) -> Result<Vec<u8>, String> {
    let pipeline_len = u16::try_from(pipeline.len()).map_err(|_| {
        format!(
            "the pipeline name is {} bytes, more than {}",
            pipeline.len(),
            u16::MAX
        )
    })?;
    let body_len = BODY_FIXED_BYTES + pipeline.len() + batch.len();
    let len = u32::try_from(body_len).map_err(|_| {
        format!(
            "the batch is {} bytes, more than a record holds ({} bytes)",
            batch.len(),
            u32::MAX as usize - BODY_FIXED_BYTES - pipeline.len()
        )
    })?;
    let mut frame = Vec::with_capacity(HEADER_BYTES + body_len);
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(&events.to_le_bytes());
    frame.extend_from_slice(&pipeline_len.to_le_bytes());
    frame.extend_from_slice(pipeline.as_bytes());
    frame.extend_from_slice(batch);
    let (header, body) = frame.split_at_mut(HEADER_BYTES);
    let crc = checksum(header, body);
    header[4..].copy_from_slice(&crc.to_le_bytes());
    Ok(frame)
}

/// The body length and crc of a record header.
fn parse_header(header: &[u8; HEADER_BYTES]) -> (usize, u32) {
    let [l0, l1, l2, l3, c0, c1, c2, c3] = *header;
    (
        u32::from_le_bytes([l0, l1, l2, l3]) as usize,
        u32::from_le_bytes([c0, c1, c2, c3]),
    )
}

/// The crc32 of a record: its length (the first 4 bytes of `header`) and its body.
fn checksum(header: &[u8], body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[..4]);
    hasher.update(body);
    hasher.finalize()
}

fn crc_mismatch(actual: u32, recorded: u32) -> String {
    format!("its crc32 is {actual:08x}, the record says {recorded:08x}")
}

/// Splits a record body whose crc matched into events, pipeline and batch.
fn decode(body: &[u8]) -> Result<(u32, &str, &[u8]), String> {
    let malformed = || format!("a record body of {} bytes is malformed", body.len());
    let (events, rest) = body.split_first_chunk::<4>().ok_or_else(malformed)?;
    let (pipeline_len, rest) = rest.split_first_chunk::<2>().ok_or_else(malformed)?;
    let pipeline_len = usize::from(u16::from_le_bytes(*pipeline_len));
    let (pipeline, batch) = rest.split_at_checked(pipeline_len).ok_or_else(|| {
        format!(
            "its pipeline name of {pipeline_len} bytes runs past its body of {} bytes",
            body.len()
        )
    })?;
    let pipeline =
        std::str::from_utf8(pipeline).map_err(|_| "its pipeline name is not UTF-8".to_owned())?;
    Ok((u32::from_le_bytes(*events), pipeline, batch))
}

/// What reading one record from a segment being recovered found.
enum Frame {
    /// A whole record whose crc matches: its body is in the buffer.
    Whole,
    /// The file ends inside the record, or its length is impossible.
    Cut(String),
    /// A whole record whose crc does not match.
    Damaged(String),
}

/// Reads the record at the position of `input`, `remaining` bytes before the end of the
/// file, into `body`.
fn read_frame(input: &mut impl Read, remaining: u64, body: &mut Vec<u8>) -> io::Result<Frame> {
    if remaining < HEADER_BYTES as u64 {
        return Ok(Frame::Cut(format!(
            "the file ends {remaining} bytes into a record header"
        )));
    }
    let mut header = [0; HEADER_BYTES];
    input.read_exact(&mut header)?;
    let (body_len, crc) = parse_header(&header);
    if body_len < BODY_FIXED_BYTES {
        return Ok(Frame::Cut(format!("impossible record length {body_len}")));
    }
    let bytes = (HEADER_BYTES + body_len) as u64;
    if bytes > remaining {
        return Ok(Frame::Cut(format!(
            "a record of {bytes} bytes runs past the end of the file ({remaining} bytes left)"
        )));
    }
    body.clear();
    body.resize(body_len, 0);
    input.read_exact(body)?;
    let actual = checksum(&header, body);
    Ok(if actual == crc {
        Frame::Whole
    } else {
        Frame::Damaged(crc_mismatch(actual, crc))
    })
}

/// What recovering a segment found.
struct Scanned {
    /// Where its whole records end.
    len: u64,
    /// The file's length.
    file_len: u64,
    /// The torn tail of the newest segment: where it starts and what is wrong with it.
    torn: Option<(u64, String)>,
}

/// Reads every record of segment `path`, calling `each(offset, bytes, events)` for each. A
/// bad record fails with [`SpillError::Corrupt`], unless it is the torn tail of the
/// `newest` segment: it is cut off there, and nothing good follows it.
fn scan(
    path: &Path,
    newest: bool,
    mut each: impl FnMut(u64, u64, u32),
) -> Result<Scanned, SpillError> {
    let file = File::open(path).map_err(io_error(path, "open a segment"))?;
    let file_len = file
        .metadata()
        .map_err(io_error(path, "read the metadata of a segment"))?
        .len();
    let mut input = BufReader::with_capacity(1 << 20, file);
    let mut body = Vec::new();
    let mut offset = 0;
    let read_error = io_error(path, "read a segment");
    let corrupt = |offset, problem| SpillError::Corrupt {
        file: path.to_path_buf(),
        offset,
        problem,
    };
    while offset < file_len {
        let problem = match read_frame(&mut input, file_len - offset, &mut body)
            .map_err(read_error)?
        {
            Frame::Whole => {
                let (events, _, _) = decode(&body).map_err(|problem| corrupt(offset, problem))?;
                let bytes = (HEADER_BYTES + body.len()) as u64;
                each(offset, bytes, events);
                offset += bytes;
                continue;
            }
            Frame::Cut(problem) => problem,
            Frame::Damaged(problem) => {
                // An interrupted append leaves nothing whole after it.
                let next = offset + (HEADER_BYTES + body.len()) as u64;
                let followed = next < file_len
                    && matches!(
                        read_frame(&mut input, file_len - next, &mut body).map_err(read_error)?,
                        Frame::Whole
                    );
                if followed {
                    return Err(corrupt(offset, problem));
                }
                problem
            }
        };
        if !newest {
            return Err(corrupt(offset, problem));
        }
        return Ok(Scanned {
            len: offset,
            file_len,
            torn: Some((offset, problem)),
        });
    }
    Ok(Scanned {
        len: offset,
        file_len,
        torn: None,
    })
}

/// Opens the newest segment for appending, cutting off its torn tail.
fn open_newest(path: &Path, id: u64, scanned: &Scanned) -> Result<Writer, SpillError> {
    let mut file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_error(path, "open a segment for writing"))?;
    if let Some((offset, problem)) = &scanned.torn {
        tracing::warn!(
            "spill segment {}: cutting off {} bytes at offset {offset}, the torn end of an \
             append a crash interrupted (never synced, so never acked): {problem}",
            path.display(),
            scanned.file_len - offset
        );
        file.set_len(*offset)
            .and_then(|()| file.sync_all())
            .map_err(io_error(path, "cut off a torn record"))?;
    }
    file.seek(SeekFrom::Start(scanned.len))
        .map_err(io_error(path, "seek to the end of a segment"))?;
    Ok(Writer {
        id,
        file,
        len: scanned.len,
        unsynced: false,
        dir_unsynced: false,
        broken: None,
    })
}

/// Where reading starts, from the saved cursor and the segments on disk (oldest first).
fn start_position(dir: &Path, saved: Option<Position>, ids: &[u64]) -> Position {
    let oldest = Position {
        segment: ids.first().copied().unwrap_or(0),
        offset: 0,
    };
    let Some(saved) = saved else {
        return oldest;
    };
    if ids.contains(&saved.segment) {
        return saved;
    }
    // The cursor's segment is gone: it was consumed (and deleted) too.
    match ids.iter().find(|id| **id > saved.segment) {
        Some(&segment) => Position { segment, offset: 0 },
        None if ids.is_empty() => Position {
            segment: saved.segment,
            offset: 0,
        },
        None => {
            tracing::warn!(
                "spill {}: the cursor names segment {}, newer than every segment on disk; \
                 every record on disk is delivered again",
                dir.display(),
                saved.segment
            );
            oldest
        }
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}{SEGMENT_SUFFIX}"))
}

/// The ids of the segments in `dir`, oldest first.
fn list_segments(dir: &Path) -> Result<Vec<u64>, SpillError> {
    let list_error = io_error(dir, "list the directory");
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).map_err(list_error)? {
        let name = entry.map_err(list_error)?.file_name();
        let id = name
            .to_str()
            .and_then(|name| name.strip_suffix(SEGMENT_SUFFIX))
            .filter(|id| id.len() == 20 && id.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|id| id.parse::<u64>().ok());
        ids.extend(id);
    }
    ids.sort_unstable();
    Ok(ids)
}

fn create_segment(path: &Path) -> Result<File, SpillError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_error(path, "create a segment"))
}

/// The saved cursor; `None` if there is none or it is damaged.
fn read_cursor(dir: &Path) -> Result<Option<Position>, SpillError> {
    let path = dir.join(CURSOR_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(&path, "read the cursor")(e)),
    };
    let cursor = parse_cursor(&bytes);
    if cursor.is_none() {
        tracing::warn!(
            "spill cursor {} is damaged (a crash while it was replaced?); every record on \
             disk is delivered again",
            path.display()
        );
    }
    Ok(cursor)
}

/// Decodes a cursor file: segment id, offset, crc32 of both.
fn parse_cursor(bytes: &[u8]) -> Option<Position> {
    let (segment, rest) = bytes.split_first_chunk::<8>()?;
    let (offset, crc) = rest.split_first_chunk::<8>()?;
    let crc = <[u8; 4]>::try_from(crc).ok()?;
    (crc32fast::hash(&bytes[..16]) == u32::from_le_bytes(crc)).then_some(Position {
        segment: u64::from_le_bytes(*segment),
        offset: u64::from_le_bytes(*offset),
    })
}

/// Replaces the cursor file (atomically, without fsync).
fn write_cursor(dir: &Path, cursor: Position) -> Result<(), SpillError> {
    let mut bytes = [0; CURSOR_BYTES];
    bytes[..8].copy_from_slice(&cursor.segment.to_le_bytes());
    bytes[8..16].copy_from_slice(&cursor.offset.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..16]);
    bytes[16..].copy_from_slice(&crc.to_le_bytes());
    let temp = dir.join(CURSOR_TEMP_FILE);
    fs::write(&temp, bytes).map_err(io_error(&temp, "write the cursor"))?;
    let path = dir.join(CURSOR_FILE);
    fs::rename(&temp, &path).map_err(io_error(&path, "replace the cursor"))
}

/// Creates `dir` and its missing parents, making each creation durable.
fn create_dir_durably(dir: &Path) -> Result<(), SpillError> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(path) = at.filter(|p| !p.as_os_str().is_empty()) {
        if path
            .try_exists()
            .map_err(io_error(path, "look for the directory"))?
        {
            break;
        }
        missing.push(path);
        at = path.parent();
    }
    if missing.is_empty() {
        return Ok(());
    }
    crate::files::create_dir_all(dir).map_err(io_error(dir, "create the directory"))?;
    for path in missing.iter().rev() {
        match path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(parent) => sync_dir(parent)?,
            None => sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

/// Locks the directory for this log.
fn lock_dir(dir: &Path) -> Result<File, SpillError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_error(&path, "open the lock file"))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(SpillError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(TryLockError::Error(e)) => Err(io_error(&path, "lock the lock file")(e)),
    }
}

fn remove_if_present(path: &Path) -> Result<(), SpillError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_error(path, "delete a stale file")(e))
        }
        _ => Ok(()),
    }
}

/// Fsyncs a directory, so the files created or renamed in it survive a power loss.
fn sync_dir(dir: &Path) -> Result<(), SpillError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir, "fsync the directory"))
}

fn io_error(path: &Path, action: &'static str) -> impl Fn(io::Error) -> SpillError + Copy {
    move |error| SpillError::Io {
        path: path.to_path_buf(),
        action,
        error,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Record `i`: one of two pipelines, a batch of 1 to 40 bytes.
    fn record(i: u32) -> SpillRecord {
        SpillRecord {
            pipeline: if i.is_multiple_of(2) {
                "orders"
            } else {
                "audit-log"
            }
            .into(),
            events: i + 1,
            batch: (0..i % 40 + 1).map(|b| (i * 31 + b) as u8).collect(),
        }
    }

    /// Record `i`, 40 bytes encoded.
    fn fixed(i: u32) -> SpillRecord {
        SpillRecord {
            pipeline: "orders".into(),
            events: i + 1,
            batch: vec![i as u8; 20],
        }
    }

    fn records(range: std::ops::Range<u32>, make: fn(u32) -> SpillRecord) -> Vec<SpillRecord> {
        range.map(make).collect()
    }

    fn size(r: &SpillRecord) -> u64 {
        (HEADER_BYTES + BODY_FIXED_BYTES + r.pipeline.len() + r.batch.len()) as u64
    }

    fn open(dir: &Path, segment_bytes: u64) -> SpillLog {
        SpillLog::open(dir, segment_bytes).expect("open the log")
    }

    fn append(log: &SpillLog, rs: &[SpillRecord]) {
        for r in rs {
            log.append(&r.pipeline, r.events, &r.batch)
                .expect("append a record");
        }
    }

    fn peek(log: &SpillLog, max: usize) -> Vec<SpillRecord> {
        log.peek(max, u64::MAX).expect("peek")
    }

    fn commit(log: &SpillLog, n: usize) {
        log.commit(n).expect("commit");
    }

    /// (records, events, bytes) of the log.
    fn counts(log: &SpillLog) -> (u64, u64, u64) {
        (log.records(), log.events(), log.bytes())
    }

    /// (records, events, bytes) of `rs`.
    fn expected(rs: &[SpillRecord]) -> (u64, u64, u64) {
        let events = rs.iter().map(|r| u64::from(r.events)).sum();
        (rs.len() as u64, events, rs.iter().map(size).sum())
    }

    /// The segment files in `dir` and their lengths.
    fn segments(dir: &Path) -> Vec<(String, u64)> {
        let mut found: Vec<_> = fs::read_dir(dir)
            .expect("list the directory")
            .map(|e| e.expect("a directory entry"))
            .filter(|e| e.file_name().to_string_lossy().ends_with(".spill"))
            .map(|e| {
                let len = e.metadata().expect("metadata").len();
                (e.file_name().to_string_lossy().into_owned(), len)
            })
            .collect();
        found.sort();
        found
    }

    fn names(ids: std::ops::Range<u64>) -> Vec<String> {
        ids.map(|id| format!("{id:020}.spill")).collect()
    }

    fn segment_names(dir: &Path) -> Vec<String> {
        segments(dir).into_iter().map(|(name, _)| name).collect()
    }

    fn open_error(dir: &Path, segment_bytes: u64) -> String {
        match SpillLog::open(dir, segment_bytes) {
            Ok(log) => panic!("opened {log:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn records_come_back_in_order_across_segments_and_consumed_segments_go() {
        let temp = tempfile::tempdir().expect("a temporary directory");
        let dir = temp.path().join("spill/sink");
        let log = open(&dir, 100);
        assert_eq!(counts(&log), (0, 0, 0));
        assert_eq!(peek(&log, 10), []);
        let rs = records(0..20, fixed);
        append(&log, &rs);
        log.sync().expect("sync");
        assert_eq!(counts(&log), expected(&rs));
        assert_eq!(counts(&log), (20, 210, 800));
        // Two 40-byte records fit in 100 bytes, three do not.
        assert_eq!(segment_names(&dir), names(0..10));

        assert_eq!(peek(&log, 5), rs[..5]);
        assert_eq!(peek(&log, 5), rs[..5], "peek does not consume");
        // Events 1, 2, 3 reach 6: a budget of 6 events stops after three records, 7 after four.
        assert_eq!(log.peek(100, 6).expect("peek"), rs[..3]);
        assert_eq!(log.peek(100, 7).expect("peek"), rs[..4]);
        commit(&log, 3);
        assert_eq!(counts(&log), expected(&rs[3..]));
        assert_eq!(segment_names(&dir), names(1..10));
        assert_eq!(peek(&log, 100), rs[3..]);

        // A commit of more records than the last peek returned reads the rest.
        assert_eq!(peek(&log, 2), rs[3..5]);
        commit(&log, 7);
        assert_eq!(counts(&log), expected(&rs[10..]));
        assert_eq!(segment_names(&dir), names(5..10));
        assert_eq!(peek(&log, 100), rs[10..]);

        commit(&log, 10);
        assert_eq!(counts(&log), (0, 0, 0));
        assert_eq!(peek(&log, 100), []);
        // The newest segment stays, for the next appends.
        assert_eq!(segment_names(&dir), names(9..10));

        let more = records(20..23, fixed);
        append(&log, &more);
        assert_eq!(
            peek(&log, 100),
            more,
            "records are read before they are synced"
        );
        assert_eq!(segment_names(&dir), names(9..12));
        commit(&log, 1);
        assert_eq!(segment_names(&dir), names(10..12));
        assert_eq!(counts(&log), expected(&more[1..]));
    }

    #[test]
    fn reopening_recovers_exactly_the_unconsumed_records() {
        let temp = tempfile::tempdir().expect("a temporary directory");
        let dir = temp.path();
        let rs = records(0..13, record);
        let log = open(dir, 100);
        append(&log, &rs[..10]);
        log.sync().expect("sync");
        assert_eq!(peek(&log, 4), rs[..4]);
        commit(&log, 4);
        // Read but not committed: returned again after the restart (at least once).
        assert_eq!(peek(&log, 3), rs[4..7]);
        append(&log, &rs[10..12]);
        drop(log);

        let log = open(dir, 100);
        assert_eq!(counts(&log), expected(&rs[4..12]));
        assert_eq!(peek(&log, 100), rs[4..12]);
        commit(&log, 2);
        append(&log, &rs[12..]);
        drop(log);

        let log = open(dir, 100);
        assert_eq!(counts(&log), expected(&rs[6..]));
        assert_eq!(peek(&log, 100), rs[6..]);
        commit(&log, 7);
        assert_eq!(counts(&log), (0, 0, 0));
        drop(log);

        let log = open(dir, 100);
        assert_eq!(counts(&log), (0, 0, 0));
        assert_eq!(peek(&log, 100), []);
        assert_eq!(segments(dir).len(), 1);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_the_records_before_it_kept() {
        let temp = tempfile::tempdir().expect("a temporary directory");
        let dir = temp.path();
        let rs = records(0..4, record);
        let log = open(dir, 1 << 20);
        append(&log, &rs[..3]);
        log.sync().expect("sync");
        drop(log);
        let path = dir.join(&names(0..1)[0]);
        let whole = expected(&rs[..3]).2;
        assert_eq!(fs::metadata(&path).expect("metadata").len(), whole);

        // The crash cut the last record short.
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.set_len(whole - 3).expect("truncate");
        drop(file);
        let log = open(dir, 1 << 20);
        assert_eq!(peek(&log, 100), rs[..2]);
        assert_eq!(counts(&log), expected(&rs[..2]));
        assert_eq!(
            segments(dir),
            [(names(0..1)[0].clone(), expected(&rs[..2]).2)]
        );
        append(&log, &rs[3..]);
        drop(log);
        let log = open(dir, 1 << 20);
        let kept = [rs[0].clone(), rs[1].clone(), rs[3].clone()];
        assert_eq!(peek(&log, 100), kept);
        drop(log);

        // The file grew but the data never made it (zeros), or half of a header did.
        let whole = expected(&kept).2;
        for tail in [vec![0; 4096], vec![7, 0, 0]] {
            let mut bytes = fs::read(&path).expect("read");
            bytes.extend(&tail);
            fs::write(&path, bytes).expect("write");
            let log = open(dir, 1 << 20);
            assert_eq!(peek(&log, 100), kept);
            assert_eq!(fs::metadata(&path).expect("metadata").len(), whole);
        }

        // A whole last record whose crc does not match.
        let mut bytes = fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, bytes).expect("write");
        let log = open(dir, 1 << 20);
        assert_eq!(peek(&log, 100), kept[..2]);
        assert_eq!(counts(&log), expected(&kept[..2]));
    }

    #[test]
    fn a_damaged_record_before_good_ones_fails_open_naming_file_and_offset() {
        let temp = tempfile::tempdir().expect("a temporary directory");
        let dir = temp.path();
        let rs = records(0..3, record);
        let log = open(dir, 1 << 20);
        append(&log, &rs);
        log.sync().expect("sync");
        drop(log);
        let path = dir.join(&names(0..1)[0]);
        let mut bytes = fs::read(&path).expect("read");
        let offset = size(&rs[0]) as usize;
        let recorded = u32::from_le_bytes(
            bytes[offset + 4..offset + 8]
                .try_into()
                .expect("four bytes"),
        );
        let end = offset + size(&rs[1]) as usize;
        bytes[end - 1] ^= 0x01;
        let actual = checksum(&bytes[offset..offset + 4], &bytes[offset + 8..end]);
        fs::write(&path, bytes).expect("write");
        assert_eq!(
            open_error(dir, 1 << 20),
            format!(
                "spill segment {} is corrupt at offset {offset}: its crc32 is {actual:08x}, the \
                 record says {recorded:08x} (the records from there on cannot be read; move the \
                 file away to start without them)",
                path.display()
            )
        );
    }

    #[test]
    fn a_cut_record_in_an_older_segment_fails_open() {
        let temp = tempfile::tempdir().expect("a temporary directory");
        let dir = temp.path();
        let log = open(dir, 100);
        append(&log, &records(0..4, fixed));
        log.sync().expect("sync");
        drop(log);
        let path = dir.join(&names(0..1)[0]);
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.set_len(79).expect("truncate");
        drop(file);
        assert_eq!(
            open_error(dir, 100),
            format!(
                "spill segment {} is corrupt at offset 40: a record of 40 bytes runs past the end \
                 of the file (39 bytes left) (the records from there on cannot be read; move the \
                 file away to start without them)",
                path.display()
            )
        );
    }

    #[test]
    fn records_consumed_but_lost_in_a_crash_are_not_replayed() {
        let temp = tempfile::tempdir().expect("a temporary directory");
        let dir = temp.path();
        let rs = records(0..4, record);
        let log = open(dir, 1 << 20);
        append(&log, &rs[..3]);
        assert_eq!(peek(&log, 3), rs[..3]);
        commit(&log, 3);
        drop(log);
        // The cursor reached the disk, the end of the unsynced last record did not.
        let path = dir.join(&names(0..1)[0]);
        let len = fs::metadata(&path).expect("metadata").len();
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.set_len(len - 5).expect("truncate");
        drop(file);
        let log = open(dir, 1 << 20);
        assert_eq!(counts(&log), (0, 0, 0));
        assert_eq!(peek(&log, 100), []);
        append(&log, &rs[3..]);
        assert_eq!(peek(&log, 100), rs[3..]);
        drop(log);
        let log = open(dir, 1 << 20);
        assert_eq!(peek(&log, 100), rs[3..]);
    }

    #[test]
    fn a_damaged_cursor_delivers_every_record_again() {
        let temp = tempfile::tempdir().expect("a temporary directory");
        let dir = temp.path();
        let rs = records(0..5, record);
        let log = open(dir, 1 << 20);
        append(&log, &rs);
        commit(&log, 2);
        drop(log);
        fs::write(dir.join("cursor"), b"torn").expect("write");
        let log = open(dir, 1 << 20);
        assert_eq!(peek(&log, 100), rs);
        assert_eq!(counts(&log), expected(&rs));
    }

    #[test]
    fn a_record_larger_than_a_segment_gets_one_of_its_own() {
        let temp = tempfile::tempdir().expect("a temporary directory");
        let dir = temp.path();
        let small = fixed(1);
        let large = SpillRecord {
            pipeline: "orders".into(),
            events: 9,
            batch: vec![5; 300],
        };
        let rs = [small.clone(), large.clone(), small.clone(), small.clone()];
        let log = open(dir, 50);
        append(&log, &rs);
        let name = |id| names(id..id + 1).remove(0);
        assert_eq!(
            segments(dir),
            [(name(0), 40), (name(1), 320), (name(2), 40), (name(3), 40)]
        );
        assert_eq!(peek(&log, 100), rs);
        assert_eq!(counts(&log), expected(&rs));
    }

    #[test]
    fn misuse_is_an_error_that_says_what_is_wrong() {
        let temp = tempfile::tempdir().expect("a temporary directory");
        let dir = temp.path();
        let log = open(dir, 1 << 20);
        append(&log, &records(0..2, record));
        assert_eq!(
            log.commit(3).map_err(|e| e.to_string()),
            Err(format!(
                "spill {}: cannot commit 3 records: 2 are unconsumed",
                dir.display()
            ))
        );
        assert_eq!(
            open_error(dir, 1 << 20),
            format!(
                "spill directory {} is in use by another spill log (it holds {})",
                dir.display(),
                dir.join("lock").display()
            )
        );
        let name = "p".repeat(70_000);
        assert_eq!(
            log.append(&name, 1, b"x").map_err(|e| e.to_string()),
            Err(format!(
                "spill {}: cannot append a record of pipeline `{}`: the pipeline name is 70000 \
                 bytes, more than 65535",
                dir.display(),
                "p".repeat(100)
            ))
        );
        assert_eq!(counts(&log), expected(&records(0..2, record)));
    }

    #[test]
    fn a_writer_and_a_reader_on_their_own_threads() {
        let temp = tempfile::tempdir().expect("a temporary directory");
        let log = Arc::new(open(temp.path(), 1000));
        let rs = records(0..500, record);
        let writer = {
            let log = Arc::clone(&log);
            let rs = rs.clone();
            std::thread::spawn(move || {
                for chunk in rs.chunks(10) {
                    append(&log, chunk);
                    log.sync().expect("sync");
                }
            })
        };
        let mut read = Vec::new();
        while read.len() < rs.len() {
            let got = peek(&log, 7);
            if got.is_empty() {
                std::thread::yield_now();
                continue;
            }
            commit(&log, got.len());
            read.extend(got);
        }
        writer.join().expect("the writer thread");
        assert_eq!(read, rs);
        assert_eq!(counts(&log), (0, 0, 0));
        assert_eq!(segments(temp.path()).len(), 1);
    }
}
