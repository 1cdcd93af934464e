"""`shipper report`: one self-contained HTML page about one instance: what the machine did (metric
charts), what its logs said (volume and errors per tag), how it ended (lifecycle events, the last
lines, the gap between the last record and the last metrics sample).

Charts are inline SVG drawn here: no script, no CDN, nothing to fetch when the page opens.
Series are reduced to at most one point per pixel column (min/max kept), so a day of 10 s
samples draws as fast as an hour. What the records can multiply is capped, in memory and on the
page: the tags charted (the busiest TOP_TAGS, the rest as one "other" series), the things per
metric (mounts, interfaces), the points per series, the lifecycle events, the length of a shown text.
"""

from __future__ import annotations

import collections
import html
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from shipper.postmortem.selection import LEVELS, level_of
from shipper.record import epoch_of

WIDTH, HEIGHT = 880, 170
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
ERROR_RANK = LEVELS.index("error")
TOP_TAGS = len(PALETTE) - 1      # tags charted one by one; the others are summed as one series
MAX_TAGS = 256                   # tags counted one by one; records of further tags count as "other"
MAX_THINGS = 16                  # mounts, interfaces, disks per metric
MAX_POINTS = 4096                # points kept per series before it is halved (min and max kept)
MAX_EVENTS = 50                  # the last lifecycle events shown
MAX_TEXT = 2000                  # characters of a message shown (the last lines, events)
MAX_FIELD = 200                  # characters of an identity field or label shown


# The charts: (title, unit, [(series label, metric name, key in a per-thing map or None)])
CHARTS = (
    ("CPU", "%", [("total", "cpu.percent", None), ("iowait", "cpu.iowait_percent", None),
                  ("steal", "cpu.steal_percent", None)]),
    ("Memory", "%", [("used", "memory.used_percent", None), ("swap used", "swap.used_percent", None)]),
    ("Load", "", [("1 min", "load.1m", None), ("5 min", "load.5m", None), ("15 min", "load.15m", None)]),
    ("Disk used", "%", [("*", "disk.used_percent", "*")]),
    ("Network", "B/s", [("in *", "network.received_bytes_per_second", "*"),
                        ("out *", "network.sent_bytes_per_second", "*")]),
    ("Disk I/O", "B/s", [("read *", "diskio.read_bytes_per_second", "*"),
                         ("write *", "diskio.write_bytes_per_second", "*")]),
)


SCALARS = frozenset(name for _, _, wanted in CHARTS for _, name, thing in wanted if thing is None)
PER_THING = frozenset(name for _, _, wanted in CHARTS for _, name, thing in wanted if thing is not None)


def clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number):
            return number
    return None


