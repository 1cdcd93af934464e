"""The ``level`` filter: the severity of lines no parser read, from the words they carry.

``level_of(line)`` is the rule for one line (the report uses it too); ``levels_of_blob`` applies the
same rule to every line of a plain blob at once: the blob is split at its newlines (in C) and one
bytes regex searches the first WINDOW bytes of each line, so no Python code runs per line beyond a
dict lookup. The level is set as ``level`` (one of shipper.filters.LEVELS) only where the record has
none (a parsed ``level``/``severity``/``lvl``, a journal priority). A plain blob keeps its fast path:
its lines get shared constant fields (record.encode_plain_fields).

Recognised, the leftmost in the line winning:
- upper-case words: TRACE DEBUG INFO NOTICE WARN WARNING ERROR ERR CRIT CRITICAL FATAL ALERT EMERG
  EMERGENCY SEVERE PANIC, and zerolog's TRC DBG INF WRN FTL;
- a bracketed name in any case: ``[error]``, ``[Warn]`` (nginx, Apache);
- key forms: ``level=error``, ``lvl=warn``, ``severity="info"``, ``loglevel=``, ``log_level=`` (logfmt)
  and ``"level":"error"`` (JSON, also ``"severity"``, ``"lvl"``, ``"levelname"``), any case of the value;
- glog at the start of a line: ``E1201 12:00:00.000000 ...`` (I, W, E, F);
- ``Traceback (most recent call last)`` (Python) and ``Exception in thread "`` (Java): error;
  ``panic: `` (Go): fatal.
"""

from __future__ import annotations

import re
from itertools import repeat

from shipper.filters import LEVELS, Filter, FilterContext, normalize_level, record_level
from shipper.record import PARSED, Batch

# Only the start of a line is searched: where loggers put the level, and a bound on the cost of a
# long line (a level word further on is ignored).
WINDOW = 256

# Level names in any case, grouped by first letter (cheap for the regex engine to reject).
_NAMES = (r"(?i:t(?:race|rc)|d(?:ebug|bg)|i(?:nfo(?:rmation(?:al)?)?|nf)|notice|w(?:arn(?:ing)?|rn)"
          r"|e(?:rr(?:or)?|ror|merg(?:ency)?)|c(?:rit(?:ical)?|rt)|f(?:atal|tl)|alert|severe|panic)")
_END = r"(?![A-Za-z0-9_])"


_GLOG = r"(?<![\s\S].)\d{4} \d\d:\d\d:\d\d"  # only as the first word of the line
# Key forms start at the "v" of level/lvl/severity ("v" is rare in logs; the key's first letter, a
# quote, "=" or ":" are not); look-behinds check the rest of the key before it.
_LOGFMT_KEY = (r"(?:(?<=lev)(?<![A-Za-z0-9]lev)el|(?<=loglev)(?<![A-Za-z0-9]loglev)el|(?<=lv)(?<![A-Za-z0-9]lv)l"
               r"|(?<=sev)(?<![A-Za-z0-9]sev)erity)")
