"""The filter stage: between parsing and routing, records are kept, changed or dropped.

Each ``[[filters]]`` entry is one :class:`Filter` of a type named in FILTER_MODULES (one module per
type, each with a module-level ``FILTER`` class). The pipeline (shipper.pipeline) builds the chain
of every tag from the entries whose ``match`` takes it, applies it in the reading thread of the
input, and routes what comes out. A dropped record is a delivery decision: the pipeline confirms the
batch's acknowledgement, so the checkpoint moves past it, and the filter counts it with its reason
(:meth:`FilterContext.dropped`). Nothing here touches threads or I/O, so filters are tested directly.

Also here, shared by every filter type and by the report: the order of severity levels
(:func:`level_rank`) and where a record keeps a named field (:func:`field_value`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from itertools import compress
from typing import TYPE_CHECKING, Any, Sequence

from shipper.record import PARSED, Batch, Envelope
from shipper.stats import Stats

if TYPE_CHECKING:  # shipper.config imports this package for FILTER_MODULES
    from shipper.config import Option, Settings

FILTER_MODULES = {"grep": "shipper.filters.grep", "redact": "shipper.filters.redact",
                  "throttle": "shipper.filters.throttle", "sample": "shipper.filters.sample",
                  "modify": "shipper.filters.modify", "level": "shipper.filters.level"}


@dataclass
class FilterContext:
    """Built by the pipeline, one per [[filters]] entry."""

    name: str               # "redact.1" = type + "." + index in the [[filters]] list
    stats: Stats
    envelope: Envelope = field(default_factory=Envelope)
    stop: threading.Event = field(default_factory=threading.Event)  # set when the agent stops

    def dropped(self, reason: str, count: int, tag: str) -> None:
        """Count ``count`` records of input ``tag`` this filter dropped on purpose."""
        if count:
            self.stats.add("records_dropped", count, input=tag, reason=reason, filter=self.name)


class Filter:
    """What every filter type is. ``apply`` is called in an input's reading thread (several inputs
    may call it at once: lock shared state); ``flush`` from the pipeline's flush thread."""

    OPTIONS: dict[str, "Option"] = {}

    @staticmethod
    def problems(settings: "Settings", where: str) -> list[str]:
        """Checks across keys (compile regexes, templates); each message names its key:
        ``filters[2].pattern: ...``."""
        return []

    def __init__(self, settings: "Settings", context: FilterContext):
        self.settings = settings
        self.context = context

    def apply(self, batch: Batch) -> list[Batch]:
        """The batches to route instead of ``batch``: usually ``[batch]`` changed in place, or new
        batches made with :func:`derived` (same byte range, on_done and origin). Records removed are
        counted through ``context.dropped``. A batch of 0 records is fine (it is confirmed), and so
        are several (the pipeline makes the original on_done fire once, after all of them)."""
        return [batch]

    def flush(self, now: float, final: bool) -> list[Batch]:
        """Batches the filter emits on its own (a summary record); about once a second, and once with
        ``final`` at stop before the outputs drain."""
        return []


def derived(batch: Batch, *, blob: bytes | None = None, messages: list[str | None] | None = None,
            fields: list[dict | None] | None = None, tag: str | None = None, count: int | None = None) -> Batch:
    """A new batch in place of ``batch``: the same source, read time, byte range, on_done and
    origin, with other records (a blob, or messages and fields) and perhaps another tag. ``count``:
    the blob's lines, when the caller knows them (else counted)."""
    if blob is None and messages is None:
        messages = []
    new = Batch(batch.tag if tag is None else tag, batch.source, batch.read_time, blob=blob,
                messages=messages, fields=fields, start=batch.start, end=batch.end, count=count)
    new.on_done = batch.on_done
    new.origin = batch.origin
    return new


