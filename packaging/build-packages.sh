#!/usr/bin/env bash
# Build shipper's packages into OUT_DIR (default dist/): one per format and architecture, each working on
# CPython 3.11, 3.12 and 3.13 (the wheels of every dependency for each, built into /opt/shipper on the
# target by /usr/lib/shipper/setup-venv):
#   deb-amd64  shipper_VERSION_amd64.deb    Debian 12/13, Ubuntu 22.04+ (x86_64)
#   deb-arm64  shipper_VERSION_arm64.deb    the same on Graviton (aarch64)
#   rpm-x86_64 shipper-VERSION-1.x86_64.rpm Amazon Linux 2023, RHEL 9 and rebuilds
#   rpm-aarch64 shipper-VERSION-1.aarch64.rpm
# Usage: packaging/build-packages.sh [OUT_DIR] [TARGET ...]   (default: all four); prints each path built.
# Needs dpkg-deb (dpkg) for .deb, rpmbuild (Debian's rpm) for .rpm, and a Python >= 3.11 with pip
# (PYTHON, default .venv/bin/python, else python3) to download the wheels: nothing is compiled, so one
# amd64 machine builds every architecture (pip's HTTP cache keeps the downloads between builds).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(deb-amd64 deb-arm64 rpm-x86_64 rpm-aarch64)
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
version=$("$python" -c 'import re; print(re.search(r"__version__ = \"([^\"]+)\"", open("shipper/__init__.py").read())[1])')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The files both formats install, for one CPU architecture (x86_64 or aarch64), staged under $work/root-ARCH.
stage() {
  local arch=$1 root=$work/root-$1
  [ -d "$root" ] && return
  "$python" packaging/wheelhouse.py --arch "$arch" --out "$root/usr/lib/shipper/wheels" >&2
  install -D -m 0755 packaging/setup-venv "$root/usr/lib/shipper/setup-venv"
  install -D -m 0644 packaging/systemd/shipper.service "$root/usr/lib/systemd/system/shipper.service"
  install -D -m 0644 packaging/shipper.toml "$root/etc/shipper/shipper.toml"
  install -D -m 0644 README.md "$root/usr/share/doc/shipper/README.md"
  install -d "$root/usr/bin"
  ln -s /opt/shipper/bin/shipper "$root/usr/bin/shipper"  # the venv setup-venv builds
}

build_deb() {
  local debarch=$1 arch=$2
  stage "$arch"
  local root=$work/deb-$debarch
  cp -a "$work/root-$arch" "$root"
  install -d "$root/DEBIAN"
  for script in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$script" "$root/DEBIAN/$script"
  done
  install -m 0644 packaging/debian/triggers "$root/DEBIAN/triggers"
  echo /etc/shipper/shipper.toml > "$root/DEBIAN/conffiles"
  # What the built venv takes besides the wheels (~30 MB), so that dpkg's space check counts it.
  local size=$(( $(du -sk --exclude=DEBIAN "$root" | cut -f1) + 30000 ))
  # The template's comment lines are for us: a binary package's control file has none.
  sed -e '/^#/d' -e "s/@VERSION@/$version/" -e "s/@ARCH@/$debarch/" -e "s/@SIZE@/$size/" \
      packaging/debian/control > "$root/DEBIAN/control"
  dpkg-deb -Zxz --root-owner-group --build "$root" "$out/shipper_${version}_${debarch}.deb" >/dev/null
  echo "$out/shipper_${version}_${debarch}.deb"
}

build_rpm() {
  local arch=$1
  stage "$arch"
  local top=$work/rpm-$arch
  mkdir -p "$top/SPECS" "$top/BUILD" "$top/RPMS"
  sed -e "s|@VERSION@|$version|g" -e "s|@STAGED@|$work/root-$arch|" -e "s|@DATE@|$(LC_ALL=C date -u '+%a %b %d %Y')|" \
      packaging/rpm/shipper.spec > "$top/SPECS/shipper.spec"
  rpmbuild --quiet -bb --target "$arch-linux" --define "_topdir $top" --define "_binary_payload w6.xzdio" \
      "$top/SPECS/shipper.spec" >&2
  cp "$top/RPMS/$arch/shipper-$version-1.$arch.rpm" "$out/"
  echo "$out/shipper-$version-1.$arch.rpm"
}

for target in "${targets[@]}"; do
  case $target in
    deb-amd64) build_deb amd64 x86_64 ;;
    deb-arm64) build_deb arm64 aarch64 ;;
    rpm-x86_64) build_rpm x86_64 ;;
    rpm-aarch64) build_rpm aarch64 ;;
    *) echo "build-packages.sh: unknown target $target (deb-amd64, deb-arm64, rpm-x86_64, rpm-aarch64)" >&2; exit 2 ;;
  esac
done
