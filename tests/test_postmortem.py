"""`shipper fetch` and `shipper report`: the selection logic as pure functions, then against archives the
agent itself filled (a directory, the moto server's S3 and CloudWatch Logs), and the report in a real
headless Chromium."""

from __future__ import annotations

import gzip
import os
import re
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import orjson
import pytest

from aws import s3_output
from conftest import FAST_RETRIES, Agent, agent_config, wait_for
from shipper.postmortem.report import reduce_series, summarize, svg_chart
from shipper.postmortem.selection import (Filter, SelectionError, check_level, hour_prefixes, level_of, parse_key,
                                          parse_time, render)

HOST = socket.gethostname()


# ---------------------------------------------------------------- pure selection logic

def test_parse_time_takes_durations_ago_iso_times_dates_and_epochs():
    now = 1_764_417_600.0  # 2025-11-29T12:00:00Z
    assert parse_time("2h", now) == now - 7200
    assert parse_time("30m", now) == now - 1800
    assert parse_time("1d", now) == now - 86400
    assert parse_time("2025-11-29T10:00:00Z", now) == now - 7200
    assert parse_time("2025-11-29 10:00", now) == now - 7200  # no zone: UTC
    assert parse_time("2025-11-29T11:00:00+01:00", now) == now - 7200
    assert parse_time("2025-11-29", now) == now - 12 * 3600
    assert parse_time("1764410400", now) == now - 7200
    with pytest.raises(SelectionError, match="neither a time"):
        parse_time("yesterday", now)
    with pytest.raises(SelectionError, match="one of trace, debug"):
        check_level("loud")
    assert check_level("WARN") == "warn"  # the level names of shipper.filters


def test_keys_are_parsed_and_only_the_asked_hours_are_listed():
    ref = parse_key("fleet/dt=2026-11-29/hour=23/instance=i-0abc/app/20261129T235910Z-000042.ndjson.gz", 10)
    assert (ref.instance, ref.tag, ref.seq, ref.size) == ("i-0abc", "app", 42, 10)
    assert ref.start == parse_time("2026-11-29T23:59:10Z")
    assert parse_key("fleet/other/layout.json") is None
    assert parse_key("dt=2026-11-29/hour=23/instance=i-0abc/app/20261129T235910Z-000042.ndjson").tag == "app"
    since, until = parse_time("2026-11-29T22:30:00Z"), parse_time("2026-11-30T00:10:00Z")
    assert hour_prefixes(since, until, "fleet/", "i-0abc") == [
        "fleet/dt=2026-11-29/hour=22/instance=i-0abc/", "fleet/dt=2026-11-29/hour=23/instance=i-0abc/",
        "fleet/dt=2026-11-30/hour=00/instance=i-0abc/"]
    assert hour_prefixes(since, since) == ["dt=2026-11-29/hour=22/"]


def test_filter_by_time_tag_level_and_grep_and_render_a_format():
    wanted = Filter(parse_time("2026-11-29T10:00:00Z"), parse_time("2026-11-29T11:00:00Z"), ["app"],
                    re.compile("timeout"), "warning")
    base = {"time": "2026-11-29T10:30:00.000000Z", "tag": "app", "message": "db timeout", "level": "ERROR"}
    assert wanted.matches(base)
    assert not wanted.matches(base | {"time": "2026-11-29T11:00:01.000000Z"})
    assert not wanted.matches(base | {"tag": "syslog"})
    assert not wanted.matches(base | {"level": "info"})
    assert not wanted.matches(base | {"message": "all fine"})
    assert wanted.matches(base | {"level": None, "fields": {"severity": "warn"}})
    assert level_of({"priority": 3}) == "error" and level_of({"message": "x"}) is None
    assert render(base | {"labels": {"app": "web"}}, "{time} {labels.app} {missing} {message}") == \
        "2026-11-29T10:30:00.000000Z web  db timeout"
    assert render(base, None) == "db timeout"


