"""The report's charts: inline SVG drawn from plain data, no script, nothing fetched.

Pure functions the tests call directly: the time ticks (round steps, labels that never repeat),
the value ticks (a round scale from zero), the event markers (labelled, their labels staggered
so none overlaps), and one chart of lines or stacked bars. Nothing is drawn outside the plot:
times are cut to [t0, t1], values to [0, the top of the scale]; a zero is drawn as zero.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass

WIDTH, HEIGHT = 880, 170
LEFT, RIGHT, TOP, BOTTOM = 76, 16, 24, 22   # the plot's margins (TOP grows with legend and marker rows)
PLOT_W = WIDTH - LEFT - RIGHT
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
CHAR_PX = 6.6          # width of a character of the 11 px axis font, generously
MARKER_ROWS = 5        # rows of marker labels at most: the five named markers always fit (others: tooltip)

# Round time steps for axis ticks, seconds.
TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 3 * 3600, 6 * 3600, 12 * 3600,
              86400, 2 * 86400, 7 * 86400, 14 * 86400, 30 * 86400, 91 * 86400)

# What an event marker is: its colour and CSS class.
MARKER_KINDS = {"start": "#555", "notice": "#d62728", "error": "#e6550d", "lastlog": "#1f77b4",
                "lastmetrics": "#2ca02c", "event": "#9467bd"}


@dataclass(frozen=True)
class Marker:
    moment: float
    label: str          # shown above the plot (short); the tooltip says ``detail`` too
    kind: str = "event"
    detail: str = ""


def time_format(step: float, span: float) -> str:
    """The strftime format of a tick label, chosen so that no two ticks of a span share a label:
    within a day the clock is enough (to the second below a minute's step); past a day the date is
    added, and past most of a year the year."""
    if span < 86400:
        return "%H:%M:%S" if step < 60 else "%H:%M"
    if step < 86400:
        return "%b %d %H:%M"
    return "%b %d" if span < 300 * 86400 else "%Y-%m-%d"


def time_ticks(t0: float, t1: float, width: float = PLOT_W) -> list[tuple[float, str]]:
    """Ticks at round UTC times inside [t0, t1] (multiples of a step from TIME_STEPS), as many as
    fit ``width`` pixels with their labels apart; labels never repeat."""
    span = max(t1 - t0, 1.0)
    for step in TIME_STEPS:
        fmt = time_format(step, span)
        label_px = len(time.strftime(fmt, time.gmtime(t0))) * CHAR_PX + 18
        if step / span * width >= label_px:
            break
    else:
        step = span  # longer than any step: the ends only
        fmt = time_format(step, span)
    first = math.ceil(t0 / step) * step
    ticks = []
    moment = first
    while moment <= t1 + 1e-6:
        ticks.append((moment, time.strftime(fmt, time.gmtime(moment))))
        moment += step
    return ticks


def tick_labels(t0: float, t1: float) -> list[tuple[float, str, float, str]]:
    """The time ticks of a chart with their x and text anchor: a label that would leave the chart
    is anchored at its end (or start) instead, and one that would then touch its neighbour is left out."""
    span = max(t1 - t0, 1e-9)
    shown, previous_end = [], -math.inf
    for moment, label in time_ticks(t0, t1):
        px = LEFT + (moment - t0) / span * PLOT_W
        width = len(label) * CHAR_PX
        if px + width / 2 > WIDTH - 2:
            anchor, start, end = "end", px - width, px
        elif px - width / 2 < 2:
            anchor, start, end = "start", px, px + width
        else:
            anchor, start, end = "middle", px - width / 2, px + width / 2
        if start < previous_end + 8:
            continue
        shown.append((moment, label, px, anchor))
        previous_end = end
    return shown


def _decimals(step: float) -> int:
    """Decimals that write multiples of ``step`` exactly (0.25: 2, 2.5: 1, 20: 0)."""
    for decimals in range(7):
        if abs(step * 10 ** decimals - round(step * 10 ** decimals)) < 1e-6 * max(1.0, step * 10 ** decimals):
            return decimals
    return 6


def format_value(value: float, unit: str, step: float = 0.0) -> str:
    """A value with its unit; ``step`` (the distance between ticks) sets the precision, so that
    ticks a step apart never read alike. Rates in B/s go to KB/s, MB/s, GB/s."""
    if unit == "B/s":
        scale, suffix = 1.0, "B/s"
        for factor, name in ((1e9, "GB/s"), (1e6, "MB/s"), (1e3, "KB/s")):
            if max(abs(value), step) >= factor:
                scale, suffix = factor, name
                break
        return f"{value / scale:.{_decimals(step / scale) if step else 1 if scale > 1 else 0}f} {suffix}"
    if step:
        return f"{value:.{_decimals(step)}f}{unit}"
    return f"{value:.1f}{unit}" if abs(value) < 100 else f"{value:.0f}{unit}"


def value_ticks(high: float, unit: str = "", integer: bool = False) -> tuple[float, list[tuple[float, str]]]:
    """The top of the scale and its ticks from zero: 2 to 5 round steps (1, 2, 2.5, 5 times a
    power of ten; whole numbers only for counts). A percent scale whose values stay within 100
    goes to 100; a scale of nothing but zeros goes to 1 (zero is drawn at the bottom)."""
    if not math.isfinite(high) or high <= 0:
        high = 1.0
    if unit == "%" and high <= 100:
        high = 100.0
    high = max(high, 1e-3)  # below that, labels could not tell the ticks apart
    raw = high / 4
    magnitude = 10 ** math.floor(math.log10(raw))
    steps = [m * magnitude for m in (1, 2, 2.5, 5, 10)]
    if integer or unit == "B/s":  # counts and bytes are whole
        steps = [s for s in steps if s >= 1 and float(s).is_integer()] or [1.0]
    step = next((s for s in steps if s >= raw), steps[-1])
    count = max(1, math.ceil(high / step - 1e-9))
    top = step * count
    return top, [(step * i, format_value(step * i, unit, step)) for i in range(count + 1)]


def place_markers(markers: list[Marker], t0: float, t1: float, rows: int = MARKER_ROWS
                  ) -> list[tuple[Marker, float, int | None, str]]:
    """Each marker inside [t0, t1] with its x, its label row (None: no room, tooltip only) and its
    text anchor: labels go right of their line, or left of it near the right edge, in the first
    row where they overlap no other label."""
    span = max(t1 - t0, 1e-9)
    placed, ends = [], [[] for _ in range(rows)]   # per row: the [start, end] pixel spans taken
    # The named markers get their rows first, then the others (in time order within each).
    for marker in sorted(markers, key=lambda m: (m.kind == "event", m.moment)):
        if not t0 <= marker.moment <= t1:
            continue
        x = LEFT + (marker.moment - t0) / span * PLOT_W
        width = len(marker.label) * CHAR_PX + 6
        if x + 3 + width <= WIDTH - 2:
            start, end, anchor = x, x + 3 + width, "start"
        else:
            start, end, anchor = x - 3 - width, x, "end"
        row = None
        if marker.label:
            for index, taken in enumerate(ends):
                if all(end < a or start > b for a, b in taken):
                    taken.append((start, end))
                    row = index
                    break
        placed.append((marker, x, row, anchor))
    return sorted(placed, key=lambda item: item[0].moment)


def stacked(series: list[tuple[str, list[tuple[float, float]]]]) -> dict[float, list[tuple[int, float, float]]]:
    """Per bucket start: (series index, bottom, top) of each series' block, the first series at the
    bottom; the last top is the bucket's total. Zero or negative counts take no room."""
    columns: dict[float, list[tuple[int, float, float]]] = {}
    for index, (_, points) in enumerate(series):
        for t, v in points:
            if not v > 0:
                continue
            blocks = columns.setdefault(t, [])
            bottom = blocks[-1][2] if blocks else 0.0
            blocks.append((index, bottom, bottom + v))
    return columns


def reduce_series(points: list[tuple[float, float]], t0: float, t1: float, columns: int) -> list[tuple[float, float]]:
    """At most two points (min and max, in time order) per pixel column: the shape survives, the size does not."""
    if len(points) <= 2 * columns or t1 <= t0:
        return points
    buckets: dict[int, list[tuple[float, float]]] = {}
    for t, v in points:
        column = min(columns - 1, max(0, int((t - t0) / (t1 - t0) * columns)))
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


def clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def svg_chart(title: str, unit: str, series: list[tuple[str, list[tuple[float, float]]]], t0: float, t1: float,
              events: list, kind: str = "line", bar_seconds: float = 60.0, empty: str = "no data",
              colors: list[str] | None = None) -> str:
    """One chart: series over [t0, t1] on a shared time axis (lines, or bars of ``bar_seconds``
    stacked in the order given, the first at the bottom), events as labelled vertical markers
    (``Marker``, or (time, text) drawn unlabelled with the text as tooltip). ``empty`` is said
    when there is no point at all; a series of zeros is drawn on the zero line."""
    colors = colors or [PALETTE[i % len(PALETTE)] for i in range(len(series))]
    markers = [e if isinstance(e, Marker) else Marker(e[0], "", "event", e[1]) for e in events]
    placed = place_markers(markers, t0, t1)
    marker_rows = 1 + max((row for _, _, row, _ in placed if row is not None), default=-1)
    # The legend: next to the title, then in rows of its own above the plot when it does not fit.
    legend, row, legend_x = [], 0, LEFT + 16 + len(title) * 8
    for index, (label, _) in enumerate(series):
        label = clipped(label, 32)
        if legend_x + 24 + len(label) * 7 > WIDTH - RIGHT and legend_x > LEFT:
            row, legend_x = row + 1, LEFT
        legend.append((colors[index], label, legend_x, row))
        legend_x += 24 + len(label) * 7
    band = TOP + 14 * row            # the top of the marker labels
    top = band + 12 * marker_rows    # the top of the plot
    height = HEIGHT + 14 * row + 12 * marker_rows
    plot_h = height - top - BOTTOM
    span = max(t1 - t0, 1e-9)

    def x(t: float) -> float:
        return LEFT + (min(max(t, t0), t1) - t0) / span * PLOT_W

    def inside(t: float) -> bool:  # a bar across t0 or t1 is drawn cut; a point must be in the range
        return t + bar_seconds > t0 and t < t1 if kind == "bars" else t0 <= t <= t1

    visible = [(label, [(t, v) for t, v in points if inside(t)]) for label, points in series]
    if kind == "bars":
        columns = stacked(visible)
        high = max((blocks[-1][2] for blocks in columns.values()), default=0.0)
    else:
        high = max((v for _, points in visible for _, v in points), default=0.0)
    scale_top, ticks = value_ticks(high, unit, integer=kind == "bars")

    def y(v: float) -> float:
        return top + plot_h - (min(max(v, 0.0), scale_top) / scale_top) * plot_h

    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
             f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{LEFT}" y="15" class="title">{html.escape(title)}</text>',
             f'<rect x="{LEFT}" y="{top}" width="{PLOT_W}" height="{plot_h}" class="plot"/>']
    for value, label in ticks:
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{y(value):.1f}" y2="{y(value):.1f}" class="grid"/>'
                     f'<text x="{LEFT - 4}" y="{y(value) + 4:.1f}" class="axis yl" text-anchor="end">'
                     f'{html.escape(label)}</text>')
    for moment, label, px, anchor in tick_labels(t0, t1):
        parts.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 3}" class="tick"/>'
                     f'<text x="{px:.1f}" y="{height - 6}" class="axis xl" text-anchor="{anchor}">{label}</text>')
    if kind == "bars":
        for t, blocks in sorted(columns.items()):
            start, end = x(t), x(t + bar_seconds)
            if end <= start:
                continue
            for index, bottom, block_top in blocks:
                parts.append(f'<rect x="{start:.2f}" y="{y(block_top):.2f}" width="{end - start:.2f}" '
                             f'height="{y(bottom) - y(block_top):.2f}" fill="{colors[index]}" opacity="0.85" '
                             f'class="bar"/>')
    else:
        for index, (_, points) in enumerate(visible):
            reduced = reduce_series(sorted(points), t0, t1, PLOT_W)
            if len(reduced) == 1:
                (t, v), = reduced
                parts.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="2" fill="{colors[index]}"/>')
            elif reduced:
                path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in reduced)
                parts.append(f'<polyline points="{path}" fill="none" stroke="{colors[index]}" stroke-width="1.5"/>')
    for color, label, legend_x, legend_row in legend:
        parts.append(f'<rect x="{legend_x}" y="{7 + 14 * legend_row}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{legend_x + 14}" y="{16 + 14 * legend_row}" class="legend">{html.escape(label)}</text>')
    for marker, px, label_row, anchor in placed:
        color = MARKER_KINDS.get(marker.kind, MARKER_KINDS["event"])
        tip = html.escape(" ".join(p for p in (marker.label, marker.detail) if p))
        y1 = band + 12 * label_row + 2 if label_row is not None else top
        parts.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{y1}" y2="{top + plot_h}" stroke="{color}" '
                     f'class="marker m-{marker.kind}"><title>{tip}</title></line>')
        if label_row is not None:
            tx = px + 3 if anchor == "start" else px - 3
            parts.append(f'<text x="{tx:.1f}" y="{band + 12 * label_row + 10}" fill="{color}" class="mlabel" '
                         f'text-anchor="{anchor}">{html.escape(marker.label)}<title>{tip}</title></text>')
    if not any(points for _, points in visible):
        parts.append(f'<text x="{LEFT + PLOT_W / 2}" y="{top + plot_h / 2}" class="axis empty" '
                     f'text-anchor="middle">{html.escape(empty)}</text>')
    parts.append("</svg>")
    return "".join(parts)
