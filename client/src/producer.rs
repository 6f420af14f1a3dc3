//! [`ProducerCore`]: the sans-IO producer. It batches events per pipeline (by count, by bytes and
//! by linger, with time passed in by the caller), numbers batches with per-pipeline sequence
//! numbers (docs/PROTOCOL.md §7, §9), keeps every unacked batch in a buffer bounded in bytes,
//! releases batches on cumulative `ack` frames and yields the unacked ones again after a
//! reconnect.
//!
//! Decisions:
//! - Events go straight into one [`BatchBuilder`] per pipeline, so each event is copied once
//!   into its FlatBuffers batch. Since the builder does not expose its size, batch and buffer
//!   sizes are counted with [`encoded_len_bound`], an upper bound of an event's encoded size;
//!   a finished payload is therefore never larger than what was counted for it.
//! - The sequence of a batch is fixed when the batch is opened: [`SendOutcome::Queued`] says
//!   which batch holds the event, so the I/O layer can complete the event's future when
//!   [`ProducerCore::on_ack`] reports that sequence.
//! - A batch is kept, header and payload, from the moment it is closed until an ack covers it.
//!   The buffer counts open and closed batches; when an event does not fit, `send` answers
//!   [`SendOutcome::Full`] and takes nothing: the caller waits for an ack (backpressure), and
//!   nothing is ever dropped.
//! - At most `max_in_flight` batches per pipeline are handed to the I/O layer before their ack:
//!   the server would not read more (§8), and the rest stays here rather than in QUIC buffers.
//! - After a reconnect every held batch not covered by the new `welcome`'s `acked_below` is
//!   yielded again with its original sequence (those the server accepted already are dropped
//!   by it as duplicates). A `welcome` or `ack` that contradicts what this producer knows
//!   (acks going backwards, acks for batches never sent, a server ahead of the producer) is a
//!   [`ClientError`], never a panic and never a silent repair.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

use bytes::Bytes;
use weir_format::frame::{
    Ack, BATCH_HEADER_BYTES, ErrorCode, Hello, LENGTH_BYTES, Limits, MAX_PIPELINES,
    PROTOCOL_VERSION, Welcome, batch_header,
};
use weir_format::{Batch, BatchBuilder, Event};

/// Bytes of the length prefix and batch header that precede every payload.
const FRAME_HEADER_BYTES: usize = LENGTH_BYTES + BATCH_HEADER_BYTES;

/// Upper bound of the FlatBuffers bytes of a batch besides its events: root offset, file
/// identifier, the `Batch` table and its vtable, the events vector's length and alignment.
pub const BATCH_OVERHEAD_BYTES: usize = 64;

/// Upper bound of an event's fixed FlatBuffers bytes: its table (6 fields, 32 bytes, plus
/// alignment), its vtable, its slot in the events vector, and the length prefixes and padding of
/// key, value, route and headers vector.
const EVENT_OVERHEAD_BYTES: usize = 128;

/// Upper bound of a header's fixed bytes: its table and vtable, its slot in the headers vector,
/// the length prefixes, terminator and padding of its name and value.
const HEADER_OVERHEAD_BYTES: usize = 64;

/// An upper bound of the bytes `event` takes in a batch payload (its share of the FlatBuffers
/// buffer, without [`BATCH_OVERHEAD_BYTES`]). Batch and buffer sizes are counted with it.
pub fn encoded_len_bound(event: &Event) -> usize {
    let headers: usize = event
        .headers
        .iter()
        .map(|(name, value)| {
            HEADER_OVERHEAD_BYTES
                .saturating_add(name.len())
                .saturating_add(value.len())
        })
        .fold(0, usize::saturating_add);
    EVENT_OVERHEAD_BYTES
        .saturating_add(event.key.as_ref().map_or(0, Vec::len))
        .saturating_add(event.value.len())
        .saturating_add(event.route.as_ref().map_or(0, String::len))
        .saturating_add(headers)
}

/// How the producer batches and how much it buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerConfig {
    /// The producer's stable identity (the key of the server's sequence state).
    pub producer_id: String,
    /// Auth token sent in `hello` (empty when a client certificate authenticates).
    pub token: Vec<u8>,
    /// Pipelines this producer writes to; [`ProducerCore::send`] names one by its index here.
    pub pipelines: Vec<String>,
    /// Most events per batch; the server's `max_events_per_frame` caps it further.
    pub max_batch_events: u32,
    /// Target payload bytes per batch (counted with [`encoded_len_bound`]); the server's
    /// `max_frame_bytes` caps it further. A single event larger than this still travels alone.
    pub max_batch_bytes: usize,
    /// How long the first event of a batch may wait for more events before the batch is due.
    pub linger: Duration,
    /// Bytes of open and unacked batches (headers included) the producer holds before
    /// [`ProducerCore::send`] answers [`SendOutcome::Full`].
    pub max_buffer_bytes: usize,
}

