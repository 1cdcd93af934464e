"""`shipper status`: the running agent's /status document as a table a person reads at a glance.

The rates are the agent's own, over its last minute (see shipper.server.CounterHistory): one
fetch, no wait, and an input that samples every 10 s shows its 0.1/s. ``--interval N`` measures
them here instead, between two fetches N seconds apart.
"""

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


def per_second(value: float | None) -> str:
    """A rate as a person reads it: 4100/s, 41/s, 4.1/s, 0.11/s, 0.017/s; "-" when unknown."""
    if value is None:
        return "-"
    if value >= 10 or value == 0:
        return f"{value:.0f}/s"
    if value >= 1:
        return f"{value:.1f}/s"
    return f"{value:.2g}/s" if value >= 0.001 else "<0.001/s"  # two digits: 0.1/s of a 10 s sampler


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def rates_note(document: dict[str, Any], seconds: float | None) -> str:
    """Over what the rates were measured."""
    if seconds is not None:
        return f"rates over {seconds:g}s"
    rates = document.get("rates")
    if not rates:  # an agent from before rates were kept: still running the old version
        return "rates unknown (this agent keeps none: restart it, or use --interval 10)"
    window = _age(rates["window_seconds"])
    return f"rates over the {window} since the start" if rates["since_start"] else f"rates over the last {window}"


def _filter_lines(document: dict[str, Any]) -> list[str]:
    """Records the filters dropped, by filter, input and reason (filtered, sampled, throttled,
    filter_error), and the filters' errors; nothing when no filter dropped or failed."""
    totals: dict[tuple[str, str, str], float] = {}
    for series in document["counters"].get("records_dropped", []):
        labels = series["labels"]
        if "filter" in labels:
            key = (labels["filter"], labels.get("input", ""), labels.get("reason", ""))
            totals[key] = totals.get(key, 0) + series["value"]
    errors = {s["labels"].get("filter", ""): s["value"] for s in document["counters"].get("filter_errors", [])}
    if not totals and not errors:
        return []
    rows = []
    for (name, tag, reason), value in sorted(totals.items()):
        failed = errors.pop(name, None)  # shown once, on the filter's first row
        rows.append([name, tag, reason, f"{value:.0f}", "" if failed is None else f"{failed:.0f}"])
    rows += [[name, "", "", "0", f"{value:.0f}"] for name, value in sorted(errors.items())]
    return ["", *_table(["FILTER", "INPUT", "REASON", "DROPPED", "ERRORS"], rows)]


def render_status(document: dict[str, Any], previous: dict[str, Any] | None = None,
                  seconds: float | None = None) -> str:
    """The /status document as the table. Rates are the agent's (over its last minute), or, given
    ``previous`` fetched ``seconds`` earlier, the difference between the two."""
    def rate(item: dict[str, Any], name: str, **labels: str) -> str:
        if previous is not None and seconds:
            return per_second(max(0.0, counter(document, name, **labels) - counter(previous, name, **labels))
                              / seconds)
        return per_second(item.get("records_per_second"))

    identity = document["identity"]
    who = identity.get("instance_id") or identity.get("host", "?")
    health = "healthy" if document["healthy"] else "UNHEALTHY"
    lines = [f"shipper {document['version']} on {who}: {health}, up {_age(document['uptime_seconds'])}"
             + (f", {plural(document['reloads'], 'reload')}" if document["reloads"] else "")
             + f"; {rates_note(document, seconds if previous is not None else None)}"]
    if document.get("lifecycle"):
        lines.append(f"  {document['lifecycle']}")
    lines.append("")
    rows = []
    for item in document["inputs"]:
        name = item["name"]
        lag = sum(item["lag"].values())
        rows.append([name, item["type"], rate(item, "records_in", input=name),
                     f"{counter(document, 'records_in', input=name):.0f}",
                     f"{plural(len(item['lag']), 'file')}, lag {_size(lag)}" if item["lag"] else ""])
    lines += _table(["INPUT", "TYPE", "RECORDS", "TOTAL", "FILES"], rows)
    lines.append("")
    rows = []
    for item in document["outputs"]:
        name = item["name"]
        dropped = counter(document, "records_dropped", output=name)
        rows.append([name, "ok" if not item["problem"] else "UNHEALTHY", rate(item, "records_out", output=name),
                     f"{counter(document, 'records_out', output=name):.0f}", f"{dropped:.0f}",
                     f"{counter(document, 'retries', output=name):.0f}", _size(item["buffered_bytes"]),
                     _age(item["oldest_unsent_age"])])
    lines += _table(["OUTPUT", "HEALTH", "RECORDS", "TOTAL", "DROPPED", "RETRIES", "BUFFER", "OLDEST UNSENT"], rows)
    lines += _filter_lines(document)
    problems = [f"  {item['name']}: {item['problem']}" for item in document["outputs"] if item["problem"]]
    if problems:
        lines += ["", "problems:", *problems]
    return "\n".join(lines)
