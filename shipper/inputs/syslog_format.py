"""Syslog messages as daemons send them: RFC 5424, RFC 3164 (BSD) and its common variants, and the
two TCP framings of RFC 6587 (octet counting, newline). Pure functions; the syslog input's sockets
are elsewhere.

A message becomes a :class:`SyslogMessage`: the event time from the message (RFC 3164 has no year:
the year that puts it nearest before the receive time, with a day of slack for clock skew), facility
and severity by name, host, app name, pid, message id and structured data as fields. Anything that
is not syslog at all (no ``<PRI>``) is kept whole as the message, flagged, never dropped.
"""

from __future__ import annotations

import calendar
import functools
import re
import time
from dataclasses import dataclass, field
from typing import Any

FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
              "ftp", "ntp", "security", "console", "solaris-cron", "local0", "local1", "local2", "local3",
              "local4", "local5", "local6", "local7")
# The severities, as the journald input names its priorities (shipper.inputs.journald.PRIORITIES).
SEVERITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
MAX_PRI = 191
BOM = "\ufeff"
NIL = "-"

_MONTHS = {name: number for number, name in enumerate(calendar.month_abbr) if name}
# "Mar  1 12:00:00" or "Mar 01 12:00:00.123" (rsyslog's high precision in BSD format)
_BSD_TIME = re.compile(r"([A-Z][a-z]{2}) ([ 0-9]\d) (\d\d):(\d\d):(\d\d)(\.\d+)? ")
_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d) ?")
# A BSD tag: "app[123]:" or "app:" (up to 48 characters of a program name, no spaces).
_TAG = re.compile(r"([^\s\[\]:]{1,48})(?:\[([^\]\s]{1,32})\])?: ?")
_SD_PARAM = re.compile(r' ([^\s="\]]{1,32})="((?:[^"\\\]]|\\.)*)"')


class FramingError(ValueError):
    """A TCP stream that is not syslog framing (its connection is closed and counted)."""


@dataclass
class SyslogMessage:
    message: str
    time: float | None = None             # the event time (epoch seconds), None when the message has none
    fields: dict[str, Any] = field(default_factory=dict)
    malformed: bool = False                # no <PRI> (or an impossible one): the raw text is the message


def parse(raw: str, received: float | None = None) -> SyslogMessage:
    """One syslog message (without its framing), RFC 5424 or RFC 3164, told apart by the version
    digit after ``<PRI>``."""
    received = time.time() if received is None else received
    if not raw.startswith("<"):
        return SyslogMessage(raw, malformed=True)
    end = raw.find(">", 1, 5)
    digits = raw[1:end] if end > 0 else ""
    if not digits.isdigit() or int(digits) > MAX_PRI or (len(digits) > 1 and digits[0] == "0"):
        return SyslogMessage(raw, malformed=True)
    pri = int(digits)
    fields: dict[str, Any] = {"facility": FACILITIES[pri >> 3], "severity": SEVERITIES[pri & 7]}
    rest = raw[end + 1:]
    if rest[:2] == "1 ":
        return _rfc5424(rest[2:], fields)
    return _rfc3164(rest, fields, received)


def _nil(value: str) -> str | None:
    return None if value == NIL else value


def _rfc5424(rest: str, fields: dict[str, Any]) -> SyslogMessage:
    # TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA [MSG]
    parts = rest.split(" ", 5)
    if len(parts) < 6:
        parts += [NIL] * (6 - len(parts))
    stamp, host, app, procid, msgid, tail = parts
    moment = None
    if stamp != NIL:
        match = _RFC3339.fullmatch(stamp)
        if match is None:
            fields["time_invalid"] = stamp
        else:
            moment = _rfc3339_seconds(match)
    for key, value in (("host", host), ("app_name", app), ("msgid", msgid)):
        if _nil(value) is not None:
            fields[key] = value
    if _nil(procid) is not None:
        fields["pid"] = int(procid) if procid.isdigit() else procid
    data, message = _structured_data(tail)
    if data:
        fields["structured_data"] = data
    if message.startswith(BOM):
        message = message[1:]
    return SyslogMessage(message, moment, fields)


def _structured_data(tail: str) -> tuple[dict[str, dict[str, str]], str]:
    """``[id k="v" ...][id2 ...] MSG`` or ``- MSG`` -> ({id: {k: v}}, MSG). A broken element ends the
    structured data: the rest is the message, as it came."""
    if tail.startswith(NIL):
        return {}, tail[2:] if tail[1:2] == " " else tail[1:]
    data: dict[str, dict[str, str]] = {}
    at = 0
    while tail.startswith("[", at):
        name_end = at + 1
        while name_end < len(tail) and tail[name_end] not in ' ]':
            name_end += 1
        name = tail[at + 1:name_end]
        params: dict[str, str] = {}
        position = name_end
        while True:
            match = _SD_PARAM.match(tail, position)
            if match is None:
                break
            params[match.group(1)] = re.sub(r'\\(["\\\]])', r"\1", match.group(2))
            position = match.end()
        if not name or not tail.startswith("]", position):
            return data, tail[at:]
        data[name] = params
        at = position + 1
    return data, tail[at + 1:] if tail[at:at + 1] == " " else tail[at:]


