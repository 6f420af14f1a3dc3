#!/usr/bin/env python3
"""A weir/1 producer written from docs/PROTOCOL.md alone, with aioquic and flatbuffers.

It proves that the protocol document suffices to write a producer in another language with an
independent QUIC implementation: nothing here was taken from weir's Rust code. Section numbers
(§) refer to docs/PROTOCOL.md.

    python weir_producer.py --to HOST:PORT --pin HEX --producer-id ID --token T \
        --pipeline P [--events N] [--batch B] [--payload-json] < events.jsonl
    python weir_producer.py --selftest

Events are JSON lines on stdin (the mapping of format/src/json.rs: key, value, timestamp_ms,
headers, route), or, with --events N, N generated events numbered 0..N-1: key "i", value
{"n":i}, timestamp_ms 1700000000000 + i. With --payload-json each stdin line is one event's
value, as is. One connection, no reconnect: this is a test producer, not weir-client.

Prints one JSON summary line on stdout and exits 0 when every batch is acked, 2 when the server
refused the hello, 1 otherwise (errors, a lost connection, a timeout, a bad pin).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import ssl
import struct
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import flatbuffers  # type: ignore[import-untyped]
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamDataReceived, StreamReset
from cryptography.hazmat.primitives.serialization import Encoding

# --- §4, §5, §10: constants ------------------------------------------------------------------

ALPN = "weir/1"
REVISION = 1  # the highest revision of weir/1 this producer speaks (§13)

HELLO, WELCOME, REFUSE, ACK, ERROR, GOAWAY, BATCH = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10

MAX_CONTROL_FRAME_BYTES = 65_536
MAX_NAME_BYTES = 255
MAX_TOKEN_BYTES = 4096
MAX_MESSAGE_BYTES = 1024
MAX_PIPELINES = 128
# What a batch frame's `length` counts before the payload: type, pipeline, sequence, event_count.
BATCH_HEADER_BYTES = 15

ERROR_NAMES = {
    0x00: "NO_ERROR",
    0x01: "PROTOCOL_VIOLATION",
    0x02: "UNSUPPORTED_VERSION",
    0x03: "UNAUTHENTICATED",
    0x04: "UNAUTHORIZED",
    0x05: "UNKNOWN_PIPELINE",
    0x06: "FRAME_TOO_LARGE",
    0x07: "TOO_MANY_EVENTS",
    0x08: "INVALID_BATCH",
    0x09: "SEQUENCE_GAP",
    0x0A: "TOO_MANY_PRODUCERS",
    0x0B: "SUPERSEDED",
    0x0C: "SHUTTING_DOWN",
    0x0D: "INTERNAL_ERROR",
}


class ProtocolError(Exception):
    """The server sent something PROTOCOL.md does not allow."""


class Fatal(Exception):
    """This producer cannot go on (bad pin, bad input, a timeout); the message says why."""


def error_name(code: int) -> str:
    """§10: unknown codes are accepted, and fatal."""
    return ERROR_NAMES.get(code, f"UNKNOWN_{code:#x}")


# --- §4, §5: frame codec --------------------------------------------------------------------


def _str(data: bytes, limit: int, what: str, allow_empty: bool) -> bytes:
    """`str` / `bytes`: u16 BE length + the bytes."""
    low = 0 if allow_empty else 1
    if not low <= len(data) <= limit:
        raise ValueError(f"{what} of {len(data)} bytes is outside {low}..={limit}")
    return struct.pack(">H", len(data)) + data


def _frame(body: bytes) -> bytes:
    """A frame: u32 BE length of (type + body), then them."""
    return struct.pack(">I", len(body)) + body


def encode_hello(producer_id: str, token: bytes, pipelines: Sequence[str],
                 version: int = REVISION) -> bytes:
    if not 1 <= len(pipelines) <= MAX_PIPELINES or len(set(pipelines)) != len(pipelines):
        raise ValueError(f"hello needs 1..={MAX_PIPELINES} distinct pipelines")
    body = bytes([HELLO]) + struct.pack(">H", version)
    body += _str(producer_id.encode(), MAX_NAME_BYTES, "producer id", allow_empty=False)
    body += _str(token, MAX_TOKEN_BYTES, "token", allow_empty=True)
    body += struct.pack(">H", len(pipelines))
    for name in pipelines:
        body += _str(name.encode(), MAX_NAME_BYTES, "pipeline name", allow_empty=False)
    return _frame(body)


def encode_batch_header(pipeline: int, sequence: int, event_count: int, payload_len: int) -> bytes:
    """The 19 bytes before a batch's payload: length, 0x10, pipeline, sequence, event_count."""
    return struct.pack(">IBHQI", BATCH_HEADER_BYTES + payload_len, BATCH, pipeline, sequence,
                       event_count)