def keep_records(batch: Batch, keep: Sequence) -> Batch:
    """``batch`` with only the records whose flag in ``keep`` is true (one per record, in order): a blob
    stays a blob (its fields, if any, cut along), in C loops (itertools.compress); ``batch`` itself when
    every record is kept."""
    if all(keep):
        return batch
    fields = None if batch.fields is None else list(compress(batch.fields, keep))
    if batch.blob is not None:
        lines = batch.blob.split(b"\n")
        lines.pop()  # after the last newline
        kept = list(compress(lines, keep))
        return derived(batch, blob=b"\n".join(kept) + b"\n" if kept else b"", fields=fields)
    return derived(batch, messages=list(compress(batch.messages, keep)), fields=fields)


# ---------------------------------------------------------------- severity levels

# Lowest to highest. Every name a parser, a journal or the level filter gives is brought to one of these.
LEVELS = ("trace", "debug", "info", "notice", "warn", "error", "critical", "fatal")
LEVEL_RANKS = {name: rank for rank, name in enumerate(LEVELS)}
LEVEL_ALIASES = {
    "verbose": "trace", "finest": "trace", "finer": "trace", "trc": "trace",
    "dbg": "debug", "fine": "debug", "config": "debug",
    "inf": "info", "information": "info", "informational": "info", "ok": "info",
    "warning": "warn", "wrn": "warn",
    "err": "error", "severe": "error", "eror": "error",
    "crit": "critical", "alert": "critical", "crt": "critical",
    "emerg": "fatal", "emergency": "fatal", "panic": "fatal", "ftl": "fatal",
}
# syslog/journald PRIORITY 0..7 (emerg .. debug)
SYSLOG_LEVELS = ("fatal", "critical", "critical", "error", "warn", "notice", "info", "debug")


def normalize_level(value: Any) -> str | None:
    """A level as records carry it ("WARNING", "Err", 3 for a syslog priority) -> one of LEVELS, or None."""
    if isinstance(value, str):
        name = value.strip().lower()
        if name in LEVEL_RANKS:
            return name
        alias = LEVEL_ALIASES.get(name)
        if alias is not None:
            return alias
        if len(name) == 1 and name.isdigit():
            value = int(name)
        else:
            return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(SYSLOG_LEVELS):
        return SYSLOG_LEVELS[value]
    return None


def level_rank(value: Any) -> int | None:
    """The rank of a level (trace 0 .. fatal 7), None when it is not one."""
    name = normalize_level(value)
    return None if name is None else LEVEL_RANKS[name]


def level_check(value: Any) -> str | None:
    """An Option check for keys naming a level threshold (``keep_level = "error"``)."""
    if value is None or normalize_level(value) is not None:
        return None
    return f"unknown level {value!r}; expected one of {', '.join(LEVELS)} (or an alias such as warning, err, crit)"


def record_level(extra: dict | None) -> str | None:
    """A record's level: ``level`` as parsed (or set by the level filter), else a journal priority."""
    if not extra:
        return None
    parsed = extra.get(PARSED)
    if parsed:
        for key in ("level", "severity", "lvl"):
            if key in parsed:
                found = normalize_level(parsed[key])
                if found is not None:
                    return found
    if "priority" in extra:
        return normalize_level(extra["priority"])
    return None


# ---------------------------------------------------------------- named fields

def field_value(name: str, message: str | None, extra: dict | None, tag: str, source: str | None) -> Any:
    """The value of a named field of one record, as filters name them: ``message``, ``tag``,
    ``source``, ``level`` (normalised, see record_level), a parsed field (dotted for nested values:
    ``http.status``) or a field the input set (journald's ``unit``). None when the record has none."""
    if name == "message":
        return message
    if name == "tag":
        return tag
    if name == "source":
        return source
    if name == "level":
        return record_level(extra)
    if not extra:
        return None
    parsed = extra.get(PARSED)
    if parsed:
        if name in parsed:
            return parsed[name]
        if "." in name:
            value: Any = parsed
            for part in name.split("."):
                if not isinstance(value, dict) or part not in value:
                    value = None
                    break
                value = value[part]
            if value is not None:
                return value
    if name[:1] != "\x00":  # never an agent key
        return extra.get(name)
    return None
