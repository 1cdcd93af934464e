"""When `shipper fetch` prints nothing, it says which filter matched nothing: an unknown instance (with
the nearest names), a tag the instance has no records of (with the tags it has), a time range its
records miss (with the range they cover), or --host/--level/--grep (with how many records were read).
Pure functions first, then the CLI as a subprocess on a real directory archive."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from shipper.postmortem.fetch import nothing_listed
from shipper.postmortem.selection import Filter, Funnel, parse_time

SINCE, UNTIL = "2026-11-29T13:00:00.000000Z", "2026-11-29T14:00:00.000000Z"
BETWEEN = f"between {SINCE} and {UNTIL}"

RECORDS = [  # instance vm, tag app, host vm
    {"time": "2026-11-29T13:05:00.000000Z", "tag": "app", "host": "vm", "message": "GET / 200", "level": "info"},
    {"time": "2026-11-29T13:06:00.000000Z", "tag": "app", "host": "vm", "message": "db timeout", "level": "error"},
    {"time": "2026-11-29T13:09:00.000000Z", "tag": "app", "host": "vm", "message": "GET /x 404", "level": "info"},
]


def funnel(records: list[dict], host: str | None = None, **options) -> Funnel:
    wanted = Filter(parse_time(options.pop("since", SINCE)), parse_time(options.pop("until", UNTIL)), **options)
    counted = Funnel(wanted, host)
    matched = [r for r in records if counted.count(r)]
    assert matched == [r for r in records if wanted.matches(r) and (host is None or r.get("host") == host)]
    return counted


# ---------------------------------------------------------------- pure

def test_the_funnel_names_the_filter_that_let_no_record_through():
    assert funnel(RECORDS, grep=re.compile("nosuch")).explain() == \
        f"--grep 'nosuch' matched nothing: 3 records read {BETWEEN}"
    assert funnel(RECORDS, level="error", grep=re.compile("GET")).explain() == \
        f"--grep 'GET' matched nothing: 3 records read {BETWEEN}, 1 of them at level error or more severe"
    assert funnel(RECORDS, "web-9").explain() == \
        f"--host web-9 matched nothing: 3 records read {BETWEEN} (hosts there: vm)"
    # A filter that let every record through goes unsaid.
    assert funnel(RECORDS, "vm", level="critical").explain() == \
        f"--level critical matched nothing: 3 records read {BETWEEN}"
    assert funnel(RECORDS + [RECORDS[1] | {"host": "db"}], "vm", level="error", grep=re.compile("GET")).explain() == \
        (f"--grep 'GET' matched nothing: 4 records read {BETWEEN}, 3 of them of that host, "
         f"1 of them at level error or more severe")
    late = funnel(RECORDS, since="2026-11-29T13:20:00Z", until="2026-11-29T13:30:00Z").explain()
    assert late == ("no records between 2026-11-29T13:20:00.000000Z and 2026-11-29T13:30:00.000000Z: the 3 records "
                    "read from the objects of that range are from 2026-11-29T13:05:00.000000Z to "
                    "2026-11-29T13:09:00.000000Z")
    assert funnel(RECORDS[:1], tags=["web"]).explain() == f"--tag web matched nothing: 1 record read {BETWEEN}"


def test_filter_miss_agrees_with_matches_on_every_kind_of_record():
    wanted = Filter(parse_time(SINCE), parse_time(UNTIL), ["app"], re.compile("timeout"), "warning")
    odd = [{"time": 17, "tag": "app"}, {"tag": "app"}, {"time": SINCE, "tag": "app", "message": None, "level": 3},
           {"time": UNTIL, "tag": "app", "message": "timeout", "fields": {"severity": "crit"}}, {"time": "x"}]
    for record in RECORDS + odd + [r | {"tag": "web"} for r in RECORDS]:
        assert (wanted.miss(record) is None) == wanted.matches(record), record


def test_nothing_listed_says_instance_tag_or_range():
    since, until = parse_time(SINCE), parse_time(UNTIL)
    # The instance is there, the tag is not: its tags, never "did you mean vm?".
    assert nothing_listed("/a", since, until, "vm", ["nosuchtag"], ["app", "metrics"], None) == \
        f"--tag nosuchtag matched nothing: instance vm has records of tags app, metrics in /a {BETWEEN}"
    assert nothing_listed("/a", since, until, "vmx", ["app"], [], ["vm", "web-1"]) == \
        f"no records of instance vmx in /a {BETWEEN}; did you mean vm?"
    assert nothing_listed("/a", since, until, "i-0zzz", None, [], ["vm", "web-1"]) == \
        f"no records of instance i-0zzz in /a {BETWEEN} (2 other instances there: --list-instances)"
    assert nothing_listed("/a", since, until, "vm", None, [], []) == \
        f"no records of instance vm in /a {BETWEEN}: it holds no records of that range at all"
    assert nothing_listed("/a", since, until, None, ["db"], ["app"], None) == \
        f"--tag db matched nothing: /a has records of tag app {BETWEEN}"
    assert nothing_listed("/a", since, until, None, None, [], None) == f"no records in /a {BETWEEN}"


# ---------------------------------------------------------------- the CLI on a directory archive

@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Instance vm: tags app (two objects) and metrics, in the 13:00 hour of 2026-11-29."""
    root = tmp_path_factory.mktemp("archive")

    def obj(key: str, records: list[dict]) -> None:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in records)))

    base = "dt=2026-11-29/hour=13/instance=vm/"
    obj(base + "app/20261129T130500Z-000001.ndjson.gz", RECORDS[:2])
    obj(base + "app/20261129T130900Z-000002.ndjson.gz", RECORDS[2:])
    obj(base + "metrics/20261129T130500Z-000001.ndjson.gz",
        [{"time": "2026-11-29T13:05:00.000000Z", "tag": "metrics", "host": "vm", "metrics": {"cpu.percent": 3.5}}])
    return root


