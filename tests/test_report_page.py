"""The report page (issue 17 item 3): the chart arithmetic as pure functions (bars, ticks, stacks,
clipping, zeros), pages of made-up instances (short-lived, a day long, dead of memory), and the
report of a terminated instance the agent itself archived, rendered in a real headless Chromium."""

from __future__ import annotations

import collections
import math
import random
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from xml.etree import ElementTree

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FAST_RETRIES, Agent, agent_config, needs_system, wait_for
from imds import FakeImds
from shipper.postmortem import charts
from shipper.postmortem.charts import (WIDTH, Marker, place_markers, stacked, svg_chart,
                                       tick_labels, time_ticks, value_ticks)
from shipper.postmortem.report import (MAX_BARS, RESOLUTIONS, SEVERITY, STORE_BUCKETS, axis_range, bucket_for,
                                       rebucket, render_html, summarize)
from shipper.postmortem.selection import level_of

NS = "{http://www.w3.org/2000/svg}"
START = 1_764_421_200.0   # 2025-11-29T13:00:00Z
IDENT = {"instance_id": "i-0abc1234def567890", "host": "ip-10-0-1-17", "image_id": "ami-0def1234abc567890"}


# ---------------------------------------------------------------- made-up instances

def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(round(t % 1 * 1e6)) % 1_000_000:06d}Z"


def sample(t: float, mem: float = 40.0, swap: float = 0.0, cpu: float = 20.0, net: float = 0.0,
           processes: bool = True) -> dict:
    metrics = {"cpu.percent": cpu, "cpu.user_percent": cpu * .7, "cpu.system_percent": cpu * .2,
               "cpu.iowait_percent": 1.0, "cpu.steal_percent": 0.0, "load.1m": cpu / 25, "load.5m": cpu / 30,
               "load.15m": cpu / 40, "memory.total_bytes": 8 * 2**30, "memory.used_bytes": mem / 100 * 8 * 2**30,
               "memory.available_bytes": (100 - mem) / 100 * 8 * 2**30, "memory.used_percent": mem,
               "swap.total_bytes": 2 * 2**30, "swap.used_bytes": swap / 100 * 2 * 2**30, "swap.used_percent": swap,
               "disk.total_bytes": {"/": 50e9}, "disk.used_bytes": {"/": 30.5e9}, "disk.used_percent": {"/": 61.0},
               "network.received_bytes_per_second": {"ens5": net}, "network.sent_bytes_per_second": {"ens5": net},
               "processes.count": 143, "processes.running": 2, "processes.zombie": 0}
    if processes:
        metrics["process.rss_bytes"] = {"python3:4242": mem / 100 * 7 * 2**30, "postgres:811": 300e6}
        metrics["process.cpu_percent"] = {"python3:4242": cpu * 1.5, "postgres:811": 4.0}
        metrics["process.threads"] = {"python3:4242": 12, "postgres:811": 5}
    return {"time": stamp(t), "tag": "metrics", **IDENT, "metrics": metrics}


def line(t: float, tag: str, message: str) -> dict:
    return {"time": stamp(t), "tag": tag, **IDENT, "message": message}


def short_lived() -> list[dict]:
    """7 minutes: errors and warnings as plain lines (levels read from the message), a spot notice."""
    rng = random.Random(1)
    records = [sample(START + i, cpu=15 + rng.random() * 10) for i in range(0, 421, 10)]
    t, n = START + 0.5, 0
    while t < START + 420:
        n += 1
        if n % 37 == 0:
            records.append(line(t, "app", f"ERROR connection to 10.0.3.{n % 250} refused after {n % 900} ms"))
        elif n % 23 == 0:
            records.append(line(t, "app", f"WARN slow query took {n * 3} ms"))
        else:
            records.append(line(t, rng.choice(["app", "nginx", "syslog"]), f"INFO GET /api/items/{n} 200"))
        t += rng.random() * 1.5
    records.append({"time": stamp(START + 390), "tag": "lifecycle", **IDENT, "event": "termination_notice",
                    "message": "termination notice (spot): terminate at 2025-11-29T13:09:00Z"})
    return sorted(records, key=lambda r: r["time"])


