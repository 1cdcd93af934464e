"""`shipper query`: SQL over the archive with DuckDB. A directory archive the agent wrote, then
synthetic fleets in the key layout on disk and on the moto server's S3: counts equal what was
written, partition columns are there, and pruning opens only the asked partitions."""

from __future__ import annotations

import collections
import gzip
import os
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote

import orjson
import pytest

from aws import s3_output
from conftest import read_archive
from fleet_archive import HOUR, INSTANCES, RANGE, shipper, upload, write_fleet
from shipper.postmortem import query
from shipper.postmortem.query import Selection, format_csv, format_json, format_table, select_objects
from shipper.postmortem.sources import DirectoryArchive
from test_postmortem import fill_archive

COUNT_PER_TAG = "SELECT tag, count(*) AS n FROM logs GROUP BY tag ORDER BY tag"


def json_rows(result) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [orjson.loads(line) for line in result.stdout.splitlines()]


def objects_read(result) -> int:
    line = [line for line in result.stderr.splitlines() if "objects (" in line][-1]
    return int(line.split("read ")[1].split(" objects")[0].replace(",", ""))


def test_a_directory_archive_the_agent_wrote_is_one_table(workdir):
    fill_archive(workdir)  # 300 lines of tags app and web, metrics samples every second
    archive = workdir / "data" / "archive"
    written = read_archive(archive)
    expected = collections.Counter(r["tag"] for r in written)
    counts = json_rows(shipper("query", str(archive), COUNT_PER_TAG, "--format", "json", "--since", "1h"))
    assert {row["tag"]: row["n"] for row in counts} == dict(expected)
    # the partition columns, from the keys; every record field a column (metrics nested)
    rows = json_rows(shipper("query", str(archive), "SELECT DISTINCT dt, hour, instance, host FROM logs",
                             "--format", "json", "--since", "1h"))
    keys = {p.relative_to(archive).parts[:3] for p in archive.rglob("*.ndjson.gz")}
    assert {(f"dt={r['dt']}", f"hour={r['hour']:02d}", f"instance={r['instance']}") for r in rows} == keys
    assert all(r["instance"] == r["host"] for r in rows)  # off EC2 the key names the host
    errors = json_rows(shipper("query", str(archive), "SELECT count(*) AS n FROM logs WHERE message LIKE '%ERROR%'",
                               "--format", "json", "--since", "1h"))
    assert errors == [{"n": sum(1 for r in written if "ERROR" in r.get("message", ""))}] == [{"n": 6}]
    cpu = json_rows(shipper("query", str(archive), 'SELECT count(metrics."cpu.percent") AS n FROM logs',
                            "--format", "json", "--since", "1h"))
    assert cpu[0]["n"] == sum(1 for r in written if "cpu.percent" in r.get("metrics", {})) > 0


def test_pruning_opens_only_the_asked_partitions(tmp_path):
    written = write_fleet(tmp_path, hours=2)
    # A FIFO in a partition nobody asks for: opening it would hang the query (pytest-timeout fails it).
    fifo_dir = tmp_path / "dt=2026-11-29" / "hour=14" / "instance=i-0ccc" / "app"
    os.mkfifo(fifo_dir / "20261129T140000Z-999999.ndjson.gz")
    one = shipper("query", str(tmp_path), "SELECT instance, hour, count(*) AS n FROM logs GROUP BY ALL",
                  "--format", "json", "--since", "2026-11-29T13:00:00Z", "--until", "2026-11-29T13:50:00Z",
                  "--instance", "i-0bbb")
    assert json_rows(one) == [{"instance": "i-0bbb", "hour": 13, "n": 80}]
    assert objects_read(one) == sum(1 for key in written if "hour=13/instance=i-0bbb/" in key) == 4
    tagged = shipper("query", str(tmp_path), "SELECT DISTINCT tag FROM logs", "--format", "json",
                     "--since", "2026-11-29T13:00:00Z", "--until", "2026-11-29T13:50:00Z", "--tag", "web")
    assert json_rows(tagged) == [{"tag": "web"}] and objects_read(tagged) == 6  # 3 instances x 2
    # the whole range: every record once; the FIFO is said and left out, never opened
    everything = shipper("query", str(tmp_path), "SELECT count(*) AS n, count(DISTINCT message) AS m FROM logs",
                         "--format", "json", *RANGE)
    total = sum(len(records) for records in written.values())
    assert json_rows(everything) == [{"n": total, "m": total}]
    assert objects_read(everything) == len(written)
    assert "20261129T140000Z-999999.ndjson.gz: not read: a FIFO" in everything.stderr


