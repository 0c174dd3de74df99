"""The build remembers its mode: `make install` with ESTAT_NATIVE=0 after a
compiled build removes the compiled modules, and a failed compile is not
recorded, so the next `make install` tries again. Run in a copy of the
project that shares this virtual environment."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make(where: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "native"],
        cwd=where,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.e2e
def test_build_mode_is_remembered_and_a_failed_compile_is_retried(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        raise RuntimeError("make is not installed")
    copy = tmp_path / "estat"
    copy.mkdir()
    for name in ("Makefile", "pyproject.toml", "uv.lock"):
        shutil.copy2(ROOT / name, copy / name)
    for name in ("pyproject.toml", "uv.lock"):  # older than the shared venv: no `uv sync`
        os.utime(copy / name, (0, 0))
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    shutil.copytree(ROOT / "src", copy / "src", ignore=shutil.ignore_patterns("*.so"))
    (copy / ".venv").symlink_to(ROOT / ".venv")
    stamps = copy / "build" / "native"

    out = make(copy, ESTAT_NATIVE="", CC="/bin/false")  # no working compiler
    assert out.returncode == 0, out.stderr
    assert "could not compile" in out.stderr
    assert not list(stamps.glob(".built-*")) if stamps.exists() else True
    again = make(copy, ESTAT_NATIVE="", CC="/bin/false")
    assert "could not compile" in again.stderr  # tried again, not remembered as built

    out = make(copy, ESTAT_NATIVE="0")
    assert out.returncode == 0, out.stderr
    assert [p.name for p in stamps.glob(".built-*")] == [".built-pure"]
    assert not list((copy / "src").rglob("*.so"))
    out = make(copy, ESTAT_NATIVE="0")
    assert "compiling" not in out.stdout  # up to date in this mode
