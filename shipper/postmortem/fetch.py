"""`shipper fetch`: one instance's records for a time range, merged in time order, filtered, printed.

Objects are listed only under the partitions of the asked hours, downloaded in parallel a few
ahead of the merge, and opened only when the merge reaches their start time: memory holds the
objects that overlap in time, never the whole range.
"""

from __future__ import annotations

import collections
import difflib
import heapq
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from shipper.outputs.keys import partition_of
from shipper.postmortem.selection import Filter, ObjectRef, hour_prefixes
from shipper.record import format_time
from shipper.postmortem.sources import CloudWatchLogsSource, CorruptObject, decode_object

PREFETCH = 16   # objects downloaded ahead of the merge
WORKERS = 8     # downloads at once
# How much earlier than its object's start (the time it was read) a record's own time may be: a
# parsed event time or a journald entry's. Objects are listed and opened this much earlier, so
# such records still come out in time order and inside --since/--until.
EVENT_TIME_SLACK = 300.0


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
                   tags: list[str] | None) -> list[ObjectRef]:
    """The objects that may hold records of the range, in start order (objects never straddle an hour)."""
    prefixes = hour_prefixes(since, until + EVENT_TIME_SLACK, instance=instance)
    refs = [ref for prefix in prefixes for ref in archive.list(prefix)]
    refs = [r for r in refs if (not tags or r.tag in tags) and r.start - EVENT_TIME_SLACK <= until
            and hour_end(r.start) >= since and (instance is None or r.instance == instance)]
    return sorted(set(refs), key=lambda r: (r.start, r.key))


def merged_records(archive, refs: list[ObjectRef], warn: Callable[[str], None],
                   progress: Progress | None = None) -> Iterator[dict[str, Any]]:
    """Every record of ``refs`` in time order; a corrupt object is reported through ``warn`` and skipped."""
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="fetch")
    waiting: collections.deque[tuple[ObjectRef, Future, str]] = collections.deque()  # + its start, as a record time
    upcoming = iter(refs)

    def fill() -> None:
        while len(waiting) < PREFETCH:
            ref = next(upcoming, None)
            if ref is None:
                return
            waiting.append((ref, pool.submit(archive.read, ref), format_time(ref.start - EVENT_TIME_SLACK)))

    heap: list[tuple[str, int, int, dict, Iterator[dict]]] = []
    counter = 0

    def push(iterator: Iterator[dict], order: int) -> None:
        nonlocal counter
        record = next(iterator, None)
        if record is not None:
            counter += 1
            heapq.heappush(heap, (str(record.get("time", "")), order, counter, record, iterator))

    try:
        fill()
        order = 0
        while waiting or heap:
            # Open every object that starts before the next record to print.
            while waiting and (not heap or waiting[0][2] <= heap[0][0]):
                ref, future, _ = waiting.popleft()
                fill()
                order += 1
                try:
                    data = future.result()
                    records, bad = decode_object(ref.key, data)
                except CorruptObject as exc:
                    warn(f"skipped {exc}")
                    continue
                except Exception as exc:  # one unreadable object must not hide the others
                    warn(f"skipped {ref.key}: cannot read it ({type(exc).__name__}: {exc})")
                    continue
                finally:
                    if progress is not None:
                        progress.advance(ref.size)
                if bad:
                    warn(f"{ref.key}: {bad} lines that are not JSON records skipped")
                records.sort(key=lambda r: str(r.get("time", "")))  # event times may run backwards
                push(iter(records), order)
            if not heap:
                continue
            _, source, _, record, iterator = heapq.heappop(heap)
            yield record
            push(iterator, source)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def cloudwatch_records(source: CloudWatchLogsSource, since: float, until: float, instance: str | None,
                       tags: list[str] | None) -> Iterator[dict[str, Any]]:
    """The instance's streams merged in time order."""
    streams = source.streams(f"{instance}/" if instance else None)
    if tags:
        streams = [s for s in streams if s.partition("/")[2].split("/", 1)[0] in tags]
    iterators = [source.records(stream, since, until) for stream in streams]
    return heapq.merge(*iterators, key=lambda r: str(r.get("time", "")))


def instances_seen(archive, since: float, until: float) -> dict[str, list[ObjectRef]]:
    by_instance: dict[str, list[ObjectRef]] = collections.defaultdict(list)
    for ref in select_objects(archive, since, until, None, None):
        by_instance[ref.instance].append(ref)
    return by_instance


def list_instances(archive, since: float, until: float, warn: Callable[[str], None]) -> list[dict[str, Any]]:
    """Per instance seen in the range: first and last record time, image id, host and labels."""
    rows = []
    for instance, refs in sorted(instances_seen(archive, since, until).items()):
        first = last = None
        for ref in (refs[0], refs[-1]):
            try:
                records, _ = decode_object(ref.key, archive.read(ref))
            except CorruptObject as exc:
                warn(f"skipped {exc}")
                continue
            except Exception as exc:  # one unreadable object must not hide the other instances
                warn(f"skipped {ref.key}: cannot read it ({type(exc).__name__}: {exc})")
                continue
            if records:
                times = sorted(str(r.get("time", "")) for r in records)
                first = first or records[0] | {"time": times[0]}
                last = records[-1] | {"time": times[-1]}
        if first is None or last is None:
            continue
        rows.append({"instance": instance, "first": first["time"], "last": last["time"],
                     "image_id": last.get("image_id", ""), "host": last.get("host", ""),
                     "labels": last.get("labels", {}), "objects": len(refs),
                     "tags": sorted({r.tag for r in refs})})
    rows.sort(key=lambda row: row["last"])
    return rows


def suggest(instance: str, known: Iterable[str]) -> list[str]:
    known = list(known)
    close = difflib.get_close_matches(instance, known, n=3, cutoff=0.5)
    return close or [k for k in known if instance.lower() in k.lower()][:3]


def records_of(source, since: float, until: float, instance: str | None, tags: list[str] | None,
               warn: Callable[[str], None]) -> Iterator[dict[str, Any]] | None:
    """The records of the range from any source, in time order; None (said through ``warn``, with the
    nearest names) when an archive holds nothing of that instance in the range."""
    if isinstance(source, CloudWatchLogsSource):
        return cloudwatch_records(source, since, until, instance, tags)
    refs = select_objects(source, since, until, instance, tags)
    if not refs and instance:
        seen = instances_seen(source, since, until)
        hint = suggest(instance, seen)
        warn(f"no records of instance {instance} in {source.name} between {format_time(since)} and {format_time(until)}"
             + (f"; did you mean {', '.join(hint)}?" if hint else f" ({len(seen)} other instances there: "
                                                                  f"--list-instances)"))
        return None
    return merged_records(source, refs, warn, Progress(len(refs)))


def filtered(records: Iterable[dict[str, Any]], wanted: Filter, host: str | None) -> Iterator[dict[str, Any]]:
    for record in records:
        if host is not None and record.get("host") != host:
            continue
        if wanted.matches(record):
            yield record