def test_a_record_read_after_the_hour_it_belongs_to_is_found(tmp_path):
    """An object of hour 14 (read at 14:01) may hold a record of 13:59 (its parsed time): listed too."""
    key = "dt=2026-11-29/hour=14/instance=i-1/app/20261129T140100Z-000001.ndjson.gz"
    (tmp_path / key).parent.mkdir(parents=True)
    (tmp_path / key).write_bytes(gzip.compress(b'{"time":"2026-11-29T13:59:00.000000Z","tag":"app","message":"late"}\n'
                                               b'{"time":"2026-11-29T14:01:00.000000Z","tag":"app","message":"on time"}\n'))
    rows = json_rows(shipper("query", str(tmp_path), "SELECT message, hour FROM logs", "--format", "json",
                             "--since", "2026-11-29T13:00:00Z", "--until", "2026-11-29T13:59:59Z"))
    assert rows == [{"message": "late", "hour": 14}]  # the partition is the object's; the range, the record's


def test_the_time_range_cuts_records_exactly_not_only_partitions(tmp_path):
    write_fleet(tmp_path, hours=1)  # records at 13:00:00-13:00:19 and 13:10:00-13:10:19
    rows = json_rows(shipper("query", str(tmp_path), "SELECT count(*) AS n, min(time) AS first FROM logs",
                             "--format", "json", "--since", "2026-11-29T13:00:10Z", "--until", "2026-11-29T13:05:00Z"))
    assert rows == [{"n": 10 * len(INSTANCES) * 2, "first": "2026-11-29T13:00:10.000000Z"}]


def test_an_s3_archive_is_read_from_its_pruned_partitions_only(tmp_path, aws):
    written = write_fleet(tmp_path / "fleet", hours=2)
    upload(aws.s3, "fleet", "prod", tmp_path / "fleet")
    aws.proxy.clear()
    args = ["--endpoint-url", aws.endpoint, "--region", "us-east-1"]
    result = shipper("query", "s3://fleet/prod", "SELECT instance, count(*) AS n FROM logs GROUP BY 1 ORDER BY 1",
                     "--format", "json", "--since", "2026-11-29T14:00:00Z", "--until", "2026-11-29T14:30:00Z",
                     "--instance", "i-0aaa", "--instance", "i-0ccc", *args, env=aws.env)
    assert json_rows(result) == [{"instance": "i-0aaa", "n": 80}, {"instance": "i-0ccc", "n": 80}]
    gets = [r for r in aws.proxy.requests(method="GET") if "list-type" not in r.path]
    asked = [k for k in written if "hour=14/" in k and ("instance=i-0aaa/" in k or "instance=i-0ccc/" in k)]
    assert sorted(unquote(r.path.split("?")[0]).split("/prod/", 1)[1] for r in gets) == sorted(asked)
    lists = [unquote(r.path) for r in aws.proxy.requests(method="GET") if "list-type" in r.path]
    assert len(lists) == 2 and all("prefix=prod/dt=2026-11-29/hour=14/instance=i-0" in path for path in lists)
    # the whole fleet, and the temporary copies are gone afterwards
    before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    total = shipper("query", "s3://fleet/prod", "SELECT count(*) AS n FROM logs", "--format", "json", *RANGE, *args,
                    env=aws.env)
    assert json_rows(total) == [{"n": sum(len(r) for r in written.values())}]
    assert not [n for n in set(os.listdir(os.environ.get("TMPDIR", "/tmp"))) - before if n.startswith("shipper-query-")]
    missing = shipper("query", "s3://no-such-bucket/x", "SELECT 1", *RANGE, *args, env=aws.env)
    assert missing.returncode == 1 and "cannot list s3://no-such-bucket" in missing.stderr


