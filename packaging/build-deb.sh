#!/usr/bin/env bash
# The .deb for this machine's architecture (dist/shipper_VERSION_ARCH.deb by default): one of the packages
# packaging/build-packages.sh builds (see there). Usage: packaging/build-deb.sh [OUT_DIR]; prints its path.
set -euo pipefail
cd "$(dirname "$0")/.."
exec packaging/build-packages.sh "${1:-dist}" "deb-$(dpkg --print-architecture)"