_JSON_KEY = r'(?:(?<="lev)el(?:name)?|(?<="Lev)el(?:Name)?|(?<="loglev)el|(?<="log_lev)el|(?<="lv)l|(?<="[sS]ev)erity)"'
# Every alternative begins with a literal character, so that the engine skips at C speed to the
# positions where one could start (its "charset prefix"): a leading \b or look-behind loses that,
# and a common first letter ("p", ":", a quote) costs a try at each of its places. The alternatives
# are grouped by that character (a trie of one level): at a candidate the engine compares one
# character per group instead of trying every alternative ("T" and "v" are everywhere in logs).
_LB = r"(?<![A-Za-z0-9_]{0})"
_PATTERN = "|".join((
    r"T(?:" + _LB.format("T") + r"(?:RACE|RC)" + _END + r"|raceback \(most recent call last\))",
    r"D" + _LB.format("D") + r"(?:EBUG|BG)" + _END,
    r"I(?:" + _LB.format("I") + r"(?:NFO|NF)" + _END + "|" + _GLOG + ")",
    r"N" + _LB.format("N") + "OTICE" + _END,
    r"W(?:" + _LB.format("W") + r"(?:ARN(?:ING)?|RN)" + _END + "|" + _GLOG + ")",
    r"E(?:" + _LB.format("E") + r"(?:(?:RR(?:OR)?|MERG(?:ENCY)?)" + _END + r'|xception in thread ")|' + _GLOG + ")",
    r"C" + _LB.format("C") + "RIT(?:ICAL)?" + _END,
    r"F(?:" + _LB.format("F") + r"(?:ATAL|TL)" + _END + "|" + _GLOG + ")",
    r"A" + _LB.format("A") + "LERT" + _END, r"S" + _LB.format("S") + "EVERE" + _END,
    r"P" + _LB.format("P") + "ANIC" + _END,
    r"\[" + _NAMES + r"\]",
    r"v(?:" + _LOGFMT_KEY + r'[ \t]*=[ \t]*"?' + _NAMES + _END                 # logfmt: level=warn
    + "|" + _JSON_KEY + r'[ \t]*:[ \t]*"' + _NAMES + '")',                   # JSON: "level":"info"
    r"V(?:(?:(?<=LEV)(?<![A-Za-z0-9]LEV)EL|(?<=SEV)(?<![A-Za-z0-9]SEV)ERITY)[ \t]*=[ \t]*\"?" + _NAMES + _END
    + r'|(?:(?<="LEV)EL|(?<="SEV)ERITY)"[ \t]*:[ \t]*"' + _NAMES + '")',
))
LEVEL_REGEX = re.compile(_PATTERN.encode())
# Go's "panic: " is at the start of a line: checked there, as "p" is too common a first letter.
_PANIC = b"panic: "
_GLOG_LEVELS = {b"I"[0]: "info", b"W"[0]: "warn", b"E"[0]: "error", b"F"[0]: "fatal"}

def _meaning(text: bytes) -> str:
    """The level a match of LEVEL_REGEX says (every match says one)."""
    found = _MEANING.get(text)
    if found is not None:
        return found
    first = text[:1]
    if first in (b"v", b"V"):
        found = normalize_level(text.rsplit(b"=" if b"=" in text else b":", 1)[1].strip(b' \t"').decode("ascii"))
    elif first == b"[":
        found = normalize_level(text[1:-1].decode("ascii"))
    elif text.startswith((b"Traceback", b"Exception in")):
        found = "error"
    elif text[1:2].isdigit():  # glog
        found = _GLOG_LEVELS[text[0]]
    else:
        found = normalize_level(text.decode("ascii"))
    found = found or "info"  # unreachable: every name in _NAMES is a level or an alias of one
    if len(_MEANING) < 4096:
        _MEANING[text] = found
    return found


class _Meanings(dict):
    """What a matched text means, cached: the few distinct matches (b"INFO", b'vel":"info"') recur; a
    new text is worked out once (``_MEANING[text]``)."""

    def __missing__(self, text: bytes) -> str:
        return _meaning(text)


_MEANING = _Meanings()


def level_of(line: str) -> str | None:
    """The level one plain line shows (one of LEVELS), or None. Looks at its first WINDOW bytes."""
    data = line.encode("utf-8", "surrogatepass")
    match = LEVEL_REGEX.search(data, 0, WINDOW)
    if match is not None:
        return _meaning(match[0])
    return "fatal" if data.startswith(_PANIC) else None


def levels_of_blob(blob: bytes) -> list[str | None]:
    """``level_of`` for each line of a blob of complete lines: the regex runs over each line at C
    speed (map), then one cached lookup per line that has a level word."""
    lines = blob.split(b"\n")
    lines.pop()  # after the last newline
    known, panic = _MEANING.__getitem__, _PANIC
    return [known(match[0]) if match is not None else ("fatal" if line.startswith(panic) else None)
            for line, match in zip(lines, map(LEVEL_REGEX.search, lines, repeat(0), repeat(WINDOW)))]