impl ProducerConfig {
    /// A configuration with the defaults: batches of up to 8192 events and 1 MiB (a fraction of
    /// the server's 4 MiB frame, so a batch is ready long before the frame limit), 5 ms of linger
    /// (a small share of end-to-end latency, long enough to fill batches at high rates), and a
    /// 64 MiB buffer (the default 16 batches in flight of 1 MiB on a few pipelines, plus room to
    /// keep producing during a reconnect).
    pub fn new(producer_id: impl Into<String>, pipelines: Vec<String>) -> Self {
        ProducerConfig {
            producer_id: producer_id.into(),
            token: Vec::new(),
            pipelines,
            max_batch_events: 8192,
            max_batch_bytes: 1024 * 1024,
            linger: Duration::from_millis(5),
            max_buffer_bytes: 64 * 1024 * 1024,
        }
    }
}

/// An error of the producer: bad configuration or input, or a server whose state contradicts
/// what this producer knows. The I/O layer closes the connection on a server-side error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The configuration cannot work.
    #[error("invalid producer config: {0}")]
    InvalidConfig(String),
    /// `send` or `ack` before the first `welcome`.
    #[error("no welcome received yet: the producer cannot number batches before the handshake")]
    NotWelcomed,
    /// A pipeline index outside the configured pipelines.
    #[error("pipeline index {index} is unknown: the producer has {count} pipelines")]
    UnknownPipeline {
        /// The index given.
        index: u16,
        /// Configured pipelines.
        count: usize,
    },
    /// An event that cannot fit in any batch frame the server accepts.
    #[error("event of {bytes} bytes exceeds the server's frame limit of {limit} bytes")]
    EventTooLarge {
        /// The frame bytes a batch holding only this event may need.
        bytes: usize,
        /// The server's `max_frame_bytes`.
        limit: u32,
    },
    /// An event that cannot fit in the buffer even when it is empty.
    #[error("event of {bytes} bytes exceeds the buffer of {limit} bytes (max_buffer_bytes)")]
    EventExceedsBuffer {
        /// The bytes the event needs in the buffer.
        bytes: usize,
        /// The configured buffer.
        limit: usize,
    },
    /// An encoded batch handed to [`ProducerCore::send_batch`] that is not a valid weir batch.
    #[error("encoded batch is not a valid weir batch: {0}")]
    InvalidEncodedBatch(String),
    /// An encoded batch over the server's limits.
    #[error(
        "encoded batch of {events} events and {bytes} frame bytes exceeds the server's limits ({max_events} events, {max_frame_bytes} bytes)"
    )]
    EncodedBatchOverLimits {
        /// Events in the batch.
        events: u32,
        /// Its frame length.
        bytes: usize,
        /// The server's `max_events_per_frame`.
        max_events: u32,
        /// The server's `max_frame_bytes`.
        max_frame_bytes: u32,
    },
    /// A finished batch over the frame limit (the size bound failed; the events are lost).
    #[error(
        "batch {sequence} of pipeline `{pipeline}`: frame of {bytes} bytes exceeds the limit of {limit} (max_frame_bytes)"
    )]
    BatchTooLarge {
        /// The pipeline's name.
        pipeline: String,
        /// The batch's sequence.
        sequence: u64,
        /// The frame's length prefix.
        bytes: usize,
        /// The server's limit.
        limit: u32,
    },
    /// A pipeline numbered its last possible batch.
    #[error("pipeline `{0}` has no sequence numbers left")]
    SequencesExhausted(String),
    /// A `welcome` with a version this producer did not offer.
    #[error(
        "welcome with protocol version {version}, but the producer offered 1 to {PROTOCOL_VERSION}"
    )]
    UnsupportedVersion {
        /// The version received.
        version: u16,
    },
    /// A `welcome` with another number of pipelines than the `hello`.
    #[error("welcome lists {got} pipelines, but hello listed {expected}")]
    PipelineCountMismatch {
        /// Pipelines in the `welcome`.
        got: usize,
        /// Pipelines in the `hello`.
        expected: usize,
    },
    /// A `welcome` limit no batch can satisfy.
    #[error("welcome limit {name} of {value} leaves no room for a batch")]
    UnusableLimit {
        /// The limit's name.
        name: &'static str,
        /// Its value.
        value: u32,
    },
    /// A `welcome` pipeline state whose acked mark is above its next sequence.
    #[error(
        "welcome for pipeline `{pipeline}`: acked_below {acked_below} above next_sequence {next_sequence}"
    )]
    AckedAboveNext {
        /// The pipeline's name.
        pipeline: String,
        /// The acked mark.
        acked_below: u64,
        /// The next sequence.
        next_sequence: u64,
    },
    /// A `welcome` whose server expects a sequence the producer never numbered.
    #[error(
        "welcome for pipeline `{pipeline}`: server expects sequence {next_sequence}, but the producer numbered only below {numbered_below}"
    )]
    ServerAhead {
        /// The pipeline's name.
        pipeline: String,
        /// The server's next sequence.
        next_sequence: u64,
        /// The producer's next sequence.
        numbered_below: u64,
    },
    /// A `welcome` whose server expects a sequence the producer released already.
    #[error(
        "welcome for pipeline `{pipeline}`: server expects sequence {next_sequence}, but the producer holds batches only from {held_from}"
    )]
    ServerBehind {
        /// The pipeline's name.
        pipeline: String,
        /// The server's next sequence.
        next_sequence: u64,
        /// The oldest sequence the producer can still send.
        held_from: u64,
    },
    /// A `welcome` whose acked mark is below one the server already acked.
    #[error(
        "welcome for pipeline `{pipeline}`: acked_below {acked_below} is below the ack {acked} the server already sent"
    )]
    AckRegressed {
        /// The pipeline's name.
        pipeline: String,
        /// The `welcome`'s acked mark.
        acked_below: u64,
        /// The producer's acked mark.
        acked: u64,
    },
    /// An unacked batch over a new `welcome`'s limits.
    #[error(
        "pipeline `{pipeline}`: unacked batch {sequence} ({bytes} bytes, {events} events) exceeds the new welcome's limits ({max_frame_bytes} bytes, {max_events} events)"
    )]
    HeldBatchOverLimits {
        /// The pipeline's name.
        pipeline: String,
        /// The batch's sequence, or the next sequence for the open batch.
        sequence: u64,
        /// Frame bytes (length prefix value).
        bytes: usize,
        /// Events.
        events: u32,
        /// The new `max_frame_bytes`.
        max_frame_bytes: u32,
        /// The new `max_events_per_frame`.
        max_events: u32,
    },
    /// An `ack` for a pipeline index the `hello` did not list.
    #[error("ack for pipeline index {index}, but hello listed {count} pipelines")]
    AckUnknownPipeline {
        /// The index in the ack.
        index: u16,
        /// Pipelines in the `hello`.
        count: usize,
    },
    /// An `ack` below an earlier one (acks are cumulative).
    #[error("ack for pipeline `{pipeline}` goes backwards: next {next} after {acked}")]
    AckBackwards {
        /// The pipeline's name.
        pipeline: String,
        /// The ack's bound.
        next: u64,
        /// The bound already acked.
        acked: u64,
    },
    /// An `ack` covering sequences never sent.
    #[error(
        "ack for pipeline `{pipeline}` up to {next}, but only sequences below {sent_below} were sent"
    )]
    AckBeyondSent {
        /// The pipeline's name.
        pipeline: String,
        /// The ack's bound.
        next: u64,
        /// One past the highest sequence sent (or accepted by the server).
        sent_below: u64,
    },
    /// No way to authenticate the server was configured.
    #[error(
        "no way to verify the server: pin the certificate fingerprint `weir serve` printed, or give a CA file"
    )]
    NoTrust,
    /// A certificate, key or CA file that cannot be used, or a TLS configuration rustls refuses.
    #[error("tls setup: {0}")]
    Tls(String),
    /// The connection to the server could not be established (network, QUIC or TLS handshake).
    #[error("cannot connect to {server}: {message}")]
    Connect {
        /// The server's address.
        server: String,
        /// What failed.
        message: String,
    },
    /// The server refused the `hello` (a `refuse` frame, or a close during the handshake).
    #[error("refused by {server}: {}: {message}", code_label(*code))]
    Refused {
        /// The server's address.
        server: String,
        /// The refusal's code.
        code: ErrorCode,
        /// The server's message.
        message: String,
    },
    /// The server reported a non-retryable error for a stream or the connection.
    #[error("error from {server} on stream {stream}: {}: {message}", code_label(*code))]
    Server {
        /// The server's address.
        server: String,
        /// The error's code.
        code: ErrorCode,
        /// The QUIC id of the failed stream (0: the connection).
        stream: u64,
        /// The server's message.
        message: String,
    },
    /// The server closed the connection with a non-retryable code.
    #[error("connection closed by {server}: {}: {message}", code_label(*code))]
    Closed {
        /// The server's address.
        server: String,
        /// The close's code.
        code: ErrorCode,
        /// The close's reason phrase.
        message: String,
    },
    /// The server sent bytes that are not valid `weir/1` frames.
    #[error("protocol error from {server}: {message}")]
    Protocol {
        /// The server's address.
        server: String,
        /// What was wrong.
        message: String,
    },
    /// Reconnecting did not succeed within the reconnect policy's deadline.
    #[error("gave up reconnecting to {server} after {seconds} s: {last}")]
    GaveUp {
        /// The server's address.
        server: String,
        /// Seconds spent trying.
        seconds: u64,
        /// The last failure.
        last: String,
    },
    /// A pipeline name the producer was not configured with.
    #[error("pipeline `{0}` is not one of the producer's pipelines")]
    UnknownPipelineName(String),
    /// The producer was closed (or dropped) before the operation completed.
    #[error("the producer is closed")]
    ProducerClosed,
}

