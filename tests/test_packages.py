"""The four packages (packaging/build-packages.sh), read without installing them: the same files in the
.deb and the .rpm of an architecture, wheels for CPython 3.11-3.13 whose native libraries are all for
that architecture, the control data and scriptlets, rpmlint; and packaging/setup-venv building the
agent's venv from the carried wheels offline, only when needed, keeping the old one when it fails.
Installed in real Debian systems: tests/test_packages_chroot.py."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import os
import platform
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT
from packages import TARGETS, deb_members, deb_tar, extract_deb, rpm_files, rpm_query, rpm_tar

spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "packaging" / "wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheelhouse)

pytestmark = pytest.mark.timeout(900)  # the first test to ask for the packages waits for their build

EM = {"x86_64": 62, "aarch64": 183}
NATIVE = ("orjson", "msgpack", "isal", "backports_zstd", "hyperscan", "psutil")
PYTHONS = ("cp311", "cp312", "cp313")
MAX_PACKAGE_BYTES = 25 * 1024 * 1024
INSTALLED = {"/usr/bin/shipper", "/usr/lib/shipper/setup-venv", "/usr/lib/systemd/system/shipper.service",
             "/etc/shipper/shipper.toml", "/usr/share/doc/shipper/README.md"}


def payload(target: str, packages) -> dict[str, bytes]:
    """Every regular file of a package, by path, with its bytes."""
    opener = deb_tar if target.startswith("deb") else rpm_tar
    with opener(packages[target]) as archive:
        return {m.name.removeprefix("."): archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


def wheels_of(files: dict[str, bytes]) -> dict[str, bytes]:
    return {os.path.basename(p): data for p, data in files.items() if p.startswith("/usr/lib/shipper/wheels/")}


def machine_of(head: bytes) -> int | None:
    """e_machine of an ELF header (written here again, not taken from wheelhouse.py, which it checks)."""
    if head[:4] != b"\x7fELF":
        return None
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


# ------------------------------------------------------------------ pure parts of the build


def test_elf_machine_reads_the_header_and_refuses_what_is_not_elf():
    header = bytearray(b"\x7fELF\x02\x01\x01" + bytes(13))
    header[18:20] = (183).to_bytes(2, "little")
    assert wheelhouse.elf_machine(bytes(header)) == 183
    header[5] = 2  # big-endian
    header[18:20] = (62).to_bytes(2, "big")
    assert wheelhouse.elf_machine(bytes(header)) == 62
    assert wheelhouse.elf_machine(b"#!/bin/sh\n" + bytes(10)) is None
    assert wheelhouse.elf_machine(b"\x7fELF") is None  # too short


def fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr("botocore-1.0.dist-info/RECORD", "stale,sha256=x,1\n")
    return path


def test_foreign_extensions_names_a_library_of_another_architecture(tmp_path):
    arm = b"\x7fELF\x02\x01\x01" + bytes(11) + (183).to_bytes(2, "little")
    intel = b"\x7fELF\x02\x01\x01" + bytes(11) + (62).to_bytes(2, "little")
    wheel = fake_wheel(tmp_path / "x.whl", {"pkg/_a.cpython-311-x86_64-linux-gnu.so": intel, "pkg/libz.so.1": arm,
                                            "pkg/solo.py": b"x = 1", "pkg/data.sources": b"not a library"})
    assert wheelhouse.foreign_extensions(str(wheel), "x86_64") == ["pkg/libz.so.1: e_machine 183"]
    assert wheelhouse.foreign_extensions(str(wheel), "aarch64") == ["pkg/_a.cpython-311-x86_64-linux-gnu.so: "
                                                                    "e_machine 62"]


def test_trimmed_botocore_keeps_the_agents_services_and_a_true_record(tmp_path):
    source = fake_wheel(tmp_path / "botocore.whl", {
        "botocore/__init__.py": b"", "botocore/data/endpoints.json": b"{}",
        "botocore/data/s3/2006-03-01/service-2.json.gz": b"s3", "botocore/data/ec2/2016-11-15/service-2.json.gz": b"ec2",
        "botocore/data/logs/2014-03-28/service-2.json.gz": b"logs", "botocore/data/sso-oidc/x/service-2.json.gz": b"o"})
    kept, left = wheelhouse.trimmed_botocore(str(source), str(tmp_path / "out.whl"))
    assert (kept, left) == (5, 1)
    with zipfile.ZipFile(tmp_path / "out.whl") as archive:
        names = set(archive.namelist())
        assert "botocore/data/ec2/2016-11-15/service-2.json.gz" not in names
        assert {"botocore/data/endpoints.json", "botocore/data/s3/2006-03-01/service-2.json.gz",
                "botocore/data/sso-oidc/x/service-2.json.gz"} <= names
        rows = list(csv.reader(io.StringIO(archive.read("botocore-1.0.dist-info/RECORD").decode())))
        assert {row[0] for row in rows} == names
        for name, digest, size in rows:
            if name.endswith("RECORD"):
                assert digest == size == ""
                continue
            data = archive.read(name)
            assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert int(size) == len(data)


# ------------------------------------------------------------------ the built packages


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_the_deb_and_the_rpm_of_an_architecture_install_the_same_files(packages, arch):
    deb, rpm = [t for t, a in TARGETS.items() if a == arch]
    deb_listing = deb_members(packages[deb])
    rpm_listing = rpm_files(packages[rpm])
    assert set(deb_listing) == set(rpm_listing)
    assert INSTALLED <= set(deb_listing)
    assert not [p for p in deb_listing if p.startswith("/opt/")]  # the venv is built on the target
    assert deb_listing["/usr/bin/shipper"].linkname == "/opt/shipper/bin/shipper"
    assert rpm_listing["/usr/bin/shipper"].startswith("l")
    assert all(m.uname == "root" and m.gname == "root" for m in deb_listing.values())
    assert deb_listing["/usr/lib/shipper/setup-venv"].mode & 0o111
    assert rpm_listing["/usr/lib/shipper/setup-venv"] == "-rwxr-xr-x"
    assert payload(deb, packages)["/usr/lib/systemd/system/shipper.service"] == \
        (ROOT / "packaging/systemd/shipper.service").read_bytes()
    for target in (deb, rpm):
        assert packages[target].stat().st_size < MAX_PACKAGE_BYTES, target


@pytest.mark.parametrize("target", list(TARGETS))
def test_the_wheels_cover_python_3_11_to_3_13_and_every_library_is_for_the_packages_architecture(packages, target):
    arch = TARGETS[target]
    wheels = wheels_of(payload(target, packages))
    for dist in NATIVE:
        tags = {name.split("-")[2] for name in wheels if name.startswith(dist + "-")}
        assert tags == {"cp36"} or tags == set(PYTHONS), (dist, tags)  # psutil: one abi3 wheel for all
    libraries = 0
    for name, data in wheels.items():
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for member in archive.namelist():
                if ".so" in os.path.basename(member):
                    libraries += 1
                    with archive.open(member) as handle:
                        assert machine_of(handle.read(20)) == EM[arch], f"{name}: {member}"
        platform_tag = name[:-4].split("-")[-1]
        assert platform_tag == "any" or arch in platform_tag, name
    assert libraries >= len(NATIVE) * len(PYTHONS) - 2
    assert [n for n in wheels if n.startswith("pip-")]  # what setup-venv installs with
    assert [n for n in wheels if n.startswith("shipper-")]
    botocore = next(data for n, data in wheels.items() if n.startswith("botocore-"))
    with zipfile.ZipFile(io.BytesIO(botocore)) as archive:
        services = {n.split("/")[2] for n in archive.namelist() if n.startswith("botocore/data/") and n.count("/") > 3}
    assert services == set(wheelhouse.BOTOCORE_SERVICES)


@pytest.mark.parametrize("target", ["deb-amd64", "deb-arm64"])
def test_the_deb_depends_on_any_supported_python_and_rebuilds_when_one_changes(packages, target, tmp_path):
    deb = packages[target]
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    fields = (control / "control").read_text()
    assert "#" not in fields
    assert re.search(r"^Depends: python3\.13 \| python3\.12 \| python3\.11, adduser$", fields, re.M), fields
    assert re.search(rf"^Architecture: {target.split('-')[1]}$", fields, re.M)
    assert (control / "conffiles").read_text().split() == ["/etc/shipper/shipper.toml"]
    assert (control / "triggers").read_text().split() == [
        "interest-noawait", "/usr/lib/python3.11", "interest-noawait", "/usr/lib/python3.12",
        "interest-noawait", "/usr/lib/python3.13"]
    for script in ("postinst", "prerm", "postrm"):
        assert os.access(control / script, os.X_OK), script
    postinst = (control / "postinst").read_text()
    assert "/usr/lib/shipper/setup-venv\n" in postinst  # configure
    assert "setup-venv --if-needed --restart" in postinst  # triggered: rebuilt, a running agent restarted


@pytest.mark.parametrize("target", ["rpm-x86_64", "rpm-aarch64"])
def test_the_rpm_requires_python_3_11_or_newer_creates_its_user_and_enables_the_service(packages, target):
    rpm = packages[target]
    arch = TARGETS[target]
    assert rpm_query(rpm, "--qf", "%{NAME} %{ARCH}") == f"shipper {arch}"
    requires = rpm_query(rpm, "--requires").splitlines()
    assert "(python3.13 or python3.12 or python3.11)" in requires
    assert {"shadow-utils", "systemd"} <= set(requires)
    assert not [r for r in requires if r.startswith(("python(abi)", "libc.so", "/usr/bin/python"))]
    provides = rpm_query(rpm, "--provides").splitlines()
    assert any(p.startswith("shipper = ") for p in provides)
    pre, post, preun, postun = (rpm_query(rpm, "--qf", f"%{{{tag}}}")
                                for tag in ("PREIN", "POSTIN", "PREUN", "POSTUN"))
    assert "useradd --system" in pre and "groupadd --system shipper" in pre
    assert "/usr/lib/shipper/setup-venv" in post and "systemctl enable shipper.service" in post
    assert not re.search(r"--now|systemctl (re)?start", post)  # enabled, not started
    assert "disable --now shipper.service" in preun
    assert re.search(r'if \[ "\$1" -eq 0 \]; then\s+rm -rf /opt/shipper', postun)  # on removal, not upgrade
    triggers = rpm_query(rpm, "--filetriggers")
    for prefix in ("/usr/lib64/python3.", "/usr/lib/python3."):
        for minor in ("11", "12", "13"):
            assert f"{prefix}{minor}" in triggers, prefix + minor
    assert "setup-venv --if-needed --restart" in triggers  # rebuilt, and a running agent restarted onto it
    flags = dict(line.split(" ", 1) for line in
                 rpm_query(rpm, "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]").splitlines())
    assert flags["/etc/shipper/shipper.toml"] == "cn"  # %config(noreplace)


# rpmlint's errors that are true of this package by design, each with the reason.
RPMLINT_ACCEPTED = {
    "no-signature": "packages are signed by the release pipeline's key, not by this build",
    "no-binary": "the native code is inside the wheels (zip files): the package is per architecture all the same",
}


@pytest.mark.parametrize("target", ["rpm-x86_64", "rpm-aarch64"])
def test_rpmlint_finds_no_error_but_those_accepted(packages, target):
    if shutil.which("rpmlint") is None:
        pytest.skip("needs rpmlint, from the Debian package rpmlint (tests/system-packages.sh)")
    result = subprocess.run(["rpmlint", str(packages[target])], capture_output=True, text=True, timeout=300)
    errors = {m.group(1) for m in re.finditer(r": E: (\S+)", result.stdout)}
    assert errors - set(RPMLINT_ACCEPTED) == set(), result.stdout


# ------------------------------------------------------------------ setup-venv, on this machine


def host_target() -> str:
    return {"x86_64": "deb-amd64", "aarch64": "deb-arm64"}.get(platform.machine(), "deb-amd64")


def host_python() -> str | None:
    for minor in ("3.13", "3.12", "3.11"):
        if os.access(f"/usr/bin/python{minor}", os.X_OK):
            return f"/usr/bin/python{minor}"
    return None


def setup_venv(root: Path, *args: str, wheels: Path | None = None, umask: int = 0o022) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "SHIPPER_VENV": str(root / "opt/shipper"),
           "SHIPPER_WHEELS": str(wheels or root / "usr/lib/shipper/wheels"),
           # What the caller's environment may say, which the package must not follow:
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_FIND_LINKS": "/nonexistent", "PYTHONPATH": "/nonexistent",
           "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(["sh", str(root / "usr/lib/shipper/setup-venv"), *args], capture_output=True, text=True,
                          env=env, timeout=300, preexec_fn=lambda: os.umask(umask))


@pytest.fixture(scope="module")
def extracted(packages, tmp_path_factory) -> Path:
    if host_python() is None:
        pytest.skip("needs /usr/bin/python3.11 (or 3.12, 3.13): the interpreter setup-venv builds the venv with")
    return extract_deb(packages[host_target()], tmp_path_factory.mktemp("root"))


def test_setup_venv_builds_the_agent_offline_with_nothing_but_its_run_time(extracted):
    # The unit's UMask=0027 applies to its ExecStartPre=+ too: the venv must still be the agent's to read.
    result = setup_venv(extracted, umask=0o027)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("shipper: built ")
    venv = extracted / "opt/shipper"
    for path in [venv, *venv.rglob("*")]:
        if not path.is_symlink():
            assert path.stat().st_mode & (0o005 if path.is_dir() else 0o004), path
    assert (venv / ".interpreter").read_text().strip() == host_python()
    assert sorted(p.name for p in (venv / "bin").iterdir()) == sorted(
        ["python", "python3", os.path.basename(host_python()), "shipper"])
    assert (venv / "bin/shipper").read_text().splitlines()[0] == f"#!{venv}/bin/python"
    site = next((venv / "lib").glob("python3*/site-packages"))
    shipped = {p.name for p in site.iterdir()}
    assert not shipped & {"pip", "setuptools", "pkg_resources", "_distutils_hack"}
    assert list(site.rglob("*.pyc"))  # compiled on the target despite PYTHONDONTWRITEBYTECODE
    env = {"PATH": os.environ["PATH"], "SHIPPER_BUCKET": "image-build-check", "LC_ALL": "C.UTF-8"}
    version = subprocess.run([str(venv / "bin/shipper"), "version"], capture_output=True, text=True, env=env)
    assert version.stdout.startswith("shipper "), version.stderr
    check = subprocess.run([str(venv / "bin/shipper"), "check", "--strict", "--config",
                            str(extracted / "etc/shipper/shipper.toml")], capture_output=True, text=True, env=env)
    assert check.returncode == 0 and "s3://image-build-check/" in check.stdout, check.stderr
    probe = ("import importlib.util, boto3, hyperscan, orjson, isal, msgpack, psutil, backports.zstd, shipper.service\n"
             "for service in ('s3', 'logs', 'cloudwatch', 'sts'): boto3.client(service, region_name='eu-west-1')\n"
             "print([n for n in ('pip', 'setuptools', 'duckdb') if importlib.util.find_spec(n)])")
    imports = subprocess.run([str(venv / "bin/python"), "-c", probe], capture_output=True, text=True, env=env)
    assert imports.returncode == 0 and imports.stdout.strip() == "[]", imports.stderr


def test_setup_venv_refuses_an_unknown_argument(extracted):
    result = setup_venv(extracted, "--if-neded")
    assert result.returncode == 2 and "unknown argument --if-neded" in result.stderr


def test_setup_venv_if_needed_rebuilds_only_for_another_interpreter(extracted):
    venv = extracted / "opt/shipper"
    if not (venv / ".interpreter").exists():
        assert setup_venv(extracted).returncode == 0
    before = (venv / "pyvenv.cfg").stat().st_ino
    nothing = setup_venv(extracted, "--if-needed")
    assert nothing.returncode == 0 and nothing.stdout == ""  # nothing done, nothing said (no restart)
    assert (venv / "pyvenv.cfg").stat().st_ino == before
    (venv / ".interpreter").write_text("/usr/bin/python3.99\n")  # built with an interpreter since removed
    assert setup_venv(extracted, "--if-needed").returncode == 0
    assert (venv / "pyvenv.cfg").stat().st_ino != before
    assert (venv / ".interpreter").read_text().strip() == host_python()
    assert not (extracted / "opt/shipper.old").exists()


@pytest.mark.parametrize("broken", ["no pip wheel", "a dependency missing"])
def test_a_failed_rebuild_keeps_the_working_venv(extracted, tmp_path, broken):
    venv = extracted / "opt/shipper"
    if not (venv / ".interpreter").exists():
        assert setup_venv(extracted).returncode == 0
    wheels = tmp_path / "wheels"
    shutil.copytree(extracted / "usr/lib/shipper/wheels", wheels)
    for wheel in wheels.iterdir():
        if wheel.name.startswith("pip-" if broken == "no pip wheel" else "orjson-"):
            wheel.unlink()
    result = setup_venv(extracted, wheels=wheels)
    assert result.returncode == 1
    assert ("no pip wheel" in result.stderr) if broken == "no pip wheel" else ("previous one" in result.stderr)
    version = subprocess.run([str(venv / "bin/shipper"), "version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("shipper ")
    assert not (extracted / "opt/shipper.old").exists()


def test_a_build_killed_half_way_is_undone_at_the_next_run(extracted):
    """A power cut or a start timeout in the middle of a rebuild leaves a venv without its stamp beside
    the old one (with its stamp): the next run puts the old one back, instead of deleting it."""
    venv, old = extracted / "opt/shipper", extracted / "opt/shipper.old"
    if not (venv / ".interpreter").exists():
        assert setup_venv(extracted).returncode == 0
    venv.rename(old)
    (venv / "bin").mkdir(parents=True)  # what a killed `python -m venv` left
    kept = (old / "pyvenv.cfg").stat().st_ino
    result = setup_venv(extracted, "--if-needed")
    assert result.returncode == 0 and result.stdout == "", result.stderr
    assert (venv / "pyvenv.cfg").stat().st_ino == kept and not old.exists()
    assert subprocess.run([str(venv / "bin/shipper"), "version"], capture_output=True).returncode == 0

