"""packaging/: the systemd unit passes systemd-analyze verify; the packaged config and the Packer example.
The packages themselves: tests/test_packages.py (built and read here), tests/test_packages_chroot.py
(installed in real Debian systems)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, needs_system
from shipper.config import load_text, parse_duration

UNIT = ROOT / "packaging" / "systemd" / "shipper.service"
DEFAULT_CONFIG = ROOT / "packaging" / "shipper.toml"
PACKER = ROOT / "packaging" / "packer" / "shipper.pkr.hcl"


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
    unit.write_text(UNIT.read_text().replace("/usr/bin/shipper", str(agent))
                    .replace("/usr/lib/shipper/setup-venv", str(ROOT / "packaging" / "setup-venv")))
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
    # The venv is the package's to build (packaging/setup-venv): checked, as root, before each start.
    assert settings["ExecStartPre"] == ["+/usr/lib/shipper/setup-venv --if-needed"]
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


def test_the_packer_example_installs_on_both_families_and_fails_the_image_build_on_warnings_too():
    text = PACKER.read_text()
    checks = [line for line in text.splitlines() if "shipper check" in line and '"' in line]
    assert len(checks) == 2  # a build for Debian/Ubuntu (.deb), one for Amazon Linux 2023 (.rpm)
    assert all("--strict" in line.split() and "SHIPPER_BUCKET=" in line for line in checks)
    assert "apt-get install -y /tmp/shipper.deb" in text and "dnf install -y /tmp/shipper.rpm" in text
    assert "shipper check --strict" in DEFAULT_CONFIG.read_text()  # its header tells the same


