#!/usr/bin/env bash
# Servers and tools the suite needs that do not come from PyPI, installed from
# Debian's packages when missing: redis-server (rate limits shared through
# Redis) and chromium (the browser intake test). moto_server, the S3
# protocol endpoint, is a Python test dependency.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing test dependencies from Debian: ${need[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