def test_an_agent_writing_to_s3_is_queried_back(workdir, aws):
    aws.s3.create_bucket(Bucket="live")
    fill_archive(workdir, output=s3_output(aws.endpoint, "live", prefix="prod", upload_interval="1s"), env=aws.env,
                 metrics=False)
    result = shipper("query", "s3://live/prod", COUNT_PER_TAG, "--format", "json", "--since", "1h",
                     "--endpoint-url", aws.endpoint, "--region", "us-east-1", env=aws.env)
    assert {row["tag"]: row["n"] for row in json_rows(result)} == {"app": 200, "web": 100}


def test_errors_are_duckdbs_own_and_bad_objects_are_left_out_and_said(tmp_path):
    written = write_fleet(tmp_path, hours=1, instances=("i-0aaa",), tags=("app",))
    bad_sql = shipper("query", str(tmp_path), "SELECT nope FROM logs", *RANGE)
    assert bad_sql.returncode == 2
    assert 'Referenced column "nope" not found' in bad_sql.stderr and bad_sql.stdout == ""
    victim = tmp_path / sorted(written)[0]
    victim.write_bytes(gzip.compress(b'{"time":"2026-11-29T13:00:00Z","message":"ok"}\n')[:-12])  # cut gzip
    result = shipper("query", str(tmp_path), "SELECT count(*) AS n FROM logs", "--format", "json", *RANGE)
    assert json_rows(result) == [{"n": 20}]  # the other object
    assert f"left out {sorted(written)[0]}:" in result.stderr
    not_json = sorted(written)[1]
    (tmp_path / not_json).write_bytes(gzip.compress(b"this is not json\n"))
    victim.unlink()
    result = shipper("query", str(tmp_path), "SELECT count(*) AS n FROM logs", "--format", "json", *RANGE)
    assert json_rows(result) == [{"n": 0}] and f"left out {not_json}:" in result.stderr
    empty = shipper("query", str(tmp_path), "SELECT count(*) AS n FROM logs", "--format", "json",
                    "--since", "2026-01-01T00:00:00Z", "--until", "2026-01-01T01:00:00Z")
    assert json_rows(empty) == [{"n": 0}] and "read 0 objects" in empty.stderr
    assert shipper("query", "/no/such/dir", "SELECT 1").returncode == 2
    assert shipper("query", "cwl://group", "SELECT 1").returncode == 2
    assert "is before --since" in shipper("query", str(tmp_path), "SELECT 1", "--since", "1h", "--until", "2h").stderr
    from_stdin = shipper("query", str(tmp_path), "-", "--format", "csv", *RANGE, stdin="SELECT 40 + 2 AS answer")
    assert from_stdin.stdout == "answer\n42\n"


def test_without_duckdb_the_command_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "duckdb", None)  # import duckdb raises ImportError
    with pytest.raises(query.QueryError, match=r"pip install 'shipper\[query\]'"):
        query.load_duckdb()


