"""``shipper athena``: the Athena (Trino) table definitions of an S3 archive, with partition projection,
so that new partitions are covered without a crawler and without MSCK REPAIR. Pure text, no AWS call.

The key layout is ``{prefix}/dt=DATE/hour=HH/instance=ID/TAG/OBJECT``. Projection needs every
partition column projected, and an instance id cannot be enumerated, so there are two tables over
the same objects (never a second copy):

- ``NAME``: partitioned by ``dt`` (date) and ``hour`` (00-23) only; the objects of every instance of
  an hour lie under its partition's location and are all read. Fleet-wide questions (every instance,
  every image) go here, with the record's ``instance_id`` and ``image_id`` columns.
- ``NAME_by_instance``: ``dt``, ``hour`` and ``instance`` (projection type ``injected``): a query must
  name the instance (``WHERE instance = 'i-...'``, or ``IN (...)``) and reads only its objects.
  One server's questions go here.

``NAME_parquet`` is the first table's twin over the Parquet objects ``shipper compact`` writes.
"""

from __future__ import annotations

import re
from datetime import date, datetime

from shipper.outputs.keys import DEFAULT_KEY

DEFAULT_TABLE = "shipper_logs"
# What the S3 output's key must begin with for these definitions (after {prefix}/).
PARTITION_TEMPLATE = "dt={date}/hour={hour}/instance={instance_id}/"
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,127}")

# The record's top-level keys the agent writes (shipper.record), as Hive types. Parsed fields of other
# names are not columns (the JSON SerDe ignores keys it has no column for); the Parquet twin keeps
# them in ``fields``, as JSON.
COLUMNS = (
    ("time", "string"),           # RFC 3339 UTC: from_iso8601_timestamp(time)
    ("tag", "string"),
    ("host", "string"),
    ("instance_id", "string"),
    ("image_id", "string"),
    ("region", "string"),
    ("availability_zone", "string"),
    ("instance_type", "string"),
    ("source", "string"),
    ("message", "string"),
    ("level", "string"),          # a parser's, or the level filter's
    ("labels", "map<string,string>"),
    ("metrics", "map<string,double>"),
    ("event", "string"),          # lifecycle records: started, stopping, spot_interruption ...
    ("truncated", "boolean"),
    ("encoding_errors", "boolean"),
    ("parse_error", "string"),
)
PARQUET_COLUMNS = (*[c for c in COLUMNS if c[0] in ("time", "tag", "host", "instance_id", "image_id", "region",
                                                    "source", "message", "level", "labels", "metrics")],
                   ("fields", "string"))   # the rest of the record, JSON: json_extract(fields, '$.user')


class AthenaError(ValueError):
    """The archive's layout or a name cannot be described: the message says what to change."""


def split_location(url: str) -> tuple[str, str]:
    """s3://BUCKET[/PREFIX] -> (bucket, prefix without slashes)."""
    match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?", url.rstrip("/"))
    if not match:
        raise AthenaError(f"{url}: Athena reads S3: expected s3://BUCKET[/PREFIX]")
    prefix = (match.group(2) or "").strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise AthenaError(f"{url}: the prefix has an empty, '.' or '..' part")
    return match.group(1), prefix


def check_key_template(template: str) -> None:
    """The S3 output's key template must put the partitions first, as the definitions project them."""
    body = template[len("{prefix}/"):] if template.startswith("{prefix}/") else template
    if not body.startswith(PARTITION_TEMPLATE):
        raise AthenaError(f"the key template {template!r} does not begin with {{prefix}}/{PARTITION_TEMPLATE}: "
                          f"partition projection needs that layout (the S3 output's default key)")


def base_location(bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}/" if prefix else f"s3://{bucket}/"


def location_template(bucket: str, prefix: str, by_instance: bool) -> str:
    """The projected location of one partition, as Athena's storage.location.template."""
    return base_location(bucket, prefix) + "dt=${dt}/hour=${hour}/" + ("instance=${instance}/" if by_instance else "")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _properties(items: list[tuple[str, str]]) -> str:
    return ",\n".join(f"  {_quote(k)} = {_quote(v)}" for k, v in items)


def _projection(first_date: str, by_instance: bool, template: str) -> list[tuple[str, str]]:
    items = [
        ("projection.enabled", "true"),
        ("projection.dt.type", "date"),
        ("projection.dt.format", "yyyy-MM-dd"),
        ("projection.dt.range", f"{first_date},NOW"),
        ("projection.dt.interval", "1"),
        ("projection.dt.interval.unit", "DAYS"),
        ("projection.hour.type", "integer"),
        ("projection.hour.range", "0,23"),
        ("projection.hour.digits", "2"),
    ]
    if by_instance:
        items.append(("projection.instance.type", "injected"))
    items.append(("storage.location.template", template))
    return items


def _columns(columns) -> str:
    return ",\n".join(f"  `{name}` {kind}" for name, kind in columns)