def fetch(source: Path | str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shipper", "fetch", str(source), "--since", SINCE[:16] + "Z",
                           "--until", UNTIL[:16] + "Z", *args], capture_output=True, text=True, timeout=60,
                          env=None if env is None else {**os.environ, **env})


def test_a_tag_the_instance_has_no_records_of_is_named_with_the_tags_it_has(archive):
    result = fetch(archive, "--instance", "vm", "--tag", "nosuchtag")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"shipper fetch: --tag nosuchtag matched nothing: instance vm has records of tags "
                             f"app, metrics in {archive} {BETWEEN}\n")
    assert "did you mean" not in result.stderr  # the instance is there


def test_an_unknown_instance_gets_the_nearest_names(archive):
    result = fetch(archive, "--instance", "vmx")
    assert result.returncode == 1
    assert result.stderr == f"shipper fetch: no records of instance vmx in {archive} {BETWEEN}; did you mean vm?\n"


def test_a_range_the_instance_has_no_records_in_says_what_its_records_cover(archive):
    result = subprocess.run([sys.executable, "-m", "shipper", "fetch", str(archive), "--instance", "vm",
                             "--since", "2026-11-29T13:20Z", "--until", "2026-11-29T13:30Z"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == ""
    assert result.stderr == ("shipper fetch: no records between 2026-11-29T13:20:00.000000Z and "
                             "2026-11-29T13:30:00.000000Z: the 4 records read from the objects of that range are "
                             "from 2026-11-29T13:05:00.000000Z to 2026-11-29T13:09:00.000000Z\n")
    other_day = subprocess.run([sys.executable, "-m", "shipper", "fetch", str(archive), "--since", "2026-11-27T10:00Z",
                                "--until", "2026-11-27T11:00Z"], capture_output=True, text=True, timeout=60)
    assert other_day.returncode == 0 and other_day.stderr == (
        f"shipper fetch: no records in {archive} between 2026-11-27T10:00:00.000000Z and 2026-11-27T11:00:00.000000Z\n")


def test_grep_level_and_host_that_match_nothing_say_so_with_what_was_read(archive):
    grep = fetch(archive, "--instance", "vm", "--tag", "app", "--grep", "refused")
    assert grep.returncode == 0 and grep.stdout == ""
    assert grep.stderr == f"shipper fetch: --grep 'refused' matched nothing: 3 records read {BETWEEN}\n"
    level = fetch(archive, "--instance", "vm", "--tag", "app", "--level", "error", "--grep", "GET")
    assert level.stderr == (f"shipper fetch: --grep 'GET' matched nothing: 3 records read {BETWEEN}, 1 of them "
                            f"at level error or more severe\n")
    host = fetch(archive, "--instance", "vm", "--host", "web-9")
    assert host.stderr == f"shipper fetch: --host web-9 matched nothing: 4 records read {BETWEEN} (hosts there: vm)\n"
    found = fetch(archive, "--instance", "vm", "--level", "error")
    assert found.returncode == 0 and found.stdout == "db timeout\n" and found.stderr == ""


def test_cloudwatch_logs_says_which_streams_are_missing(aws):
    aws.logs.create_log_group(logGroupName="/fleet/web")
    aws.logs.create_log_stream(logGroupName="/fleet/web", logStreamName="vm/app/var/log/app.log")
    aws.logs.put_log_events(logGroupName="/fleet/web", logStreamName="vm/app/var/log/app.log",
                            logEvents=[{"timestamp": int(parse_time("2026-11-29T13:05:00Z") * 1000), "message": "hi"}])

    def cwl(*args: str) -> subprocess.CompletedProcess:
        return fetch("cwl:///fleet/web", "--endpoint-url", aws.endpoint, "--region", "us-east-1", *args, env=aws.env)

    found = cwl("--instance", "vm")
    assert found.stdout == "hi\n", found.stderr
    tag = cwl("--instance", "vm", "--tag", "nosuchtag")
    assert tag.returncode == 1 and tag.stderr == ("shipper fetch: --tag nosuchtag matched nothing: instance vm has "
                                                  "streams of tag app in cwl:///fleet/web\n")
    unknown = cwl("--instance", "vmx")
    assert unknown.returncode == 1 and unknown.stderr == (
        "shipper fetch: no log streams of instance vmx in cwl:///fleet/web (streams are named INSTANCE/TAG/...; "
        "--list-instances lists the instances of an archive)\n")
    grep = cwl("--instance", "vm", "--grep", "bye")
    assert grep.returncode == 0
    assert grep.stderr == f"shipper fetch: --grep 'bye' matched nothing: 1 record read {BETWEEN}\n"
