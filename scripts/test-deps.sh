#!/usr/bin/env bash
# Test servers the suite needs that do not come from PyPI. moto_server (the
# S3 protocol endpoint) is a Python test dependency and is already installed.
set -euo pipefail
exit 0