def test_the_agent_itself_never_imports_duckdb():
    import subprocess

    code = ("import sys, shipper.cli, shipper.service, shipper.pipeline, shipper.postmortem.fetch; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('duckdb', 'sqlglot', 'pyarrow')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_listing_a_selection_is_pure_and_refuses_mixed_archives(tmp_path):
    written = write_fleet(tmp_path, hours=2)
    archive = DirectoryArchive(str(tmp_path))
    listed = select_objects(archive, Selection(HOUR + 3600, HOUR + 3600 + 59, ("i-0aaa",), ("web",)))
    # the object opened at 14:10 cannot hold a record of 14:00:59 (EVENT_TIME_SLACK is 5 minutes)
    assert [key for key, _ in listed.keys] == sorted(k for k in written if "hour=14/instance=i-0aaa/web/" in k
                                                     and "T140000Z" in k)
    assert listed.kind == "ndjson" and listed.size == sum((tmp_path / k).stat().st_size for k, _ in listed.keys)
    parquet = tmp_path / "dt=2026-11-29" / "hour=14" / "instance=i-0aaa" / "compacted.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(query.QueryError, match="both NDJSON objects and Parquet"):
        select_objects(archive, Selection(HOUR + 3600, HOUR + 3600 + 59))


def test_output_formats_print_nested_values_as_json_and_times_in_utc():
    from datetime import date, datetime, timezone

    columns = ["time", "dt", "n", "labels", "message"]
    rows = [(datetime(2026, 11, 29, 13, 0, 1, 5, tzinfo=timezone.utc), date(2026, 11, 29), 3, {"app": "web"},
             "two\nlines"), (None, None, 12, None, "x" * 100)]
    table = format_table(columns, rows).splitlines()
    assert table[0].split() == columns and table[-1] == "(2 rows)"
    assert "2026-11-29T13:00:01.000005Z" in table[2] and '{"app":"web"}' in table[2] and "two\\nlines" in table[2]
    assert table[3].rstrip().endswith(" " + "x" * (query.CELL_CHARS - 1) + "…")  # cut in the terminal table
    assert table[2].index(" 3") < table[3].index("12") + 1  # numbers right-aligned
    from shipper.postmortem.selection import printable

    escaped = format_table(["m"], [("\x1b[31mred",)], shown=printable)
    assert "\\x1b[31mred" in escaped and "\x1b" not in escaped  # a terminal's escape sequence, shown not run
    assert format_csv(columns, rows).splitlines()[1] == '2026-11-29T13:00:01.000005Z,2026-11-29,3,"{""app"":""web""}","two'
    lines = [orjson.loads(line) for line in format_json(columns, rows)]
    assert lines[0] == {"time": "2026-11-29T13:00:01.000005Z", "dt": "2026-11-29", "n": 3, "labels": {"app": "web"},
                        "message": "two\nlines"}
    assert lines[1]["time"] is None


def test_s3_downloads_run_several_at_once(tmp_path, aws, monkeypatch):
    for name, value in aws.env.items():
        monkeypatch.setenv(name, value)
    write_fleet(tmp_path / "fleet", hours=1, instances=("i-0aaa", "i-0bbb"))
    upload(aws.s3, "para", "p", tmp_path / "fleet")
    archive = query.open_archive("s3://para/p", aws.endpoint, "us-east-1")
    listed = select_objects(archive, Selection(HOUR, HOUR + 3599))
    lock, running, peak = threading.Lock(), [0], [0]
    original = archive.client.get_object

    def counting(**kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.1)
            return original(**kwargs)
        finally:
            with lock:
                running[0] -= 1

    archive.client.get_object = counting
    copies = query.LocalCopies(archive, listed, jobs=4)
    try:
        assert copies.downloaded == len(listed.keys) == 8 and peak[0] > 1  # downloads in flight at once
        assert all(Path(p).read_bytes()[:2] == b"\x1f\x8b" for p in copies.paths)
    finally:
        copies.close()
    assert not any(Path(p).exists() for p in copies.paths)


def test_an_object_gone_between_the_listing_and_its_download_is_left_out_and_said(tmp_path, aws, monkeypatch):
    for name, value in aws.env.items():
        monkeypatch.setenv(name, value)
    written = write_fleet(tmp_path / "fleet", hours=1, instances=("i-0aaa",))
    upload(aws.s3, "gone", "p", tmp_path / "fleet")
    archive = query.open_archive("s3://gone/p", aws.endpoint, "us-east-1")
    listed = select_objects(archive, Selection(HOUR, HOUR + 3599))
    victim = sorted(written)[1]
    aws.s3.delete_object(Bucket="gone", Key=f"p/{victim}")  # lifecycle expiry after the listing
    copies = query.LocalCopies(archive, listed)
    try:
        assert len(copies.paths) == len(listed.keys) - 1 and copies.failed == [
            f"s3://gone/p/{victim}: not read: {copies.failed[0].split('not read: ')[1]}"]
        assert "NoSuchKey" in copies.failed[0] or "Not Found" in copies.failed[0] or "404" in copies.failed[0]
    finally:
        copies.close()


def write_records(root: Path, key: str, records: list[dict]) -> None:
    (root / key).parent.mkdir(parents=True, exist_ok=True)
    (root / key).write_bytes(gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in records)))