@dataclass
class PipelineState:
    next_sequence: int
    acked_below: int


@dataclass
class Welcome:
    version: int
    max_frame_bytes: int
    max_events_per_frame: int
    max_in_flight: int
    pipelines: list[PipelineState]


@dataclass
class Refuse:
    code: int
    message: str


@dataclass
class Ack:
    pipeline: int
    next: int


@dataclass
class Error:
    code: int
    stream: int
    message: str


@dataclass
class Goaway:
    message: str


@dataclass
class StreamEnd:
    """Not a frame: the server finished its half of the control stream."""


ServerFrame = Welcome | Refuse | Ack | Error | Goaway


class _Reader:
    """Strict big-endian reader of one frame: running out, or bytes left over, is an error."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError(f"frame ends inside a field (needs {n} bytes at {self.pos})")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def message(self) -> str:
        raw = self.take(self.u16())
        if len(raw) > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
        return raw.decode("utf-8")

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(f"{len(self.data) - self.pos} bytes after the last field")


def decode_server_frame(frame: bytes) -> ServerFrame:
    """Decodes one control frame sent by the server: `frame` is the type byte and the body."""
    r = _Reader(frame)
    kind = r.take(1)[0]
    result: ServerFrame
    if kind == WELCOME:
        version, max_frame, max_events, in_flight = r.u16(), r.u32(), r.u32(), r.u32()
        pipelines = [PipelineState(r.u64(), r.u64()) for _ in range(r.u16())]
        result = Welcome(version, max_frame, max_events, in_flight, pipelines)
    elif kind == REFUSE:
        result = Refuse(r.u16(), r.message())
    elif kind == ACK:
        result = Ack(r.u16(), r.u64())
    elif kind == ERROR:
        result = Error(r.u16(), r.u64(), r.message())
    elif kind == GOAWAY:
        result = Goaway(r.message())
    else:
        raise ProtocolError(f"unexpected frame type {kind:#04x} on the control stream")
    r.end()
    return result


class FrameSplitter:
    """Cuts a byte stream into frames, checking the length against the limit after 4 bytes."""

    def __init__(self, limit: int) -> None:
        self.buffer = bytearray()
        self.limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        frames = []
        while len(self.buffer) >= 4:
            (length,) = struct.unpack(">I", self.buffer[:4])
            if length == 0 or length > self.limit:
                raise ProtocolError(f"control frame length {length} outside 1..={self.limit}")
            if len(self.buffer) < 4 + length:
                break
            frames.append(bytes(self.buffer[4:4 + length]))
            del self.buffer[:4 + length]
        return frames


# --- §5 batch payload: wit/batch.fbs built with the flatbuffers Builder ------------------------

# Field ids (declaration order) of wit/batch.fbs.
HEADER_NAME, HEADER_VALUE, HEADER_FIELDS = 0, 1, 2
EVENT_KEY, EVENT_VALUE, EVENT_TIMESTAMP, EVENT_HEADERS, EVENT_ROUTE, EVENT_FIELDS = 0, 1, 2, 3, 4, 6
BATCH_EVENTS, BATCH_FIELDS = 0, 1


@dataclass
class Event:
    value: bytes
    key: bytes | None = None
    timestamp_ms: int = 0
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    route: str | None = None


def build_payload(events: Sequence[Event]) -> bytes:
    """One `weir.batch.Batch`, finished with the file identifier `WEIR`."""
    b = flatbuffers.Builder(256 + 64 * len(events))
    tables = []
    for e in events:
        key = b.CreateByteVector(e.key) if e.key is not None else None
        value = b.CreateByteVector(e.value)
        headers = None
        if e.headers:
            header_tables = []
            for name, raw in e.headers:
                name_off, raw_off = b.CreateString(name), b.CreateByteVector(raw)
                b.StartObject(HEADER_FIELDS)
                b.PrependUOffsetTRelativeSlot(HEADER_VALUE, raw_off, 0)
                b.PrependUOffsetTRelativeSlot(HEADER_NAME, name_off, 0)
                header_tables.append(b.EndObject())
            headers = _offset_vector(b, header_tables)
        route = b.CreateString(e.route) if e.route is not None else None
        b.StartObject(EVENT_FIELDS)
        b.PrependInt64Slot(EVENT_TIMESTAMP, e.timestamp_ms, 0)
        if route is not None:
            b.PrependUOffsetTRelativeSlot(EVENT_ROUTE, route, 0)
        if headers is not None:
            b.PrependUOffsetTRelativeSlot(EVENT_HEADERS, headers, 0)
        b.PrependUOffsetTRelativeSlot(EVENT_VALUE, value, 0)
        if key is not None:
            b.PrependUOffsetTRelativeSlot(EVENT_KEY, key, 0)
        tables.append(b.EndObject())
    events_vec = _offset_vector(b, tables)
    b.StartObject(BATCH_FIELDS)
    b.PrependUOffsetTRelativeSlot(BATCH_EVENTS, events_vec, 0)
    b.Finish(b.EndObject(), file_identifier=b"WEIR")
    return bytes(b.Output())


def _offset_vector(b: Any, offsets: Sequence[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return int(b.EndVector())


# --- events in: the JSON-lines mapping (format/src/json.rs), or generated ----------------------

EVENT_FIELDS_JSON = {"key", "key_b64", "value", "value_text", "value_b64", "timestamp_ms",
                     "headers", "route"}


def _raw_members(line: str) -> list[tuple[str, str]]:
    """The members of one JSON object with each value's raw text, so `value` stays verbatim."""
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:
        while i < len(line) and line[i] in " \t\r\n":
            i += 1
        return i

    i = skip(0)
    if not line.startswith("{", i):
        raise ValueError("an event is a JSON object")
    i, members = skip(i + 1), list[tuple[str, str]]()
    if line.startswith("}", i):
        return members
    while True:
        name, i = decoder.raw_decode(line, i)
        i = skip(i)
        if not isinstance(name, str) or not line.startswith(":", i):
            raise ValueError("malformed object")
        start = skip(i + 1)
        _, end = decoder.raw_decode(line, start)
        members.append((name, line[start:end]))
        i = skip(end)
        if line.startswith("}", i):
            if skip(i + 1) != len(line):
                raise ValueError("text after the object")
            return members
        if not line.startswith(",", i):
            raise ValueError("malformed object")
        i = skip(i + 1)