/// An error code as messages show it: its name and wire value, e.g. `UNAUTHENTICATED (0x03)`.
pub fn code_label(code: ErrorCode) -> String {
    let name = match code {
        ErrorCode::NoError => "NO_ERROR",
        ErrorCode::ProtocolViolation => "PROTOCOL_VIOLATION",
        ErrorCode::UnsupportedVersion => "UNSUPPORTED_VERSION",
        ErrorCode::Unauthenticated => "UNAUTHENTICATED",
        ErrorCode::Unauthorized => "UNAUTHORIZED",
        ErrorCode::UnknownPipeline => "UNKNOWN_PIPELINE",
        ErrorCode::FrameTooLarge => "FRAME_TOO_LARGE",
        ErrorCode::TooManyEvents => "TOO_MANY_EVENTS",
        ErrorCode::InvalidBatch => "INVALID_BATCH",
        ErrorCode::SequenceGap => "SEQUENCE_GAP",
        ErrorCode::TooManyProducers => "TOO_MANY_PRODUCERS",
        ErrorCode::Superseded => "SUPERSEDED",
        ErrorCode::ShuttingDown => "SHUTTING_DOWN",
        ErrorCode::InternalError => "INTERNAL_ERROR",
        ErrorCode::Unknown(_) => "unknown code",
    };
    format!("{name} (0x{:02x})", code.to_u16())
}

