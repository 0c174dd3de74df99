#!/usr/bin/env bash
# Servers and tools the suite needs that do not come from PyPI, installed from
# Debian's packages when missing: PostgreSQL (the event store), redis-server
# (rate limits and the Redis Streams bus), nats-server (the JetStream bus) and
# chromium (the browser intake test), prometheus (promtool and a real
# Prometheus for the alert rules and the dashboard). moto_server, the S3 protocol endpoint,
# is a Python test dependency. The fixtures start throwaway servers on free
# loopback ports; no service of the machine is used.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing test dependencies from Debian: ${need[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
