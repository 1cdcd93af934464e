"""From a file's reads to batches of records: decoding, multi-line joining, parsing.

The plain path (valid UTF-8, parser none, no multiline) hands the blob of lines on as it
is. Anything else goes through the general path, one message at a time.
"""

from __future__ import annotations

import logging
from typing import Any

from shipper.inputs.tail import LINES, PART, Read
from shipper.multiline import Joiner
from shipper.parsers import LineParser
from shipper.record import ENCODING_ERRORS, TRUNCATED, Batch, raw_fields

log = logging.getLogger(__name__)

_TRUNCATED = {TRUNCATED: True}
_BAD_UTF8 = {ENCODING_ERRORS: True}


def decode_lines(data: bytes) -> list[tuple[str, int, dict | None]]:
    """Complete lines -> (text, bytes consumed, flags); invalid UTF-8 replaced and flagged."""
    out = []
    for raw in data.split(b"\n")[:-1]:
        try:
            out.append((raw.decode("utf-8"), len(raw) + 1, None))
        except UnicodeDecodeError:
            out.append((raw.decode("utf-8", "replace"), len(raw) + 1, _BAD_UTF8))
    return out


def decode_one(data: bytes, consumed: int, truncated: bool) -> tuple[str, int, dict | None]:
    flags = dict(_TRUNCATED) if truncated else None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", "replace")
        flags = {**(flags or {}), **_BAD_UTF8}
    return text, consumed, flags


def messages_of(read: Read, need_consumed: bool) -> list[tuple[str, int, dict | None]]:
    """Every message in a read, in order, with the file bytes each consumed."""
    out: list[tuple[str, int, dict | None]] = []
    for kind, data, consumed in read.blocks:
        if kind == LINES:
            if not need_consumed:
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    out.extend(decode_lines(data))
                    continue
                lines = text.split("\n")
                lines.pop()
                out.extend((line, 0, None) for line in lines)
            else:
                out.extend(decode_lines(data))
        else:
            out.append(decode_one(data, consumed, kind == PART))
    return out


class RecordBuilder:
    """One per tailed file: turns its reads into batches covering contiguous byte ranges."""

    def __init__(self, tag: str, source: str, parser: LineParser, joiner: Joiner | None, start: int):
        self.tag = tag
        self.source = source
        self.parser = parser
        self.joiner = joiner
        self.batch_start = start  # where the next batch's byte range begins
        self.failures = 0         # reads that failed to frame or parse and were shipped raw

    @property
    def holds_event(self) -> bool:
        return bool(self.joiner and self.joiner.pending)

    def build(self, read: Read, now: float) -> Batch | None:
        """The batch of a read. A record can fail, the agent cannot: if joining or parsing raises
        on this read, its lines (and the event held from before) are shipped raw, flagged."""
        held = self.joiner.snapshot() if self.joiner is not None else None
        try:
            return self._build(read, now)
        except Exception:
            self.failures += 1
            log.exception("%s: cannot frame or parse the lines at offset %d; shipping them raw with "
                          "parse_error", self.source, self.batch_start)
            return self._raw_batch(read, now, held)

    def _raw_batch(self, read: Read, now: float, held: tuple | None) -> Batch | None:
        events: list[tuple[str, dict | None]] = []
        if self.joiner is not None:
            self.joiner.restore(held)
            events.extend((line, self.joiner.pending_flags) for line in self.joiner.pending)
            self.joiner.reset()
        events.extend((text, flags) for text, _, flags in messages_of(read, need_consumed=True))
        if not events:
            return None
        return self._batch(now, read.end, messages=[text for text, _ in events],
                           fields=[raw_fields(flags) for _, flags in events])

    def _build(self, read: Read, now: float) -> Batch | None:
        if (self.joiner is None and self.parser.is_noop and len(read.blocks) == 1
                and read.blocks[0][0] == LINES and _is_utf8(read.blocks[0][1])):
            return self._batch(now, read.end, blob=read.blocks[0][1])
        events: list[tuple[str, dict | None]] = []
        if self.joiner is None:
            events = [(text, flags) for text, _, flags in messages_of(read, need_consumed=False)]
            end = read.end
        else:
            for text, consumed, flags in messages_of(read, need_consumed=True):
                self.joiner.feed(text, consumed, flags, events)
            end = read.end - self.joiner.pending_bytes
        return self._events_batch(events, now, end)

    def flush_pending(self, now: float) -> Batch | None:
        """Ship the held multi-line event (its timeout passed, or the agent is stopping)."""
        if not self.holds_event:
            return None
        end = self.batch_start + self.joiner.pending_bytes
        events: list[tuple[str, dict | None]] = []
        self.joiner.flush(events)
        return self._events_batch(events, now, end)

    def restart(self, offset: int) -> None:
        """The file starts over (truncated): forget any held event's bytes."""
        self.batch_start = offset
        if self.joiner is not None:
            self.joiner.reset()

    def _events_batch(self, events: list[tuple[str, dict | None]], now: float, end: int) -> Batch | None:
        if not events:
            return None
        messages = [text for text, _ in events]
        parse = None if self.parser.is_noop else self.parser.fields_for
        fields: list[dict[str, Any] | None] | None = None
        if parse is not None:
            fields = [(parse(text) | flags) if flags else parse(text) for text, flags in events]
        elif any(flags for _, flags in events):
            fields = [flags for _, flags in events]
        return self._batch(now, end, messages=messages, fields=fields)

    def _batch(self, now: float, end: int, **content: Any) -> Batch:
        batch = Batch(self.tag, self.source, now, start=self.batch_start, end=end, **content)
        self.batch_start = end
        return batch


def _is_utf8(data: bytes) -> bool:
    if data.isascii():  # most logs: a check at memory speed, no decoding
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
