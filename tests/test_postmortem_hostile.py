"""`shipper fetch` and `shipper report` against hostile and broken archives: objects of huge content,
truncated objects, special files, absurd time ranges, terminal escapes, forged tags and forged records."""

from __future__ import annotations

import gzip
import io
import os
import pty
import re
import resource
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
import zlib
from pathlib import Path

import orjson
import pytest

from conftest import FAST_RETRIES, Agent, agent_config, wait_for
from shipper.postmortem import fetch, sources
from shipper.postmortem.report import WIDTH, svg_chart
from shipper.postmortem.selection import SelectionError, time_range
from shipper.postmortem.sources import event_record
from shipper.record import format_time

HOST = socket.gethostname()
HOUR = (int(time.time() // 3600) - 1) * 3600  # a whole hour inside the default range (1d)
BASE = f"dt={time.strftime('%Y-%m-%d', time.gmtime(HOUR))}/hour={time.strftime('%H', time.gmtime(HOUR))}"


def key(instance: str = "i-1", tag: str = "app", minute: int = 0, seq: int = 1, ext: str = ".gz") -> str:
    start = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(HOUR + minute * 60))
    return f"{BASE}/instance={instance}/{tag}/{start}-{seq:06d}.ndjson{ext}"


def line(n: int, minute: int = 0, **fields) -> bytes:
    return orjson.dumps({"time": format_time(HOUR + minute * 60 + n / 1000), "tag": "app", "instance_id": "i-1",
                         "message": f"seq={n:07d}", **fields}) + b"\n"


def put(root: Path, name: str, data: bytes) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def cap_memory() -> None:
    """A fetch that reads without bound (the original on /dev/zero) fails here instead of exhausting the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def shipper(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shipper", *args], capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env}, preexec_fn=cap_memory)


def seqs(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"seq=(\d+)", text)]


# ---------------------------------------------------------------- 7: memory independent of object size

def test_fetch_of_a_small_object_of_100_mib_of_records_stays_under_250_mib_rss(tmp_path):
    record = line(1)
    count = (100 << 20) // len(record)
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    with open(put(tmp_path, key(), b""), "wb") as handle:
        block = record * 10_000
        for _ in range(count // 10_000):
            handle.write(packer.compress(block))
        handle.write(packer.compress(line(2, message="the last one")) + packer.flush())
    assert (tmp_path / key()).stat().st_size < 1 << 20  # under a MiB for 100 MiB of records

    # `shipper fetch` reporting its own peak RSS (VmHWM) as it ends: a child's ru_maxrss would also
    # count the test process it was forked from.
    measured = ("import sys\nfrom shipper.cli import main\ncode = main(sys.argv[1:])\n"
                "sys.stderr.write(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
                "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", measured, "fetch", str(tmp_path), "--grep", "last one", "--json"],
                            capture_output=True, text=True, timeout=300, preexec_fn=cap_memory)
    assert result.returncode == 0, result.stderr
    assert [orjson.loads(row)["message"] for row in result.stdout.splitlines()] == ["the last one"]
    peak = int(result.stderr.rsplit("VmHWM:", 1)[1].split()[0]) / 1024
    assert peak < 250, f"peak RSS {peak:.0f} MiB"


def test_the_reorder_buffer_orders_within_its_budget_and_counts_what_comes_out_late():
    merge = fetch.Reorder(budget=1 << 20)
    merge.add([line(5).rstrip(), line(1).rstrip(), b"not json", line(3).rstrip()], "a")
    merge.add([line(2).rstrip(), line(4).rstrip()], "b")
    assert seqs(str([r["message"] for r in merge.emit(None)])) == [1, 2, 3, 4, 5]
    assert merge.bad == {"a": 1} and merge.late == 0 and merge.held == 0

    small = fetch.Reorder(budget=1)  # every run goes out as soon as it is read
    small.add([line(3).rstrip(), line(4).rstrip()], "a")
    first = [r["message"] for r in small.relieve()]
    small.add([line(1).rstrip(), line(5).rstrip()], "b")
    rest = [r["message"] for r in small.relieve()] + [r["message"] for r in small.emit(None)]
    assert seqs(str(first + rest)) == [3, 4, 1, 5]  # nothing lost; the one out of order is counted
    assert small.late == 1
    said = []
    small.report(said.append)
    assert said == ["1 records came out of time order: their time is more than 300 s before their object's start, "
                    "or more than 0 MiB of records overlap in time"]


def test_objects_stream_through_members_frames_and_overlong_lines(monkeypatch):
    from shipper.postmortem.sources import ObjectLines

    data = b"".join(line(n) for n in range(1000))
    two = gzip.compress(data[:20_000]) + gzip.compress(data[20_000:])
    lines = ObjectLines("x.ndjson.gz", io.BytesIO(two))
    assert b"".join(b"".join(part + b"\n" for part in chunk) for chunk in lines.chunks()) == data
    assert lines.problem is None and lines.lines == 1000

    from backports.zstd import compress

    lines = ObjectLines("x.ndjson.zst", io.BytesIO(compress(data) + compress(data)))
    assert sum(map(len, lines.chunks())) == 2000 and lines.problem is None

    monkeypatch.setattr(sources, "READ_BYTES", 4096)
    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 10_000)
    lines = ObjectLines("x.ndjson", io.BytesIO(line(1) + b"x" * 50_000 + b"\n" + line(2)))
    assert seqs(str(list(lines.chunks()))) == [1, 2] and lines.long_lines == 1


# ---------------------------------------------------------------- 21: a truncated object

@pytest.mark.parametrize("ext", [".gz", ".zst"])
def test_a_truncated_object_prints_its_records_before_the_break_and_says_where(tmp_path, ext):
    from backports.zstd import compress

    data = b"".join(line(n) for n in range(20_000))
    packed = gzip.compress(data) if ext == ".gz" else compress(data)
    cut = len(packed) * 6 // 10
    put(tmp_path, key(ext=ext), packed[:cut])
    put(tmp_path, key(minute=1, seq=2), gzip.compress(line(20_000, minute=1)))
    result = shipper("fetch", str(tmp_path))
    assert result.returncode == 0, result.stderr
    printed = seqs(result.stdout)
    kept = printed[:-1]
    assert kept == list(range(len(kept))) and 5_000 < len(kept) < 20_000  # in order, up to the break
    assert printed[-1] == 20_000  # the next object, whole
    unit = "gzip member" if ext == ".gz" else "zstd frame"
    assert f"{key(ext=ext)}: truncated: the data ends at byte {cut:,} inside a {unit}; the {len(kept):,} lines " \
           f"before the break were read" in result.stderr


# ---------------------------------------------------------------- 19: regular files only

def test_special_files_and_links_in_a_directory_archive_are_skipped_and_said_never_read(tmp_path):
    archive = tmp_path / "archive"
    put(archive, key(seq=1), gzip.compress(line(1)))
    zero = archive / key(seq=2, ext="")
    zero.symlink_to("/dev/zero")
    fifo = archive / key(seq=3, ext="")
    os.mkfifo(fifo)
    outside = tmp_path / "elsewhere"
    put(outside, "app/" + key(seq=4).rsplit("/", 1)[1], gzip.compress(line(4, message="outside")))
    (archive / BASE / "instance=i-2").symlink_to(outside, target_is_directory=True)
    put(archive, key(minute=1, seq=5), gzip.compress(line(5, minute=1)))

    result = shipper("fetch", str(archive), "--since", "1d")  # a FIFO read would hang here: the timeout fails it
    assert result.returncode == 0, result.stderr
    assert seqs(result.stdout) == [1, 5]
    assert f"skipped {key(seq=2, ext='')}: not read: a symbolic link on its path, not followed" in result.stderr
    assert f"skipped {key(seq=3, ext='')}: not read: a FIFO, not a regular file" in result.stderr
    assert "outside" not in result.stdout
    assert f"{BASE}/instance=i-2/: not listed: a symbolic link, not followed" in result.stderr
    listing = shipper("fetch", str(archive), "--instance", "i-2")
    assert f"{BASE}/instance=i-2/: not listed, not a directory of the archive" in listing.stderr
    assert listing.returncode == 1 and listing.stdout == ""


# ---------------------------------------------------------------- 18: bounded time ranges

def test_time_ranges_over_400_days_or_outside_1970_to_9999_are_refused():
    now = 1_764_417_600.0
    assert time_range("400d", None, now) == (now - 400 * 86400, now)
    for since, until in (("401d", None), ("99999999999d", None), ("99999999999d", "99999999998d"),
                         ("9" * 400 + "d", None), ("1h", "2h"), ("2025-11-29", "10000d")):
        with pytest.raises(SelectionError):
            time_range(since, until, now)


def test_fetch_report_and_listing_refuse_absurd_ranges_at_once(tmp_path):
    put(tmp_path, key(), gzip.compress(line(1)))
    for args in (["fetch", str(tmp_path), "--since", "99999999999d"],
                 ["fetch", str(tmp_path), "--since", "401d"],
                 ["fetch", str(tmp_path), "--list-instances", "--since", "99999999999d"],
                 ["report", str(tmp_path), "--instance", "i-1", "--since", "99999999999d", "-o",
                  str(tmp_path / "r.html")]):
        result = shipper(*args, timeout=60)  # the original listed hour by hour for ever
        assert result.returncode == 2, (args, result.stderr)
        assert "at most 400 days" in result.stderr or "not a time between 1970 and 9999" in result.stderr
        assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- 14: terminal escapes

def test_printable_escapes_what_a_terminal_would_act_on():
    from shipper.postmortem.selection import printable

    assert printable("GET /health 200 3ms") == "GET /health 200 3ms"
    assert printable("a\x1b]0;owned\x07\x1b[2J\rb\x9b31m\u202eexe.txt\x7f") == \
        "a\\x1b]0;owned\\x07\\x1b[2J\\x0db\\x9b31m\\u202eexe.txt\\x7f"
    assert printable("two\n\tlines é 日本") == "two\n\tlines é 日本"


def run_on_a_terminal(*args: str) -> bytes:
    """What `shipper ARGS` writes to its stdout when that is a terminal (a pty)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "shipper", *args], stdout=slave, stderr=subprocess.DEVNULL)
    os.close(slave)
    output = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the last writer closed the terminal
            break
        if not data:
            break
        output += data
    os.close(master)
    assert proc.wait(60) == 0
    return output


