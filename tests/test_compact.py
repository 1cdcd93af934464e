"""`shipper compact`: one hour of the archive, all instances, as Parquet under another prefix with the
same partitions. Every record of the hour comes out once, whole; twice gives the same bytes."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import duckdb
import orjson

from fleet_archive import INSTANCES, RANGE, shipper, upload, write_fleet
from shipper.postmortem.compact import default_destination, parse_hour, record_of

HOUR_13 = "2026-11-29T13"


def lines_of_hour(root: Path, hour: str) -> list[bytes]:
    return [line for path in sorted(root.glob(f"dt=2026-11-29/hour={hour}/*/*/*.ndjson.gz"))
            for line in gzip.decompress(path.read_bytes()).splitlines()]


def parquet_records(root: Path) -> list[bytes]:
    """Every compacted row rebuilt as its record, as sorted-key JSON."""
    files = sorted(str(p) for p in root.rglob("*.parquet"))
    relation = duckdb.sql(f"SELECT * FROM read_parquet({files!r}, hive_partitioning = false)")
    names = relation.columns
    return [canonical(record_of(dict(zip(names, row)))) for row in relation.fetchall()]


def canonical(record: dict) -> bytes:
    """Sorted-key JSON, numeric metrics as doubles (the compacted map's type)."""
    metrics = record.get("metrics")
    if isinstance(metrics, dict) and all(type(v) in (int, float) and abs(v) <= 2**53 for v in metrics.values()):
        record = {**record, "metrics": {k: float(v) for k, v in record["metrics"].items()}}
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_an_hour_compacts_to_one_parquet_object_per_instance_with_every_record_once(tmp_path):
    archive = tmp_path / "archive"
    write_fleet(archive, hours=2)
    result = shipper("compact", str(archive), "--hour", HOUR_13)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "archive-parquet"
    assert f"-> {out}" in result.stdout and "240 records of 3 instances (12 objects" in result.stdout
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet")) == [
        f"dt=2026-11-29/hour=13/instance={i}/compacted.parquet" for i in INSTANCES]
    original = [canonical(orjson.loads(line)) for line in lines_of_hour(archive, "13")]
    compacted = parquet_records(out)
    assert sorted(compacted) == sorted(original) and len(set(compacted)) == len(original) == 240  # each once, whole
    # typed columns, and what is not a column kept as JSON
    rows = duckdb.sql(f"SELECT level, labels, fields FROM read_parquet('{out}/**/*.parquet')").fetchall()
    assert {level for level, _, _ in rows} == {"error", "info", None}
    assert all(labels == {"app": "web", "image_version": "1"} and fields is None for _, labels, fields in rows)
    # twice: the same objects, byte for byte
    before = digests(out)
    assert shipper("compact", str(archive), "--hour", "2026-11-29T13:30:00Z").returncode == 0
    assert digests(out) == before and not list(out.rglob("*.partial"))


def test_the_compacted_hour_answers_the_same_query(tmp_path):
    archive = tmp_path / "archive"
    write_fleet(archive, hours=1)
    assert shipper("compact", str(archive), "--hour", HOUR_13, "--to", str(tmp_path / "pq")).returncode == 0
    sql = ("SELECT instance, count(*) FILTER (WHERE message LIKE 'ERROR%') AS errors, count(*) AS n "
           "FROM logs GROUP BY 1 ORDER BY 1")
    ndjson = shipper("query", str(archive), sql, "--format", "csv", *RANGE)
    parquet = shipper("query", str(tmp_path / "pq"), sql, "--format", "csv", *RANGE)
    assert ndjson.returncode == parquet.returncode == 0, parquet.stderr
    assert ndjson.stdout == parquet.stdout and ndjson.stdout.count("\n") == 4
    one = shipper("query", str(tmp_path / "pq"), "SELECT count(*) FROM logs", "--format", "csv", *RANGE,
                  "--instance", "i-0bbb")
    assert one.stdout == "count_star()\n80\n" and "read 1 objects" in one.stderr