/// What [`ProducerCore::send`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// The event is in the batch with this sequence; it is acked when
    /// [`ProducerCore::on_ack`] reports that sequence completed.
    Queued {
        /// The sequence of the batch holding the event.
        sequence: u64,
    },
    /// The buffer is full: the event was not taken. Wait for an ack, then send it again.
    Full,
}

/// Batches released by an ack: every event in them is held by every required sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The pipeline index.
    pub pipeline: u16,
    /// The sequences of the released batches (empty when the ack released nothing held).
    pub sequences: Range<u64>,
}

/// A batch frame ready to be written on its pipeline's batch stream: `header` then `payload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The pipeline index (write on this pipeline's stream).
    pub pipeline: u16,
    /// The batch's sequence.
    pub sequence: u64,
    /// Events in the batch.
    pub event_count: u32,
    /// Length prefix and batch header ([`batch_header`]).
    pub header: [u8; FRAME_HEADER_BYTES],
    /// The FlatBuffers batch; cheap to clone, shared with the resend buffer.
    pub payload: Bytes,
}

/// A FlatBuffers batch encoded elsewhere, verified once, for [`ProducerCore::send_batch`].
/// Cloning it is cheap (the payload is shared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedBatch {
    payload: Bytes,
    events: u32,
}

impl EncodedBatch {
    /// Verifies `payload` as a weir batch (`wit/batch.fbs`, identifier `WEIR`), so that a
    /// batch the server would refuse as `INVALID_BATCH` is an error before it is numbered.
    pub fn new(payload: Bytes) -> Result<EncodedBatch, ClientError> {
        let events = Batch::verify(&payload)
            .map_err(|e| ClientError::InvalidEncodedBatch(e.to_string()))?
            .len();
        let events = u32::try_from(events).map_err(|_| {
            ClientError::InvalidEncodedBatch(format!("{events} events do not fit a frame"))
        })?;
        Ok(EncodedBatch { payload, events })
    }

    /// Events in the batch.
    pub fn events(&self) -> u32 {
        self.events
    }

    /// The FlatBuffers bytes.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }
}

/// A closed batch, kept until an ack covers it.
#[derive(Debug)]
struct HeldBatch {
    sequence: u64,
    event_count: u32,
    header: [u8; FRAME_HEADER_BYTES],
    payload: Bytes,
}

impl HeldBatch {
    /// Bytes counted in the buffer.
    fn buffer_bytes(&self) -> usize {
        FRAME_HEADER_BYTES + self.payload.len()
    }
}

