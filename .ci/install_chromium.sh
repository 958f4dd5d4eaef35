#!/usr/bin/env bash
# Installs Debian's chromium (for tests/test_report.py's headless-browser test) when missing.
set -euo pipefail
[ -x /usr/bin/chromium ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo ".ci/install_chromium.sh: tests/test_report.py needs /usr/bin/chromium and there is no apt-get" >&2
  exit 1
fi
SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
/usr/bin/chromium --version
