"""Compile the ingest hot path with mypyc, in place (``make install`` runs this).

The modules below are plain, fully typed Python; mypyc turns them into C
extensions placed next to their sources (``*.cpython-*.so``, not committed),
which Python imports in preference to the ``.py`` files. The behaviour is the
same either way; compiled, a ``/collect`` request costs about half the
instructions (docs/benchmarks.md). Without a C compiler (a warning), or
with ``ESTAT_NATIVE=0``, estat runs the same modules as Python;
``ESTAT_NATIVE=1`` makes a failed build an error.

Usage: ``python scripts/build_native.py [--clean | --list]``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
BUILD = ROOT / "build" / "native"
# Per-request code only: the HTTP/1.1 protocol, the /collect route, the event
# queue, the latency histogram. The Makefile reads this list (``--list``).
MODULES = [
    "estat/ingest/http.py",
    "estat/ingest/deferred.py",
    "estat/ingest/edges.py",
    "estat/ingest/server.py",
    "estat/ingest/answers.py",
    "estat/ingest/routes.py",
    "estat/pipeline/queue.py",
    "estat/ops/hist.py",
]
GROUP = "estat_native"


def built_files() -> list[Path]:
    files = [p for m in MODULES for p in (SRC / m).parent.glob(Path(m).stem + ".*.so")]
    return files + list(SRC.glob(f"{GROUP}__mypyc.*.so"))


def clean() -> None:
    for p in built_files():
        p.unlink()
    shutil.rmtree(BUILD, ignore_errors=True)


def build() -> None:
    from mypyc.build import mypycify
    from setuptools import setup

    os.environ["MYPY_CACHE_DIR"] = str(BUILD / "mypy_cache")
    os.chdir(SRC)
    setup(
        name="estat-native",
        ext_modules=mypycify(MODULES, opt_level="3", group_name=GROUP, target_dir=str(BUILD)),
        script_args=[
            "-q",
            "build_ext",
            "--inplace",
            "--build-temp",
            str(BUILD / "temp"),
            "--build-lib",
            str(BUILD / "lib"),
        ],
    )


def main() -> int:
    if "--list" in sys.argv[1:]:  # the sources, for the Makefile's dependencies
        print(" ".join(f"src/{m}" for m in MODULES))
        return 0
    clean()
    mode = os.environ.get("ESTAT_NATIVE", "")
    if "--clean" in sys.argv[1:] or mode == "0":
        return 0
    try:
        build()
    except (Exception, SystemExit) as e:
        # ESTAT_NATIVE=1 (CI) makes a failed build an error; otherwise estat
        # still works, as Python.
        if mode == "1":
            raise
        clean()
        print(
            f"warning: could not compile the per-request modules ({e}); "
            "estat will run them as Python (slower). Install a C compiler and "
            "the Python headers, then run `make install` again.",
            file=sys.stderr,
        )
        return FELL_BACK
    return 0


#: exit status when the build failed and estat will run as Python: the
#: Makefile does not record the build, so the next `make install` tries again
FELL_BACK = 3


if __name__ == "__main__":
    raise SystemExit(main())
