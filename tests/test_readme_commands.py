"""Every command of the README's "Using it", "Debug a server that no longer exists" and "Question the whole
fleet" blocks, run exactly
as written (through bash, with the venv on the PATH as `. .venv/bin/activate` puts it): against the
archive of a real `shipper run --default`, and, for s3:// and cwl://, against a moto server that a real
agent with an EC2 identity shipped to (AWS_ENDPOINT_URL points the commands there)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from aws import s3_output
from conftest import ROOT, Agent, agent_config, read_archive, wait_for
from imds import FakeImds

INSTANCE = "i-0abc1234def567890"  # tests/imds.py's, the README's example
LINES = 'level=error msg="upstream timeout after 30s"\nlevel=info msg="request served"\n'


def readme_commands(heading: str) -> list[str]:
    """The command lines of the first ```sh block under ``heading`` (comments and blank lines left out)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    commands = []
    for line in block.splitlines():
        command = re.sub(r"\s+#\s.*$", "", line).strip()
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def run_as_written(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def user_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SHIPPER_")}
    environ["PATH"] = f"{Path(sys.executable).parent}:{environ.get('PATH', '')}"  # what activate does
    return {**environ, **(extra or {})}


def test_the_using_it_commands_work_as_written_next_to_make_run(tmp_path):
    home = tmp_path / "checkout"
    (home / "logs").mkdir(parents=True)
    (home / "logs" / "app.log").write_text("hello from the first hour\n")
    commands = readme_commands("## Using it")
    assert commands[0] == ". .venv/bin/activate"
    (home / ".venv" / "bin").mkdir(parents=True)
    (home / ".venv" / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    env = user_env()
    with open(tmp_path / "agent.stderr", "wb") as stderr:  # what `make run` starts
        agent = subprocess.Popen([sys.executable, "-m", "shipper", "run", "--default"], cwd=home, env=env,
                                 stderr=stderr)
    try:
        wait_for(lambda: read_archive(home / "shipper-data" / "archive"), timeout=30, message="the archive")
        script = " && ".join(commands)  # one shell, as a person types them one after the other
        result = run_as_written(script, home, env)
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
    assert result.returncode == 0, result.stdout + result.stderr
    assert "healthy" in result.stdout and "INPUT" in result.stdout  # shipper status
    assert "configuration OK" in result.stdout  # shipper check --default
    assert "hello from the first hour" in result.stdout  # shipper fetch ./shipper-data/archive
    assert re.search(r"^shipper \d+\.\d+", result.stdout, re.M)  # shipper version


def test_the_debug_commands_work_as_written(workdir, aws, tmp_path):
    # A server's life: a real agent with an EC2 identity ships to S3 and CloudWatch Logs on moto ...
    aws.s3.create_bucket(Bucket="fleet-logs")
    output = s3_output(aws.endpoint, "fleet-logs", prefix="shipper", upload_interval="300ms") + f"""
[[outputs]]
type = "cloudwatch_logs"
match = ["app"]
log_group = "/shipper/web"
format = "json"
flush_interval = "100ms"
region = "us-east-1"
endpoint_url = "{aws.endpoint}"
"""
    with FakeImds() as imds:
        config = agent_config(workdir / "logs", workdir / "data", output=output, parser="logfmt").replace(
            'metadata = "off"', f'metadata = "ec2"\nimds_endpoint = "{imds.endpoint}"')
        agent = Agent(workdir, config, env=aws.env).start()
        try:
            with open(workdir / "logs" / "app.log", "a") as handle:
                handle.write(LINES)
            wait_for(lambda: checkpoint_reached(workdir), timeout=30, message="both lines shipped")
            time.sleep(0.5)
            assert agent.stop() == 0
        finally:
            agent.ensure_stopped()
    # ... and a local archive as `make run` writes it, off EC2.
    home = tmp_path / "checkout"
    (home / "logs").mkdir(parents=True)
    (home / "logs" / "app.log").write_text("a line of the local archive\n")
    env = user_env({**aws.env, "AWS_ENDPOINT_URL": aws.endpoint})
    local = subprocess.Popen([sys.executable, "-m", "shipper", "run", "--default"], cwd=home, env=user_env(),
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: read_archive(home / "shipper-data" / "archive"), timeout=30, message="the local archive")
    finally:
        local.send_signal(signal.SIGTERM)
        assert local.wait(30) == 0

    results = {}
    for command in readme_commands("## Debug a server that no longer exists"):
        result = run_as_written(command, home, env)
        assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}"
        results[command] = result
    outputs = list(results.values())
    assert INSTANCE in outputs[0].stdout  # --list-instances of the bucket
    assert outputs[1].stdout == LINES  # its lines, as written
    assert outputs[2].stdout == LINES.splitlines(keepends=True)[0]  # --tag app --level error
    assert "upstream timeout" in outputs[3].stdout and "request served" not in outputs[3].stdout  # cwl --grep
    assert (home / "report.html").is_file()
    hostname = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    assert hostname in outputs[5].stdout  # --list-instances of the local archive
    assert "a line of the local archive" in (home / "report.html").read_text()  # the last report, of it
    fleet = [run_as_written(command, home, env) for command in readme_commands("## Question the whole fleet")]
    assert all(r.returncode == 0 for r in fleet), [r.stderr for r in fleet]
    assert INSTANCE in fleet[0].stdout and "(1 row)" in fleet[0].stdout  # the instance that logged a timeout
    assert fleet[1].stdout == "tag,lines\napp,1\n"  # the local archive's one line
    assert "CREATE EXTERNAL TABLE IF NOT EXISTS `shipper_logs_by_instance`" in (home / "shipper-tables.sql").read_text()


def checkpoint_reached(workdir: Path) -> bool:
    from conftest import checkpoint_offset

    return checkpoint_offset(workdir) == len(LINES)
