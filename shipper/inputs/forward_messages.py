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
from typing import Any

import msgpack

EVENT_TIME = 0                      # msgpack ext type of Fluentd's EventTime: uint32 seconds, uint32 nanos
MAX_ENTRIES_BYTES = 64 * 1024 * 1024   # decompressed entries of one message
MAX_ARRAY_ITEMS = 100_000           # a Forward message's events, any array or map in a record
MAX_PACKED_CONTAINERS = 2_000_000   # arrays and maps in one PackedForward message (each ~60-200 bytes decoded)
_EVENT_TIME = struct.Struct(">II")
_END = b"\xc0"                      # nil after packed entries: seen as an item only if the last entry is whole


class ForwardMessageError(ValueError):
    """Not a forward protocol message (its connection is closed and counted, nothing else)."""


class ForwardMessage:
    """One message: its tag, option, and events ``[epoch, record]`` (lists, as msgpack made them),
    taken in slices so that a PackedForward message of millions of tiny events never lives in memory
    decoded all at once (``slices``)."""

    __slots__ = ("tag", "option", "_events", "_packed")

    def __init__(self, tag: str, events: list | None, option: dict[str, Any], packed: bytes | None = None):
        self.tag = tag
        self.option = option
        self._events = events
        self._packed = packed

    @property
    def chunk(self) -> str | None:
        """The chunk id the sender waits an ``{"ack": chunk}`` for, None when it asked for none."""
        chunk = self.option.get("chunk")
        return chunk if isinstance(chunk, str) and chunk else None

    def slices(self, size: int):
        """The events in lists of at most ``size``; ForwardMessageError at the first that is not one
        (the slices before it were good)."""
        if self._packed is None:
            for first in range(0, len(self._events), size):
                yield self._events[first:first + size]
        else:
            yield from _packed_slices(self._packed, size)

    @property
    def events(self) -> list:
        return [event for piece in self.slices(MAX_ARRAY_ITEMS) for event in piece]


def ext_hook(code: int, data: bytes):
    """EventTime becomes its epoch (a float) wherever it is: as an event's time or inside a record."""
    if code == EVENT_TIME and len(data) == 8:
        seconds, nanoseconds = _EVENT_TIME.unpack(data)
        if nanoseconds >= 1_000_000_000:
            raise ForwardMessageError(f"EventTime nanoseconds out of range: {nanoseconds}")
        return seconds + nanoseconds / 1e9
    return msgpack.ExtType(code, data)


def unpacker(max_buffer_size: int) -> msgpack.Unpacker:
    """What a connection feeds its bytes to: messages out as they complete, none over the size."""
    # Invalid UTF-8 in a str is replaced, as a log file's is: one bad byte must not cost a connection.
    return msgpack.Unpacker(raw=False, ext_hook=ext_hook, max_buffer_size=max_buffer_size,
                            strict_map_key=False, unicode_errors="replace", max_array_len=MAX_ARRAY_ITEMS,
                            max_map_len=MAX_ARRAY_ITEMS)


def checked(entries: list) -> list:
    """``entries`` when each is ``[time, record]`` with a number (not a bool) and a map, else
    ForwardMessageError naming the first that is not. One tight loop: this runs for every event."""
    for entry in entries:
        if type(entry) is not list or len(entry) != 2:
            raise ForwardMessageError("an entry is not [time, record]")
        time_value, record = entry
        kind = type(time_value)
        if kind is not float and kind is not int:
            raise ForwardMessageError(f"an event time is {kind.__name__}, not an integer or EventTime")
        if type(record) is not dict:
            raise ForwardMessageError(f"an event's record is {type(record).__name__}, not a map")
    return entries


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


def _container_budget(limit: int):
    """list_hook and object_hook counting the arrays and maps decoded: inflated entries of tiny nested
    objects cost ~64 bytes of memory a byte, and one entry is decoded whole however it is sliced."""
    left = [limit]

    def counted(value):
        left[0] -= 1
        if left[0] < 0:
            raise ForwardMessageError(f"packed entries hold more than {limit} arrays and maps")
        return value
    return counted


def _packed_slices(data: bytes, size: int):
    counted = _container_budget(MAX_PACKED_CONTAINERS)
    reader = msgpack.Unpacker(raw=False, ext_hook=ext_hook, max_buffer_size=len(data) + 1,
                              strict_map_key=False, unicode_errors="replace", max_array_len=MAX_ARRAY_ITEMS,
                              max_map_len=MAX_ARRAY_ITEMS, list_hook=counted, object_hook=counted)
    reader.feed(data)
    reader.feed(_END)
    ended = False
    try:
        while not ended:
            piece = []
            for entry in reader:
                if entry is None:
                    ended = True
                    break
                piece.append(entry)
                if len(piece) >= size:
                    break
            else:
                break  # out of data before the end mark: the last entry was cut short
            if piece:
                yield checked(piece)
    except ForwardMessageError:
        raise
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise ForwardMessageError(f"packed entries are not msgpack: {exc}") from None
    if not ended:
        raise ForwardMessageError("packed entries end in the middle of an entry")
    if reader.tell() != len(data) + 1:
        raise ForwardMessageError("packed entries hold a nil where an entry should be")


def decode(message: object, max_entries_bytes: int = MAX_ENTRIES_BYTES) -> ForwardMessage:
    """One decoded msgpack object -> its tag, events and option, whatever the carrier mode. The
    entries of PackedForward are checked as they are taken (``ForwardMessage.slices``)."""
    if type(message) is not list or not 2 <= len(message) <= 4:
        raise ForwardMessageError(f"a message is {type(message).__name__}, not an array of 2 to 4 items")
    tag = message[0]
    if not isinstance(tag, str) or not tag:
        raise ForwardMessageError("a message's tag is not a non-empty string")
    second = message[1]
    if type(second) is list:                                    # Forward
        return ForwardMessage(tag, checked(second), _option(message, 2))
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
        return ForwardMessage(tag, None, option, data)
    if len(message) < 3:                                        # Message
        raise ForwardMessageError("a Message has no record")
    return ForwardMessage(tag, checked([[second, message[2]]]), _option(message, 3))


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
