"""A new user's first hour: the README's commands and examples work as written (issue 14).

`make run` always runs the embedded default, config errors name their file and give one error per
cause, `check` warns about (and with --strict refuses) a pipeline that ships nothing, reads the unit's
environment file, and the README's own configuration example parses a joined traceback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT, agent_config, read_archive, wait_for
from shipper import cli, config as config_module
from shipper.config import config_path, load, load_text, parse_duration
from shipper.envfile import environment_with, parse_env_text, read_env_file
from shipper.errors import ConfigError


def shipper(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SHIPPER_")}
    return subprocess.run([sys.executable, "-m", "shipper", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env={**environ, **(env or {})})


def readme_config() -> str:
    """The README's configuration reference: its first TOML block."""
    return re.search(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)


# ---------------------------------------------------------------- make run: the embedded default

def test_make_run_runs_the_embedded_default_even_where_a_system_config_exists():
    dry = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert re.search(r"/shipper run --default$", dry, re.M), dry


def test_the_config_searched_for_is_the_system_one_unless_the_default_is_asked_for(tmp_path, monkeypatch):
    system = tmp_path / "shipper.toml"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", str(system))
    assert config_path(None) is None  # no system config: the embedded default
    system.write_text("[agent]\n")
    assert config_path(None) == str(system)
    assert config_path(None, embedded=True) is None
    assert config_path("other.toml", embedded=False) == "other.toml"
    assert load(None).source == "<embedded default>"


def test_run_default_ignores_a_broken_system_config(tmp_path, monkeypatch):
    # `shipper run --default` is what make run calls: a system config that would fail (an unset
    # ${SHIPPER_BUCKET}) is never read. The check path of the same choice, in process.
    system = tmp_path / "shipper.toml"
    system.write_text('[[inputs]]\ntype = "file"\npaths = ["/x/*.log"]\n[[outputs]]\ntype = "s3"\n'
                      'bucket = "${SHIPPER_BUCKET}"\n')
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", str(system))
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_PATH", str(system))
    monkeypatch.delenv("SHIPPER_BUCKET", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["check"]) == cli.EXIT_CONFIG  # the system config, found and refused
    assert cli.main(["check", "--default"]) == cli.EXIT_OK


# ---------------------------------------------------------------- errors: which file, one per cause

def test_an_error_names_the_file_and_an_unset_variable_is_reported_once(tmp_path):
    path = tmp_path / "shipper.toml"
    path.write_text('[[inputs]]\ntype = "file"\ntag = "app"\npaths = ["/x/*.log"]\n'
                    '[[outputs]]\ntype = "s3"\nbucket = "${SHIPPER_BUCKET}"\n')
    result = shipper("check", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"shipper: 1 problem in {path}:",
        "  outputs[0].bucket: environment variable SHIPPER_BUCKET is not set (use ${SHIPPER_BUCKET:-default} "
        "for a default)"]


def test_an_unset_variable_hides_only_its_own_key_s_other_problems():
    text = ('[agent]\nflush_interval = "${NOPE}"\nlog_level = "loud"\n[[inputs]]\ntype = "file"\npaths = ["/x"]\n'
            '[[outputs]]\ntype = "s3"\nbucket = "Not_A_Bucket"\n')
    with pytest.raises(ConfigError) as caught:
        load_text(text, "x.toml", {})
    problems = caught.value.problems
    assert caught.value.source == "x.toml"
    assert problems[0].startswith("agent.flush_interval: environment variable NOPE is not set")
    assert not any(p.startswith("agent.flush_interval:") for p in problems[1:])  # not also "not a duration"
    assert any(p.startswith("agent.log_level:") for p in problems)
    assert any(p.startswith("outputs[0].bucket:") for p in problems)  # a real bucket problem stays


def test_a_misspelt_key_section_or_type_gets_the_nearest_name():
    with pytest.raises(ConfigError) as caught:
        load_text('[agent]\nflush_intervall = "1s"\n[servr]\n[[inputs]]\ntype = "fiel"\npaths = ["/x"]\n'
                  '[[outputs]]\ntype = "directory"\npath = "/tmp/a"\nmatch_ = ["*"]\n', "x.toml", {})
    problems = caught.value.problems
    assert "agent.flush_intervall: unknown key; did you mean flush_interval?" in problems
    assert "servr: unknown section; did you mean server?" in problems
    assert "inputs[0].type: unknown input type 'fiel'; did you mean file?" in problems
    assert "outputs[0].match_: unknown key; did you mean match?" in problems
    with pytest.raises(ConfigError) as caught:
        load_text('[agent]\nzzz = 1\n[[inputs]]\ntype = "metrics"\n[[outputs]]\ntype = "stdout"\n', "x", {})
    assert caught.value.problems[0].startswith("agent.zzz: unknown key (known: checkpoint_interval, data_dir,")


