#!/usr/bin/env bash
# Install headless Chromium (Debian package `chromium`) for the report screenshot test. Idempotent and quiet:
# does nothing when /usr/bin/chromium already runs. Needs root (CI containers) or sudo.
set -euo pipefail
if /usr/bin/chromium --version >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install_chromium.sh: need root or sudo to apt-get install chromium" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
/usr/bin/chromium --version
