"""Object keys of the archive (directory and S3 outputs): Hive-style partitions by default.

``dt=2026-11-29/hour=13/instance=i-0abc/app/20261129T131718Z-000001.ndjson.gz``: a query
engine (Athena, Trino, DuckDB) prunes by day, hour and instance from the key alone.
Partitions use the time the agent read the records, so an object never straddles an hour.

Every placeholder value (tag, labels, host, instance, prefix) comes from outside the template
and is made safe for one path segment: only ``A-Za-z0-9._=-`` stay, leading dots become ``_``
(no ``.``, ``..`` or hidden ``.tmp``), long values are cut with a checksum. A rendered key is
relative, has no empty, ``.`` or ``..`` segment, so it never leaves the archive root or prefix.
"""

from __future__ import annotations

import re
import time
import zlib

DEFAULT_KEY = "dt={date}/hour={hour}/instance={instance_id}/{tag}/{start}-{seq}.ndjson{ext}"
KEY_FIELDS = ("prefix", "date", "hour", "instance_id", "host", "tag", "start", "seq", "ext")
EXTENSIONS = {"gzip": ".gz", "zstd": ".zst", "none": ""}

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]")
_LEADING_DOTS = re.compile(r"^\.+")
# Characters of one value in a key (a file name may have 255 bytes; S3 keys 1,024 in all).
MAX_VALUE_CHARS = 100


def unknown_placeholder(template: str, fields) -> str | None:
    """An error text naming the first placeholder of ``template`` that is neither a field nor a label."""
    unknown = [n for n in _PLACEHOLDER.findall(template)
               if n not in fields and not re.fullmatch(r"labels\.[A-Za-z0-9_.-]+", n)]
    if unknown:
        return (f"unknown placeholder {{{unknown[0]}}} (known: "
                f"{', '.join('{' + f + '}' for f in fields)}, {{labels.NAME}})")
    return None


def check_template(template: str, fields=KEY_FIELDS) -> str | None:
    """An error text for a key template with an unknown placeholder or without {seq}; else None."""
    unknown = unknown_placeholder(template, fields)
    if unknown:
        return unknown
    if "seq" not in _PLACEHOLDER.findall(template):
        return "needs {seq}, so that two objects never get the same key"
    if template.startswith("/") or any(part.startswith(".") for part in template.split("/")):
        return "must be a relative key without '..' (and no part may start with '.')"
    return None


def check_prefix(prefix: str) -> str | None:
    """An error text for a key prefix with a '..' or hidden part; else None."""
    if any(part.startswith(".") for part in prefix.split("/")):
        return "must not have a part that starts with '.' (such as '..')"
    return None


def safe_segment(value: str) -> str:
    """``value`` as text for one segment of a key or path: never empty, '.', '..', hidden or too long."""
    text = _LEADING_DOTS.sub(lambda dots: "_" * len(dots.group()), _UNSAFE.sub("_", value))
    if len(text) > MAX_VALUE_CHARS:  # cut, and keep values that differ only past the cut apart
        text = f"{text[:MAX_VALUE_CHARS - 9]}-{zlib.crc32(value.encode('utf-8', 'surrogatepass')):08x}"
    return text or "none"


def key_values(epoch: float, tag: str, identity: dict[str, str], seq: int, compression: str,
               prefix: str = "") -> dict[str, str]:
    moment = time.gmtime(epoch)
    return {
        "prefix": prefix.strip("/"),
        "date": time.strftime("%Y-%m-%d", moment),
        "hour": time.strftime("%H", moment),
        "instance_id": identity.get("instance_id") or identity.get("host", "unknown"),
        "host": identity.get("host", "unknown"),
        "tag": tag,
        "start": time.strftime("%Y%m%dT%H%M%SZ", moment),
        "seq": f"{seq:06d}",
        "ext": EXTENSIONS[compression],
    }


def render_key(template: str, values: dict[str, str], labels: dict[str, str]) -> str:
    """Fill a template; each value is made safe for one path segment (see safe_segment)."""

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name.startswith("labels."):
            value = labels.get(name[len("labels."):], "none")
        else:
            value = values[name]
        if name == "prefix":
            return "/".join(safe_segment(part) for part in str(value).split("/") if part)
        if name == "ext":
            return value
        return safe_segment(str(value))

    # Values next to each other or to the template's text could still make '.' or '..' (".{tag}"
    # with an empty tag...): such segments never stay, whatever the template.
    parts = _PLACEHOLDER.sub(fill, template).split("/")
    return "/".join(part if part.strip(".") else "_" * len(part) for part in parts if part)


def partition_of(epoch: float) -> int:
    """The hour an epoch falls in: objects are cut when it changes."""
    return int(epoch // 3600)
