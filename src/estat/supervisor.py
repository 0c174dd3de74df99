"""``estat serve --workers N``: N worker processes that behave as one server.

Each worker is a full estat process (listener, pipeline, uploads) with its
own instance id (``<INSTANCE_ID>-w<i>``), bound to the same address with
``SO_REUSEPORT`` so the kernel spreads connections across them. Workers
share one metrics directory, so any worker's ``/metrics`` reports the whole
server. The parent forwards SIGTERM/SIGINT to every worker and exits after
all of them have drained (status 0 if every worker exited 0). A worker that
dies unexpectedly is restarted (its counters are kept); more than five
crashes in a minute stop the server with status 1.

Shared directories are safe: every worker writes its own keys (the instance
id is in every object key) and local writes are atomic renames.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess

from estat.ops.logging import get_logger, setup_logging
from estat.settings import Settings

log = get_logger("estat.supervisor")

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
CRASH_WINDOW = 60.0
CRASH_LIMIT = 5
KILL_MARGIN = 5.0
MAX_WORKERS = 256


class AlreadyRunning(Exception):
    """Another estat holds the address or the data directories."""


class InstanceLock:
    """One server per address and per data directory.

    ``flock`` on ``<dir>/.estat.lock`` for ``DATA_DIR`` and ``DLQ_DIR`` (two
    servers replaying one DLQ, or writing one lake directory, would race),
    held for the life of the process and released by the kernel when it
    dies. The address is probed with a plain bind: it fails while any
    socket (estat's ``SO_REUSEPORT`` workers included) holds the port, so a
    second server cannot join the first one's group; a sentinel socket with
    ``SO_REUSEPORT`` then holds the address until the workers bind theirs.
    """

    def __init__(self) -> None:
        self._files: list[int] = []
        self._sentinel: socket.socket | None = None

    def lock_dir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / ".estat.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(
                f"another estat (pid {holder}) is using {path}; "
                "give each server its own DATA_DIR and DLQ_DIR"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._files.append(fd)

    def hold_address(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.bind((host or "", port))
        except OSError as e:
            raise AlreadyRunning(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        finally:
            probe.close()
        sentinel = socket.socket(family, socket.SOCK_STREAM)
        sentinel.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sentinel.bind((host or "", port))  # bound, never listening: gets no connections
        self._sentinel = sentinel

    def release_address(self) -> None:
        if self._sentinel is not None:
            self._sentinel.close()
            self._sentinel = None


def lock_instance(settings: Settings, *, address: bool) -> InstanceLock:
    """Take the locks of one server (raises ``AlreadyRunning``)."""
    lock = InstanceLock()
    lock.lock_dir(settings.data_dir)
    dlq = settings.dlq_path
    if dlq.resolve() != settings.data_dir.resolve():
        lock.lock_dir(dlq)
    if address:
        host, port = settings.listen
        lock.hold_address(host, port)
    return lock


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.generation = 0
        self.proc: subprocess.Popen[bytes] | None = None


def run_workers(
    settings: Settings, n: int, roles: tuple[str, ...] = ("ingest", "relay", "store", "dispatch")
) -> int:
    setup_logging(settings.log_level, pretty=settings.log_pretty, env=settings.deploy_env)
    mpdir = tempfile.mkdtemp(prefix="estat-metrics-")
    stopping = False
    limits_socket = ""
    if not settings.rate_limit_redis_url:
        # one rate limit for the whole server: the workers ask this process
        from estat.clock import SystemClock
        from estat.ingest.ratelimit import serve_shared_limiter

        limits_socket = str(Path(mpdir) / "rate-limits.sock")
        serve_shared_limiter(
            limits_socket,
            settings.analytics_rate_limit_max_requests,
            settings.analytics_rate_limit_window,
            SystemClock(),
        )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the CLI until now

    def spawn(w: _Worker) -> None:
        instance = f"{settings.instance_id}-w{w.index}"
        if w.generation:
            instance += f".{w.generation}"
        env = dict(os.environ)
        env.update(
            PROMETHEUS_MULTIPROC_DIR=mpdir,
            INSTANCE_ID=instance,
            ESTAT_WORKER_INDEX=str(w.index),
            ESTAT_RATE_LIMIT_SOCKET=limits_socket,
            ESTAT_SUPERVISOR_PID=str(os.getpid()),
        )
        # the worker starts with SIGTERM/SIGINT blocked (the mask is inherited)
        # and takes them once its handlers are installed: a signal during its
        # start-up is a drain, not a kill
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            w.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "estat",
                    "serve",
                    "--workers",
                    "1",
                    "--reuse-port",
                    "--roles",
                    ",".join(roles),
                ],
                env=env,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        log.info("worker started", worker=w.index, pid=w.proc.pid, instance=instance)

    workers = [_Worker(i) for i in range(n)]
    crashes: deque[float] = deque()
    status = 0
    try:
        for w in workers:
            if stopping:  # a signal during start-up: stop spawning, drain those started
                break
            spawn(w)
        while not stopping:
            time.sleep(0.1)
            for w in workers:
                assert w.proc is not None
                rc = w.proc.poll()
                if rc is None or stopping:
                    continue
                multiprocess.mark_process_dead(w.proc.pid, mpdir)  # type: ignore[no-untyped-call]
                if rc == 0:
                    # a worker drains and exits 0 only when it was signalled itself
                    # (systemd and `docker stop` signal the whole group): stop all
                    log.info("worker stopped on a signal; stopping", worker=w.index)
                    stopping = True
                    break
                if rc == 2:
                    log.error("worker could not start; stopping", worker=w.index, exitCode=rc)
                    stopping = True
                    status = 2
                    break
                now = time.monotonic()
                crashes.append(now)
                while crashes and now - crashes[0] > CRASH_WINDOW:
                    crashes.popleft()
                log.error("worker exited unexpectedly", worker=w.index, exitCode=rc)
                if len(crashes) > CRASH_LIMIT:
                    log.error("workers crash in a loop; stopping", crashes=len(crashes))
                    stopping = True
                    status = 1
                    break
                w.generation += 1
                spawn(w)
        # drain: every worker gets SIGTERM and drains on its own
        for w in workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + settings.shutdown_timeout + KILL_MARGIN
        for w in workers:
            if w.proc is None:
                continue
            try:
                rc = w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not stop in time; killing", worker=w.index)
                w.proc.kill()
                rc = w.proc.wait()
            if rc != 0:
                log.error("worker exited with an error", worker=w.index, exitCode=rc)
                if status == 0:
                    status = 1
        log.info("all workers stopped", exitCode=status)
        return status
    finally:
        shutil.rmtree(mpdir, ignore_errors=True)
