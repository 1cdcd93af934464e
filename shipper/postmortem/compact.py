"""``shipper compact``: one hour of the archive (every instance) rewritten as Parquet, under another
prefix with the same partitions: ``DEST/dt=D/hour=H/instance=I/compacted.parquet``, one object per
instance and hour. For scans that cost a fraction of gzip NDJSON's in Athena or DuckDB; the agent's
write path stays NDJSON.

Columns: the record's common keys when they are strings (time as written, RFC 3339), ``labels``
as a map when all its values are strings, ``metrics`` as a map of doubles when all its values are
numbers a double holds exactly (integers come back as doubles), and ``fields``: what else the record
holds (parsed fields, a value that did not fit its column), as JSON, so every record can be rebuilt
(``record_of``), except a common key whose value is a JSON null (left out). Rows are sorted by every
column and written by one DuckDB thread: the same hour compacted twice, with the same DuckDB, gives
the same bytes; an object is replaced whole (renamed into place, or one PutObject).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from shipper.postmortem.query import LocalCopies, Listed, QueryError, load_duckdb, sql_literal
from shipper.postmortem.selection import hour_prefixes, parse_key
from shipper.postmortem.sources import S3Archive

OBJECT_NAME = "compacted.parquet"
WORKERS = max(1, min(4, os.cpu_count() or 1))  # instances compacted at once (DuckDB works without the GIL)
ROW_GROUP_ROWS = 122_880

# The record's common keys, each a column when it is a string (as the agent writes them); what is
# left of the record (parsed fields, a key of another type) stays in ``fields``, as JSON.
STRING_KEYS = ("time", "tag", "host", "instance_id", "image_id", "region", "source", "message", "level")
MAPS = (("labels", "MAP(VARCHAR, VARCHAR)"), ("metrics", "MAP(VARCHAR, DOUBLE)"))


def select_sql(files: str) -> str:
    """The compacted rows of some objects, in a total order (the same input, the same bytes)."""
    def is_text(key: str) -> str:
        return f"json_type(json -> '$.{key}') = 'VARCHAR'"

    columns = [f"CASE WHEN {is_text(k)} THEN json ->> '$.{k}' END AS {k}" for k in STRING_KEYS]
    # labels must be strings to become the map (a number would turn into text); metrics must all be
    # numbers a double holds exactly (no string or boolean taken for one), doubles in the map
    values = "TRY_CAST(json_extract(json, '$.metrics.*') AS DOUBLE[])"
    numbers = (f"(list_has_all(['DOUBLE', 'BIGINT', 'UBIGINT'], json_type(json, '$.metrics.*')) "
               f"AND coalesce(greatest(list_max({values}), -list_min({values})), 0) <= 9007199254740992)")
    fits = {"labels": f"CAST(to_json(TRY_CAST(json -> '$.labels' AS {MAPS[0][1]})) AS VARCHAR) = "
                      f"CAST(json -> '$.labels' AS VARCHAR)",
            "metrics": f"coalesce(TRY_CAST(json -> '$.metrics' AS {MAPS[1][1]}) IS NOT NULL AND {numbers}, false)"}
    columns += [f"CASE WHEN {fits[k]} THEN TRY_CAST(json -> '$.{k}' AS {kind}) END AS {k}" for k, kind in MAPS]
    # A merge patch with null removes a key: the keys that became columns; a value that did not
    # fit its column is patched with itself, so it stays.
    patch = ", ".join([f"'{k}', CASE WHEN {is_text(k)} THEN NULL ELSE json -> '$.{k}' END" for k in STRING_KEYS]
                      + [f"'{k}', CASE WHEN {fits[k]} THEN NULL ELSE json -> '$.{k}' END" for k, _ in MAPS])
    columns.append(f"NULLIF(CAST(json_merge_patch(json, json_object({patch})) AS VARCHAR), '{{}}') AS fields")
    return (f"SELECT {', '.join(columns)} FROM read_json_objects({files}, format = 'newline_delimited') "
            f"ORDER BY time, tag, source, message, instance_id, host, image_id, region, level, fields, "
            f"CAST(labels AS VARCHAR), CAST(metrics AS VARCHAR)")


def record_of(row: dict) -> dict:
    """A compacted row as the record it came from (what the round trip test compares)."""
    import orjson

    record = {k: v for k, v in row.items() if k != "fields" and v is not None}
    record.update(orjson.loads(row["fields"]) if row.get("fields") else {})
    return record


@dataclass
class Compacted:
    hour: str                    # dt=D/hour=H
    instances: int
    records: int
    input_objects: int
    input_bytes: int
    output_bytes: int
    seconds: float


def parse_hour(text: str) -> float:
    """--hour: 2026-11-29T13 (or any time inside the hour) -> the hour's start, epoch seconds."""
    from shipper.postmortem.selection import SelectionError, parse_time

    value = text.strip()
    if len(value) == 13 and value[10] == "T":  # 2026-11-29T13
        value += ":00:00Z"
    try:
        moment = parse_time(value)
    except SelectionError as exc:
        raise QueryError(f"--hour: {exc}") from None
    return moment // 3600 * 3600


