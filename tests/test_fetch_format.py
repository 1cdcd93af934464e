"""`shipper fetch` output and selection (issue 17, items 1, 2 and 4): --format with nested fields and
JSON values, an unknown field named, metrics samples left out of the plain output unless asked for,
--level on plain lines (no parser) by the level their message shows, --patterns, and `report`
taking the same selection as fetch. The pure Format first, then the CLI as a subprocess on real
directory archives."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from shipper.postmortem.selection import Format, FormatError, render

HOUR = "dt=2026-11-29/hour=13/"
SINCE, UNTIL = "2026-11-29T13:00Z", "2026-11-29T14:00Z"


def stamp(minute: int, second: float = 0.0) -> str:
    return f"2026-11-29T13:{minute:02d}:{second:09.6f}Z"


TRACEBACK = ("Traceback (most recent call last):\n  File \"/app/worker.py\", line 88, in run\n    rows = load()\n"
             "MemoryError")
APP = [  # plain lines, no parser: no level field
    {"time": stamp(1), "tag": "app", "host": "vm", "message": "INFO started worker 1"},
    {"time": stamp(2), "tag": "app", "host": "vm", "message": "2026-11-29 13:02:00 ERROR db timeout after 30 ms"},
    {"time": stamp(3), "tag": "app", "host": "vm", "message": "WARN disk /data 91% full"},
    {"time": stamp(20), "tag": "app", "host": "vm", "message": "2026-11-29 13:20:00 ERROR db timeout after 45 ms"},
    {"time": stamp(40), "tag": "app", "host": "vm", "message": "INFO request 7 done"},
    {"time": stamp(56), "tag": "app", "host": "vm", "message": "2026-11-29 13:56:00 ERROR db timeout after 60 ms"},
    {"time": stamp(57), "tag": "app", "host": "vm", "message": TRACEBACK},
    {"time": stamp(58), "tag": "app", "host": "vm", "message": "CRITICAL out of memory"},
]
JSON = [  # parsed records: the parsed level wins over the words of the message
    {"time": stamp(10), "tag": "api", "host": "vm", "message": "ERROR in the text, info in the field",
     "level": "info", "fields": {"user": "bob", "time": "13:10"}, "labels": {"app": "web", "team": "core"},
     "tags": ["a", "b"], "status": 502, "ok": False},
]
METRICS = [{"time": stamp(m), "tag": "metrics", "host": "vm",
            "metrics": {"cpu.percent": 3.5 + m, "disk.used_percent": {"/": 40, "/data": 91}}} for m in (1, 30, 59)]


def write(root: Path, key: str, records: list[dict]) -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in records)))


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """One instance (vm) in the 13:00 hour: plain app lines, a parsed api record, metrics samples."""
    root = tmp_path_factory.mktemp("archive")
    write(root, HOUR + "instance=vm/app/20261129T130100Z-000001.ndjson.gz", APP)
    write(root, HOUR + "instance=vm/api/20261129T131000Z-000001.ndjson.gz", JSON)
    write(root, HOUR + "instance=vm/metrics/20261129T130100Z-000001.ndjson.gz", METRICS)
    return root


def shipper(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shipper", *args], capture_output=True, text=True, timeout=60)


def fetch(archive: Path, *args: str) -> subprocess.CompletedProcess:
    return shipper("fetch", str(archive), "--since", SINCE, "--until", UNTIL, *args)


# ---------------------------------------------------------------- Format, pure

def test_nested_fields_and_json_values():
    record = JSON[0] | {"metrics": METRICS[0]["metrics"]}
    assert render(record, "{fields.user} {labels.app} {status} {ok} {tags} {labels}") == \
        'bob web 502 false ["a","b"] {"app":"web","team":"core"}'
    assert render(record, "{metrics.cpu.percent}|{metrics.disk.used_percent./data}|{metrics.disk.used_percent}") == \
        '4.5|91|{"/":40,"/data":91}'
    assert render(record, "{level} {{literal}} {fields.time}") == "info {literal} 13:10"
    assert render({"message": "WARN low disk"}, "[{level}] {message}") == "[warn] WARN low disk"
    assert render({"message": "plain"}, "[{level}]") == "[]"      # no level: empty, never "None"
    assert render({"message": None, "x": None}, "<{x}>") == "<>"
    assert render({"metrics": {"cpu.percent": 1}}, None) == '{"metrics":{"cpu.percent":1}}'  # no message: JSON


def test_a_field_no_record_has_is_named_and_one_some_records_have_is_not():
    template = Format("{time} {fields.user} {nope} {labels.ap}")
    for record in APP + JSON:
        template.render(record)
    assert template.unknown() == ["nope", "labels.ap"]   # fields.user: one record has it, fine
    error = template.unknown_error(["time", "tag", "message"])
    assert isinstance(error, FormatError)
    assert str(error) == ("--format: unknown field {nope}, {labels.ap}: no record has it (9 records printed) "
                          "(the records have message, tag, time)")
    assert Format("{nope}").unknown() == []   # nothing printed: nothing to say


@pytest.mark.parametrize("template, said", [
    ("{", "a lone '{' at character 1"), ("x}", "a lone '}' at character 2"),
    ("{}", "{} names no field"), ("{a..b}", "{a..b} names no field"), ("{.a}", "{.a} names no field"),
])
def test_a_broken_template_is_refused_saying_where(template, said):
    with pytest.raises(FormatError, match=f"--format '{template}'.*" + said.replace("{", r"\{").replace("}", r"\}")):
        Format(template)


# ---------------------------------------------------------------- the CLI

def test_plain_output_leaves_out_metrics_samples_unless_asked(archive):
    plain = fetch(archive)
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.split("\n")
    assert "cpu.percent" not in plain.stdout and "INFO started worker 1" in lines and "MemoryError" in lines
    assert plain.stdout.count("\n") == len(APP) + len(JSON) + TRACEBACK.count("\n")  # every message, once
    every = fetch(archive, "--all").stdout.splitlines()
    samples = [orjson.loads(line) for line in every if line.startswith("{")]
    assert samples == METRICS                      # asked for: as their JSON, in time order with the rest
    assert len(fetch(archive, "--json").stdout.splitlines()) == len(APP) + len(JSON) + len(METRICS)


def test_format_cases_on_the_command_line(archive):
    result = fetch(archive, "--tag", "api", "--format", "{time} {level} {fields.user} {labels} {tags}")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f'{stamp(10)} info bob {{"app":"web","team":"core"}} ["a","b"]\n'
    cpu = fetch(archive, "--format", "{time} {metrics.cpu.percent}", "--tag", "metrics")
    assert cpu.returncode == 0, cpu.stderr
    assert cpu.stdout.splitlines() == [f"{stamp(m)} {3.5 + m}" for m in (1, 30, 59)]  # a metrics field: samples in
    levels = fetch(archive, "--tag", "app", "--format", "{level}").stdout.split("\n")
    assert levels[:8] == ["info", "error", "warn", "error", "info", "error", "error", "critical"]


def test_an_unknown_field_is_an_error_naming_it(archive):
    result = fetch(archive, "--format", "{time} {mesage}")
    assert result.returncode == 2
    assert "--format: unknown field {mesage}: no record has it" in result.stderr
    assert "message" in result.stderr.split("the records have", 1)[1]   # what there is instead
    broken = fetch(archive, "--format", "{time")
    assert broken.returncode == 2 and broken.stdout == "" and "a lone '{' at character 1" in broken.stderr


def test_level_error_on_plain_lines_finds_the_error_lines(archive):
    errors = fetch(archive, "--level", "error")
    assert errors.returncode == 0, errors.stderr
    assert errors.stdout.split("\n")[:-1] == [APP[1]["message"], APP[3]["message"], APP[5]["message"],
                                              *TRACEBACK.split("\n"), "CRITICAL out of memory"]
    # the parsed "info" of the api record wins over the ERROR in its text
    assert "in the field" not in errors.stdout
    warnings = fetch(archive, "--level", "WARNING", "--tag", "app").stdout
    assert "WARN disk /data 91% full" in warnings and "INFO" not in warnings
    assert fetch(archive, "--level", "fatal").stderr.startswith("shipper fetch: --level fatal matched nothing")
    bad = fetch(archive, "--level", "loud")
    assert bad.returncode == 2 and "--level 'loud': one of trace, debug, info" in bad.stderr


def test_patterns_of_errors_and_warnings_over_the_range_and_the_last_5_minutes(archive):
    result = fetch(archive, "--patterns")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("6 errors and warnings among 12 records, 4 patterns\n")
    whole, recent = text.split("Top patterns in the last 5 minutes before the end", 1)
    # over the range: the db timeouts first (3), with first and last time, and the first one as example
    first = whole.split("Top patterns over the range:\n", 1)[1].split("\n")
    assert first[0].split() == ["3", "error", "first", stamp(2), "last", stamp(56), "[p1]"]
    assert first[1].strip() == "<TIME> ERROR db timeout after <NUM> ms"
    assert first[2].strip() == f"e.g. {stamp(2)} vm app: {APP[1]['message']}"
    assert "Traceback ... MemoryError" in whole and "line 88, in run" in whole  # the full example, all its lines
    assert "WARN disk /data <NUM>% full" in whole
    # the last 5 minutes before the last record (13:59): the 13:56 timeout, the traceback, the OOM; not 13:03
    assert recent.startswith(f" ({stamp(54)} to {stamp(59)}):\n")
    assert "CRITICAL out of memory" in recent and "MemoryError" in recent and "WARN disk" not in recent
    timeouts = [line for line in recent.split("\n") if line.strip().startswith("1 ") and "[p1]" in line]
    assert timeouts and timeouts[0].split()[3] == stamp(56)   # counted in the window only: 1, from 13:56

    rows = [orjson.loads(line) for line in fetch(archive, "--patterns", "2", "--json").stdout.splitlines()]
    assert [(r["window"], r["count"]) for r in rows] == [("range", 3), ("range", 1), ("last_5m", 1), ("last_5m", 1)]
    assert rows[0]["example"] == APP[1] and rows[0]["first"] == stamp(2) and rows[0]["level"] == "error"
    assert rows[0]["anchor"] == "p1"


def test_patterns_when_there_are_no_errors(archive):
    result = fetch(archive, "--patterns", "--tag", "metrics")
    assert result.returncode == 0 and result.stdout == "no errors or warnings among the 3 records read\n"
    assert fetch(archive, "--patterns", "0").returncode == 2   # 1 to 1000


@pytest.fixture(scope="module")
def two_instances(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two")
    write(root, HOUR + "instance=i-0aaa/app/20261129T130100Z-000001.ndjson.gz",
          [r | {"host": "web-a"} for r in APP])
    write(root, HOUR + "instance=i-0bbb/app/20261129T130100Z-000001.ndjson.gz",
          [APP[0] | {"host": "web-b"}])
    return root


def report(source: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return shipper("report", str(source), "--since", SINCE, "--until", UNTIL, "-o", str(out), *args)


def test_report_needs_no_selection_for_one_instance_and_says_which_when_several(archive, two_instances, tmp_path):
    alone = report(archive, tmp_path / "one.html")
    assert alone.returncode == 0, alone.stderr
    assert "12 records" in alone.stderr and "CRITICAL out of memory" in (tmp_path / "one.html").read_text()
    several = report(two_instances, tmp_path / "two.html")
    assert several.returncode == 2 and not (tmp_path / "two.html").exists()
    assert "2 instances have records in the range: i-0aaa, i-0bbb; choose one with --instance (or --host" \
        in several.stderr
    by_host = report(two_instances, tmp_path / "host.html", "--host", "web-b")
    assert by_host.returncode == 0, by_host.stderr
    assert "1 records" in by_host.stderr or "1 record" in by_host.stderr
    by_instance = report(two_instances, tmp_path / "inst.html", "--instance", "i-0aaa")
    assert by_instance.returncode == 0 and f"{len(APP)} records" in by_instance.stderr
    empty = report(two_instances, tmp_path / "none.html", "--since", "2026-11-28T00:00Z", "--until", "2026-11-28T01:00Z")
    assert empty.returncode == 1 and "no records in" in empty.stderr
