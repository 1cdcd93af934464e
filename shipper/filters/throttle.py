"""The ``throttle`` filter: a rate limit per key (a file, a tag, or a field such as ``unit``).

Each key has token buckets (:class:`TokenBucket`, lines and/or bytes per second, holding ``burst``
seconds of its rate). Over the limit, ``when_exceeded = "drop"`` keeps the first lines the tokens
allow (a plain blob is cut at a newline, no object per line) and drops the rest, counted
``records_dropped{reason="throttled"}``; records at or above ``keep_level`` are never dropped (for
plain lines without a level field the level filter's rule finds it, on the lines over the limit
only). ``"hold"`` makes the reading thread wait until the tokens are there: the whole input then
reads more slowly (all of its files), nothing is lost, the file is the buffer; the wait ends at once
when the agent stops. Every ``summary_interval`` (and at stop) a key that dropped records gets a
summary record, ``"throttled": {"source": ..., "dropped": N, "since": ...}``, so the gap shows in the
archive. At most ``max_keys`` keys are kept (least recently used first out): memory stays bounded
whatever a field's values are.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import time
from collections import OrderedDict

from shipper import heartbeat
from shipper.config import Option
from shipper.filters import Filter, FilterContext, derived, field_value, keep_records, level_check, level_rank
from shipper.filters.level import line_levels, record_level_or_rule
from shipper.record import THROTTLED, Batch, format_time

log = logging.getLogger(__name__)


class TokenBucket:
    """``rate`` tokens a second, at most ``capacity``; full at the start. Pure: the caller gives the time."""

    __slots__ = ("rate", "capacity", "tokens", "stamp")

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = now

    def refill(self, now: float) -> float:
        """The tokens there at ``now`` (a clock going back adds none)."""
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.tokens

    def take(self, amount: float) -> None:
        """Spend ``amount`` (after refill); may go below zero: a debt the next ones wait out."""
        self.tokens -= amount

    def wait_for(self, amount: float) -> float:
        """Seconds until ``min(amount, capacity)`` tokens are there (0: now)."""
        wanted = min(amount, self.capacity)
        return 0.0 if self.tokens >= wanted else (wanted - self.tokens) / self.rate


class Limit:
    """One key's buckets and what it dropped since its last summary."""

    __slots__ = ("lines", "bytes", "dropped", "since", "tag", "source")

    def __init__(self, lines_rate: float, bytes_rate: float, burst: float, now: float, tag: str, source):
        self.lines = TokenBucket(lines_rate, max(1.0, lines_rate * burst), now) if lines_rate else None
        self.bytes = TokenBucket(bytes_rate, max(1.0, bytes_rate * burst), now) if bytes_rate else None
        self.dropped = 0
        self.since = 0.0
        self.tag = tag
        self.source = source

    def allowed(self, now: float) -> tuple[float, float]:
        """(lines, bytes) that may pass now (inf: no such limit)."""
        lines = self.lines.refill(now) if self.lines is not None else math.inf
        size = self.bytes.refill(now) if self.bytes is not None else math.inf
        return lines, size

    def bytes_full(self) -> bool:
        """The byte bucket is full (after refill): one record passes whatever its size, in debt. Else a
        line longer than the bucket could never pass."""
        return self.bytes is not None and self.bytes.tokens >= self.bytes.capacity

    def take(self, lines: int, size: int) -> None:
        if self.lines is not None:
            self.lines.take(lines)
        if self.bytes is not None:
            self.bytes.take(size)

    def wait_for(self, lines: int, size: int) -> float:
        return max(self.lines.wait_for(lines) if self.lines is not None else 0.0,
                   self.bytes.wait_for(size) if self.bytes is not None else 0.0)

    def note_dropped(self, count: int, now: float) -> None:
        if count:
            if not self.dropped:
                self.since = now
            self.dropped += count


def blob_cut(blob: bytes, lines: float, size: float) -> tuple[int, int]:
    """Where to cut a blob so that its head holds at most ``lines`` lines and ``size`` bytes, whole
    lines only: (offset after the kept head, lines in it). In C: rfind for the bytes, split for the lines."""
    end = len(blob)
    if size < end:
        end = blob.rfind(b"\n", 0, max(0, int(size))) + 1  # the head's last newline within size
    if lines < math.inf:
        wanted = max(0, int(lines))
        if wanted == 0:
            return 0, 0
        head = blob[:end]
        if head.count(b"\n") > wanted:
            end = len(head) - len(head.split(b"\n", wanted)[-1])
    return end, blob.count(b"\n", 0, end)


