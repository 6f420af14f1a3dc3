# Writes python_batch.bin, a weir batch built by Python's flatbuffers Builder, whose layout
# differs from the Rust builder's: vtables deduplicated and placed after the tables that use
# them, each event's fields pushed in a different order. format/src/verify/tests.rs checks
# that both verifiers accept it. Regenerate (the file is committed; CI does not need Python):
#   python3 -m venv /tmp/fb && /tmp/fb/bin/pip install flatbuffers==25.12.19
#   /tmp/fb/bin/python format/testdata/python_batch.py > format/testdata/python_batch.bin
import sys, flatbuffers

def header(b, name, value):
    n = b.CreateString(name)
    v = b.CreateByteVector(value) if value is not None else None
    b.StartObject(2)
    if v is not None:
        b.PrependUOffsetTRelativeSlot(1, v, 0)
    b.PrependUOffsetTRelativeSlot(0, n, 0)
    return b.EndObject()

def vec_of_tables(b, offs):
    b.StartVector(4, len(offs), 4)
    for o in reversed(offs):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()

def event(b, key, value, ts, headers, route, source, order):
    hs = [header(b, n, v) for n, v in headers]
    hv = vec_of_tables(b, hs) if headers else None
    k = b.CreateByteVector(key) if key is not None else None
    v = b.CreateByteVector(value) if value is not None else None
    r = b.CreateString(route) if route is not None else None
    b.StartObject(6)
    for f in order:
        if f == 'key' and k is not None: b.PrependUOffsetTRelativeSlot(0, k, 0)
        if f == 'value' and v is not None: b.PrependUOffsetTRelativeSlot(1, v, 0)
        if f == 'ts': b.PrependInt64Slot(2, ts, 0)
        if f == 'headers' and hv is not None: b.PrependUOffsetTRelativeSlot(3, hv, 0)
        if f == 'route' and r is not None: b.PrependUOffsetTRelativeSlot(4, r, 0)
        if f == 'source': b.PrependUint32Slot(5, source, 0)
    return b.EndObject()

b = flatbuffers.Builder(0)
orders = [['key','value','ts','headers','route','source'],
          ['source','route','headers','ts','value','key'],
          ['ts','key','source','value','route','headers']]
evs = []
evs.append(event(b, b"user-1", b'{"n":1}', 1700000000000, [("user-agent", b"curl/8"), ("bin", b"\xff\x00")], None, 0, orders[0]))
evs.append(event(b, None, b"", -5, [], "eu", 3, orders[1]))
evs.append(event(b, b"k", b"abc", 7, [("h", None)], "r\u00e9", 9, orders[2]))
evs.append(event(b, b"k2", b"abcd", 8, [("h2", b"x")], None, 0, orders[0]))
ev = vec_of_tables(b, evs)
b.StartObject(1)
b.PrependUOffsetTRelativeSlot(0, ev, 0)
root = b.EndObject()
b.Finish(root, file_identifier=b"WEIR")
sys.stdout.buffer.write(b.Output())