def day_long() -> list[dict]:
    """24 hours, 10 tags, a burst of errors at noon, the network at 0 B/s for the first hour."""
    rng = random.Random(2)
    day = START - 13 * 3600
    records = [sample(day + i, cpu=10 + 60 * (0.5 + 0.5 * math.sin(i / 9000)), net=0.0 if i < 3600 else 2e6)
               for i in range(0, 86400, 60)]
    tags = ["app", "nginx", "worker", "cron", "syslog", "audit", "kernel", "sshd", "postgres", "redis"]
    for i in range(0, 86400, 7):
        tag = tags[min(len(tags) - 1, int(rng.expovariate(0.5)))]
        if 40000 < i < 46000 and rng.random() < 0.3:
            records.append(line(day + i, "app", f"ERROR upstream timed out ({rng.randint(1, 99)} s)"))
        elif rng.random() < 0.02:
            records.append(line(day + i, tag, f"WARN disk /data is {rng.randint(80, 95)}% full"))
        else:
            records.append(line(day + i, tag, f"INFO job {i} done in {rng.randint(1, 500)} ms"))
    return sorted(records, key=lambda r: r["time"])


def out_of_memory() -> list[dict]:
    """2 hours, memory and swap filling up, no notice; the last lines are the ones before death."""
    rng = random.Random(3)
    records = []
    for i in range(0, 7201, 10):
        mem = min(99.6, 35 + 65 * (i / 7200) ** 3)
        records.append(sample(START + i, mem=mem, swap=min(100.0, max(0.0, (mem - 85) * 6.9)),
                              cpu=90 if mem > 95 else 20))
    for i in range(0, 7195, 3):
        if i > 6000 and rng.random() < 0.2:
            records.append(line(START + i, "app", f"WARNING memory usage high: {rng.randint(85, 99)}%"))
        else:
            records.append(line(START + i, rng.choice(["app", "worker"]), f"INFO processed batch {i}"))
    end = START + 7197
    records += [line(end, "kernel", "Out of memory: Killed process 4242 (python3) total-vm:9123456kB, ERROR"),
                line(end + 0.5, "app", 'Traceback (most recent call last):\n  File "/srv/app/worker.py", line 88, '
                                       'in run\n    rows = load_all()\nMemoryError'),
                line(end + 1, "app", "CRITICAL out of memory"),
                line(end + 1.2, "app", "MemoryError")]
    return sorted(records, key=lambda r: r["time"])


