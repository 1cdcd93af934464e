"""packaging/: the systemd unit passes systemd-analyze verify, the .deb builds with the standard tools and
holds a working, relocated virtual environment, the unit and the default config as a conffile."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from shipper.config import load_text, parse_duration

UNIT = ROOT / "packaging" / "systemd" / "shipper.service"
DEFAULT_CONFIG = ROOT / "packaging" / "shipper.toml"


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed (.ci/run installs it)")
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
    for key in ("MemoryMax", "CPUQuota", "Nice", "RestrictAddressFamilies", "ProtectHome", "PrivateTmp"):
        assert settings.get(key), key


def test_the_packaged_config_is_valid_and_needs_only_the_bucket():
    config = load_text(DEFAULT_CONFIG.read_text(), "shipper.toml", {"SHIPPER_BUCKET": "fleet-logs"})
    assert [o.type for o in config.outputs] == ["s3"] and config.outputs[0].bucket == "fleet-logs"
    assert {i.type for i in config.inputs} == {"file", "metrics"}
    assert config.server.listen == "127.0.0.1:2020" and config.agent.data_dir == "/var/lib/shipper"


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    if not shutil.which("dpkg-deb"):
        pytest.skip("dpkg-deb is not installed (a Debian tool; CI runs on Debian)")
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(["bash", str(ROOT / "packaging" / "build-deb.sh"), str(out)], capture_output=True,
                            text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])


def test_the_deb_has_the_control_fields_the_venv_the_unit_and_the_config_as_a_conffile(deb, tmp_path):
    info = subprocess.run(["dpkg-deb", "--info", str(deb)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^ Package: shipper$", info, re.M) and re.search(r"^ Depends: python3 \(>= 3.11\)", info, re.M)
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
    assert os.access(control / "postinst", os.X_OK)
    script = (root / "opt/shipper/bin/shipper").read_text()
    assert script.splitlines()[0] == "#!/opt/shipper/bin/python3"  # relocated from the build directory
    leaks = subprocess.run(["grep", "-rlI", "/tmp/", str(root / "opt/shipper/bin"),
                            str(root / "opt/shipper/pyvenv.cfg")], capture_output=True, text=True).stdout
    assert leaks == ""
    site = next((root / "opt/shipper/lib").glob("python3*/site-packages"))
    for package in ("shipper", "boto3", "psutil", "orjson", "watchdog", "prometheus_client", "msgpack"):
        assert (site / package).is_dir(), package
    assert not list(site.glob("pip")) and not list(root.rglob("__pycache__"))  # compiled on the target
    assert (site / "shipper" / "default.toml").is_file()
    assert (root / "lib/systemd/system/shipper.service").read_text() == UNIT.read_text()
