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

from shipper.postmortem.selection import hour_prefixes, parse_key
from shipper.postmortem.sources import DirectoryArchive, S3Archive, SourceError

TABLE = "logs"
FORMATS = ("table", "csv", "json")
DOWNLOAD_JOBS = 16
MAX_SKIPPED = 20          # objects DuckDB cannot read, left out one by one before the query gives up
CELL_CHARS = 60           # a wider value is cut in the terminal table (csv and json keep it whole)
# A compacted hour: [prefix/]dt=D/hour=H/instance=I/NAME.parquet (shipper compact writes it).
PARQUET_KEY = re.compile(r"(?:^|/)dt=\d{4}-\d{2}-\d{2}/hour=\d{2}/instance=(?P<instance>[^/]+)/[^/]+\.parquet$")
# The columns of an empty selection: a query still runs and counts nothing.
CORE_COLUMNS = (("time", "TIMESTAMPTZ"), ("tag", "VARCHAR"), ("host", "VARCHAR"), ("instance_id", "VARCHAR"),
                ("image_id", "VARCHAR"), ("region", "VARCHAR"), ("source", "VARCHAR"), ("message", "VARCHAR"),
                ("level", "VARCHAR"), ("dt", "DATE"), ("hour", "INTEGER"), ("instance", "VARCHAR"))
HIVE_TYPES = "{'dt': 'DATE', 'hour': 'INTEGER', 'instance': 'VARCHAR'}"


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


