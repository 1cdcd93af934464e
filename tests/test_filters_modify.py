"""modify: field operations, templates, tag rewriting and splits, shared dicts copied, agent keys safe."""

import orjson
import pytest

from shipper.config import Settings
from shipper.filters import FilterContext
from shipper.filters.modify import ModifyFilter, TemplateError, parse_template
from shipper.record import PARSED, TIME, Batch, Envelope, encode_ndjson
from shipper.stats import Stats

ENVELOPE = Envelope({"host": "ip-10-0-0-1", "instance_id": "i-0abc"}, {"app": "web"})
DEFAULTS = {"type": "modify", "match": ["*"], "rename": {}, "copy": {}, "set": {}, "add": {}, "remove": [],
            "tag": None, "tag_regex": None, "tag_field": "message", "max_tags": 100}


def make(**options):
    stats = Stats()
    settings = Settings("filters[1]", {**DEFAULTS, **options})
    assert ModifyFilter.problems(settings, "filters[1]") == []
    assert ModifyFilter.agent_problems(settings, "filters[1]", ENVELOPE.labels) == []
    return ModifyFilter(settings, FilterContext("modify.1", stats, ENVELOPE)), stats


def problems(**options):
    settings = Settings("filters[1]", {**DEFAULTS, **options})
    return ModifyFilter.problems(settings, "filters[1]") + \
        ModifyFilter.agent_problems(settings, "filters[1]", ENVELOPE.labels)


def decoded(batch):
    return [orjson.loads(line) for line in encode_ndjson(batch, ENVELOPE).splitlines()]


def blob(*lines, tag="app", source="/var/log/web.log"):
    batch = Batch(tag, source, 0.0, blob="".join(f"{line}\n" for line in lines).encode(), start=5, end=50)
    batch.on_done = object()
    return batch


def test_template_parsing():
    assert parse_template("{labels.app}-{source}") == [(True, "labels.app"), (False, "-"), (True, "source")]
    assert parse_template("{{x}}") == [(False, "{x}")]
    for bad in ("{", "}", "{}", "{ a}", "a{b", "x}y"):
        with pytest.raises(TemplateError):
            parse_template(bad)


def test_field_operations_in_order_and_copy_on_write():
    modify, _ = make(rename={"msg": "text"}, copy={"user": "user_id"}, set={"service": "{labels.app}-{tag}"},
                     add={"env": "prod", "user": "nobody"}, remove=["password"])
    shared = {PARSED: {"msg": "hi", "user": "ann", "password": "hunter2"}}
    batch = Batch("app", "/l", 0.0, messages=["a", "b"], fields=[shared, shared])
    [out] = modify.apply(batch)
    assert out.fields[0][PARSED] == {"text": "hi", "user": "ann", "user_id": "ann", "service": "web-app", "env": "prod"}
    assert shared == {PARSED: {"msg": "hi", "user": "ann", "password": "hunter2"}}  # never changed in place
    assert decoded(out)[0]["text"] == "hi" and "password" not in decoded(out)[0]


def test_numbers_and_booleans_are_set_as_they_are():
    modify, _ = make(set={"sampled": True, "weight": 3})
    [out] = modify.apply(Batch("app", None, 0.0, messages=["a"]))
    assert decoded(out)[0]["sampled"] is True and decoded(out)[0]["weight"] == 3


def test_reserved_names_never_pose_as_agent_keys():
    modify, _ = make(set={"host": "evil", "time": "1999-01-01T00:00:00Z", "\x00time": "x", "labels": "y"})
    [out] = modify.apply(Batch("app", None, 0.0, messages=["a"], fields=[{TIME: "2026-01-01T00:00:00.000000Z"}]))
    record = decoded(out)[0]
    assert record["host"] == "ip-10-0-0-1" and record["time"] == "2026-01-01T00:00:00.000000Z"
    assert record["labels"] == {"app": "web"}
    assert record["fields"] == {"host": "evil", "time": "1999-01-01T00:00:00Z", "\x00time": "x", "labels": "y"}


def test_remove_never_removes_agent_keys():
    modify, _ = make(remove=["\x00time", "unit"])
    [out] = modify.apply(Batch("app", None, 0.0, messages=["a"], fields=[{TIME: "2026-01-01T00:00:00.000000Z",
                                                                       "unit": "nginx.service"}]))
    assert out.fields == [{TIME: "2026-01-01T00:00:00.000000Z"}]


def test_a_template_naming_a_missing_field_leaves_the_record_alone_and_counts():
    modify, stats = make(set={"who": "{user}@{host}"})
    batch = Batch("app", None, 0.0, messages=["a", "b"], fields=[{PARSED: {"user": "ann"}}, None])
    [out] = modify.apply(batch)
    assert out.fields[0][PARSED]["who"] == "ann@ip-10-0-0-1"
    assert PARSED not in out.fields[1]
    assert stats.get("filter_template_misses", filter="modify.1") == 1


def test_plain_lines_with_a_batch_wide_template_share_one_dict_and_stay_a_blob():
    modify, _ = make(set={"service": "{labels.app}-{source}"})
    [out] = modify.apply(blob("one", "two"))
    assert out.blob == b"one\ntwo\n" and out.fields[0] is out.fields[1]
    assert [r["service"] for r in decoded(out)] == ["web-/var/log/web.log"] * 2
    assert [r["message"] for r in decoded(out)] == ["one", "two"]


