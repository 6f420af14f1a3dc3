//! The weir wire protocol (`weir/1`) as a pure codec: typed frames, [`encode`], and an
//! incremental [`Decoder`] that takes stream bytes as they arrive. No sockets, no QUIC, no async:
//! the server and the client own the streams and feed this module bytes (sans-IO, like
//! quinn-proto). docs/PROTOCOL.md is the specification; its worked example is a test here.
//!
//! Decisions (the reasons are in docs/PROTOCOL.md):
//! - A frame is `length: u32 BE` (bytes that follow: type + body), `type: u8`, body. Integers
//!   are big-endian (network order, as QUIC and Kafka); the FlatBuffers batch inside a `batch`
//!   frame keeps its own little-endian layout and is opaque to the framing. Strings and byte
//!   strings are `u16 BE` length + bytes, strings UTF-8. Decoding is strict: no trailing bytes,
//!   no unknown frame types, so that every frame has exactly one encoding (the fuzz target
//!   checks that a decoded frame re-encodes to the bytes it came from).
//! - Limits are enforced before anything is buffered beyond them: the length prefix is checked
//!   against `max_frame_bytes` when its 4 bytes arrive, the frame type (and whether it may appear
//!   on this stream, at this point) when its byte arrives, and a batch's declared event count and
//!   pipeline index when its 14-byte header arrives, before any payload byte is stored. Memory
//!   follows the bytes actually received (capacity grows at most to twice what arrived, never
//!   above the frame's length), never the length a peer merely announces. String lengths are
//!   checked before a string is allocated.
//! - The decoder consumes only the bytes of the frame it is assembling ([`Decoder::decode`]
//!   advances the caller's slice), so one frame is buffered at a time and the caller keeps the
//!   rest of a chunk for the next call. Every payload byte is copied exactly once, from the
//!   caller's chunk into the frame's payload.
//! - The FlatBuffers payload is **not** verified by the decoder: [`BatchFrame::verify`] is a
//!   separate step the server runs on the pipeline worker. `Batch::verify` costs ~21 ns per
//!   event (docs/BENCHMARKS.md), work that belongs on the pipeline's thread rather than on
//!   the task that drains the stream; a resent batch the server already accepted (sequence below
//!   the next expected one) is dropped without ever being verified; and verification happens
//!   exactly once per batch, where the pipeline reads it. The decoder still enforces
//!   `max_events_per_frame`, from the count the frame header declares; `verify` then checks that
//!   the payload holds exactly that many events, so a lying header is caught before any event is
//!   processed.
//! - Any [`ProtocolError`] is fatal to the stream it happened on (the decoder refuses further
//!   input); [`ProtocolError::code`] gives the [`ErrorCode`] to send in the `error` frame, the
//!   QUIC `STOP_SENDING` or the `CONNECTION_CLOSE`. Nothing in this module panics on any input.

use crate::{Batch, FormatError};

/// The protocol revision this crate speaks (within ALPN `weir/1`).
pub const PROTOCOL_VERSION: u16 = 1;
/// The ALPN protocol id negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"weir/1";
/// Bytes of the length prefix.
pub const LENGTH_BYTES: usize = 4;
/// Bytes of a `batch` frame's header after the length prefix: type (1), pipeline index (2),
/// sequence (8), event count (4). The payload follows.
pub const BATCH_HEADER_BYTES: usize = 15;
/// Control frames are small and fixed by the protocol, not negotiated: every valid control frame
/// fits (the largest possible `hello` is 37 255 bytes), and a peer cannot make the other side
/// buffer more before the handshake has set any limit.
pub const MAX_CONTROL_FRAME_BYTES: u32 = 64 * 1024;
/// Producer ids and pipeline names: short identifiers, printed in logs and metrics.
pub const MAX_NAME_BYTES: usize = 255;
/// Auth tokens: room for a JWT or a long random secret.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Human-readable messages in `refuse`, `error` and `goaway`: a line, not a document.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Pipelines one connection may write to; keeps `hello` under [`MAX_CONTROL_FRAME_BYTES`].
pub const MAX_PIPELINES: usize = 128;

/// Frame type bytes. Control frames are `0x01..=0x0f`, data frames from `0x10`.
pub mod frame_type {
    /// `hello`: client → server, first frame on the control stream.
    pub const HELLO: u8 = 0x01;
    /// `welcome`: server → client, accepts the `hello`.
    pub const WELCOME: u8 = 0x02;
    /// `refuse`: server → client, refuses the `hello`; the connection closes.
    pub const REFUSE: u8 = 0x03;
    /// `ack`: server → client, cumulative acknowledgement for one pipeline.
    pub const ACK: u8 = 0x04;
    /// `error`: server → client, a stream or the connection failed.
    pub const ERROR: u8 = 0x05;
    /// `goaway`: server → client, the server is shutting down gracefully.
    pub const GOAWAY: u8 = 0x06;
    /// `batch`: client → server on a batch stream.
    pub const BATCH: u8 = 0x10;
}

/// The name of a frame type, for error messages.
fn type_name(ty: u8) -> Option<&'static str> {
    Some(match ty {
        frame_type::HELLO => "hello",
        frame_type::WELCOME => "welcome",
        frame_type::REFUSE => "refuse",
        frame_type::ACK => "ack",
        frame_type::ERROR => "error",
        frame_type::GOAWAY => "goaway",
        frame_type::BATCH => "batch",
        _ => return None,
    })
}

/// Limits the server announces in `welcome`; the batch-stream decoder enforces the first two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame, counted from the type byte (the value of the length prefix).
    pub max_frame_bytes: u32,
    /// Most events one `batch` frame may declare.
    pub max_events_per_frame: u32,
    /// Most batches per pipeline the server reads before their ack; beyond it the server stops
    /// reading (QUIC flow control), it is never an error. Clients size their resend buffer to it.
    pub max_in_flight: u32,
}

impl Limits {
    /// The weir server's defaults: 4 MiB frames (16 384 events of 256 B fit), 8192 events per
    /// frame (~1.6 ms of verification, far under a plugin's 100 ms deadline), 16 batches in
    /// flight per pipeline (enough to cover an ack round trip at full speed).
    pub const DEFAULT: Limits = Limits {
        max_frame_bytes: 4 * 1024 * 1024,
        max_events_per_frame: 8192,
        max_in_flight: 16,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// Error codes: in `refuse` and `error` frames, and as the QUIC application error code of
/// `STOP_SENDING`, `RESET_STREAM` and `CONNECTION_CLOSE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 0x00: clean close.
    NoError,
    /// 0x01: malformed or unexpected frame.
    ProtocolViolation,
    /// 0x02: the `hello` version cannot be served.
    UnsupportedVersion,
    /// 0x03: bad or missing token / client certificate.
    Unauthenticated,
    /// 0x04: the producer may not write to a pipeline it named.
    Unauthorized,
    /// 0x05: a pipeline named in `hello` does not exist.
    UnknownPipeline,
    /// 0x06: a frame over `max_frame_bytes`.
    FrameTooLarge,
    /// 0x07: a batch over `max_events_per_frame`.
    TooManyEvents,
    /// 0x08: a batch payload that is not a valid weir batch, or holds another count of events
    /// than its header declares.
    InvalidBatch,
    /// 0x09: a batch sequence above the next one the server expects.
    SequenceGap,
    /// 0x0a: the pipeline's limit of connected producers is reached.
    TooManyProducers,
    /// 0x0b: a newer connection of the same producer id took over.
    Superseded,
    /// 0x0c: the server is shutting down.
    ShuttingDown,
    /// 0x0d: the server failed; retry later.
    InternalError,
    /// A code this revision does not know: treat as fatal and not retryable.
    Unknown(u16),
}

impl ErrorCode {
    /// The code as sent on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::NoError => 0x00,
            ErrorCode::ProtocolViolation => 0x01,
            ErrorCode::UnsupportedVersion => 0x02,
            ErrorCode::Unauthenticated => 0x03,
            ErrorCode::Unauthorized => 0x04,
            ErrorCode::UnknownPipeline => 0x05,
            ErrorCode::FrameTooLarge => 0x06,
            ErrorCode::TooManyEvents => 0x07,
            ErrorCode::InvalidBatch => 0x08,
            ErrorCode::SequenceGap => 0x09,
            ErrorCode::TooManyProducers => 0x0a,
            ErrorCode::Superseded => 0x0b,
            ErrorCode::ShuttingDown => 0x0c,
            ErrorCode::InternalError => 0x0d,
            ErrorCode::Unknown(code) => code,
        }
    }

    /// The code for a wire value; unknown values are kept as [`ErrorCode::Unknown`].
    pub fn from_u16(code: u16) -> ErrorCode {
        match code {
            0x00 => ErrorCode::NoError,
            0x01 => ErrorCode::ProtocolViolation,
            0x02 => ErrorCode::UnsupportedVersion,
            0x03 => ErrorCode::Unauthenticated,
            0x04 => ErrorCode::Unauthorized,
            0x05 => ErrorCode::UnknownPipeline,
            0x06 => ErrorCode::FrameTooLarge,
            0x07 => ErrorCode::TooManyEvents,
            0x08 => ErrorCode::InvalidBatch,
            0x09 => ErrorCode::SequenceGap,
            0x0a => ErrorCode::TooManyProducers,
            0x0b => ErrorCode::Superseded,
            0x0c => ErrorCode::ShuttingDown,
            0x0d => ErrorCode::InternalError,
            other => ErrorCode::Unknown(other),
        }
    }

    /// Whether a client may retry after this code (reconnect and resend), as opposed to a
    /// failure it must report: a fault on its side or a refusal that retrying cannot change.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::NoError
                | ErrorCode::TooManyProducers
                | ErrorCode::ShuttingDown
                | ErrorCode::InternalError
        )
    }
}