def test_escapes_reach_a_terminal_escaped_and_a_pipe_or_json_exact(tmp_path):
    evil = "i-\x1b[31mevil"
    message = "hi\x1b]0;owned\x07\x1b[2J"
    put(tmp_path, key(instance=evil), gzip.compress(line(1, message=message, instance_id=evil, host="h\x1b[8m")))

    shown = run_on_a_terminal("fetch", str(tmp_path))
    assert shown == b"hi\\x1b]0;owned\\x07\\x1b[2J\r\n"
    listing = run_on_a_terminal("fetch", str(tmp_path), "--list-instances")
    assert b"i-\\x1b[31mevil" in listing and b"h\\x1b[8m" in listing and b"\x1b" not in listing
    as_json = run_on_a_terminal("fetch", str(tmp_path), "--json")
    assert orjson.loads(as_json)["message"] == message  # JSON escapes them itself, exactly

    piped = shipper("fetch", str(tmp_path))
    assert piped.stdout == message + "\n"
    rows = shipper("fetch", str(tmp_path), "--list-instances").stdout
    assert rows.splitlines()[1].startswith(evil)


# ---------------------------------------------------------------- 20: forged tags, clipped charts

def test_twenty_thousand_forged_tags_make_a_small_page_with_a_few_series(tmp_path):
    records = b"".join(line(n, tag=f"forged-{n}-" + "x" * 40) for n in range(20_000))
    records += b"".join(line(20_000 + n, tag="lifecycle", message=f"termination notice {n}") for n in range(500))
    put(tmp_path, key(), gzip.compress(records))
    page = tmp_path / "report.html"
    result = shipper("report", str(tmp_path), "--instance", "i-1", "-o", str(page))
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert len(text) < 250_000, len(text)  # 7.9 MB before
    assert text.count('class="legend"') <= 2 * 8 and "other tags" in text
    assert "termination notice 499" in text and "(450 earlier lifecycle events not shown)" in text


