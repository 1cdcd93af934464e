"""Shared helpers: run the real agent as a subprocess and read what it archived."""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

pytest_plugins = ["aws", "forward_peer", "packages"]
ROOT = Path(__file__).resolve().parent.parent


# In CI every test must run: a skip there fails the run, whatever its reason (tests/system-packages.sh
# installs what the skipping tests need). Elsewhere a skip says what is missing and how to get it.
STRICT_SKIPS = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def system_tool(probe: str) -> bool:
    """Whether a command (``journalctl``) or a file (``/lib/systemd/...``, also under /usr) is there."""
    if probe.startswith("/"):
        return os.path.exists(probe) or os.path.exists("/usr" + probe)
    return shutil.which(probe) is not None


def needs_system(probe: str, package: str) -> pytest.MarkDecorator:
    """Skip unless ``probe`` is installed, naming the Debian package (one of tests/system-packages.sh)."""
    return pytest.mark.skipif(not system_tool(probe), reason=(
        f"needs {probe}, from the Debian package {package}: `make test` installs it when run as root or "
        f"with sudo (tests/system-packages.sh)"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI={os.environ['CI']}), where every test must run: {reason}"


@contextlib.contextmanager
def mounted_tmpfs(mountpoint: Path, size: str, why: str):
    """A tmpfs of ``size`` at ``mountpoint`` (made here), unmounted after; skips (saying ``why``) unless
    root may mount one."""
    mountpoint.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                                           capture_output=True).returncode != 0:
        pytest.skip(f"needs root and a tmpfs mount ({why})")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05, message: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test with ``message`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def read_archive(path: Path) -> list[dict]:
    """Every record in a directory archive, object by object in key order (temporary objects excluded)."""
    records = []
    for obj in sorted(path.rglob("*.ndjson*")):
        if ".tmp" in obj.parts:
            continue
        data = gzip.decompress(obj.read_bytes()) if obj.suffix == ".gz" else obj.read_bytes()
        records.extend(orjson.loads(line) for line in data.splitlines())
    return records


def checkpoint_offsets(workdir: Path) -> dict[str, int]:
    """The file input's saved offsets (input tag "app"), by file path: its base file and journal."""
    from shipper.inputs.checkpoints import CheckpointStore

    return {c.path: c.offset for c in CheckpointStore(str(workdir / "data"), "app").load().values()}


def checkpoint_offset(workdir: Path, name: str = "app.log") -> int:
    """The saved offset of logs/NAME; 0 before its first checkpoint."""
    return checkpoint_offsets(workdir).get(str(workdir / "logs" / name), 0)


def http_get(url: str) -> tuple[int, bytes]:
    """(status, body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def messages(records: list[dict]) -> list[str]:
    return [r["message"] for r in records]


class Agent:
    """The agent as a real subprocess with a config written to a temp dir."""

    def __init__(self, workdir: Path, config: str, env: dict | None = None, wrapper: list[str] | None = None,
                 extra_args: list[str] | None = None):
        self.workdir = workdir
        self.extra_args = extra_args or []
        self.config_path = workdir / "shipper.toml"
        self.config_path.write_text(config)
        self.env = {**os.environ, **(env or {})}
        self.wrapper = wrapper or []
        self.proc: subprocess.Popen | None = None
        self.stderr_path = workdir / "agent.stderr"

    def start(self) -> "Agent":
        self._stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "shipper", "run", "-c", str(self.config_path), *self.extra_args],
            cwd=self.workdir, env=self.env, stdout=subprocess.PIPE, stderr=self._stderr)
        return self

    def send(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        finally:
            self._stderr.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._stderr.close()

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if hasattr(self, "_stderr") and not self._stderr.closed:
            self._stderr.close()


# Retries that stay well inside the tests' timeouts (the defaults grow to 30 s).
FAST_RETRIES = 'retry_initial_delay = "50ms"\nretry_max_delay = "500ms"'

INPUT_DEFAULTS = {"poll_interval": "50ms", "refresh_interval": "200ms", "rotate_wait": "500ms"}


def agent_config(logs: Path, data: Path, input_extra: str = "", output_extra: str = "",
                 agent_extra: str = "", pattern: str = "*.log", upload_interval: str = "200ms",
                 output: str | None = None, server: str = 'listen = ""', **input_options: str) -> str:
    """A config tuned for tests: fast polling, objects closed within a fraction of a second.

    ``output``: the whole [[outputs]] table(s) instead of the default directory archive.
    ``server``: the [server] section's body (off by default: tests may run agents side by side).
    """
    options = "\n".join(f'{k} = "{v}"' for k, v in {**INPUT_DEFAULTS, **input_options}.items())
    if output is None:
        output = f"""
[[outputs]]
type = "directory"
path = "{data}/archive"
upload_interval = "{upload_interval}"
{output_extra}
"""
    return f"""
[agent]
data_dir = "{data}"
flush_interval = "100ms"
checkpoint_interval = "100ms"
shutdown_timeout = "10s"
{agent_extra}

[cloud]
metadata = "off"

[server]
{server}

[[inputs]]
type = "file"
tag = "app"
paths = ["{logs}/{pattern}"]
{options}
{input_extra}

{output}"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "logs").mkdir()
    (tmp_path / "data").mkdir()
    return tmp_path


@pytest.fixture
def run_agent(workdir: Path):
    """Start agents for a test; each is killed at teardown if the test left it running."""
    started: list[Agent] = []

    def start(config: str | None = None, **kwargs) -> Agent:
        agent = Agent(workdir, config or agent_config(workdir / "logs", workdir / "data"), **kwargs)
        started.append(agent)
        return agent.start()

    yield start
    for agent in started:
        agent.ensure_stopped()


def seq_lines(start: int, count: int, pad: str = "x" * 40) -> str:
    return "".join(f"seq={i:07d} {pad}\n" for i in range(start, start + count))


def seqs(records: list[dict]) -> list[int]:
    return [int(r["message"][4:11]) for r in records if r["message"].startswith("seq=")]


def one_filter_config(filter_type: str, extra: str = "", environ: dict | None = None):
    """A loaded config of one file input, a stdout output and one [[filters]] entry of ``filter_type``
    (with ``extra`` keys): what the filters' unit tests build their filter from."""
    from shipper.config import load_text

    return load_text(f"""
[cloud]
metadata = "off"
[[inputs]]
type = "file"
paths = ["/tmp/x/*.log"]
[[outputs]]
type = "stdout"
[[filters]]
type = "{filter_type}"
{extra}
""", "test", environ or {})
