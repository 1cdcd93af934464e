"""`shipper report`: one self-contained HTML page about one instance, to answer "why did it die?"
in one look: how it ended (termination notice, first error, last log record, last metrics
sample), the machine at the end (memory, swap, disk, load, CPU, the top processes), the most
frequent error and warning patterns (over the range and the last 5 minutes), records per tag and
errors and warnings per level on the instance's own time axis, the metric charts, and the last
lines, newest at the bottom, each pattern linked to its lines.

Charts are inline SVG (shipper.postmortem.charts): no script, no CDN, nothing to fetch when the
page opens. One pass over the records; what they can multiply is capped, in memory and on the
page: the tags counted and charted, the things per metric, the points per series, the buckets
per series (counted at a fine resolution that coarsens as the covered span grows, then merged
into the bars the span calls for), the lifecycle events, the patterns, the length of a text.
"""

from __future__ import annotations

import collections
import html
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from shipper.postmortem.charts import (HEIGHT, MARKER_KINDS, PALETTE, WIDTH, Marker, clipped, reduce_series,
                                       svg_chart, time_ticks, value_ticks)
from shipper.postmortem.patterns import Pattern, PatternMiner
from shipper.postmortem.selection import level_of
from shipper.record import epoch_of

__all__ = ["Summary", "summarize", "render_html", "bucket_for", "top_series", "svg_chart", "reduce_series",
           "WIDTH", "HEIGHT", "time_ticks", "value_ticks"]

TOP_TAGS = len(PALETTE) - 1      # tags charted one by one; the others are summed as one series
MAX_TAGS = 64                    # tags counted one by one; records of further tags count as "other"
MAX_THINGS = 16                  # mounts, interfaces, disks per metric
MAX_POINTS = 4096                # points kept per series before it is halved (min and max kept)
MAX_EVENTS = 50                  # the last lifecycle events shown
MAX_TEXT = 2000                  # characters of a message shown (the last lines, events)
MAX_FIELD = 200                  # characters of an identity field or label shown
MAX_BARS = 150                   # bars per chart at most: the bucket is the smallest round one that fits
STORE_BUCKETS = 1200             # buckets per series in memory at most, whatever the span
TOP_PATTERNS = 10
RECENT = 300.0                   # "the last 5 minutes before the end"
TOP_PROCESSES = 12

# Bar sizes (seconds) to choose from, and the resolutions counted at (each divides the next, and
# every one divides the bar sizes a span that needs it can get: the bars merge whole buckets).
BUCKETS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
           2 * 86400, 7 * 86400)
RESOLUTIONS = (1, 10, 60, 300, 900, 3600, 21600, 86400, 7 * 86400)

# Levels (selection.level_of's names, the level filter's and aliases) -> the errors chart's series.
SEVERITY = {"warning": "warning", "warn": "warning",
            "error": "error", "err": "error",
            "critical": "critical", "crit": "critical", "alert": "critical", "emergency": "critical",
            "emerg": "critical", "fatal": "critical", "panic": "critical"}
SEVERITIES = ("warning", "error", "critical")          # stacked bottom to top
SEVERITY_LABELS = {"warning": "warning", "error": "error", "critical": "critical or worse"}
SEVERITY_COLORS = ["#f2b01e", "#d62728", "#6b0d0d"]
ERRORS = frozenset(("error", "critical"))

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
IDENTITY = ("instance_id", "host", "image_id", "instance_type", "availability_zone")


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number):
            return number
    return None


def bucket_for(span: float, resolution: float = 1.0) -> float:
    """The bar size for a chart of ``span`` seconds: the smallest round size (BUCKETS) of at most
    MAX_BARS bars that is a multiple of the ``resolution`` the records were counted at.
    7 minutes: 5 s; an hour: 30 s; a day: 10 min; 30 days: 6 h."""
    for seconds in BUCKETS:
        if seconds % resolution == 0 and span / seconds <= MAX_BARS:
            return float(seconds)
    week = 7 * 86400
    return float(week * max(1, math.ceil(span / MAX_BARS / week)))


def rebucket(counts: collections.Counter, seconds: float) -> collections.Counter:
    """Counts per bucket start merged into buckets of ``seconds`` (a multiple of theirs)."""
    merged: collections.Counter = collections.Counter()
    for start, count in counts.items():
        merged[math.floor(start / seconds) * seconds] += count
    return merged


