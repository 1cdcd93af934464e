"""What a person asks for when debugging a dead server, as pure functions: time ranges, archive keys,
the partitions to list, and which records match.

The archive's keys follow the default layout (shipper.outputs.keys.DEFAULT_KEY), after an
optional prefix: ``[prefix/]dt=YYYY-MM-DD/hour=HH/instance=ID/TAG/YYYYMMDDTHHMMSSZ-SEQ.ndjson[.gz|.zst]``.
Only the partitions of the asked hours (and instance) are listed, never the whole bucket.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

import orjson

from shipper.filters import LEVELS as FILTER_LEVELS
from shipper.filters import LEVEL_ALIASES, LEVEL_RANKS, normalize_level
from shipper.filters.level import level_of as message_level
from shipper.record import format_time

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
KEY = re.compile(r"(?:^|/)dt=(?P<date>\d{4}-\d{2}-\d{2})/hour=(?P<hour>\d{2})/instance=(?P<instance>[^/]+)/"
                 r"(?P<tag>[^/]+)/(?P<start>\d{8}T\d{6}Z)-(?P<seq>\d+)\.ndjson(?P<ext>\.gz|\.zst)?$")
# The levels of shipper.filters (trace debug info notice warn error critical fatal), lowest first.
LEVELS = FILTER_LEVELS
# Where a parsed level sits in a record (the parsers' names; under "fields" when it clashed).
_LEVEL_KEYS = ("level", "severity", "lvl", "loglevel", "log_level", "levelname")


class SelectionError(ValueError):
    """A bad --since/--until/--level value: the message says what is expected."""


def parse_time(text: str, now: float | None = None) -> float:
    """"2h" (ago), "30m", "1d", an ISO 8601 time ("2026-11-29T13:00:00Z", "2026-11-29 13:00", a date),
    or epoch seconds -> epoch seconds. Times without a zone are UTC."""
    now = time.time() if now is None else now
    relative = _RELATIVE.match(text)
    if relative:
        return now - float(relative.group(1)) * _UNITS[relative.group(2)]
    value = text.strip()
    if re.fullmatch(r"\d{9,11}(\.\d+)?", value):
        return float(value)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise SelectionError(f"{text!r} is neither a time (2026-11-29T13:00:00Z) nor a duration ago (2h, 30m, 1d)") \
            from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


# How much earlier than its object's start (the time it was read) a record's own time may be: a
# parsed event time or a journald entry's. Objects are listed and opened this much earlier, so
# such records still come out in time order and inside --since/--until.
EVENT_TIME_SLACK = 300.0
MAX_RANGE_DAYS = 400
LAST_TIME = 253_402_300_799.0   # 9999-12-31T23:59:59Z: the last time RFC 3339 can write


def time_range(since: str, until: str | None, now: float | None = None) -> tuple[float, float]:
    """--since and --until (default: now) as epoch seconds; a range longer than MAX_RANGE_DAYS, or
    outside 1970..9999, is refused (it would be listed hour by hour)."""
    now = time.time() if now is None else now
    start, end = parse_time(since, now), parse_time(until, now) if until else now
    for name, value, text in (("--since", start, since), ("--until", end, until or "now")):
        if not 0 <= value <= LAST_TIME:  # also inf and nan
            raise SelectionError(f"{name} {text[:40]!r} is not a time between 1970 and 9999")
    if end < start:
        raise SelectionError(f"--until ({format_time(end)}) is before --since ({format_time(start)})")
    if end - start > MAX_RANGE_DAYS * 86400:
        raise SelectionError(f"{format_time(start)} to {format_time(end)} is {(end - start) / 86400:,.0f} days: "
                             f"ask for at most {MAX_RANGE_DAYS} days at a time (--since, --until)")
    return start, end


@dataclass(frozen=True)
class ObjectRef:
    key: str
    instance: str
    tag: str
    start: float   # when the object was opened: its first record was read then
    seq: int
    size: int = 0


def parse_key(key: str, size: int = 0) -> ObjectRef | None:
    """An archive object's key -> what it holds; None for keys of other layouts (ignored)."""
    match = KEY.search(key)
    if match is None:
        return None
    try:
        start = calendar.timegm(time.strptime(match.group("start"), "%Y%m%dT%H%M%SZ"))
    except ValueError:  # looks like the layout, but no real time (20261399T...): not ours
        return None
    return ObjectRef(key, match.group("instance"), match.group("tag"), float(start), int(match.group("seq")), size)


