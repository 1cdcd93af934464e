"""Records travel in batches; this module owns their JSON form.

A batch is either *plain* (a blob of complete, valid UTF-8 lines from one file, no parser:
the fast path, which never makes a Python object per line) or *general* (a list of
messages with optional per-record fields: parsed values, flags, event time).
"""

from __future__ import annotations

import copy
import time as _time
from dataclasses import dataclass, field
from datetime import datetime as _datetime
from typing import Any, Iterator

import orjson

# Keys the agent itself writes at the top level; parsed fields with these names go under "fields".
RESERVED_KEYS = frozenset({
    "time", "tag", "host", "instance_id", "image_id", "region", "availability_zone",
    "instance_type", "source", "message", "labels", "fields", "encoding_errors",
    "truncated", "parse_error", "metrics",
})
IDENTITY_KEYS = ("host", "instance_id", "image_id", "region", "availability_zone", "instance_type")


def format_time(epoch: float) -> str:
    """Seconds since the epoch -> RFC 3339 UTC with microseconds, e.g. 2026-11-29T13:17:18.123456Z."""
    seconds = int(epoch)
    micros = int(round((epoch - seconds) * 1_000_000))
    if micros == 1_000_000:
        seconds, micros = seconds + 1, 0
    return _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(seconds)) + f".{micros:06d}Z"


def epoch_of(stamp: Any) -> float | None:
    """A record's time (RFC 3339, as format_time writes it) -> seconds since the epoch; None if it is not one."""
    try:
        return _datetime.fromisoformat(stamp).timestamp()
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Envelope:
    """What every record carries about who produced it: identity fields and labels."""

    identity: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    def head(self, read_time: str, tag: str, source: str | None) -> dict[str, Any]:
        head: dict[str, Any] = {"time": read_time, "tag": tag}
        for key in IDENTITY_KEYS:
            if key in self.identity:
                head[key] = self.identity[key]
        if source is not None:
            head["source"] = source
        return head


class Batch:
    """A run of records from one source, with the byte range of the file it covers.

    ``ack`` is called by the pipeline's bookkeeping once every output confirmed it.
    """

    __slots__ = ("tag", "source", "read_time", "blob", "count", "messages", "fields",
                 "start", "end", "on_done", "ack", "_ndjson", "size")

    def __init__(self, tag: str, source: str | None, read_time: float, *, blob: bytes | None = None,
                 messages: list[str | None] | None = None, fields: list[dict | None] | None = None,
                 start: int = 0, end: int = 0):
        self.tag = tag
        self.source = source
        self.read_time = read_time
        self.blob = blob  # complete lines, valid UTF-8 (checked by the input)
        self.messages = messages
        self.fields = fields
        if blob is not None:
            self.count = blob.count(b"\n")
            self.size = len(blob)
        else:
            self.count = len(messages or ())
            self.size = sum(len(m) for m in messages or () if m)  # None: a record without message
        self.start = start
        self.end = end
        self.on_done = None  # set by the input: what to do once every output confirmed
        self.ack = None      # set by the router: the countdown outputs confirm
        self._ndjson: bytes | None = None

    def for_output(self, ack) -> "Batch":
        """A shallow copy for one output, with that output's share of the acknowledgement
        (the data, and the NDJSON already encoded, are shared)."""
        view = copy.copy(self)
        view.ack = ack
        return view

    # ------------------------------------------------------------ views for outputs

    def ndjson(self, envelope: Envelope) -> bytes:
        """The records as NDJSON (one object per line), encoded once and cached."""
        if self._ndjson is None:
            self._ndjson = encode_ndjson(self, envelope)
        return self._ndjson

    def records(self, envelope: Envelope) -> Iterator[dict[str, Any]]:
        """The records as dicts (for outputs that need structure, not bytes)."""
        head = envelope.head(format_time(self.read_time), self.tag, self.source)
        labels = envelope.labels
        for message, extra in zip(self.message_list(), self.fields or _none_forever()):
            record = dict(head)
            if message is not None:  # a metrics sample has no message
                record["message"] = message
            if extra:
                _merge_fields(record, extra)
            if labels:
                record["labels"] = labels
            yield record

    def message_list(self) -> list[str]:
        if self.messages is not None:
            return self.messages
        lines = self.blob.decode("utf-8").split("\n")
        lines.pop()  # the blob ends with a newline
        return lines


def _none_forever() -> Iterator[None]:
    while True:
        yield None


# Keys the agent sets in a record's extra fields start with NUL, so that a parsed field with
# the same name (a JSON log line with its own "time" or "truncated") can never pose as one.
TIME = "\x00time"
TRUNCATED = "\x00truncated"
ENCODING_ERRORS = "\x00encoding_errors"
PARSE_ERROR = "\x00parse_error"
METRICS = "\x00metrics"


def _merge_fields(record: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if key[:1] == "\x00":
            record[key[1:]] = value
        elif key in RESERVED_KEYS:
            record.setdefault("fields", {})[key] = value
        else:
            record[key] = value


def _prefix_suffix(batch: Batch, envelope: Envelope) -> tuple[bytes, bytes]:
    head = envelope.head(format_time(batch.read_time), batch.tag, batch.source)
    prefix = orjson.dumps(head)[:-1] + b',"message":'
    suffix = b',"labels":' + orjson.dumps(envelope.labels) + b"}\n" if envelope.labels else b"}\n"
    return prefix, suffix


def encode_ndjson(batch: Batch, envelope: Envelope) -> bytes:
    if batch.blob is not None:
        prefix, suffix = _prefix_suffix(batch, envelope)
        return encode_plain_lines(batch.blob, prefix, suffix)
    return b"".join([orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
                     for record in batch.records(envelope)])


# Control characters JSON needs as \u escapes; tab, newline and carriage return are handled below.
_CONTROL = bytes(b for b in range(32) if b not in b"\t\n\r")
_NOT_CONTROL = bytes(b for b in range(256) if b not in _CONTROL)


def encode_plain_lines(blob: bytes, prefix: bytes, suffix: bytes) -> bytes:
    """NDJSON for a blob of valid UTF-8 lines, each ending in a newline.

    Each record is ``prefix + json_string(line) + suffix``. The fast path escapes the whole
    blob with a few ``bytes.replace`` passes (backslash, quote, tab, carriage return) and
    turns every newline into a record boundary: no Python object per line, which matters
    more than anything else here. A blob holding another control character is escaped line
    by line by orjson.
    """
    if not blob:
        return b""
    if blob.translate(None, _NOT_CONTROL):
        lines = blob[:-1].decode("utf-8").split("\n")
        return b"".join((prefix, (suffix + prefix).join([orjson.dumps(line) for line in lines]), suffix))
    escaped = blob.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"\t", b"\\t").replace(b"\r", b"\\r")
    # The last newline becomes a boundary too; the join leaves out the prefix and quote it opens.
    joined = escaped.replace(b"\n", b'"' + suffix + prefix + b'"')
    return b"".join((prefix, b'"', memoryview(joined)[:-(len(prefix) + 1)]))