@dataclass
class Summary:
    """What the report needs, gathered in one pass over the records (no record kept but the last
    lines, the last metrics sample and the patterns' examples); bounded whatever the records hold."""

    last_lines: int = 50
    metrics: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: collections.defaultdict(list))
    volume: dict[str | None, collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))   # by tag; None: the other tags
    levels: dict[str, collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))   # by SEVERITIES
    totals: collections.Counter = field(default_factory=collections.Counter)  # records per tag (None: other)
    severities: collections.Counter = field(default_factory=collections.Counter)
    events: collections.deque = field(default_factory=lambda: collections.deque(maxlen=MAX_EVENTS))
    events_seen: int = 0
    tail: collections.deque = field(default_factory=collections.deque)  # (time, tag, message, severity, anchor)
    identity: dict[str, Any] = field(default_factory=dict)
    first: float | None = None
    last: float | None = None
    last_log: float | None = None
    last_metrics: float | None = None
    last_sample: dict[str, Any] | None = None
    termination: tuple[float, str] | None = None
    first_error: tuple[float, str, str] | None = None   # (time, tag, message)
    records: int = 0
    resolution: float = 1.0    # the buckets' size in memory (coarsens as the span grows)
    things: dict[str, set[str]] = field(default_factory=lambda: collections.defaultdict(set))
    miner: PatternMiner = field(default_factory=PatternMiner)
    _labels: Any = None
    _unknown: list[str] = field(default_factory=lambda: list(IDENTITY))

    def __post_init__(self) -> None:
        self.tail = collections.deque(self.tail, maxlen=self.last_lines)

    @property
    def bucket_seconds(self) -> float:  # the bars of the records' own span
        return bucket_for(self.span(), self.resolution)

    def span(self) -> float:
        return 0.0 if self.first is None else self.last - self.first

    def _point(self, series: str, moment: float, value: float) -> None:
        points = self.metrics[series]
        points.append((moment, value))
        if len(points) > MAX_POINTS:  # halve the resolution: the shape survives, the size does not
            points.sort()
            points[:] = reduce_series(points, points[0][0], points[-1][0], MAX_POINTS // 4)

    def _coarsen(self) -> None:
        """The span outgrew STORE_BUCKETS buckets: count in the next resolution, merging what was counted."""
        while self.span() > STORE_BUCKETS * self.resolution and self.resolution < RESOLUTIONS[-1]:
            self.resolution = float(next(r for r in RESOLUTIONS if r > self.resolution))
        for table in (self.volume, self.levels):
            for key in list(table):
                table[key] = rebucket(table[key], self.resolution)

    def add(self, record: dict[str, Any]) -> None:
        moment = epoch_of(record.get("time"))
        if moment is None:
            return
        self.records += 1
        if self.first is None:
            self.first = self.last = moment
        elif moment > self.last or moment < self.first:
            self.first, self.last = min(self.first, moment), max(self.last, moment)
            if self.last - self.first > STORE_BUCKETS * self.resolution:
                self._coarsen()
        if self._unknown:  # identity fields not seen yet (usually none after the first record)
            for key in [k for k in self._unknown if record.get(k) is not None]:
                self.identity[key] = clipped(str(record[key]), MAX_FIELD)
                self._unknown.remove(key)
        labels = record.get("labels")
        if isinstance(labels, dict) and labels != self._labels:
            self._labels = labels
            self.identity["labels"] = {clipped(str(k), MAX_FIELD): clipped(str(v), MAX_FIELD)
                                       for k, v in list(labels.items())[:50]}
        tag = record.get("tag", "?")
        tag = tag if isinstance(tag, str) and len(tag) <= MAX_FIELD else clipped(str(tag), MAX_FIELD)
        sample = record.get("metrics")
        if isinstance(sample, dict):
            if self.last_metrics is None or moment >= self.last_metrics:
                self.last_metrics, self.last_sample = moment, sample
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
        message = record.get("message")
        text = "" if message is None else message if isinstance(message, str) else str(message)
        if tag == "lifecycle":
            self.events_seen += 1
            label = clipped(str(message or record.get("event", "lifecycle")), MAX_TEXT)
            self.events.append((moment, label))
            if record.get("event") == "termination_notice" and (self.termination is None
                                                                 or moment < self.termination[0]):
                self.termination = (moment, label)
        if self.last_log is None or moment > self.last_log:
            self.last_log = moment
        bucket = moment // self.resolution * self.resolution
        series: str | None = tag
        if tag not in self.totals and len(self.totals) >= MAX_TAGS:
            series = None
        self.totals[series] += 1
        self.volume[series][bucket] += 1
        level = level_of(record)
        severity = SEVERITY.get(level)  # type: ignore[arg-type]
        anchor = None
        if severity is not None:
            self.severities[severity] += 1
            self.levels[severity][bucket] += 1
            if severity in ERRORS and (self.first_error is None or moment < self.first_error[0]):
                self.first_error = (moment, tag, clipped(text, MAX_TEXT))
            if text:
                anchor = self.miner.add(record, text, level, moment)
        self.tail.append((moment, tag, clipped(text, MAX_TEXT), severity, anchor))


def summarize(records: Iterable[dict[str, Any]], last_lines: int = 50, bucket_seconds: float | None = None) -> Summary:
    """One pass over the records. (``bucket_seconds`` is ignored: the bars are chosen from the span
    the records cover, or the range asked for, when the page is drawn.)"""
    summary = Summary(last_lines=last_lines)
    add = summary.add
    for record in records:
        add(record)
    return summary


def top_series(counts: dict[str | None, collections.Counter], totals: collections.Counter,
               top: int = TOP_TAGS) -> list[tuple[str, list[tuple[float, float]]]]:
    """The ``top`` busiest tags' series, busiest first (the bottom of a stack), and one "other tags"
    series summing the rest (the tags beyond them and those counted as other from the start)."""
    ranked = sorted((tag for tag in counts if tag is not None), key=lambda tag: (-totals[tag], tag))
    shown, rest = ranked[:top], ranked[top:]
    series = [(tag, sorted(counts[tag].items())) for tag in shown]
    if rest or None in counts:
        other: collections.Counter = collections.Counter(counts.get(None, {}))
        for tag in rest:
            other.update(counts[tag])
        series.append(("other tags", sorted(other.items())))
    return series


def axis_range(summary: Summary, since: float, until: float, explicit: bool) -> tuple[float, float, float]:
    """(t0, t1, bar seconds): the range asked for when ``explicit``, else the span the records
    cover widened to whole bars (at least 10 s); the bars chosen from that span."""
    if explicit or summary.first is None:
        t0, t1 = since, max(until, since + 1)
        return t0, t1, bucket_for(t1 - t0, summary.resolution)
    first, last = summary.first, summary.last
    last = max(last, first + 10)  # a life of a few seconds still gets a readable axis, from its start
    bar = bucket_for(last - first, summary.resolution)
    t0 = math.floor(first / bar) * bar
    t1 = math.floor(last / bar) * bar + bar
    bar = bucket_for(t1 - t0, summary.resolution)  # whole bars can tip the span over MAX_BARS
    return math.floor(first / bar) * bar, math.floor(last / bar) * bar + bar, bar


def _metric_series(summary: Summary, name: str, thing: str | None, label: str) -> list[tuple[str, list]]:
    if thing is None:
        points = summary.metrics.get(name)
        return [(label, points)] if points else []
    found = [(key, points) for key, points in summary.metrics.items()
             if key.startswith(f"{name}[") and key.endswith("]") and points]
    found.sort(key=lambda item: (-max(v for _, v in item[1]), item[0]))  # the busiest; zeros too, drawn as zero
    return [(label.replace("*", key[len(name) + 1:-1]), points) for key, points in found[:6]]


def _stamp(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))


