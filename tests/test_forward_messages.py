"""Forward protocol messages as a receiver decodes them (shipper.inputs.forward_messages): the four
carrier modes as fluent-logger, Docker's fluentd driver and the agent's own output send them, and
what a broken or hostile sender may send instead."""

from __future__ import annotations

import gzip

import msgpack
import pytest
from fluent.sender import EventTime as SenderEventTime, FluentSender

from shipper.inputs.forward_messages import ForwardMessageError, ack, decode, inflate_gzip, unpacker


def received(data: bytes, limit: int = 1 << 20) -> list:
    reader = unpacker(limit)
    reader.feed(data)
    return [decode(message) for message in reader]


def pack_entry(seconds: int, nanos: int, record: dict) -> bytes:
    time_value = msgpack.ExtType(0, seconds.to_bytes(4, "big") + nanos.to_bytes(4, "big"))
    return msgpack.packb([time_value, record])


def test_fluent_logger_sends_message_mode_with_event_time():
    sender = FluentSender("app", host="127.0.0.1", port=1, nanosecond_precision=True)
    packet = sender._make_packet("web", SenderEventTime(1_700_000_000.25), {"user": "ann", "n": 1})
    [message] = received(packet)
    assert message.tag == "app.web" and message.chunk is None
    assert message.events == [[pytest.approx(1_700_000_000.25), {"user": "ann", "n": 1}]]
    integer = FluentSender("app", host="127.0.0.1", port=1)._make_packet("web", 1_700_000_000, {"a": 1})
    assert received(integer)[0].events == [[1_700_000_000, {"a": 1}]]


def test_dockers_driver_message_with_a_chunk_to_ack():
    # fluent-logger-golang as Docker's --log-driver=fluentd uses it (fluentd-async off, RequestAck on)
    record = {"container_id": "f" * 64, "container_name": "/web", "source": "stdout", "log": "GET / 200"}
    data = msgpack.packb(["docker.web", msgpack.ExtType(0, bytes.fromhex("6553f1001dcd6500")), record,
                          {"chunk": "p8n9gmxTQVC8/nh2wlKKeQ=="}])
    [message] = received(data)
    assert message.tag == "docker.web" and message.events[0][1] == record
    assert message.chunk == "p8n9gmxTQVC8/nh2wlKKeQ=="
    assert msgpack.unpackb(ack(message.chunk)) == {"ack": "p8n9gmxTQVC8/nh2wlKKeQ=="}


def test_forward_packed_and_compressed_modes_give_the_same_events():
    entries = [(1_700_000_000, 5, {"i": i, "log": f"line {i}"}) for i in range(3)]
    forward = msgpack.packb(["app", [[msgpack.ExtType(0, s.to_bytes(4, "big") + n.to_bytes(4, "big")), r]
                                     for s, n, r in entries], {"chunk": "c1", "size": 3}])
    stream = b"".join(pack_entry(*e) for e in entries)
    packed = msgpack.packb(["app", stream, {"chunk": "c2", "size": 3}], use_bin_type=True)
    # two gzip members, as a sender that flushes twice makes them
    compressed = msgpack.packb(["app", gzip.compress(stream[:20]) + gzip.compress(stream[20:]),
                                {"chunk": "c3", "compressed": "gzip"}], use_bin_type=True)
    decoded = received(forward + packed + compressed)
    assert [m.chunk for m in decoded] == ["c1", "c2", "c3"]
    expected = [[pytest.approx(s + n / 1e9), r] for s, n, r in entries]
    for message in decoded:
        assert message.tag == "app" and message.events == expected


def test_the_agents_own_output_is_read_back():
    from shipper.outputs.forward_protocol import forward_message

    entries = b"".join(pack_entry(1_700_000_000 + i, 0, {"message": f"m{i}"}) for i in range(4))
    for compression in ("none", "gzip"):
        [message] = received(forward_message("app.log", entries, 4, "chunk-1", compression))
        assert message.tag == "app.log" and message.chunk == "chunk-1"
        assert [r["message"] for _, r in message.events] == ["m0", "m1", "m2", "m3"]


@pytest.mark.parametrize("message, error", [
    ("just a string", "not an array"),
    (["app"], "not an array of 2 to 4"),
    ([1, 1_700_000_000, {}], "tag is not a non-empty string"),
    (["", 1_700_000_000, {}], "tag is not a non-empty string"),
    (["app", 1_700_000_000], "has no record"),
    (["app", 1_700_000_000, "not a map"], "not a map"),
    (["app", "yesterday", {}], "not \\[time, record\\]"),  # a str is PackedForward: no entries in it
    (["app", True, {}], "not an integer or EventTime"),
    (["app", [[1, {}], [2]]], "not \\[time, record\\]"),
    (["app", 1_700_000_000, {}, "option"], "option is str"),
    (["app", [[1, {}]], {}, "extra"], "more items"),
    (["app", b"\x92\x01", {}], "end in the middle"),
    (["app", b"\xc1", {}], "not msgpack"),
    (["app", b"\x01", {}], "not \\[time, record\\]"),
    (["app", b"data", {"compressed": "lz4"}], "unknown method"),
    (["app", b"not gzip", {"compressed": "gzip"}], "not gzip"),
    (["app", gzip.compress(b"\x92\x01\x80")[:-6], {"compressed": "gzip"}], "middle of a gzip member"),
])
def test_what_is_not_the_protocol_is_an_error_naming_it(message, error):
    with pytest.raises(ForwardMessageError, match=error):
        decode(message).events  # packed entries are checked as they are taken


