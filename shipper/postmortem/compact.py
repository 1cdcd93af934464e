"""``shipper compact``: one hour of the archive (every instance) rewritten as Parquet, under another
prefix with the same partitions: ``DEST/dt=D/hour=H/instance=I/compacted.parquet``, one object per
instance and hour. For scans that cost a fraction of gzip NDJSON's in Athena or DuckDB; the agent's
write path stays NDJSON.

Columns: the record's common keys (time as written, RFC 3339), ``labels`` and ``metrics`` as maps,
and ``record``, the whole line as the agent wrote it, so nothing a parser added is lost. Rows are
sorted by (time, record) and written by one DuckDB thread: the same hour compacted twice gives the
same bytes, and an object is replaced whole (renamed into place, or one PutObject).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass

from shipper.postmortem.query import LocalCopies, Listed, QueryError, sql_literal, load_duckdb
from shipper.postmortem.selection import hour_prefixes, parse_key
from shipper.postmortem.sources import S3Archive

OBJECT_NAME = "compacted.parquet"
ROW_GROUP_ROWS = 122_880

SELECT = """SELECT json ->> '$.time' AS time, json ->> '$.tag' AS tag, json ->> '$.host' AS host,
  json ->> '$.instance_id' AS instance_id, json ->> '$.image_id' AS image_id, json ->> '$.region' AS region,
  json ->> '$.source' AS source, json ->> '$.message' AS message, json ->> '$.level' AS level,
  TRY_CAST(json -> '$.labels' AS MAP(VARCHAR, VARCHAR)) AS labels,
  TRY_CAST(json -> '$.metrics' AS MAP(VARCHAR, DOUBLE)) AS metrics,
  CAST(json AS VARCHAR) AS record
FROM read_json_objects({files}, format = 'newline_delimited')
ORDER BY time, record"""


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
    target = _Destination(destination, endpoint_url, region)
    copies = LocalCopies(archive, listed, jobs)
    records = written = 0
    try:
        path_of = dict(zip((key for key, _ in listed.keys), copies.paths))
        with tempfile.TemporaryDirectory(prefix="shipper-compact-") as scratch:
            connection = duckdb.connect()
            try:
                connection.execute("SET threads = 1")  # one writer: the same input gives the same bytes
                for instance in sorted(by_instance):
                    files = "[" + ", ".join(sql_literal(path_of[key]) for key, _ in sorted(by_instance[instance])) + "]"
                    local = os.path.join(scratch, f"{len(os.listdir(scratch))}.parquet")
                    try:
                        connection.execute(f"COPY ({SELECT.format(files=files)}) TO {sql_literal(local)} "
                                           f"(FORMAT PARQUET, COMPRESSION ZSTD, ROW_GROUP_SIZE {ROW_GROUP_ROWS})")
                        records += connection.execute(f"SELECT count(*) FROM read_parquet({sql_literal(local)})").fetchone()[0]
                    except duckdb.Error as exc:
                        raise QueryError(f"instance {instance}: {type(exc).__name__}: {exc}") from None
                    written += os.path.getsize(local)
                    target.put(f"{prefix}instance={instance}/{OBJECT_NAME}", local)
            finally:
                connection.close()
    finally:
        copies.close()
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
        with open(local, "rb") as source, open(partial, "wb") as handle:
            while chunk := source.read(1024 * 1024):
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
