"""The Python SDK natively: batches written and read back, filters and enrich functions run
through the same batch code as in the sandbox, and the errors they give."""

import unittest

import weir
from weir import testing
from weir.batch import Batch, BatchBuilder, BatchError

import enrich_app
import filter_app
from enrich_app import tag
from filter_app import keep


class Filters(unittest.TestCase):
    def test_a_filter_keeps_what_its_function_keeps(self):
        lines = [
            '{"value":{"n":1},"timestamp_ms":1,"headers":{"user-agent":"curl/8"}}',
            '{"value":{"n":2},"timestamp_ms":2,"headers":{"user-agent":"GoogleBot"}}',
            '{"value":{"n":3},"timestamp_ms":3}',
        ]
        out = testing.run(keep, lines)
        self.assertEqual([e["value"] for e in out], [b'{"n":1}', b'{"n":3}'])
        out = testing.run(keep, lines, {"words": ["curl"]})
        self.assertEqual([e["timestamp_ms"] for e in out], [2, 3])

    def test_the_decorator_makes_the_module_a_component_world_and_only_one(self):
        world = filter_app.WitWorld
        self.assertTrue(hasattr(world, "filter") and hasattr(world, "init"))
        self.assertIs(keep.__weir_plugin__.world, world)
        self.assertTrue(hasattr(enrich_app.WitWorld, "enrich"))
        weir.enrich(lambda event, out, config: None)  # this module's plugin
        with self.assertRaises(TypeError) as caught:
            weir.filter(lambda event, config: True)
        self.assertIn("already has a weir plugin", str(caught.exception))


class Batches(unittest.TestCase):
    def test_events_read_back_as_they_were_written(self):
        builder = BatchBuilder()
        builder.push(value=b"v1", key="k", timestamp_ms=-5, headers=[("a", b"1"), ("a", b"2")], route="eu", source=7)
        builder.push(value="", timestamp_ms=2**40)
        builder.push(value=bytes(range(256)), headers=[("empty", b"")])
        batch = Batch(builder.finish())
        self.assertEqual(len(batch), 3)
        first, second, third = batch
        self.assertEqual(
            first.to_dict(),
            {"key": b"k", "value": b"v1", "timestamp_ms": -5, "headers": [("a", b"1"), ("a", b"2")], "route": "eu"},
        )
        self.assertEqual(first.source, 7)
        self.assertEqual(first.header("a"), b"1")
        self.assertIsNone(first.header("b"))
        self.assertEqual((second.key, second.value, second.timestamp_ms, second.route), (None, b"", 2**40, None))
        self.assertEqual(second.headers, [])
        self.assertEqual(third.value, bytes(range(256)))
        self.assertEqual(third.header("empty"), b"")
        self.assertEqual(batch[-1].value, third.value)
        with self.assertRaises(IndexError):
            batch[3]

    def test_only_text_and_bytes_are_written(self):
        builder = BatchBuilder()
        for bad in [dict(value=5), dict(headers=[("n", 5)]), dict(route=7), dict(key=1.5)]:
            with self.assertRaises(TypeError):
                builder.push(**bad)
        builder.push(value=bytearray(b"v"), headers=[(b"n", memoryview(b"h"))], route=b"r")
        (event,) = Batch(builder.finish())
        self.assertEqual((event.value, event.headers, event.route), (b"v", [("n", b"h")], "r"))

    def test_an_empty_batch_and_a_foreign_buffer(self):
        self.assertEqual(len(Batch(BatchBuilder().finish())), 0)
        for junk in [b"", b"junk", b"\0\0\0\0NOPE"]:
            with self.assertRaises(BatchError):
                Batch(junk)


class Enrich(unittest.TestCase):
    def test_an_enrich_emits_zero_one_or_more_events_each_with_its_source(self):
        lines = [
            '{"value_text":"once","key":"k","timestamp_ms":1,"headers":{"h":"1"}}',
            '{"value_text":"drop","timestamp_ms":2}',
            '{"value_text":"twice","timestamp_ms":3}',
        ]
        data = testing.batch(lines)
        out = Batch(weir.enrich_batch(tag, {"team": "ops"}, data))
        self.assertEqual([e.source for e in out], [0, 2, 2])
        self.assertEqual(
            [e.to_dict() for e in out],
            [
                {"key": b"k", "value": b"once", "timestamp_ms": 1, "headers": [("h", b"1"), ("team", b"ops")], "route": "tagged"},
                {"key": None, "value": b"twice", "timestamp_ms": 3, "headers": [("team", b"ops")], "route": "tagged"},
                {"key": None, "value": b"copy", "timestamp_ms": 3, "headers": [], "route": None},
            ],
        )

    def test_an_error_names_the_event_and_a_bad_config_the_key(self):
        with self.assertRaises(weir.PluginError) as caught:
            testing.run(tag, ['{"value_text":"ok"}', '{"value_text":"fail"}'])
        self.assertEqual(str(caught.exception), "event 1: cannot tag this one")
        with self.assertRaises(weir.PluginError) as caught:
            weir.parse_config([("team", "{not json")])
        self.assertTrue(str(caught.exception).startswith("config `team`: not JSON: "))


if __name__ == "__main__":
    unittest.main()
