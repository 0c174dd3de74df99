#!/usr/bin/env bash
# The load generator for `make bench`: wrk from Debian's packages.
set -euo pipefail
if ! command -v wrk >/dev/null 2>&1; then
  echo "installing wrk (Debian package)..."
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk >/dev/null
fi