/// Per-pipeline state.
struct Pipeline {
    name: String,
    builder: BatchBuilder,
    /// Events in the open batch.
    open_events: u32,
    /// Sum of [`encoded_len_bound`] over the open batch's events.
    open_bytes: usize,
    /// When the open batch's first event arrived.
    open_since: Option<Instant>,
    /// The sequence of the open (or next) batch.
    next_sequence: u64,
    /// Every sequence below is acked.
    acked_below: u64,
    /// One past the highest sequence sent or accepted by the server: acks may not go beyond.
    sent_below: u64,
    /// Closed unacked batches, consecutive sequences ending at `next_sequence - 1`.
    held: VecDeque<HeldBatch>,
    /// `held[..written]` were handed out on the current connection.
    written: usize,
}

impl Pipeline {
    /// Bytes the open batch counts in the buffer (nothing when it is empty).
    fn open_buffer_bytes(&self) -> usize {
        if self.open_events == 0 {
            0
        } else {
            FRAME_HEADER_BYTES + BATCH_OVERHEAD_BYTES + self.open_bytes
        }
    }
}

/// The producer's sans-IO core: see the crate documentation for how the I/O layer drives it.
pub struct ProducerCore {
    config: ProducerConfig,
    pipelines: Vec<Pipeline>,
    /// The last `welcome`'s limits; `None` before the first one.
    limits: Option<Limits>,
    connected: bool,
    /// Bytes of open and held batches, as counted by `Pipeline::open_buffer_bytes` and
    /// `HeldBatch::buffer_bytes`.
    buffered: usize,
    /// Where `poll_transmit` starts looking, so that no pipeline starves another.
    next_poll: usize,
}

impl ProducerCore {
    /// A producer core for `config`, not yet connected.
    pub fn new(config: ProducerConfig) -> Result<Self, ClientError> {
        let count = config.pipelines.len();
        if count == 0 || count > MAX_PIPELINES {
            return Err(ClientError::InvalidConfig(format!(
                "{count} pipelines, the protocol allows 1 to {MAX_PIPELINES}"
            )));
        }
        for (i, name) in config.pipelines.iter().enumerate() {
            if config.pipelines[..i].contains(name) {
                return Err(ClientError::InvalidConfig(format!(
                    "pipeline `{name}` listed twice"
                )));
            }
        }
        if config.max_batch_events == 0 {
            return Err(ClientError::InvalidConfig(
                "max_batch_events is 0".to_string(),
            ));
        }
        if config.max_batch_bytes == 0 || config.max_buffer_bytes == 0 {
            return Err(ClientError::InvalidConfig(
                "max_batch_bytes and max_buffer_bytes must be above 0".to_string(),
            ));
        }
        let pipelines = config
            .pipelines
            .iter()
            .map(|name| Pipeline {
                name: name.clone(),
                builder: BatchBuilder::new(),
                open_events: 0,
                open_bytes: 0,
                open_since: None,
                next_sequence: 0,
                acked_below: 0,
                sent_below: 0,
                held: VecDeque::new(),
                written: 0,
            })
            .collect();
        Ok(ProducerCore {
            config,
            pipelines,
            limits: None,
            connected: false,
            buffered: 0,
            next_poll: 0,
        })
    }

