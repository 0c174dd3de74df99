"""One server per address and per data directory, start-up signals, and the
command line a new user meets."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EstatProcess, free_port, wait_http

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def estat(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "estat", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_server_on_the_same_port_refuses_to_start(
    estat_factory: Any, tmp_path: Path, workers: int
) -> None:
    first: EstatProcess = estat_factory({}, workers=2)
    first.start()
    second: EstatProcess = estat_factory(
        {"HTTP_ADDR": first.env["HTTP_ADDR"], "DATA_DIR": str(tmp_path / "other")},
        workers=workers,
    )
    second.start(wait=False)
    assert second.proc is not None
    assert second.proc.wait(30) == 2
    out = second.log.read_text()
    assert "cannot listen" in out
    assert sum("cannot listen" in line for line in out.splitlines()) == 1  # one clear line
    assert "Traceback" not in out
    assert first.stop() == 0


def test_a_second_server_on_the_same_data_dir_refuses_to_start(estat_factory: Any) -> None:
    first: EstatProcess = estat_factory({})
    first.start()
    second: EstatProcess = estat_factory({})  # same DATA_DIR, another port
    second.start(wait=False)
    assert second.proc is not None
    assert second.proc.wait(30) == 2
    assert "another estat" in second.log.read_text()
    assert first.stop() == 0


def test_sigterm_during_start_up_exits_0_promptly(estat_factory: Any) -> None:
    p: EstatProcess = estat_factory({}, workers=8)
    p.start(wait=False)
    assert p.proc is not None
    time.sleep(1.0)
    t0 = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(60) == 0
    assert time.monotonic() - t0 < 30
    log = p.log.read_text()
    assert '"level":"error"' not in log, log


def _blocked(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            return {n for n in (signal.SIGTERM, signal.SIGINT) if mask >> (n - 1) & 1}
    return set()


def test_stop_signals_are_held_before_the_settings_are_even_imported(
    estat_factory: Any,
) -> None:
    """The moment estat serve holds SIGTERM/SIGINT it has not loaded pydantic
    (its settings) yet: caught by stopping the process as soon as the signals
    are held and reading what it has mapped. A SIGTERM sent then, while
    the process is frozen, ends it cleanly once it goes on."""
    p: EstatProcess = estat_factory({})
    p.start(wait=False)
    assert p.proc is not None
    pid = p.proc.pid
    deadline = time.monotonic() + 30
    while _blocked(pid) != {signal.SIGTERM, signal.SIGINT}:
        assert p.proc.poll() is None
        assert time.monotonic() < deadline
    os.kill(pid, signal.SIGSTOP)
    try:
        assert "pydantic_core" not in Path(f"/proc/{pid}/maps").read_text()
        os.kill(pid, signal.SIGTERM)  # held: pending until the handlers are in
    finally:
        os.kill(pid, signal.SIGCONT)
    assert p.proc.wait(60) == 0
    assert '"level":"error"' not in p.log.read_text()


def test_version_workers_bound_and_help(tmp_path: Path) -> None:
    out = estat("--version")
    assert out.returncode == 0
    assert out.stdout.startswith("estat ")
    out = estat("serve", "--workers", "1000", env={"DATA_DIR": str(tmp_path)})
    assert out.returncode == 2
    assert "--workers must be from 1 to 256" in out.stderr
    assert not (tmp_path / ".estat.lock").exists()  # refused before touching anything
    out = estat("serve", "--help")
    assert "environment" in out.stdout
    assert "configuration.md" in out.stdout


def test_a_misspelt_variable_in_dot_env_is_named_with_the_right_one(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "HTTP_PORT=9000\nflush_interval=3s\nAWS_SECRET_ACCESS_KEY=s\nAWS_REGION=eu-west-1\n"
    )
    out = estat("config", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        "estat: warning: .env: HTTP_PORT is not an estat variable and is ignored "
        "(did you mean HTTP_ADDR?)",
        "estat: warning: .env: AWS_SECRET_ACCESS_KEY is read from the environment only: "
        "export it instead",
    ]
    assert "FLUSH_INTERVAL                      3s" in out.stdout  # read, in any case


def test_a_server_with_workers_names_a_misspelt_variable_once(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    (tmp_path / ".env").write_text(
        f"HTTP_PORT=9000\nHTTP_ADDR=127.0.0.1:{port}\nADMIN_ADDR=127.0.0.1:{admin}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "estat", "serve", "--workers", "2"], cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/ready")
        time.sleep(1.0)  # both workers up (each would have said it again)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert err.count("HTTP_PORT is not an estat variable") == 1, err


def test_serve_refuses_a_compiled_module_older_than_its_source(tmp_path: Path) -> None:
    pkg = ROOT / "src" / "estat"
    if not list(pkg.glob("**/*.so")):
        pytest.skip("no compiled modules in this install (ESTAT_NATIVE=0)")
    copy = tmp_path / "src"
    shutil.copytree(pkg, copy / "estat")
    victim = copy / "estat" / "ingest" / "http.py"
    later = time.time() + 60
    os.utime(victim, (later, later))
    out = subprocess.run(
        [sys.executable, "-m", "estat", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(copy), "DATA_DIR": str(tmp_path / "d"),
             "HTTP_ADDR": f"127.0.0.1:{free_port()}"},
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 2
    assert "estat/ingest/http.py" in out.stderr
    assert "make install" in out.stderr


def test_the_open_file_limit_is_raised_to_its_hard_limit(tmp_path: Path) -> None:
    import resource

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "estat", "serve", "--workers", "1"],
        env={
            **os.environ,
            "DATA_DIR": str(tmp_path / "d"),
            "HTTP_ADDR": f"127.0.0.1:{port}",
            "ADMIN_ADDR": f"127.0.0.1:{free_port()}",  # not the default: it may be taken
        },
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=low_soft_limit,
    )
    try:
        from tests.conftest import wait_http

        wait_http(f"http://127.0.0.1:{port}/health")
        soft, hard = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
        assert (soft, hard) == (4096, 4096)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_workers_drain_and_exit_when_their_supervisor_is_killed(estat_factory: Any) -> None:
    """SIGKILL to the supervisor leaves no orphan worker holding the port."""
    import json

    p: EstatProcess = estat_factory({}, workers=2)
    p.start()
    workers = [
        json.loads(line)["pid"]
        for line in p.log.read_text().splitlines()
        if line.startswith("{") and '"worker started"' in line
    ]
    assert len(workers) == 2
    assert p.proc is not None
    p.proc.kill()
    p.proc.wait(10)
    deadline = time.monotonic() + 30
    alive = list(workers)
    while alive and time.monotonic() < deadline:
        alive = [w for w in alive if Path(f"/proc/{w}").exists() and "Z" not in _state(w)]
        time.sleep(0.1)
    assert alive == []
    assert p.log.read_text().count('"shutdown complete"') == 2  # each drained


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return "Z"


def test_a_one_shot_command_whose_reader_leaves_ends_quietly(tmp_path: Path) -> None:
    """``estat config --markdown | head -1``: the reader closes the pipe
    before estat writes; estat ends with 141 (as if SIGPIPE stopped it) and
    no traceback, not status 1 and a BrokenPipeError."""
    r, w = os.pipe()
    os.close(r)  # the reader is gone before estat writes a byte
    run = subprocess.run(
        [sys.executable, "-m", "estat", "config", "--markdown"],
        stdout=w, stderr=subprocess.PIPE, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    os.close(w)
    assert run.returncode == 141, run.stderr
    assert run.stderr == ""


def test_a_role_whose_admin_address_is_taken_names_that_address(estat_factory: Any) -> None:
    """``estat store`` has no ingest listener: its refusal must name
    ADMIN_ADDR, not the HTTP_ADDR it never binds."""
    first: EstatProcess = estat_factory({}, args=["store"])
    first.start()
    second: EstatProcess = estat_factory(
        {"ADMIN_ADDR": first.env["ADMIN_ADDR"], "DATA_DIR": first.env["DATA_DIR"] + "-2"},
        args=["store"],
    )
    second.start(wait=False)
    assert second.proc is not None
    assert second.proc.wait(30) == 2
    out = second.log.read_text()
    line = next(x for x in out.splitlines() if "cannot listen" in x)
    assert f"ADMIN_ADDR {first.env['ADMIN_ADDR']}" in line, out
    assert second.env["HTTP_ADDR"] not in line
    assert first.stop() == 0


@pytest.mark.parametrize("role", ["store", "dispatch"])
def test_a_role_names_the_destinations_in_its_start_line(estat_factory: Any, role: str) -> None:
    """The store consumer enqueues a dispatch row per configured destination
    although it sends nothing itself (it said none); a dispatcher sends to
    them (it said nothing)."""
    p: EstatProcess = estat_factory(
        {"POSTHOG_HOST": "http://127.0.0.1:9", "POSTHOG_API_KEY": "phc_x"}, args=[role]
    )
    p.start()
    ready = next(x for x in p.log.read_text().splitlines() if "pipeline ready" in x)
    assert '"destinations":"POSTHOG"' in ready
    assert f'"roles":"{role}"' in ready
    assert p.stop() == 0