def test_series_are_reduced_to_min_and_max_per_column_and_charts_draw_events():
    points = [(float(t), float(t % 97)) for t in range(86_400 // 10 * 10) if t % 10 == 0]  # a day at 10 s
    reduced = reduce_series(points, 0.0, 86_400.0, 800)
    assert len(reduced) <= 1600 and max(v for _, v in reduced) == 96 and min(v for _, v in reduced) == 0
    assert reduced == sorted(reduced)
    svg = svg_chart("CPU", "%", [("total", points)], 0.0, 86_400.0, [(43_200.0, "termination notice")])
    assert svg.count("<polyline") == 1 and "termination notice" in svg and svg.startswith("<svg")
    assert "no data" in svg_chart("Load", "", [], 0.0, 60.0, [])


# ---------------------------------------------------------------- against real archives

def shipper(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shipper", *args], capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


def fill_archive(workdir: Path, output: str | None = None, env: dict | None = None, lines: int = 300,
                 metrics: bool = True) -> None:
    """Run the agent on two files (tags app and web) and metrics every second; stop it once all is shipped."""
    metrics_input = '[[inputs]]\ntype = "metrics"\ninterval = "1s"\n' if metrics else ""
    config = agent_config(workdir / "logs", workdir / "data", output=output, agent_extra=FAST_RETRIES,
                          pattern="app.log", input_extra=f'\n[[inputs]]\ntype = "file"\ntag = "web"\n'
                                                         f'paths = ["{workdir}/logs/web.log"]\npoll_interval = "50ms"\n'
                                                         f'{metrics_input}')
    for name in ("app.log", "web.log"):  # followed from the start: no discovery race between the two
        (workdir / "logs" / name).touch()
    agent = Agent(workdir, config, env=env).start()
    try:
        # Both inputs follow their file before the first line: else, on a slow start, lines of the two
        # files already written are read in any order, and their read times (the records' times) too.
        wait_for(lambda: all(f"tailing {workdir / 'logs' / name}" in agent.log() for name in ("app.log", "web.log")),
                 timeout=30, message="the agent tailing both files")
        for n in range(lines):
            name = "app.log" if n % 3 else "web.log"
            with open(workdir / "logs" / name, "a") as handle:
                handle.write(f"seq={n:05d} {'ERROR' if n % 50 == 0 else 'INFO'} request {n}\n")
            if n % 50 == 0:
                time.sleep(0.3)
        time.sleep(2.5)  # a few metrics samples
        assert agent.stop() == 0
    finally:
        agent.ensure_stopped()


def seqs(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"seq=(\d+)", text)]


def test_fetch_from_a_directory_archive_returns_exactly_the_lines_in_time_order(workdir):
    fill_archive(workdir)
    archive = str(workdir / "data" / "archive")
    result = shipper("fetch", archive, "--instance", HOST, "--since", "10m")
    assert result.returncode == 0, result.stderr
    assert sorted(seqs(result.stdout)) == list(range(300))  # every line, once
    assert [s for s in seqs(result.stdout) if s % 3] == [s for s in range(300) if s % 3]  # app: in written order
    times = [orjson.loads(line)["time"] for line in shipper("fetch", archive, "--json").stdout.splitlines()]
    assert times == sorted(times) and len(times) > 300  # metrics samples too, merged in time order

    web = shipper("fetch", archive, "--tag", "web", "--format", "{tag} {host} {message}").stdout.splitlines()
    assert web and all(line.startswith(f"web {HOST} seq=") for line in web) and len(web) == 100
    errors = shipper("fetch", archive, "--grep", "request (0|50|100)$").stdout
    assert seqs(errors) == [0, 50, 100]
    # No parser: the level is detected from the message at read time (the lines say ERROR every 50th).
    assert seqs(shipper("fetch", archive, "--level", "error").stdout) == [0, 50, 100, 150, 200, 250]

    listing = shipper("fetch", archive, "--list-instances", "--since", "1h", "--json")
    rows = [orjson.loads(line) for line in listing.stdout.splitlines()]
    assert [row["instance"] for row in rows] == [HOST] and rows[0]["first"] < rows[0]["last"]
    assert set(rows[0]["tags"]) == {"app", "web", "metrics"}

    unknown = shipper("fetch", archive, "--instance", HOST[:-1] + "x")
    assert unknown.returncode == 1 and f"did you mean {HOST}" in unknown.stderr
    old = shipper("fetch", archive, "--until", "1h")
    assert old.returncode == 0 and old.stdout == ""


def test_a_truncated_object_is_reported_where_it_broke_and_the_rest_printed(workdir):
    fill_archive(workdir, metrics=False)
    archive = workdir / "data" / "archive"
    objects = sorted(archive.rglob("*.ndjson.gz"))
    victim = next(o for o in objects if "/web/" in str(o))
    inside = seqs(gzip.decompress(victim.read_bytes()).decode())
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated, as by a disk that filled up
    result = shipper("fetch", str(archive))
    assert result.returncode == 0
    assert f"{victim.relative_to(archive)}: truncated: the data ends at byte {len(data) // 2:,}" in result.stderr
    printed = seqs(result.stdout)
    kept = [s for s in printed if s in inside]
    assert kept == inside[:len(kept)] and len(kept) < len(inside)  # what came before the break, in order
    assert sorted(set(printed) - set(inside)) == sorted(set(range(300)) - set(inside))  # every other object whole


def test_fetch_from_s3_and_from_cloudwatch_logs_on_the_moto_server(workdir, aws):
    aws.s3.create_bucket(Bucket="fleet")
    output = s3_output(aws.endpoint, "fleet", prefix="prod", upload_interval="1s") + f"""
[[outputs]]
type = "cloudwatch_logs"
match = ["app", "web"]
log_group = "/fleet/prod"
format = "json"
flush_interval = "100ms"
region = "us-east-1"
endpoint_url = "{aws.endpoint}"
"""
    fill_archive(workdir, output=output, env=aws.env, metrics=False)
    env_args = ["--endpoint-url", aws.endpoint, "--region", "us-east-1"]
    from_s3 = shipper("fetch", "s3://fleet/prod", "--instance", HOST, *env_args, env=aws.env)
    assert from_s3.returncode == 0, from_s3.stderr
    assert sorted(seqs(from_s3.stdout)) == list(range(300))
    assert [s for s in seqs(from_s3.stdout) if s % 3] == [s for s in range(300) if s % 3]
    from_cwl = shipper("fetch", "cwl:///fleet/prod", "--instance", HOST, "--tag", "app", *env_args, env=aws.env)
    assert from_cwl.returncode == 0, from_cwl.stderr
    assert seqs(from_cwl.stdout) == [s for s in range(300) if s % 3]
    missing = shipper("fetch", "s3://no-such-bucket", *env_args, env=aws.env)
    assert missing.returncode == 1 and "cannot list s3://no-such-bucket" in missing.stderr


def png_is_not_blank(data: bytes) -> bool:
    """A PNG's pixels are not one flat colour (decoded with zlib; filters leave variety in place)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, idat = 8, b""
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        if kind == b"IDAT":
            idat += data[position + 8:position + 8 + length]
        position += 12 + length
    pixels = zlib.decompress(idat)
    return len(set(pixels)) > 20


def test_a_day_of_metrics_summarizes_into_charts_of_bounded_size():
    start = parse_time("2026-11-28T00:00:00Z")
    records = ({"time": f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(start + i * 10))}.000000Z",
                "tag": "metrics", "instance_id": "i-1",
                "metrics": {"cpu.percent": float(i % 100), "disk.used_percent": {"/": 50.0}}}
               for i in range(8640))
    summary = summarize(records)
    cpu = summary.metrics["cpu.percent"]
    assert len(cpu) <= 4096 and cpu == sorted(cpu) and summary.metrics["disk.used_percent[/]"]  # halved, in memory too
    assert (min(v for _, v in cpu), max(v for _, v in cpu)) == (0.0, 99.0) and cpu[-1][0] == start + 8639 * 10
    chart = svg_chart("CPU", "%", [("total", summary.metrics["cpu.percent"])], start, start + 86_400, [])
    assert len(chart) < 200_000  # a day of samples stays a light page


def test_event_times_before_their_object_start_come_out_in_order_and_odd_input_is_survived(tmp_path):
    """A parsed event time can be earlier than the read time the key carries; odd keys and fields do no harm."""
    def obj(key: str, records: list[dict]) -> None:
        path = tmp_path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in records)))

    base = "dt=2026-11-29/hour=13/instance=i-1/app/"
    obj(base + "20261129T130500Z-000001.ndjson.gz", [
        {"time": "2026-11-29T13:05:00.000000Z", "tag": "app", "message": "b"},
        {"time": "2026-11-29T13:09:00.000000Z", "tag": "app", "message": "d"}])
    obj(base + "20261129T131000Z-000002.ndjson.gz", [
        {"time": "2026-11-29T13:02:00.000000Z", "tag": "app", "message": "a (event time, read at 13:10)"},
        {"time": 1764421800, "tag": "app", "message": "numeric time"},
        {"time": "2026-11-29T13:06:00.000000Z", "tag": "app", "message": 42, "labels": ["not", "a", "map"]}])
    obj(base + "20261399T000000Z-000003.ndjson.gz", [{"time": "x", "tag": "app", "message": "bogus key"}])
    result = shipper("fetch", str(tmp_path), "--since", "2026-11-29T13:00Z", "--until", "2026-11-29T13:08Z")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["a (event time, read at 13:10)", "b", "42"]
    assert shipper("fetch", str(tmp_path), "--since", "2026-11-29T13:00Z", "--until", "2026-11-29T14:00Z",
                   "--grep", "4").stdout == "42\n"
    page = tmp_path / "r.html"
    report = shipper("report", str(tmp_path), "--instance", "i-1", "--since", "2026-11-29T13:00Z",
                     "--until", "2026-11-29T14:00Z", "-o", str(page))
    assert report.returncode == 0, report.stderr
    assert "event time, read at 13:10" in page.read_text()