@pytest.mark.parametrize("text, seconds", [("1h30m", 5400.0), ("1m30s", 90.0), ("2d12h", 216000.0),
                                           ("1h 5m 10s", 3910.0), ("1s500ms", 1.5), ("90s", 90.0), ("15", 15.0)])
def test_compound_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, message", [
    ("-5s", "'-5s': must be positive"), ("-1h30m", "must be positive"), ("5x", 'expected a duration like'),
    ("1hh", "expected a duration like"), ("5m5", "expected a duration like"), ("", "expected a duration like")])
def test_bad_durations_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_duration(text)


# ---------------------------------------------------------------- check: a pipeline that ships nothing

UNROUTED = '[[inputs]]\ntype = "file"\npaths = ["/x/*.log"]\n[[outputs]]\ntype = "directory"\npath = "{archive}"\nmatch = ["app"]\n'


def test_check_warns_loudly_about_an_input_that_reaches_no_output_and_strict_refuses_it(tmp_path):
    path = tmp_path / "shipper.toml"
    path.write_text(UNROUTED.format(archive=tmp_path / "archive"))
    lenient = shipper("check", "-c", str(path))
    assert lenient.returncode == 0
    assert ("WARNING: inputs[0]: its records (tag 'file') reach no output: no output's match (app) takes that "
            "tag; set the input's tag or add it to an output's match") in lenient.stderr
    assert "configuration OK, with 1 warning" in lenient.stdout
    strict = shipper("check", "--strict", "-c", str(path))
    assert strict.returncode == 2 and "configuration OK" not in strict.stdout
    assert "refused: 1 warning and --strict" in strict.stderr
    path.write_text(UNROUTED.format(archive=tmp_path / "archive").replace('match = ["app"]', 'match = ["file"]'))
    clean = shipper("check", "--strict", "-c", str(path))
    assert clean.returncode == 0 and "WARNING" not in clean.stderr and "configuration OK\n" in clean.stdout


def test_the_agent_logs_the_same_warning_at_start(workdir, run_agent):
    agent = run_agent(agent_config(workdir / "logs", workdir / "data", output_extra='match = ["nothing"]'))
    wait_for(lambda: "reach no output" in agent.log(), message="the warning")
    agent.stop()


# ---------------------------------------------------------------- the unit's environment file

