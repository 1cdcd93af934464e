"""``grep``: keep or drop records by regular expressions, in order, like the CloudWatch agent's
``filters`` and Fluent Bit's ``grep``.

```toml
[[filters]]
type = "grep"
match = ["app"]
rules = [{ exclude = 'GET /health' }, { include = 'ERROR|WARN', field = "level" }]
keep_level = "error"     # never drop a record at or above this level
```

A record is shipped when it passes every rule, in order: an ``include`` rule keeps only records whose
field matches (a record without the field does not), an ``exclude`` rule drops those whose field
matches. ``field`` is ``message`` (the default), ``level``, ``source``, ``tag``, a parsed field or an
input's field (see shipper.filters.field_value). Patterns are searched (not anchored); ``^`` and ``$``
match at the start and end of every line of a message.

The fast path (plain lines, no parser): a rule on the message is searched once over the whole blob and
the matching lines' spans are cut out with slices; no Python object is made per line. This is exactly
line-by-line searching (tests/test_filters_grep.py proves it with hypothesis) because of how
:class:`LinePattern` compiles a rule: see there.
"""

from __future__ import annotations

import re
import re._constants as _c
import re._parser as _parser
from itertools import repeat
from typing import Any

from shipper.config import Option, Settings, did_you_mean
from shipper.filters import Filter, FilterContext, derived, field_value, keep_records, level_check, level_rank
from shipper.filters.level import line_levels, record_level_or_rule
from shipper.record import PARSED, Batch


class LinePattern:
    """A user regex, searched in a message (``search``) or over a blob of whole lines (``cut``).

    Searching a blob once finds the same lines as searching each line alone when the match found in
    a line ends before that line's newline: the leftmost match over the blob starts in the first line
    that has a match, because every match of a line alone is a match over the blob too (the text
    around it is the same up to the line's ends, where ``^``, ``$`` (re.M) and ``\\b`` see a newline,
    exactly as they see the end of a lone line; ``\\B`` does not, on an empty line). A match that runs
    over the newline (``a\\s+b``) is not trusted: that one line is searched again alone
    (``search(blob, start, end)``). What could see past
    the line's ends without consuming it cannot be cut this way, so patterns with lookarounds, ``\\A``,
    ``\\Z``, ``\\B`` or a scoped ``(?-m:^)`` are searched line by line (correct, slower).

    Bytes or text: the blob is searched as bytes when the pattern means the same on UTF-8 bytes as on
    text (ASCII literals and classes, no ``.``, no negated class, no ``\\w\\d\\s\\b``, no IGNORECASE);
    else the blob is decoded once and searched as text.
    """

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.text = re.compile(pattern, re.M)  # raises re.error: validated at load (problems)
        self.chunked, byte_safe = analyse(pattern)
        self.bytes: re.Pattern | None = None
        if byte_safe:
            try:
                self.bytes = re.compile(pattern.encode("utf-8"), re.M)
            except re.error:  # \u escapes and the like exist for text patterns only
                self.bytes = None
        # A plain ASCII string (" /healthz"): bytes.find is about twice as fast as the regex engine.
        self.literal = literal_of(pattern) if self.bytes is not None else None

    def search(self, text: str) -> bool:
        return self.text.search(text) is not None

    def cut(self, blob: bytes, keep_matching: bool, lines: int) -> tuple[bytes, int]:
        """The lines of ``blob`` (``lines`` of them) that match (``keep_matching``) or that do not, in
        order, and how many they are (counted in the matching runs only, not in the whole blob)."""
        if self.literal is not None:
            return _join_runs(blob, literal_runs(blob, self.literal), keep_matching, lines)
        if self.bytes is not None:
            return _join_runs(blob, matching_runs(self.bytes, blob, b"\n", self.chunked), keep_matching, lines)
        text = blob.decode("utf-8")
        kept, count = _join_runs(text, matching_runs(self.text, text, "\n", self.chunked), keep_matching, lines)
        return kept.encode("utf-8"), count

    def line_spans(self, blob: bytes) -> tuple[Any, list[tuple[int, int]]]:
        """(data, spans): the matching lines of ``blob`` as [start, end) runs (ends after the newline)
        over ``data``, which is ``blob`` or its decoded text (see ``cut``)."""
        if self.literal is not None:
            return blob, literal_runs(blob, self.literal)
        if self.bytes is not None:
            return blob, matching_runs(self.bytes, blob, b"\n", self.chunked)
        text = blob.decode("utf-8")
        return text, matching_runs(self.text, text, "\n", self.chunked)


