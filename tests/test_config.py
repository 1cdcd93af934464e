import subprocess
import sys

import pytest

from shipper.config import interpolate, load, load_text, parse_duration, parse_size
from shipper.errors import ConfigError

MINIMAL = """
[[inputs]]
type = "file"
paths = ["/var/log/app/*.log"]

[[outputs]]
type = "directory"
path = "/tmp/archive"
"""


def problems_of(text: str, environ=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(text, "test.toml", environ or {})
    return info.value.problems


@pytest.mark.parametrize("text,seconds", [("500ms", 0.5), ("10s", 10), ("5m", 300), ("1h", 3600), ("2d", 172800),
                                          (3, 3.0), (1.5, 1.5), ("7", 7.0)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["10 parsecs", "-1s", "", "s", True, -2])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("text,size", [("64MiB", 64 * 2**20), ("256KiB", 262144), ("10MB", 10**7), ("512B", 512),
                                       ("1GiB", 2**30), (4096, 4096), ("1.5KiB", 1536)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["64 bananas", "MiB", -1, False])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_interpolation():
    env = {"A": "x", "EMPTY": ""}
    assert interpolate("${A}/${B:-dflt}/${EMPTY:-e}", env) == "x/dflt/e"
    assert interpolate("$${A} stays", env) == "${A} stays"
    with pytest.raises(ValueError, match="MISSING is not set"):
        interpolate("${MISSING}", env)


def test_minimal_config_gets_defaults():
    config = load_text(MINIMAL, "t.toml", {})
    assert config.agent.data_dir == "/var/lib/shipper"
    assert config.agent.flush_interval == 1.0
    assert config.inputs[0].tag == "file"  # the tag defaults to the input type
    assert config.inputs[0].max_line_bytes == 256 * 1024
    assert config.outputs[0].match == ["*"]
    assert config.outputs[0].upload_interval == 60.0


def test_labels_interpolated_from_environment():
    text = MINIMAL + '\n[agent.labels]\napp = "web"\nimage_version = "${IMAGE_VERSION:-unknown}"\n'
    assert load_text(text, "t", {}).agent.labels == {"app": "web", "image_version": "unknown"}
    assert load_text(text, "t", {"IMAGE_VERSION": "2026.11.29-1"}).agent.labels["image_version"] == "2026.11.29-1"


def test_every_problem_is_reported_with_its_key():
    text = """
[agent]
flush_interval = "soon"
colour = "blue"

[[inputs]]
type = "file"
paths = ["/x/*.log"]
start_at = "middle"
multiline = { start = "(" }

[[inputs]]
type = "file"
tag = "other"

[[outputs]]
type = "directory"
max_object_bytes = "lots"

[[outputs]]
type = "carrier-pigeon"
"""
    found = problems_of(text)
    assert any(p.startswith("agent.flush_interval: expected a duration") for p in found)
    assert any(p.startswith("agent.colour: unknown key") for p in found)
    assert any(p.startswith("inputs[0].start_at: expected one of") for p in found)
    assert any(p.startswith("inputs[0].multiline.start: invalid regular expression") for p in found)
    assert "inputs[1].paths: required" in found
    assert "outputs[0].path: required" in found
    assert any(p.startswith("outputs[0].max_object_bytes: expected a size") for p in found)
    assert any(p.startswith("outputs[1].type: unknown output type 'carrier-pigeon'") for p in found)
    assert len(found) == 8


def test_missing_environment_variable_names_the_key():
    found = problems_of(MINIMAL.replace("/tmp/archive", "${ARCHIVE_DIR}"))
    assert found == ["outputs[0].path: environment variable ARCHIVE_DIR is not set "
                     "(use ${ARCHIVE_DIR:-default} for a default)"]


def test_wrong_types_and_sections():
    found = problems_of("inputs = 3\noutputs = []\n[agent]\nlabels = 5\n[extra]\n")
    assert "inputs: expected an array of tables ([[inputs]])" in found
    assert "outputs: at least one [[outputs]] table is required" in found
    assert "agent.labels: expected a table of strings" in found
    assert any(p.startswith("extra: unknown section") for p in found)


def test_regex_parser_needs_named_groups():
    text = MINIMAL.replace('type = "file"', 'type = "file"\nparser = "regex"')
    assert problems_of(text) == ['inputs[0].pattern: required with parser = "regex" (named groups (?P<name>...))']
    text = MINIMAL.replace('type = "file"', 'type = "file"\nparser = "regex"\npattern = "^(\\\\d+)"')
    assert problems_of(text) == ["inputs[0].pattern: has no named group (?P<name>...)"]


def test_key_template_is_checked():
    text = MINIMAL.replace('path = "/tmp/archive"', 'path = "/tmp/archive"\nkey = "{tag}/{when}-{seq}"')
    assert problems_of(text)[0].startswith("outputs[0].key: unknown placeholder {when}")
    text = MINIMAL.replace('path = "/tmp/archive"', 'path = "/tmp/archive"\nkey = "{tag}/{start}"')
    assert problems_of(text) == ["outputs[0].key: needs {seq}, so that two objects never get the same key"]


def test_invalid_toml_and_unreadable_file(tmp_path):
    assert problems_of("[agent\n")[0].startswith("test.toml: not valid TOML")
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "absent.toml"))


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "shipper", *args], capture_output=True, text=True, timeout=30,
                          **kwargs)


def test_check_command(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(MINIMAL)
    result = run_cli("check", "-c", str(good))
    assert result.returncode == 0, result.stderr
    assert "route: file -> outputs[0]" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL.replace('path = "/tmp/archive"', 'pathh = "/tmp/archive"'))
    result = run_cli("check", "-c", str(bad))
    assert result.returncode == 2
    assert "outputs[0].path: required" in result.stderr
    assert "outputs[0].pathh: unknown key" in result.stderr


def test_embedded_default_is_valid():
    result = run_cli("check")
    assert result.returncode == 0, result.stderr
    assert "<embedded default>" in result.stdout


def test_version():
    result = run_cli("version")
    assert result.returncode == 0 and result.stdout.startswith("shipper ")


def test_two_file_inputs_cannot_share_a_checkpoint_file():
    text = MINIMAL + '\n[[inputs]]\ntype = "file"\npaths = ["/other/*.log"]\n'
    assert problems_of(text) == ["inputs[1].id: 'file' is already the id of inputs[0] (ids default to the tag); "
                                 "give each file input its own id so their checkpoints stay apart"]
    load_text(text.replace('paths = ["/other/*.log"]', 'paths = ["/other/*.log"]\nid = "other"'), "t", {})


def test_a_syslog_message_must_fit_the_journal():
    problems = problems_of('[[inputs]]\ntype = "syslog"\nmax_message_bytes = "1MiB"\njournal_max_bytes = "2MiB"\n'
                           '[[outputs]]\ntype = "stdout"\n')
    assert any(p.startswith("inputs[0].max_message_bytes: at most a quarter of journal_max_bytes") for p in problems)
    load_text('[[inputs]]\ntype = "syslog"\nmax_message_bytes = "512KiB"\njournal_max_bytes = "2MiB"\n'
              '[[outputs]]\ntype = "stdout"\n', "test.toml", {})  # a quarter: fine


def test_a_forward_message_must_fit_the_journal():
    problems = problems_of('[[inputs]]\ntype = "forward"\njournal_max_bytes = "1MiB"\n[[outputs]]\ntype = "stdout"\n')
    assert any(p.startswith("inputs[0].max_message_bytes: at most a quarter of journal_max_bytes (262144 bytes)")
               for p in problems)
