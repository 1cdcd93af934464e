#!/usr/bin/env bash
# Build dist/shipper_VERSION_ARCH.deb with the standard Debian tools (dpkg-deb):
#   /opt/shipper             a self-contained virtual environment (shipper and its dependencies)
#   /usr/bin/shipper         -> /opt/shipper/bin/shipper
#   /lib/systemd/system/shipper.service, /etc/shipper/shipper.toml (a conffile)
# The venv holds extensions built for one minor version of Python (cp311) under lib/python3.11, so it
# runs on the distribution's /usr/bin/python3.X of that minor version (Depends: python3.X), never on
# whatever /usr/bin/python3 points to: build on the distribution and architecture the image uses.
# PYTHON (default /usr/bin/python3) only chooses the minor version. Usage: packaging/build-deb.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}
minor=$("${PYTHON:-/usr/bin/python3}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
python=/usr/bin/python$minor
if [ ! -x "$python" ]; then
  echo "build-deb.sh: $python not found: the package depends on the distribution's python$minor;" \
       "install python$minor and python$minor-venv, or set PYTHON to the image's python3" >&2
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "build-deb.sh: $python is Python $minor; shipper needs 3.11 or later (set PYTHON)" >&2
  exit 1
fi
version=$("$python" -c 'import re; print(re.search(r"__version__ = \"([^\"]+)\"", open("shipper/__init__.py").read())[1])')
arch=$(dpkg --print-architecture)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"
venv="$root/opt/shipper"

# From /usr/bin/python3.X itself, so bin/python3 -> /usr/bin/python3.X (not /usr/bin/python3).
"$python" -m venv "$venv"
"$venv/bin/python3" -m pip install --quiet --no-compile --disable-pip-version-check .
# Not needed at run time: the installers. Uninstalling setuptools also removes pkg_resources,
# _distutils_hack and its distutils-precedence.pth (newer venvs have no setuptools: a warning only).
"$venv/bin/python3" -m pip uninstall --quiet --yes setuptools pip 2>&1 | grep -v "^WARNING: Skipping" >&2 || true
# Only the agent and the interpreter links: no activate scripts, no other console scripts (watchmedo, jp.py).
find "$venv/bin" -mindepth 1 -maxdepth 1 ! -name shipper ! -name python ! -name python3 ! -name "python$minor" \
  -delete
for gone in setuptools pkg_resources _distutils_hack distutils-precedence.pth pip; do
  if [ -e "$venv/lib/python$minor/site-packages/$gone" ]; then
    echo "build-deb.sh: $gone is still in the venv" >&2
    exit 1
  fi
done
# A venv records its own path: make it the installed one (/opt/shipper), not the build's.
grep -rlI --null "$venv" "$venv" | xargs -0 -r sed -i "s|$venv|/opt/shipper|g"
find "$venv" -name __pycache__ -prune -exec rm -rf {} +  # compiled by postinst, on the target

install -D -m 0644 packaging/systemd/shipper.service "$root/lib/systemd/system/shipper.service"
install -D -m 0644 packaging/shipper.toml "$root/etc/shipper/shipper.toml"
install -D -m 0644 README.md "$root/usr/share/doc/shipper/README.md"
install -d "$root/usr/bin"
ln -s /opt/shipper/bin/shipper "$root/usr/bin/shipper"

install -d "$root/DEBIAN"
for script in postinst prerm postrm; do
  install -m 0755 "packaging/debian/$script" "$root/DEBIAN/$script"
done
echo /etc/shipper/shipper.toml > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
# The template's comment lines are for us: a binary package's control file has none.
sed -e '/^#/d' -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    -e "s/@PYTHON_VERSION@/$minor/" packaging/debian/control > "$root/DEBIAN/control"

mkdir -p "$out"
dpkg-deb --root-owner-group --build "$root" "$out/shipper_${version}_${arch}.deb" >/dev/null
echo "$out/shipper_${version}_${arch}.deb"
