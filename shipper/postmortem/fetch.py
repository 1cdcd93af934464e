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
import difflib
import heapq
import io
import operator
import sys
import time
from bisect import bisect_left, bisect_right
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import orjson

from shipper.outputs.keys import partition_of
from shipper.postmortem.selection import Filter, Funnel, ObjectRef, hour_prefixes
from shipper.postmortem.sources import MAX_LINE_BYTES, CloudWatchLogsSource, CorruptObject, ObjectLines
from shipper.record import format_time

PREFETCH = 16   # objects downloaded ahead of the merge
PREFETCH_BYTES = 48 * 1024 * 1024  # and at most this many compressed bytes of them
WORKERS = 8     # downloads at once
REORDER_BYTES = 64 * 1024 * 1024   # lines held to put them in time order
LINE_COST = 160  # what Python adds to a held line's bytes (its objects, the list slot), roughly
# How much earlier than its object's start (the time it was read) a record's own time may be: a
# parsed event time or a journald entry's. Objects are listed and opened this much earlier, so
# such records still come out in time order and inside --since/--until.
EVENT_TIME_SLACK = 300.0
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
    listed = select_objects(source, since, until, instance, None, warn)
    refs = [r for r in listed if not tags or r.tag in tags]
    if refs:
        return merged_records(source, refs, warn, Progress(len(refs)))
    seen = None
    if instance and not listed:  # the instance is not there: which ones are, to suggest the nearest
        seen = sorted(instances_seen(source, since, until, warn))
    warn(nothing_listed(source.name, since, until, instance, tags, sorted({r.tag for r in listed}), seen))
    return None if instance else iter(())


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
