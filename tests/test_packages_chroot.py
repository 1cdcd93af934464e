"""The .deb installed in real target systems: Debian 12 (Python 3.11) and Debian 13 (Python 3.13) on amd64,
and Debian 12 on arm64 under qemu, each made with debootstrap from the Debian registry. In each: apt
installs the package with its dependencies, `shipper version` and `shipper check` of the packaged config
run, the agent runs on its embedded default and a line written to a log file is found in its archive;
on amd64 a dpkg trigger for the interpreter rebuilds the venv, then the package is purged and
nothing of it is left but its user.

Needs root, debootstrap, and for arm64 qemu-user-static with binfmt_misc (tests/system-packages.sh).
The debootstrapped systems are kept (pristine) in SHIPPER_CHROOT_CACHE (default
/var/cache/shipper-tests/chroots) and copied for each test: a second run does not download them again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import system_tool

CACHE = Path(os.environ.get("SHIPPER_CHROOT_CACHE", "/var/cache/shipper-tests/chroots"))
MIRROR = "http://deb.debian.org/debian"
BINFMT = Path("/proc/sys/fs/binfmt_misc")


@dataclass(frozen=True)
class System:
    suite: str
    arch: str
    python: str       # the interpreter apt must pull in for the package's Depends
    target: str       # the package installed
    purge: bool       # also purged and checked clean (amd64: arm64 under emulation is kept short)

    @property
    def name(self) -> str:
        return f"{self.suite}-{self.arch}"


SYSTEMS = [System("bookworm", "amd64", "python3.11", "deb-amd64", True),
           System("trixie", "amd64", "python3.13", "deb-amd64", True),
           System("bookworm", "arm64", "python3.11", "deb-arm64", False)]


def skip_unless_possible(system: System) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: chroot, mount and debootstrap (CI runs as root)")
    if not system_tool("debootstrap"):
        pytest.skip("needs debootstrap, from the Debian package debootstrap (tests/system-packages.sh)")
    if system.arch == "arm64":
        if not system_tool("/usr/bin/qemu-aarch64-static"):
            pytest.skip("needs qemu-aarch64-static, from the Debian package qemu-user-static (tests/system-packages.sh)")
        enable_qemu_aarch64()


def enable_qemu_aarch64() -> None:
    """binfmt_misc mounted and qemu's aarch64 format enabled (update-binfmts, from binfmt-support), so
    that arm64 programs in the chroot run."""
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True)
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists() or "enabled" not in entry.read_text():
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    if not entry.exists() or "enabled" not in entry.read_text():
        pytest.fail("cannot register qemu-aarch64 with binfmt_misc: arm64 programs cannot run here")


def base_system(system: System) -> Path:
    """The pristine debootstrapped system, made once (minbase: what apt needs, no Python)."""
    base = CACHE / system.name
    done = CACHE / f"{system.name}.complete"
    if not done.exists():
        shutil.rmtree(base, ignore_errors=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["debootstrap", "--variant=minbase", f"--arch={system.arch}", system.suite,
                                 str(base), MIRROR], capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        done.touch()
    return base


class Chroot:
    """A copy of a base system with /proc mounted; commands run in it as root with a plain environment."""

    def __init__(self, base: Path, root: Path):
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True)
        self.root = root
        subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)

    def run(self, script: str, timeout: float = 900) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root",
               "DEBIAN_FRONTEND": "noninteractive"}
        return subprocess.run(["chroot", str(self.root), "sh", "-ec", script], capture_output=True, text=True,
                              env=env, timeout=timeout)

    def ok(self, script: str, timeout: float = 900) -> str:
        result = self.run(script, timeout)
        assert result.returncode == 0, f"{script}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        return result.stdout

    def close(self) -> None:
        # Whatever still runs in it (an agent left by a test that failed or timed out) would hold the
        # status port 127.0.0.1:2020 for the tests after it: killed first.
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.readlink(f"/proc/{pid}/root") == str(self.root):
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
        subprocess.run(["umount", "-l", str(self.root / "proc")], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def chroot(request, tmp_path):
    system = request.param
    skip_unless_possible(system)
    box = Chroot(base_system(system), tmp_path / system.name)
    try:
        yield system, box
    finally:
        box.close()


# The agent on its embedded default for a few seconds, in a working directory with a log file: the
# line must be in its directory archive after the SIGTERM drain.
RUN_DEFAULT = """
mkdir -p /tmp/w/logs && cd /tmp/w
echo 'hello from the image build check' > logs/app.log
shipper run --default > run.log 2>&1 &
pid=$!
tries=0
until [ -n "$(find shipper-data/archive -name '*.ndjson.gz' 2>/dev/null)" ] || [ $tries -ge 600 ]; do
    sleep 0.1; tries=$((tries + 1))
