"""The weir batch (wit/batch.fbs) read and written by hand, for plugins in Python.

Written for the one schema, not generated: flatc's Python reader imports modules lazily (which
fails inside the sandbox, where there is no filesystem at run time) and builds an object per
field access. This one imports nothing but `struct` at load time, reads a field only when it is
asked for, and hands out `bytes`.

Layout (FlatBuffers): the buffer starts with the root table's offset and the identifier `WEIR`.
A table starts with a signed offset back to its vtable; the vtable lists each field's offset in
the table (0: absent). Offsets to vectors, strings and tables are unsigned and point forward.

- `Batch { events: [Event] }`
- `Event { key: [ubyte], value: [ubyte], timestamp_ms: long, headers: [Header], route: string,
  source: uint32 }`
- `Header { name: string (required), value: [ubyte] }`
"""

import struct

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_I64 = struct.Struct("<q")
# Bound once: every field read goes through these.
_u16 = _U16.unpack_from
_u32 = _U32.unpack_from
_i32 = _I32.unpack_from

IDENTIFIER = b"WEIR"


class BatchError(ValueError):
    """A buffer that is not a weir batch."""


def _field(buf, table, index):
    """The absolute position of field `index` of the table at `table`, or 0 when absent."""
    vtable = table - _i32(buf, table)[0]
    entry = 4 + 2 * index
    if entry >= _u16(buf, vtable)[0]:
        return 0
    offset = _u16(buf, vtable + entry)[0]
    return table + offset if offset else 0


def _target(buf, at):
    """Where the unsigned offset stored at `at` points."""
    return at + _u32(buf, at)[0]


def _bytes(buf, table, index):
    """A byte vector (or string) field's bytes, or None when absent."""
    at = _field(buf, table, index)
    if not at:
        return None
    vector = at + _u32(buf, at)[0]
    start = vector + 4
    return buf[start : start + _u32(buf, vector)[0]]


class Event:
    """One event of a batch, read in place."""

    __slots__ = ("_buf", "_table")

    def __init__(self, buf, table):
        self._buf = buf
        self._table = table

    @property
    def key(self):
        """The key (bytes), or None when the producer set none."""
        return _bytes(self._buf, self._table, 0)

    @property
    def value(self):
        """The payload (bytes; empty when absent)."""
        return _bytes(self._buf, self._table, 1) or b""

    @property
    def timestamp_ms(self):
        """Event time, milliseconds since the Unix epoch."""
        at = _field(self._buf, self._table, 2)
        return _I64.unpack_from(self._buf, at)[0] if at else 0

    @property
    def route(self):
        """The route tag (str), or None."""
        raw = _bytes(self._buf, self._table, 4)
        return None if raw is None else raw.decode("utf-8")

    @property
    def headers(self):
        """The headers in order, as (name: str, value: bytes) pairs."""
        buf = self._buf
        at = _field(buf, self._table, 3)
        if not at:
            return []
        vector = _target(buf, at)
        out = []
        for i in range(_U32.unpack_from(buf, vector)[0]):
            header = _target(buf, vector + 4 + 4 * i)
            name = _bytes(buf, header, 0) or b""
            out.append((name.decode("utf-8"), _bytes(buf, header, 1) or b""))
        return out

    def header(self, name):
        """The value (bytes) of the first header called `name`, or None."""
        buf = self._buf
        at = _field(buf, self._table, 3)
        if not at:
            return None
        wanted = name.encode("utf-8")
        size = len(wanted)
        vector = at + _u32(buf, at)[0]
        for slot in range(vector + 4, vector + 4 + 4 * _u32(buf, vector)[0], 4):
            header = slot + _u32(buf, slot)[0]
            # The name's length first: only a name as long as the wanted one is compared.
            named = _field(buf, header, 0)
            text = named + _u32(buf, named)[0]
            if _u32(buf, text)[0] == size and buf[text + 4 : text + 4 + size] == wanted:
                return _bytes(buf, header, 1) or b""
        return None

    @property
    def source(self):
        """In a plugin's output: the index of the input event (or window) it came from."""
        at = _field(self._buf, self._table, 5)
        return _U32.unpack_from(self._buf, at)[0] if at else 0

    def to_dict(self):
        """The event as a dict: key, value, timestamp_ms, headers, route."""
        return {
            "key": self.key,
            "value": self.value,
            "timestamp_ms": self.timestamp_ms,
            "headers": self.headers,
            "route": self.route,
        }

    def __repr__(self):
        return "Event(%r)" % (self.to_dict(),)