/// A frame: what travels on a weir stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client → server, first frame on the control stream.
    Hello(Hello),
    /// Server → client: the `hello` is accepted.
    Welcome(Welcome),
    /// Server → client: the `hello` is refused; the server closes the connection.
    Refuse(Refuse),
    /// Server → client: cumulative acknowledgement for one pipeline.
    Ack(Ack),
    /// Server → client: a stream (or the connection) failed with a protocol error.
    Error(ErrorFrame),
    /// Server → client: graceful shutdown has begun.
    Goaway(Goaway),
    /// Client → server on a batch stream: one batch of events.
    Batch(BatchFrame),
}

impl Frame {
    /// The frame's type byte.
    pub fn frame_type(&self) -> u8 {
        match self {
            Frame::Hello(_) => frame_type::HELLO,
            Frame::Welcome(_) => frame_type::WELCOME,
            Frame::Refuse(_) => frame_type::REFUSE,
            Frame::Ack(_) => frame_type::ACK,
            Frame::Error(_) => frame_type::ERROR,
            Frame::Goaway(_) => frame_type::GOAWAY,
            Frame::Batch(_) => frame_type::BATCH,
        }
    }
}

/// `hello` (0x01): who the producer is and where it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Highest protocol revision the client speaks (≥ 1).
    pub version: u16,
    /// Stable producer identity: the key of the server's sequence state (1..=255 bytes UTF-8).
    pub producer_id: String,
    /// Auth token (0..=4096 bytes; empty when a client certificate authenticates).
    pub token: Vec<u8>,
    /// Pipelines this connection writes to (1..=128, distinct); a batch names one by its index.
    pub pipelines: Vec<String>,
}

/// `welcome` (0x02): the server accepts, with its limits and where each pipeline stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The revision both sides use: min(client's, server's).
    pub version: u16,
    /// Limits the client must respect.
    pub limits: Limits,
    /// One entry per pipeline of the `hello`, in the same order.
    pub pipelines: Vec<PipelineState>,
}

/// The server's sequence state for (producer id, pipeline), sent in `welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineState {
    /// The sequence the server expects next: every lower one was accepted (and will be acked
    /// once durable). 0: the server has no state, the first batch sets the start.
    pub next_sequence: u64,
    /// Every sequence below this one is acked (held by every required sink). ≤ `next_sequence`.
    pub acked_below: u64,
}

/// `refuse` (0x03): the handshake failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refuse {
    /// Why, as a code.
    pub code: ErrorCode,
    /// Why, for a human (names the pipeline, the limit…).
    pub message: String,
}

/// `ack` (0x04): every batch of this pipeline with a sequence below `next` is held by every
/// required sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Index into the `hello`'s pipelines.
    pub pipeline: u16,
    /// Exclusive upper bound of the acknowledged sequences.
    pub next: u64,
}

/// `error` (0x05): a stream or the whole connection failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// What failed, as a code.
    pub code: ErrorCode,
    /// QUIC stream id of the failed stream (0, the control stream, for the connection).
    pub stream: u64,
    /// What failed, for a human (the limit and the values).
    pub message: String,
}

/// `goaway` (0x06): the server stops accepting new batches; what it has read will be acked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Goaway {
    /// Why, for a human.
    pub message: String,
}

/// `batch` (0x10): one FlatBuffers batch (`wit/batch.fbs`) with its producer sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchFrame {
    /// Index into the `hello`'s pipelines.
    pub pipeline: u16,
    /// Per (producer id, pipeline) sequence number, consecutive from the first one sent.
    pub sequence: u64,
    /// Events in the payload, declared so limits hold before the payload is read.
    pub event_count: u32,
    /// The FlatBuffers batch, unverified until [`BatchFrame::verify`].
    pub payload: Vec<u8>,
}

impl BatchFrame {
    /// Verifies the payload ([`Batch::verify`]) and that it holds exactly the declared number
    /// of events. The server calls this once, where the pipeline reads the batch.
    pub fn verify(&self) -> Result<Batch<'_>, ProtocolError> {
        let batch = Batch::verify(&self.payload).map_err(|source| ProtocolError::InvalidBatch {
            sequence: self.sequence,
            source,
        })?;
        if batch.len() != self.event_count as usize {
            return Err(ProtocolError::EventCountMismatch {
                sequence: self.sequence,
                declared: self.event_count,
                actual: batch.len(),
            });
        }
        Ok(batch)
    }
}

/// A violation of the protocol, found while encoding or decoding. Fatal to its stream.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtocolError {
    /// The length prefix is over the limit for this stream.
    #[error("frame of {len} bytes exceeds the limit of {limit} ({limit_name})")]
    FrameTooLarge {
        /// The length prefix.
        len: u64,
        /// The limit.
        limit: u64,
        /// Which limit: `max_frame_bytes` or `max_control_frame_bytes`.
        limit_name: &'static str,
    },
    /// A length prefix of 0.
    #[error("frame of 0 bytes: every frame holds at least its type byte")]
    EmptyFrame,
    /// A type byte this revision does not define.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownFrameType(u8),
    /// A known frame on the wrong stream or at the wrong point.
    #[error("unexpected `{frame}` frame {context}")]
    UnexpectedFrame {
        /// The frame's name.
        frame: &'static str,
        /// Where it arrived.
        context: &'static str,
    },
    /// A frame shorter than its fixed header.
    #[error("`{frame}` frame of {len} bytes is shorter than its {min}-byte header")]
    FrameTooShort {
        /// The frame's name.
        frame: &'static str,
        /// The length prefix.
        len: u32,
        /// The shortest valid length.
        min: u32,
    },
    /// A batch that declares more events than allowed.
    #[error("batch of {count} events exceeds the limit of {limit} (max_events_per_frame)")]
    TooManyEvents {
        /// Declared events.
        count: u32,
        /// The limit.
        limit: u32,
    },
    /// A batch for a pipeline index the `hello` did not list.
    #[error("batch for pipeline index {index}, but hello listed {count} pipelines")]
    UnknownPipelineIndex {
        /// The index in the frame.
        index: u16,
        /// Pipelines in the `hello`.
        count: usize,
    },
    /// A frame whose body ends inside a field.
    #[error("`{frame}` frame ends inside field `{field}`")]
    Truncated {
        /// The frame's name.
        frame: &'static str,
        /// The field being read.
        field: &'static str,
    },
    /// A frame whose body is longer than its fields.
    #[error("`{frame}` frame has {extra} trailing bytes")]
    TrailingBytes {
        /// The frame's name.
        frame: &'static str,
        /// Bytes after the last field.
        extra: usize,
    },
    /// A string or byte field over its limit.
    #[error("`{frame}` frame: {field} of {len} bytes exceeds the limit of {limit} ({limit_name})")]
    FieldTooLong {
        /// The frame's name.
        frame: &'static str,
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
        /// The limit's name.
        limit_name: &'static str,
    },
    /// A field that must not be empty.
    #[error("`{frame}` frame: {field} is empty")]
    EmptyField {
        /// The frame's name.
        frame: &'static str,
        /// The field.
        field: &'static str,
    },
    /// A string field that is not UTF-8.
    #[error("`{frame}` frame: {field} is not valid utf-8")]
    InvalidUtf8 {
        /// The frame's name.
        frame: &'static str,
        /// The field.
        field: &'static str,
    },
    /// More pipelines than a connection may use.
    #[error("`{frame}` frame lists {count} pipelines, over the limit of {limit} (max_pipelines)")]
    TooManyPipelines {
        /// The frame's name.
        frame: &'static str,
        /// Pipelines listed.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A pipeline named twice in `hello`.
    #[error("`hello` frame lists pipeline `{0}` twice")]
    DuplicatePipeline(String),
    /// A `welcome` pipeline state whose acked mark is above its next sequence.
    #[error(
        "`welcome` frame: pipeline {index} has acked_below {acked_below} above next_sequence {next_sequence}"
    )]
    AckedAboveNext {
        /// Index of the pipeline.
        index: usize,
        /// The acked mark.
        acked_below: u64,
        /// The next sequence.
        next_sequence: u64,
    },
    /// A protocol version that cannot be spoken.
    #[error("unsupported protocol version {version} (this side speaks 1 to {PROTOCOL_VERSION})")]
    UnsupportedVersion {
        /// The version received.
        version: u16,
    },
    /// End of stream inside a frame's length prefix or body.
    #[error("stream ended inside a frame: {got} of {want} bytes received")]
    TruncatedStream {
        /// Bytes of the frame received, length prefix included.
        got: u64,
        /// Bytes the frame needs (4 while the length prefix is incomplete).
        want: u64,
    },
    /// Input after the decoder already failed.
    #[error("stream already failed with a protocol error")]
    AlreadyFailed,
    /// A batch payload that is not a valid weir batch.
    #[error("batch {sequence}: payload is not a valid weir batch: {source}")]
    InvalidBatch {
        /// The batch's sequence.
        sequence: u64,
        /// What the verifier found.
        source: FormatError,
    },
    /// A batch payload holding another number of events than its header declares.
    #[error("batch {sequence}: header declares {declared} events, payload holds {actual}")]
    EventCountMismatch {
        /// The batch's sequence.
        sequence: u64,
        /// Events in the header.
        declared: u32,
        /// Events in the payload.
        actual: usize,
    },
}

