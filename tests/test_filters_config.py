"""[[filters]] in the config: validated per type, errors naming the key, the chain per route in check;
the level order shared by the filter types; drops by filter in `shipper status`."""

import subprocess
import sys

import pytest

from shipper.config import load_text
from shipper.errors import ConfigError
from shipper.filters import LEVELS, level_rank, normalize_level, record_level
from shipper.record import PARSED
from shipper.status import render_status

BASE = """
[agent]
data_dir = "/tmp/shipper-test-filters"
[agent.labels]
app = "web"
[[inputs]]
type = "file"
tag = "app"
paths = ["/var/log/app/*.log"]
[[outputs]]
type = "directory"
path = "/tmp/archive"
[[outputs]]
type = "directory"
match = ["app.errors"]
path = "/tmp/errors"
"""


def problems_of(filters: str) -> list[str]:
    text = filters + BASE if filters.startswith("filters =") else BASE + filters  # a key before any table
    with pytest.raises(ConfigError) as caught:
        load_text(text, "test.toml")
    return caught.value.problems


def test_filters_load_in_order_with_defaults():
    config = load_text(BASE + """
[[filters]]
type = "grep"
rules = [{ exclude = "GET /health" }]
[[filters]]
type = "sample"
match = ["app"]
rate = 10
""", "test.toml")
    assert [(f.type, f.where, f.match) for f in config.filters] == [("grep", "filters[0]", ["*"]),
                                                                    ("sample", "filters[1]", ["app"])]
    assert config.filters[1].key is None and config.filters[0].keep_level is None
    assert load_text(BASE, "test.toml").filters == []


def test_describe_prints_the_chain_per_route_and_where_a_set_tag_goes():
    config = load_text(BASE + """
[[filters]]
type = "grep"
match = ["other"]
rules = [{ exclude = "x" }]
[[filters]]
type = "modify"
tag_regex = 'ERROR'
tag = "app.errors"
""", "test.toml")
    text = config.describe()
    assert "filters[1]: modify match=* tag -> 'app.errors' when message ~ 'ERROR'" in text
    assert "route: app -> modify.1 -> outputs[0]" in text  # grep.0 does not match the tag app
    assert "route: app.errors (tag set by modify.1) -> outputs[0], outputs[1]" in text


@pytest.mark.parametrize("filters, expected", [
    ('[[filters]]\nrules = []', "filters[0].type: required (one of grep, level, modify, redact, sample, throttle)"),
    ('[[filters]]\ntype = "gerp"', "filters[0].type: unknown filter type 'gerp'; did you mean grep?"),
    ('[[filters]]\ntype = "sample"\nrate = 2\nratio = 3', "filters[0].ratio: unknown key"),
    ('[[filters]]\ntype = "sample"\nrat = 2', "filters[0].rat: unknown key; did you mean rate?"),
    ('[[filters]]\ntype = "sample"', "filters[0].rate: required"),
    ('[[filters]]\ntype = "sample"\nrate = 2\nmatch = 3', "filters[0].match: expected a list of strings"),
    ('[[filters]]\ntype = "grep"\nrules = [{ include = "(" }]',
     "filters[0].rules[0].include: invalid regular expression '('"),
    ('[[filters]]\ntype = "grep"\nrules = [{ exclude = "x" }]\nkeep_level = "loud"',
     "filters[0].keep_level: unknown level 'loud'"),
    ('[[filters]]\ntype = "modify"\nset = { team = "{labels.team}" }',
     "filters[0].set.team: {labels.team} names a label that [agent.labels] does not set (set: app)"),
    ('filters = 3', "filters: expected an array of tables ([[filters]])"),
    ('filters = [3]', "filters[0]: expected a table, got int"),
])
def test_problems_name_the_filter_key(filters, expected):
    found = problems_of(filters)
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_reported_not_just_the_first():
    found = problems_of("""
[[filters]]
type = "grep"
rules = [{ exclude = "(" }]
kep_level = "x"
[[filters]]
type = "sample"
rate = 0
""")
    assert [p.split(":")[0] for p in found] == ["filters[0].kep_level", "filters[0].rules[0].exclude",
                                                "filters[1].rate"]


def test_shipper_check_names_the_key_and_exits_2(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BASE + '\n[[filters]]\ntype = "grep"\nrules = [{ exclude = "x" }]\n'
                           '[[filters]]\ntype = "grep"\nrules = [{ exclude = "x" }]\n'
                           '[[filters]]\ntype = "grep"\nrules = [{ exclude = "[a-" }]\n')
    result = subprocess.run([sys.executable, "-m", "shipper", "check", "-c", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "filters[2].rules[0].exclude: invalid regular expression '[a-'" in result.stderr


def test_levels_order_and_aliases():
    assert [level_rank(name) for name in LEVELS] == list(range(8))
    assert normalize_level("WARNING") == "warn" and normalize_level(" Err ") == "error"
    assert normalize_level("crit") == "critical" and normalize_level("emerg") == "fatal"
    assert normalize_level(3) == "error" and normalize_level("7") == "debug"  # syslog priorities
    assert normalize_level(True) is None and normalize_level("loud") is None and normalize_level(8) is None
    assert record_level({PARSED: {"severity": "WARNING"}}) == "warn"
    assert record_level({"priority": 2}) == "critical" and record_level(None) is None


def test_status_shows_drops_by_filter_and_reason():
    document = {
        "version": "0", "identity": {"host": "h"}, "healthy": True, "uptime_seconds": 5, "reloads": 0,
        "rates": None, "inputs": [], "outputs": [],
        "counters": {"records_dropped": [
            {"labels": {"filter": "grep.0", "input": "app", "reason": "filtered"}, "value": 100},
            {"labels": {"filter": "sample.2", "input": "app", "reason": "sampled"}, "value": 9},
            {"labels": {"output": "s3.0", "reason": "too_old"}, "value": 1}],
            "filter_errors": [{"labels": {"filter": "modify.1"}, "value": 2}]},
    }
    text = render_status(document)
    rows = [line.split() for line in text.splitlines()[text.splitlines().index(next(
        line for line in text.splitlines() if line.startswith("FILTER"))):]]
    assert rows == [["FILTER", "INPUT", "REASON", "DROPPED", "ERRORS"], ["grep.0", "app", "filtered", "100"],
                    ["sample.2", "app", "sampled", "9"], ["modify.1", "0", "2"]]


def test_a_filter_whose_match_takes_no_tag_is_a_warning():
    config = load_text(BASE + """
[[filters]]
type = "sample"
match = ["ap"]
rate = 2
[[filters]]
type = "modify"
tag = "app.errors"
[[filters]]
type = "sample"
match = ["app.errors"]
rate = 2
""", "test.toml")
    assert config.warnings() == ["filters[0]: its match (ap) takes no input's tag (app): this filter never applies"]


def test_a_redact_after_a_retagging_modify_that_misses_the_new_tag_is_a_warning():
    config = load_text(BASE + """
[[filters]]
type = "modify"
tag_regex = 'ERROR'
tag = "app.errors"
[[filters]]
type = "redact"
match = ["app"]
""", "test.toml")
    (warning,) = config.warnings()
    assert warning.startswith("filters[1]: records that filters[0] retags to 'app.errors' skip this redact")
    fine = load_text(BASE + """
[[filters]]
type = "redact"
match = ["app"]
[[filters]]
type = "modify"
tag = "app.errors"
""", "test.toml")
    assert fine.warnings() == []
