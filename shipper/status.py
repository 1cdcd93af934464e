"""`shipper status`: the running agent's /status document as a table a person reads at a glance."""

from __future__ import annotations

from typing import Any

import orjson

from shipper.config import redact_urls


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """The agent's /status document; OSError (its message without URL credentials) when there is none."""
    import urllib.error
    import urllib.request

    shown = redact_urls(url)
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/status", timeout=timeout) as response:
            document = orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise OSError(f"HTTP {exc.code} from {shown}/status") from None
    except orjson.JSONDecodeError:
        raise OSError(f"{shown}/status did not answer with the agent's JSON: is it shipper?") from None
    if not isinstance(document, dict) or "outputs" not in document:
        raise OSError(f"{shown}/status did not answer with the agent's JSON: is it shipper?")
    return document


def counter(document: dict[str, Any], name: str, **labels: str) -> float:
    """The sum of a counter over the series whose labels include ``labels``."""
    return sum(series["value"] for series in document["counters"].get(name, [])
               if all(series["labels"].get(k) == v for k, v in labels.items()))


def _size(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return lines


def render_status(first: dict[str, Any], second: dict[str, Any], seconds: float) -> str:
    """Two /status documents ``seconds`` apart -> the table (rates are their difference)."""
    def rate(name: str, **labels: str) -> str:
        return f"{(counter(second, name, **labels) - counter(first, name, **labels)) / seconds:.0f}/s"

    identity = second["identity"]
    who = identity.get("instance_id") or identity.get("host", "?")
    health = "healthy" if second["healthy"] else "UNHEALTHY"
    lines = [f"shipper {second['version']} on {who}: {health}, up {_age(second['uptime_seconds'])}"
             + (f", {second['reloads']} reloads" if second["reloads"] else "")]
    if second.get("lifecycle"):
        lines.append(f"  {second['lifecycle']}")
    lines.append("")
    rows = []
    for item in second["inputs"]:
        name = item["name"]
        lag = sum(item["lag"].values())
        rows.append([name, item["type"], rate("records_in", input=name), f"{counter(second, 'records_in', input=name):.0f}",
                     f"{len(item['lag'])} files, lag {_size(lag)}" if item["lag"] else ""])
    lines += _table(["INPUT", "TYPE", "RECORDS", "TOTAL", "FILES"], rows)
    lines.append("")
    rows = []
    for item in second["outputs"]:
        name = item["name"]
        dropped = counter(second, "records_dropped", output=name)
        rows.append([name, "ok" if not item["problem"] else "UNHEALTHY", rate("records_out", output=name),
                     f"{counter(second, 'records_out', output=name):.0f}", f"{dropped:.0f}",
                     f"{counter(second, 'retries', output=name):.0f}", _size(item["buffered_bytes"]),
                     _age(item["oldest_unsent_age"])])
    lines += _table(["OUTPUT", "HEALTH", "RECORDS", "TOTAL", "DROPPED", "RETRIES", "BUFFER", "OLDEST UNSENT"], rows)
    problems = [f"  {item['name']}: {item['problem']}" for item in second["outputs"] if item["problem"]]
    if problems:
        lines += ["", "problems:", *problems]
    return "\n".join(lines)