class Batch:
    """A read-only view of a batch buffer. The host verified every buffer it hands a plugin;
    `Batch(buf)` checks the identifier and that the root is inside the buffer, not the rest."""

    __slots__ = ("_buf", "_vector", "_len")

    def __init__(self, buf):
        if len(buf) < 8 or bytes(buf[4:8]) != IDENTIFIER:
            raise BatchError("not a weir batch (no WEIR identifier)")
        self._buf = buf
        root = _U32.unpack_from(buf, 0)[0]
        if root + 4 > len(buf):
            raise BatchError("not a weir batch (root outside the buffer)")
        at = _field(buf, root, 0)
        self._vector = _target(buf, at) if at else 0
        self._len = _U32.unpack_from(buf, self._vector)[0] if at else 0

    def __len__(self):
        return self._len

    def __getitem__(self, index):
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError("event %d of a batch of %d" % (index, self._len))
        return Event(self._buf, _target(self._buf, self._vector + 4 + 4 * index))

    def __iter__(self):
        buf = self._buf
        for i in range(self._len):
            yield Event(buf, _target(buf, self._vector + 4 + 4 * i))


def _pad(out, align):
    out.extend(b"\0" * (-len(out) % align))


def _vector(out, at, data, string=False):
    """Writes `data` as a byte vector (a string: with its NUL) and points the offset at `at`."""
    _pad(out, 4)
    _U32.pack_into(out, at, len(out) - at)
    out.extend(_U32.pack(len(data)))
    out.extend(data)
    if string:
        out.append(0)


class BatchBuilder:
    """Builds a batch, event by event (each with its `source`), front to back: every offset
    points forward, every scalar at its alignment, as the host's verifier requires."""

    def __init__(self):
        self._events = []

    def push(self, value=b"", key=None, timestamp_ms=0, headers=(), route=None, source=0):
        """Adds an event. `value` and `key` are bytes (a str is UTF-8 encoded); `headers` are
        (name, value) pairs; `source` is the input event's (or window's) index."""
        self._events.append(
            (
                _as_bytes(value),
                None if key is None else _as_bytes(key),
                int(timestamp_ms),
                [(_as_bytes(n), _as_bytes(v)) for n, v in headers],
                None if route is None else _as_bytes(route),
                int(source),
            )
        )

    def __len__(self):
        return len(self._events)

    def finish(self):
        """The batch's bytes; the builder is empty again."""
        events, self._events = self._events, []
        out = bytearray(8)
        out[4:8] = IDENTIFIER
        # Batch: vtable (events at 4), then the table.
        vtable = len(out)
        out.extend(struct.pack("<HHH", 6, 8, 4))
        _pad(out, 4)
        root = len(out)
        _U32.pack_into(out, 0, root)
        out.extend(_I32.pack(root - vtable))
        out.extend(b"\0\0\0\0")
        # The events vector, its offsets filled in as each event is written.
        _pad(out, 4)
        _U32.pack_into(out, root + 4, len(out) - (root + 4))
        slots = len(out) + 4
        out.extend(_U32.pack(len(events)))
        out.extend(b"\0" * (4 * len(events)))
        for i, (value, key, timestamp_ms, headers, route, source) in enumerate(events):
            # Event: vtable, then a table of 32 bytes at an 8-aligned position: soffset,
            # source, timestamp (8-aligned), key, value, headers, route.
            _pad(out, 2)
            vtable = len(out)
            out.extend(
                struct.pack(
                    "<HHHHHHHH",
                    16,
                    32,
                    16 if key is not None else 0,
                    20,
                    8,
                    24 if headers else 0,
                    28 if route is not None else 0,
                    4,
                )
            )
            _pad(out, 8)
            table = len(out)
            _U32.pack_into(out, slots + 4 * i, table - (slots + 4 * i))
            out.extend(struct.pack("<iIq", table - vtable, source, timestamp_ms))
            out.extend(b"\0" * 16)
            if key is not None:
                _vector(out, table + 16, key)
            _vector(out, table + 20, value)
            if route is not None:
                _vector(out, table + 28, route, string=True)
            if headers:
                _pad(out, 4)
                _U32.pack_into(out, table + 24, len(out) - (table + 24))
                hslots = len(out) + 4
                out.extend(_U32.pack(len(headers)))
                out.extend(b"\0" * (4 * len(headers)))
                for j, (name, hvalue) in enumerate(headers):
                    # Header: vtable (name at 4, value at 8), then a table of 12 bytes.
                    _pad(out, 2)
                    hvtable = len(out)
                    out.extend(struct.pack("<HHHH", 8, 12, 4, 8))
                    _pad(out, 4)
                    header = len(out)
                    _U32.pack_into(out, hslots + 4 * j, header - (hslots + 4 * j))
                    out.extend(_I32.pack(header - hvtable))
                    out.extend(b"\0" * 8)
                    _vector(out, header + 4, name, string=True)
                    _vector(out, header + 8, hvalue)
        return bytes(out)


def _as_bytes(data):
    """`data` as bytes: str is UTF-8 encoded, bytes-like taken as is; anything else (a number,
    None) is a TypeError rather than bytes nobody meant."""
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError("expected str or bytes, got %s %r" % (type(data).__name__, data))