    /// The `hello` to send first on every connection (the codec checks its field limits when
    /// it is encoded).
    pub fn hello(&self) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            producer_id: self.config.producer_id.clone(),
            token: self.config.token.clone(),
            pipelines: self.config.pipelines.clone(),
        }
    }

    /// Whether a `welcome` was received and the connection has not been lost since.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Bytes of open and unacked batches, headers included.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// Whether every event sent so far is acked (nothing open, nothing held).
    pub fn is_idle(&self) -> bool {
        self.pipelines
            .iter()
            .all(|p| p.open_events == 0 && p.held.is_empty())
    }

    /// The sequence the next batch of `pipeline` gets (the open one if it holds events).
    pub fn next_sequence(&self, pipeline: u16) -> Option<u64> {
        self.pipelines
            .get(usize::from(pipeline))
            .map(|p| p.next_sequence)
    }

    /// Applies a `welcome`: checks it against what this producer knows, takes its limits,
    /// releases held batches below each `acked_below` (returned, per pipeline that released
    /// any), and makes every other held batch due for (re)sending. On error nothing changes.
    pub fn on_welcome(&mut self, welcome: &Welcome) -> Result<Vec<Completed>, ClientError> {
        if welcome.version == 0 || welcome.version > PROTOCOL_VERSION {
            return Err(ClientError::UnsupportedVersion {
                version: welcome.version,
            });
        }
        if welcome.pipelines.len() != self.pipelines.len() {
            return Err(ClientError::PipelineCountMismatch {
                got: welcome.pipelines.len(),
                expected: self.pipelines.len(),
            });
        }
        let limits = welcome.limits;
        let min_frame = FRAME_HEADER_BYTES - LENGTH_BYTES + BATCH_OVERHEAD_BYTES;
        if (limits.max_frame_bytes as usize) <= min_frame {
            return Err(ClientError::UnusableLimit {
                name: "max_frame_bytes",
                value: limits.max_frame_bytes,
            });
        }
        if limits.max_events_per_frame == 0 {
            return Err(ClientError::UnusableLimit {
                name: "max_events_per_frame",
                value: 0,
            });
        }
        if limits.max_in_flight == 0 {
            return Err(ClientError::UnusableLimit {
                name: "max_in_flight",
                value: 0,
            });
        }
        let first = self.limits.is_none();
        for (p, state) in self.pipelines.iter().zip(&welcome.pipelines) {
            if state.acked_below > state.next_sequence {
                return Err(ClientError::AckedAboveNext {
                    pipeline: p.name.clone(),
                    acked_below: state.acked_below,
                    next_sequence: state.next_sequence,
                });
            }
            if first {
                continue;
            }
            let no_state = state.next_sequence == 0 && state.acked_below == 0;
            if !no_state {
                if state.next_sequence > p.next_sequence {
                    return Err(ClientError::ServerAhead {
                        pipeline: p.name.clone(),
                        next_sequence: state.next_sequence,
                        numbered_below: p.next_sequence,
                    });
                }
                // Every sequence from the server's next one on must still be here to resend.
                let held_from = p.held.front().map_or(p.next_sequence, |b| b.sequence);
                if state.next_sequence < held_from {
                    return Err(ClientError::ServerBehind {
                        pipeline: p.name.clone(),
                        next_sequence: state.next_sequence,
                        held_from,
                    });
                }
                if state.acked_below < p.acked_below {
                    return Err(ClientError::AckRegressed {
                        pipeline: p.name.clone(),
                        acked_below: state.acked_below,
                        acked: p.acked_below,
                    });
                }
            }
            let over = |bytes: usize, events: u32| {
                bytes > limits.max_frame_bytes as usize || events > limits.max_events_per_frame
            };
            let held = p
                .held
                .iter()
                .filter(|b| b.sequence >= state.acked_below)
                .map(|b| (b.sequence, b.buffer_bytes() - LENGTH_BYTES, b.event_count));
            let open = (p.open_events > 0).then(|| {
                let bytes = p.open_buffer_bytes() - LENGTH_BYTES;
                (p.next_sequence, bytes, p.open_events)
            });
            if let Some((sequence, bytes, events)) = held.chain(open).find(|&(_, b, e)| over(b, e))
            {
                return Err(ClientError::HeldBatchOverLimits {
                    pipeline: p.name.clone(),
                    sequence,
                    bytes,
                    events,
                    max_frame_bytes: limits.max_frame_bytes,
                    max_events: limits.max_events_per_frame,
                });
            }
        }
        // Checked: apply.
        let mut completed = Vec::new();
        for (index, (p, state)) in self
            .pipelines
            .iter_mut()
            .zip(&welcome.pipelines)
            .enumerate()
        {
            if first {
                p.next_sequence = state.next_sequence;
                p.acked_below = state.acked_below;
                p.sent_below = state.next_sequence;
            } else if state.next_sequence != 0 || state.acked_below != 0 {
                let released = release(p, state.acked_below, &mut self.buffered);
                p.acked_below = state.acked_below;
                p.sent_below = p.sent_below.max(state.next_sequence);
                if !released.is_empty() {
                    completed.push(Completed {
                        pipeline: index as u16,
                        sequences: released,
                    });
                }
            }
            p.written = 0;
        }
        self.limits = Some(limits);
        self.connected = true;
        Ok(completed)
    }

    /// The connection is lost: nothing is handed out until the next `welcome`, after which
    /// every unacked batch is yielded again. Events may still be sent meanwhile (buffered).
    pub fn on_disconnect(&mut self) {
        self.connected = false;
        for p in &mut self.pipelines {
            p.written = 0;
        }
    }

    /// Applies a cumulative `ack`: releases the held batches below `ack.next` and returns their
    /// sequences (an empty range when none was held, e.g. a repeated ack).
    pub fn on_ack(&mut self, ack: Ack) -> Result<Completed, ClientError> {
        if self.limits.is_none() {
            return Err(ClientError::NotWelcomed);
        }
        let count = self.pipelines.len();
        let p = self.pipelines.get_mut(usize::from(ack.pipeline)).ok_or(
            ClientError::AckUnknownPipeline {
                index: ack.pipeline,
                count,
            },
        )?;
        if ack.next < p.acked_below {
            return Err(ClientError::AckBackwards {
                pipeline: p.name.clone(),
                next: ack.next,
                acked: p.acked_below,
            });
        }
        if ack.next > p.sent_below {
            return Err(ClientError::AckBeyondSent {
                pipeline: p.name.clone(),
                next: ack.next,
                sent_below: p.sent_below,
            });
        }
        let sequences = release(p, ack.next, &mut self.buffered);
        p.acked_below = ack.next;
        Ok(Completed {
            pipeline: ack.pipeline,
            sequences,
        })
    }

    /// The welcome's limits and `pipeline` as an index, checked.
    fn welcomed_index(&self, pipeline: u16) -> Result<(Limits, usize), ClientError> {
        let limits = self.limits.ok_or(ClientError::NotWelcomed)?;
        let count = self.pipelines.len();
        let index = usize::from(pipeline);
        if index >= count {
            return Err(ClientError::UnknownPipeline {
                index: pipeline,
                count,
            });
        }
        Ok((limits, index))
    }

    /// Adds `event` to `pipeline`'s open batch (closing the open batch first when the event
    /// would overflow it, and after when it is full). `now` starts the linger of a new batch.
    /// Answers [`SendOutcome::Full`], taking nothing, when the buffer has no room for it.
    pub fn send(
        &mut self,
        pipeline: u16,
        event: &Event,
        now: Instant,
    ) -> Result<SendOutcome, ClientError> {
        let (limits, index) = self.welcomed_index(pipeline)?;
        let bound = encoded_len_bound(event);
        let alone = bound
            .saturating_add(BATCH_OVERHEAD_BYTES)
            .saturating_add(FRAME_HEADER_BYTES);
        if alone - LENGTH_BYTES > limits.max_frame_bytes as usize {
            return Err(ClientError::EventTooLarge {
                bytes: alone - LENGTH_BYTES,
                limit: limits.max_frame_bytes,
            });
        }
        if alone > self.config.max_buffer_bytes {
            return Err(ClientError::EventExceedsBuffer {
                bytes: alone,
                limit: self.config.max_buffer_bytes,
            });
        }
        let (max_events, max_bytes) = self.batch_limits(limits);
        let p = &self.pipelines[index];
        let must_close = p.open_events > 0
            && (p.open_events >= max_events
                || BATCH_OVERHEAD_BYTES + p.open_bytes + bound > max_bytes);
        // What the buffer grows by: the event, plus a batch's fixed bytes if it opens one.
        let cost = if p.open_events == 0 || must_close {
            alone
        } else {
            bound
        };
        if self.buffered.saturating_add(cost) > self.config.max_buffer_bytes {
            return Ok(SendOutcome::Full);
        }
        if must_close {
            self.close(index, limits)?;
        }
        let p = &mut self.pipelines[index];
        p.builder.push(event);
        p.open_events += 1;
        p.open_bytes += bound;
        p.open_since.get_or_insert(now);
        self.buffered += cost;
        let sequence = p.next_sequence;
        if p.open_events >= max_events || BATCH_OVERHEAD_BYTES + p.open_bytes >= max_bytes {
            self.close(index, limits)?;
        }
        Ok(SendOutcome::Queued { sequence })
    }

    /// Queues an already encoded batch (e.g. one read from another weir, or built once and
    /// sent many times) as one batch of `pipeline`, after closing the pipeline's open batch so
    /// that order is kept. Answers [`SendOutcome::Full`], taking nothing, when the buffer has
    /// no room for it.
    pub fn send_batch(
        &mut self,
        pipeline: u16,
        batch: &EncodedBatch,
    ) -> Result<SendOutcome, ClientError> {
        let (limits, index) = self.welcomed_index(pipeline)?;
        let payload = batch.payload.clone();
        let event_count = batch.events;
        let frame_len = payload.len() + BATCH_HEADER_BYTES;
        if frame_len > limits.max_frame_bytes as usize || event_count > limits.max_events_per_frame
        {
            return Err(ClientError::EncodedBatchOverLimits {
                events: event_count,
                bytes: frame_len,
                max_events: limits.max_events_per_frame,
                max_frame_bytes: limits.max_frame_bytes,
            });
        }
        let cost = LENGTH_BYTES + frame_len;
        if cost > self.config.max_buffer_bytes {
            return Err(ClientError::EventExceedsBuffer {
                bytes: cost,
                limit: self.config.max_buffer_bytes,
            });
        }
        if self.buffered.saturating_add(cost) > self.config.max_buffer_bytes {
            return Ok(SendOutcome::Full);
        }
        self.close(index, limits)?;
        let p = &mut self.pipelines[index];
        let sequence = p.next_sequence;
        let next = sequence
            .checked_add(1)
            .ok_or_else(|| ClientError::SequencesExhausted(p.name.clone()))?;
        let header =
            batch_header(pipeline, sequence, event_count, payload.len()).map_err(|_| {
                ClientError::EncodedBatchOverLimits {
                    events: event_count,
                    bytes: frame_len,
                    max_events: limits.max_events_per_frame,
                    max_frame_bytes: limits.max_frame_bytes,
                }
            })?;
        p.next_sequence = next;
        let batch = HeldBatch {
            sequence,
            event_count,
            header,
            payload,
        };
        self.buffered += batch.buffer_bytes();
        p.held.push_back(batch);
        Ok(SendOutcome::Queued { sequence })
    }

    /// Makes every open batch due now, whatever its size and age.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        let Some(limits) = self.limits else {
            return Ok(());
        };
        for index in 0..self.pipelines.len() {
            self.close(index, limits)?;
        }
        Ok(())
    }

    /// When the oldest open batch becomes due by linger: call [`ProducerCore::handle_timeout`]
    /// then. `None` when no batch is open.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pipelines
            .iter()
            .filter_map(|p| p.open_since)
            .min()
            .map(|since| since + self.config.linger)
    }

    /// Closes every open batch whose first event is at least `linger` older than `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ClientError> {
        let Some(limits) = self.limits else {
            return Ok(());
        };
        for index in 0..self.pipelines.len() {
            let due = self.pipelines[index]
                .open_since
                .is_some_and(|since| now.saturating_duration_since(since) >= self.config.linger);
            if due {
                self.close(index, limits)?;
            }
        }
        Ok(())
    }

    /// The next batch frame to write, in sequence order per pipeline, pipelines taking turns;
    /// `None` when disconnected, when nothing is due, or when every pipeline with due batches
    /// has `max_in_flight` batches unacked on this connection.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if !self.connected {
            return None;
        }
        let max_in_flight = self.limits.map_or(0, |l| l.max_in_flight as usize);
        let count = self.pipelines.len();
        for step in 0..count {
            let index = (self.next_poll + step) % count;
            let p = &mut self.pipelines[index];
            if p.written >= max_in_flight {
                continue;
            }
            let Some(batch) = p.held.get(p.written) else {
                continue;
            };
            p.written += 1;
            p.sent_below = p.sent_below.max(batch.sequence.saturating_add(1));
            self.next_poll = (index + 1) % count;
            return Some(Transmit {
                pipeline: index as u16,
                sequence: batch.sequence,
                event_count: batch.event_count,
                header: batch.header,
                payload: batch.payload.clone(),
            });
        }
        None
    }

    /// Effective batch limits: the configuration capped by the server's.
    fn batch_limits(&self, limits: Limits) -> (u32, usize) {
        let max_payload = (limits.max_frame_bytes as usize).saturating_sub(BATCH_HEADER_BYTES);
        (
            self.config
                .max_batch_events
                .min(limits.max_events_per_frame),
            self.config.max_batch_bytes.min(max_payload),
        )
    }

    /// Finishes pipeline `index`'s open batch (if it holds events) into a held batch.
    fn close(&mut self, index: usize, limits: Limits) -> Result<(), ClientError> {
        let p = &mut self.pipelines[index];
        if p.open_events == 0 {
            return Ok(());
        }
        let open_bytes = p.open_buffer_bytes();
        let event_count = p.open_events;
        let sequence = p.next_sequence;
        let next = sequence
            .checked_add(1)
            .ok_or_else(|| ClientError::SequencesExhausted(p.name.clone()))?;
        let payload = p.builder.finish();
        p.open_events = 0;
        p.open_bytes = 0;
        p.open_since = None;
        self.buffered -= open_bytes;
        let frame_len = payload.len() + BATCH_HEADER_BYTES;
        let too_large = || ClientError::BatchTooLarge {
            pipeline: p.name.clone(),
            sequence,
            bytes: frame_len,
            limit: limits.max_frame_bytes,
        };
        if frame_len > limits.max_frame_bytes as usize {
            return Err(too_large());
        }
        let header = batch_header(index as u16, sequence, event_count, payload.len())
            .map_err(|_| too_large())?;
        p.next_sequence = next;
        let batch = HeldBatch {
            sequence,
            event_count,
            header,
            payload: Bytes::from(payload),
        };
        self.buffered += batch.buffer_bytes();
        p.held.push_back(batch);
        Ok(())
    }
}

/// Drops `p`'s held batches below `below`, returning their sequences and freeing their bytes.
fn release(p: &mut Pipeline, below: u64, buffered: &mut usize) -> Range<u64> {
    let start = p.held.front().map_or(below, |b| b.sequence.min(below));
    let mut end = start;
    while let Some(batch) = p.held.front() {
        if batch.sequence >= below {
            break;
        }
        end = batch.sequence + 1;
        *buffered -= batch.buffer_bytes();
        p.held.pop_front();
        p.written = p.written.saturating_sub(1);
    }
    start..end
}

#[cfg(test)]
mod tests;