def table_definitions(location: str, table: str = DEFAULT_TABLE, first_date: str | None = None,
                      compacted: str | None = None, key_template: str = "{prefix}/" + DEFAULT_KEY,
                      database: str | None = None) -> str:
    """The CREATE EXTERNAL TABLE statements (and a few ready queries, as comments) for an archive."""
    if not _NAME.fullmatch(table):
        raise AthenaError(f"--table {table!r}: a lower-case name of letters, digits and _")
    if database is not None and not _NAME.fullmatch(database):
        raise AthenaError(f"--database {database!r}: a lower-case name of letters, digits and _")
    check_key_template(key_template)
    first = first_date or f"{date.today().year - 1}-01-01"
    try:  # exactly yyyy-MM-dd, the projection's format (fromisoformat would take 20260101 too)
        datetime.strptime(first, "%Y-%m-%d")
        if len(first) != 10:
            raise ValueError(first)
    except ValueError:
        raise AthenaError(f"--first-date {first!r}: expected a date as 2026-01-01") from None
    bucket, prefix = split_location(location)
    qualified = (lambda name: f"`{database}`.`{name}`") if database else (lambda name: f"`{name}`")
    serde = ("ROW FORMAT SERDE 'org.openx.data.jsonserde.JsonSerDe'\n"
             "WITH SERDEPROPERTIES ('ignore.malformed.json' = 'true', 'case.insensitive' = 'false')\n"
             "STORED AS INPUTFORMAT 'org.apache.hadoop.mapred.TextInputFormat'\n"
             "OUTPUTFORMAT 'org.apache.hadoop.hive.ql.io.HiveIgnoreKeyTextOutputFormat'")
    statements = [f"-- shipper archive s3://{bucket}/{prefix} for Athena (engine 3) or Trino; run each statement "
                  f"on its own.\n-- Partitions are projected from {first} to today: no crawler, no MSCK REPAIR."]
    for by_instance in (False, True):
        name = f"{table}_by_instance" if by_instance else table
        partitions = "`dt` string, `hour` string" + (", `instance` string" if by_instance else "")
        statements.append(
            f"CREATE EXTERNAL TABLE IF NOT EXISTS {qualified(name)} (\n{_columns(COLUMNS)}\n)\n"
            f"PARTITIONED BY ({partitions})\n{serde}\n"
            f"LOCATION {_quote(base_location(bucket, prefix))}\n"
            f"TBLPROPERTIES (\n{_properties(_projection(first, by_instance, location_template(bucket, prefix, by_instance)))}\n);")
    if compacted:
        cbucket, cprefix = split_location(compacted)
        statements.append(
            f"CREATE EXTERNAL TABLE IF NOT EXISTS {qualified(table + '_parquet')} (\n{_columns(PARQUET_COLUMNS)}\n)\n"
            f"PARTITIONED BY (`dt` string, `hour` string)\nSTORED AS PARQUET\n"
            f"LOCATION {_quote(base_location(cbucket, cprefix))}\n"
            f"TBLPROPERTIES (\n{_properties(_projection(first, False, location_template(cbucket, cprefix, False)))}\n);")
    statements.append(_examples(table, qualified))
    return "\n\n".join(statements) + "\n"


def _examples(table: str, qualified) -> str:
    fleet, one = qualified(table), qualified(table + "_by_instance")
    errors = ("(level IN ('error', 'critical', 'fatal') OR regexp_like(message, "
              "'\\b(ERROR|CRITICAL|FATAL|Traceback|panic:)'))")
    return "\n".join([
        "-- Ready queries (always narrow dt, and hour where you can: they decide what is read).",
        "-- Errors per instance and image version on one day:",
        f"--   SELECT instance_id, image_id, element_at(labels, 'image_version') AS version, count(*) AS errors "
        f"FROM {fleet}",
        f"--   WHERE dt = '2026-11-29' AND {errors}",
        "--   GROUP BY 1, 2, 3 ORDER BY errors DESC;",
        "-- Which instances logged 'connection refused' between 13:00 and 13:10:",
        f"--   SELECT instance_id, count(*) AS lines, min(time) AS first FROM {fleet}",
        "--   WHERE dt = '2026-11-29' AND hour = '13' AND message LIKE '%connection refused%'",
        "--   AND from_iso8601_timestamp(time) < TIMESTAMP '2026-11-29 13:10:00 UTC' GROUP BY 1 ORDER BY lines DESC;",
        "-- The last lines of one instance (the _by_instance table reads only its objects):",
        f"--   SELECT time, tag, message FROM {one}",
        "--   WHERE dt = '2026-11-29' AND hour IN ('12', '13') AND instance = 'i-0abc'",
        "--   ORDER BY time DESC LIMIT 100;",
        "-- Instances that died of memory this week:",
        f"--   SELECT DISTINCT instance_id, image_id FROM {fleet}",
        "--   WHERE dt >= '2026-11-23' AND regexp_like(message, 'Out of memory|MemoryError|OutOfMemoryError|oom-kill');",
    ])