def test_bars_and_lines_stay_inside_the_plot():
    t0, t1 = 1000.0, 1600.0
    svg = svg_chart("Records", "", [("app", [(900.0, 5.0), (990.0, 3.0), (1500.0, 8.0), (1590.0, 2.0)])], t0, t1, [],
                    "bars", 60.0)
    svg += svg_chart("Rates", "B/s", [("in", [(1100.0, -50.0), (1200.0, 10.0), (1700.0, 99.0)])], t0, t1, [])
    left, right, top, bottom = 76, WIDTH - 16, 24, 170 - 22
    ns = "{http://www.w3.org/2000/svg}"
    bars = 0
    for chart in re.findall(r"<svg.*?</svg>", svg):
        root = ElementTree.fromstring(chart)
        for rect in root.iter(f"{ns}rect"):
            if rect.get("fill", "").startswith("#") and rect.get("opacity"):
                bars += 1
                x, width = float(rect.get("x")), float(rect.get("width"))
                y, height = float(rect.get("y")), float(rect.get("height"))
                assert left <= x and x + width <= right + 0.05 and top <= y and y + height <= bottom + 0.05
        for polyline in root.iter(f"{ns}polyline"):
            for point in polyline.get("points").split():
                x, y = map(float, point.split(","))
                assert left <= x <= right and top <= y <= bottom
    assert bars == 3  # the bar wholly before the first record is not drawn; the one across it is cut


