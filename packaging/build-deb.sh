#!/usr/bin/env bash
# Build dist/shipper_VERSION_ARCH.deb with the standard Debian tools (dpkg-deb):
#   /opt/shipper             a self-contained virtual environment (shipper and its dependencies)
#   /usr/bin/shipper         -> /opt/shipper/bin/shipper
#   /lib/systemd/system/shipper.service, /etc/shipper/shipper.toml (a conffile)
# The venv uses the target's /usr/bin/python3 (Depends: python3 >= 3.11), so build on the
# distribution and architecture the image uses. Usage: packaging/build-deb.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}
python=${PYTHON:-/usr/bin/python3}
version=$($python -c 'import re; print(re.search(r"__version__ = \"([^\"]+)\"", open("shipper/__init__.py").read())[1])')
arch=$(dpkg --print-architecture)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"
venv="$root/opt/shipper"

"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --no-compile --disable-pip-version-check .
"$venv/bin/pip" uninstall --quiet --yes pip  # not needed at run time
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
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    packaging/debian/control > "$root/DEBIAN/control"

mkdir -p "$out"
dpkg-deb --root-owner-group --build "$root" "$out/shipper_${version}_${arch}.deb" >/dev/null
echo "$out/shipper_${version}_${arch}.deb"