def test_a_template_naming_the_message_gives_each_line_its_own():
    modify, _ = make(set={"copy_of": "<{message}>"})
    [out] = modify.apply(blob("one", "two"))
    assert [r["copy_of"] for r in decoded(out)] == ["<one>", "<two>"]


def test_tag_by_regex_on_plain_lines_splits_into_two_blobs_with_one_done():
    modify, _ = make(tag_regex=r"\b(ERROR|FATAL)\b", tag="app.errors")
    batch = blob("GET / 200", "ERROR db down", "ok", "FATAL gone", "ERRORS are not ERROR-ish?")
    rest, errors = modify.apply(batch)
    assert (rest.tag, rest.blob) == ("app", b"GET / 200\nok\n")
    assert (errors.tag, errors.blob) == ("app.errors", b"ERROR db down\nFATAL gone\nERRORS are not ERROR-ish?\n")
    assert rest.on_done is batch.on_done and errors.on_done is batch.on_done  # the pipeline counts them down
    assert (errors.start, errors.end) == (5, 50)


def test_tag_regex_on_text_path_and_fields_cut_along():
    # "é" makes the regex a text one; the lines carry shared fields (the level filter's)
    modify, _ = make(tag_regex="é.", tag="accents")
    info, error = {PARSED: {"level": "info"}}, {PARSED: {"level": "error"}}
    batch = Batch("app", None, 0.0, blob="café!\nplain\nrésumé\n".encode(), fields=[info, error, error])
    rest, moved = modify.apply(batch)
    assert rest.message_list() == ["plain"] and rest.fields == [error]
    assert moved.message_list() == ["café!", "résumé"] and moved.fields == [info, error]


def test_whole_batch_tag_from_a_constant_template():
    modify, _ = make(tag="{labels.app}.{tag}")
    batch = blob("a")
    assert modify.apply(batch) == [batch] and batch.tag == "web.app"


def test_tag_from_a_field_and_regex_groups_splits_in_order():
    modify, stats = make(tag="{service}.{severity}", tag_regex=r"(?P<severity>ERROR|WARN)")
    batch = Batch("app", None, 0.0, messages=["ERROR a", "WARN b", "ok", "ERROR c", "ERROR d"],
                  fields=[{PARSED: {"service": "api"}}, {PARSED: {"service": "db"}}, None, None,
                          {PARSED: {"service": "api"}}])
    parts = modify.apply(batch)
    assert [(p.tag, p.messages) for p in parts] == [
        ("api.ERROR", ["ERROR a", "ERROR d"]), ("db.WARN", ["WARN b"]), ("app", ["ok", "ERROR c"])]
    assert stats.get("filter_template_misses") == 1  # "ERROR c" has no service


def test_tag_regex_on_another_field():
    modify, _ = make(tag="slow", tag_regex=r"^\d{4,}$", tag_field="duration_ms")
    batch = Batch("app", None, 0.0, messages=["a", "b"], fields=[{PARSED: {"duration_ms": 12000}},
                                                                 {PARSED: {"duration_ms": 12}}])
    parts = modify.apply(batch)
    assert [(p.tag, p.messages) for p in parts] == [("slow", ["a"]), ("app", ["b"])]  # as they first appear


def test_distinct_tags_are_bounded():
    modify, stats = make(tag="t.{id}", max_tags=2)
    batch = Batch("app", None, 0.0, messages=list("abcd"), fields=[{PARSED: {"id": c}} for c in "abcd"])
    parts = modify.apply(batch)
    assert [(p.tag, p.messages) for p in parts] == [("t.a", ["a"]), ("t.b", ["b"]), ("app", ["c", "d"])]
    assert stats.get("filter_tag_overflows", filter="modify.1") == 2


@pytest.mark.parametrize("options, message", [
    ({"set": {"x": "{nope"}}, "filters[1].set.x: '{nope': a placeholder is {name}"),
    ({"set": {"x": "{labels.team}"}}, "filters[1].set.x: {labels.team} names a label that [agent.labels] does not set"),
    ({"tag": "{labels.team}"}, "filters[1].tag: {labels.team} names a label"),
    ({"add": {"x": [1]}}, "filters[1].add.x: expected a template string, a number or a boolean"),
    ({"tag_regex": "("}, "filters[1].tag_regex: needs tag"),
    ({"tag": "x", "tag_regex": "("}, "filters[1].tag_regex: invalid regular expression"),
    ({"tag": " "}, "filters[1].tag: cannot be empty"),
    ({}, "filters[1]: nothing to do"),
    ({"rename": {"a": ""}}, "filters[1].rename: field names cannot be empty"),
    ({"set": {"user.id": "x"}}, "filters[1].set: 'user.id': nested fields cannot be changed"),
    ({"remove": ["user.id"]}, "filters[1].remove: 'user.id': nested fields cannot be changed"),
])
def test_problems_name_the_key(options, message):
    found = problems(**options)
    assert any(p.startswith(message) for p in found), found