class ThrottleFilter(Filter):
    OPTIONS = {
        "key": Option("str", "source"),          # "source" (the file), "tag", or a field name (unit, ...)
        "lines_per_second": Option("float", 0.0, minimum=0.0, maximum=1e9),
        "bytes_per_second": Option("size", 0),
        "burst": Option("duration", 1.0, minimum=0.001, maximum=3600.0),  # the bucket holds burst x rate
        "when_exceeded": Option("choice", "drop", choices=("drop", "hold")),
        "keep_level": Option("str", None, check=level_check),  # never drop records at or above it
        "max_keys": Option("int", 10_000, minimum=1, maximum=1_000_000),
        "summary_interval": Option("duration", 60.0, minimum=1.0, maximum=86400.0),
    }

    @staticmethod
    def problems(settings, where: str) -> list[str]:
        if not settings.lines_per_second and not settings.bytes_per_second:
            return [f"{where}.lines_per_second: set lines_per_second or bytes_per_second (or both) above 0"]
        if settings.when_exceeded == "hold" and settings.keep_level is not None:
            return [f"{where}.keep_level: only with when_exceeded = \"drop\" (holding drops nothing)"]
        if not settings.key:
            return [f"{where}.key: expected \"source\", \"tag\" or a field name"]
        return []

    @staticmethod
    def summary(settings) -> str:
        rates = [f"{settings.lines_per_second:g} lines/s"] if settings.lines_per_second else []
        if settings.bytes_per_second:
            rates.append(f"{settings.bytes_per_second} bytes/s")
        return f"per {settings.key}: {', '.join(rates)}, burst {settings.burst:g}s, {settings.when_exceeded}"

    def __init__(self, settings, context: FilterContext, clock=time.time):
        super().__init__(settings, context)
        self.clock = clock
        self.key = settings.key
        self.lines_rate = float(settings.lines_per_second)
        self.bytes_rate = float(settings.bytes_per_second)
        self.burst = settings.burst
        self.hold = settings.when_exceeded == "hold"
        self.keep_rank = level_rank(settings.keep_level) if settings.keep_level is not None else None
        self.max_keys = settings.max_keys
        self.interval = settings.summary_interval
        self.limits: OrderedDict = OrderedDict()  # key -> Limit, least recently used first
        self.evicted: list[tuple[object, Limit]] = []  # limits pushed out with drops still to report
        self.lock = threading.Lock()

    # ------------------------------------------------------------ keys

    def _limit(self, key, now: float, tag: str, source) -> Limit:
        """Under self.lock."""
        limit = self.limits.get(key)
        if limit is None:
            limit = self.limits[key] = Limit(self.lines_rate, self.bytes_rate, self.burst, now, tag, source)
            if len(self.limits) > self.max_keys:
                old_key, old = self.limits.popitem(last=False)
                if old.dropped:
                    self.evicted.append((old_key, old))
        else:
            self.limits.move_to_end(key)
        return limit

    def _field_key(self, message, extra, batch: Batch):
        """A record's bucket key by the key field; one without the field is limited with its file's
        records (not in one bucket for all)."""
        value = field_value(self.key, message, extra, batch.tag, batch.source)
        if value is None:
            return _NO_FIELD, batch.source if batch.source is not None else batch.tag
        return _hashable(value)

    def _batch_key(self, batch: Batch):
        if self.key == "source":
            return batch.source if batch.source is not None else batch.tag
        if self.key == "tag":
            return batch.tag
        return None  # a field: per record

    # ------------------------------------------------------------ apply

    def apply(self, batch: Batch) -> list[Batch]:
        if not batch.count:
            return [batch]
        key = self._batch_key(batch)
        if self.hold:
            self._hold(batch, key)
            return [batch]
        if key is not None and batch.blob is not None:
            return [self._drop_blob(batch, key)]
        return [self._drop_records(batch, key)]

    def _hold(self, batch: Batch, key) -> None:
        """Wait (in the reading thread) until the key's tokens allow the batch, then take them."""
        if key is None:  # a field key: one wait per key, in the order of the records
            shares: dict = {}
            fields = batch.fields or [None] * batch.count
            for message, extra in zip(batch.message_list(), fields):
                share = self._field_key(message, extra, batch)
                lines, size = shares.get(share, (0, 0))
                shares[share] = (lines + 1, size + len(message or ""))
        else:
            shares = {key: (batch.count, batch.size)}
        waited = 0.0
        stop = self.context.stop
        for share_key, (lines, size) in shares.items():
            while True:
                with self.lock:
                    now = self.clock()
                    limit = self._limit(share_key, now, batch.tag, batch.source)
                    limit.allowed(now)
                    delay = limit.wait_for(lines, size)
                    if delay <= 0 or stop.is_set():
                        limit.take(lines, size)
                        break
                delay = min(delay, 1.0)  # wake now and then: a stop
                with heartbeat.waiting():  # holding on purpose: the input is not stuck
                    stop.wait(delay)
                waited += delay
        if waited:
            self.context.stats.add("throttle_held_seconds", waited, filter=self.context.name)

    def _drop_blob(self, batch: Batch, key) -> Batch:
        """Keep the head of the blob the tokens allow; the rest goes, except records at keep_level."""
        with self.lock:
            now = self.clock()
            limit = self._limit(key, now, batch.tag, batch.source)
            lines, size = limit.allowed(now)
            if batch.count <= lines and batch.size <= size:
                limit.take(batch.count, batch.size)
                return batch
            cut, kept = blob_cut(batch.blob, lines, size)
            if kept == 0 and lines >= 1 and limit.bytes_full():  # a line longer than the whole bucket
                cut, kept = batch.blob.find(b"\n") + 1, 1
            limit.take(kept, cut)
        blob = batch.blob
        over = batch.count - kept
        flags = None
        if self.keep_rank is not None:
            flags = self._kept_anyway(blob[cut:], None if batch.fields is None else batch.fields[kept:])
            over -= sum(flags)
        with self.lock:
            limit.note_dropped(over, now)
        self.context.dropped("throttled", over, batch.tag)
        if flags is None or not any(flags):
            return derived(batch, blob=blob[:cut], fields=None if batch.fields is None else batch.fields[:kept])
        return keep_records(batch, [True] * kept + flags)

    def _kept_anyway(self, rest: bytes, fields: list | None) -> list[bool]:
        """For each line of ``rest`` (over the limit): whether its level is at or above keep_level."""
        rank = self.keep_rank
        return [found is not None and level_rank(found) >= rank for found in line_levels(rest, fields)]

    def _drop_records(self, batch: Batch, key) -> Batch:
        """Record by record (a general batch, or a field key): each takes a line and its bytes."""
        messages = batch.message_list()
        fields = batch.fields or [None] * len(messages)
        keep: list[bool] = []
        dropped: dict = {}
        with self.lock:
            now = self.clock()
            for message, extra in zip(messages, fields):
                record_key = key if key is not None else self._field_key(message, extra, batch)
                limit = self._limit(record_key, now, batch.tag, batch.source)
                lines, size = limit.allowed(now)
                length = len(message) if message else 0
                if lines >= 1 and (size >= length or limit.bytes_full()):
                    limit.take(1, length)
                    keep.append(True)
                elif self.keep_rank is not None and self._at_keep_level(message, extra):
                    keep.append(True)
                else:
                    keep.append(False)
                    dropped[record_key] = dropped.get(record_key, 0) + 1
                    limit.note_dropped(1, now)
        count = sum(dropped.values())
        if not count:
            return batch
        self.context.dropped("throttled", count, batch.tag)
        return keep_records(batch, keep)

    def _at_keep_level(self, message, extra) -> bool:
        found = record_level_or_rule(message, extra)
        return found is not None and level_rank(found) >= self.keep_rank

    # ------------------------------------------------------------ summaries

    def flush(self, now: float, final: bool) -> list[Batch]:
        """The summary records due: keys that dropped for ``summary_interval`` (all of them at stop)."""
        due: list[tuple[object, Limit, int, float]] = []
        with self.lock:
            for key, limit in list(self.limits.items()) + self.evicted:
                if limit.dropped and (final or now - limit.since >= self.interval):
                    due.append((key, limit, limit.dropped, limit.since))
                    limit.dropped = 0
            self.evicted = []
        by_tag: dict[str, tuple[list, list]] = {}
        for key, limit, dropped, since in due:
            messages, fields = by_tag.setdefault(limit.tag, ([], []))
            if self.key == "source":
                name, shown = "source", limit.source if limit.source is not None else key
            elif self.key == "tag":
                name, shown = "tag", key
            else:
                name, shown = summary_key(self.key, key)
            summary = {name: shown, "dropped": dropped, "since": format_time(since), "filter": self.context.name}
            messages.append(f"{self.context.name}: dropped {dropped} records of {name} {shown} since "
                            f"{format_time(since)} (over the rate limit)")
            fields.append({THROTTLED: summary})
        batches = []
        for tag, (messages, fields) in by_tag.items():
            source = None
            if self.key == "source" and len(messages) == 1:
                source = fields[0][THROTTLED]["source"]
                source = source if isinstance(source, str) else None
            batches.append(Batch(tag, source, now, messages=messages, fields=fields))
        return batches


# Records without the key field are limited per file: their bucket key is (_NO_FIELD, source).
_NO_FIELD = "\x00no-field"
# A field value longer than this is kept (as a bucket key) and shown (in summaries) as a digest:
# keys cost bounded memory whatever the records hold.
MAX_KEY_CHARS = 64
# A key field so named may hold a secret (an API key, a session): summaries show its digest only.
_SECRET_NAME = re.compile(r"(?i)pass|secret|token|key|auth|cred|session|cookie|signature")


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _hashable(value):
    """A field's value as a bucket key (a list or dict from a parser is keyed by its text); a long one
    by its digest."""
    if isinstance(value, (int, float, bool)):
        return value
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_KEY_CHARS else _digest(text)


def summary_key(name: str, key) -> tuple[str, object]:
    """How a summary names a field-keyed bucket: (name, value). The records without the field by their
    file; a value by its digest when the field's name says it may be a secret (the summary must not
    carry what a redact filter after the throttle would have masked)."""
    if isinstance(key, tuple) and key[:1] == (_NO_FIELD,):
        return "source", key[1]
    if isinstance(key, str) and _SECRET_NAME.search(name) and not key.startswith("sha256:"):
        return name, _digest(key)
    return name, key


FILTER = ThrottleFilter
