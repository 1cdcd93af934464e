"""`shipper athena`: the table definitions, checked offline. Parsed with sqlglot in the Athena dialect;
columns, partitions and projection properties checked against the key the S3 output writes. What only
a real Athena can tell (the SerDe reading the objects, projection at query time) is said in the README."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest
import sqlglot
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlglot import exp

from fleet_archive import shipper
from shipper.outputs.keys import DEFAULT_KEY, key_values, render_key
from shipper.postmortem.athena import COLUMNS, AthenaError, table_definitions

DDL = table_definitions("s3://fleet-logs/prod/eu", first_date="2026-01-01", compacted="s3://fleet-logs/prod-parquet")


def statements(text: str) -> dict[str, exp.Create]:
    parsed = [s for s in sqlglot.parse(text, read="athena") if s is not None]
    # what is not a CREATE is the ready queries: comments only
    assert all(isinstance(s, exp.Create) or s.sql(comments=False) == "" for s in parsed)
    return {s.this.this.name: s for s in parsed if isinstance(s, exp.Create)}


def properties(create: exp.Create) -> dict[str, str]:
    found = {}
    for prop in create.args["properties"].expressions:
        if type(prop) is exp.Property:  # noqa: E721 - its subclasses are the clauses below
            found[prop.name] = prop.args["value"].name
        elif isinstance(prop, exp.LocationProperty):
            found["LOCATION"] = prop.this.name
        elif isinstance(prop, exp.PartitionedByProperty):
            found["PARTITIONED BY"] = [c.name for c in prop.this.expressions]
    return found


def test_three_tables_parse_with_their_columns_and_partitions():
    tables = statements(DDL)
    assert set(tables) == {"shipper_logs", "shipper_logs_by_instance", "shipper_logs_parquet"}
    for name, create in tables.items():
        assert create.args["kind"] == "TABLE" and "EXTERNAL" in create.sql(dialect="athena")
        columns = [c.name for c in create.this.expressions]
        assert {"time", "tag", "host", "instance_id", "image_id", "message", "labels", "metrics"} <= set(columns)
    assert [c.name for c in tables["shipper_logs"].this.expressions] == [name for name, _ in COLUMNS]
    assert properties(tables["shipper_logs"])["PARTITIONED BY"] == ["dt", "hour"]
    assert properties(tables["shipper_logs_by_instance"])["PARTITIONED BY"] == ["dt", "hour", "instance"]
    assert "fields" in [c.name for c in tables["shipper_logs_parquet"].this.expressions]
    kinds = {c.name: c.args["kind"].sql(dialect="hive") for c in tables["shipper_logs"].this.expressions}
    assert kinds["labels"] == "MAP<STRING, STRING>" and kinds["metrics"] == "MAP<STRING, DOUBLE>"
    assert "STORED AS PARQUET" in DDL and DDL.count("org.openx.data.jsonserde.JsonSerDe") == 2


def test_every_partition_column_is_projected_and_its_template_names_them_all():
    for create in statements(DDL).values():
        props = properties(create)
        assert props["projection.enabled"] == "true"
        template = props["storage.location.template"]
        for column in props["PARTITIONED BY"]:
            assert f"projection.{column}.type" in props, column  # Athena refuses a table missing one
            assert "${" + column + "}" in template
        assert props["projection.dt.format"] == "yyyy-MM-dd" and props["projection.dt.range"] == "2026-01-01,NOW"
        assert (props["projection.hour.type"], props["projection.hour.range"], props["projection.hour.digits"]) == \
            ("integer", "0,23", "2")
        assert template.startswith(props["LOCATION"])
    assert properties(statements(DDL)["shipper_logs_by_instance"])["projection.instance.type"] == "injected"


TABLES = statements(DDL)
PROPERTIES = {name: properties(create) for name, create in TABLES.items()}


def projected(template: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], template)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1_767_225_600, max_value=2_000_000_000),   # 2026-01-01 .. 2033
       st.from_regex(r"i-[0-9a-f]{8,17}|ip-10-[0-9]{1,3}-[0-9]{1,3}", fullmatch=True),
       st.sampled_from(["app", "metrics", "lifecycle", "web.access"]), st.integers(1, 999_999))
def test_the_projection_covers_every_key_the_s3_output_writes(epoch, instance, tag, seq):
    """Render the S3 output's key, then the projected locations with the values projection would give:
    the object lies under both, and the values are inside the projected ranges."""
    key = render_key("{prefix}/" + DEFAULT_KEY, key_values(epoch, tag, {"instance_id": instance}, seq, "gzip",
                                                           "prod/eu"), {})
    url = f"s3://fleet-logs/{key}"
    moment = datetime.fromtimestamp(epoch, timezone.utc)
    values = {"dt": moment.strftime("%Y-%m-%d"), "hour": f"{moment.hour:02d}", "instance": instance}
    for name in ("shipper_logs", "shipper_logs_by_instance"):
        props = PROPERTIES[name]
        assert url.startswith(projected(props["storage.location.template"], values)), (name, url)
        low, high = map(int, props["projection.hour.range"].split(","))
        assert low <= int(values["hour"]) <= high and len(values["hour"]) == int(props["projection.hour.digits"])
        first = props["projection.dt.range"].split(",")[0]
        assert values["dt"] >= first  # dates sort as text in yyyy-MM-dd


def test_layouts_and_names_it_cannot_describe_are_refused():
    with pytest.raises(AthenaError, match="does not begin with"):
        table_definitions("s3://b/p", key_template="{prefix}/{instance_id}/{date}/{seq}.ndjson{ext}")
    with pytest.raises(AthenaError, match="expected s3://BUCKET"):
        table_definitions("./archive")
    with pytest.raises(AthenaError, match="--table"):
        table_definitions("s3://bucket/p", table="Drop Table;")
    for bad in ("yesterday", "20260101", "2026-1-1"):
        with pytest.raises(AthenaError, match="--first-date"):
            table_definitions("s3://bucket/p", first_date=bad)
    odd = statements(table_definitions("s3://bucket/logs/dt=old", first_date="2026-01-01"))
    assert properties(odd["shipper_logs"])["LOCATION"] == "s3://bucket/logs/dt=old/"  # not cut at its "dt="
    unprefixed = statements(table_definitions("s3://bucket", first_date="2026-01-01"))
    assert properties(unprefixed["shipper_logs"])["storage.location.template"] == "s3://bucket/dt=${dt}/hour=${hour}/"


def test_the_command_prints_the_definitions_and_ready_queries():
    result = shipper("athena", "s3://fleet-logs/prod", "--first-date", "2026-03-01", "--database", "ops")
    assert result.returncode == 0, result.stderr
    assert "CREATE EXTERNAL TABLE IF NOT EXISTS `ops`.`shipper_logs`" in result.stdout
    assert "-- Errors per instance and image version on one day:" in result.stdout
    assert "instance = 'i-0abc'" in result.stdout  # the injected table's queries name their instance
    assert len(statements(result.stdout)) == 2  # without --compacted, no Parquet table
    bad = shipper("athena", "s3://fleet-logs/prod", "--key", "{date}/{seq}")
    assert bad.returncode == 2 and "partition projection needs that layout" in bad.stderr