def select_objects(archive, selection: Selection) -> Listed:
    """The objects of the asked hours, instances and tags; only those partitions are listed. A mix of
    NDJSON and Parquet objects is refused (point the source at one archive or its compacted copy)."""
    ndjson: list[tuple[str, int]] = []
    parquet: list[tuple[str, int]] = []
    for instance in selection.instances or (None,):
        for prefix in hour_prefixes(selection.since, selection.until, instance=instance):
            for key, size in archive.files(prefix):
                ref = parse_key(key, size)
                if ref is not None:
                    if not selection.tags or ref.tag in selection.tags:
                        ndjson.append((key, size))
                elif PARQUET_KEY.search(key):
                    parquet.append((key, size))
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
    into a temporary directory (removed on close), DOWNLOAD_JOBS at a time."""

    def __init__(self, archive, listed: Listed, jobs: int = DOWNLOAD_JOBS):
        self.archive = archive
        self.listed = listed
        self.downloaded = 0
        self._lock = threading.Lock()
        self._temporary: str | None = None
        if isinstance(archive, S3Archive) and listed.keys:
            self._temporary = tempfile.mkdtemp(prefix="shipper-query-")
            try:
                with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                    self.paths = list(pool.map(self._download, (key for key, _ in listed.keys)))
            except BaseException:
                self.close()
                raise
        else:
            self.paths = [archive.path(key) for key, _ in listed.keys]

    def _download(self, key: str) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        # Keys keep their partition directories (DuckDB reads dt=, hour=, instance= from the path).
        relative = key[len(self.archive.prefix) + 1:] if self.archive.prefix else key
        path = os.path.join(self._temporary, *[part for part in relative.split("/") if part not in ("", ".", "..")])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            body = self.archive.client.get_object(Bucket=self.archive.bucket, Key=key)["Body"]
            with open(path, "wb") as handle:
                shutil.copyfileobj(body, handle, 1024 * 1024)
        except (BotoCoreError, ClientError) as exc:
            from shipper.outputs.aws import describe

            raise QueryError(f"cannot read s3://{self.archive.bucket}/{key}: {describe(exc)}") from None
        with self._lock:
            self.downloaded += 1
        return path

    def key_of(self, path: str) -> str:
        return self.listed.keys[self.paths.index(path)][0]

    def close(self) -> None:
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None


def sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def reader_sql(kind: str, paths: list[str], schema: list[tuple[str, str]] | None = None) -> str:
    """DuckDB's reader of these files. NDJSON with ``schema`` (from ``detect_schema``) reads with those
    columns (a key no record has is NULL, another key ignored) instead of detecting them again."""
    files = "[" + ", ".join(map(sql_literal, paths)) + "]"
    if kind == "parquet":
        return f"read_parquet({files}, union_by_name = true, hive_partitioning = true, hive_types = {HIVE_TYPES})"
    if schema is None:
        return (f"read_json({files}, format = 'newline_delimited', union_by_name = true, "
                f"hive_partitioning = true, hive_types = {HIVE_TYPES})")
    columns = "{" + ", ".join(f"{sql_literal(name)}: {sql_literal(kind_)}" for name, kind_ in schema) + "}"
    return (f"read_json({files}, format = 'newline_delimited', columns = {columns}, "
            f"hive_partitioning = true, hive_types = {HIVE_TYPES})")


def detect_schema(connection, paths: list[str]) -> list[tuple[str, str]]:
    """The record columns of NDJSON files, detected once (DuckDB samples each file; a view over the
    detecting reader would sample them again at every use)."""
    rows = connection.execute(f"DESCRIBE SELECT * FROM {reader_sql('ndjson', paths)}").fetchall()
    return [(row[0], row[1]) for row in rows if row[0] not in ("dt", "hour", "instance")]


def table_sql(kind: str, paths: list[str], selection: Selection, schema: list[tuple[str, str]] | None = None) -> str:
    """The ``logs`` view over these files: records of [since, until] only (the partitions were pruned
    by hour; the time column cuts the ends exactly). The common columns are there even when no record
    of the selection has one (``level`` without a parser): NULL."""
    window = (f"TRY_CAST(time AS TIMESTAMPTZ) BETWEEN to_timestamp({selection.since!r}) "
              f"AND to_timestamp({selection.until!r})")
    core = "SELECT " + ", ".join(f"CAST(NULL AS {kind_}) AS {name}" for name, kind_ in CORE_COLUMNS) + " WHERE false"
    if not paths:
        return f"CREATE VIEW {TABLE} AS {core}"
    tags = ""
    if kind == "parquet" and selection.tags:
        tags = " AND tag IN (" + ", ".join(map(sql_literal, selection.tags)) + ")"
    return (f"CREATE VIEW {TABLE} AS SELECT * REPLACE (TRY_CAST(time AS TIMESTAMPTZ) AS time) "
            f"FROM ({core} UNION ALL BY NAME SELECT * FROM {reader_sql(kind, paths, schema)}) WHERE {window}{tags}")


# A DuckDB error about one file names it: that object is left out and said, the query runs again.
_FILE_IN_ERROR = re.compile(r"""(?:file|File)[ :]+["']?(?P<path>/[^"'\n]+?)["']?(?:[:\s,]|$)""")


@dataclass
class Answer:
    columns: list[str]
    rows: list[tuple]
    objects: int               # objects read
    bytes: int                 # their (compressed) size
    skipped: list[str]         # objects left out, each with DuckDB's reason
    problems: list[str]        # partitions not listed (links, non-regular files)
    seconds: float


def run(archive, selection: Selection, sql: str, jobs: int = DOWNLOAD_JOBS) -> Answer:
    duckdb = load_duckdb()
    started = time.monotonic()
    listed = select_objects(archive, selection)
    copies = LocalCopies(archive, listed, jobs)
    skipped: list[str] = []
    try:
        paths = list(copies.paths)
        while True:
            connection = duckdb.connect()
            try:
                connection.execute("SET TimeZone = 'UTC'")
                try:
                    schema = detect_schema(connection, paths) if listed.kind == "ndjson" and paths else None
                    connection.execute(table_sql(listed.kind, paths, selection, schema))
                    # A relation: its columns are known without running it, and fetchall runs it once
                    # (statements that return nothing, SET or CREATE, run at once and give None).
                    relation = connection.sql(sql)
                    columns = list(relation.columns) if relation is not None else []
                    rows = relation.fetchall() if relation is not None else []
                    break
                except duckdb.Error as exc:
                    bad = _bad_file(str(exc), paths)
                    if bad is None or len(skipped) >= MAX_SKIPPED:
                        raise QueryError(f"{type(exc).__name__}: {exc}") from None
                    paths.remove(bad)
                    skipped.append(f"{copies.key_of(bad)}: {str(exc).splitlines()[0]}")
            finally:
                connection.close()
    finally:
        copies.close()
    read = len(paths)
    size = sum(size for (key, size), path in zip(listed.keys, copies.paths) if path in paths)
    return Answer(columns, rows, read, size, skipped, list(getattr(archive, "problems", [])),
                  time.monotonic() - started)


def _bad_file(message: str, paths: list[str]) -> str | None:
    """The file of ours an error names, if any (a corrupt gzip, a line that is not JSON)."""
    for match in _FILE_IN_ERROR.finditer(message):
        candidate = match.group("path").rstrip(".")
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


def format_table(columns: list[str], rows: Iterable[tuple], width: int = CELL_CHARS) -> str:
    """Rows as an aligned text table with a header, then the row count."""
    texts = [[_short(cell(value), width) for value in row] for row in rows]
    heads = [_short(name, width) for name in columns]
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
