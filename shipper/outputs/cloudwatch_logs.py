"""The CloudWatch Logs output: each record an event in a stream named from templates.

Every stream has its own queue of events and at most one PutLogEvents call in flight, so
its events arrive in order; a small pool of threads serves all streams, so a throttled or
slow stream (which waits with its own backoff) never holds back the others. Requests obey
the service limits by construction (see log_events). A batch of records is confirmed once
all its events were accepted, or refused for good (too old, too new, expired, invalid: each
counted as dropped with its reason).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import orjson

from shipper.config import Option
from shipper.errors import BufferFull, RetryableError
from shipper.outputs import aws
from shipper.outputs.base import Output
from shipper.outputs.keys import unknown_placeholder
from shipper.outputs.log_events import (
    EVENT_OVERHEAD, MAX_EVENTS, MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES, Event, Tally, rejected_ranges, take_request, timestamp_ms,
    utf8_parts,
)
from shipper.outputs.log_events import marked_records, unmarked
from shipper.outputs.metric_data import (
    DEFAULT_DIMENSIONS, base_dimensions, check_dimensions, check_namespace, emf_events,
)
from shipper.record import METRICS, TIME, Batch

log = logging.getLogger(__name__)

NAME_FIELDS = ("instance_id", "host", "tag", "source")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_GROUP_UNSAFE = re.compile(r"[^A-Za-z0-9._/#-]")
_STREAM_UNSAFE = re.compile(r"[:*]")
RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922,
                  3288, 3653)
# Refusals of a request's content: retrying the same events cannot help, so the request is
# halved until the one bad event is found and dropped.
CONTENT_ERRORS = frozenset({"InvalidParameterException", "SerializationException"})


def _template_check(unsafe: re.Pattern, rule: str):
    """A check for a log group or stream name template: known placeholders, valid literal text."""

    def check(template: str) -> str | None:
        unknown = unknown_placeholder(template, NAME_FIELDS)
        if unknown:
            return unknown
        literal = _PLACEHOLDER.sub("", template)
        if not template or len(literal) > 512 or unsafe.search(literal):
            return f"not a valid name: {rule}"
        return None

    return check


def check_retention(days: int) -> str | None:
    if days and days not in RETENTION_DAYS:
        return f"must be one of {', '.join(map(str, RETENTION_DAYS))} (or 0: never expire)"
    return None


OPTIONS = {
    "log_group": Option("str", check=_template_check(_GROUP_UNSAFE, "1-512 letters, digits and . _ - / #")),
    "log_stream": Option("str", "{instance_id}/{tag}/{source}",
                         check=_template_check(_STREAM_UNSAFE, "1-512 characters, without : or *")),
    **aws.AWS_OPTIONS,
    "format": Option("choice", "raw", choices=("raw", "json", "emf")),
    # format = "emf": metrics samples become Embedded Metric Format events (other records: json).
    "emf_namespace": Option("str", "Shipper", check=check_namespace),
    "emf_dimensions": Option("strlist", DEFAULT_DIMENSIONS, check=check_dimensions),
    "create_missing": Option("bool", True),
    "retention_days": Option("int", 0, check=check_retention),
    "log_group_class": Option("choice", "", choices=("", "STANDARD", "INFREQUENT_ACCESS")),
    "max_concurrency": Option("int", 4, minimum=1),
    # How long events may wait to go out together in one request (a full request goes at once).
    # 5 s, as the CloudWatch agent's force_flush_interval: a quiet server makes 12 calls a minute,
    # not 60 (each costs ~3 ms of CPU in botocore: bench/idle.py).
    "flush_interval": Option("duration", 5.0, minimum=0.01),
}


def probe(settings, identity: dict[str, str]) -> list[str]:
    """Try the credentials and the endpoint (DescribeLogGroups); each problem as a sentence."""
    client = aws.make_client("logs", settings, identity, attempts=1, connections=1)
    prefix = settings.log_group.split("{", 1)[0]
    try:
        found = client.describe_log_groups(**({"logGroupNamePrefix": prefix} if prefix else {}), limit=1)
    except Exception as exc:  # every failure is an answer here
        return [f"{settings.where}: cannot use CloudWatch Logs: {aws.describe(exc)}"]
    if not found.get("logGroups") and not settings.create_missing:
        return [f"{settings.where}: no log group starts with {prefix!r} and create_missing = false"]
    return []


@dataclass
class Stream:
    group: str
    name: str
    pending: collections.deque = field(default_factory=collections.deque)  # of Event
    sending: list | None = None       # the events of the request in flight
    attempts: int = 0
    next_try: float = 0.0
    limit: int = MAX_EVENTS            # lowered while a refused request is halved
    careful: int = 0                   # events still to send under that lower limit
    waiting_since: float = 0.0         # when the oldest pending event arrived (monotonic)
    pending_bytes: int = 0
    failing_since: float | None = None


class CloudWatchLogsOutput(Output):
    encoding = None  # events are made from the messages (format raw) or the NDJSON lines (json)

    def __init__(self, settings, context):
        super().__init__(settings, context)
        if settings.format in ("json", "emf"):
            self.encoding = "ndjson"
        self.emf_dimensions = base_dimensions(settings.emf_dimensions, context.envelope.identity,
                                              context.envelope.labels, True)
        self.client = aws.make_client("logs", settings, context.envelope.identity, attempts=1,
                                      connections=settings.max_concurrency + 1, validate=False)
        self.pool = ThreadPoolExecutor(max_workers=settings.max_concurrency, thread_name_prefix=f"{context.name}")
        self.streams: dict[tuple[str, str], Stream] = {}
        self.names: dict[tuple[str, str | None], tuple[str, str]] = {}
        self.in_flight: dict[Future, Stream] = {}
        self.open_batches = 0
        self.held_bytes = 0
        self.last_error = ""
        self.turn = 0

    # ------------------------------------------------------------ accepting

    def accept(self, batch: Batch) -> None:
        stream = self._stream_for(batch)
        tally = Tally(batch.ack, 0)
        events = self._events(batch, tally)
        tally.remaining = len(events)
        self.open_batches += 1
        if not stream.pending:
            stream.waiting_since = time.monotonic()
        stream.pending.extend(events)
        size = sum(e.size for e in events)
        stream.pending_bytes += size
        self.held_bytes += size
        if not events:
            self._settle(tally, 0)

    def _stream_for(self, batch: Batch) -> Stream:
        key = (batch.tag, batch.source)
        names = self.names.get(key)
        if names is None:
            envelope = self.context.envelope
            values = {
                "instance_id": envelope.identity.get("instance_id") or envelope.identity.get("host", "unknown"),
                "host": envelope.identity.get("host", "unknown"),
                "tag": batch.tag,
                "source": os.path.basename(batch.source) if batch.source else batch.tag,
            }
            group = _render(self.settings.log_group, values, envelope.labels, _GROUP_UNSAFE)
            name = _render(self.settings.log_stream, values, envelope.labels, _STREAM_UNSAFE)
            names = self.names[key] = (group, name)
        stream = self.streams.get(names)
        if stream is None:
            stream = self.streams[names] = Stream(*names)
        return stream

    def _events(self, batch: Batch, tally: Tally) -> list[Event]:
        """The events of a batch, in its order; long messages become several events."""
        read_ms = int(batch.read_time * 1000)
        if self.settings.format == "emf" and batch.fields and any(METRICS in (f or {}) for f in batch.fields):
            return self._emf_events(batch, tally, read_ms)
        if self.settings.format in ("json", "emf"):
            text = marked_records(batch.ndjson(self.context.envelope).decode())
            messages = text.split("\n")
            messages.pop()
        else:
            messages = unmarked(batch.message_list(), batch.blob)
        fields = batch.fields
        ascii_only = batch.blob.isascii() if batch.blob is not None else False
        events = []
        empty = 0
        for index, message in enumerate(messages):
            if not message:  # CloudWatch refuses an empty message: an empty line is no event
                empty += 1
                continue
            extra = fields[index] if fields else None
            ts = timestamp_ms(extra.get(TIME), read_ms) if extra else read_ms
            size = len(message) if ascii_only else len(message.encode())
            if size <= MAX_MESSAGE_BYTES:
                events.append(Event(ts, message, size + EVENT_OVERHEAD, tally))
                continue
            parts = utf8_parts(message)
            self.context.stats.add("events_split", len(parts), output=self.context.name)
            events.extend(Event(ts, part, len(part.encode()) + EVENT_OVERHEAD, tally) for part in parts)
        if empty:
            self.context.stats.add("records_dropped", empty, output=self.context.name, reason="empty")
        return events

    def _emf_events(self, batch: Batch, tally: Tally, read_ms: int) -> list[Event]:
        events = []
        for extra in batch.fields:
            sample = (extra or {}).get(METRICS)
            if sample is None:
                continue
            ts = timestamp_ms(extra.get(TIME), read_ms)
            made, dropped = emf_events(sample, ts, self.settings.emf_namespace, self.emf_dimensions, [], [], 60)
            if dropped:
                self.context.stats.add("values_dropped", dropped, output=self.context.name, reason="not_finite")
            for event in made:
                text = orjson.dumps(event).decode()
                events.append(Event(ts, text, len(text.encode()) + EVENT_OVERHEAD, tally))
        return events

    # ------------------------------------------------------------ sending

    def deliver(self, now: float, force: bool) -> None:
        self._reap(block=False)
        self._start_requests(force)
        if force:
            while self.in_flight:  # streams that failed now wait for their backoff: no busy loop
                self._reap(block=True)
                self._start_requests(force=False)
            if self.open_batches:
                raise RetryableError(f"{self.context.name}: events not delivered yet: {self.last_error}")
            return
        if self.held_bytes >= self.settings.buffer_max_bytes:
            if self.in_flight:  # healthy but behind: wait for a request, then let the reader go on
                self._reap(block=True)
                self._start_requests(force)
            if self.held_bytes >= self.settings.buffer_max_bytes:
                error = BufferFull if self.in_flight else RetryableError
                raise error(f"{self.context.name}: {self.held_bytes} bytes wait for CloudWatch Logs "
                            f"({self.last_error or 'sending'}); reading waits")

    def _start_requests(self, force: bool) -> None:
        monotonic = time.monotonic()
        streams = list(self.streams.values())
        self.turn = (self.turn + 1) % len(streams) if streams else 0
        for stream in streams[self.turn:] + streams[:self.turn]:  # each stream goes first in turn
            if len(self.in_flight) >= self.settings.max_concurrency:
                return
            if stream.sending is not None or not stream.pending:
                continue
            if not force and (stream.next_try > monotonic or not self._due(stream, monotonic)):
                continue
            stream.sending = take_request(stream.pending, stream.limit)
            stream.pending_bytes -= sum(e.size for e in stream.sending)
            stream.waiting_since = monotonic
            future = self.pool.submit(self._put, stream, stream.sending)
            future.add_done_callback(self._wake)
            self.in_flight[future] = stream

    def _due(self, stream: Stream, monotonic: float) -> bool:
        """Send a full request at once; a smaller one when its oldest event waited the output's flush_interval
        (a call per batch read would cost a request, and CPU, per poll of a quiet file)."""
        return (len(stream.pending) >= MAX_EVENTS or stream.pending_bytes >= MAX_REQUEST_BYTES
                or monotonic - stream.waiting_since >= self.settings.flush_interval
                or stream.attempts > 0 or stream.careful > 0)  # a retry waits for its backoff only

    def _put(self, stream: Stream, events: list[Event]) -> dict:
        """One PutLogEvents call (in a pool thread); a missing group or stream is created first."""
        request = {"logGroupName": stream.group, "logStreamName": stream.name,
                   "logEvents": [{"timestamp": e.timestamp, "message": e.message} for e in events]}
        try:
            return self.client.put_log_events(**request)
        except Exception as exc:
            if aws.error_code(exc) != "ResourceNotFoundException" or not self.settings.create_missing:
                raise
        self._create(stream)
        return self.client.put_log_events(**request)

    def _create(self, stream: Stream) -> None:
        if self._create_quietly(self.client.create_log_group, logGroupName=stream.group,
                                **({"logGroupClass": self.settings.log_group_class}
                                   if self.settings.log_group_class else {})):
            log.info("%s: created log group %s", self.context.name, stream.group)
            if self.settings.retention_days:
                self.client.put_retention_policy(logGroupName=stream.group,
                                                 retentionInDays=self.settings.retention_days)
        self._create_quietly(self.client.create_log_stream, logGroupName=stream.group, logStreamName=stream.name)

    @staticmethod
    def _create_quietly(call, **params) -> bool:
        """True when created; False when it already existed (another agent, or a race)."""
        try:
            call(**params)
        except Exception as exc:
            if aws.error_code(exc) == "ResourceAlreadyExistsException":
                return False
            raise
        return True

    # ------------------------------------------------------------ results

    def _reap(self, block: bool) -> None:
        if block and self.in_flight:
            wait(list(self.in_flight), timeout=5.0, return_when=FIRST_COMPLETED)
        for future in [f for f in self.in_flight if f.done()]:
            stream = self.in_flight.pop(future)
            events, stream.sending = stream.sending, None
            error = future.exception()
            if error is None:
                self._accepted(stream, events, future.result())
            elif aws.error_code(error) in CONTENT_ERRORS:
                self._refused(stream, events, error)
            else:
                self._retry(stream, events, error)

    def _accepted(self, stream: Stream, events: list[Event], response: dict) -> None:
        stats, name = self.context.stats, self.context.name
        rejected = rejected_ranges(response.get("rejectedLogEventsInfo"), len(events))
        dropped = 0
        for reason, span in rejected.items():
            stats.add("records_dropped", len(span), output=name, reason=reason)
            dropped += len(span)
            log.warning("%s: CloudWatch Logs refused %d events of %s/%s as %s", name, len(span),
                        stream.group, stream.name, reason.replace("_", " "))
        stats.add("requests", 1, output=name)
        stats.add("records_out", len(events) - dropped, output=name)
        self._settle_events(events)
        if stream.careful:
            stream.careful = max(0, stream.careful - len(events))
            if not stream.careful:
                stream.limit = MAX_EVENTS
        stream.attempts = 0
        if stream.failing_since is not None:
            log.warning("%s: %s/%s accepts events again after %.1fs", name, stream.group, stream.name,
                        time.monotonic() - stream.failing_since)
            stream.failing_since = None

    def _refused(self, stream: Stream, events: list[Event], error: BaseException) -> None:
        """The request's content was refused: halve it until the bad event is alone, then drop that one."""
        if len(events) > 1:
            stream.pending.extendleft(reversed(events))
            stream.pending_bytes += sum(e.size for e in events)
            stream.limit = max(1, len(events) // 2)
            stream.careful = len(events)
            return
        self.context.stats.add("records_dropped", 1, output=self.context.name, reason="invalid")
        log.error("%s: CloudWatch Logs refused an event of %s/%s; dropped: %s", self.context.name,
                  stream.group, stream.name, aws.describe(error))
        self._settle_events(events)
        stream.careful = max(0, stream.careful - 1)
        if not stream.careful:
            stream.limit = MAX_EVENTS

    def _retry(self, stream: Stream, events: list[Event], error: BaseException) -> None:
        stream.pending.extendleft(reversed(events))
        stream.pending_bytes += sum(e.size for e in events)
        stream.attempts += 1
        stream.next_try = time.monotonic() + self.context.backoff.delay(stream.attempts)
        self.last_error = aws.describe(error)
        self.context.stats.add("retries", 1, output=self.context.name)
        if stream.failing_since is None:
            stream.failing_since = time.monotonic()
            hint = "" if aws.is_transient(error) else " (check the permissions and that the group exists)"
            log.warning("%s: sending to %s/%s failed, retrying with backoff%s: %s", self.context.name,
                        stream.group, stream.name, hint, self.last_error)

    def _settle_events(self, events: list[Event]) -> None:
        counts = collections.Counter(e.tally for e in events)
        self.held_bytes -= sum(e.size for e in events)
        for tally, count in counts.items():
            self._settle(tally, count)

    def _settle(self, tally: Tally, count: int) -> None:
        tally.remaining -= count
        if tally.remaining <= 0:
            self.open_batches -= 1
            tally.ack.confirm()

    def _wake(self, future: Future) -> None:
        self.context.wake()

    def pending(self) -> int:
        return self.open_batches

    def hurry(self) -> None:
        for stream in list(self.streams.values()):
            stream.waiting_since = float("-inf")  # every partial request is due

    def buffered_bytes(self) -> int:
        return self.held_bytes

    def failing(self) -> tuple[float | None, str | None]:
        since = [s.failing_since for s in list(self.streams.values()) if s.failing_since is not None]
        return (min(since), self.last_error) if since else (None, None)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _render(template: str, values: dict[str, str], labels: dict[str, str], unsafe: re.Pattern) -> str:
    def fill(match: re.Match) -> str:
        name = match.group(1)
        value = labels.get(name[7:], "none") if name.startswith("labels.") else values[name]
        return unsafe.sub("_", value) or "none"

    return _PLACEHOLDER.sub(fill, template)[:512]


OUTPUT = CloudWatchLogsOutput
