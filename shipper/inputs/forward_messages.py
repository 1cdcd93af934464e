"""Forward protocol messages as a receiver reads them (Fluentd's forward protocol v1): the four carrier
modes, Message ``[tag, time, record(, option)]``, Forward ``[tag, [[time, record], ...](, option)]``,
PackedForward ``[tag, bin(entries)(, option)]`` and CompressedPackedForward (PackedForward with
``{"compressed": "gzip"}``), with times as integers, floats or EventTime (msgpack ext type 0).

Pure functions over what msgpack decoded, bounded: a compressed chunk is inflated up to a limit (a
gzip bomb is an error, not an allocation), and anything that is not the protocol is a
:class:`ForwardMessageError` naming what is wrong, for the input to close that connection and count
it (``inputs/forward.py``).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack

EVENT_TIME = 0                      # msgpack ext type of Fluentd's EventTime: uint32 seconds, uint32 nanos
MAX_ENTRIES_BYTES = 64 * 1024 * 1024   # decompressed entries of one message


class ForwardMessageError(ValueError):
    """Not a forward protocol message (its connection is closed and counted, nothing else)."""


@dataclass
class EventTime:
    seconds: int
    nanoseconds: int

    def epoch(self) -> float:
        return self.seconds + self.nanoseconds / 1e9


@dataclass
class ForwardMessage:
    tag: str
    events: list[tuple[float, dict[str, Any]]]
    option: dict[str, Any] = field(default_factory=dict)

    @property
    def chunk(self) -> str | None:
        """The chunk id the sender waits an ``{"ack": chunk}`` for, None when it asked for none."""
        chunk = self.option.get("chunk")
        return chunk if isinstance(chunk, str) and chunk else None


def ext_hook(code: int, data: bytes):
    if code == EVENT_TIME and len(data) == 8:
        return EventTime(*struct.unpack(">II", data))
    return msgpack.ExtType(code, data)


def unpacker(max_buffer_size: int) -> msgpack.Unpacker:
    """What a connection feeds its bytes to: messages out as they complete, none over the size."""
    # Invalid UTF-8 in a str is replaced, as a log file's is: one bad byte must not cost a connection.
    return msgpack.Unpacker(raw=False, ext_hook=ext_hook, max_buffer_size=max_buffer_size,
                            strict_map_key=False, unicode_errors="replace")


def event_epoch(value: object) -> float:
    if isinstance(value, EventTime):
        if value.nanoseconds >= 1_000_000_000:
            raise ForwardMessageError(f"EventTime nanoseconds out of range: {value.nanoseconds}")
        return value.epoch()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ForwardMessageError(f"an event time is {type(value).__name__}, not an integer or EventTime")
    return float(value)


def _event(time_value: object, record: object) -> tuple[float, dict[str, Any]]:
    if not isinstance(record, dict):
        raise ForwardMessageError(f"an event's record is {type(record).__name__}, not a map")
    return event_epoch(time_value), record


def inflate_gzip(data: bytes, limit: int) -> bytes:
    """Every gzip member of ``data`` inflated (senders concatenate one per flush), at most ``limit``
    bytes in all."""
    out = []
    total = 0
    while data:
        inflater = zlib.decompressobj(wbits=31)
        try:
            piece = inflater.decompress(data, limit - total + 1)
        except zlib.error as exc:
            raise ForwardMessageError(f"compressed entries are not gzip: {exc}") from None
        total += len(piece)
        if total > limit or inflater.unconsumed_tail:
            raise ForwardMessageError(f"compressed entries inflate to more than {limit} bytes")
        if not inflater.eof:
            raise ForwardMessageError("compressed entries end in the middle of a gzip member")
        out.append(piece)
        data = inflater.unused_data
    return b"".join(out)


def _packed_events(data: bytes) -> list[tuple[float, dict[str, Any]]]:
    reader = msgpack.Unpacker(raw=False, ext_hook=ext_hook, max_buffer_size=max(len(data), 1),
                              strict_map_key=False, unicode_errors="replace")
    reader.feed(data)
    events = []
    end = 0  # where the last whole entry ended (tell() after a stop counts the partial one too)
    try:
        for entry in reader:
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ForwardMessageError("a packed entry is not [time, record]")
            events.append(_event(*entry))
            end = reader.tell()
    except ForwardMessageError:
        raise
    except (msgpack.UnpackException, ValueError) as exc:
        raise ForwardMessageError(f"packed entries are not msgpack: {exc}") from None
    if end != len(data):
        raise ForwardMessageError("packed entries end in the middle of an entry")
    return events


def decode(message: object, max_entries_bytes: int = MAX_ENTRIES_BYTES) -> ForwardMessage:
    """One decoded msgpack object -> its tag, events and option, whatever the carrier mode."""
    if not isinstance(message, (list, tuple)) or not 2 <= len(message) <= 4:
        raise ForwardMessageError(f"a message is {type(message).__name__}, not an array of 2 to 4 items")
    tag = message[0]
    if not isinstance(tag, str) or not tag:
        raise ForwardMessageError("a message's tag is not a non-empty string")
    second = message[1]
    if isinstance(second, (list, tuple)):                      # Forward
        option = _option(message, 2)
        events = []
        for entry in second:
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ForwardMessageError("a Forward entry is not [time, record]")
            events.append(_event(*entry))
        return ForwardMessage(tag, events, option)
    if isinstance(second, (bytes, str)):                        # PackedForward, maybe compressed
        option = _option(message, 2)
        data = second.encode("utf-8", "surrogateescape") if isinstance(second, str) else second
        method = option.get("compressed")
        if method not in (None, "text", "gzip"):
            raise ForwardMessageError(f"compressed entries of an unknown method {method!r}")
        if method == "gzip":
            data = inflate_gzip(data, max_entries_bytes)
        elif len(data) > max_entries_bytes:
            raise ForwardMessageError(f"packed entries are more than {max_entries_bytes} bytes")
        return ForwardMessage(tag, _packed_events(data), option)
    if len(message) < 3:                                        # Message
        raise ForwardMessageError("a Message has no record")
    option = _option(message, 3)
    return ForwardMessage(tag, [_event(second, message[2])], option)


def _option(message, at: int) -> dict[str, Any]:
    if len(message) <= at or message[at] is None:
        return {}
    if len(message) > at + 1:
        raise ForwardMessageError("a message has more items than its mode allows")
    option = message[at]
    if not isinstance(option, dict):
        raise ForwardMessageError(f"a message's option is {type(option).__name__}, not a map")
    return option


def ack(chunk: str) -> bytes:
    """The answer a sender that asked for one waits for, once its chunk is durable."""
    return msgpack.packb({"ack": chunk})