def test_compacting_an_s3_hour_writes_parquet_objects_to_s3(tmp_path, aws):
    write_fleet(tmp_path / "fleet", hours=1, instances=("i-0aaa", "i-0bbb"))
    upload(aws.s3, "fleet", "prod", tmp_path / "fleet")
    args = ["--endpoint-url", aws.endpoint, "--region", "us-east-1"]
    result = shipper("compact", "s3://fleet/prod", "--hour", HOUR_13, *args, env=aws.env)
    assert result.returncode == 0, result.stderr
    keys = sorted(o["Key"] for o in aws.s3.list_objects_v2(Bucket="fleet", Prefix="prod-parquet/")["Contents"])
    assert keys == [f"prod-parquet/dt=2026-11-29/hour=13/instance={i}/compacted.parquet" for i in ("i-0aaa", "i-0bbb")]
    back = shipper("query", "s3://fleet/prod-parquet", "SELECT count(*) AS n FROM logs", "--format", "json", *RANGE,
                   *args, env=aws.env)
    assert back.returncode == 0 and orjson.loads(back.stdout) == {"n": 160}


def test_what_is_not_a_column_survives_in_fields(tmp_path):
    records = [{"time": "2026-11-29T13:00:00.000000Z", "tag": "app", "message": "x", "user": {"id": 7},
                "level": 30, "labels": {"n": 1}, "metrics": {"cpu.percent": 1.5, "mem.used_bytes": 10}, "flag": True},
               {"time": "2026-11-29T13:00:01.000000Z", "tag": "app", "message": "plain"},
               {"time": "2026-11-29T13:00:02.000000Z", "tag": "metrics",
                "metrics": {"disk.mount": "/", "up": True, "big": 2**60}}]
    key = "dt=2026-11-29/hour=13/instance=i-1/app/20261129T130000Z-000001.ndjson.gz"
    (tmp_path / "a" / key).parent.mkdir(parents=True)
    (tmp_path / "a" / key).write_bytes(gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in records)))
    assert shipper("compact", str(tmp_path / "a"), "--hour", HOUR_13).returncode == 0
    rebuilt = sorted(parquet_records(tmp_path / "a-parquet"))
    assert rebuilt == sorted(canonical(r) for r in records)
    # metrics that are not all numbers a double holds (a string, a boolean, 2**60) stay as they were
    odd = duckdb.sql(f"SELECT metrics, fields FROM '{tmp_path}/a-parquet/**/*.parquet' WHERE tag = 'metrics'").fetchall()
    assert odd[0][0] is None and orjson.loads(odd[0][1]) == {"metrics": {"disk.mount": "/", "up": True, "big": 2**60}}
    row = duckdb.sql(f"SELECT level, labels, metrics, fields FROM '{tmp_path}/a-parquet/**/*.parquet' "
                     f"WHERE message = 'x'").fetchall()[0]
    # a numeric level and labels that are not strings stay in fields; metrics became a map
    assert row[:3] == (None, None, {"cpu.percent": 1.5, "mem.used_bytes": 10.0})
    assert orjson.loads(row[3]) == {"user": {"id": 7}, "level": 30, "labels": {"n": 1}, "flag": True}


def test_instances_whose_names_differ_only_in_odd_characters_are_both_compacted(tmp_path):
    base = {"time": "2026-11-29T13:00:00.000000Z", "tag": "app", "message": "x"}
    for instance in ("a b", "a_b"):
        key = f"dt=2026-11-29/hour=13/instance={instance}/app/20261129T130000Z-000001.ndjson.gz"
        (tmp_path / "a" / key).parent.mkdir(parents=True)
        (tmp_path / "a" / key).write_bytes(gzip.compress(orjson.dumps({**base, "instance_id": instance}) + b"\n"))
    assert shipper("compact", str(tmp_path / "a"), "--hour", HOUR_13).returncode == 0
    back = duckdb.sql(f"SELECT instance_id FROM '{tmp_path}/a-parquet/**/*.parquet' ORDER BY 1").fetchall()
    assert back == [("a b",), ("a_b",)]


def test_compact_refuses_what_it_cannot_do(tmp_path):
    write_fleet(tmp_path / "archive", hours=1)
    empty = shipper("compact", str(tmp_path / "archive"), "--hour", "2026-11-29T20")
    assert empty.returncode == 2 and "no objects in dt=2026-11-29/hour=20" in empty.stderr
    assert "--hour" in shipper("compact", str(tmp_path / "archive"), "--hour", "lunch").stderr
    assert shipper("compact", str(tmp_path / "nowhere"), "--hour", HOUR_13).returncode == 2
    itself = shipper("compact", str(tmp_path / "archive"), "--hour", HOUR_13, "--to", str(tmp_path / "archive"))
    assert itself.returncode == 2 and "that is the archive itself" in itself.stderr
    assert parse_hour("2026-11-29T13") == parse_hour("2026-11-29T13:59:59Z") == 1_795_957_200.0
    assert default_destination("s3://b/prod/") == "s3://b/prod-parquet" and default_destination("s3://b") == "s3://b/parquet"