def parse_event(line: str, now_ms: int) -> Event:
    members = _raw_members(line)
    names = [n for n, _ in members]
    unknown = set(names) - EVENT_FIELDS_JSON
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"unknown or repeated fields: {sorted(unknown) or names}")
    raw = dict(members)
    obj = {n: json.loads(v) for n, v in members}
    if [n for n in ("value", "value_text", "value_b64") if n in obj] == ["value"]:
        value = raw["value"].encode()
    elif "value_text" in obj and "value" not in obj and "value_b64" not in obj:
        value = obj["value_text"].encode()
    elif "value_b64" in obj and "value" not in obj and "value_text" not in obj:
        value = base64.b64decode(obj["value_b64"], validate=True)
    else:
        raise ValueError("exactly one of `value`, `value_text`, `value_b64` is needed")
    key = obj["key"].encode() if "key" in obj else None
    if "key_b64" in obj:
        if key is not None:
            raise ValueError("both `key` and `key_b64` are set")
        key = base64.b64decode(obj["key_b64"], validate=True)
    headers: list[tuple[str, bytes]] = []
    pairs = obj.get("headers", {})
    for name, hv in pairs.items() if isinstance(pairs, dict) else pairs:
        headers.append((name, base64.b64decode(hv["b64"]) if isinstance(hv, dict) else hv.encode()))
    return Event(value=value, key=key, timestamp_ms=int(obj.get("timestamp_ms", now_ms)),
                 headers=headers, route=obj.get("route"))