def test_records_of_any_shape_are_all_counted(tmp_path):
    """Sparse parsed keys (each app its own), an empty key, keys differing in case, a field named like a
    partition, a tag with '=' and a root path with one: every record is there, with its time."""
    root = tmp_path / "env=prod" / "archive"
    base = {"time": "2026-11-29T13:00:01.000000Z", "tag": "app", "message": "m"}
    sparse = [{**base, f"key{i}": i} for i in range(50)] + [dict(base) for _ in range(50)]
    write_records(root, "dt=2026-11-29/hour=13/instance=i-1/app/20261129T130000Z-000001.ndjson.gz", sparse)
    write_records(root, "dt=2026-11-29/hour=13/instance=i-1/app=web/20261129T130000Z-000002.ndjson.gz",
                  [{**base, "tag": "app=web", "Message": "upper", "dt": "mine"}])
    rows = json_rows(shipper("query", str(root), "SELECT count(*) AS n, count(time) AS timed, count(key7) AS k7, "
                             "count(DISTINCT dt) AS days, max(record_dt) AS theirs, count(DISTINCT tag) AS tags "
                             "FROM logs", "--format", "json", *RANGE))
    assert rows == [{"n": 101, "timed": 101, "k7": 1, "days": 1, "theirs": "mine", "tags": 2}]
    # a key SQL cannot name: the records are read whole, the common keys still columns, nothing lost
    write_records(root, "dt=2026-11-29/hour=13/instance=i-2/app/20261129T130000Z-000003.ndjson.gz",
                  [{**base, "": "empty key"}])
    result = shipper("query", str(root), "SELECT count(*) AS n, count(time) AS timed, "
                     "max(record ->> '$.key7') AS k7 FROM logs", "--format", "json", *RANGE)
    assert json_rows(result) == [{"n": 102, "timed": 102, "k7": "7"}]
    assert "each record whole is the column record (JSON)" in result.stderr
    described = shipper("query", str(root), "DESCRIBE logs", "--format", "csv", *RANGE)
    assert ",env," not in described.stdout and "\nenv," not in described.stdout  # no column from the root path


def test_a_value_of_another_type_past_the_sample_is_read_not_left_out(tmp_path):
    records = [{"time": "2026-11-29T13:00:01.000000Z", "tag": "app", "message": "m", "code": 200}
               for _ in range(25_000)]
    records.append({**records[0], "code": "oops"})
    write_records(tmp_path, "dt=2026-11-29/hour=13/instance=i-1/app/20261129T130000Z-000001.ndjson.gz", records)
    result = shipper("query", str(tmp_path), "SELECT count(*) AS n, count(code) AS codes FROM logs",
                     "--format", "json", *RANGE)
    assert json_rows(result) == [{"n": 25_001, "codes": 25_001}] and "left out" not in result.stderr


def test_instances_and_tags_are_checked(tmp_path):
    write_fleet(tmp_path, hours=1)
    for bad in ("", "i-1/app"):
        result = shipper("query", str(tmp_path), "SELECT 1", "--instance", bad, *RANGE)
        assert result.returncode == 2 and "--instance" in result.stderr
    assert shipper("query", str(tmp_path), "SELECT 1", "--tag", "", *RANGE).returncode == 2