def _rfc3339_seconds(match: re.Match) -> float:
    fraction_text, zone = match.group(7, 8)
    fraction = float(fraction_text) if fraction_text else 0.0
    start = match.start(1)  # the year
    offset = 0
    if zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        offset = sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return _whole_seconds(match.string[start:start + 19]) + fraction - offset


@functools.lru_cache(maxsize=256)
def _whole_seconds(date_time: str) -> int:
    """``YYYY-MM-DDTHH:MM:SS`` as _RFC3339 matched it -> seconds since the epoch (UTC). Kept: a
    stream's messages mostly share their second, and timegm is most of a message's parse."""
    return calendar.timegm((int(date_time[:4]), int(date_time[5:7]), int(date_time[8:10]),
                            int(date_time[11:13]), int(date_time[14:16]), int(date_time[17:19])))


def _bsd_seconds(match: re.Match, received: float) -> float | None:
    """A BSD time (no year, local time of the sender, taken as UTC): the year that puts it nearest
    before the receive time, allowing a day in the future for clock skew."""
    month = _MONTHS.get(match.group(1))
    if month is None:
        return None
    day, hour, minute, second = int(match.group(2)), int(match.group(3)), int(match.group(4)), int(match.group(5))
    fraction = float(match.group(6)) if match.group(6) else 0.0
    year = time.gmtime(received).tm_year
    for candidate in (year + 1, year, year - 1):
        try:
            moment = calendar.timegm((candidate, month, day, hour, minute, second)) + fraction
        except ValueError:
            continue
        if day > calendar.monthrange(candidate, month)[1]:
            continue  # Feb 29 of a year that has none
        if moment <= received + 86_400:
            return moment
    return None


def _rfc3164(rest: str, fields: dict[str, Any], received: float) -> SyslogMessage:
    """``Mmm dd hh:mm:ss HOST TAG[PID]: MSG``, also with an RFC 3339 time (rsyslog), without a host
    (what glibc's syslog(3) writes to /dev/log), or without a time at all."""
    moment = None
    match = _BSD_TIME.match(rest) or _RFC3339.match(rest)
    if match is not None:
        moment = _bsd_seconds(match, received) if match.re is _BSD_TIME else _rfc3339_seconds(match)
        rest = rest[match.end():]
    # The token after the time is the host unless it is already the tag ("app[1]:" / "app:").
    first, _, after = rest.partition(" ")
    if match is not None and first and not _TAG.fullmatch(first + " ") and not first.endswith(":") and after:
        fields["host"] = first
        rest = after
    tag = _TAG.match(rest)
    if tag is not None:
        fields["app_name"] = tag.group(1)
        if tag.group(2) is not None:
            fields["pid"] = int(tag.group(2)) if tag.group(2).isdigit() else tag.group(2)
        rest = rest[tag.end():]
    return SyslogMessage(rest, moment, fields)


class OctetOrLineFramer:
    """A TCP stream's messages (RFC 6587): octet counting (``LEN SP MSG``) when a frame starts with a
    digit, else one message per line (LF, an optional CR before it dropped). ``max_bytes`` bounds a
    message: a longer count is a :class:`FramingError`; a longer line is cut there and said so."""

    def __init__(self, max_bytes: int = 64 * 1024):
        self.max_bytes = max_bytes
        self.buffer = b""
        self.skipping = False   # in the rest of a line that was cut at max_bytes

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """The complete messages in what has arrived so far: (message, cut)."""
        buffer = self.buffer + data
        if self.skipping:
            newline = buffer.find(b"\n")
            if newline < 0:
                self.buffer = b""
                return []
            buffer = buffer[newline + 1:]
            self.skipping = False
        out: list[tuple[bytes, bool]] = []
        at = 0
        while at < len(buffer):
            if buffer[at:at + 1].isdigit():
                space = buffer.find(b" ", at, at + 11)
                if space < 0:
                    if len(buffer) - at > 10:
                        raise FramingError(f"octet count without its space: {bytes(buffer[at:at + 12])!r}")
                    break
                count_text = buffer[at:space]
                if not count_text.isdigit():
                    raise FramingError(f"octet count is not a number: {bytes(count_text)!r}")
                count = int(count_text)
                if count > self.max_bytes:
                    raise FramingError(f"a {count}-byte message is over the limit of {self.max_bytes}")
                if len(buffer) < space + 1 + count:
                    break
                out.append((buffer[space + 1:space + 1 + count], False))
                at = space + 1 + count
                continue
            newline = buffer.find(b"\n", at, at + self.max_bytes + 1)
            if newline < 0:
                if len(buffer) - at > self.max_bytes:
                    out.append((buffer[at:at + self.max_bytes], True))
                    self.buffer = b""
                    self.skipping = True  # the rest of the line, up to its newline, is dropped
                    return out
                break
            line = buffer[at:newline]
            if line.endswith(b"\r"):
                line = line[:-1]
            if line:
                out.append((line, False))
            at = newline + 1
        self.buffer = buffer[at:]
        return out