def stdin_events(payload_json: bool) -> Iterator[Event]:
    now_ms = int(time.time() * 1000)
    for number, line in enumerate(sys.stdin, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        try:
            if payload_json:
                json.loads(line)
                yield Event(value=line.encode(), timestamp_ms=now_ms)
            else:
                yield parse_event(line, now_ms)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise Fatal(f"stdin line {number}: {e}") from e


def generated_events(n: int) -> Iterator[Event]:
    for i in range(n):
        yield Event(key=str(i).encode(), value=json.dumps({"n": i}, separators=(",", ":")).encode(),
                    timestamp_ms=1_700_000_000_000 + i)


def batches(events: Iterable[Event], size: int) -> Iterator[list[Event]]:
    chunk: list[Event] = []
    for e in events:
        chunk.append(e)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --- QUIC: aioquic client ---------------------------------------------------------------------


@dataclass
class Summary:
    welcome: dict[str, Any] | None = None
    acked_next: int | None = None
    batches_sent: int = 0
    events_sent: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    refused: dict[str, Any] | None = None
    goaway: str | None = None
    closed: dict[str, Any] | None = None
    fatal: str | None = None


@dataclass
class Closed:
    """Not a frame: the connection closed (QUIC CONNECTION_CLOSE, or idle)."""

    code: int
    reason: str
    by_application: bool  # an application close carries a weir error code (§10)


Incoming = ServerFrame | StreamEnd | Closed


class WeirProtocol(QuicConnectionProtocol):
    """Turns QUIC events into decoded control frames (and markers) on a queue."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.control_id: int | None = None
        self.incoming: asyncio.Queue[Incoming | ProtocolError] = asyncio.Queue()
        self.splitter = FrameSplitter(MAX_CONTROL_FRAME_BYTES)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            if event.stream_id != self.control_id:
                self.incoming.put_nowait(
                    ProtocolError(f"server sent data on stream {event.stream_id}"))
                return
            try:
                for raw in self.splitter.feed(event.data):
                    self.incoming.put_nowait(decode_server_frame(raw))
            except (ProtocolError, UnicodeDecodeError) as e:
                self.incoming.put_nowait(ProtocolError(str(e)))
            if event.end_stream:
                self.incoming.put_nowait(StreamEnd())
        elif isinstance(event, StreamReset):
            self.incoming.put_nowait(ProtocolError(
                f"server reset stream {event.stream_id} with code {event.error_code}"))
        elif isinstance(event, ConnectionTerminated):
            self.incoming.put_nowait(
                Closed(event.error_code, event.reason_phrase, event.frame_type is None))


async def keep_alive(proto: QuicConnectionProtocol, timeout: float) -> None:
    """PINGs at a third of the idle timeout both sides agreed on (the server announces its own
    in the QUIC transport parameter max_idle_timeout; aioquic keeps it privately)."""
    remote = proto._quic._remote_max_idle_timeout
    every = min(timeout, remote or timeout) / 3
    with contextlib.suppress(ConnectionError):
        while True:
            await asyncio.sleep(every)
            await proto.ping()


def certificate_fingerprint(protocol: QuicConnectionProtocol) -> str:
    """§2 pinning: SHA-256 of the server certificate's DER, as lowercase hex."""
    # aioquic exposes no public accessor for the peer certificate; its TLS context keeps it.
    cert = protocol._quic.tls._peer_certificate
    if cert is None:
        raise Fatal("the server presented no certificate")
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def closed_error(closed: Closed) -> ConnectionError:
    return ConnectionError(f"connection closed: code {closed.code} ({error_name(closed.code)})"
                           f" {closed.reason!r}")


async def produce(args: argparse.Namespace, events: Iterable[Event], summary: Summary) -> int:
    host, _, port = args.to.rpartition(":")
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
    config.verify_mode = ssl.CERT_NONE  # names and dates are ignored: the pin below decides (§2)
    config.idle_timeout = args.timeout  # so that connecting to nothing gives up on its own
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.timeout

    async def receive(proto: WeirProtocol, waiting_for: str) -> Incoming:
        try:
            item = await asyncio.wait_for(proto.incoming.get(), max(deadline - loop.time(), 0))
        except TimeoutError as e:
            raise Fatal(f"timed out after {args.timeout}s waiting for {waiting_for}") from e
        if isinstance(item, ProtocolError):
            raise item
        return item

    async with connect(host.strip("[]"), int(port), configuration=config,
                       create_protocol=WeirProtocol) as connection:
        proto = cast(WeirProtocol, connection)
        quic = proto._quic
        if quic.tls.alpn_negotiated != ALPN:
            raise Fatal(f"server negotiated ALPN {quic.tls.alpn_negotiated!r}, not {ALPN!r}")
        seen = certificate_fingerprint(proto)
        if seen != args.pin:
            proto.close(error_code=0x01, reason_phrase="certificate pin mismatch")
            raise Fatal(f"certificate fingerprint {seen} does not match the pin {args.pin}")

        # §6 handshake on the control stream (the first bidirectional stream: id 0).
        proto.control_id = quic.get_next_available_stream_id(is_unidirectional=False)
        quic.send_stream_data(proto.control_id,
                              encode_hello(args.producer_id, args.token.encode(), [args.pipeline]))
        proto.transmit()
        first = await receive(proto, "welcome")
        if isinstance(first, Closed):
            if not first.by_application or first.code == 0:
                raise closed_error(first)
            # Closed without a readable `refuse` (lost with the connection): the close carries
            # the same code, and the message as reason phrase (§10).
            summary.refused = {"code": first.code, "name": error_name(first.code),
                               "message": first.reason, "from": "connection_close"}
            summary.closed = {"code": first.code, "reason": first.reason}
            return 2
        if isinstance(first, Refuse):
            summary.refused = {"code": first.code, "name": error_name(first.code),
                               "message": first.message, "from": "refuse"}
            # §5: the server then closes the connection with the same code, after finishing
            # its half of the control stream.
            after = await receive(proto, "the connection close after refuse")
            if isinstance(after, StreamEnd):
                after = await receive(proto, "the connection close after refuse")
            if not isinstance(after, Closed):
                raise ProtocolError(f"expected the connection close after refuse, got {after}")
            summary.closed = {"code": after.code, "reason": after.reason}
            return 2
        if not isinstance(first, Welcome):
            raise ProtocolError(f"expected welcome or refuse, got {type(first).__name__}")
        welcome = first
        summary.welcome = asdict(welcome)
        if not 1 <= welcome.version <= REVISION or len(welcome.pipelines) != 1:
            raise ProtocolError(f"bad welcome: {summary.welcome}")
        start = welcome.pipelines[0].next_sequence  # §7, §9: a fresh producer starts here
        summary.acked_next = welcome.pipelines[0].acked_below

        # §3: one unidirectional batch stream for the pipeline.
        stream = quic.get_next_available_stream_id(is_unidirectional=True)
        window = max(welcome.max_in_flight, 1)  # §8: bound unacked batches
        sequence = start
        stop = False  # an error, a goaway or the connection's end: send nothing more

        def handle(item: Incoming) -> None:
            nonlocal stop
            if isinstance(item, Ack):
                acked = summary.acked_next or 0
                if item.pipeline != 0 or not acked <= item.next <= sequence:
                    raise ProtocolError(f"bad ack {item} (sent up to {sequence})")
                summary.acked_next = item.next
            elif isinstance(item, Error):
                summary.errors.append({"code": item.code, "name": error_name(item.code),
                                       "stream": item.stream, "message": item.message})
                stop = True
            elif isinstance(item, Goaway):
                summary.goaway = item.message  # §12: stop sending, wait for the acks
                stop = True
            elif isinstance(item, StreamEnd):
                if summary.goaway is None:
                    raise ProtocolError("server finished the control stream without goaway")
            elif isinstance(item, Closed):
                summary.closed = {"code": item.code, "reason": item.reason}
                if summary.goaway is None or item.code != 0:
                    raise closed_error(item)
            else:
                raise ProtocolError(f"unexpected {type(item).__name__} after welcome")

        def acked() -> int:
            return summary.acked_next or 0

        # Events are read on a worker thread (stdin may block) while this task keeps serving
        # the connection; pings keep a quiet connection within the server's idle timeout.
        chunks = batches(events, args.batch)
        keepalive = asyncio.create_task(keep_alive(proto, args.timeout))
        try:
            while chunk := await loop.run_in_executor(None, next, chunks, None):
                while sequence - acked() >= window and not stop:
                    handle(await receive(proto, f"an ack (unacked from {acked()})"))
                while not proto.incoming.empty() and not stop:
                    handle(await receive(proto, "a frame"))
                if stop:
                    break
                payload = build_payload(chunk)
                if not args.ignore_limits:
                    if len(chunk) > welcome.max_events_per_frame:
                        raise Fatal(f"batch of {len(chunk)} events exceeds max_events_per_frame"
                                    f" {welcome.max_events_per_frame} (--ignore-limits sends it)")
                    if BATCH_HEADER_BYTES + len(payload) > welcome.max_frame_bytes:
                        raise Fatal(f"frame of {BATCH_HEADER_BYTES + len(payload)} bytes exceeds "
                                    f"max_frame_bytes {welcome.max_frame_bytes}")
                quic.send_stream_data(
                    stream, encode_batch_header(0, sequence, len(chunk), len(payload)) + payload)
                proto.transmit()
                sequence += 1
                summary.batches_sent += 1
                summary.events_sent += len(chunk)
            complete = not stop
            while acked() < sequence and not summary.errors and summary.closed is None:
                handle(await receive(proto, f"the ack of sequence {sequence - 1}"))
        finally:
            keepalive.cancel()
        if not complete or summary.errors or acked() < sequence:
            return 1
        # Everything is acked: finish both streams and leave with NO_ERROR (§3).
        quic.send_stream_data(stream, b"", end_stream=True)
        quic.send_stream_data(proto.control_id, b"", end_stream=True)
        proto.close(error_code=0x00, reason_phrase="done")
        return 0


async def run(args: argparse.Namespace, summary: Summary) -> int:
    events = (generated_events(args.events) if args.events is not None
              else stdin_events(args.payload_json))
    try:
        # The inner waits name what they wait for; this bound also covers connecting.
        return await asyncio.wait_for(produce(args, events, summary), args.timeout + 2)
    except TimeoutError:
        summary.fatal = f"timed out after {args.timeout}s"
        return 1
    except (Fatal, ProtocolError, ConnectionError, OSError) as e:
        why = str(e) or "no connection (no answer, or the handshake failed)"
        summary.fatal = f"{type(e).__name__}: {why}"
        return 1


# --- --selftest: the worked example of PROTOCOL.md §14 ----------------------------------------


def example_hex(name: str) -> bytes:
    """The bytes of the block `# example: NAME` of PROTOCOL.md §14."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
    lines = doc.read_text().splitlines()
    start = lines.index(f"# example: {name}") + 1
    out = bytearray()
    for line in lines[start:]:
        if line.startswith("```"):
            return bytes(out)
        code = line.split("#", 1)[0].split()
        out += bytes(int(h, 16) for h in code)
    raise ValueError(f"example {name} has no end")


def selftest() -> int:
    checks = 0

    def check(what: str, got: object, want: object) -> None:
        nonlocal checks
        if got != want:
            raise AssertionError(f"{what}:\n got  {got!r}\n want {want!r}")
        checks += 1

    hello = encode_hello("sensor-7", b"s3cret", ["clicks"])
    check("hello", hello.hex(" "), example_hex("hello").hex(" "))
    batch = example_hex("batch")
    event = Event(key=b"k", value=b'{"n":1}', timestamp_ms=1_700_000_000_000)
    payload = build_payload([event])
    check("batch header", encode_batch_header(0, 0, 1, len(payload)).hex(" "), batch[:19].hex(" "))
    check("batch payload", payload.hex(" "), batch[19:].hex(" "))
    welcome = example_hex("welcome")
    check("welcome", decode_server_frame(welcome[4:]),
          Welcome(1, 4_194_304, 8192, 16, [PipelineState(0, 0)]))
    check("ack", FrameSplitter(MAX_CONTROL_FRAME_BYTES).feed(example_hex("ack")),
          [example_hex("ack")[4:]])
    check("ack decoded", decode_server_frame(example_hex("ack")[4:]), Ack(0, 1))
    check("error", decode_server_frame(example_hex("error")[4:]),
          Error(7, 2, "batch of 9000 events exceeds the limit of 8192 (max_events_per_frame)"))
    # Byte-at-a-time feeding splits the same frames.
    splitter, frames = FrameSplitter(MAX_CONTROL_FRAME_BYTES), []
    for byte in welcome + example_hex("ack"):
        frames += splitter.feed(bytes([byte]))
    check("split", frames, [welcome[4:], example_hex("ack")[4:]])
    for bad, why in [(welcome[4:-1], "truncated"), (welcome[4:] + b"\0", "trailing byte"),
                     (b"\x07", "unknown type")]:
        try:
            decode_server_frame(bad)
        except ProtocolError:
            checks += 1
        else:
            raise AssertionError(f"{why} frame decoded")
    # The JSON-lines mapping keeps `value` verbatim.
    line = '{"key":"u","value":{"b": 1, "a":[2.50]},"headers":{"user-agent":"x"},"route":"r"}'
    check("json line", parse_event(line, 5),
          Event(value=b'{"b": 1, "a":[2.50]}', key=b"u", timestamp_ms=5,
                headers=[("user-agent", b"x")], route="r"))
    print(f"selftest: {checks} passed, 0 failed")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--selftest", action="store_true",
                        help="check the codec against PROTOCOL.md §14 and exit")
    parser.add_argument("--to", help="server address HOST:PORT")
    parser.add_argument("--pin", help="SHA-256 of the server certificate's DER, 64 hex digits")
    parser.add_argument("--producer-id")
    parser.add_argument("--token", default="")
    parser.add_argument("--pipeline")
    parser.add_argument("--events", type=int, help="generate N numbered events instead of stdin")
    parser.add_argument("--batch", type=int, default=100, help="events per batch (default 100)")
    parser.add_argument("--payload-json", action="store_true",
                        help="each stdin line is one event's value (JSON), not a JSON-lines event")
    parser.add_argument("--ignore-limits", action="store_true",
                        help="send batches over the welcome's limits (to test the server)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="bound on the whole run, seconds (default 60)")
    args = parser.parse_args(argv)
    if args.selftest:
        return selftest()
    for name in ("to", "pin", "producer_id", "pipeline"):
        if getattr(args, name) is None:
            parser.error(f"--{name.replace('_', '-')} is required")
    args.pin = args.pin.lower().replace(":", "")
    if len(args.pin) != 64 or any(c not in "0123456789abcdef" for c in args.pin):
        parser.error("--pin must be 64 hex digits")
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    summary = Summary()
    code = asyncio.run(run(args, summary))
    print(json.dumps(asdict(summary), separators=(",", ":")), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
