"""The wheelhouse a package carries: shipper's wheel and the binary wheels of every dependency for
each supported CPython (3.11-3.13) on one CPU architecture, from which the target's postinst/%post
builds /opt/shipper offline (packaging/setup-venv), plus pip's own wheel to install them with.

    python3 packaging/wheelhouse.py --arch x86_64|aarch64 --out DIR

- Wheels come from the package index with `pip download --only-binary=:all: --platform ...
  --python-version ...`: nothing is compiled, so one amd64 machine builds both architectures.
- botocore's wheel (17 MB, the models of ~450 services) is repacked with only the models the agent
  uses (S3, CloudWatch Logs and Metrics, and the credential providers' STS, SSO, SSO-OIDC), its
  RECORD rewritten: that is what keeps a package under ~25 MB.
- Every native extension's ELF header is checked against the architecture: a wrong wheel fails
  the build, not the instance.
Standard library only, besides pip.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHONS = ("3.11", "3.12", "3.13")
# manylinux_2_28: glibc 2.28 or later (Debian 11+, Ubuntu 20.04+, Amazon Linux 2023, RHEL 9); older
# tags too, for wheels published only as manylinux2014/2010.
PLATFORMS = ("manylinux_2_28_{arch}", "manylinux2014_{arch}", "manylinux2010_{arch}")
ELF_MACHINES = {"x86_64": 62, "aarch64": 183}   # e_machine: EM_X86_64, EM_AARCH64
SHARED_LIBRARY = re.compile(r"\.so(\.[0-9]+)*$")   # _x.cpython-311-x86_64-linux-gnu.so, libz.so.1.2
BOTOCORE_SERVICES = ("s3", "logs", "cloudwatch", "sts", "sso", "sso-oidc")


class WheelhouseError(Exception):
    pass


def elf_machine(head: bytes) -> int | None:
    """The e_machine of an ELF file's first 20 bytes (None: not ELF)."""
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "little" if head[5] == 1 else "big"
    return int.from_bytes(head[18:20], order)


def foreign_extensions(wheel: str, arch: str) -> list[str]:
    """The native libraries in ``wheel`` that are not for ``arch`` (with what they are for)."""
    wrong = []
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if not SHARED_LIBRARY.search(os.path.basename(name)):
                continue
            with archive.open(name) as member:
                machine = elf_machine(member.read(20))
            if machine != ELF_MACHINES[arch]:
                wrong.append(f"{name}: e_machine {machine}")
    return wrong


def record_line(name: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def trimmed_botocore(source: str, target: str, services=BOTOCORE_SERVICES) -> tuple[int, int]:
    """Copy botocore's wheel without the models of services the agent never calls; RECORD rewritten
    to what is kept. Returns (members kept, members left out)."""
    kept = left = 0
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as trimmed:
        record_name = next(n for n in original.namelist() if n.endswith(".dist-info/RECORD"))
        rows = []
        for info in original.infolist():
            parts = info.filename.split("/")
            if info.filename == record_name:
                continue
            # botocore/data/<service>/...: a service's models; files right under data/ are shared.
            if len(parts) > 3 and parts[:2] == ["botocore", "data"] and parts[2] not in services:
                left += 1
                continue
            data = original.read(info)
            trimmed.writestr(info, data)
            rows.append(record_line(info.filename, data))
            kept += 1
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([*rows, [record_name, "", ""]])
        trimmed.writestr(record_name, out.getvalue())
    return kept, left


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise WheelhouseError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")


def build(arch: str, out: str) -> list[str]:
    if arch not in ELF_MACHINES:
        raise WheelhouseError(f"--arch: {arch!r} is not one of {', '.join(ELF_MACHINES)}")
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as work:
        return _build(arch, out, work)


def _build(arch: str, out: str, work: str) -> list[str]:
    # Downloaded afresh into ``work`` each time (pip's own HTTP cache saves the transfer), so that
    # only what this resolution chose is carried, never an older version of an earlier build.
    own = os.path.join(work, "shipper")
    pip("wheel", "--no-deps", "--wheel-dir", own, ROOT)
    [shipper_wheel] = [os.path.join(own, n) for n in os.listdir(own) if n.endswith(".whl")]
    wheels, names = {}, {}
    for python in PYTHONS:
        downloads = os.path.join(work, python)
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p.format(arch=arch))]
        pip("download", "--only-binary=:all:", "--implementation", "cp", "--python-version", python,
            *platforms, "--dest", downloads, shipper_wheel)
        found = {n: os.path.join(downloads, n) for n in os.listdir(downloads) if n.endswith(".whl")}
        wheels.update(found)
        names[python] = {n.split("-")[0].lower() for n in found}
    # Every Python gets the same distributions: a marker pip judged by the building interpreter
    # (python_version < '3.14') must not leave one out for a target.
    every = set().union(*names.values())
    for python, have in names.items():
        if have != every:
            raise WheelhouseError(f"Python {python} lacks {sorted(every - have)}: build with Python 3.11-3.13")
    installer = os.path.join(work, "installer")
    pip("download", "--only-binary=:all:", "--no-deps", "--dest", installer, "pip")
    wheels.update({n: os.path.join(installer, n) for n in os.listdir(installer) if n.endswith(".whl")})
    wheels = [shipper_wheel] + [w for n, w in sorted(wheels.items()) if not n.startswith("shipper-")]
    placed = []
    for wheel in wheels:
        name = os.path.basename(wheel)
        wrong = foreign_extensions(wheel, arch)
        if wrong:
            raise WheelhouseError(f"{name} holds libraries for another architecture than {arch}: {wrong[:3]}")
        target = os.path.join(out, name)
        if name.startswith("botocore-"):
            trimmed_botocore(wheel, target)
        else:
            shutil.copyfile(wheel, target)
        placed.append(target)
    return placed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=sorted(ELF_MACHINES))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        placed = build(args.arch, args.out)
    except WheelhouseError as exc:
        print(f"wheelhouse.py: {exc}", file=sys.stderr)
        return 1
    total = sum(os.path.getsize(p) for p in placed)
    print(f"{len(placed)} wheels, {total / 1e6:.1f} MB in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
