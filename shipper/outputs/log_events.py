"""CloudWatch Logs events and the PutLogEvents limits, honoured by construction.

Pure functions over plain tuples, so the tests can check every limit directly:
a request holds at most 10,000 events and 1,048,576 bytes (UTF-8 message bytes plus 26
per event), its events are in time order and span less than 24 hours, and no event is
over 256 KiB (longer messages are cut into parts on character boundaries).
"""

from __future__ import annotations

import collections
from datetime import datetime
from typing import NamedTuple

MAX_EVENTS = 10_000
MAX_REQUEST_BYTES = 1_048_576
EVENT_OVERHEAD = 26
MAX_EVENT_BYTES = 256 * 1024                      # message bytes + overhead
MAX_MESSAGE_BYTES = MAX_EVENT_BYTES - EVENT_OVERHEAD
MAX_SPAN_MS = 24 * 3600 * 1000                    # a request must span less than this


class Tally:
    """How many events of one input batch are still unsent; its acknowledgement fires at zero."""

    __slots__ = ("ack", "remaining")

    def __init__(self, ack, remaining: int):
        self.ack = ack
        self.remaining = remaining


class Event(NamedTuple):
    timestamp: int   # milliseconds since the epoch
    message: str
    size: int        # UTF-8 bytes of the message + EVENT_OVERHEAD
    tally: Tally


def utf8_parts(message: str, limit: int = MAX_MESSAGE_BYTES) -> list[str]:
    """``message`` cut into pieces of at most ``limit`` UTF-8 bytes, never inside a character."""
    data = message.encode()
    if len(data) <= limit:
        return [message]
    parts = []
    start = 0
    while start < len(data):
        end = min(start + limit, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:  # a continuation byte: back off
            end -= 1
        parts.append(data[start:end].decode())
        start = end
    return parts


def timestamp_ms(rfc3339: str | None, default_ms: int) -> int:
    """A record's event time (RFC 3339, as the parsers write it) in ms; ``default_ms`` without one."""
    if not rfc3339:
        return default_ms
    try:
        return int(datetime.fromisoformat(rfc3339).timestamp() * 1000)
    except (TypeError, ValueError, OverflowError):  # not a time the agent wrote: the read time
        return default_ms


def take_request(pending: collections.deque[Event], max_events: int = MAX_EVENTS) -> list[Event]:
    """Pop the next request's events from the front of ``pending``, sorted by time.

    Events are taken in arrival order while the count and byte limits allow; if the sorted
    events span 24 hours or more, the later ones go back to the front of ``pending``.
    """
    taken: list[Event] = []
    size = 0
    limit = min(max_events, MAX_EVENTS)
    while pending and len(taken) < limit:
        event = pending[0]
        if size + event.size > MAX_REQUEST_BYTES:
            break
        taken.append(pending.popleft())
        size += event.size
    taken.sort(key=_by_time)
    if taken and taken[-1].timestamp - taken[0].timestamp >= MAX_SPAN_MS:
        end = _first_outside(taken, taken[0].timestamp + MAX_SPAN_MS)
        pending.extendleft(reversed(taken[end:]))
        del taken[end:]
    return taken


def _by_time(event: Event) -> int:
    return event.timestamp


def _first_outside(events: list[Event], bound: int) -> int:
    low, high = 0, len(events)
    while low < high:
        middle = (low + high) // 2
        if events[middle].timestamp < bound:
            low = middle + 1
        else:
            high = middle
    return low


def rejected_ranges(info: dict | None, count: int) -> dict[str, range]:
    """Which events of a request CloudWatch refused, by reason, from ``rejectedLogEventsInfo``.

    ``tooNewLogEventStartIndex`` is the first too-new event; ``tooOldLogEventEndIndex`` and
    ``expiredLogEventEndIndex`` are the last too-old and expired ones (inclusive).
    """
    if not info:
        return {}
    ranges = {}
    old_end = info.get("tooOldLogEventEndIndex")
    expired_end = info.get("expiredLogEventEndIndex")
    new_start = info.get("tooNewLogEventStartIndex")
    if old_end is not None:
        ranges["too_old"] = range(0, min(count, old_end + 1))
    if expired_end is not None:  # the expired ones are the old ones not already counted as too old
        start = 0 if old_end is None else old_end + 1
        ranges["expired"] = range(start, min(count, max(start, expired_end + 1)))
    if new_start is not None:
        ranges["too_new"] = range(max(0, new_start), count)
    return {reason: span for reason, span in ranges.items() if len(span)}


# format = "json": each event is its record's JSON object with this first key, so that a reader
# (shipper fetch) takes as records only what the agent wrote as records, never a raw line that
# happens to be JSON. The event stays one plain JSON object (Logs Insights parses it).
RECORD_MARK = '"shipper_format":"json",'


def marked_records(ndjson: str) -> str:
    """NDJSON records (one object a line: JSON escapes every newline inside) with RECORD_MARK first."""
    return ("\n" + ndjson).replace("\n{", "\n{" + RECORD_MARK)[1:]


def unmarked(messages: list[str], blob: bytes | None = None) -> list[str]:
    """format = "raw": a line that begins like a marked record gets a leading space, so a reader
    never takes a raw line as a record (the blob, when there is one, is searched at C speed)."""
    head = "{" + RECORD_MARK
    if blob is not None and head.encode() not in blob:
        return messages
    if not any(m and m.startswith(head) for m in messages):
        return messages
    return [" " + m if m and m.startswith(head) else m for m in messages]
