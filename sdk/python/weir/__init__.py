"""weir's Python SDK: plugins for the weir stream router, built with componentize-py.

A filter in a few lines (`app.py`)::

    import weir

    @weir.filter
    def keep(event, config):
        agent = event.header("user-agent") or b""
        return not any(word in agent.lower() for word in config.get("words", [b"bot"]))

The decorator makes the module what componentize-py builds for the `filter` world of
wit/weir.wit (it sets the module's `WitWorld`), and the function stays a plain Python
function: `weir.testing` runs it over JSON-lines events in CPython.

- `@weir.filter`: `fn(event, config) -> bool`.
- `@weir.enrich`: `fn(event, out, config)`, calling `out.emit(...)` zero or more times.

`config` is the stage's `with` table as a dict (each value decoded from JSON). Events are
`weir.Event`: `key`, `value` (bytes), `timestamp_ms`, `headers` (a list of (str, bytes)),
`header(name)`, `route`. `weir.log(level, message)` writes to the host's log.

Everything is imported when the module loads: the sandbox has no filesystem at run time.
"""

import json
import sys

from .batch import Batch, BatchBuilder, BatchError, Event

try:  # Present when componentize-py builds (or runs) the plugin; not in plain CPython.
    from componentize_py_types import Err as _Err
    from wit_world.imports import host as _host
except ImportError:  # Plain CPython: `weir.testing`.
    _Err = None
    _host = None

__all__ = [
    "Batch",
    "BatchBuilder",
    "BatchError",
    "Emitter",
    "Event",
    "PluginError",
    "enrich",
    "filter",
    "log",
]

_LEVELS = ("trace", "debug", "info", "warn", "error")


class PluginError(Exception):
    """Raise it (or any exception) from a plugin function: the event becomes a dead letter
    with this message."""


def log(level, message):
    """Writes `message` to the host's log at `level` (trace, debug, info, warn, error); to
    stderr in plain CPython."""
    if level not in _LEVELS:
        raise ValueError("log level %r: one of %s" % (level, ", ".join(_LEVELS)))
    if _host is None:
        print("[%s] %s" % (level, message), file=sys.stderr)
        return
    _host.log(getattr(_host.Level, level.upper()), str(message))


def parse_config(pairs):
    """The stage's config: (key, JSON text) pairs as the host passes them, as a dict."""
    config = {}
    for key, text in pairs:
        try:
            config[key] = json.loads(text)
        except ValueError as e:
            raise PluginError("config `%s`: not JSON: %s" % (key, e)) from None
    return config


class Emitter:
    """Where an enrich function puts its output events; each records the input event it came
    from (`source`)."""

    __slots__ = ("_builder", "_event", "_source")

    def __init__(self, builder):
        self._builder = builder
        self._event = None
        self._source = 0

    def _at(self, event, source):
        self._event = event
        self._source = source

    def emit(self, value=None, key=None, timestamp_ms=None, headers=None, route=None):
        """Emits an event: the input event, with what is given changed. `headers`, when given,
        replaces the input's (a dict or (name, value) pairs); `add_headers` below adds."""
        e = self._event
        self._builder.push(
            value=e.value if value is None else value,
            key=e.key if key is None else key,
            timestamp_ms=e.timestamp_ms if timestamp_ms is None else timestamp_ms,
            headers=e.headers if headers is None else _pairs(headers),
            route=e.route if route is None else route,
            source=self._source,
        )

    def add_headers(self, headers, **changes):
        """Emits the input event with `headers` added after its own (and `changes` as in
        `emit`)."""
        self.emit(headers=self._event.headers + _pairs(headers), **changes)


def _pairs(headers):
    if isinstance(headers, dict):
        return list(headers.items())
    return list(headers)


def _error(message):
    """What a plugin's export raises to return `err(message)` to the host."""
    if _Err is None:
        return PluginError(message)
    return _Err(message)


class _Plugin:
    """The state shared by a module's exports: its function and its config."""

    def __init__(self, function):
        self.function = function
        self.config = None
        self.world = None

    def init(self, pairs):
        if self.config is not None:
            raise _error("plugin already initialised: `init` was called twice")
        try:
            self.config = parse_config(pairs)
        except PluginError as e:
            raise _error(str(e)) from None


def _world(function, methods):
    """Makes `function`'s module the component's world: its `WitWorld` class."""
    module = sys.modules[function.__module__]
    taken = getattr(getattr(module, "WitWorld", None), "weir_plugin", None)
    if taken is not None:
        raise TypeError(
            "module %s already has a weir plugin, %s: a component exports one world, so one "
            "@weir.filter or @weir.enrich per module" % (module.__name__, taken.function.__name__)
        )
    plugin = _Plugin(function)
    members = {name: make(plugin) for name, make in methods.items()}
    members["weir_plugin"] = plugin
    world = type("WitWorld", (), members)
    plugin.world = world
    module.WitWorld = world
    function.__weir_plugin__ = plugin
    return function


def _init(plugin):
    def init(self, config):
        plugin.init(config)

    return init


def keep_bitmap(function, config, batch):
    """Calls `function(event, config)` on every event of `batch`; the keep-bitmap. An
    exception names the event."""
    events = Batch(batch)
    bits = bytearray((len(events) + 7) // 8)
    for i, event in enumerate(events):
        try:
            kept = function(event, config)
        except Exception as e:
            raise _error("event %d: %s" % (i, _describe(e))) from None
        if kept:
            bits[i >> 3] |= 1 << (i & 7)
    return bytes(bits)


def enrich_batch(function, config, batch):
    """Calls `function(event, out, config)` on every event of `batch`; the output batch."""
    builder = BatchBuilder()
    out = Emitter(builder)
    for i, event in enumerate(Batch(batch)):
        out._at(event, i)
        try:
            function(event, out, config)
        except Exception as e:
            raise _error("event %d: %s" % (i, _describe(e))) from None
    return builder.finish()


def _describe(error):
    if isinstance(error, PluginError):
        return str(error)
    return "%s: %s" % (type(error).__name__, error)


def filter(function):  # noqa: A001 - the world's name
    """Makes `function(event, config) -> bool` the module's filter."""

    def make_filter(plugin):
        def run(self, batch):
            return keep_bitmap(plugin.function, plugin.config, batch)

        return run

    return _world(function, {"init": _init, "filter": make_filter})


def enrich(function):
    """Makes `function(event, out, config)` the module's enrich function."""

    def make_enrich(plugin):
        def run(self, batch):
            return enrich_batch(plugin.function, plugin.config, batch)

        return run

    return _world(function, {"init": _init, "enrich": make_enrich})