def _clock(moment: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(moment))


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{n} {unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "min"), (secs, "s")) if n]
    return " ".join(parts[:3]) or "0 s"


def _bytes(value: Any) -> str:
    number = _number(value)
    if number is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(number) < 1024 or unit == "TiB":
            return f"{number:.0f} {unit}" if unit == "B" else f"{number:.1f} {unit}"
        number /= 1024
    return "-"


def _pct(value: Any, hot: float | None = None) -> str:
    number = _number(value)
    if number is None:
        return "-"
    text = f"{number:.1f}%"
    return f'<b class="hot">{text}</b>' if hot is not None and number >= hot else text


def at_the_end(sample: dict[str, Any] | None, moment: float | None) -> str:
    """The machine at the last metrics sample: CPU, memory, swap, disks, load, processes, and the
    top processes (by memory, then CPU) when the metrics input was asked for them."""
    if sample is None:
        return '<p class="warn">No metrics samples in this range: nothing is known about the machine at the end.</p>'
    g = sample.get
    rows = [("CPU", f"{_pct(g('cpu.percent'), 90)} busy (user {_pct(g('cpu.user_percent'))}, system "
                    f"{_pct(g('cpu.system_percent'))}, iowait {_pct(g('cpu.iowait_percent'), 30)}, steal "
                    f"{_pct(g('cpu.steal_percent'), 20)})"),
            ("memory", f"{_pct(g('memory.used_percent'), 90)} used: {_bytes(g('memory.used_bytes'))} of "
                       f"{_bytes(g('memory.total_bytes'))}, {_bytes(g('memory.available_bytes'))} available")]
    if _number(g("swap.total_bytes")):
        rows.append(("swap", f"{_pct(g('swap.used_percent'), 50)} used: {_bytes(g('swap.used_bytes'))} of "
                             f"{_bytes(g('swap.total_bytes'))}"))
    else:
        rows.append(("swap", "none" if "swap.total_bytes" in sample else "-"))
    disks = g("disk.used_percent")
    if isinstance(disks, dict) and disks:
        used, total = g("disk.used_bytes") or {}, g("disk.total_bytes") or {}
        ranked = sorted(((k, v) for k, v in disks.items() if _number(v) is not None), key=lambda kv: -kv[1])
        shown = [f"{html.escape(clipped(str(k), 80))} {_pct(v, 90)}"
                 + (f" ({_bytes(used.get(k))} of {_bytes(total.get(k))})" if isinstance(used, dict)
                    and isinstance(total, dict) and k in total else "") for k, v in ranked[:8]]
        more = f", and {len(ranked) - 8} more" if len(ranked) > 8 else ""
        rows.append(("disk", ", ".join(shown) + more))
    cores = g("cpu.core_percent")
    load = [_number(g(f"load.{m}")) for m in ("1m", "5m", "15m")]
    if any(v is not None for v in load):
        per_core = f" on {len(cores)} cores" if isinstance(cores, dict) and cores else ""
        rows.append(("load", " / ".join("-" if v is None else f"{v:.2f}" for v in load) + f" (1, 5, 15 min){per_core}"))
    if _number(g("processes.count")) is not None:
        zombies = _number(g("processes.zombie")) or 0
        rows.append(("processes", f"{g('processes.count')} ({g('processes.running', '-')} running, "
                                  + (f'<b class="hot">{zombies:.0f} zombie</b>' if zombies else "0 zombie") + ")"))
    if _number(g("fds.open")) is not None:
        rows.append(("open files", f"{g('fds.open')} of {g('fds.max', '-')}"))
    out = [f'<p>The last metrics sample, {_stamp(moment)}:</p><table class="end">']
    out.extend(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    out.append("</table>")
    cpu, rss, threads = (g(f"process.{k}") for k in ("cpu_percent", "rss_bytes", "threads"))
    if isinstance(rss, dict) and rss or isinstance(cpu, dict) and cpu:
        rss = rss if isinstance(rss, dict) else {}
        cpu = cpu if isinstance(cpu, dict) else {}
        threads = threads if isinstance(threads, dict) else {}
        names = sorted(set(rss) | set(cpu), key=lambda k: (-(_number(rss.get(k)) or 0), -(_number(cpu.get(k)) or 0)))
        out.append('<h3>Top processes at the end</h3><table class="procs"><tr><th>process</th><th>memory (RSS)</th>'
                   '<th>CPU</th><th>threads</th></tr>')
        for key in names[:TOP_PROCESSES]:
            out.append(f"<tr><td>{html.escape(clipped(str(key), 80))}</td><td>{_bytes(rss.get(key))}</td>"
                       f"<td>{_pct(cpu.get(key))}</td><td>{html.escape(str(threads.get(key, '-')))}</td></tr>")
        out.append("</table>")
        if len(names) > TOP_PROCESSES:
            out.append(f"<p>({len(names) - TOP_PROCESSES} more processes in the sample)</p>")
    else:
        out.append('<p class="note">No processes in the samples: set <code>top_processes = 5</code> in the '
                   'metrics input to see the busiest and largest ones here.</p>')
    return "".join(out)


def signs(sample: dict[str, Any] | None) -> list[str]:
    """What stood out in the last metrics sample: a full memory, swap or disk, a saturated CPU or load."""
    if not sample:
        return []
    found = []
    for name, label, limit in (("memory.used_percent", "memory", 90), ("swap.used_percent", "swap", 80),
                               ("cpu.percent", "CPU", 95), ("cpu.iowait_percent", "CPU iowait", 30)):
        value = _number(sample.get(name))
        if value is not None and value >= limit and (name != "swap.used_percent" or _number(sample.get("swap.total_bytes"))):
            found.append(f"{label} {value:.1f}% {'busy' if 'cpu' in name else 'used'}")
    disks = sample.get("disk.used_percent")
    if isinstance(disks, dict):
        full = sorted(((v, k) for k, v in disks.items() if (_number(v) or 0) >= 95), reverse=True)[:3]
        found.extend(f"disk {clipped(str(k), 80)} {v:.1f}% used" for v, k in full)
    cores, load = sample.get("cpu.core_percent"), _number(sample.get("load.1m"))
    if isinstance(cores, dict) and cores and load is not None and load >= 2 * len(cores):
        found.append(f"load {load:.2f} on {len(cores)} cores")
    return found


def _pattern_table(patterns: list[Pattern], suffix: str, lines_of: dict[str, list[int]], caption: str,
                   clock=lambda t: _clock(t)) -> str:
    if not patterns:
        return f"<p>{caption}: none.</p>"
    out = [f'<table class="patterns"><caption>{caption}</caption><tr><th>count</th><th>level</th><th>first</th>'
           '<th>last</th><th>pattern and one example</th><th>its last lines</th></tr>']
    for pattern in patterns:
        lines = lines_of.get(pattern.anchor, [])
        links = " ".join(f'<a href="#L{n}">#{n}</a>' for n in lines[-5:])
        if len(lines) > 5:
            links = f"({len(lines) - 5} more) " + links
        example = pattern.example.get("message") if isinstance(pattern.example, dict) else None
        tag = pattern.example.get("tag", "") if isinstance(pattern.example, dict) else ""
        severity = SEVERITY.get(pattern.level or "", "")
        out.append(f'<tr id="{pattern.anchor}{suffix}" class="{severity}"><td>{pattern.count:,}</td>'
                   f"<td>{html.escape(pattern.level or '-')}</td><td>{clock(pattern.first)}</td>"
                   f"<td>{clock(pattern.last)}</td><td><code>{html.escape(clipped(pattern.template, 500))}</code>"
                   f'<pre class="example">[{html.escape(clipped(str(tag), MAX_FIELD))}] '
                   f'{html.escape(clipped(str(example or ""), MAX_TEXT))}</pre></td><td>{links or "none among the last lines"}</td></tr>')
    out.append("</table>")
    return "".join(out)


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:940px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:12px 0 4px}
table{border-collapse:collapse}td,th{padding:2px 10px 2px 0;text-align:left;vertical-align:top}
caption{text-align:left;font-weight:600;padding:6px 0}
.chart{display:block;margin:6px 0}.plot{fill:#fafafa;stroke:#ccc}.grid{stroke:#e6e6e6}.tick{stroke:#999}
.axis{font-size:11px;fill:#666}.title{font-size:13px;font-weight:600}.legend{font-size:11px}
.marker{stroke-width:1.5;stroke-dasharray:4 3}.mlabel{font-size:11px;font-weight:600;paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round}
.lines{background:#f6f6f6;padding:8px;font:12px/1.45 ui-monospace,monospace;white-space:pre-wrap;
 overflow-wrap:anywhere;margin:0}
.lines span{display:block}.lines .warning{background:#fff3cd}.lines .error{background:#fddede}
.lines .critical{background:#f8b4b4;font-weight:600}.lines a{color:inherit}
.patterns td{border-top:1px solid #eee}.patterns code{font-size:12px}
.example{margin:2px 0;font-size:11px;color:#555;white-space:pre-wrap;overflow-wrap:anywhere;max-width:620px}
.patterns tr.error td:first-child,.patterns tr.critical td:first-child{color:#b00;font-weight:600}
.ended td{padding-right:14px}.warn{color:#b00;font-weight:600}.hot{color:#b00}.note{color:#666}
:target{outline:2px solid #1f77b4}
"""


def render_html(summary: Summary, source: str, since: float, until: float, explicit_range: bool = False) -> str:
    """The page. The time axis spans what the records cover (first to last record, in whole bars)
    unless ``explicit_range`` (--since or --until given): then [since, until]."""
    ident = summary.identity
    who = ident.get("instance_id") or ident.get("host") or "unknown instance"
    t0, t1, bar = axis_range(summary, since, until, explicit_range)
    markers: list = [(moment, label) for moment, label in summary.events
                     if summary.termination is None or moment != summary.termination[0]]
    if summary.first is not None:
        markers.append(Marker(summary.first, "first record", "start", _stamp(summary.first)))
    if summary.termination is not None:
        markers.append(Marker(summary.termination[0], "termination notice", "notice", summary.termination[1]))
    if summary.first_error is not None:
        markers.append(Marker(summary.first_error[0], "first error", "error", clipped(summary.first_error[2], 200)))
    if summary.last_log is not None:
        markers.append(Marker(summary.last_log, "last log record", "lastlog", _stamp(summary.last_log)))
    if summary.last_metrics is not None:
        markers.append(Marker(summary.last_metrics, "last metrics sample", "lastmetrics", _stamp(summary.last_metrics)))
    rows = [("instance", ident.get("instance_id", "-")), ("host", ident.get("host", "-")),
            ("image", ident.get("image_id", "-")), ("type", ident.get("instance_type", "-")),
            ("zone", ident.get("availability_zone", "-")),
            ("labels", ", ".join(f"{k}={v}" for k, v in sorted((ident.get("labels") or {}).items())) or "-"),
            ("source", source), ("records", f"{summary.records:,}")]
    out = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
           f"<title>shipper report: {html.escape(who)}</title><style>{STYLE}</style></head><body>",
           f"<h1>{html.escape(who)}</h1>"]
    if summary.first is not None:
        out.append(f"<p>Records from {_stamp(summary.first)} to {_stamp(summary.last)} "
                   f"({duration(summary.last - summary.first)}); charts "
                   f"{'of the range asked for' if explicit_range else 'over what the records cover'}, "
                   f"bars of {duration(bar)}; times in UTC.</p>")
    else:
        out.append(f'<p class="warn">No records from {_stamp(since)} to {_stamp(until)}.</p>')
    out.append("<table>" + "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
               + "</table>")

    # How it ended: the events in time order, then the gap between the logs and the metrics.
    out.append('<h2 id="ended">How it ended</h2><table class="ended">')
    hidden = summary.events_seen - len(summary.events)
    if hidden > 0:
        out.append(f"<tr><td></td><td>({hidden:,} earlier lifecycle events not shown)</td></tr>")
    ended = [(m.moment, m.label, m.detail if m.kind in ("notice", "error") else "", m.kind)
             for m in markers if isinstance(m, Marker)]
    ended += [(moment, "lifecycle", label, "event") for item in markers if not isinstance(item, Marker)
              for moment, label in [item]]
    for moment, label, detail, kind in sorted(ended, key=lambda e: e[0]):
        color = MARKER_KINDS.get(kind, MARKER_KINDS["event"])
        out.append(f'<tr class="ev-{kind}"><td>{_stamp(moment)}</td><td style="color:{color}"><b>'
                   f"{html.escape(label)}</b></td><td>{html.escape(detail)}</td></tr>")
    out.append("</table>")
    if summary.termination is None:
        out.append("<p>No termination notice in the archive (the instance did not announce its end, or the "
                   "agent had no IMDS access).</p>")
    if summary.last_log is not None and summary.last_metrics is not None:
        gap = summary.last_metrics - summary.last_log
        out.append(f"<p>The logs went quiet <b>{abs(gap):.0f} s {'before' if gap >= 0 else 'after'}</b> the "
                   f"metrics. The last lines are <a href=\"#last-lines\">at the bottom</a>.</p>")
    stood_out = signs(summary.last_sample)
    if stood_out:
        out.append(f'<p class="warn">At the last metrics sample: {html.escape(", ".join(stood_out))}.</p>')
    if summary.tail:
        count = len(summary.tail)
        out.append('<p>Its last lines:</p><div class="lines">')
        for number, (moment, tag, message, severity, _) in enumerate(list(summary.tail)[-3:], count - min(3, count) + 1):
            out.append(f'<span{f" class={chr(34)}{severity}{chr(34)}" if severity else ""}><a href="#L{number}">'
                       f"{_clock(moment)}</a> [{html.escape(tag)}] {html.escape(clipped(message, 500))}</span>")
        out.append("</div>")
    errors = summary.severities["error"] + summary.severities["critical"]
    out.append(f"<p>{errors:,} errors (level error or worse) and {summary.severities['warning']:,} warnings.</p>")

    out.append('<h2 id="at-the-end">At the end</h2>')
    out.append(at_the_end(summary.last_sample, summary.last_metrics))

    # The patterns, each linked to its lines among the last ones (and each such line to its pattern).
    lines_of: dict[str, list[int]] = collections.defaultdict(list)
    for number, (_, _, _, _, anchor) in enumerate(summary.tail, 1):
        if anchor is not None:
            lines_of[anchor].append(number)
    overall = summary.miner.top(TOP_PATTERNS)
    recent = summary.miner.top(TOP_PATTERNS, since=summary.last - RECENT) if summary.last is not None else []
    out.append('<h2 id="patterns">Error and warning patterns</h2>')
    clock = _clock if summary.span() < 86400 else (lambda t: time.strftime("%b %d %H:%M:%S", time.gmtime(t)))
    out.append(_pattern_table(overall, "", lines_of, "The most frequent over the range", clock))
    out.append(_pattern_table(recent, "-5m", lines_of, "The most frequent in the last 5 minutes before the end", clock))
    if summary.miner.dropped:
        out.append(f"<p>({summary.miner.dropped:,} records of rare patterns were let go to stay within "
                   f"{summary.miner.max_clusters:,} patterns.)</p>")
    shown = {p.anchor: p.anchor + "-5m" for p in recent}   # a line links to its pattern's row, the range's first
    shown.update({p.anchor: p.anchor for p in overall})

    out.append("<h2>The logs</h2>")
    volume = [(tag, sorted(rebucket(collections.Counter(dict(points)), bar).items()))
              for tag, points in top_series(summary.volume, summary.totals)]
    out.append(svg_chart(f"Records per {duration(bar)}, per tag (stacked)", "", volume, t0, t1, markers, "bars", bar))
    levels = [(SEVERITY_LABELS[s], sorted(rebucket(summary.levels[s], bar).items())) for s in SEVERITIES
              if summary.levels.get(s)]
    colors = [SEVERITY_COLORS[SEVERITIES.index(s)] for s in SEVERITIES if summary.levels.get(s)]
    out.append(svg_chart(f"Errors and warnings per {duration(bar)}, by level", "", levels, t0, t1, markers, "bars",
                         bar, empty="no errors or warnings" if summary.records else "no data", colors=colors))
    out.append("<h2>The machine</h2>")
    for title, unit, wanted in CHARTS:
        series = [s for label, name, thing in wanted for s in _metric_series(summary, name, thing, label)]
        out.append(svg_chart(title, unit, series, t0, t1, markers))

    out.append(f'<h2 id="last-lines">The last {len(summary.tail)} lines</h2><div class="lines">')
    for number, (moment, tag, message, severity, anchor) in enumerate(summary.tail, 1):
        target = shown.get(anchor) if anchor is not None else None
        stamp = _clock(moment)
        if target is not None:
            stamp = f'<a href="#{target}" title="its pattern">{stamp}</a>'
        out.append(f'<span id="L{number}"{f" class={chr(34)}{severity}{chr(34)}" if severity else ""}>{stamp} '
                   f"[{html.escape(tag)}] {html.escape(message)}</span>")
    out.append("</div></body></html>\n")
    return "".join(out)