done
kill -TERM $pid
wait $pid || { echo "agent exit $?"; cat run.log; exit 1; }
zcat $(find shipper-data/archive -name '*.ndjson.gz')
"""


@pytest.mark.timeout(1800)  # a first run debootstraps (arm64 under emulation: minutes)
@pytest.mark.parametrize("chroot", SYSTEMS, ids=[s.name for s in SYSTEMS], indirect=True)
def test_the_deb_installs_runs_and_purges_on_a_real_debian(chroot, packages):
    system, box = chroot
    deb = packages[system.target]
    shutil.copy(deb, box.root / "tmp" / deb.name)
    assert box.run(f"command -v {system.python}").returncode != 0  # apt must bring it for the Depends
    box.ok(f"apt-get update -qq && apt-get install -y -qq --no-install-recommends /tmp/{deb.name}")
    assert box.ok("cat /opt/shipper/.interpreter").strip() == f"/usr/bin/{system.python}"
    assert box.ok("shipper version").startswith("shipper ")
    check = box.ok("SHIPPER_BUCKET=image-build-check shipper check --config /etc/shipper/shipper.toml")
    assert "s3://image-build-check/" in check and "configuration OK" in check
    assert box.ok("getent passwd shipper").startswith("shipper:")
    assert box.ok("readlink -f /etc/systemd/system/multi-user.target.wants/shipper.service").strip() \
        == "/usr/lib/systemd/system/shipper.service"  # enabled, not started
    archived = box.ok(RUN_DEFAULT, timeout=300)
    assert '"message":"hello from the image build check"' in archived, archived
    if not system.purge:
        return
    # An admin's disabling (what `systemctl disable` does: the link removed; no systemd in the chroot)
    # outlives an upgrade (postinst's configure with the old version as $2).
    box.ok("rm /etc/systemd/system/multi-user.target.wants/shipper.service && "
           f"apt-get install -y -qq --reinstall /tmp/{deb.name}")
    assert box.run("test -e /etc/systemd/system/multi-user.target.wants/shipper.service").returncode != 0
    # An interpreter change as dpkg tells it (a file under /usr/lib/python3.X installed or removed):
    # the package's trigger rebuilds a venv whose interpreter is no longer the one to use.
    box.ok("echo /usr/bin/python3.99 > /opt/shipper/.interpreter")
    minor = system.python.removeprefix("python")
    box.ok(f"dpkg-trigger --no-await /usr/lib/python{minor} && dpkg --triggers-only --pending")
    assert box.ok("cat /opt/shipper/.interpreter").strip() == f"/usr/bin/{system.python}"
    assert box.ok("shipper version").startswith("shipper ")
    box.ok(f"apt-get purge -y -qq shipper && rm /tmp/{deb.name}")
    # Nothing of it is left: every path it made has "shipper" in its name (the test's own /tmp/w aside).
    left = box.ok("find / -xdev -path /tmp/w -prune -o -path /proc -prune -o -name '*shipper*' -print")
    assert left == ""
    assert box.ok("ls -A /opt") == ""
    assert box.ok("getent passwd shipper").startswith("shipper:")  # the user stays (its files may remain elsewhere)


RPM_HOST = System("bookworm", "amd64", "python3.11", "rpm-x86_64", True)


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("chroot", [RPM_HOST], ids=["rpm-in-bookworm-amd64"], indirect=True)
def test_the_rpms_scriptlets_install_and_remove_it_under_rpm_itself(chroot, packages):
    """No RPM distribution can be made from the registries here, so the .rpm goes into a Debian 12
    system with rpm itself (`rpm --root`, which runs the scriptlets in it): %pre makes the user, %post
    builds the venv and enables the service, and erasing it leaves nothing but the user. Its Requires
    are not checked here (--nodeps: Debian's packages are not in rpm's database); test_packages.py
    reads them."""
    system, box = chroot
    if not system_tool("rpm"):
        pytest.skip("needs rpm, from the Debian package rpm (tests/system-packages.sh)")
    box.ok("apt-get update -qq && apt-get install -y -qq --no-install-recommends python3.11")
    rpm = packages[system.target]

    def rpm_command(*args: str) -> None:
        result = subprocess.run(["rpm", "--root", str(box.root), *args], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr

    rpm_command("--initdb")
    rpm_command("-i", "--nodeps", str(rpm))
    assert box.ok("cat /opt/shipper/.interpreter").strip() == "/usr/bin/python3.11"
    assert box.ok("shipper version").startswith("shipper ")
    assert box.ok("id -nG shipper").split()[:2] == ["shipper", "adm"]
    assert box.ok("readlink /etc/systemd/system/multi-user.target.wants/shipper.service").strip() \
        == "/usr/lib/systemd/system/shipper.service"
    archived = box.ok(RUN_DEFAULT, timeout=300)
    assert '"message":"hello from the image build check"' in archived, archived
    rpm_command("-e", "shipper")
    left = box.ok("find / -xdev -path /tmp/w -prune -o -path /proc -prune -o -name '*shipper*' -print")
    assert left == "" and box.ok("ls -A /opt") == ""
    assert box.ok("getent passwd shipper").startswith("shipper:")