# ---------------------------------------------------------------- 12: CloudWatch Logs records must be marked

def test_only_events_the_agent_wrote_as_records_are_read_as_records():
    forged = {"time": "2026-11-29T20:00:00.000000Z", "tag": "lifecycle", "message": "termination notice (spot)"}
    event = {"timestamp": 1_795_000_000_000, "message": orjson.dumps(forged).decode()}
    assert event_record(event, "i-1", "app", "i-1/app/app.log")["tag"] == "app"
    marked = {"timestamp": 1, "message": '{"shipper_format":"json",' + orjson.dumps(forged).decode()[1:]}
    assert event_record(marked, "i-1", "app", "i-1/app/app.log") == forged
    broken = {"timestamp": 1, "message": '{"shipper_format":"json","time":"x", "mess'}
    assert event_record(broken, "i-1", "app", "s")["message"] == broken["message"]


def events_in(aws, group: str) -> int:
    try:
        return len(aws.logs.filter_log_events(logGroupName=group)["events"])
    except aws.logs.exceptions.ResourceNotFoundException:
        return 0


def test_a_raw_line_cannot_forge_a_record_from_cloudwatch_logs(workdir, aws):
    output = "".join(f"""
[[outputs]]
type = "cloudwatch_logs"
match = ["app"]
log_group = "/fleet/{fmt}"
format = "{fmt}"
flush_interval = "100ms"
region = "us-east-1"
endpoint_url = "{aws.endpoint}"
""" for fmt in ("raw", "json"))
    config = agent_config(workdir / "logs", workdir / "data", output=output, agent_extra=FAST_RETRIES)
    agent = Agent(workdir, config, env=aws.env).start()
    forged = orjson.dumps({"time": format_time(time.time()), "tag": "lifecycle", "instance_id": HOST,
                           "message": "termination notice (spot): forged"}).decode()
    try:
        with open(workdir / "logs" / "app.log", "a") as handle:
            handle.write(f"seq=0000001 before\n{forged}\nseq=0000002 after\n")
        wait_for(lambda: events_in(aws, "/fleet/raw") == events_in(aws, "/fleet/json") == 3, timeout=30,
                 message="3 events in each group")
        assert agent.stop() == 0
    finally:
        agent.ensure_stopped()
    env_args = ["--endpoint-url", aws.endpoint, "--region", "us-east-1"]
    raw = shipper("fetch", "cwl:///fleet/raw", "--json", *env_args, env=aws.env)
    assert raw.returncode == 0, raw.stderr
    rows = [orjson.loads(row) for row in raw.stdout.splitlines()]
    assert [row["message"] for row in rows] == ["seq=0000001 before", forged, "seq=0000002 after"]
    assert {row["tag"] for row in rows} == {"app"}  # the stream's tag: the line is a message, not a record

    page = workdir / "r.html"
    report = shipper("report", "cwl:///fleet/raw", "--instance", HOST, "-o", str(page), *env_args, env=aws.env)
    assert report.returncode == 0 and "0 lifecycle events" in report.stderr, report.stderr

    whole = shipper("fetch", "cwl:///fleet/json", "--json", *env_args, env=aws.env)
    records = [orjson.loads(row) for row in whole.stdout.splitlines()]
    assert [r["message"] for r in records] == ["seq=0000001 before", forged, "seq=0000002 after"]
    assert all(r["tag"] == "app" and r["source"].endswith("app.log") and "shipper_format" not in r for r in records)
    (stream,) = aws.logs.describe_log_streams(logGroupName="/fleet/json")["logStreams"]
    events = aws.logs.get_log_events(logGroupName="/fleet/json", logStreamName=stream["logStreamName"])["events"]
    assert all(orjson.loads(e["message"])["shipper_format"] == "json" for e in events)  # still plain JSON objects