def analyse(pattern: str) -> tuple[bool, bool]:
    """(chunk_safe, byte_safe) of a pattern compiled with re.M: see LinePattern."""
    parsed = _parser.parse(pattern, re.M)
    flags = parsed.state.flags
    verdict = {"chunk": True, "bytes": not flags & re.IGNORECASE}

    def walk(items, multiline: bool, icase: bool) -> None:
        for op, av in items:
            if op in (_c.ASSERT, _c.ASSERT_NOT):
                verdict["chunk"] = False
            elif op is _c.AT:
                if av in (_c.AT_BEGINNING_STRING, _c.AT_END_STRING) or \
                        (av in (_c.AT_BEGINNING, _c.AT_END) and not multiline):
                    verdict["chunk"] = False
                elif av is _c.AT_NON_BOUNDARY:  # \B never matches an empty string, but does before a newline
                    verdict["chunk"] = verdict["bytes"] = False
                elif av is _c.AT_BOUNDARY:
                    verdict["bytes"] = False
            elif op is _c.LITERAL:
                if av >= 128 or icase:
                    verdict["bytes"] = False
            elif op in (_c.ANY, _c.NOT_LITERAL, _c.CATEGORY):
                verdict["bytes"] = False
            elif op is _c.IN:
                if icase:
                    verdict["bytes"] = False
                for kind, value in av:
                    if kind in (_c.NEGATE, _c.CATEGORY) or (kind is _c.LITERAL and value >= 128) or \
                            (kind is _c.RANGE and value[1] >= 128):
                        verdict["bytes"] = False
            elif op is _c.SUBPATTERN:
                _group, add, remove, sub = av
                walk(sub, (multiline or bool(add & re.M)) and not remove & re.M,
                     (icase or bool(add & re.I)) and not remove & re.I)
            elif op is _c.BRANCH:
                for sub in av[1]:
                    walk(sub, multiline, icase)
            elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
                walk(av[2], multiline, icase)
            elif op is _c.ATOMIC_GROUP:
                walk(av, multiline, icase)
            elif op is _c.GROUPREF_EXISTS:
                walk(av[1], multiline, icase)
                if av[2] is not None:
                    walk(av[2], multiline, icase)

    walk(parsed, True, bool(flags & re.IGNORECASE))
    return verdict["chunk"], verdict["bytes"]


def literal_of(pattern: str) -> bytes | None:
    """The bytes a pattern of only ASCII literal characters (no newline) matches; None for any other."""
    parsed = _parser.parse(pattern, re.M)
    if parsed.state.flags & re.IGNORECASE or not len(parsed):
        return None
    if not all(op is _c.LITERAL and 0 < av < 128 and av != 10 for op, av in parsed):
        return None
    return bytes(av for _, av in parsed)


def literal_runs(blob: bytes, literal: bytes) -> list[tuple[int, int]]:
    """matching_runs for a literal: found with bytes.find, which cannot run over a newline."""
    runs: list[tuple[int, int]] = []
    find, rfind = blob.find, blob.rfind
    position = 0
    while True:
        at = find(literal, position)
        if at < 0:
            return runs
        line_start = rfind(b"\n", position, at) + 1 or position
        line_end = find(b"\n", at)
        _add(runs, line_start, line_end + 1)
        position = line_end + 1


def matching_runs(regex: re.Pattern, data, newline, chunked: bool) -> list[tuple[int, int]]:
    """[start, end) runs of the lines of ``data`` (complete lines, each ending in ``newline``) in which
    ``regex`` finds a match; adjacent lines are merged into one run."""
    runs: list[tuple[int, int]] = []
    size = len(data)
    if not chunked:  # line by line, still without splitting: search each line within its bounds
        start = 0
        while start < size:
            end = data.find(newline, start)
            if regex.search(data[start:end]) is not None:
                _add(runs, start, end + 1)
            start = end + 1
        return runs
    position = 0
    search = regex.search
    while position < size:
        found = search(data, position)
        if found is None:
            break
        at = found.start()
        if at >= size:  # an empty match after the last newline: no line there
            break
        line_start = data.rfind(newline, position, at) + 1 or position
        line_end = data.find(newline, at)
        if found.end() > line_end and search(data, line_start, line_end) is None:
            position = line_end + 1  # the match ran over the newline and the line alone has none
            continue
        _add(runs, line_start, line_end + 1)
        position = line_end + 1
    return runs


