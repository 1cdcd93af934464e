"""The packages packaging/build-packages.sh builds (.deb for amd64 and arm64, .rpm for x86_64 and
aarch64), built once per test session, and what is inside them."""

from __future__ import annotations

import os
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"deb-amd64": "x86_64", "deb-arm64": "aarch64", "rpm-x86_64": "x86_64", "rpm-aarch64": "aarch64"}


def missing_tools() -> list[str]:
    import shutil

    tools = (("dpkg-deb", "dpkg"), ("rpmbuild", "rpm"), ("rpm2archive", "rpm2cpio"))
    return [f"{tool} (Debian package {package})" for tool, package in tools if shutil.which(tool) is None]


@pytest.fixture(scope="session")
def packages(tmp_path_factory) -> dict[str, Path]:
    """Every package, by target (deb-amd64, ...)."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: `make test` installs them (tests/system-packages.sh)")
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PYTHON": str(ROOT / ".venv" / "bin" / "python")} if (ROOT / ".venv/bin/python").exists() \
        else dict(os.environ)
    result = subprocess.run(["bash", str(ROOT / "packaging" / "build-packages.sh"), str(out), *TARGETS],
                            capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    built = [Path(line) for line in result.stdout.split()]
    assert len(built) == len(TARGETS), result.stdout
    return dict(zip(TARGETS, built))


def deb_members(deb: Path) -> dict[str, tarfile.TarInfo]:
    """The data archive's members of a .deb, by path (/usr/bin/shipper), directories left out."""
    with deb_tar(deb) as archive:
        return {m.name.removeprefix("."): m for m in archive.getmembers() if not m.isdir()}


def deb_tar(deb: Path) -> tarfile.TarFile:
    """The .deb's data archive."""
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    return tarfile.open(fileobj=io.BytesIO(data))


def rpm_query(rpm: Path, *args: str) -> str:
    return subprocess.run(["rpm", "-qp", *args, str(rpm)], capture_output=True, text=True, check=True).stdout


def rpm_files(rpm: Path) -> dict[str, str]:
    """The files and links of an .rpm (directories left out), by path, with their mode string."""
    listing = rpm_query(rpm, "--qf", "[%{FILEMODES:perms} %{FILENAMES}\n]")
    files = {}
    for line in listing.splitlines():
        perms, path = line.split(" ", 1)
        if not perms.startswith("d"):
            files[path] = perms
    return files


def rpm_tar(rpm: Path) -> tarfile.TarFile:
    """The .rpm's payload as a tar archive (rpm2archive)."""
    with open(rpm, "rb") as handle:
        data = subprocess.run(["rpm2archive", "-"], stdin=handle, capture_output=True, check=True).stdout
    return tarfile.open(fileobj=io.BytesIO(data))


def extract_deb(deb: Path, into: Path) -> Path:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    return into
