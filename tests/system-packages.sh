#!/usr/bin/env bash
# The Debian packages the test suite needs (the one list: `make test` and CI both run this).
# Installs the missing ones with apt-get when it can (as root, or with sudo that asks no password);
# otherwise says which are missing: the tests that need them are then skipped, each saying why
# (and in CI, where CI is set, a skipped test fails the run).
set -uo pipefail

# what shows the package is there | the package | what needs it
PACKAGES=(
  "journalctl|systemd|the journald input's tests; systemd-analyze verifies the unit"
  "/lib/systemd/systemd-journal-remote|systemd-journal-remote|writes the journald tests' journal files"
  "chromium|chromium|renders a shipper report page in the tests"
  "setpriv|util-linux|as root, runs the agent without CAP_DAC_OVERRIDE (the unreadable-file test)"
  "dpkg-deb|dpkg|builds the .deb in the packaging tests"
  "adduser|adduser|the .deb's postinst, when CI installs the package"
  "rpmbuild|rpm|builds the .rpm packages; rpm -qp reads them"
  "rpm2archive|rpm2cpio|reads the .rpm packages' files"
  "rpmlint|rpmlint|checks the .rpm packages"
  "debootstrap|debootstrap|builds the Debian 12 and 13 systems the packages are installed in"
  "/usr/bin/qemu-aarch64-static|qemu-user-static|runs the arm64 Debian 12 system on this amd64 machine"
  "update-binfmts|binfmt-support|registers qemu for arm64 programs (binfmt_misc)"
)

present() {
  case "$1" in
    /*) [ -e "$1" ] || [ -e "/usr$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

missing=()
for entry in "${PACKAGES[@]}"; do
  IFS='|' read -r probe package _ <<<"$entry"
  present "$probe" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-packages: not a Debian system (no apt-get): without ${missing[*]} the tests that need them are skipped" >&2
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "system-packages: missing ${missing[*]}; install them with" >&2
  echo "  sudo apt-get install -y ${missing[*]}" >&2
  echo "(make test installs them itself as root or with sudo; until then the tests that need them are skipped)" >&2
  exit 0
fi
echo "system-packages: installing ${missing[*]} (the tests need them: tests/system-packages.sh)" >&2
"${sudo[@]}" apt-get update -qq || exit 1
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" || exit 1