def test_environment_files_are_read_as_systemd_reads_them(tmp_path):
    text = ('# comment\n; also a comment\n\nPLAIN=value with spaces   \nSINGLE=\'a $b "c"\'\n'
            'DOUBLE="x\\"y\\\\z\\n"\nEMPTY=\nLONG=one \\\ntwo\n  INDENTED = yes\n')
    assert parse_env_text(text, "env") == {"PLAIN": "value with spaces", "SINGLE": 'a $b "c"', "DOUBLE": 'x"y\\z\n',
                                           "EMPTY": "", "LONG": "one two", "INDENTED": "yes"}
    with pytest.raises(ConfigError) as caught:
        parse_env_text('export A=1\nno equals\n1BAD=x\nQ="open\nS=\'x\'y\n', "/etc/shipper/environment")
    assert caught.value.source == "/etc/shipper/environment"
    assert caught.value.problems == [
        "/etc/shipper/environment:1: 'export' is not understood by systemd's EnvironmentFile; write A=...",
        "/etc/shipper/environment:2: expected NAME=VALUE (NAME of letters, digits and _), got 'no equals'",
        "/etc/shipper/environment:3: expected NAME=VALUE (NAME of letters, digits and _), got '1BAD=x'",
        "/etc/shipper/environment:4: Q: the double quote is not closed",
        "/etc/shipper/environment:5: S: the single quote is not closed"]
    with pytest.raises(ConfigError, match="cannot read the environment file"):
        read_env_file(str(tmp_path / "absent"))
    (tmp_path / "binary").write_bytes(b"A=\xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_env_file(str(tmp_path / "binary"))


def test_the_file_s_values_are_over_the_process_environment(tmp_path, monkeypatch):
    (tmp_path / "env").write_text("SHIPPER_BUCKET=from-file\n")
    monkeypatch.setenv("SHIPPER_BUCKET", "from-shell")
    monkeypatch.setenv("OTHER", "kept")
    environ = environment_with(str(tmp_path / "env"))
    assert environ["SHIPPER_BUCKET"] == "from-file" and environ["OTHER"] == "kept"
    assert environment_with(None)["SHIPPER_BUCKET"] == "from-shell"


def test_check_takes_an_env_file_and_reads_the_unit_s_one_for_the_packaged_config(tmp_path, monkeypatch, capsys):
    packaged = (ROOT / "packaging" / "shipper.toml").read_text()
    system, environment = tmp_path / "shipper.toml", tmp_path / "environment"
    system.write_text(packaged)
    monkeypatch.delenv("SHIPPER_BUCKET", raising=False)
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_PATH", str(system))
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", str(system))
    monkeypatch.setattr(cli, "DEFAULT_ENV_FILE", str(environment))
    assert cli.main(["check", "--strict"]) == cli.EXIT_CONFIG  # no environment file yet: SHIPPER_BUCKET unset
    assert "SHIPPER_BUCKET is not set" in capsys.readouterr().err
    environment.write_text("SHIPPER_BUCKET=acme-prod-logs\n")
    assert cli.main(["check", "--strict"]) == cli.EXIT_OK  # what the header of the packaged config says to run
    out = capsys.readouterr().out
    assert "s3://acme-prod-logs/shipper" in out and f"environment: {environment}" in out
    other = tmp_path / "other.env"
    other.write_text("SHIPPER_BUCKET=other-logs\n")
    assert cli.main(["check", "--strict", "-c", str(system), "--env-file", str(other)]) == cli.EXIT_OK
    assert "s3://other-logs/shipper" in capsys.readouterr().out


def test_run_with_an_env_file_uses_its_values(workdir, run_agent, tmp_path):
    (workdir / "logs" / "app.log").write_text("hello\n")
    (tmp_path / "agent.env").write_text(f"ARCHIVE_DIR={workdir / 'elsewhere'}\n")
    config = agent_config(workdir / "logs", workdir / "data").replace(
        f'path = "{workdir / "data" / "archive"}"', 'path = "${ARCHIVE_DIR}"')
    assert "${ARCHIVE_DIR}" in config
    agent = run_agent(config, extra_args=["--env-file", str(tmp_path / "agent.env")])
    wait_for(lambda: read_archive(workdir / "elsewhere"), message="the line in the env file's archive")
    agent.stop()
    assert [r["message"] for r in read_archive(workdir / "elsewhere")] == ["hello"]


# ---------------------------------------------------------------- the README's own example

def test_the_readme_configuration_is_valid_as_written():
    config = load_text(readme_config(), "README.md", {})
    assert {i.type for i in config.inputs} == {"file", "metrics", "journald", "forward", "syslog"}
    assert config.warnings() == []


TRACEBACK_LOG = """\
2026-11-29T13:17:18Z INFO starting
2026-11-29T13:17:19Z ERROR request failed
Traceback (most recent call last):
  File "/srv/app.py", line 10, in handle
    return work()
ValueError: bad input
2026-11-29T13:17:20Z WARNING slow
"""


def test_the_readme_file_input_example_parses_a_joined_traceback(workdir, run_agent):
    # The README's first [[inputs]] table as written, with only its paths moved here.
    reference = readme_config()
    table = reference[reference.index("[[inputs]]"):reference.index("[[inputs]]", reference.index("[[inputs]]") + 1)]
    example = tomllib.loads(table)["inputs"][0]
    assert example["parser"] == "regex" and example["multiline"] == {"preset": "python"}
    table = re.sub(r"^paths = .*$", f'paths = ["{workdir / "logs"}/*.log"]', table, flags=re.M)
    (workdir / "logs" / "app.log").write_text(TRACEBACK_LOG)
    config = (f'[agent]\ndata_dir = "{workdir / "data"}"\n[cloud]\nmetadata = "off"\n[server]\nlisten = ""\n'
              f'{table}\n[[outputs]]\ntype = "directory"\npath = "{workdir / "archive"}"\nupload_interval = "200ms"\n')
    agent = run_agent(config)
    # the last event ends at end of file: it ships once the multi-line timeout (1 s) passed
    wait_for(lambda: len(read_archive(workdir / "archive")) >= 3, message="three events")
    agent.stop()
    records = read_archive(workdir / "archive")
    assert [(r.get("level"), r.get("parse_error")) for r in records] == [("INFO", None), ("ERROR", None),
                                                                        ("WARNING", None)]
    error = records[1]
    assert error["time"].startswith("2026-11-29T13:17:19")  # time_key = "ts"
    assert error["msg"].startswith("request failed\nTraceback") and error["msg"].endswith("ValueError: bad input")
