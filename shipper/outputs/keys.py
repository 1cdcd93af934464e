"""Object keys of the archive (directory and S3 outputs): Hive-style partitions by default.

``dt=2026-11-29/hour=13/instance=i-0abc/app/20261129T131718Z-000001.ndjson.gz``: a query
engine (Athena, Trino, DuckDB) prunes by day, hour and instance from the key alone.
Partitions use the time the agent read the records, so an object never straddles an hour.
"""

from __future__ import annotations

import re
import time

DEFAULT_KEY = "dt={date}/hour={hour}/instance={instance_id}/{tag}/{start}-{seq}.ndjson{ext}"
KEY_FIELDS = ("prefix", "date", "hour", "instance_id", "host", "tag", "start", "seq", "ext")
EXTENSIONS = {"gzip": ".gz", "zstd": ".zst", "none": ""}

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]")


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
    if template.startswith("/") or ".." in template.split("/"):
        return "must be a relative key without '..'"
    return None


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
    """Fill a template; each value is made safe for one path segment (no '/', no spaces)."""

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name.startswith("labels."):
            value = labels.get(name[len("labels."):], "none")
        else:
            value = values[name]
        if name == "prefix":
            return "/".join(_UNSAFE.sub("_", part) for part in value.split("/") if part)
        if name == "ext":
            return value
        return _UNSAFE.sub("_", value) or "none"

    return re.sub(r"/+", "/", _PLACEHOLDER.sub(fill, template)).lstrip("/")


def partition_of(epoch: float) -> int:
    """The hour an epoch falls in: objects are cut when it changes."""
    return int(epoch // 3600)
