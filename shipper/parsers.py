"""Line parsers (none, json, logfmt, regex) and event-time extraction.

A parser turns one message into the record's extra fields. A message that does not parse
is never dropped: it is shipped raw with ``"parse_error": true``.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Callable

import orjson

from shipper.record import END_EPOCH, MIN_EPOCH, PARSE_ERROR, PARSED, TIME, TIME_ERROR, format_time

PARSERS = ("none", "json", "logfmt", "regex")

_LOGFMT_PAIR = re.compile(r'([^\s=]+)(?:=("(?:[^"\\]|\\.)*"|[^\s]*))?')
_LOGFMT_ESCAPES = re.compile(r"\\(.)")


def parse_logfmt(line: str) -> dict[str, Any] | None:
    """``key=value key2="quoted value" flag`` -> dict; None when the line holds no key=value pair."""
    fields: dict[str, Any] = {}
    has_pair = False
    for match in _LOGFMT_PAIR.finditer(line):
        key, value = match.group(1), match.group(2)
        if value is None:
            if "=" in key or '"' in key:
                return None
            fields[key] = True
            continue
        has_pair = True
        if value.startswith('"'):
            value = _LOGFMT_ESCAPES.sub(r"\1", value[1:-1])
        fields[key] = value
    return fields if has_pair else None


def parse_json(line: str) -> dict[str, Any] | None:
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def make_regex_parser(pattern: str, max_chars: int = 16 * 1024) -> Callable[[str], dict[str, Any] | None]:
    """The parse function of a configured pattern. It sees at most the first ``max_chars`` characters
    of a line (``$`` matches there): a pattern that backtracks then costs a bounded time per line.

    ``.`` matches newlines too (DOTALL), so that a pattern written for one line also parses a joined
    multi-line event (a traceback): ``(?P<msg>.*)$`` takes the whole event, not nothing.
    ``(?-s:...)`` turns it off for a part of the pattern."""
    compiled = re.compile(pattern, re.DOTALL)
    if not compiled.groupindex:
        raise ValueError("the pattern has no named group (?P<name>...)")

    def parse(line: str) -> dict[str, Any] | None:
        match = compiled.search(line, 0, max_chars)
        if match is None:
            return None
        return {k: v for k, v in match.groupdict().items() if v is not None}

    return parse


def make_parser(name: str, pattern: str | None = None) -> Callable[[str], dict[str, Any] | None] | None:
    """The parse function for a parser name; None for ``none``."""
    if name == "none":
        return None
    if name == "json":
        return parse_json
    if name == "logfmt":
        return parse_logfmt
    if name == "regex":
        if not pattern:
            raise ValueError("parser regex needs a pattern")
        return make_regex_parser(pattern)
    raise ValueError(f"unknown parser {name!r}")


def parse_time(value: Any, time_format: str) -> str | None:
    """An event time from a parsed field -> RFC 3339 UTC; None when it cannot be understood.

    time_format: ``auto`` (ISO 8601 text or epoch seconds/milliseconds), ``epoch``,
    ``epoch_ms``, or a ``strptime`` format (a time without zone is taken as UTC).
    """
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
            if time_format == "epoch_ms" or (time_format == "auto" and seconds > 1e11):
                seconds /= 1000.0
            return _in_range(seconds)
        if not isinstance(value, str):
            return None
        if time_format in ("auto", "epoch", "epoch_ms"):
            try:
                number = float(value)
            except ValueError:
                if time_format != "auto":
                    return None
                moment = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
            else:
                return parse_time(number, "epoch_ms" if time_format == "epoch_ms" else "auto")
        else:
            moment = datetime.strptime(value, time_format)
    except (ValueError, OverflowError, OSError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return _in_range(moment.timestamp())


def _in_range(seconds: float) -> str | None:
    """RFC 3339 for a time a record can carry; None for one before 1970, after 9999 or not a number
    (the record then keeps its read time and says ``time_error``)."""
    if not MIN_EPOCH <= seconds < END_EPOCH:
        return None
    return format_time(seconds)


class LineParser:
    """Applies one input's parser and time extraction to messages, producing extra fields."""

    def __init__(self, name: str, pattern: str | None = None, time_key: str | None = None,
                 time_format: str = "auto"):
        self.parse = make_parser(name, pattern)
        self.time_key = time_key
        self.time_format = time_format
        self.time_errors = 0

    @property
    def is_noop(self) -> bool:
        return self.parse is None

    def fields_for(self, message: str) -> dict[str, Any]:
        """Extra record fields for one message: parsed values (under PARSED, their own namespace),
        event time, or parse_error."""
        parsed = self.parse(message) if self.parse else None
        if parsed is None:
            return {PARSE_ERROR: True}
        extra: dict[str, Any] = {PARSED: parsed}
        if self.time_key and self.time_key in parsed:
            event_time = parse_time(parsed[self.time_key], self.time_format)
            if event_time is None:
                self.time_errors += 1
                extra[TIME_ERROR] = True
            else:
                del parsed[self.time_key]
                extra[TIME] = event_time
        return extra