def test_a_gzip_bomb_is_refused_at_the_limit_not_inflated():
    bomb = gzip.compress(b"\x00" * (8 << 20))   # 8 MiB of zeros in ~8 KiB
    assert len(bomb) < 64 * 1024
    with pytest.raises(ForwardMessageError, match="more than 1048576 bytes"):
        inflate_gzip(bomb, 1 << 20)
    with pytest.raises(ForwardMessageError, match="more than"):
        decode(["app", bomb, {"compressed": "gzip"}], max_entries_bytes=1 << 20)
    assert inflate_gzip(gzip.compress(b"ab") + gzip.compress(b"cd"), 4) == b"abcd"


def test_an_event_time_out_of_range_is_an_error():
    bad = msgpack.packb(["app", msgpack.ExtType(0, (1).to_bytes(4, "big") + (10**9).to_bytes(4, "big")), {}])
    with pytest.raises(ForwardMessageError, match="nanoseconds out of range"):
        received(bad)


def test_a_message_over_the_buffer_size_is_refused_by_the_unpacker():
    reader = unpacker(1024)
    with pytest.raises(msgpack.BufferFull):
        reader.feed(msgpack.packb(["app", 1, {"log": "x" * 2000}]))


def test_a_compressed_message_of_millions_of_tiny_events_is_taken_a_slice_at_a_time():
    import tracemalloc

    tiny = msgpack.packb([0, {}])                       # 3 bytes an event
    count = 900_000                                     # two containers each: under the budget
    bomb = gzip.compress(tiny * count, 9)               # a few KiB on the wire
    assert len(bomb) < 64 * 1024
    tracemalloc.start()
    try:
        message = decode(["app", bomb, {"compressed": "gzip", "chunk": "c"}], max_entries_bytes=16 << 20)
        pieces = message.slices(10_000)
        first = next(pieces)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(first) == 10_000 and first[0] == [0, {}]
    # The inflated entries (2.7 MB) and one slice; decoded whole they take over 130 MB.
    assert peak < 20 * 1024**2, peak
    assert sum(len(piece) for piece in pieces) == count - 10_000


def test_a_forward_message_of_more_events_than_a_message_may_hold_is_refused():
    reader = unpacker(16 << 20)
    reader.feed(msgpack.packb(["app", [[0, {}]] * 100_001]))
    with pytest.raises(ValueError):
        list(reader)
    reader = unpacker(16 << 20)
    reader.feed(msgpack.packb(["app", [[0, {}]] * 100_000]))
    assert len(decode(next(reader)).events) == 100_000


def test_event_rows_take_the_message_key_and_give_each_event_its_time():
    from shipper.inputs.forward import TimeText, event_rows
    from shipper.record import PARSED, TIME, format_time

    epochs = [1764669600.0, 1764669600.9999996, 1764669601.25, float("nan"), -5.0, 1e13, 1764669601]
    events = [[epoch, {"log": f"line {i}\n", "n": i}] for i, epoch in enumerate(epochs)]
    events.append([1764669602, {"log": 42}])     # not text: stays a field
    events.append([1764669602, {"other": "x"}])  # no message
    messages, fields = event_rows(events, "log", TimeText())
    assert messages[:7] == [f"line {i}" for i in range(7)] and messages[7:] == [None, None]
    assert [f[TIME] for f in fields[:7]] == [format_time(e) for e in epochs]
    assert fields[7][PARSED] == {"log": 42} and fields[8][PARSED] == {"other": "x"}
    whole, fields = event_rows([[1.5, {"log": "kept"}]], "", TimeText())
    assert whole == [None] and fields[0][PARSED] == {"log": "kept"}


def test_packed_entries_of_tiny_nested_objects_are_refused_past_a_budget():
    # One entry, so slicing does not help: 3 million empty maps in an array of arrays, 3 MB inflated,
    # ~200 MB decoded.
    nested = b"\xdc" + (50).to_bytes(2, "big") + (b"\xdc" + (60_000).to_bytes(2, "big") + b"\x80" * 60_000) * 50
    entry = b"\x92\x00\x81\xa1a" + nested
    bomb = gzip.compress(entry, 9)
    assert len(bomb) < 64 * 1024
    with pytest.raises(ForwardMessageError, match="more than 2000000 arrays and maps"):
        decode(["app", bomb, {"compressed": "gzip"}], max_entries_bytes=16 << 20).events