impl ProtocolError {
    /// The code to send for this error (`error` frame, `STOP_SENDING`, `CONNECTION_CLOSE`).
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            ProtocolError::TooManyEvents { .. } => ErrorCode::TooManyEvents,
            ProtocolError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            ProtocolError::InvalidBatch { .. } | ProtocolError::EventCountMismatch { .. } => {
                ErrorCode::InvalidBatch
            }
            _ => ErrorCode::ProtocolViolation,
        }
    }
}

/// The revision to use with a peer that offers `offered`: min(offered, ours); 0 is never valid.
pub fn negotiate_version(offered: u16) -> Result<u16, ProtocolError> {
    if offered == 0 {
        return Err(ProtocolError::UnsupportedVersion { version: 0 });
    }
    Ok(offered.min(PROTOCOL_VERSION))
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Appends `frame`'s bytes to `out`. Fails, leaving `out` as it was, on a frame the decoder
/// would refuse for a fixed protocol limit (string lengths, pipeline count, version 0, a frame
/// over 4 GiB); negotiated limits (`max_frame_bytes`, `max_events_per_frame`) are the caller's
/// to respect, since only it knows them.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let start = out.len();
    let result = encode_inner(frame, out, start);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn encode_inner(frame: &Frame, out: &mut Vec<u8>, start: usize) -> Result<(), ProtocolError> {
    out.extend_from_slice(&[0; LENGTH_BYTES]);
    out.push(frame.frame_type());
    match frame {
        Frame::Hello(h) => {
            check_version(h.version)?;
            out.extend_from_slice(&h.version.to_be_bytes());
            put_str(out, "hello", "producer_id", &h.producer_id, NAME)?;
            put_bytes(out, "hello", "token", &h.token, TOKEN)?;
            check_pipelines(h.pipelines.iter().map(String::as_bytes), h.pipelines.len())?;
            out.extend_from_slice(&(h.pipelines.len() as u16).to_be_bytes());
            for p in &h.pipelines {
                put_str(out, "hello", "pipeline name", p, NAME)?;
            }
        }
        Frame::Welcome(w) => {
            check_version(w.version)?;
            out.extend_from_slice(&w.version.to_be_bytes());
            out.extend_from_slice(&w.limits.max_frame_bytes.to_be_bytes());
            out.extend_from_slice(&w.limits.max_events_per_frame.to_be_bytes());
            out.extend_from_slice(&w.limits.max_in_flight.to_be_bytes());
            if w.pipelines.len() > MAX_PIPELINES {
                return Err(ProtocolError::TooManyPipelines {
                    frame: "welcome",
                    count: w.pipelines.len(),
                    limit: MAX_PIPELINES,
                });
            }
            out.extend_from_slice(&(w.pipelines.len() as u16).to_be_bytes());
            for (index, p) in w.pipelines.iter().enumerate() {
                check_state(index, p)?;
                out.extend_from_slice(&p.next_sequence.to_be_bytes());
                out.extend_from_slice(&p.acked_below.to_be_bytes());
            }
        }
        Frame::Refuse(r) => {
            out.extend_from_slice(&r.code.to_u16().to_be_bytes());
            put_str(out, "refuse", "message", &r.message, MESSAGE)?;
        }
        Frame::Ack(a) => {
            out.extend_from_slice(&a.pipeline.to_be_bytes());
            out.extend_from_slice(&a.next.to_be_bytes());
        }
        Frame::Error(e) => {
            out.extend_from_slice(&e.code.to_u16().to_be_bytes());
            out.extend_from_slice(&e.stream.to_be_bytes());
            put_str(out, "error", "message", &e.message, MESSAGE)?;
        }
        Frame::Goaway(g) => put_str(out, "goaway", "message", &g.message, MESSAGE)?,
        Frame::Batch(b) => {
            let header = batch_header(b.pipeline, b.sequence, b.event_count, b.payload.len())?;
            out.truncate(start);
            out.extend_from_slice(&header);
            out.extend_from_slice(&b.payload);
            return Ok(());
        }
    }
    let len = out.len() - start - LENGTH_BYTES;
    // Cannot trip with the field limits above; kept so the encoder never emits what the
    // decoder refuses even if a limit changes.
    if len > MAX_CONTROL_FRAME_BYTES as usize {
        return Err(ProtocolError::FrameTooLarge {
            len: len as u64,
            limit: MAX_CONTROL_FRAME_BYTES.into(),
            limit_name: "max_control_frame_bytes",
        });
    }
    out[start..start + LENGTH_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// The 19 bytes (length prefix and batch header) that precede a `batch` payload of
/// `payload_len` bytes: lets a client write header and payload without copying the payload.
pub fn batch_header(
    pipeline: u16,
    sequence: u64,
    event_count: u32,
    payload_len: usize,
) -> Result<[u8; LENGTH_BYTES + BATCH_HEADER_BYTES], ProtocolError> {
    let len = payload_len as u64 + BATCH_HEADER_BYTES as u64;
    let len = u32::try_from(len).map_err(|_| ProtocolError::FrameTooLarge {
        len,
        limit: u32::MAX.into(),
        limit_name: "u32 length prefix",
    })?;
    let mut header = [0; LENGTH_BYTES + BATCH_HEADER_BYTES];
    header[0..4].copy_from_slice(&len.to_be_bytes());
    header[4] = frame_type::BATCH;
    header[5..7].copy_from_slice(&pipeline.to_be_bytes());
    header[7..15].copy_from_slice(&sequence.to_be_bytes());
    header[15..19].copy_from_slice(&event_count.to_be_bytes());
    Ok(header)
}

/// A string field's limit: the maximum, its name in messages, whether it may be empty.
struct FieldLimit {
    max: usize,
    name: &'static str,
    may_be_empty: bool,
}

const NAME: FieldLimit = FieldLimit {
    max: MAX_NAME_BYTES,
    name: "max_name_bytes",
    may_be_empty: false,
};
const TOKEN: FieldLimit = FieldLimit {
    max: MAX_TOKEN_BYTES,
    name: "max_token_bytes",
    may_be_empty: true,
};
const MESSAGE: FieldLimit = FieldLimit {
    max: MAX_MESSAGE_BYTES,
    name: "max_message_bytes",
    may_be_empty: true,
};

fn check_field(
    frame: &'static str,
    field: &'static str,
    len: usize,
    limit: &FieldLimit,
) -> Result<(), ProtocolError> {
    if len > limit.max {
        return Err(ProtocolError::FieldTooLong {
            frame,
            field,
            len,
            limit: limit.max,
            limit_name: limit.name,
        });
    }
    if len == 0 && !limit.may_be_empty {
        return Err(ProtocolError::EmptyField { frame, field });
    }
    Ok(())
}

fn put_bytes(
    out: &mut Vec<u8>,
    frame: &'static str,
    field: &'static str,
    bytes: &[u8],
    limit: FieldLimit,
) -> Result<(), ProtocolError> {
    check_field(frame, field, bytes.len(), &limit)?;
    // Every limit is below u16::MAX, checked just above.
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

fn put_str(
    out: &mut Vec<u8>,
    frame: &'static str,
    field: &'static str,
    s: &str,
    limit: FieldLimit,
) -> Result<(), ProtocolError> {
    put_bytes(out, frame, field, s.as_bytes(), limit)
}

fn check_version(version: u16) -> Result<(), ProtocolError> {
    if version == 0 {
        return Err(ProtocolError::UnsupportedVersion { version });
    }
    Ok(())
}

fn check_pipelines<'p>(
    names: impl Iterator<Item = &'p [u8]> + Clone,
    count: usize,
) -> Result<(), ProtocolError> {
    if count == 0 {
        return Err(ProtocolError::EmptyField {
            frame: "hello",
            field: "pipelines",
        });
    }
    if count > MAX_PIPELINES {
        return Err(ProtocolError::TooManyPipelines {
            frame: "hello",
            count,
            limit: MAX_PIPELINES,
        });
    }
    // At most 128 names: quadratic is cheaper than hashing them.
    for (i, name) in names.clone().enumerate() {
        if names.clone().take(i).any(|earlier| earlier == name) {
            return Err(ProtocolError::DuplicatePipeline(
                String::from_utf8_lossy(name).into_owned(),
            ));
        }
    }
    Ok(())
}

fn check_state(index: usize, p: &PipelineState) -> Result<(), ProtocolError> {
    if p.acked_below > p.next_sequence {
        return Err(ProtocolError::AckedAboveNext {
            index,
            acked_below: p.acked_below,
            next_sequence: p.next_sequence,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Which stream a decoder reads, and so which frames it accepts in which order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    /// The control stream as the server reads it: one `hello`, nothing else.
    ClientControl,
    /// The control stream as the client reads it: `welcome` or `refuse` first, then `ack`,
    /// `error`, `goaway`.
    ServerControl,
    /// A batch stream: `batch` frames only.
    Batch,
}

/// Where the control stream stands, for the order rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Welcomed,
    Done,
}

/// Length prefix + type + batch header: the most a decoder holds before it knows a frame is
/// within every limit.
const HEAD_BYTES: usize = LENGTH_BYTES + BATCH_HEADER_BYTES;
/// First capacity of a body buffer: bodies grow with the bytes that arrive, from here.
const MIN_BODY_CAPACITY: usize = 4096;

/// Incremental decoder for one stream. Feed it each chunk read from the stream with
/// [`Decoder::decode`] until it returns `Ok(None)`; at the end of the stream call
/// [`Decoder::finish`]. After an error it refuses further input.
///
/// ```
/// use weir_format::frame::{self, BatchFrame, Decoder, Frame, Limits};
/// let payload = weir_format::encode(&[weir_format::Event::new("hi", 0)]);
/// let batch = Frame::Batch(BatchFrame { pipeline: 0, sequence: 7, event_count: 1, payload });
/// let mut bytes = Vec::new();
/// frame::encode(&batch, &mut bytes)?;
///
/// let mut decoder = Decoder::batch_stream(Limits::DEFAULT, 1);
/// let (first, second) = bytes.split_at(5); // any split works
/// let mut chunk = first;
/// assert_eq!(decoder.decode(&mut chunk)?, None);
/// let mut chunk = second;
/// let decoded = decoder.decode(&mut chunk)?;
/// assert_eq!(decoded.as_ref(), Some(&batch));
/// decoder.finish()?;
/// # Ok::<(), weir_format::frame::ProtocolError>(())
/// ```
#[derive(Debug)]
pub struct Decoder {
    stream: Stream,
    max_frame_bytes: u32,
    max_events_per_frame: u32,
    pipelines: usize,
    phase: Phase,
    head: [u8; HEAD_BYTES],
    head_len: usize,
    body: Vec<u8>,
    failed: bool,
}

impl Decoder {
    fn new(stream: Stream, max_frame_bytes: u32, max_events: u32, pipelines: usize) -> Self {
        Decoder {
            stream,
            max_frame_bytes,
            max_events_per_frame: max_events,
            pipelines,
            phase: Phase::Start,
            head: [0; HEAD_BYTES],
            head_len: 0,
            body: Vec::new(),
            failed: false,
        }
    }

    /// The server's decoder for the control stream: one `hello`.
    pub fn control_from_client() -> Self {
        Self::new(Stream::ClientControl, MAX_CONTROL_FRAME_BYTES, 0, 0)
    }

    /// The client's decoder for the control stream: `welcome` or `refuse`, then `ack`, `error`,
    /// `goaway`.
    pub fn control_from_server() -> Self {
        Self::new(Stream::ServerControl, MAX_CONTROL_FRAME_BYTES, 0, 0)
    }

    /// The server's decoder for a batch stream of a connection whose `hello` listed
    /// `pipelines` pipelines, enforcing `limits` (the ones its `welcome` announced).
    pub fn batch_stream(limits: Limits, pipelines: usize) -> Self {
        Self::new(
            Stream::Batch,
            limits.max_frame_bytes,
            limits.max_events_per_frame,
            pipelines,
        )
    }

    /// Bytes of the current, incomplete frame held by the decoder.
    pub fn buffered(&self) -> usize {
        self.head_len + self.body.len()
    }

    /// Consumes bytes of `input` (advancing it) until one frame is complete and returns it, or
    /// returns `Ok(None)` once all of `input` is consumed without completing a frame. Call it
    /// again with the rest of `input` while it returns frames.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Frame>, ProtocolError> {
        if self.failed {
            return Err(ProtocolError::AlreadyFailed);
        }
        let result = self.step(input);
        if result.is_err() {
            self.failed = true;
            self.head_len = 0;
            self.body = Vec::new();
        }
        result
    }

    /// Checks that the stream did not end inside a frame; call it at the end of the stream.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        if self.failed {
            return Err(ProtocolError::AlreadyFailed);
        }
        if self.head_len == 0 {
            return Ok(());
        }
        let got = self.buffered() as u64;
        let want = if self.head_len < LENGTH_BYTES {
            LENGTH_BYTES as u64
        } else {
            LENGTH_BYTES as u64 + u64::from(self.frame_len())
        };
        Err(ProtocolError::TruncatedStream { got, want })
    }

    fn frame_len(&self) -> u32 {
        u32::from_be_bytes([self.head[0], self.head[1], self.head[2], self.head[3]])
    }

    /// Moves bytes from `input` into the head until it holds `want` bytes; true when it does.
    fn fill_head(&mut self, input: &mut &[u8], want: usize) -> bool {
        let take = (want - self.head_len).min(input.len());
        self.head[self.head_len..self.head_len + take].copy_from_slice(&input[..take]);
        self.head_len += take;
        *input = &input[take..];
        self.head_len == want
    }

    /// Moves bytes from `input` into the body until it holds `want` bytes; true when it does.
    /// Capacity follows what arrived (doubling, capped at `want`), not what was announced.
    fn fill_body(&mut self, input: &mut &[u8], want: usize) -> bool {
        let take = (want - self.body.len()).min(input.len());
        let needed = self.body.len() + take;
        if needed > self.body.capacity() {
            let target = needed
                .max(self.body.capacity().saturating_mul(2))
                .max(MIN_BODY_CAPACITY)
                .min(want);
            self.body.reserve_exact(target - self.body.len());
        }
        self.body.extend_from_slice(&input[..take]);
        *input = &input[take..];
        self.body.len() == want
    }

    fn step(&mut self, input: &mut &[u8]) -> Result<Option<Frame>, ProtocolError> {
        if self.head_len < LENGTH_BYTES {
            if !self.fill_head(input, LENGTH_BYTES) {
                return Ok(None);
            }
            let len = self.frame_len();
            if len == 0 {
                return Err(ProtocolError::EmptyFrame);
            }
            if len > self.max_frame_bytes {
                return Err(ProtocolError::FrameTooLarge {
                    len: len.into(),
                    limit: self.max_frame_bytes.into(),
                    limit_name: if self.stream == Stream::Batch {
                        "max_frame_bytes"
                    } else {
                        "max_control_frame_bytes"
                    },
                });
            }
        }
        let len = self.frame_len() as usize;
        if self.head_len < LENGTH_BYTES + 1 {
            if !self.fill_head(input, LENGTH_BYTES + 1) {
                return Ok(None);
            }
            self.check_type(self.head[LENGTH_BYTES])?;
        }
        let ty = self.head[LENGTH_BYTES];
        let frame = if ty == frame_type::BATCH {
            if self.head_len < HEAD_BYTES {
                if len < BATCH_HEADER_BYTES {
                    return Err(ProtocolError::FrameTooShort {
                        frame: "batch",
                        len: len as u32,
                        min: BATCH_HEADER_BYTES as u32,
                    });
                }
                if !self.fill_head(input, HEAD_BYTES) {
                    return Ok(None);
                }
                self.check_batch_header()?;
            }
            if !self.fill_body(input, len - BATCH_HEADER_BYTES) {
                return Ok(None);
            }
            let h = &self.head;
            Frame::Batch(BatchFrame {
                pipeline: u16::from_be_bytes([h[5], h[6]]),
                sequence: u64::from_be_bytes([h[7], h[8], h[9], h[10], h[11], h[12], h[13], h[14]]),
                event_count: u32::from_be_bytes([h[15], h[16], h[17], h[18]]),
                payload: std::mem::take(&mut self.body),
            })
        } else {
            if !self.fill_body(input, len - 1) {
                return Ok(None);
            }
            let body = std::mem::take(&mut self.body);
            parse_control(ty, &body)?
        };
        self.head_len = 0;
        self.advance_phase(&frame);
        Ok(Some(frame))
    }

    /// Whether a frame of type `ty` may come now on this stream.
    fn check_type(&self, ty: u8) -> Result<(), ProtocolError> {
        let frame = type_name(ty).ok_or(ProtocolError::UnknownFrameType(ty))?;
        let context = match (self.stream, self.phase, ty) {
            (Stream::Batch, _, frame_type::BATCH) => return Ok(()),
            (Stream::Batch, _, _) => "on a batch stream",
            (Stream::ClientControl, Phase::Start, frame_type::HELLO) => return Ok(()),
            (Stream::ClientControl, Phase::Start, _) => "on the control stream before `hello`",
            (Stream::ClientControl, _, _) => "on the control stream after `hello`",
            (Stream::ServerControl, Phase::Start, frame_type::WELCOME | frame_type::REFUSE) => {
                return Ok(());
            }
            (Stream::ServerControl, Phase::Start, _) => "on the control stream before `welcome`",
            (
                Stream::ServerControl,
                Phase::Welcomed,
                frame_type::ACK | frame_type::ERROR | frame_type::GOAWAY,
            ) => return Ok(()),
            (Stream::ServerControl, Phase::Welcomed, _) => "on the control stream after `welcome`",
            (Stream::ServerControl, Phase::Done, _) => "on the control stream after `refuse`",
        };
        Err(ProtocolError::UnexpectedFrame { frame, context })
    }

    fn check_batch_header(&self) -> Result<(), ProtocolError> {
        let index = u16::from_be_bytes([self.head[5], self.head[6]]);
        if usize::from(index) >= self.pipelines {
            return Err(ProtocolError::UnknownPipelineIndex {
                index,
                count: self.pipelines,
            });
        }
        let count =
            u32::from_be_bytes([self.head[15], self.head[16], self.head[17], self.head[18]]);
        if count > self.max_events_per_frame {
            return Err(ProtocolError::TooManyEvents {
                count,
                limit: self.max_events_per_frame,
            });
        }
        Ok(())
    }

    fn advance_phase(&mut self, frame: &Frame) {
        self.phase = match (self.stream, frame) {
            (Stream::ClientControl, Frame::Hello(_)) => Phase::Done,
            (Stream::ServerControl, Frame::Welcome(_)) => Phase::Welcomed,
            (Stream::ServerControl, Frame::Refuse(_)) => Phase::Done,
            _ => self.phase,
        };
    }
}

/// A cursor over a control frame's body; every read names the field it reads.
struct Fields<'a> {
    frame: &'static str,
    buf: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::Truncated {
                frame: self.frame,
                field,
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], ProtocolError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, ProtocolError> {
        self.array(field).map(u16::from_be_bytes)
    }

    /// The `u16` count of pipelines that `hello` and `welcome` carry, at most [`MAX_PIPELINES`].
    fn pipeline_count(&mut self) -> Result<usize, ProtocolError> {
        let count = usize::from(self.u16("pipeline count")?);
        if count > MAX_PIPELINES {
            return Err(ProtocolError::TooManyPipelines {
                frame: self.frame,
                count,
                limit: MAX_PIPELINES,
            });
        }
        Ok(count)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, ProtocolError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, ProtocolError> {
        self.array(field).map(u64::from_be_bytes)
    }

    fn bytes(&mut self, field: &'static str, limit: FieldLimit) -> Result<&'a [u8], ProtocolError> {
        let len = usize::from(self.u16(field)?);
        check_field(self.frame, field, len, &limit)?;
        self.take(len, field)
    }

    fn string(&mut self, field: &'static str, limit: FieldLimit) -> Result<String, ProtocolError> {
        let bytes = self.bytes(field, limit)?;
        let s = std::str::from_utf8(bytes).map_err(|_| ProtocolError::InvalidUtf8 {
            frame: self.frame,
            field,
        })?;
        Ok(s.to_owned())
    }

    fn end(self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::TrailingBytes {
                frame: self.frame,
                extra: self.buf.len(),
            })
        }
    }
}

fn parse_control(ty: u8, body: &[u8]) -> Result<Frame, ProtocolError> {
    let frame = type_name(ty).ok_or(ProtocolError::UnknownFrameType(ty))?;
    let mut f = Fields { frame, buf: body };
    let parsed = match ty {
        frame_type::HELLO => {
            let version = f.u16("version")?;
            check_version(version)?;
            let producer_id = f.string("producer_id", NAME)?;
            let token = f.bytes("token", TOKEN)?.to_vec();
            let count = f.pipeline_count()?;
            let mut pipelines = Vec::with_capacity(count);
            for _ in 0..count {
                pipelines.push(f.string("pipeline name", NAME)?);
            }
            check_pipelines(pipelines.iter().map(String::as_bytes), count)?;
            Frame::Hello(Hello {
                version,
                producer_id,
                token,
                pipelines,
            })
        }
        frame_type::WELCOME => {
            let version = f.u16("version")?;
            check_version(version)?;
            let limits = Limits {
                max_frame_bytes: f.u32("max_frame_bytes")?,
                max_events_per_frame: f.u32("max_events_per_frame")?,
                max_in_flight: f.u32("max_in_flight")?,
            };
            let count = f.pipeline_count()?;
            let mut pipelines = Vec::with_capacity(count);
            for index in 0..count {
                let state = PipelineState {
                    next_sequence: f.u64("next_sequence")?,
                    acked_below: f.u64("acked_below")?,
                };
                check_state(index, &state)?;
                pipelines.push(state);
            }
            Frame::Welcome(Welcome {
                version,
                limits,
                pipelines,
            })
        }
        frame_type::REFUSE => Frame::Refuse(Refuse {
            code: ErrorCode::from_u16(f.u16("code")?),
            message: f.string("message", MESSAGE)?,
        }),
        frame_type::ACK => Frame::Ack(Ack {
            pipeline: f.u16("pipeline")?,
            next: f.u64("next")?,
        }),
        frame_type::ERROR => Frame::Error(ErrorFrame {
            code: ErrorCode::from_u16(f.u16("code")?),
            stream: f.u64("stream")?,
            message: f.string("message", MESSAGE)?,
        }),
        frame_type::GOAWAY => Frame::Goaway(Goaway {
            message: f.string("message", MESSAGE)?,
        }),
        _ => return Err(ProtocolError::UnknownFrameType(ty)),
    };
    f.end()?;
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    //! Exact bytes and exact error texts: round trips, the worked example of docs/PROTOCOL.md,
    //! every split point, truncation, limits at and over their edge, bad input.

    use super::*;
    use crate::Event;

    /// docs/PROTOCOL.md: its hex examples are decoded here, so the document cannot drift.
    const PROTOCOL_MD: &str = include_str!("../../docs/PROTOCOL.md");

    fn bytes(frame: &Frame) -> Vec<u8> {
        let mut out = Vec::new();
        encode(frame, &mut out).expect("encodable frame");
        out
    }

    fn concat(frames: &[Frame]) -> Vec<u8> {
        frames.iter().flat_map(bytes).collect()
    }

    /// Feeds `chunks` one after the other, then ends the stream.
    fn decode_chunks(mut decoder: Decoder, chunks: &[&[u8]]) -> Result<Vec<Frame>, ProtocolError> {
        let mut frames = Vec::new();
        for chunk in chunks {
            let mut input = *chunk;
            while let Some(frame) = decoder.decode(&mut input)? {
                frames.push(frame);
            }
            assert!(input.is_empty(), "decoder left input it did not need");
        }
        decoder.finish()?;
        Ok(frames)
    }

    fn decode_all(decoder: Decoder, input: &[u8]) -> Result<Vec<Frame>, ProtocolError> {
        decode_chunks(decoder, &[input])
    }

    fn error_text(decoder: Decoder, input: &[u8]) -> String {
        match decode_all(decoder, input) {
            Ok(frames) => panic!("expected an error, decoded {frames:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn batches() -> Decoder {
        Decoder::batch_stream(Limits::DEFAULT, 2)
    }

    fn hello() -> Hello {
        Hello {
            version: 1,
            producer_id: "sensor-7".into(),
            token: b"s3cret".to_vec(),
            pipelines: vec!["clicks".into()],
        }
    }

    fn welcome() -> Welcome {
        Welcome {
            version: 1,
            limits: Limits::DEFAULT,
            pipelines: vec![PipelineState {
                next_sequence: 0,
                acked_below: 0,
            }],
        }
    }

    fn batch(sequence: u64, events: &[Event]) -> Frame {
        Frame::Batch(BatchFrame {
            pipeline: 0,
            sequence,
            event_count: events.len() as u32,
            payload: crate::encode(events),
        })
    }

    fn example_events() -> Vec<Event> {
        vec![Event::new(&br#"{"n":1}"#[..], 1_700_000_000_000).with_key("k")]
    }

    /// What the server sends on the control stream in a session.
    fn server_frames() -> Vec<Frame> {
        vec![
            Frame::Welcome(Welcome {
                version: 1,
                limits: Limits {
                    max_frame_bytes: 1 << 20,
                    max_events_per_frame: 1000,
                    max_in_flight: 4,
                },
                pipelines: vec![
                    PipelineState {
                        next_sequence: 12,
                        acked_below: 10,
                    },
                    PipelineState {
                        next_sequence: 0,
                        acked_below: 0,
                    },
                ],
            }),
            Frame::Ack(Ack {
                pipeline: 0,
                next: 12,
            }),
            Frame::Error(ErrorFrame {
                code: ErrorCode::SequenceGap,
                stream: 6,
                message: "pipeline `clicks`: expected sequence 12, got 14".into(),
            }),
            Frame::Ack(Ack {
                pipeline: 1,
                next: u64::MAX,
            }),
            Frame::Goaway(Goaway {
                message: String::new(),
            }),
        ]
    }

    fn batch_frames() -> Vec<Frame> {
        vec![
            batch(0, &example_events()),
            batch(1, &[]),
            Frame::Batch(BatchFrame {
                pipeline: 1,
                sequence: u64::MAX,
                event_count: 2,
                payload: crate::encode(&[
                    Event::new("a", -1).with_header("h", vec![0, 255]),
                    Event::new(Vec::new(), 0).with_route("eu"),
                ]),
            }),
        ]
    }

    #[test]
    fn every_frame_type_round_trips() {
        let frame = Frame::Hello(hello());
        assert_eq!(
            decode_all(Decoder::control_from_client(), &bytes(&frame)),
            Ok(vec![frame])
        );
        let frame = Frame::Refuse(Refuse {
            code: ErrorCode::Unauthorized,
            message: "producer `sensor-7` may not write to pipeline `billing`".into(),
        });
        assert_eq!(
            decode_all(Decoder::control_from_server(), &bytes(&frame)),
            Ok(vec![frame])
        );
        let frames = server_frames();
        assert_eq!(
            decode_all(Decoder::control_from_server(), &concat(&frames)),
            Ok(frames)
        );
        let frames = batch_frames();
        let decoded = decode_all(batches(), &concat(&frames)).expect("valid batches");
        assert_eq!(decoded, frames);
        for frame in &decoded {
            let Frame::Batch(b) = frame else {
                panic!("not a batch")
            };
            assert_eq!(b.verify().map(|v| v.len()), Ok(b.event_count as usize));
        }
    }

    #[test]
    fn frame_types_have_fixed_bytes() {
        assert_eq!(
            bytes(&Frame::Ack(Ack {
                pipeline: 0x0102,
                next: 0x0304
            })),
            [0, 0, 0, 11, 0x04, 1, 2, 0, 0, 0, 0, 0, 0, 3, 4]
        );
        assert_eq!(
            bytes(&Frame::Goaway(Goaway {
                message: "bye".into()
            })),
            [0, 0, 0, 6, 0x06, 0, 3, b'b', b'y', b'e']
        );
        assert_eq!(
            bytes(&Frame::Refuse(Refuse {
                code: ErrorCode::Unknown(0x1234),
                message: String::new()
            })),
            [0, 0, 0, 5, 0x03, 0x12, 0x34, 0, 0]
        );
    }

    #[test]
    fn batch_header_is_the_encoded_prefix() {
        let frame = batch(9, &example_events());
        let Frame::Batch(b) = &frame else {
            unreachable!()
        };
        let header = batch_header(b.pipeline, b.sequence, b.event_count, b.payload.len())
            .expect("small payload");
        let mut manual = header.to_vec();
        manual.extend_from_slice(&b.payload);
        assert_eq!(manual, bytes(&frame));
    }

    /// Pulls the `# example: NAME` hex blocks out of docs/PROTOCOL.md.
    fn doc_examples() -> Vec<(String, Vec<u8>)> {
        let mut examples = Vec::new();
        let mut current: Option<(String, Vec<u8>)> = None;
        for line in PROTOCOL_MD.lines() {
            if let Some(name) = line.strip_prefix("# example: ") {
                current = Some((name.trim().to_owned(), Vec::new()));
                continue;
            }
            if line.starts_with("```") {
                examples.extend(current.take());
                continue;
            }
            if let Some((_, bytes)) = current.as_mut() {
                let hex = line.split('#').next().unwrap_or("");
                for token in hex.split_whitespace() {
                    let byte = u8::from_str_radix(token, 16)
                        .unwrap_or_else(|_| panic!("PROTOCOL.md: `{token}` is not a hex byte"));
                    bytes.push(byte);
                }
            }
        }
        examples
    }

    #[test]
    fn protocol_md_worked_example_decodes() {
        let examples = doc_examples();
        let names: Vec<&str> = examples.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["hello", "welcome", "batch", "ack", "error"]);
        let doc = |name: &str| -> &[u8] {
            &examples
                .iter()
                .find(|(n, _)| n == name)
                .expect("example present")
                .1
        };

        let hello = Frame::Hello(hello());
        assert_eq!(
            decode_all(Decoder::control_from_client(), doc("hello")),
            Ok(vec![hello.clone()])
        );
        assert_eq!(bytes(&hello), doc("hello"));

        let server = [
            Frame::Welcome(welcome()),
            Frame::Ack(Ack {
                pipeline: 0,
                next: 1,
            }),
            Frame::Error(ErrorFrame {
                code: ErrorCode::TooManyEvents,
                stream: 2,
                message: "batch of 9000 events exceeds the limit of 8192 (max_events_per_frame)"
                    .into(),
            }),
        ];
        let server_bytes = [doc("welcome"), doc("ack"), doc("error")].concat();
        assert_eq!(
            decode_all(Decoder::control_from_server(), &server_bytes),
            Ok(server.to_vec())
        );
        assert_eq!(concat(&server), server_bytes);

        let frame = batch(0, &example_events());
        let decoded = decode_all(Decoder::batch_stream(Limits::DEFAULT, 1), doc("batch"))
            .expect("the example batch decodes");
        assert_eq!(decoded, std::slice::from_ref(&frame));
        assert_eq!(bytes(&frame), doc("batch"));
        let Frame::Batch(b) = &decoded[0] else {
            unreachable!()
        };
        assert_eq!(b.verify().map(|v| v.to_events()), Ok(example_events()));
        // The error message in the example is the decoder's own text for that limit.
        let mut too_many = batch_header(0, 1, 9000, 0).expect("header").to_vec();
        too_many.extend_from_slice(&[0; 8]);
        assert_eq!(
            error_text(Decoder::batch_stream(Limits::DEFAULT, 1), &too_many),
            "batch of 9000 events exceeds the limit of 8192 (max_events_per_frame)"
        );
    }

    #[test]
    fn every_split_point_gives_the_same_frames() {
        for (make, frames) in [
            (
                Decoder::control_from_server as fn() -> Decoder,
                server_frames(),
            ),
            (batches as fn() -> Decoder, batch_frames()),
        ] {
            let stream = concat(&frames);
            for i in 0..=stream.len() {
                let (a, b) = stream.split_at(i);
                assert_eq!(
                    decode_chunks(make(), &[a, b]).as_ref(),
                    Ok(&frames),
                    "split {i}"
                );
            }
            // Two split points, on the shorter stream only (quadratic).
            if stream.len() < 200 {
                for i in 0..=stream.len() {
                    for j in i..=stream.len() {
                        let chunks = [&stream[..i], &stream[i..j], &stream[j..]];
                        assert_eq!(decode_chunks(make(), &chunks).as_ref(), Ok(&frames));
                    }
                }
            }
            let singles: Vec<&[u8]> = stream.chunks(1).collect();
            assert_eq!(decode_chunks(make(), &singles), Ok(frames));
        }
    }

    #[test]
    fn a_truncated_stream_needs_more_data_then_fails_at_its_end() {
        let frames = batch_frames();
        let stream = concat(&frames);
        let first_len = bytes(&frames[0]).len();
        // Offsets where a frame ends: the only places a stream may end.
        let ends: Vec<usize> = frames
            .iter()
            .scan(0, |end, f| {
                *end += bytes(f).len();
                Some(*end)
            })
            .collect();
        for cut in 0..stream.len() {
            let mut decoder = batches();
            let mut input = &stream[..cut];
            let mut decoded = 0;
            while decoder
                .decode(&mut input)
                .expect("a prefix is not an error")
                .is_some()
            {
                decoded += 1;
            }
            assert_eq!(decoded, ends.iter().filter(|&&end| end <= cut).count());
            assert!(input.is_empty());
            let at_boundary = cut == 0 || ends.contains(&cut);
            assert_eq!(decoder.finish().is_ok(), at_boundary, "cut {cut}");
        }
        assert_eq!(
            error_text(batches(), &stream[..2]),
            "stream ended inside a frame: 2 of 4 bytes received"
        );
        assert_eq!(
            error_text(batches(), &stream[..10]),
            format!("stream ended inside a frame: 10 of {first_len} bytes received")
        );
        assert_eq!(
            error_text(batches(), &stream[..first_len - 1]),
            format!(
                "stream ended inside a frame: {} of {first_len} bytes received",
                first_len - 1
            )
        );
    }

    #[test]
    fn frame_size_limit_holds_before_anything_is_buffered() {
        let mut decoder = batches();
        let mut input: &[u8] = &[0x00, 0x89, 0x54, 0x40, 0x10, 0, 0];
        let err = decoder.decode(&mut input).expect_err("over the limit");
        assert_eq!(
            err.to_string(),
            "frame of 9000000 bytes exceeds the limit of 4194304 (max_frame_bytes)"
        );
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
        assert_eq!(input.len(), 3, "stops right after the length prefix");
        assert_eq!(
            decoder.decode(&mut &b"more"[..]),
            Err(ProtocolError::AlreadyFailed)
        );
        assert_eq!(decoder.finish(), Err(ProtocolError::AlreadyFailed));

        assert_eq!(
            error_text(Decoder::control_from_client(), &[0, 1, 0, 1, 0x01]),
            "frame of 65537 bytes exceeds the limit of 65536 (max_control_frame_bytes)"
        );
    }

    #[test]
    fn frame_of_exactly_max_frame_bytes_is_accepted_one_more_is_not() {
        let payload = crate::encode(&example_events());
        let limit = (BATCH_HEADER_BYTES + payload.len()) as u32;
        let limits = Limits {
            max_frame_bytes: limit,
            ..Limits::DEFAULT
        };
        let frame = batch(0, &example_events());
        assert_eq!(
            decode_all(Decoder::batch_stream(limits, 1), &bytes(&frame)),
            Ok(vec![frame.clone()])
        );
        let smaller = Limits {
            max_frame_bytes: limit - 1,
            ..limits
        };
        assert_eq!(
            error_text(Decoder::batch_stream(smaller, 1), &bytes(&frame)),
            format!(
                "frame of {limit} bytes exceeds the limit of {} (max_frame_bytes)",
                limit - 1
            )
        );
    }

    #[test]
    fn memory_follows_the_bytes_received_not_the_announced_length() {
        let mut decoder = batches();
        let header = batch_header(0, 0, 1, 4 * 1024 * 1024 - BATCH_HEADER_BYTES).expect("header");
        let mut input = &header[..];
        assert_eq!(decoder.decode(&mut input), Ok(None));
        let mut input: &[u8] = &[0; 100];
        assert_eq!(decoder.decode(&mut input), Ok(None));
        assert_eq!(decoder.buffered(), header.len() + 100);
        assert!(decoder.body.capacity() <= MIN_BODY_CAPACITY);
    }

    #[test]
    fn events_per_frame_limit_holds_at_the_header() {
        let limits = Limits {
            max_events_per_frame: 3,
            ..Limits::DEFAULT
        };
        let events = vec![Event::new("x", 0); 3];
        let frame = batch(0, &events);
        assert_eq!(
            decode_all(Decoder::batch_stream(limits, 1), &bytes(&frame)),
            Ok(vec![frame])
        );
        let mut decoder = Decoder::batch_stream(limits, 1);
        let header = batch_header(0, 0, 4, 1_000_000).expect("header");
        let mut input = &header[..];
        let err = decoder.decode(&mut input).expect_err("too many events");
        assert_eq!(
            err.to_string(),
            "batch of 4 events exceeds the limit of 3 (max_events_per_frame)"
        );
        assert_eq!(err.code(), ErrorCode::TooManyEvents);
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn batch_for_a_pipeline_the_hello_did_not_list() {
        let header = batch_header(2, 0, 0, 0).expect("header");
        assert_eq!(
            error_text(batches(), &header),
            "batch for pipeline index 2, but hello listed 2 pipelines"
        );
    }

    #[test]
    fn batch_shorter_than_its_header() {
        assert_eq!(
            error_text(batches(), &[0, 0, 0, 14, 0x10]),
            "`batch` frame of 14 bytes is shorter than its 15-byte header"
        );
    }

    #[test]
    fn zero_length_frame_and_empty_payload() {
        let err = decode_all(batches(), &[0, 0, 0, 0]).expect_err("empty frame");
        assert_eq!(
            err.to_string(),
            "frame of 0 bytes: every frame holds at least its type byte"
        );
        assert_eq!(err.code(), ErrorCode::ProtocolViolation);
        // A batch frame with an empty payload frames fine and fails verification.
        let header = batch_header(1, 5, 0, 0).expect("header");
        let frames = decode_all(batches(), &header).expect("frames");
        let [Frame::Batch(b)] = &frames[..] else {
            panic!("one batch expected, got {frames:?}")
        };
        let err = b.verify().expect_err("no payload");
        assert_eq!(
            err.to_string(),
            "batch 5: payload is not a valid weir batch: not a weir batch: missing the `WEIR` file identifier (0 bytes)"
        );
        assert_eq!(err.code(), ErrorCode::InvalidBatch);
    }

    #[test]
    fn garbage_payload_and_lying_event_count_fail_verification() {
        let garbage = Frame::Batch(BatchFrame {
            pipeline: 0,
            sequence: 3,
            event_count: 1,
            payload: b"\x08\x00\x00\x00WEIRgarbage!".to_vec(),
        });
        let frames = decode_all(batches(), &bytes(&garbage)).expect("framing is fine");
        let [Frame::Batch(b)] = &frames[..] else {
            panic!("one batch expected")
        };
        let err = b.verify().expect_err("garbage");
        // One line in the house style, not the verifier's capitalised multi-line text.
        assert_eq!(
            err.to_string(),
            "batch 3: payload is not a valid weir batch: malformed batch: signed offset at position 8 has value 1651663207 which points out of bounds"
        );
        // A length pointing past the end, deep in the batch: the trace, one level per clause.
        let mut payload = crate::encode(&example_events());
        let n = payload.len();
        payload[n - 8] = 0xff;
        let deep = BatchFrame {
            pipeline: 0,
            sequence: 4,
            event_count: 1,
            payload,
        };
        assert_eq!(
            deep.verify().map(|_| ()).map_err(|e| e.to_string()),
            Err("batch 4: payload is not a valid weir batch: malformed batch: range [84, 339) is out of bounds, while verifying table field `key` at position 48, while verifying vector element 0 at position 28, while verifying table field `events` at position 20".into())
        );
        let lying = BatchFrame {
            pipeline: 0,
            sequence: 4,
            event_count: 2,
            payload: crate::encode(&example_events()),
        };
        assert_eq!(
            lying.verify().map(|_| ()).map_err(|e| e.to_string()),
            Err("batch 4: header declares 2 events, payload holds 1".into())
        );
    }

    #[test]
    fn unknown_and_misplaced_frame_types() {
        assert_eq!(
            error_text(batches(), &[0, 0, 0, 1, 0x7f]),
            "unknown frame type 0x7f"
        );
        assert_eq!(
            error_text(Decoder::control_from_server(), &[0, 0, 0, 1, 0x00]),
            "unknown frame type 0x00"
        );
        assert_eq!(
            error_text(batches(), &bytes(&Frame::Hello(hello()))),
            "unexpected `hello` frame on a batch stream"
        );
        assert_eq!(
            error_text(Decoder::control_from_client(), &bytes(&batch(0, &[]))),
            "unexpected `batch` frame on the control stream before `hello`"
        );
        let twice = concat(&[Frame::Hello(hello()), Frame::Hello(hello())]);
        assert_eq!(
            error_text(Decoder::control_from_client(), &twice),
            "unexpected `hello` frame on the control stream after `hello`"
        );
        let ack = Frame::Ack(Ack {
            pipeline: 0,
            next: 1,
        });
        assert_eq!(
            error_text(Decoder::control_from_server(), &bytes(&ack)),
            "unexpected `ack` frame on the control stream before `welcome`"
        );
        let refused = concat(&[
            Frame::Refuse(Refuse {
                code: ErrorCode::Unauthenticated,
                message: "bad token".into(),
            }),
            ack.clone(),
        ]);
        assert_eq!(
            error_text(Decoder::control_from_server(), &refused),
            "unexpected `ack` frame on the control stream after `refuse`"
        );
        let two_welcomes = concat(&[Frame::Welcome(welcome()), Frame::Welcome(welcome())]);
        assert_eq!(
            error_text(Decoder::control_from_server(), &two_welcomes),
            "unexpected `welcome` frame on the control stream after `welcome`"
        );
    }

    #[test]
    fn bad_version() {
        let mut frame = bytes(&Frame::Hello(hello()));
        frame[5..7].copy_from_slice(&[0, 0]);
        let err = decode_all(Decoder::control_from_client(), &frame).expect_err("version 0");
        assert_eq!(
            err.to_string(),
            "unsupported protocol version 0 (this side speaks 1 to 1)"
        );
        assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
        let mut bad = welcome();
        bad.version = 0;
        assert_eq!(
            encode(&Frame::Welcome(bad), &mut Vec::new()),
            Err(ProtocolError::UnsupportedVersion { version: 0 })
        );
        assert_eq!(negotiate_version(1), Ok(1));
        assert_eq!(negotiate_version(7), Ok(1));
        assert_eq!(
            negotiate_version(0),
            Err(ProtocolError::UnsupportedVersion { version: 0 })
        );
        // A newer client's hello decodes; the server answers with its own revision.
        let mut newer = hello();
        newer.version = 3;
        let frame = Frame::Hello(newer);
        assert_eq!(
            decode_all(Decoder::control_from_client(), &bytes(&frame)),
            Ok(vec![frame])
        );
    }

    /// A `hello` built by hand, so that invalid fields can be put on the wire; `hello_error`
    /// checks both directions: `encode` refuses the frame, and these bytes decode to the same error.
    fn hello_bytes(producer_id: &[u8], token: &[u8], pipelines: &[&[u8]]) -> Vec<u8> {
        let mut body = vec![frame_type::HELLO, 0, 1];
        for field in [producer_id, token] {
            body.extend_from_slice(&(field.len() as u16).to_be_bytes());
            body.extend_from_slice(field);
        }
        body.extend_from_slice(&(pipelines.len() as u16).to_be_bytes());
        for p in pipelines {
            body.extend_from_slice(&(p.len() as u16).to_be_bytes());
            body.extend_from_slice(p);
        }
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }

    fn hello_error(producer_id: &[u8], token: &[u8], pipelines: &[&[u8]]) -> String {
        let wire = hello_bytes(producer_id, token, pipelines);
        let decoded = error_text(Decoder::control_from_client(), &wire);
        if let (Ok(id), Ok(names)) = (
            std::str::from_utf8(producer_id),
            pipelines
                .iter()
                .map(|p| std::str::from_utf8(p).map(str::to_owned))
                .collect::<Result<Vec<_>, _>>(),
        ) {
            let frame = Frame::Hello(Hello {
                version: 1,
                producer_id: id.to_owned(),
                token: token.to_vec(),
                pipelines: names,
            });
            let mut out = vec![0xaa];
            let encoded = encode(&frame, &mut out).expect_err("encode refuses too");
            assert_eq!(encoded.to_string(), decoded);
            assert_eq!(out, [0xaa], "a failed encode leaves the buffer as it was");
        }
        decoded
    }

    #[test]
    fn string_and_count_limits_at_and_over_their_edge() {
        let name = [b'n'; MAX_NAME_BYTES];
        let token = [7; MAX_TOKEN_BYTES];
        let many: Vec<Vec<u8>> = (0..MAX_PIPELINES)
            .map(|i| format!("p{i}").into_bytes())
            .collect();
        let many_refs: Vec<&[u8]> = many.iter().map(Vec::as_slice).collect();
        let at_limit = hello_bytes(&name, &token, &many_refs);
        let frames = decode_all(Decoder::control_from_client(), &at_limit).expect("at the limits");
        assert_eq!(concat(&frames), at_limit);

        assert_eq!(
            hello_error(&[b'n'; MAX_NAME_BYTES + 1], b"", &[b"a"]),
            "`hello` frame: producer_id of 256 bytes exceeds the limit of 255 (max_name_bytes)"
        );
        assert_eq!(
            hello_error(b"p", &[0; MAX_TOKEN_BYTES + 1], &[b"a"]),
            "`hello` frame: token of 4097 bytes exceeds the limit of 4096 (max_token_bytes)"
        );
        assert_eq!(
            hello_error(b"p", b"", &[&[b'n'; 300]]),
            "`hello` frame: pipeline name of 300 bytes exceeds the limit of 255 (max_name_bytes)"
        );
        assert_eq!(
            hello_error(b"", b"", &[b"a"]),
            "`hello` frame: producer_id is empty"
        );
        assert_eq!(
            hello_error(b"p", b"", &[b""]),
            "`hello` frame: pipeline name is empty"
        );
        assert_eq!(
            hello_error(b"p", b"", &[]),
            "`hello` frame: pipelines is empty"
        );
        assert_eq!(
            hello_error(b"p", b"", &[b"clicks", b"views", b"clicks"]),
            "`hello` frame lists pipeline `clicks` twice"
        );
        assert_eq!(
            hello_error(b"\xff", b"", &[b"a"]),
            "`hello` frame: producer_id is not valid utf-8"
        );
        let mut too_many = many_refs.clone();
        too_many.push(b"one-more");
        assert_eq!(
            hello_error(b"p", b"", &too_many),
            "`hello` frame lists 129 pipelines, over the limit of 128 (max_pipelines)"
        );

        let long = "m".repeat(MAX_MESSAGE_BYTES);
        let goaway = Frame::Goaway(Goaway { message: long });
        let ok = concat(&[Frame::Welcome(welcome()), goaway]);
        assert_eq!(
            decode_all(Decoder::control_from_server(), &ok).map(|f| f.len()),
            Ok(2)
        );
        let too_long = Frame::Goaway(Goaway {
            message: "m".repeat(MAX_MESSAGE_BYTES + 1),
        });
        assert_eq!(
            encode(&too_long, &mut Vec::new()).map_err(|e| e.to_string()),
            Err(
                "`goaway` frame: message of 1025 bytes exceeds the limit of 1024 (max_message_bytes)"
                    .into()
            )
        );
    }

    #[test]
    fn truncated_fields_and_trailing_bytes() {
        let mut wire = bytes(&Frame::Hello(hello()));
        // Cut the last byte of the body but fix the length prefix: the field is short.
        wire.pop();
        let len = (wire.len() - LENGTH_BYTES) as u32;
        wire[..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(
            error_text(Decoder::control_from_client(), &wire),
            "`hello` frame ends inside field `pipeline name`"
        );
        let ack = [0, 0, 0, 12, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xee];
        let mut control = bytes(&Frame::Welcome(welcome()));
        control.extend_from_slice(&ack);
        assert_eq!(
            error_text(Decoder::control_from_server(), &control),
            "`ack` frame has 1 trailing bytes"
        );
        let mut short_ack = bytes(&Frame::Welcome(welcome()));
        short_ack.extend_from_slice(&[0, 0, 0, 3, 0x04, 0, 0]);
        assert_eq!(
            error_text(Decoder::control_from_server(), &short_ack),
            "`ack` frame ends inside field `next`"
        );
    }

    #[test]
    fn welcome_acked_mark_cannot_pass_next_sequence() {
        let mut bad = welcome();
        bad.pipelines[0] = PipelineState {
            next_sequence: 5,
            acked_below: 7,
        };
        let text = "`welcome` frame: pipeline 0 has acked_below 7 above next_sequence 5";
        assert_eq!(
            encode(&Frame::Welcome(bad), &mut Vec::new()).map_err(|e| e.to_string()),
            Err(text.into())
        );
        let mut wire = bytes(&Frame::Welcome(welcome()));
        let n = wire.len();
        wire[n - 16..n - 8].copy_from_slice(&5u64.to_be_bytes());
        wire[n - 8..].copy_from_slice(&7u64.to_be_bytes());
        assert_eq!(error_text(Decoder::control_from_server(), &wire), text);
    }

    #[test]
    fn error_codes_round_trip_and_retryability() {
        for code in 0..=0xffu16 {
            assert_eq!(ErrorCode::from_u16(code).to_u16(), code);
        }
        assert_eq!(ErrorCode::from_u16(0x0e), ErrorCode::Unknown(0x0e));
        assert!(ErrorCode::ShuttingDown.is_retryable());
        assert!(!ErrorCode::InvalidBatch.is_retryable());
        assert!(!ErrorCode::Unknown(0x0e).is_retryable());
    }
}