def default_destination(source: str) -> str:
    """Beside the archive: ARCHIVE-parquet (a directory), s3://BUCKET/PREFIX-parquet."""
    if source.startswith("s3://"):
        bucket, _, prefix = source[5:].rstrip("/").partition("/")
        return f"s3://{bucket}/{prefix}-parquet" if prefix else f"s3://{bucket}/parquet"
    return os.path.abspath(source).rstrip("/") + "-parquet"


def compact(archive, hour: float, destination: str, jobs: int = 16, endpoint_url: str | None = None,
            region: str | None = None) -> Compacted:
    duckdb = load_duckdb()
    started = time.monotonic()
    (prefix,) = hour_prefixes(hour, hour)
    by_instance: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for key, size in archive.files(prefix):
        ref = parse_key(key, size)
        if ref is not None:
            by_instance[ref.instance].append((key, size))
    listed = Listed("ndjson", sorted(item for items in by_instance.values() for item in items))
    if not listed.keys:
        raise QueryError(f"{archive.name}: no objects in {prefix.rstrip('/')}")
    if os.path.abspath(destination).rstrip("/") == os.path.abspath(archive.name).rstrip("/") or \
            destination.rstrip("/") == archive.name.rstrip("/"):
        raise QueryError(f"--to {destination}: that is the archive itself; the Parquet objects go to another "
                         f"prefix or directory")
    target = _Destination(destination, endpoint_url, region)
    with tempfile.TemporaryDirectory(prefix="shipper-compact-") as scratch:
        def one(number: int, instance: str) -> tuple[int, int]:
            # Each instance on its own: its objects copied (from S3) and removed after, one DuckDB
            # thread writing (the same input, the same bytes); instances side by side on the cores.
            keys = sorted(by_instance[instance])
            copies = LocalCopies(archive, Listed("ndjson", keys), max(1, jobs // WORKERS))
            local = os.path.join(scratch, f"{number}.parquet")  # instance names may differ only in odd characters
            connection = duckdb.connect(config={"threads": 1})
            try:
                files = "[" + ", ".join(map(sql_literal, copies.paths)) + "]"
                connection.execute(f"COPY ({select_sql(files)}) TO {sql_literal(local)} "
                                   f"(FORMAT PARQUET, COMPRESSION ZSTD, ROW_GROUP_SIZE {ROW_GROUP_ROWS})")
                count = connection.execute(f"SELECT count(*) FROM read_parquet({sql_literal(local)})").fetchall()[0][0]
            except duckdb.Error as exc:
                raise QueryError(f"instance {instance}: {type(exc).__name__}: {exc}") from None
            finally:
                connection.close()
                copies.close()
            size = os.path.getsize(local)
            target.put(f"{prefix}instance={instance}/{OBJECT_NAME}", local)
            os.unlink(local)
            return count, size

        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            done = list(pool.map(one, *zip(*enumerate(sorted(by_instance)))))
    records, written = sum(c for c, _ in done), sum(w for _, w in done)
    return Compacted(prefix.rstrip("/"), len(by_instance), records, len(listed.keys), listed.size, written,
                     time.monotonic() - started)


class _Destination:
    """Where the Parquet objects go: a directory (written beside, renamed into place) or S3."""

    def __init__(self, url: str, endpoint_url: str | None, region: str | None):
        self.url = url
        if url.startswith("s3://"):
            self.s3 = S3Archive(url, endpoint_url, region)
            self.root = None
        else:
            self.s3 = None
            self.root = os.path.abspath(url)

    def put(self, key: str, local: str) -> None:
        if self.s3 is not None:
            from botocore.exceptions import BotoCoreError, ClientError

            full = f"{self.s3.prefix}/{key}" if self.s3.prefix else key
            try:
                with open(local, "rb") as handle:
                    self.s3.client.put_object(Bucket=self.s3.bucket, Key=full, Body=handle)
            except (BotoCoreError, ClientError) as exc:
                from shipper.outputs.aws import describe

                raise QueryError(f"cannot write s3://{self.s3.bucket}/{full}: {describe(exc)}") from None
            return
        path = os.path.join(self.root, *key.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = path + ".partial"
        try:
            with open(local, "rb") as source, open(partial, "wb") as handle:
                while chunk := source.read(1024 * 1024):
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        except BaseException:
            try:
                os.unlink(partial)
            except OSError:
                pass
            raise