@dataclass
class Summary:
    """What the report needs, gathered in one pass over the records (no record kept but the last lines);
    its size is bounded whatever the records hold."""

    last_lines: int = 50
    metrics: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: collections.defaultdict(list))
    volume: dict[str | None, collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))   # by tag; None: the other tags
    errors: dict[str | None, collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    totals: collections.Counter = field(default_factory=collections.Counter)  # records per tag (None: other)
    events: collections.deque = field(default_factory=lambda: collections.deque(maxlen=MAX_EVENTS))
    events_seen: int = 0
    tail: collections.deque = field(default_factory=collections.deque)
    identity: dict[str, Any] = field(default_factory=dict)
    first: float | None = None
    last: float | None = None
    last_log: float | None = None
    last_metrics: float | None = None
    records: int = 0
    bucket_seconds: float = 60.0
    things: dict[str, set[str]] = field(default_factory=lambda: collections.defaultdict(set))

    def __post_init__(self) -> None:
        self.tail = collections.deque(self.tail, maxlen=self.last_lines)

    def _point(self, series: str, moment: float, value: float) -> None:
        points = self.metrics[series]
        points.append((moment, value))
        if len(points) > MAX_POINTS:  # halve the resolution: the shape survives, the size does not
            points[:] = reduce_series(points, points[0][0], points[-1][0], MAX_POINTS // 4)

    def add(self, record: dict[str, Any]) -> None:
        moment = epoch_of(record.get("time"))
        if moment is None:
            return
        self.records += 1
        self.first = moment if self.first is None else min(self.first, moment)
        self.last = moment if self.last is None else max(self.last, moment)
        for key in ("instance_id", "host", "image_id", "instance_type", "availability_zone"):
            if key in record:
                self.identity[key] = clipped(str(record[key]), MAX_FIELD)
        labels = record.get("labels")
        if isinstance(labels, dict):
            self.identity["labels"] = {clipped(str(k), MAX_FIELD): clipped(str(v), MAX_FIELD)
                                       for k, v in list(labels.items())[:50]}
        tag = clipped(str(record.get("tag", "?")), MAX_FIELD)
        sample = record.get("metrics")
        if isinstance(sample, dict):
            self.last_metrics = moment
            for name, value in sample.items():
                if name in SCALARS:
                    number = _number(value)
                    if number is not None:
                        self._point(name, moment, number)
                elif name in PER_THING and isinstance(value, dict):
                    known = self.things[name]
                    for thing, number in value.items():
                        number = _number(number)
                        if number is None or (thing not in known and len(known) >= MAX_THINGS):
                            continue
                        known.add(thing)
                        self._point(f"{name}[{thing}]", moment, number)
            return
        if tag == "lifecycle":
            self.events_seen += 1
            label = record.get("message") or record.get("event", "lifecycle")
            self.events.append((moment, clipped(str(label), MAX_TEXT)))
        self.last_log = moment
        bucket = int(moment // self.bucket_seconds) * self.bucket_seconds
        series: str | None = tag
        if tag not in self.totals and len(self.totals) >= MAX_TAGS:
            series = None
        self.totals[series] += 1
        self.volume[series][bucket] += 1
        level = level_of(record)
        if level in LEVELS and LEVELS.index(level) >= ERROR_RANK:
            self.errors[series][bucket] += 1
        message = record.get("message")
        self.tail.append((moment, tag, "" if message is None else clipped(str(message), MAX_TEXT)))


def top_series(counts: dict[str | None, collections.Counter], totals: collections.Counter,
               top: int = TOP_TAGS) -> list[tuple[str, list[tuple[float, float]]]]:
    """The ``top`` busiest tags' series, and one "other" series summing the rest (the tags beyond them
    and those counted as other from the start)."""
    ranked = sorted((tag for tag in counts if tag is not None), key=lambda tag: (-totals[tag], tag))
    shown, rest = ranked[:top], ranked[top:]
    series = [(tag, sorted(counts[tag].items())) for tag in sorted(shown)]
    if rest or None in counts:
        other: collections.Counter = collections.Counter(counts.get(None, {}))
        for tag in rest:
            other.update(counts[tag])
        series.append(("other tags", sorted(other.items())))
    return series


def bucket_for(span: float) -> float:
    """Bars of about 200 to a chart: 10 s for half an hour, 1 min for a few hours, 5 min for a day;
    never more than about 300 however long the range."""
    for seconds in (10, 60, 300, 900, 3600, 6 * 3600, 86400):
        if span / seconds <= 300:
            return float(seconds)
    return 7 * 86400.0


def summarize(records: Iterable[dict[str, Any]], last_lines: int = 50, bucket_seconds: float = 60.0) -> Summary:
    summary = Summary(last_lines=last_lines, bucket_seconds=bucket_seconds)
    for record in records:
        summary.add(record)
    return summary


def reduce_series(points: list[tuple[float, float]], t0: float, t1: float, columns: int) -> list[tuple[float, float]]:
    """At most two points (min and max, in time order) per pixel column: the shape survives, the size does not."""
    if len(points) <= 2 * columns or t1 <= t0:
        return points
    buckets: dict[int, list[tuple[float, float]]] = {}
    for t, v in points:
        column = min(columns - 1, int((t - t0) / (t1 - t0) * columns))
        low_high = buckets.get(column)
        if low_high is None:
            buckets[column] = [(t, v), (t, v)]
        else:
            if v < low_high[0][1]:
                low_high[0] = (t, v)
            if v > low_high[1][1]:
                low_high[1] = (t, v)
    reduced = []
    for column in sorted(buckets):
        low, high = buckets[column]
        reduced.extend(sorted({low, high}))
    return reduced


def _fmt(value: float, unit: str) -> str:
    if unit == "B/s":
        for suffix in ("B/s", "KB/s", "MB/s", "GB/s"):
            if abs(value) < 1000 or suffix == "GB/s":
                return f"{value:.0f} {suffix}" if suffix == "B/s" else f"{value:.1f} {suffix}"
            value /= 1000
    return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"


def _clock(epoch: float, span: float) -> str:
    return time.strftime("%H:%M" if span < 2 * 86400 else "%m-%d %H:%M", time.gmtime(epoch))


def svg_chart(title: str, unit: str, series: list[tuple[str, list[tuple[float, float]]]], t0: float, t1: float,
              events: list[tuple[float, str]], kind: str = "line", bar_seconds: float = 60.0) -> str:
    """One chart: series over [t0, t1] on a shared time axis, events as vertical lines. Nothing is
    drawn outside the plot: bars are cut to [t0, t1], values to [0, the top of the scale]."""
    left, right, top, bottom = 76, 16, 24, 22
    # The legend: next to the title, then in rows of its own above the plot when it does not fit.
    legend, row, legend_x = [], 0, left + 16 + len(title) * 8
    for index, (label, _) in enumerate(series):
        label = clipped(label, 32)
        if legend_x + 24 + len(label) * 7 > WIDTH - right and legend_x > left:
            row, legend_x = row + 1, left
        legend.append((PALETTE[index % len(PALETTE)], label, legend_x, row))
        legend_x += 24 + len(label) * 7
    top += 14 * row
    height = HEIGHT + 14 * row
    plot_w, plot_h = WIDTH - left - right, height - top - bottom
    span = max(t1 - t0, 1.0)
    values = [v for _, points in series for _, v in points]
    high = max(values, default=0.0)
    if unit == "%" and high <= 100:
        high = 100.0
    elif high > 0 and math.isfinite(high * 1.1):
        high *= 1.1
    elif not high > 0:
        high = 1.0

    def x(t: float) -> float:
        return left + (min(max(t, t0), t0 + span) - t0) / span * plot_w

    def y(v: float) -> float:
        return top + plot_h - (min(max(v, 0.0), high) / high) * plot_h

    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
             f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="15" class="title">{html.escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="plot"/>']
    for fraction in (0.0, 0.5, 1.0):
        value = high * fraction
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" class="grid"/>'
                     f'<text x="{left - 4}" y="{y(value) + 4:.1f}" class="axis" text-anchor="end">'
                     f'{html.escape(_fmt(value, unit))}</text>')
    for step in range(5):
        t = t0 + span * step / 4
        anchor = "start" if step == 0 else "end" if step == 4 else "middle"
        parts.append(f'<text x="{x(t):.1f}" y="{height - 6}" class="axis" text-anchor="{anchor}">'
                     f'{_clock(t, span)}</text>')
    drawn = list(zip(legend, series))
    if kind == "bars":  # the biggest series behind, so that the small ones stay visible
        drawn.sort(key=lambda item: -sum(v for _, v in item[1][1]))
    for (color, label, legend_x, row), (_, points) in drawn:
        if kind == "bars":
            for t, v in points:
                start, end = x(t), x(t + bar_seconds)
                if end <= start or t > t0 + span:  # wholly outside the plot
                    continue
                parts.append(f'<rect x="{start:.1f}" y="{y(v):.1f}" width="{max(1.0, end - start):.1f}" '
                             f'height="{top + plot_h - y(v):.1f}" fill="{color}" opacity="0.7"/>')
        else:
            inside = [(t, v) for t, v in points if t0 <= t <= t0 + span]
            reduced = reduce_series(sorted(inside), t0, t1, plot_w)
            if reduced:
                path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in reduced)
                parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        parts.append(f'<rect x="{legend_x}" y="{7 + 14 * row}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{legend_x + 14}" y="{16 + 14 * row}" class="legend">{html.escape(label)}</text>')
    for moment, label in events:
        if t0 <= moment <= t1:
            parts.append(f'<line x1="{x(moment):.1f}" x2="{x(moment):.1f}" y1="{top}" y2="{top + plot_h}" '
                         f'class="event"><title>{html.escape(label)}</title></line>')
    if not values:
        parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" class="axis" text-anchor="middle">'
                     f'no data</text>')
    parts.append("</svg>")
    return "".join(parts)


def _metric_series(summary: Summary, name: str, thing: str | None, label: str) -> list[tuple[str, list]]:
    if thing is None:
        points = summary.metrics.get(name)
        return [(label, points)] if points else []
    found = []
    for key, points in sorted(summary.metrics.items()):
        if key.startswith(f"{name}[") and key.endswith("]") and any(v for _, v in points):
            found.append((label.replace("*", key[len(name) + 1:-1]), points))
    return found[:6]


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:940px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:2px 10px 2px 0;text-align:left;vertical-align:top}
.chart{display:block;margin:6px 0}.plot{fill:#fafafa;stroke:#ccc}.grid{stroke:#e6e6e6}
.axis{font-size:11px;fill:#666}.title{font-size:13px;font-weight:600}.legend{font-size:11px}
.event{stroke:#d62728;stroke-width:2;stroke-dasharray:4 3}
pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:12px;max-height:600px}
.warn{color:#b00;font-weight:600}
"""


def render_html(summary: Summary, source: str, since: float, until: float) -> str:
    ident = summary.identity
    who = ident.get("instance_id") or ident.get("host") or "unknown instance"
    if summary.first is None:
        t0, t1 = since, until
    else:
        t0, t1 = summary.first, max(summary.last or summary.first, summary.first + 60)
    events = list(summary.events)
    hidden = summary.events_seen - len(summary.events)
    if summary.first is not None:
        events.insert(0, (summary.first, "first record"))
    if summary.last is not None:
        events.append((summary.last, "last record"))
    rows = [("instance", ident.get("instance_id", "-")), ("host", ident.get("host", "-")),
            ("image", ident.get("image_id", "-")), ("type", ident.get("instance_type", "-")),
            ("zone", ident.get("availability_zone", "-")),
            ("labels", ", ".join(f"{k}={v}" for k, v in sorted((ident.get("labels") or {}).items())) or "-"),
            ("source", source), ("records", f"{summary.records:,}")]
    out = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
           f"<title>shipper report: {html.escape(who)}</title><style>{STYLE}</style></head><body>",
           f"<h1>{html.escape(who)}</h1>",
           "<table>" + "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows) + "</table>",
           "<h2>How it ended</h2><table>"]
    stamp = lambda t: time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))  # noqa: E731
    if hidden > 0:
        out.append(f"<tr><td></td><td>({hidden:,} earlier lifecycle events not shown)</td></tr>")
    for moment, label in events:
        out.append(f"<tr><td>{stamp(moment)}</td><td>{html.escape(label)}</td></tr>")
    out.append("</table>")
    if summary.last_log is not None and summary.last_metrics is not None:
        gap = summary.last_metrics - summary.last_log
        out.append(f"<p>Last log record {stamp(summary.last_log)}, last metrics sample {stamp(summary.last_metrics)}: "
                   f"the logs went quiet <b>{abs(gap):.0f} s {'before' if gap >= 0 else 'after'}</b> the metrics.</p>")
    elif summary.last_metrics is None:
        out.append('<p class="warn">No metrics samples in this range.</p>')
    out.append("<h2>The machine</h2>")
    for title, unit, wanted in CHARTS:
        series = [s for label, name, thing in wanted for s in _metric_series(summary, name, thing, label)]
        out.append(svg_chart(title, unit, series, t0, t1, events))
    out.append("<h2>The logs</h2>")
    volume = top_series(summary.volume, summary.totals)
    out.append(svg_chart(f"Records per {summary.bucket_seconds:.0f} s, per tag", "", volume, t0, t1, events, "bars",
                         summary.bucket_seconds))
    errors = top_series(summary.errors, summary.totals)
    out.append(svg_chart(f"Errors (level error or worse) per {summary.bucket_seconds:.0f} s", "", errors, t0, t1,
                         events, "bars", summary.bucket_seconds))
    out.append(f"<h2>The last {len(summary.tail)} lines</h2><pre>")
    out.extend(f"{time.strftime('%H:%M:%S', time.gmtime(t))} [{html.escape(tag)}] {html.escape(message)}\n"
               for t, tag, message in summary.tail)
    out.append("</pre></body></html>\n")
    return "".join(out)
