"""``shipper query``: SQL over the whole fleet's archive with DuckDB, embedded (the optional extra
``shipper[query]``; the agent never imports this module).

The archive appears as one table, ``logs``: every record field a column (DuckDB reads the NDJSON
objects and unifies their keys by name), plus the partition columns of the key, ``dt`` (DATE),
``hour`` and ``instance``; ``tag`` is a record field already. Only the partitions of the asked
hours (and instances, tags) are listed and read: for a directory archive DuckDB opens the listed
files itself; from S3 the listed objects are downloaded by boto3, several at once, into a temporary
directory first (DuckDB's httpfs extension would be downloaded from the internet at run time, which
servers and these machines cannot reach). A compacted archive (``shipper compact``) is read from its
Parquet objects the same way.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any, Iterable, Iterator

import orjson

from shipper.postmortem.selection import EVENT_TIME_SLACK, hour_prefixes, parse_key
from shipper.postmortem.sources import DirectoryArchive, S3Archive, SourceError

TABLE = "logs"
DOWNLOAD_JOBS = 16
MAX_SKIPPED = 20          # objects DuckDB cannot read, left out one by one before the query gives up
CELL_CHARS = 60           # a wider value is cut in the terminal table (csv and json keep it whole)
# A compacted hour: [prefix/]dt=D/hour=H/instance=I/NAME.parquet (shipper compact writes it).
PARQUET_KEY = re.compile(r"(?:^|/)dt=\d{4}-\d{2}-\d{2}/hour=\d{2}/instance=(?P<instance>[^/]+)/[^/]+\.parquet$")
# The columns of an empty selection: a query still runs and counts nothing.
CORE_COLUMNS = (("time", "TIMESTAMPTZ"), ("tag", "VARCHAR"), ("host", "VARCHAR"), ("instance_id", "VARCHAR"),
                ("image_id", "VARCHAR"), ("region", "VARCHAR"), ("source", "VARCHAR"), ("message", "VARCHAR"),
                ("level", "VARCHAR"), ("dt", "DATE"), ("hour", "INTEGER"), ("instance", "VARCHAR"))


class QueryError(Exception):
    """The query cannot run (no DuckDB, a bad source, an SQL error as DuckDB gives it): exit 2."""


def load_duckdb():
    try:
        import duckdb
    except ImportError:
        raise QueryError("shipper query needs DuckDB, an optional extra the agent does not carry: "
                         "pip install 'shipper[query]' (in a checkout: .venv/bin/pip install -e '.[query]')") from None
    return duckdb


@dataclass(frozen=True)
class Selection:
    since: float
    until: float
    instances: tuple[str, ...] = ()   # none: every instance
    tags: tuple[str, ...] = ()        # none: every tag


@dataclass
class Listed:
    """The objects a selection reads: their keys and sizes, of one kind (ndjson or parquet)."""
    kind: str
    keys: list[tuple[str, int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(size for _, size in self.keys)


_GLOB = re.compile(r"[*?\[\]{}]")  # DuckDB would expand these in a file name


def check_selection(selection: Selection) -> None:
    for instance in selection.instances:
        if not instance or "/" in instance:
            raise QueryError(f"--instance {instance!r}: an instance id, e.g. i-0abc (no '/', not empty)")
    for tag in selection.tags:
        if not tag or "/" in tag:
            raise QueryError(f"--tag {tag!r}: a tag, e.g. app (no '/', not empty)")


def select_objects(archive, selection: Selection) -> Listed:
    """The objects of the asked hours, instances and tags; only those partitions are listed (up to
    EVENT_TIME_SLACK past --until: an object read then may hold records of before). A mix of NDJSON
    and Parquet objects is refused (point the source at one archive or its compacted copy)."""
    check_selection(selection)
    ndjson: list[tuple[str, int]] = []
    parquet: list[tuple[str, int]] = []
    for instance in selection.instances or (None,):
        for prefix in hour_prefixes(selection.since, selection.until + EVENT_TIME_SLACK, instance=instance):
            for key, size in archive.files(prefix):
                ref = parse_key(key, size)
                if ref is not None:
                    wanted = (not selection.tags or ref.tag in selection.tags) and \
                        (instance is None or ref.instance == instance) and \
                        ref.start - EVENT_TIME_SLACK <= selection.until
                else:
                    match = PARQUET_KEY.search(key)
                    wanted = match is not None and (instance is None or match.group("instance") == instance)
                if not wanted:
                    continue
                if _GLOB.search(key):
                    archive.problems.append(f"{key}: not read: its name holds a wildcard character (* ? [ ] {{ }})")
                    continue
                (ndjson if ref is not None else parquet).append((key, size))
    if ndjson and parquet:
        raise QueryError(f"{archive.name} holds both NDJSON objects and Parquet ones in the same partitions: "
                         f"query the archive and its compacted copy (shipper compact --to) separately")
    if parquet:
        return Listed("parquet", sorted(parquet))
    return Listed("ndjson", sorted(ndjson))


def open_archive(source: str, endpoint_url: str | None = None, region: str | None = None):
    if source.startswith("s3://"):
        return S3Archive(source, endpoint_url, region)
    if "://" in source:
        raise QueryError(f"{source}: the archive to query is a directory or s3://BUCKET/PREFIX")
    try:
        return DirectoryArchive(source)
    except SourceError as exc:
        raise QueryError(str(exc)) from None


class LocalCopies:
    """The listed objects as local files: a directory archive's own files, or S3 objects downloaded
    into a temporary directory (removed on close), DOWNLOAD_JOBS at a time. An object that cannot be
    downloaded (gone since the listing, no access) is left out and said in ``failed``."""

    def __init__(self, archive, listed: Listed, jobs: int = DOWNLOAD_JOBS):
        self.archive = archive
        self.listed = listed
        self.downloaded = 0
        self.failed: list[str] = []
        self._lock = threading.Lock()
        self._temporary: str | None = None
        keys = [key for key, _ in listed.keys]
        if isinstance(archive, S3Archive) and keys:
            self._temporary = tempfile.mkdtemp(prefix="shipper-query-")
            pool = ThreadPoolExecutor(max_workers=max(1, jobs))
            try:
                paths = list(pool.map(self._download, keys))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                self.close()
                raise
            pool.shutdown()
        else:
            paths = [archive.path(key) for key in keys]
        self.key_of = {path: key for key, path in zip(keys, paths) if path is not None}
        self.paths = list(self.key_of)
        sizes = dict(listed.keys)
        self.size_of = {path: sizes[key] for path, key in self.key_of.items()}

    def _download(self, key: str) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        # Keys keep their partition directories (the partition columns are read from the path).
        relative = key[len(self.archive.prefix) + 1:] if self.archive.prefix else key
        path = os.path.join(self._temporary, *[part for part in relative.split("/") if part not in ("", ".", "..")])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            body = self.archive.client.get_object(Bucket=self.archive.bucket, Key=key)["Body"]
            with open(path, "wb") as handle:
                shutil.copyfileobj(body, handle, 1024 * 1024)
        except (BotoCoreError, ClientError, OSError) as exc:
            from shipper.outputs.aws import describe

            with self._lock:
                self.failed.append(f"s3://{self.archive.bucket}/{key}: not read: {describe(exc)}")
            return None
        with self._lock:
            self.downloaded += 1
        return path

    def close(self) -> None:
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None


def sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


PATH_COLUMN = "shipper_object_path"
PARTITIONS = ("dt", "hour", "instance")
# The partitions from the object's own key (not DuckDB's hive_partitioning, which would read any
# "x=y" directory of the path as a column, and refuse a tag such as "app=web").
_PARTITION_OF = {
    "ndjson": r"/dt=(\d{4}-\d{2}-\d{2})/hour=(\d{2})/instance=([^/]+)/[^/]+/[^/]+$",
    "parquet": r"/dt=(\d{4}-\d{2}-\d{2})/hour=(\d{2})/instance=([^/]+)/[^/]+$",
}


def reader_sql(kind: str, paths: list[str], schema: list[tuple[str, str]] | None = None,
               full_sample: bool = False) -> str:
    """DuckDB's reader of these files, with the object's path as a column. NDJSON with ``schema``
    (from ``detect_schema``) reads those columns (a key no record has is NULL, another is ignored)
    instead of detecting them again. Sparse keys stay columns (DuckDB would fold a record of many
    rare keys into one map, and lose ``time`` with it)."""
    files = "[" + ", ".join(map(sql_literal, paths)) + "]"
    if kind == "parquet":
        return (f"read_parquet({files}, union_by_name = true, hive_partitioning = false, "
                f"filename = {sql_literal(PATH_COLUMN)})")
    if kind == "objects":  # each record whole as JSON, its common keys as columns
        keys = ", ".join(f"json ->> {sql_literal('$.' + name)} AS {name}" for name, _ in CORE_COLUMNS
                         if name not in PARTITIONS)
        return (f"(SELECT {keys}, json AS record, filename AS {PATH_COLUMN} FROM read_json_objects({files}, "
                f"format = 'newline_delimited', filename = true, hive_partitioning = false))")
    common = (f"format = 'newline_delimited', filename = {sql_literal(PATH_COLUMN)}, map_inference_threshold = -1, "
              f"hive_partitioning = false")
    if schema is None:
        sample = ", sample_size = -1" if full_sample else ""
        return f"read_json({files}, {common}, union_by_name = true{sample})"
    columns = "{" + ", ".join(f"{sql_literal(name)}: {sql_literal(kind_)}" for name, kind_ in schema) + "}"
    return f"read_json({files}, {common}, columns = {columns})"


def detect_schema(connection, paths: list[str], full_sample: bool = False) -> list[tuple[str, str]] | None:
    """The record columns of NDJSON files, detected once (DuckDB samples each file; a view over the
    detecting reader would sample them again at every use). Of keys that differ only in case (SQL
    names do not), the first is a column, the others are left out."""
    rows = connection.execute(f"DESCRIBE SELECT * FROM {reader_sql('ndjson', paths, full_sample=full_sample)}").fetchall()
    schema, seen = [], set()
    for name, kind_ in ((row[0], row[1]) for row in rows):
        if name == PATH_COLUMN or name.lower() in seen:
            continue
        seen.add(name.lower())
        schema.append((name, kind_))
    if not any(name == "time" for name, _ in schema):
        return None  # DuckDB made the records one JSON column (a key it cannot name, such as ""): as objects
    return schema


def table_sql(kind: str, paths: list[str], selection: Selection, schema: list[tuple[str, str]] | None = None,
              full_sample: bool = False) -> str:
    """The ``logs`` view over these files: records of [since, until] only (the partitions were pruned
    by hour; the time column cuts the ends exactly). The common columns are there even when no record
    of the selection has one (``level`` without a parser): NULL. A record field named like a partition
    column (dt, hour, instance) is there as record_dt, record_hour, record_instance."""
    window = (f"TRY_CAST(time AS TIMESTAMPTZ) BETWEEN to_timestamp({selection.since!r}) "
              f"AND to_timestamp({selection.until!r})")
    core = "SELECT " + ", ".join(f"CAST(NULL AS {kind_}) AS {name}" for name, kind_ in CORE_COLUMNS) + " WHERE false"
    if not paths:
        return f"CREATE VIEW {TABLE} AS {core}"
    pattern = sql_literal(_PARTITION_OF["parquet" if kind == "parquet" else "ndjson"])
    if kind in ("parquet", "objects"):
        clashing = []  # none: a record's own dt, hour or instance is in fields (parquet) or record (objects)
    else:
        clashing = [name for name, _ in (schema or []) if name in PARTITIONS]
    renamed = "".join(f", {name} AS record_{name}" for name in clashing)
    excluded = ", ".join([PATH_COLUMN, *clashing])
    reader = reader_sql(kind, paths, schema, full_sample)
    records = (f"SELECT * EXCLUDE ({excluded}){renamed}, "
               f"CAST(regexp_extract({PATH_COLUMN}, {pattern}, 1) AS DATE) AS dt, "
               f"CAST(regexp_extract({PATH_COLUMN}, {pattern}, 2) AS INTEGER) AS hour, "
               f"regexp_extract({PATH_COLUMN}, {pattern}, 3) AS instance FROM {reader}")
    tags = ""
    if kind == "parquet" and selection.tags:
        tags = " AND tag IN (" + ", ".join(map(sql_literal, selection.tags)) + ")"
    return (f"CREATE VIEW {TABLE} AS SELECT * REPLACE (TRY_CAST(time AS TIMESTAMPTZ) AS time) "
            f"FROM ({core} UNION ALL BY NAME {records}) WHERE {window}{tags}")


# An error of one object's own bytes (a truncated or foreign compression, a line that is not JSON):
# that object is left out and said, and the query runs again without it. Any other error (the SQL,
# a value of another type than the sample showed) is not the object's fault.
_OBJECT_ERROR = re.compile(r"GZIP|gzip|ZSTD|zstd|Zstd|[Mm]alformed JSON|not a valid|Unexpected end|truncated")
# A value of another type past DuckDB's sample of the objects: detected again from every record.
_TYPE_ERROR = re.compile(r"JSON transform error|Could not convert|Conversion Error|Type mismatch")


@dataclass
class Answer:
    columns: list[str]
    rows: list[tuple]
    objects: int               # objects read
    bytes: int                 # their (compressed) size
    skipped: list[str]         # objects left out, each with the reason
    problems: list[str]        # partitions not listed (links, non-regular files)
    seconds: float


def run(archive, selection: Selection, sql: str, jobs: int = DOWNLOAD_JOBS) -> Answer:
    duckdb = load_duckdb()
    started = time.monotonic()
    listed = select_objects(archive, selection)
    copies = LocalCopies(archive, listed, jobs)
    skipped: list[str] = list(copies.failed)
    notes: list[str] = []
    try:
        paths = set(copies.paths)
        full_sample = False
        while True:
            ordered = [path for path in copies.paths if path in paths]
            connection = duckdb.connect()
            try:
                connection.execute("SET TimeZone = 'UTC'")
                try:
                    kind, schema = listed.kind, None
                    if kind == "ndjson" and ordered:
                        schema = detect_schema(connection, ordered, full_sample)
                        if schema is None:
                            kind = "objects"
                            if not any("record (JSON)" in p for p in notes):
                                notes.append("the records' keys could not all be columns (a key SQL cannot name, "
                                             "such as an empty one): the common keys are columns, each record "
                                             "whole is the column record (JSON): record ->> '$.key'")
                    connection.execute(table_sql(kind, ordered, selection, schema, full_sample))
                    # A relation: its columns are known without running it, and fetchall runs it once
                    # (statements that return nothing, SET or CREATE, run at once and give None).
                    relation = connection.sql(sql)
                    columns = list(relation.columns) if relation is not None else []
                    rows = relation.fetchall() if relation is not None else []
                    break
                except duckdb.Error as exc:
                    text = str(exc)
                    if _TYPE_ERROR.search(text) and not full_sample and listed.kind == "ndjson":
                        full_sample = True
                        continue
                    bad = _bad_file(text, paths) if _OBJECT_ERROR.search(text) else None
                    if bad is None or len(skipped) >= MAX_SKIPPED:
                        raise QueryError(f"{type(exc).__name__}: {exc}") from None
                    paths.discard(bad)
                    skipped.append(f"{copies.key_of[bad]}: {text.splitlines()[0]}")
            finally:
                connection.close()
    finally:
        copies.close()
    return Answer(columns, rows, len(paths), sum(copies.size_of[path] for path in paths), skipped,
                  list(getattr(archive, "problems", [])) + notes, time.monotonic() - started)


_QUOTED_PATH = re.compile(r"""["'](/[^"'\n]+)["']|(/\S+?)(?=[\s:,]|$)""")


def _bad_file(message: str, paths: set[str]) -> str | None:
    """The file of ours an error names, if any."""
    for match in _QUOTED_PATH.finditer(message):
        candidate = (match.group(1) or match.group(2)).rstrip(".")
        if candidate in paths:
            return candidate
    return next((path for path in paths if path in message), None)


# ---------------------------------------------------------------- output

def cell(value: Any) -> str:
    """A value as text: times in RFC 3339 UTC, structs, maps and lists as JSON, NULL as empty."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc)
            return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return value.isoformat()
    if isinstance(value, (dict, list, tuple)):
        return orjson.dumps(value, default=_json_default, option=orjson.OPT_NON_STR_KEYS).decode()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _json_default(value: Any):
    if isinstance(value, datetime):
        return cell(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    return str(value)


def _short(text: str, width: int) -> str:
    text = text.replace("\n", "\\n").replace("\t", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def format_table(columns: list[str], rows: Iterable[tuple], width: int = CELL_CHARS, shown=str) -> str:
    """Rows as an aligned text table with a header, then the row count; ``shown`` makes each cell's
    text safe for a terminal (selection.printable)."""
    texts = [[shown(_short(cell(value), width)) for value in row] for row in rows]
    heads = [shown(_short(name, width)) for name in columns]
    sizes = [max([len(head)] + [len(row[i]) for row in texts]) for i, head in enumerate(heads)]
    numeric = [bool(texts) and all(_is_number(row[i]) for row in texts if row[i]) for i in range(len(heads))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(s) if n else v.ljust(s) for v, s, n in zip(values, sizes, numeric)).rstrip()

    out = [line(heads), "  ".join("-" * s for s in sizes)] + [line(row) for row in texts]
    out.append(f"({len(texts):,} row{'' if len(texts) == 1 else 's'})")
    return "\n".join(out) + "\n"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def format_csv(columns: list[str], rows: Iterable[tuple]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(value) for value in row])
    return buffer.getvalue()


def format_json(columns: list[str], rows: Iterable[tuple]) -> Iterator[bytes]:
    """One JSON object per row (NDJSON), nested values as JSON, times as RFC 3339."""
    for row in rows:
        yield orjson.dumps(dict(zip(columns, row)), default=_json_default,
                           option=orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME) + b"\n"
