"""`shipper fetch`: one instance's records for a time range, merged in time order, filtered, printed.

Objects are listed only under the partitions of the asked hours and read as streams, one after
the other in start order (S3 objects downloaded a few ahead). Their lines wait in a reorder buffer
until no later object can hold an earlier record; the buffer has a budget (REORDER_BYTES), so
memory does not depend on the size of an object or of the range. Past the budget the earliest
lines go out at once and any record that arrives earlier than one already printed is counted and
reported (out of time order, never lost).
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import heapq
import io
import itertools
import operator
import os
import re
import sys
import time
from array import array
from bisect import bisect_left, bisect_right
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import orjson

from shipper.outputs.keys import partition_of
from shipper.postmortem.selection import EVENT_TIME_SLACK, HOSTS_SHOWN, Filter, Funnel, ObjectRef, hour_prefixes
from shipper.postmortem.sources import (MAX_LINE_BYTES, CloudWatchLogsSource, CorruptObject, ObjectLines,
                                        SourceError)
from shipper.record import format_time

PREFETCH = 16   # objects downloaded ahead of the merge
PREFETCH_BYTES = 48 * 1024 * 1024  # and at most this many compressed bytes of them
WORKERS = 8     # downloads at once
REORDER_BYTES = 64 * 1024 * 1024   # lines held to put them in time order
LINE_COST = 160  # what Python adds to a held line's bytes (its objects, the list slot), roughly
CLOUDWATCH_EVENTS = 20_000  # events of all merged streams' pages at once (a page per stream)


@dataclass
class Progress:
    """A one-line progress report on a terminal (stderr); silent when stderr is not one."""

    total: int
    enabled: bool = field(default_factory=lambda: sys.stderr.isatty())
    done: int = 0
    bytes: int = 0
    _last: float = 0.0

    def advance(self, size: int) -> None:
        self.done += 1
        self.bytes += size
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done == self.total):
            self._last = now
            sys.stderr.write(f"\rfetching {self.done}/{self.total} objects, {self.bytes / 1e6:.1f} MB ")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def hour_end(start: float) -> float:
    """The end of the hour partition an object starts in: objects never straddle one."""
    return (partition_of(start) + 1) * 3600.0


def select_objects(archive, since: float, until: float, instance: str | None,
                   tags: list[str] | None, warn: Callable[[str], None] | None = None) -> list[ObjectRef]:
    """The objects that may hold records of the range, in start order (objects never straddle an hour)."""
    prefixes = hour_prefixes(since, until + EVENT_TIME_SLACK, instance=instance)
    refs = [ref for prefix in prefixes for ref in archive.list(prefix)]
    for problem in archive.problems:
        if warn is not None:
            warn(problem)
    archive.problems.clear()
    refs = [r for r in refs if (not tags or r.tag in tags) and r.start - EVENT_TIME_SLACK <= until
            and hour_end(r.start) >= since and (instance is None or r.instance == instance)]
    return sorted(set(refs), key=lambda r: (r.start, r.key))


_TIME = b'{"time":"'
_first = operator.itemgetter(0)


def time_key(line: bytes) -> bytes:
    """A line's record time, to order by: sliced from the line when it starts as the agent writes
    records (``{"time":"<27 characters>"``), else parsed (b"" when it is no JSON object)."""
    if line.startswith(_TIME) and line.find(b'"', 9, 37) == 36:
        return line[9:36]
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return b""
    return str(record.get("time", "")).encode(errors="replace") if isinstance(record, dict) else b""


def keyed(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """(time, line) pairs in time order (stable: lines of one time keep their order)."""
    pairs = [(line[9:36] if line.startswith(_TIME) and line.find(b'"', 9, 37) == 36 else time_key(line), line)
             for line in lines]
    pairs.sort(key=_first)
    return pairs


class Reorder:
    """Runs of time-ordered lines (one per chunk read), merged into one time order.

    ``emit(limit)`` hands out the records before ``limit``; ``relieve()`` the earliest ones while
    more than ``budget`` bytes are held. A run is handed out a stretch at a time (up to the next
    run's head), so the per-record cost is the JSON parse, not the merge.
    """

    def __init__(self, budget: int = REORDER_BYTES):
        self.budget = budget
        self.heap: list[tuple[bytes, int, list]] = []  # (head time, order, [pairs, position, key, cost a line])
        self.held = 0
        self.order = 0
        self.high = b""          # the latest time handed out
        self.late = 0            # records that arrived after a later one was handed out
        self.bad: collections.Counter[str] = collections.Counter()  # lines that are no JSON object, by object

    def add(self, lines: list[bytes], key: str) -> None:
        if not lines:
            return
        pairs = keyed(lines)
        cost = sum(map(len, lines)) + LINE_COST * len(lines)
        if pairs[0][0] < self.high:  # (lines with no time, b"", are no records: not late)
            self.late += bisect_left(pairs, self.high, key=_first) - bisect_right(pairs, b"", key=_first)
        self.held += cost
        self.order += 1
        heapq.heappush(self.heap, (pairs[0][0], self.order, [pairs, 0, key, cost / len(pairs)]))

    def _take(self, limit: bytes | None) -> tuple[list, str]:
        """The next stretch of the earliest run: up to the next run's head, and before ``limit``."""
        heap = self.heap
        _, order, run = heap[0]
        pairs, at = run[0], run[1]
        end = len(pairs) if limit is None else bisect_left(pairs, limit, at, key=_first)
        if len(heap) > 1:
            following = heap[1][0] if len(heap) == 2 else min(heap[1][0], heap[2][0])
            end = min(end, bisect_right(pairs, following, at, end, key=_first))
        stretch = pairs[at:end]
        self.held -= (end - at) * run[3]
        if pairs[end - 1][0] > self.high:
            self.high = pairs[end - 1][0]
        if end == len(pairs):
            heapq.heappop(heap)
        else:
            if end > len(pairs) // 2:  # let what went out be freed
                run[0], end = pairs[end:], 0
            run[1] = end
            heapq.heapreplace(heap, (run[0][end][0], order, run))
        return stretch, run[2]

    def _records(self, stretch: list, key: str) -> Iterator[dict[str, Any]]:
        loads = orjson.loads
        bad = 0
        for _, line in stretch:
            try:
                record = loads(line)
            except orjson.JSONDecodeError:
                bad += 1
                continue
            if type(record) is dict:
                yield record
            else:
                bad += 1
        if bad:
            self.bad[key] += bad

    def emit(self, limit: bytes | None) -> Iterator[dict[str, Any]]:
        """Every held record before ``limit`` (None: all), in time order."""
        while self.heap and (limit is None or self.heap[0][0] < limit):
            yield from self._records(*self._take(limit))

    def relieve(self) -> Iterator[dict[str, Any]]:
        while self.held > self.budget and self.heap:
            yield from self._records(*self._take(None))

    def report(self, warn: Callable[[str], None]) -> None:
        for key, count in sorted(self.bad.items()):
            warn(f"{key}: {count} lines that are not JSON records skipped")
        if self.late:
            warn(f"{self.late:,} records came out of time order: their time is more than {EVENT_TIME_SLACK:.0f} s "
                 f"before their object's start, or more than {self.budget // 2**20} MiB of records overlap in time")


def object_lines(archive, ref: ObjectRef, data: bytes | None, warn: Callable[[str], None]) -> ObjectLines | None:
    """An object opened as a stream of lines (from its downloaded bytes if any); None, said, if it cannot be."""
    try:
        raw = io.BytesIO(data) if data is not None else archive.open(ref)
    except CorruptObject as exc:
        warn(f"skipped {exc}")
        return None
    except Exception as exc:  # one unreadable object must not hide the others
        warn(f"skipped {ref.key}: cannot read it ({type(exc).__name__}: {exc})")
        return None
    return ObjectLines(ref.key, raw)


def tell_problems(lines: ObjectLines, warn: Callable[[str], None]) -> None:
    if lines.problem:
        warn(f"{lines.key}: {lines.problem}")
    if lines.long_lines:
        warn(f"{lines.key}: {lines.long_lines} lines over {MAX_LINE_BYTES // 2**20} MiB skipped")


def merged_records(archive, refs: list[ObjectRef], warn: Callable[[str], None],
                   progress: Progress | None = None, budget: int = REORDER_BYTES) -> Iterator[dict[str, Any]]:
    """Every record of ``refs`` (in start order) in time order; what cannot be read is said through ``warn``."""
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="fetch") if archive.prefetch else None
    todo = collections.deque(refs)
    waiting: collections.deque = collections.deque()  # (ref, its download or None: opened as a stream)
    prefetched = 0
    merge = Reorder(budget)

    def fill() -> None:
        nonlocal prefetched
        while todo and len(waiting) < PREFETCH:
            ref = todo[0]
            if pool is None or ref.size > archive.PREFETCH_OBJECT_BYTES:
                waiting.append((ref, None))
            elif waiting and prefetched + ref.size > PREFETCH_BYTES:
                return
            else:
                waiting.append((ref, pool.submit(archive.read, ref)))
                prefetched += ref.size
            todo.popleft()

    try:
        fill()
        while waiting:
            ref, download = waiting.popleft()
            if download is not None:
                prefetched -= ref.size
            fill()
            data = None
            if download is not None:
                try:
                    data = download.result()
                except Exception as exc:  # one unreadable object must not hide the others
                    warn(f"skipped {ref.key}: cannot read it ({type(exc).__name__}: {exc})")
                    continue
            if progress is not None:
                progress.advance(ref.size)
            # No record of this object or a later one is earlier than this: what is before goes out.
            opens = format_time(ref.start - EVENT_TIME_SLACK).encode()
            yield from merge.emit(opens)
            lines = object_lines(archive, ref, data, warn)
            if lines is None:
                continue
            del data
            for chunk in lines.chunks():
                merge.add(chunk, ref.key)
                yield from merge.emit(opens)  # records earlier than their object allows: late, not lost
                yield from merge.relieve()
            tell_problems(lines, warn)
        yield from merge.emit(None)
        merge.report(warn)
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def stream_tag(stream: str) -> str:
    """The tag in a stream's name, "{instance_id}/{tag}/{source}"."""
    return stream.partition("/")[2].split("/", 1)[0]


def cloudwatch_records(source: CloudWatchLogsSource, since: float, until: float, instance: str | None,
                       tags: list[str] | None, streams: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """The instance's streams (of ``tags``) merged in time order."""
    if streams is None:
        streams = source.streams(f"{instance}/" if instance else None)
    if tags:
        streams = [s for s in streams if stream_tag(s) in tags]
    page = max(50, min(10_000, CLOUDWATCH_EVENTS // max(1, len(streams))))
    iterators = [source.records(stream, since, until, page) for stream in streams]
    return heapq.merge(*iterators, key=lambda r: str(r.get("time", "")))


def instances_seen(archive, since: float, until: float,
                   warn: Callable[[str], None] | None = None) -> dict[str, list[ObjectRef]]:
    by_instance: dict[str, list[ObjectRef]] = collections.defaultdict(list)
    for ref in select_objects(archive, since, until, None, None, warn):
        by_instance[ref.instance].append(ref)
    return by_instance


def object_ends(archive, ref: ObjectRef, warn: Callable[[str], None]) -> tuple[str, str, dict] | None:
    """An object's earliest and latest record time and its last record, read as a stream."""
    lines = object_lines(archive, ref, None, warn)
    if lines is None:
        return None
    first = last = None
    final: dict[str, Any] = {}
    for chunk in lines.chunks():
        pairs = keyed(chunk)
        times = pairs[bisect_right(pairs, b"", key=_first):]  # lines with no time (no JSON) left out
        if times:
            first = times[0][0] if first is None else min(first, times[0][0])
            last = times[-1][0] if last is None else max(last, times[-1][0])
        for line in reversed(chunk):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict):
                final = record
                break
    tell_problems(lines, warn)
    if first is None or last is None:
        return None
    return first.decode(errors="replace"), last.decode(errors="replace"), final


def list_instances(archive, since: float, until: float, warn: Callable[[str], None]) -> list[dict[str, Any]]:
    """Per instance seen in the range: first and last record time, image id, host and labels."""
    rows = []
    for instance, refs in sorted(instances_seen(archive, since, until, warn).items()):
        ends = [e for e in (object_ends(archive, ref, warn) for ref in dict.fromkeys((refs[0], refs[-1]))) if e]
        if not ends:
            continue
        last = ends[-1][2]
        labels = last.get("labels")
        rows.append({"instance": instance, "first": ends[0][0], "last": ends[-1][1],
                     "image_id": str(last.get("image_id") or ""), "host": str(last.get("host") or ""),
                     "labels": {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
                     "objects": len(refs), "tags": sorted({r.tag for r in refs})})
    rows.sort(key=lambda row: row["last"])
    return rows


def suggest(instance: str, known: Iterable[str]) -> list[str]:
    known = list(known)
    close = difflib.get_close_matches(instance, known, n=3, cutoff=0.5)
    return close or [k for k in known if instance.lower() in k.lower()][:3]


def records_of(source, since: float, until: float, instance: str | None, tags: list[str] | None,
               warn: Callable[[str], None]) -> Iterator[dict[str, Any]] | None:
    """The records of the range from any source, in time order. When an archive holds no object of
    them, ``warn`` is told which filter matched nothing (:func:`nothing_listed`); then None when an
    instance was asked (it is not there), else no records."""
    if isinstance(source, CloudWatchLogsSource):
        streams = source.streams(f"{instance}/" if instance else None)
        tags_there = sorted({stream_tag(s) for s in streams})
        if streams and (not tags or set(tags) & set(tags_there)):
            return cloudwatch_records(source, since, until, instance, tags, streams)
        if streams:
            warn(tags_matched_nothing(tags or [], source.name, instance, tags_there, "streams"))
        elif instance:
            warn(f"no log streams of instance {instance} in {source.name} (streams are named INSTANCE/TAG/...; "
                 f"--list-instances lists the instances of an archive)")
        else:
            warn(f"no log streams in {source.name}")
        return None if instance else iter(())
    refs = archive_refs(source, since, until, instance, tags, warn)
    if refs is None:
        return None
    return merged_records(source, refs, warn, Progress(len(refs))) if refs else iter(())


def archive_refs(source, since: float, until: float, instance: str | None, tags: list[str] | None,
                 warn: Callable[[str], None]) -> list[ObjectRef] | None:
    """The archive's objects to read; when there are none, ``warn`` is told which filter matched
    nothing, and None when an instance was asked (it is not there), else []."""
    listed = select_objects(source, since, until, instance, None, warn)
    refs = [r for r in listed if not tags or r.tag in tags]
    if refs:
        return refs
    seen = None
    if instance and not listed:  # the instance is not there: which ones are, to suggest the nearest
        seen = sorted(instances_seen(source, since, until, warn))
    warn(nothing_listed(source.name, since, until, instance, tags, sorted({r.tag for r in listed}), seen))
    return None if instance else []


def nothing_listed(name: str, since: float, until: float, instance: str | None, tags: list[str] | None,
                   tags_there: list[str], instances_there: list[str] | None) -> str:
    """Which filter left no object to read: the instance (with the nearest names there), the tags
    (with the instance's tags there), or the time range itself."""
    between = f"between {format_time(since)} and {format_time(until)}"
    if instance and not tags_there:
        seen = instances_there or []
        hint = suggest(instance, seen)
        if hint:
            return f"no records of instance {instance} in {name} {between}; did you mean {', '.join(hint)}?"
        if seen:
            return (f"no records of instance {instance} in {name} {between} ({len(seen)} other "
                    f"instance{'s' if len(seen) != 1 else ''} there: --list-instances)")
        return f"no records of instance {instance} in {name} {between}: it holds no records of that range at all"
    if tags and tags_there:
        return f"{tags_matched_nothing(tags, name, instance, tags_there, 'records')} {between}"
    return f"no records in {name} {between}"


def tags_matched_nothing(tags: list[str], name: str, instance: str | None, tags_there: list[str], what: str) -> str:
    whose = f"instance {instance} has {what}" if instance else f"{name} has {what}"
    return (f"--tag {', '.join(tags)} matched nothing: {whose} of tag{'s' if len(tags_there) != 1 else ''} "
            f"{', '.join(tags_there)}" + (f" in {name}" if instance else ""))


def filtered(records: Iterable[dict[str, Any]], wanted: Filter, host: str | None,
             warn: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """The records that match ``wanted`` and are of ``host``. When none does, ``warn`` is told which
    filter matched nothing (:class:`Funnel`: it counts only until the first match)."""
    records = iter(records)
    if warn is not None:
        funnel = Funnel(wanted, host)
        for record in records:
            if funnel.count(record):
                yield record
                break
        else:
            if funnel.read:  # nothing read: the source said why (no object, unreadable ones)
                warn(funnel.explain())
            return
    for record in records:
        if host is not None and record.get("host") != host:
            continue
        if wanted.matches(record):
            yield record


# ---------------------------------------------------------------- `shipper fetch`'s output, decoded in parallel
#
# Per line, the work is the JSON decode, the filter and the rendering (~2 µs); the merge itself costs
# next to nothing (a stretch at a time). So worker processes (forked, one per core) decompress,
# decode, filter and render whole objects, and hand back runs of rendered lines with their times;
# the main process downloads, merges the runs in time order (the same reorder rule as for records)
# and writes. Everything in flight is bounded: compressed chunks per worker (TASK_CHUNKS), rendered
# parts per worker (RESULT_PARTS, one a decompressed MiB at most), the reorder budget.

TASK_CHUNKS = 8           # compressed chunks (of at most CHUNK_BYTES) queued for a worker
CHUNK_BYTES = 1024 * 1024
RESULT_PARTS = 4          # rendered parts (one per decompressed MiB at most) a worker may have ready
OUTPUT_REORDER_BYTES = 48 * 1024 * 1024
KEY_COST = 64             # what a held line's time adds (a bytes object, its list slot)
MAX_WORKERS = 4


@dataclass
class Wanted:
    """What a worker needs to turn an object into output (inherited through fork: never pickled)."""

    filter: Filter
    host: str | None
    line_of: Callable[[dict[str, Any]], str | None]   # the rendered line, None to leave the record out

    def __post_init__(self) -> None:
        self.needle = grep_needle(self.filter.grep)
        self.since_key = self.filter._since.encode()
        self.until_key = self.filter._until.encode()
        wanted = self.filter
        self.grep_only = not wanted.tags and wanted.level is None and self.host is None
        # Only the time range asked (and a Filter that tests nothing else): plain lines cut on their times.
        self.time_only = (self.grep_only and wanted.grep is None
                          and {f.name for f in dataclasses.fields(wanted)} == _TIME_FIELDS)
        self.message_text = message_text_of(self.line_of)
        self.heads: dict[bytes, bool] = {}  # what lies between a plain line's time and its message: fine or not


def message_text_of(line_of) -> Callable[[str], str] | None:
    """When ``line_of`` renders a record whose "message" is a string from that string alone (the plain
    output, the raw line), the function of it; else None. A renderer says so with a ``message_text``
    attribute (shipper.cli._LineOf does without --json or --format)."""
    given = getattr(line_of, "message_text", None)
    return given if callable(given) else None


def grep_needle(grep) -> bytes | None:
    """A literal that every match of ``grep`` contains and that a record's raw line shows as it is
    (UTF-8 text without a character JSON escapes); None when there is none to rely on."""
    if grep is None or grep.flags & re.IGNORECASE:
        return None
    try:
        from re import _parser as parser  # the stdlib's own parse of the pattern
        items = list(parser.parse(grep.pattern, grep.flags))
        literal = parser.LITERAL
    except Exception:  # a private module that may change: then lines are only filtered decoded
        return None
    runs, run = [], []
    for op, value in items:  # literals one after the other at the top level: each is in every match
        if op is literal:
            run.append(value)
        else:
            runs.append(run)
            run = []
    runs.append(run)
    best = max(("".join(map(chr, r)) for r in runs), key=len)
    # The characters JSON escapes (quote, backslash, controls) would not be found as they are, nor
    # the quote and ", " of a non-string message printed by Python (str of a list).
    best = max((part for part in re.split(r"""["\\'\x00-\x1f,:]""", best)), key=len)
    return best.encode() if best else None


_ESCAPED_TEXT = (b"\\u", b"\\/")   # escapes that can stand for characters of a needle


def may_match(line: bytes, needle: bytes) -> bool:
    """False only when the decoded record's message cannot contain ``needle``: the line shows no
    needle, the needle's characters cannot be hidden behind an escape there, and its only
    "message" key has a string value (a number or a list is printed differently than written)."""
    if needle in line:
        return True
    return (b"\\u" in line or b"\\/" in line or line.count(b'"message":') != 1
            or b'"message":"' not in line)


def sure_time(line: bytes, key: bytes) -> bool:
    """Is ``key`` the decoded record's time? It was sliced from the line, the line's one "time"
    key (a later one would win), with no escape in it."""
    return (line.startswith(_TIME) and line.find(b'"', 9, 37) == 36 and b"\\" not in key
            and line.count(b'"time":') == 1)


def outside(line: bytes, key: bytes, wanted: Wanted) -> bool:
    """True only when the record is surely outside the time range."""
    return (key < wanted.since_key or key > wanted.until_key) and sure_time(line, key)


class ObjectState:
    """Per object in a worker: the funnel until a record matches (to say which filter matched
    nothing), the lines that are no JSON records."""

    def __init__(self, wanted: Wanted):
        self.funnel: Funnel | None = Funnel(wanted.filter, wanted.host)
        self.bad = 0


_QUOTE = b'"'
KEY_WIDTH = 27  # a time as the agent writes it: 2026-11-29T13:17:18.123456Z


class FixedKeys:
    """A part's times when all are KEY_WIDTH bytes: one bytes object, not a list of them (a part
    crosses a process boundary: one object to pickle instead of thousands)."""

    __slots__ = ("blob",)

    def __init__(self, blob: bytes):
        self.blob = blob

    def __len__(self) -> int:
        return len(self.blob) // KEY_WIDTH

    def __getitem__(self, index: int) -> bytes:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.blob[index * KEY_WIDTH:(index + 1) * KEY_WIDTH]

    def __iter__(self) -> Iterator[bytes]:
        blob = self.blob
        return (blob[at:at + KEY_WIDTH] for at in range(0, len(blob), KEY_WIDTH))

    def __reduce__(self):
        return FixedKeys, (self.blob,)


# The bytes of a time that JSON shows as they are (no quote, backslash, control or non-ASCII
# byte): a sliced time made of them only is the decoded one.
_PLAIN_TIME_BYTES = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')
_STARTS = slice(0, len(_TIME))
_MESSAGE = b',"message":"'
_TIME_FIELDS = {"since", "until", "tags", "grep", "level"}


def plain_times(lines: list[bytes]) -> list[bytes] | None:
    """The lines' times when every line is as the agent writes records, in time order (as a
    minute's object is): each starts with ``{"time":"<27 characters>"`` and holds no other "time"
    key, so the sliced time is the decoded one. None otherwise (then each line is looked at)."""
    count = len(lines)
    if not count or not lines[0].startswith(_TIME):
        return None
    blob = b"\n".join(lines)
    if blob.count(b'\n{"time":"') != count - 1 or blob.count(b'"time":') != count:
        return None
    ends = b"".join([line[9:37] for line in lines])
    if len(ends) != 28 * count or ends[27::28] != _QUOTE * count or b"\\" in ends:
        return None
    keys = [line[9:36] for line in lines]
    if not all(map(operator.le, keys, itertools.islice(keys, 1, None))):
        return None
    return keys


def not_in_piece(lines: list[bytes], wanted: Wanted, state: ObjectState | None = None) -> bool:
    """True when no record of the piece can match the grep, judged on the bytes of the whole piece
    (no line shows the needle, none has an escape that could hide it, every "message" key has a
    string value); then, until a record matches, its records are counted as the funnel would:
    by their time when outside the range, else as stopped by the grep."""
    blob = b"\n".join(lines)
    if (wanted.needle in blob or b"\\u" in blob or b"\\/" in blob
            or blob.count(b'"message":') != blob.count(b'"message":"')):
        return False
    if state is None or state.funnel is None:
        return True
    keys = plain_times(lines)
    if keys is None:  # times not sure: decoded, to count each record by the filter it fails
        return False
    funnel = state.funnel
    low, high = bisect_left(keys, wanted.since_key), bisect_right(keys, wanted.until_key)
    funnel.read += len(keys)
    funnel.missed["time"] += low + len(keys) - high
    funnel.missed["grep"] += high - low
    for outside_ in (keys[:low], keys[high:]):
        if outside_:
            first, last = outside_[0].decode(), outside_[-1].decode()
            funnel.first = first if funnel.first is None else min(funnel.first, first)
            funnel.last = last if funnel.last is None else max(funnel.last, last)
    return True


def head_fine(head: bytes, heads: dict[bytes, bool]) -> bool:
    """Is ``{"time":"T"`` + ``head`` + ``,"message":"M"}`` a JSON object whose time is T and whose
    message is M, for every plain T and string M? Checked once per distinct head (an object's lines
    share theirs), with two times: a "time" key inside the head would win over the first one."""
    fine = heads.get(head)
    if fine is None:
        fine = True
        for stamp in ("0" * KEY_WIDTH, "1" * KEY_WIDTH):
            try:
                record = orjson.loads(b'{"time":"' + stamp.encode() + b'"' + head + b',"message":""}')
            except orjson.JSONDecodeError:
                fine = False
                break
            if type(record) is not dict or record.get("time") != stamp or record.get("message") != "":
                fine = False
                break
        if len(heads) > 1000:  # bounded: heads are few, but nothing read from outside may grow memory
            heads.clear()
        heads[head] = fine
    return fine


def message_piece(lines: list[bytes], heads: dict[bytes, bool]) -> tuple[list[bytes], list[str]] | None:
    """Each line's time and "message", sliced out of its bytes (the message unescaped alone), when
    that is surely what decoding the whole line gives: every line is ``{"time":"T"`` + one head
    (:func:`head_fine`) + ``,"message":"..."}``, T plain text, in time order. None otherwise (then
    the lines are decoded whole). Decoding the whole record is most of the cost of a line; its
    message alone is a fraction of it."""
    count = len(lines)
    if not count:
        return None
    repeat = itertools.repeat
    ats = list(map(bytes.find, lines, repeat(_MESSAGE), repeat(37)))
    if -1 in ats or not head_fine(lines[0][37:ats[0]], heads):
        return None
    # The same head in every line: each slice ends at the first ',"message":"' after the time, so
    # the slices joined equal the first one repeated only when each is that one.
    head = lines[0][36:ats[0] + 12]
    if (head[:1] != _QUOTE or b"".join(map(operator.getitem, lines, repeat(_STARTS))) != _TIME * count
            or b"".join(map(operator.getitem, lines, map(slice, repeat(36), map((12).__add__, ats)))) != head * count
            or not all(map(bytes.endswith, lines, repeat(b"}")))):
        return None
    keys = [line[9:36] for line in lines]
    if (b"".join(keys).translate(None, _PLAIN_TIME_BYTES)
            or not all(map(operator.le, keys, itertools.islice(keys, 1, None)))):
        return None
    values = list(map(operator.getitem, lines, map(slice, map((11).__add__, ats), repeat(-1))))
    # One decode of all the values as a JSON array, one per line: a raw newline is refused inside a
    # string, so each value is lexed from its start on its own; each starts with a string, so
    # ``count`` items that are all strings means each value is exactly one JSON string.
    try:
        messages = orjson.loads(b"[" + b",\n".join(values) + b"]")
    except orjson.JSONDecodeError:
        return None
    if len(messages) != count or set(map(type, messages)) != {str}:
        return None
    return keys, messages


def message_part(lines: list[bytes], wanted: Wanted, state: ObjectState) -> tuple[FixedKeys, bytes, array] | None | bool:
    """A piece of the plain output (only the time range asked) from the messages alone
    (:func:`message_piece`), cut on the times. False when it cannot be (then the other ways)."""
    got = message_piece(lines, wanted.heads)
    if got is None:
        return False
    keys, messages = got
    low, high = bisect_left(keys, wanted.since_key), bisect_right(keys, wanted.until_key)
    if state.funnel is not None:
        if low >= high:  # no record matches yet: each is counted by the filter it fails, decoded
            return False
        state.funnel = None  # one matches (nothing but the time is asked): nothing left to explain
    if low >= high:
        return None
    if low or high < len(keys):
        keys, messages = keys[low:high], messages[low:high]
    texts = messages if wanted.message_text is str else list(map(wanted.message_text, messages))
    text, ends = encoded_lines(texts)
    return FixedKeys(b"".join(keys)), text, ends


def encoded_lines(texts: list[str]) -> tuple[bytes, array]:
    """The rendered lines as UTF-8, each with its newline, and where each ends."""
    text = "\n".join(texts) + "\n"
    if text.isascii():  # characters are bytes: the ends follow from the lengths
        return text.encode(), array("Q", itertools.accumulate(map((1).__add__, map(len, texts))))
    try:
        encoded = list(map(str.encode, map(operator.add, texts, itertools.repeat("\n"))))
    except UnicodeEncodeError:
        encoded = [(text + "\n").encode("utf-8", "replace") for text in texts]
    return b"".join(encoded), array("Q", itertools.accumulate(map(len, encoded)))


def fast_part(lines: list[bytes], keys: list[bytes], wanted: Wanted) -> tuple[FixedKeys, bytes, array] | None | bool:
    """A piece of plain lines (:func:`plain_times`) when only the time range is asked: cut on the
    times, decoded and rendered in bulk. False when some line is no JSON object (then line by line)."""
    low = bisect_left(keys, wanted.since_key)
    high = bisect_right(keys, wanted.until_key)
    if low or high < len(keys):
        lines, keys = lines[low:high], keys[low:high]
    if not lines:
        return None
    try:
        records = list(map(orjson.loads, lines))
    except orjson.JSONDecodeError:
        return False
    if set(map(type, records)) != {dict}:
        return False
    texts = list(map(wanted.line_of, records))
    if None in texts:
        keys = list(itertools.compress(keys, [text is not None for text in texts]))
        texts = [text for text in texts if text is not None]
        if not texts:
            return None
    text, ends = encoded_lines(texts)
    return FixedKeys(b"".join(keys)), text, ends


def render_part(lines: list[bytes], wanted: Wanted, state: ObjectState) -> tuple[list[bytes], bytes, array] | None:
    """One decompressed piece's lines -> (their times, the rendered lines, where each ends), in time
    order; lines that cannot match are left out on their raw bytes first (no decode)."""
    if wanted.time_only:
        if wanted.message_text is not None:
            part = message_part(lines, wanted, state)
            if part is not False:
                return part
        keys = plain_times(lines)
        # Before a record matched, only a piece with a record in the range (which matches: nothing
        # else is asked) takes the bulk path; the funnel has nothing left to explain after it.
        if keys is not None and (state.funnel is None or bisect_left(keys, wanted.since_key)
                                 < bisect_right(keys, wanted.until_key)):
            part = fast_part(lines, keys, wanted)
            if part is not False:
                state.funnel = None
                return part
    elif wanted.needle is not None and (state.funnel is None or wanted.grep_only) and not_in_piece(lines, wanted, state):
        return None
    pairs = keyed(lines)
    needle = wanted.needle
    if state.funnel is None:  # a record matched already: nothing is left to explain, skip on raw bytes
        if needle is not None:
            pairs = [pair for pair in pairs if may_match(pair[1], needle)]
        if pairs and (pairs[0][0] < wanted.since_key or pairs[-1][0] > wanted.until_key):
            pairs = [pair for pair in pairs if not outside(pair[1], pair[0], wanted)]
    elif needle is not None and wanted.grep_only:
        # Until a record matches, every record is counted by the filter it fails (to say which one
        # matched nothing); with --grep the only filter, a line its raw bytes rule out surely fails
        # the grep, or the time when its time is surely outside.
        kept = []
        missed = state.funnel.missed
        for pair in pairs:
            key, line = pair
            if may_match(line, needle) or not sure_time(line, key):
                kept.append(pair)
            elif wanted.since_key <= key <= wanted.until_key:
                state.funnel.read += 1
                missed["grep"] += 1
            else:
                kept.append(pair)  # counted with its time, decoded
        pairs = kept
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    host, matches, line_of = wanted.host, wanted.filter.matches, wanted.line_of
    keys: list[bytes] = []
    texts: list[bytes] = []
    bad = 0
    funnel = state.funnel
    for key, line in pairs:
        try:
            record = loads(line)
        except decode_error:
            bad += 1
            continue
        if type(record) is not dict:
            bad += 1
            continue
        if funnel is not None:
            if not funnel.count(record):
                continue
            funnel = state.funnel = None  # a match: no need to say why nothing matched
        elif (host is not None and record.get("host") != host) or not matches(record):
            continue
        text = line_of(record)
        if text is None:
            continue
        keys.append(key)
        texts.append(text.encode("utf-8", "replace") + b"\n")
    state.bad += bad
    if not keys:
        return None
    return keys, b"".join(texts), array("Q", itertools.accumulate(map(len, texts)))


def object_parts(key: str, raw, wanted: Wanted) -> Iterator[tuple]:
    """An object as ("part", times, text, ends) messages, then ("end", facts): what a worker sends."""
    lines = ObjectLines(key, raw)
    state = ObjectState(wanted)
    for chunk in lines.chunks():
        part = render_part(chunk, wanted, state)
        if part is not None:
            yield ("part", *part)
    said = []
    tell_problems(lines, said.append)
    funnel = state.funnel
    yield ("end", {"bad": state.bad, "said": said, "matched": funnel is None,
                   "funnel": None if funnel is None else funnel_state(funnel)})


def funnel_state(funnel: Funnel) -> dict[str, Any]:
    return {"read": funnel.read, "missed": funnel.missed, "first": funnel.first, "last": funnel.last,
            "hosts": list(funnel.hosts)}


def merge_funnel(into: Funnel, state: dict[str, Any]) -> None:
    into.read += state["read"]
    for stage, count in state["missed"].items():
        into.missed[stage] += count
    for name, pick in (("first", min), ("last", max)):
        if state[name] is not None:
            mine = getattr(into, name)
            setattr(into, name, state[name] if mine is None else pick(mine, state[name]))
    for host in state["hosts"]:
        if len(into.hosts) < HOSTS_SHOWN:
            into.hosts.setdefault(host, None)


class QueueReader:
    """An object's compressed bytes as they arrive in a worker's task queue (read() gives a chunk)."""

    def __init__(self, tasks):
        self.tasks = tasks
        self.done = False

    def read(self, size: int = -1) -> bytes:
        if self.done:
            return b""
        kind, value = self.tasks.get()
        if kind == "data":
            return value
        self.done = True
        if kind == "fail":  # the download broke off: (exception name, text), said as ObjectLines says it
            raise type(value[0], (Exception,), {})(value[1])
        return b""

    def close(self) -> None:
        while not self.done:  # the rest of a corrupt object: up to its end
            try:
                self.read()
            except Exception:
                pass


_WORKER_WANTED: Wanted | None = None


def worker_main(tasks, results) -> None:
    """A worker process: objects in, their parts out, until None."""
    wanted = _WORKER_WANTED
    while True:
        task = tasks.get()
        if task is None:
            return
        kind, value = task
        if kind == "skip":
            results.put(("end", {"bad": 0, "said": [value], "matched": False, "funnel": None}))
            continue
        try:
            for message in object_parts(value, QueueReader(tasks), wanted):
                if message[0] == "end" and hasattr(wanted.line_of, "worker_state"):
                    message[1]["line_state"] = wanted.line_of.worker_state()
                results.put(message)
        except Exception as exc:  # a failure in one object must not stop the fetch: said, the rest read
            results.put(("end", {"bad": 0, "said": [f"{value}: not read to its end ({type(exc).__name__}: {exc})"],
                                 "matched": False, "funnel": None}))


class Runs:
    """Runs of rendered lines (one per part), each in time order, merged into one time order;
    the same rule as :class:`Reorder`, with the text ready to write."""

    def __init__(self, budget: int = OUTPUT_REORDER_BYTES):
        self.budget = budget
        self.heap: list[tuple[bytes, int, list]] = []  # (head time, order, [times, text, ends, position, cost])
        self.held = 0
        self.order = 0
        self.high = b""
        self.late = 0

    def add(self, keys: list[bytes], text: bytes, ends: array) -> None:
        cost = len(text) + KEY_COST * len(keys)
        if keys[0] < self.high:
            self.late += bisect_left(keys, self.high) - bisect_right(keys, b"")
        self.held += cost
        self.order += 1
        heapq.heappush(self.heap, (keys[0], self.order, [keys, text, ends, 0, cost / len(keys)]))

    def _take(self, limit: bytes | None) -> bytes:
        heap = self.heap
        _, order, run = heap[0]
        keys, text, ends, at = run[0], run[1], run[2], run[3]
        end = len(keys) if limit is None else bisect_left(keys, limit, at)
        if len(heap) > 1:
            following = heap[1][0] if len(heap) == 2 else min(heap[1][0], heap[2][0])
            end = min(end, bisect_right(keys, following, at, end))
        end = max(end, at + 1)  # the head is the earliest of all: it goes out
        self.held -= (end - at) * run[4]
        if keys[end - 1] > self.high:
            self.high = keys[end - 1]
        start = ends[at - 1] if at else 0
        stretch = text[start:ends[end - 1]]
        if end == len(keys):
            heapq.heappop(heap)
        else:
            run[3] = end
            heapq.heapreplace(heap, (keys[end], order, run))
        return stretch

    def emit(self, limit: bytes | None) -> Iterator[bytes]:
        while self.heap and (limit is None or self.heap[0][0] < limit):
            yield self._take(limit)

    def relieve(self) -> Iterator[bytes]:
        while self.held > self.budget and self.heap:
            yield self._take(None)


def worker_count(objects: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return min(MAX_WORKERS, cores, objects) if cores > 1 and objects > 1 else 0


def output_of(source, since: float, until: float, instance: str | None, tags: list[str] | None,
              wanted: Filter, host: str | None, line_of: Callable[[dict[str, Any]], str | None],
              warn: Callable[[str], None]) -> Iterator[bytes] | None:
    """`shipper fetch`'s output: the records of the range that match ``wanted`` (and ``host``),
    rendered by ``line_of`` (None: left out), in time order, as UTF-8 text in chunks. None when the
    instance asked for is not there (said through ``warn``, as :func:`records_of`)."""
    if isinstance(source, CloudWatchLogsSource):
        records = records_of(source, since, until, instance, tags, warn)
        if records is None:
            return None
        return rendered(filtered(records, wanted, host, warn), line_of)
    refs = archive_refs(source, since, until, instance, tags, warn)
    if refs is None:
        return None
    return parallel_output(source, refs, Wanted(wanted, host, line_of), warn, Progress(len(refs)))


def rendered(records: Iterable[dict[str, Any]], line_of) -> Iterator[bytes]:
    texts = []
    for record in records:
        text = line_of(record)
        if text is not None:
            texts.append(text)
            if len(texts) >= 1000:
                yield ("\n".join(texts) + "\n").encode("utf-8", "replace")
                texts = []
    if texts:
        yield ("\n".join(texts) + "\n").encode("utf-8", "replace")


def parallel_output(archive, refs: list[ObjectRef], wanted: Wanted, warn: Callable[[str], None],
                    progress: Progress | None = None, workers: int | None = None,
                    budget: int = OUTPUT_REORDER_BYTES) -> Iterator[bytes]:
    """The rendered lines of ``refs`` (in start order) in time order: objects decoded in worker
    processes (none with one core or one object: then here), merged here."""
    count = worker_count(len(refs)) if workers is None else workers
    merge = Runs(budget)
    funnel = Funnel(wanted.filter, wanted.host)
    matched = False
    bad: collections.Counter[str] = collections.Counter()
    if count:
        pipeline = Workers(archive, refs, wanted, count)
        messages = pipeline.messages
    else:
        pipeline = None
        messages = inline_messages(archive, refs, wanted, warn)
    try:
        for ref, parts in messages():
            if progress is not None:
                progress.advance(ref.size)
            opens = format_time(ref.start - EVENT_TIME_SLACK).encode()
            yield from merge.emit(opens)
            for message in parts:
                if message[0] == "part":
                    merge.add(message[1], message[2], message[3])
                    yield from merge.emit(opens)  # records earlier than their object allows: late, not lost
                    yield from merge.relieve()
                    continue
                facts = message[1]
                if "line_state" in facts:  # what line_of learnt in a worker (the fields it found)
                    wanted.line_of.absorb(facts["line_state"])
                for text in facts["said"]:
                    warn(text)
                if facts["bad"]:
                    bad[ref.key] += facts["bad"]
                if facts["matched"]:
                    matched = True
                elif facts["funnel"] is not None and not matched:
                    merge_funnel(funnel, facts["funnel"])
        yield from merge.emit(None)
    finally:
        if pipeline is not None:
            pipeline.close()
    for key, n in sorted(bad.items()):
        warn(f"{key}: {n} lines that are not JSON records skipped")
    if merge.late:
        warn(f"{merge.late:,} records came out of time order: their time is more than {EVENT_TIME_SLACK:.0f} s "
             f"before their object's start, or more than {merge.budget // 2**20} MiB of records overlap in time")
    if not matched and funnel.read:
        warn(funnel.explain())


def inline_messages(archive, refs: list[ObjectRef], wanted: Wanted, warn: Callable[[str], None]):
    """Objects decoded here, one after the other (one core, or one object)."""
    def messages():
        for ref in refs:
            lines = object_lines(archive, ref, None, warn)
            if lines is None:
                yield ref, ()
                continue
            yield ref, object_parts(ref.key, lines.raw, wanted)
    return messages


class Workers:
    """Worker processes fed, in the archive's start order, by a thread here: object i goes to worker
    i % count, whose parts are read back in the same order (queues bounded both ways)."""

    def __init__(self, archive, refs: list[ObjectRef], wanted: Wanted, count: int):
        import multiprocessing
        import threading

        global _WORKER_WANTED
        context = multiprocessing.get_context("fork")  # the filter and line_of are inherited, not pickled
        self.archive, self.refs = archive, refs
        self.tasks = [context.Queue(TASK_CHUNKS) for _ in range(count)]
        self.results = [context.Queue(RESULT_PARTS) for _ in range(count)]
        self.stop = threading.Event()
        sys.stdout.flush()
        sys.stderr.flush()
        _WORKER_WANTED = wanted
        try:
            self.processes = [context.Process(target=worker_main, args=(self.tasks[n], self.results[n]), daemon=True,
                                              name=f"shipper-fetch-{n}") for n in range(count)]
            for process in self.processes:
                process.start()
        finally:
            _WORKER_WANTED = None
        # Downloads start only now: a fork never copies a thread in the middle of a request.
        self.feeder = threading.Thread(target=self._feed, name="fetch-feed", daemon=True)
        self.feeder.start()

    def _put(self, queue, item) -> bool:
        import queue as queues

        while not self.stop.is_set():
            try:
                queue.put(item, timeout=0.2)
                return True
            except queues.Full:
                continue
        return False

    def _feed(self) -> None:
        archive, count = self.archive, len(self.tasks)
        pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="fetch") if archive.prefetch else None
        todo = collections.deque(enumerate(self.refs))
        waiting: collections.deque = collections.deque()
        prefetched = 0

        def fill() -> None:
            nonlocal prefetched
            while todo and len(waiting) < PREFETCH:
                index, ref = todo[0]
                if pool is None or ref.size > archive.PREFETCH_OBJECT_BYTES:
                    waiting.append((index, ref, None))
                elif waiting and prefetched + ref.size > PREFETCH_BYTES:
                    return
                else:
                    waiting.append((index, ref, pool.submit(archive.read, ref)))
                    prefetched += ref.size
                todo.popleft()

        try:
            fill()
            while waiting and not self.stop.is_set():
                index, ref, download = waiting.popleft()
                tasks = self.tasks[index % count]
                if download is not None:
                    prefetched -= ref.size
                fill()
                if download is not None:
                    try:
                        data = download.result()
                    except Exception as exc:
                        self._put(tasks, ("skip", f"skipped {ref.key}: cannot read it ({type(exc).__name__}: {exc})"))
                        continue
                    if not self._put(tasks, ("open", ref.key)):
                        return
                    for at in range(0, len(data), CHUNK_BYTES):
                        if not self._put(tasks, ("data", data[at:at + CHUNK_BYTES])):
                            return
                    del data
                    self._put(tasks, ("end", None))
                    continue
                try:
                    raw = archive.open(ref)
                except CorruptObject as exc:
                    self._put(tasks, ("skip", f"skipped {exc}"))
                    continue
                except Exception as exc:
                    self._put(tasks, ("skip", f"skipped {ref.key}: cannot read it ({type(exc).__name__}: {exc})"))
                    continue
                try:
                    if not self._put(tasks, ("open", ref.key)):
                        return
                    while True:
                        try:
                            data = raw.read(CHUNK_BYTES)
                        except Exception as exc:
                            self._put(tasks, ("fail", (type(exc).__name__, str(exc))))
                            break
                        if not data:
                            self._put(tasks, ("end", None))
                            break
                        if not self._put(tasks, ("data", data)):
                            return
                finally:
                    raw.close()
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def messages(self) -> Iterator[tuple[ObjectRef, Iterator[tuple]]]:
        import queue as queues

        count = len(self.results)
        for index, ref in enumerate(self.refs):
            results = self.results[index % count]
            process = self.processes[index % count]

            def parts(results=results, process=process) -> Iterator[tuple]:
                while True:
                    try:
                        message = results.get(timeout=1.0)
                    except queues.Empty:
                        if not process.is_alive():
                            raise SourceError(f"a fetch worker process ended (exit code {process.exitcode})") from None
                        continue
                    yield message
                    if message[0] == "end":
                        return
            yield ref, parts()

    def close(self) -> None:
        self.stop.set()
        for tasks in self.tasks:
            try:
                tasks.put_nowait(None)
            except Exception:
                pass
        for process in self.processes:
            process.join(timeout=0.5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=1.0)
        for queue in (*self.tasks, *self.results):
            queue.cancel_join_thread()
            queue.close()