def line_ranges(data, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The [first, last) line numbers of ``runs`` (offsets in ``data``, as matching_runs gives them)."""
    newline = b"\n" if isinstance(data, bytes) else "\n"
    ranges = []
    line = position = 0
    for start, end in runs:
        line += data.count(newline, position, start)
        lines = data.count(newline, start, end)
        ranges.append((line, line + lines))
        line += lines
        position = end
    return ranges


def _add(runs: list[tuple[int, int]], start: int, end: int) -> None:
    if runs and runs[-1][1] == start:
        runs[-1] = (runs[-1][0], end)
    else:
        runs.append((start, end))


def _join_runs(data, runs: list[tuple[int, int]], keep_matching: bool, lines: int):
    """The runs of ``data`` (keep_matching), or what lies between them, and their count of lines
    (``data`` has ``lines``)."""
    newline = "\n" if isinstance(data, str) else b"\n"
    in_runs = sum(map(data.count, repeat(newline), *zip(*runs))) if runs else 0
    if keep_matching:
        return data[:0].join([data[start:end] for start, end in runs]), in_runs
    if not runs:
        return data, lines
    pieces = []
    position = 0
    for start, end in runs:
        if start > position:
            pieces.append(data[position:start])
        position = end
    pieces.append(data[position:])
    return data[:0].join(pieces), lines - in_runs


# ---------------------------------------------------------------- the rules

RULE_KEYS = ("include", "exclude", "field")


class Rule:
    __slots__ = ("include", "field", "pattern")

    def __init__(self, include: bool, pattern: str, field: str = "message"):
        self.include = include
        self.field = field
        self.pattern = LinePattern(pattern)

    def passes(self, value: Any) -> bool:
        """Whether a record whose field is ``value`` (None: it has none) passes this rule."""
        if value is None:
            return not self.include
        if not isinstance(value, str):
            value = str(value)
        return self.pattern.search(value) == self.include


def rule_problems(raw: Any, where: str) -> list[str]:
    """What is wrong with one rule table ("filters[0].rules[1]")."""
    if not isinstance(raw, dict):
        return [f"{where}: expected a table like {{ exclude = 'GET /health' }}, got {type(raw).__name__}"]
    problems = [f"{where}.{key}: unknown key{did_you_mean(key, RULE_KEYS)}" for key in raw if key not in RULE_KEYS]
    actions = [key for key in ("include", "exclude") if key in raw]
    if len(actions) != 1:
        problems.append(f"{where}: give exactly one of include or exclude (a regex), got "
                        f"{' and '.join(actions) if actions else 'neither'}")
    for key in actions:
        value = raw[key]
        if not isinstance(value, str):
            problems.append(f"{where}.{key}: expected a regular expression (a string), got {type(value).__name__}")
            continue
        try:
            re.compile(value, re.M)
        except re.error as exc:
            problems.append(f"{where}.{key}: invalid regular expression {value!r}: {exc}")
    if "field" in raw and (not isinstance(raw["field"], str) or not raw["field"]):
        problems.append(f"{where}.field: expected a field name (message, level, source, tag or a parsed field)")
    return problems


def make_rules(raw: list[dict]) -> list[Rule]:
    return [Rule("include" in item, item.get("include", item.get("exclude")), item.get("field", "message"))
            for item in raw]


class GrepFilter(Filter):
    OPTIONS = {
        "rules": Option("list"),
        "keep_level": Option("str", None, check=level_check),
    }

    @staticmethod
    def problems(settings: Settings, where: str) -> list[str]:
        if not settings.rules:
            return [f"{where}.rules: at least one rule, e.g. rules = [{{ exclude = 'GET /health' }}]"]
        problems: list[str] = []
        for index, raw in enumerate(settings.rules):
            problems.extend(rule_problems(raw, f"{where}.rules[{index}]"))
        return problems

    @staticmethod
    def summary(settings: Settings) -> str:
        parts = [f"{'include' if 'include' in r else 'exclude'} {r.get('field', 'message')} "
                 f"~ {r.get('include', r.get('exclude'))!r}" for r in settings.rules]
        if settings.keep_level:
            parts.append(f"keeps level >= {settings.keep_level}")
        return "; ".join(parts)

    def __init__(self, settings: Settings, context: FilterContext):
        super().__init__(settings, context)
        self.rules = make_rules(settings.rules)
        self.keep_rank = level_rank(settings.keep_level) if settings.keep_level else None

    def apply(self, batch: Batch) -> list[Batch]:
        before = batch.count
        if batch.blob is None:
            kept = grep_records(self.rules, batch, self.keep_rank)
        elif batch.fields is None:
            kept = self._grep_plain(batch)
        else:
            kept = grep_lines(self.rules, batch, self.keep_rank)
        self.context.dropped("filtered", before - kept.count, batch.tag)
        return [kept]

    def _grep_plain(self, batch: Batch) -> Batch:
        """Plain lines: the blob is cut; with keep_level, lines whose detected level is at or above it
        stay whatever the rules say (the level is only looked at, not added to the records)."""
        if self.keep_rank is None:
            return grep_blob(self.rules, batch)
        levels = line_levels(batch.blob, None)
        if not any(found is not None and level_rank(found) >= self.keep_rank for found in levels):
            return grep_blob(self.rules, batch)
        shared: dict[str, dict] = {}
        fields = [None if found is None else shared.setdefault(found, {PARSED: {"level": found}})
                  for found in levels]
        kept = grep_lines(self.rules, derived(batch, blob=batch.blob, fields=fields), self.keep_rank)
        return derived(kept, blob=kept.blob)  # without the fields that were there for the decision


def grep_blob(rules: list[Rule], batch: Batch) -> Batch:
    """Plain lines: rules on the message cut the blob; on the tag or source they keep or drop the whole
    batch; on any other field (plain lines have none) an include drops everything, an exclude nothing."""
    blob, lines = batch.blob, batch.count
    for rule in rules:
        if not blob:
            break
        if rule.field == "message":
            blob, lines = rule.pattern.cut(blob, rule.include, lines)
        elif not rule.passes(field_value(rule.field, None, None, batch.tag, batch.source)):
            blob, lines = b"", 0
    return batch if blob is batch.blob else derived(batch, blob=blob, count=lines)


def grep_lines(rules: list[Rule], batch: Batch, keep_rank: int | None) -> Batch:
    """Plain lines that carry fields (the level filter's, a few dicts shared by many lines): a flag per
    line; rules on the message are still searched once over the blob, the others once per distinct dict."""
    blob, fields, count, tag, source = batch.blob, batch.fields, batch.count, batch.tag, batch.source
    keep = bytearray(b"\x01") * count
    for rule in rules:
        if rule.field == "message":
            data, runs = rule.pattern.line_spans(blob)
            ranges = line_ranges(data, runs)
            if rule.include:
                matched = bytearray(count)
                for first, last in ranges:
                    matched[first:last] = keep[first:last]
                keep = matched
            else:
                for first, last in ranges:
                    keep[first:last] = bytes(last - first)
            continue
        verdicts: dict[int, bool] = {}
        for index, extra in enumerate(fields):
            if keep[index]:
                verdict = verdicts.get(id(extra))
                if verdict is None:
                    verdict = verdicts[id(extra)] = rule.passes(field_value(rule.field, None, extra, tag, source))
                if not verdict:
                    keep[index] = 0
    if keep_rank is not None and not all(keep):
        for index, found in enumerate(line_levels(blob, fields)):
            if not keep[index] and found is not None and level_rank(found) >= keep_rank:
                keep[index] = 1
    return keep_records(batch, keep)


def grep_records(rules: list[Rule], batch: Batch, keep_rank: int | None) -> Batch:
    messages = batch.message_list()
    fields = batch.fields or [None] * len(messages)
    tag, source = batch.tag, batch.source
    kept_messages: list[str | None] = []
    kept_fields: list[dict | None] = []
    for message, extra in zip(messages, fields):
        if keep_rank is not None:
            rank = level_rank(record_level_or_rule(message, extra))
            if rank is not None and rank >= keep_rank:
                kept_messages.append(message)
                kept_fields.append(extra)
                continue
        for rule in rules:
            if rule.field == "message":
                if message is None:  # a metrics sample has no message: message rules are not about it
                    continue
                if not rule.passes(message):
                    break
            elif not rule.passes(field_value(rule.field, message, extra, tag, source)):
                break
        else:
            kept_messages.append(message)
            kept_fields.append(extra)
    if len(kept_messages) == len(messages):
        return batch
    return derived(batch, messages=kept_messages, fields=None if batch.fields is None else kept_fields)


FILTER = GrepFilter