def record_level_or_rule(message, extra: dict | None) -> str | None:
    """A record's level: its own (parsed, journald: record_level), else the rule on its message. What
    ``keep_level`` of grep, sample and throttle judges a record by."""
    found = record_level(extra)
    if found is None and isinstance(message, str):
        found = level_of(message)
    return found


def line_levels(blob: bytes, fields: list[dict | None] | None) -> list[str | None]:
    """``record_level_or_rule`` for each line of a plain blob (its per-line fields, if any); the rule
    runs over the blob once, and only if some line has no level of its own."""
    if fields is None:
        return levels_of_blob(blob)
    levels = [record_level(extra) for extra in fields]
    if None in levels:
        detected = levels_of_blob(blob)
        levels = [found if found is not None else rule for found, rule in zip(levels, detected)]
    return levels


# One fields dict per level, shared by every line of that level (see record.encode_plain_fields).
LEVEL_FIELDS: dict[str | None, dict | None] = {name: {PARSED: {"level": name}} for name in LEVELS}
LEVEL_FIELDS[None] = None


def with_level(extra: dict | None, level: str) -> dict:
    """A record's fields with ``level`` set, copied (fields dicts may be shared between records)."""
    if not extra:
        return LEVEL_FIELDS[level]
    parsed = extra.get(PARSED)
    return {**extra, PARSED: {**parsed, "level": level} if isinstance(parsed, dict) else {"level": level}}


def blob_fields(blob: bytes, fields: list[dict | None] | None) -> tuple[list[dict | None], int]:
    """The fields of a blob's lines with the detected levels set where absent, and how many were set."""
    levels = levels_of_blob(blob)
    if fields is None:
        new = list(map(LEVEL_FIELDS.__getitem__, levels))
        return new, len(levels) - new.count(None)
    return _merged(fields, levels)


def _merged(fields: list[dict | None], levels: list[str | None]) -> tuple[list[dict | None], int]:
    new: list[dict | None] = []
    made: dict[tuple[int, str], dict] = {}  # (id of the shared dict, level) -> its copy with the level
    keep: list = []  # the dicts whose id is a key of ``made``: alive until the end
    count = 0
    for extra, level in zip(fields, levels):
        if level is None or record_level(extra) is not None:
            new.append(extra)
            continue
        key = (id(extra), level)
        copy = made.get(key)
        if copy is None:
            copy = made[key] = with_level(extra, level)
            keep.append(extra)
        new.append(copy)
        count += 1
    return new, count


class LevelFilter(Filter):
    """Sets ``level`` on the records that have none, from their message."""

    OPTIONS: dict = {}

    def __init__(self, settings, context: FilterContext):
        super().__init__(settings, context)

    def apply(self, batch: Batch) -> list[Batch]:
        if batch.blob is not None:
            if not batch.count:
                return [batch]
            fields, count = blob_fields(batch.blob, batch.fields)
            if count:
                batch.fields = fields
                self.context.stats.add("levels_detected", count, filter=self.context.name)
            return [batch]
        messages = batch.messages or []
        fields = batch.fields
        new_fields: list[dict | None] = list(fields) if fields is not None else [None] * len(messages)
        count = 0
        for index, message in enumerate(messages):
            if not isinstance(message, str) or record_level(new_fields[index]) is not None:
                continue
            level = level_of(message)
            if level is not None:
                new_fields[index] = with_level(new_fields[index], level)
                count += 1
        if count:
            self.context.stats.add("levels_detected", count, filter=self.context.name)
            return _set(batch, new_fields)
        return [batch]


def _set(batch: Batch, fields: list[dict | None]) -> list[Batch]:
    batch.fields = fields
    batch._ndjson = None
    return [batch]


FILTER = LevelFilter