def hour_prefixes(since: float, until: float, prefix: str = "", instance: str | None = None) -> list[str]:
    """The partitions to list for [since, until]: one per hour, narrowed to the instance when known."""
    base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    prefixes = []
    hour = int(since // 3600) * 3600
    while hour <= until:
        moment = time.gmtime(hour)
        partition = f"{base}dt={time.strftime('%Y-%m-%d', moment)}/hour={time.strftime('%H', moment)}/"
        prefixes.append(partition + (f"instance={instance}/" if instance else ""))
        hour += 3600
    return prefixes


def may_hold(ref: ObjectRef, since: float, until: float, tags: list[str] | None, max_span: float) -> bool:
    """Can this object hold records of [since, until]? It starts at ``ref.start`` and spans at most
    ``max_span`` seconds (the writer's upload_interval; objects never straddle an hour)."""
    if tags and ref.tag not in tags:
        return False
    return ref.start <= until and ref.start + max_span >= since


def level_of(record: dict[str, Any]) -> str | None:
    """A record's severity (one of LEVELS): its parsed level (``level``, ``severity``, ``lvl`` ...,
    at the top or under ``fields``), else its journald priority, else the level its message shows
    (shipper.filters.level.level_of, the agent's level filter's rule: ``ERROR``, ``[warn]``,
    ``level=error``, glog ``E1201``, ``Traceback``, ``panic:`` ...). A parsed value that names no level
    ("ok?", 42) does not hide the others."""
    fields = record.get("fields")
    for source in (record, fields) if isinstance(fields, dict) else (record,):
        for key in _LEVEL_KEYS:
            value = source.get(key)
            if isinstance(value, str) and value:
                found = normalize_level(value)
                if found is not None:
                    return found
    priority = record.get("priority")
    if isinstance(priority, (int, str)) and not isinstance(priority, bool):
        found = normalize_level(priority)
        if found is not None:
            return found
    message = record.get("message")
    if isinstance(message, str) and message:
        return message_level(message)
    return None


def check_level(level: str) -> str:
    """A --level value -> one of LEVELS (aliases such as warning, err, crit accepted)."""
    name = normalize_level(level)
    if name is None:
        raise SelectionError(f"--level {level!r}: one of {', '.join(LEVELS)} "
                             f"(or an alias: {', '.join(sorted(LEVEL_ALIASES))})")
    return name


@dataclass
class Filter:
    since: float
    until: float
    tags: list[str] | None = None
    grep: re.Pattern | None = None
    level: str | None = None   # this level and more severe

    def __post_init__(self) -> None:
        self._since = format_time(self.since)
        self._until = format_time(self.until)
        if self.level is not None:   # any name of a level: "warning", "WARN", "err", 3
            self.level = check_level(str(self.level))
        self._min_rank = LEVEL_RANKS[self.level] if self.level else None

    def matches(self, record: dict[str, Any]) -> bool:
        stamp = record.get("time")
        if not isinstance(stamp, str) or not (self._since <= stamp <= self._until):
            return False
        if self.tags and record.get("tag") not in self.tags:
            return False
        if self._min_rank is not None:
            level = level_of(record)
            if level is None or LEVEL_RANKS[level] < self._min_rank:
                return False
        if self.grep is not None and not self.grep.search(str(record.get("message") or "")):
            return False
        return True

    def miss(self, record: dict[str, Any], host: str | None = None) -> str | None:
        """The first test ``record`` fails, in the order time, tag, host, level, grep; None when it
        matches (and is of ``host``). The slow twin of :meth:`matches`, to say which filter matched nothing."""
        stamp = record.get("time")
        if not isinstance(stamp, str) or not (self._since <= stamp <= self._until):
            return "time"
        if self.tags and record.get("tag") not in self.tags:
            return "tag"
        if host is not None and record.get("host") != host:
            return "host"
        if self._min_rank is not None:
            level = level_of(record)
            if level is None or LEVEL_RANKS[level] < self._min_rank:
                return "level"
        if self.grep is not None and not self.grep.search(str(record.get("message") or "")):
            return "grep"
        return None


STAGES = ("time", "tag", "host", "level", "grep")
HOSTS_SHOWN = 5


class Funnel:
    """How many records each filter let through, until one matched: when none does, :meth:`explain`
    names the filter that matched nothing (counting stops at the first match, so it costs nothing then)."""

    def __init__(self, wanted: Filter, host: str | None = None):
        self.wanted = wanted
        self.host = host
        self.read = 0
        self.missed = dict.fromkeys(STAGES, 0)  # records stopped by each filter (the first they failed)
        self.first: str | None = None   # the earliest and latest time of the records outside the range
        self.last: str | None = None
        self.hosts: dict[str, None] = {}  # a few hosts of the records that --host stopped

    def count(self, record: dict[str, Any]) -> bool:
        """Counts ``record`` through the filters; True when it matches them all."""
        self.read += 1
        miss = self.wanted.miss(record, self.host)
        if miss is None:
            return True
        self.missed[miss] += 1
        if miss == "time":
            stamp = record.get("time")
            if isinstance(stamp, str):
                if self.first is None or stamp < self.first:
                    self.first = stamp
                if self.last is None or stamp > self.last:
                    self.last = stamp
        elif miss == "host" and len(self.hosts) < HOSTS_SHOWN and isinstance(host := record.get("host"), str):
            self.hosts.setdefault(host, None)
        return False

    def passed(self, stage: str) -> int:
        """Records through ``stage`` and every filter before it."""
        return self.read - sum(self.missed[s] for s in STAGES[:STAGES.index(stage) + 1])

    def active(self) -> list[tuple[str, str, str]]:
        """(stage, how it was asked, how its matches are described) for the filters given beyond the range."""
        wanted = self.wanted
        given = []
        if wanted.tags:
            given.append(("tag", f"--tag {', '.join(wanted.tags)}", "of that tag" if len(wanted.tags) == 1
                          else "of those tags"))
        if self.host is not None:
            given.append(("host", f"--host {self.host}", "of that host"))
        if wanted.level:
            given.append(("level", f"--level {wanted.level}", f"at level {wanted.level} or more severe"))
        if wanted.grep is not None:
            given.append(("grep", f"--grep {wanted.grep.pattern!r}", "matching it"))
        return given

    def explain(self) -> str:
        """Why nothing matched: the filter that let no record through, and what the ones before it let through."""
        since, until = format_time(self.wanted.since), format_time(self.wanted.until)
        if self.read == 0:
            return f"no records between {since} and {until}: the objects of that range hold none"
        if self.passed("time") == 0:
            return (f"no records between {since} and {until}: the {records(self.read)} read from the objects "
                    f"of that range are from {self.first or '?'} to {self.last or '?'}")
        before = self.passed("time")
        text = f"{records(before)} read between {since} and {until}"
        for stage, asked, described in self.active():
            through = self.passed(stage)
            if through == 0:
                hint = f" (hosts there: {', '.join(self.hosts)})" if stage == "host" and self.hosts else ""
                return f"{asked} matched nothing: {text}{hint}"
            if through < before:  # a filter that let every record through goes unsaid
                text += f", {through:,} of them {described}"
            before = through
        return f"no record matched: {text}"  # not reached while some filter let none through


def records(count: int) -> str:
    return f"{count:,} record" if count == 1 else f"{count:,} records"


class FormatError(SelectionError):
    """A bad --format template, or a field of it that no record has: the message names it."""


_TEMPLATE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_ALWAYS = frozenset({"level"})   # computed for every record (level_of): never unknown
_MISSING = object()


def _lookup(value: Any, path: tuple[str, ...]) -> Any:
    """The value at ``path`` in nested dicts; a key may hold dots itself (the metrics samples' keys are
    "cpu.percent", "disk.used_percent"): at each level the longest key that is there is taken."""
    start = 0
    while start < len(path):
        if not isinstance(value, dict):
            return _MISSING
        for end in range(len(path), start, -1):
            key = path[start] if end == start + 1 else ".".join(path[start:end])
            if key in value:
                value, start = value[key], end
                break
        else:
            return _MISSING
    return value


class Format:
    """A ``--format`` template: ``{name}`` is a record's field, dotted for nested ones
    (``{metrics.cpu.percent}`` (the key "cpu.percent" of ``metrics``), ``{fields.user}``, ``{labels.app}``,
    ``{metrics.disk.used_percent./}``); ``{level}`` is the record's level
    as :func:`level_of` finds it (parsed, journald, or from the message); ``{{`` and ``}}`` are braces.
    Strings print as they are, dicts and lists as JSON, other values as JSON scalars (true, 3.5);
    a record without the field prints nothing there. A field that no record has is an error
    (:meth:`unknown`): the caller says so, naming it, after the records (a typo prints empty fields
    until then, so it is told, never silent)."""

    def __init__(self, template: str):
        self.template = template
        self.parts: list[str | tuple[str, ...]] = []   # literal text, or the path of a field
        text: list[str] = []
        position = 0
        for match in _TEMPLATE.finditer(template):
            text.append(template[position:match.start()])
            position = match.end()
            token = match.group(0)
            if token in ("{{", "}}"):
                text.append(token[0])
            elif match.group(1) is None:
                raise FormatError(f"--format {template!r}: a lone {token!r} at character {match.start() + 1} "
                                  f"(write {token * 2} for the character itself, {{name}} for a field)")
            else:
                name = match.group(1).strip()
                path = tuple(name.split("."))
                if not name or not all(path):
                    raise FormatError(f"--format {template!r}: {{{match.group(1)}}} names no field "
                                      f"(a field name, dotted for a nested one: {{metrics.cpu.percent}})")
                if text:
                    self.parts.append("".join(text))
                    text = []
                self.parts.append(path)
        text.append(template[position:])
        if "".join(text):
            self.parts.append("".join(text))
        self.fields = list(dict.fromkeys(".".join(part) for part in self.parts if isinstance(part, tuple)))
        self.found: set[str] = {name for name in self.fields if name in _ALWAYS}   # fields some record had
        self.rendered = 0

    def names_metrics(self) -> bool:
        """Does the template ask for a field of metrics samples (records without a message)?"""
        return any(field == "metrics" or field.startswith("metrics.") for field in self.fields)

    def render(self, record: dict[str, Any]) -> str:
        self.rendered += 1
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            if part == ("level",):
                value: Any = level_of(record)
            else:
                value = _lookup(record, part)
                if value is _MISSING:
                    continue
                if len(self.found) < len(self.fields):  # (once all were found, nothing to note)
                    self.found.add(".".join(part))
            if value is None:
                continue
            if isinstance(value, str):
                out.append(value)
            else:
                out.append(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode())
        return "".join(out)

    def unknown(self) -> list[str]:
        """The template's fields that none of the records rendered had (empty before any was)."""
        if not self.rendered:
            return []
        return [field for field in self.fields if field not in self.found]

    def unknown_error(self, seen: Iterable[str] = ()) -> FormatError | None:
        """The error to tell about :meth:`unknown` fields (None when there are none)."""
        missing = self.unknown()
        if not missing:
            return None
        names = ", ".join(f"{{{name}}}" for name in missing)
        keys = sorted(set(seen))
        hint = f" (the records have {', '.join(keys[:30])}{', ...' if len(keys) > 30 else ''})" if keys else ""
        return FormatError(f"--format: unknown field {names}: no record has it ({records(self.rendered)} printed)"
                           f"{hint}")


def render(record: dict[str, Any], template: str | Format | None) -> str:
    """``--format '{time} {host} {message}'`` (see :class:`Format`). Without a template: the raw line
    (the message), like reading the original log; a record without one (a metrics sample, shown
    only when asked for) as its JSON."""
    if template is None:
        message = record.get("message")
        if message is None:
            return orjson.dumps(record, option=orjson.OPT_NON_STR_KEYS).decode()
        return str(message)
    if isinstance(template, str):
        template = Format(template)
    return template.render(record)


def has_message(record: dict[str, Any]) -> bool:
    """Records without a message (metrics samples) are left out of the plain output unless asked for."""
    return record.get("message") is not None


# What a terminal would act on rather than show: C0 and C1 controls and DEL (escape sequences,
# carriage returns that overwrite a line), and the bidirectional overrides that reorder a line's
# text. Newline and tab are shown as they are.
_UNSAFE = [c for c in range(0x20) if c not in (0x09, 0x0A)] + list(range(0x7F, 0xA0)) + \
    [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _UNSAFE}


def printable(text: str) -> str:
    """``text`` as a terminal may show it: control characters and escape sequences escaped
    (ESC -> ``\\x1b``, as journalctl does); with --json or into a pipe the text stays exact."""
    if text.isprintable():  # the common case, checked in C
        return text
    return text.translate(_ESCAPES)
