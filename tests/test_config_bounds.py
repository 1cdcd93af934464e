"""Issue 12 finding 15: every duration, size and integer of the config has an upper bound, and nan/inf
are refused, so that `shipper check` catches what used to pass and crash at run time (OverflowError
in a wait, MemoryError in a read). Each problem names its key."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from shipper import config as config_module
from shipper.config import Option, load_text, parse_duration, parse_size, validate_section
from shipper.errors import ConfigError


def config_with(agent: str = "", inputs: str = "", outputs: str = "") -> str:
    return f"""
[agent]
data_dir = "/tmp/shipper-bounds"
{agent}

[[inputs]]
type = "file"
paths = ["/var/log/app/*.log"]
{inputs}

[[outputs]]
type = "directory"
path = "/tmp/shipper-bounds/archive"
{outputs}
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(text, "t.toml", {})
    return info.value.problems


@pytest.mark.parametrize("value", ["999999999999d", "367d", "9" * 400, math.inf, -math.inf, math.nan, 10**400],
                         ids=["12-digit-days", "367d", "400-digit-string", "inf", "-inf", "nan", "400-digit-int"])
def test_absurd_durations_are_refused(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("value", ["999999999999TiB", "2TiB", "9" * 400, 2**63, 10**400],
                         ids=["12-digit-TiB", "2TiB", "400-digit-string", "2**63", "400-digit-int"])
def test_absurd_sizes_are_refused(value):
    with pytest.raises(ValueError):
        parse_size(value)


def test_the_bounds_themselves_are_accepted_and_named_in_the_message():
    assert parse_duration("366d") == config_module.MAX_DURATION
    assert parse_size("1TiB") == config_module.MAX_SIZE
    with pytest.raises(ValueError, match="limit of 366d"):
        parse_duration("999999999999d")
    with pytest.raises(ValueError, match="limit of 1TiB"):
        parse_size("5TiB")
    with pytest.raises(ValueError, match="nan"):
        parse_duration(math.nan)


def test_an_option_can_set_its_own_maximum():
    schema = {"wait": Option("duration", 1.0, maximum=60.0), "size": Option("size", 1024, maximum=4096),
              "count": Option("int", 1, maximum=10), "ratio": Option("float", 0.5)}
    problems: list[str] = []
    validate_section("x", {"wait": "2m", "size": "8KiB", "count": 11, "ratio": math.inf}, schema, problems)
    assert problems == ["x.wait: '2m' is longer than the limit of 1m",
                        "x.size: '8KiB' is more than the limit of 4KiB",
                        "x.count: must be at most 10",
                        "x.ratio: expected a finite number, got inf"]
    problems = []
    settings = validate_section("x", {"wait": "1m", "size": "4KiB", "count": 10, "ratio": 2}, schema, problems)
    assert problems == [] and (settings.wait, settings.size, settings.count, settings.ratio) == (60.0, 4096, 10, 2.0)


def test_each_absurd_setting_is_reported_with_its_key():
    problems = problems_of(config_with(
        agent='flush_interval = "999999999999d"\nshutdown_timeout = inf\ncheckpoint_interval = nan\n'
              'retry_max_delay = "400d"',
        inputs="max_lines = 9223372036854775807\nmax_line_bytes = \"999999999999TiB\"\npoll_interval = 1e300",
        outputs='upload_interval = "99999999d"\nbuffer_max_bytes = "1TiB"'))
    keys = sorted(problem.split(":", 1)[0] for problem in problems)
    assert keys == ["agent.checkpoint_interval", "agent.flush_interval", "agent.retry_max_delay",
                    "agent.shutdown_timeout", "inputs[0].max_line_bytes", "inputs[0].max_lines",
                    "inputs[0].poll_interval", "outputs[0].buffer_max_bytes", "outputs[0].upload_interval"]


def test_large_but_sane_settings_still_pass():
    config = load_text(config_with(agent='shutdown_timeout = "40s"\nflush_interval = "1h"',
                                   outputs='upload_interval = "1d"\nbuffer_max_bytes = "1GiB"'), "t.toml", {})
    assert config.agent.flush_interval == 3600 and config.outputs[0].upload_interval == 86400


def test_shipper_check_refuses_what_would_crash_at_run_time(tmp_path):
    path = tmp_path / "shipper.toml"
    path.write_text(config_with(agent='flush_interval = "999999999999d"', outputs="upload_interval = nan"))
    result = subprocess.run([sys.executable, "-m", "shipper", "check", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "agent.flush_interval: '999999999999d' is longer than the limit of 1h" in result.stderr
    assert "outputs[0].upload_interval: expected a duration" in result.stderr and "nan" in result.stderr
    assert "Traceback" not in result.stderr