class Page(HTMLParser):
    """The page's elements as (tag, attributes, text) and its ids and in-page links."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.classes: collections.Counter = collections.Counter()
        self.spans: list[tuple[str | None, str, str]] = []  # the last lines: (class, id, text)
        self._span: list | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            assert attrs["id"] not in self.ids, f"duplicate id {attrs['id']}"
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href", "").startswith("#"):
            self.links.append(attrs["href"][1:])
        for name in (attrs.get("class") or "").split():
            self.classes[name] += 1
        if tag == "span" and attrs.get("id", "").startswith("L"):
            self._span = [attrs.get("class"), attrs["id"], ""]

    def handle_data(self, data):
        if self._span is not None:
            self._span[2] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._span is not None:
            self.spans.append(tuple(self._span))
            self._span = None


def charts_of(text: str) -> dict[str, ElementTree.Element]:
    return {root.get("aria-label"): root for root in
            (ElementTree.fromstring(svg) for svg in re.findall(r'<svg class="chart".*?</svg>', text, re.S))}


def plot_box(root: ElementTree.Element) -> tuple[float, float, float, float]:
    plot = next(r for r in root.iter(f"{NS}rect") if r.get("class") == "plot")
    x, y = float(plot.get("x")), float(plot.get("y"))
    return x, y, x + float(plot.get("width")), y + float(plot.get("height"))


def axis_labels(root: ElementTree.Element) -> list[str]:
    return [t.text for t in root.iter(f"{NS}text") if "xl" in (t.get("class") or "").split()]


# ---------------------------------------------------------------- pure: bars, ticks, stacks

def test_the_bar_size_follows_the_span():
    assert [bucket_for(s) for s in (60, 420, 3600, 86400, 30 * 86400)] == [1, 5, 30, 600, 21600]
    assert bucket_for(3600, resolution=60) == 60 and bucket_for(86400, resolution=300) == 600
    assert bucket_for(400 * 86400) >= 400 * 86400 / MAX_BARS   # beyond the ladder: whole weeks


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=1, max_value=400 * 86400))
def test_bars_are_whole_buckets_of_what_was_counted_and_never_too_many(span):
    resolution = 1.0  # the resolution the summary has reached for this span (Summary._coarsen's rule)
    while span > STORE_BUCKETS * resolution and resolution < RESOLUTIONS[-1]:
        resolution = next(r for r in RESOLUTIONS if r > resolution)
    bar = bucket_for(span, resolution)
    assert bar % resolution == 0 and span / bar <= MAX_BARS
    assert bar < span or span < MAX_BARS  # more than one bar whenever the span allows


@settings(max_examples=400, deadline=None)
@given(st.floats(min_value=1.5e9, max_value=1.9e9), st.floats(min_value=60, max_value=30 * 86400))
def test_time_axis_labels_never_repeat_or_overlap_and_stay_in_the_range(t0, span):
    t1 = t0 + span
    ticks = time_ticks(t0, t1)
    labels = [label for _, label in ticks]
    assert len(set(labels)) == len(labels), labels
    assert all(t0 <= t <= t1 + 1e-6 for t, _ in ticks) and [t for t, _ in ticks] == sorted(t for t, _ in ticks)
    shown = tick_labels(t0, t1)
    assert len(shown) >= 2, (span, labels)   # every span from a minute to a month reads on the axis
    extents = []
    for _, label, x, anchor in shown:
        width = len(label) * charts.CHAR_PX
        start = {"start": x, "middle": x - width / 2, "end": x - width}[anchor]
        assert 0 <= start and start + width <= WIDTH
        extents.append((start, start + width))
    assert all(a[1] < b[0] for a, b in zip(extents, extents[1:]))  # no label over another


def test_tick_labels_carry_what_tells_them_apart():
    assert [label for _, label in time_ticks(START, START + 420)][:3] == ["13:00", "13:01", "13:02"]
    assert time_ticks(START, START + 60)[1][1] == "13:00:10"
    assert [label for _, label in time_ticks(START, START + 3 * 86400)][:2] == ["Nov 30 00:00", "Nov 30 12:00"]
    assert time_ticks(START, START + 30 * 86400)[0][1] == "Dec 04"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=1e12)), st.sampled_from(["", "%", "B/s"]),
       st.booleans())
def test_value_scales_start_at_zero_cover_the_data_and_never_repeat_a_label(high, unit, integer):
    top, ticks = value_ticks(high, unit, integer)
    assert ticks[0][0] == 0 and ticks[-1][0] == top and top >= high * (1 - 1e-9) and 2 <= len(ticks) <= 6
    labels = [label for _, label in ticks]
    assert len(set(labels)) == len(labels), labels
    if integer or unit == "B/s":
        assert all(float(v).is_integer() for v, _ in ticks)


def test_a_series_of_zeros_is_drawn_on_the_zero_line_and_only_no_points_is_no_data():
    points = [(START + i, 0.0) for i in range(0, 600, 10)]
    root = ElementTree.fromstring(svg_chart("Network", "B/s", [("in", points)], START, START + 600, []))
    _, _, _, bottom = plot_box(root)
    line = next(root.iter(f"{NS}polyline"))
    assert {float(p.split(",")[1]) for p in line.get("points").split()} == {bottom}
    assert not any(t.text == "no data" for t in root.iter(f"{NS}text"))
    assert [t.text for t in root.iter(f"{NS}text") if "yl" in t.get("class")] == ["0 B/s", "1 B/s"]
    assert "no data" in svg_chart("Load", "", [], START, START + 600, [])
    bars = svg_chart("Errors", "", [], START, START + 600, [], "bars", 5, empty="no errors or warnings")
    assert "no errors or warnings" in bars and "no data" not in bars


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.floats(-2000, 2000), st.floats(-1e6, 1e9)), max_size=60),
       st.lists(st.floats(-2000, 2000), max_size=8), st.sampled_from([1.0, 60.0, 900.0]),
       st.sampled_from(["line", "bars"]))
def test_nothing_is_drawn_outside_the_plot(points, moments, bar, kind):
    t0, t1 = 0.0, 1000.0
    series = [("a", sorted(points)), ("b", sorted((t + 7, abs(v) / 3) for t, v in points))]
    markers = [Marker(m, f"event {i}", "notice") for i, m in enumerate(moments)]
    root = ElementTree.fromstring(svg_chart("Chart", "", series, t0, t1, markers, kind, bar))
    left, top, right, bottom = plot_box(root)
    eps = 0.05
    for rect in root.iter(f"{NS}rect"):
        if rect.get("class") == "bar":
            x, y, w, h = (float(rect.get(k)) for k in ("x", "y", "width", "height"))
            assert left - eps <= x and x + w <= right + eps and top - eps <= y and y + h <= bottom + eps and h >= 0
    for polyline in root.iter(f"{NS}polyline"):
        for point in polyline.get("points").split():
            x, y = map(float, point.split(","))
            assert left <= x <= right and top <= y <= bottom
    for circle in root.iter(f"{NS}circle"):
        assert left <= float(circle.get("cx")) <= right and top <= float(circle.get("cy")) <= bottom
    drawn = [m for m in root.iter(f"{NS}line") if "marker" in (m.get("class") or "")]
    assert len(drawn) == sum(t0 <= m <= t1 for m in moments)
    for marker in drawn:
        assert left <= float(marker.get("x1")) <= right and float(marker.get("y2")) == bottom
    for text in root.iter(f"{NS}text"):
        assert 0 <= float(text.get("x")) <= WIDTH


def test_bars_are_stacked_and_each_stack_is_its_buckets_total():
    series = [("app", [(0.0, 5.0), (60.0, 2.0)]), ("web", [(0.0, 3.0), (120.0, 4.0)]), ("db", [(0.0, 0.0), (60.0, 1.0)])]
    columns = stacked(series)
    assert columns[0.0] == [(0, 0.0, 5.0), (1, 5.0, 8.0)]   # a zero takes no room
    assert {t: blocks[-1][2] for t, blocks in columns.items()} == {0.0: 8.0, 60.0: 3.0, 120.0: 4.0}
    root = ElementTree.fromstring(svg_chart("Records", "", series, 0.0, 180.0, [], "bars", 60.0))
    left, top, right, bottom = plot_box(root)
    scale_top = max(float(t.text) for t in root.iter(f"{NS}text") if "yl" in t.get("class"))
    heights = collections.defaultdict(float)
    for rect in root.iter(f"{NS}rect"):
        if rect.get("class") == "bar":
            heights[float(rect.get("x"))] += float(rect.get("height"))
            assert float(rect.get("y")) + float(rect.get("height")) <= bottom + 0.05
    per_count = (bottom - top) / scale_top
    assert sorted(round(h / per_count, 2) for h in heights.values()) == [3.0, 4.0, 8.0]


def test_markers_are_labelled_without_overlapping_and_the_rest_waits_in_tooltips():
    end = 1000.0
    markers = [Marker(0, "first record", "start"), Marker(990, "termination notice", "notice"),
               Marker(997, "last log record", "lastlog"), Marker(999, "last metrics sample", "lastmetrics"),
               Marker(998, "first error", "error"), Marker(996, "one more", "event"),
               Marker(994, "first record again", "start"), Marker(995, "error again", "error")]
    placed = place_markers(markers, 0.0, end)
    rows = collections.defaultdict(list)
    for marker, x, row, anchor in placed:
        width = len(marker.label) * charts.CHAR_PX + 6
        start, stop = (x, x + 3 + width) if anchor == "start" else (x - 3 - width, x)
        assert 0 <= start and stop <= WIDTH
        if row is not None:
            assert all(stop < a or start > b for a, b in rows[row])
            rows[row].append((start, stop))
    labelled = {marker.label for marker, _, row, _ in placed if row is not None}
    assert len(labelled) == charts.MARKER_ROWS + 1  # the left one shares row 0; six crowd the right edge
    assert "one more" not in labelled   # the named markers take the rows first
    svg = svg_chart("CPU", "%", [], 0.0, end, markers)
    assert svg.count('class="mlabel"') == 6 and svg.count("<title>one more</title>") == 1


def test_counts_coarsen_as_the_span_grows_and_merge_into_bars_without_losing_a_record():
    records = [line(START + i * 97.0, f"tag{i % 30}", "INFO x") for i in range(30 * 86400 // 97)]
    summary = summarize(iter(records))
    assert summary.resolution == 3600 and summary.records == len(records)
    assert all(len(counts) <= STORE_BUCKETS + 1 for counts in summary.volume.values())
    assert sum(sum(c.values()) for c in summary.volume.values()) == len(records)
    t0, t1, bar = axis_range(summary, 0, 0, explicit=False)
    assert bar == 21600 and t0 <= summary.first and summary.last < t1 and (t1 - t0) / bar <= MAX_BARS
    assert sum(rebucket(summary.volume["tag3"], bar).values()) == summary.totals["tag3"]


# ---------------------------------------------------------------- pages of made-up instances

def test_a_short_life_gets_an_axis_of_its_own_not_the_day_asked_for():
    summary = summarize(iter(short_lived()))
    page = render_html(summary, "s3://fleet", START - 86400, START + 3600)
    volume = charts_of(page)["Records per 5 s, per tag (stacked)"]
    assert axis_labels(volume)[0] == "13:00" and axis_labels(volume)[-1] == "13:07"
    assert len([r for r in volume.iter(f"{NS}rect") if r.get("class") == "bar"]) > 80 * 2   # 84 stacks of 5 s
    asked = render_html(summary, "s3://fleet", START - 86400, START + 3600, explicit_range=True)
    assert "Nov 28" in "".join(axis_labels(charts_of(asked)["Records per 10 min, per tag (stacked)"]))


def test_the_page_of_a_short_life_has_every_part():
    records = short_lived()
    summary = summarize(iter(records), last_lines=50)
    text = render_html(summary, "s3://fleet", START - 86400, START + 3600)
    page = Page(text)
    found = charts_of(text)
    assert list(found) == ["Records per 5 s, per tag (stacked)", "Errors and warnings per 5 s, by level", "CPU",
                           "Memory", "Load", "Disk used", "Network", "Disk I/O"]
    for title, root in found.items():
        labels = [t.text for t in root.iter(f"{NS}text") if t.get("class") == "mlabel"]
        assert labels == ["first record", "first error", "termination notice", "last log record",
                          "last metrics sample"], (title, labels)
        assert len(set(axis_labels(root))) == len(axis_labels(root))
    levels = found["Errors and warnings per 5 s, by level"]
    assert {t.text for t in levels.iter(f"{NS}text") if t.get("class") == "legend"} == {"warning", "error"}
    network = found["Network"]   # 0 B/s all along: drawn, on the zero line
    assert len(list(network.iter(f"{NS}polyline"))) == 2 and "no data" not in ElementTree.tostring(network, "unicode")
    # At the end: the last sample's machine, with its processes.
    end = text[text.index('id="at-the-end"'):text.index('id="patterns"')]
    for row in ("CPU", "memory", "swap", "disk", "load", "processes", "Top processes at the end", "python3:4242"):
        assert f">{row}<" in end or row in end, row
    # The patterns, linked to their lines and the lines back to them; every in-page link lands.
    assert {"p1", "p2"} <= page.ids and "p1-5m" in page.ids
    assert set(page.links) <= page.ids and any(link.startswith("L") for link in page.links)
    assert any(link.startswith("p") for link in page.links)
    # The last lines: all of them, newest at the bottom, errors and warnings marked.
    messages = [r.get("message") for r in records if "message" in r and r["tag"] != "metrics"]
    assert [s[2].split(" ", 2)[2] for s in page.spans] == messages[-50:]
    assert all((cls == "error") == ("ERROR" in body) for cls, _, body in page.spans if cls != "warning")
    assert "max-height" not in text and "overflow:auto" not in text and "overflow-y" not in text
    assert "<script" not in text and "src=" not in text and "<link" not in text
    assert re.findall(r"https?://[^\s\"'<]+", text) == ["http://www.w3.org/2000/svg"] * 8


def test_a_day_long_page_caps_its_tags_and_keeps_its_labels_apart():
    summary = summarize(iter(day_long()))
    text = render_html(summary, "s3://fleet", 0, 0)
    volume = charts_of(text)["Records per 10 min, per tag (stacked)"]
    legend = [t.text for t in volume.iter(f"{NS}text") if t.get("class") == "legend"]
    assert len(legend) == 8 and legend[-1] == "other tags" and legend[0] == "app"
    labels = axis_labels(volume)
    assert len(set(labels)) == len(labels) >= 5 and labels[0] == "Nov 29 00:00"
    totals = collections.Counter()
    for rect in volume.iter(f"{NS}rect"):
        if rect.get("class") == "bar":
            totals[rect.get("x")] += 1
    assert len(totals) == 144   # a bar of 10 min each, all stacked
    assert "Network" in charts_of(text) and len(text) < 600_000


def test_the_page_of_a_death_by_memory_shows_the_memory_and_the_last_lines():
    summary = summarize(iter(out_of_memory()))
    text = render_html(summary, "s3://fleet", 0, 0)
    page = Page(text)
    last = page.spans[-4:]
    assert [s[2].split(" ", 2)[2].splitlines()[-1] for s in last] == [
        "Out of memory: Killed process 4242 (python3) total-vm:9123456kB, ERROR", "MemoryError",
        "CRITICAL out of memory", "MemoryError"]
    assert [s[0] for s in last[:3]] == ["error", "error", "critical"]
    assert last[3][0] == SEVERITY.get(level_of({"message": "MemoryError"}))  # highlighted as the level rule says
    end = text[text.index('id="at-the-end"'):text.index('id="patterns"')]
    assert '<b class="hot">99.6%</b> used' in end and '<b class="hot">100.0%</b> used' in end
    assert end.index("python3:4242") < end.index("postgres:811")   # the biggest process first
    assert "No termination notice" in text and "termination notice</text>" not in text
    patterns = text[text.index('id="patterns"'):text.index("<h2>The logs")]
    assert "CRITICAL out of memory" in patterns and "Traceback ... MemoryError" in patterns


# ---------------------------------------------------------------- the real thing, in Chromium

def shipper(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shipper", *args], capture_output=True, text=True, timeout=timeout)


def chromium(page: Path, tmp_path: Path) -> tuple[str, str, bytes]:
    """The page's DOM after Chromium loaded it, what Chromium said, and a screenshot."""
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--hide-scrollbars", "--window-size=1000,2400",
               f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*command, "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = tmp_path / "report.png"
    capture = subprocess.run([*command, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True,
                             timeout=120)
    assert capture.returncode == 0 and shot.exists(), capture.stderr[-2000:]
    return dom.stdout, dom.stderr, shot.read_bytes()


@needs_system("chromium", "chromium")
def test_the_report_of_a_terminated_instance_in_chromium_has_every_part(workdir, tmp_path):
    from test_postmortem import png_is_not_blank
    with FakeImds() as imds:
        config = agent_config(workdir / "logs", workdir / "data", agent_extra=FAST_RETRIES,
                              input_extra='\n[[inputs]]\ntype = "metrics"\ninterval = "1s"\ntop_processes = 3\n')
        config = config.replace('metadata = "off"', f'metadata = "ec2"\nimds_endpoint = "{imds.endpoint}"\n'
                                                      f'termination_check_interval = "300ms"')
        agent = Agent(workdir, config).start()
        try:
            with open(workdir / "logs" / "app.log", "a") as handle:
                for n in range(120):
                    level = "ERROR" if n % 20 == 0 else "WARN" if n % 15 == 0 else "INFO"
                    handle.write(f"2025-11-29 13:00:{n % 60:02d} {level} worker {n} done in {n * 7} ms\n")
                    handle.flush()
                    time.sleep(0.01)
            time.sleep(1.5)
            imds.metadata["meta-data/spot/instance-action"] = '{"action": "terminate", "time": "2026-11-29T20:00:00Z"}'
            wait_for(lambda: "termination notice (spot)" in agent.log(), message="the notice")
            with open(workdir / "logs" / "app.log", "a") as handle:
                handle.write("CRITICAL out of memory\nMemoryError\n")
            time.sleep(1.5)
            assert agent.stop() == 0
        finally:
            agent.ensure_stopped()
    page = tmp_path / "report.html"
    result = shipper("report", str(workdir / "data" / "archive"), "--instance", "i-0abc1234def567890",
                     "-o", str(page))
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert "termination notice (spot): terminate at 2026-11-29T20:00:00Z" in text
    assert "ami-0def1234abc567890" in text  # the image id, from IMDS
    assert "<script" not in text and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    dom, said, png = chromium(page, tmp_path)
    assert [line for line in said.splitlines() if "CONSOLE" in line or "Uncaught" in line
            or "Failed to load resource" in line] == []   # the page asks for nothing
    assert png_is_not_blank(png)
    parsed = Page(dom)
    found = charts_of(dom)
    assert len(found) == 8
    volume = next(root for title, root in found.items() if title.startswith("Records per"))
    assert re.fullmatch(r"Records per (1|2|5) s, per tag \(stacked\)", volume.get("aria-label"))  # a short life's bars
    assert any(r.get("class") == "bar" for r in volume.iter(f"{NS}rect"))
    levels = next(root for title, root in found.items() if title.startswith("Errors and warnings"))
    assert {t.text for t in levels.iter(f"{NS}text") if t.get("class") == "legend"} == \
        {"warning", "error", "critical or worse"}
    for root in found.values():
        labels = [t.text for t in root.iter(f"{NS}text") if t.get("class") == "mlabel"]
        assert sorted(labels) == ["first error", "first record", "last log record", "last metrics sample",
                                  "termination notice"], labels
        assert len(set(axis_labels(root))) == len(axis_labels(root))
    markers = {t.get("class") for root in found.values() for t in root.iter(f"{NS}line")
               if "marker" in (t.get("class") or "")}
    assert {"marker m-start", "marker m-notice", "marker m-error", "marker m-lastlog", "marker m-lastmetrics"} <= markers
    end = dom[dom.index('id="at-the-end"'):dom.index('id="patterns"')]
    for row in ("<th>CPU</th>", "<th>memory</th>", "<th>swap</th>", "<th>disk</th>", "<th>load</th>",
                "Top processes at the end"):
        assert row in end, row
    assert "python" in end   # the agent's own process is among the top ones
    assert {"p1", "L1"} <= parsed.ids and set(parsed.links) <= parsed.ids
    assert any(link.startswith("L") for link in parsed.links) and any(link.startswith("p") for link in parsed.links)
    bodies = [s[2] for s in parsed.spans]
    assert bodies[-2].endswith("CRITICAL out of memory") and bodies[-1].endswith("MemoryError")
    assert parsed.spans[-2][0] == "critical"
    assert parsed.spans[-1][0] == SEVERITY.get(level_of({"message": "MemoryError"}))
    assert "termination notice (spot): terminate at 2026-11-29T20:00:00Z" in dom
