"""packaging/: the systemd unit passes systemd-analyze verify, the .deb builds with the standard tools and
holds a working, relocated virtual environment (tied to the build's minor version of Python, nothing but
the agent's run time), the unit and the default config as a conffile."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, needs_system, system_tool
from shipper.config import load_text, parse_duration

UNIT = ROOT / "packaging" / "systemd" / "shipper.service"
DEFAULT_CONFIG = ROOT / "packaging" / "shipper.toml"
PACKER = ROOT / "packaging" / "packer" / "shipper.pkr.hcl"
# What a venv brings that the agent never uses at run time: the installers and the venv's own scripts.
NOT_SHIPPED = ("setuptools", "pkg_resources", "_distutils_hack", "distutils-precedence.pth", "pip")


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


@needs_system("systemd-analyze", "systemd")
def test_the_unit_passes_systemd_analyze_verify_without_a_warning(tmp_path):
    # verify checks that ExecStart exists: point it at this checkout's agent, keep every other line.
    agent = Path(sys.executable).parent / "shipper"
    unit = tmp_path / "shipper.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/shipper", str(agent)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_the_unit_is_a_notify_service_stopped_after_the_drain_and_confined():
    settings = unit_settings(UNIT.read_text())
    expected = {"Type": ["notify"], "Restart": ["always"], "User": ["shipper"], "ProtectSystem": ["strict"],
                "NoNewPrivileges": ["yes"], "CapabilityBoundingSet": [""], "StateDirectory": ["shipper"],
                "ConfigurationDirectory": ["shipper"], "After": ["network-online.target"],
                "Wants": ["network-online.target"]}
    for key, value in expected.items():
        assert settings.get(key) == value, key
    assert "adm" in settings["SupplementaryGroups"][0].split()
    config = load_text(DEFAULT_CONFIG.read_text(), "shipper.toml", {"SHIPPER_BUCKET": "fleet-logs"})
    stop_timeout = parse_duration(settings["TimeoutStopSec"][0])
    assert stop_timeout > config.agent.shutdown_timeout + 10  # systemd never cuts the drain short
    assert parse_duration(settings["WatchdogSec"][0]) >= 60  # longer than any single call may block
    assert int(settings["LimitNOFILE"][0]) >= 65536  # thousands of followed files (inputs/file.py max_open_files)
    for key in ("MemoryMax", "CPUQuota", "Nice", "RestrictAddressFamilies", "ProtectHome", "PrivateTmp"):
        assert settings.get(key), key
    # The packaged config's journald input: journalctl, its child, reads the journal as a member of
    # systemd-journal and needs AF_UNIX for its user and group look-ups (NSS).
    assert "journald" in {i.type for i in config.inputs}
    assert "systemd-journal" in settings["SupplementaryGroups"][0].split()
    assert "AF_UNIX" in settings["RestrictAddressFamilies"][0].split()


def test_the_packaged_config_is_valid_and_needs_only_the_bucket():
    config = load_text(DEFAULT_CONFIG.read_text(), "shipper.toml", {"SHIPPER_BUCKET": "fleet-logs"})
    assert [o.type for o in config.outputs] == ["s3"] and config.outputs[0].bucket == "fleet-logs"
    assert config.outputs[0].match == ["*"]  # every input's records reach it: `check --strict` passes
    assert [(i.type, i.tag) for i in config.inputs] == [("file", "app"), ("journald", "journal"),
                                                        ("metrics", "metrics")]
    # The system log from the journal (a default Debian 12 has no /var/log/syslog), from this boot's start
    # on an instance's first boot; /var/log/syslog is not tailed as well (rsyslog copies the journal).
    journal = config.inputs[1]
    assert journal.start_at == "boot" and journal.units == [] and journal.directory == ""
    assert not [i for i in config.inputs if i.type == "file" and any("syslog" in p for p in i.paths)]
    assert config.server.listen == "127.0.0.1:2020" and config.agent.data_dir == "/var/lib/shipper"


def test_the_packer_example_fails_the_image_build_on_warnings_too():
    checks = [line for line in PACKER.read_text().splitlines() if "shipper check" in line and '"' in line]
    assert len(checks) == 1 and "--strict" in checks[0].split() and "SHIPPER_BUCKET=" in checks[0]
    assert "shipper check --strict" in DEFAULT_CONFIG.read_text()  # its header tells the same


def build_python_version() -> str:
    """The minor version build-deb.sh builds the venv with: that of $PYTHON (default /usr/bin/python3)."""
    python = os.environ.get("PYTHON", "/usr/bin/python3")
    return subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    if not system_tool("dpkg-deb"):
        pytest.skip("needs dpkg-deb, from the Debian package dpkg (tests/system-packages.sh)")
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(["bash", str(ROOT / "packaging" / "build-deb.sh"), str(out)], capture_output=True,
                            text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])


def test_the_deb_has_the_control_fields_the_venv_the_unit_and_the_config_as_a_conffile(deb, tmp_path):
    info = subprocess.run(["dpkg-deb", "--info", str(deb)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^ Package: shipper$", info, re.M)
    # The exact minor version the venv was built for (cp3X extensions, lib/python3.X), not "python3 (>= 3.11)".
    minor = build_python_version()
    assert re.search(rf"^ Depends: python{re.escape(minor)}, adduser$", info, re.M), info
    assert re.search(r"^ Architecture: \S+$", info, re.M)
    listing = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True).stdout
    for path in ("./opt/shipper/bin/shipper", "./opt/shipper/bin/python", "./lib/systemd/system/shipper.service",
                 "./etc/shipper/shipper.toml", "./usr/share/doc/shipper/README.md"):
        assert f" {path}" in listing, path
    assert "./usr/bin/shipper -> /opt/shipper/bin/shipper" in listing
    assert all(line.split()[1] == "root/root" for line in listing.splitlines())
    conffiles = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True, check=True).stdout
    assert b"./conffiles" in conffiles or b"conffiles" in conffiles

    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    assert (control / "conffiles").read_text().split() == ["/etc/shipper/shipper.toml"]
    assert "#" not in (control / "control").read_text()  # the template's comments stay out of it
    assert os.access(control / "postinst", os.X_OK)
    script = (root / "opt/shipper/bin/shipper").read_text()
    assert script.splitlines()[0] == "#!/opt/shipper/bin/python3"  # relocated from the build directory
    # The interpreter is /usr/bin/python3.X itself, whatever /usr/bin/python3 points to.
    bin_dir = root / "opt/shipper/bin"
    assert os.readlink(bin_dir / f"python{minor}") == f"/usr/bin/python{minor}"
    assert os.readlink(bin_dir / "python3") == os.readlink(bin_dir / "python") == f"python{minor}"
    assert sorted(p.name for p in bin_dir.iterdir()) == sorted(["python", "python3", f"python{minor}", "shipper"])
    leaks = subprocess.run(["grep", "-rlI", "/tmp/", str(root / "opt/shipper/bin"),
                            str(root / "opt/shipper/pyvenv.cfg")], capture_output=True, text=True).stdout
    assert leaks == ""
    site = next((root / "opt/shipper/lib").glob("python3*/site-packages"))
    for package in ("shipper", "boto3", "psutil", "orjson", "watchdog", "prometheus_client", "msgpack"):
        assert (site / package).is_dir(), package
    assert site.parent.name == f"python{minor}"
    assert not list(root.rglob("__pycache__"))  # compiled on the target
    shipped = {p.name for p in site.iterdir()}
    assert [name for name in NOT_SHIPPED if name in shipped] == []
    assert [name for name in shipped if name.startswith(("setuptools-", "pip-"))] == []
    assert (site / "shipper" / "default.toml").is_file()
    assert (root / "lib/systemd/system/shipper.service").read_text() == UNIT.read_text()


def test_the_extracted_agent_runs_without_what_was_left_out(deb, tmp_path):
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    venv = root / "opt/shipper"
    # The script as its shebang (#!/opt/shipper/bin/python3) runs it, from the extracted copy; no PYTHONPATH:
    # only the venv's site-packages and the system's standard library are seen.
    env = {"PATH": os.environ["PATH"], "SHIPPER_BUCKET": "image-build-check", "LC_ALL": "C.UTF-8"}

    def agent(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin/python3"), str(venv / "bin/shipper"), *args], capture_output=True,
                              text=True, env=env, timeout=120, cwd=tmp_path)

    assert agent("version").stdout.startswith("shipper ")
    check = agent("check", "--strict", "--config", str(root / "etc/shipper/shipper.toml"))
    assert check.returncode == 0, check.stderr
    assert "journald tag=journal" in check.stdout and "s3://image-build-check/" in check.stdout
    probe = ("import importlib.util, watchdog.observers, boto3, psutil, orjson, isal, msgpack, prometheus_client, "
             "fluent.sender, shipper.service, shipper.inputs.journald, shipper.outputs.s3; "
             "boto3.client('s3', region_name='eu-west-1'); "
             "print(shipper.service.__file__); "
             "print([n for n in ('setuptools', 'pkg_resources', '_distutils_hack', 'pip', 'duckdb', 'sqlglot') "
             "if importlib.util.find_spec(n)])")
    imports = subprocess.run([str(venv / "bin/python3"), "-c", probe], capture_output=True, text=True, env=env,
                             timeout=120, cwd=tmp_path)
    assert imports.returncode == 0, imports.stderr
    where, missing = imports.stdout.splitlines()
    assert where.startswith(str(venv)) and missing == "[]"
