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

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from types import FrameType

from prometheus_client import multiprocess

from estat.ops.logging import get_logger, setup_logging
from estat.settings import Settings

log = get_logger("estat.supervisor")

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
CRASH_WINDOW = 60.0
CRASH_LIMIT = 5
KILL_MARGIN = 5.0


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


def run_workers(settings: Settings, n: int) -> int:
    setup_logging(settings.log_level, pretty=settings.log_pretty, env=settings.deploy_env)
    mpdir = tempfile.mkdtemp(prefix="estat-metrics-")
    stopping = False

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
        )
        w.proc = subprocess.Popen(
            [sys.executable, "-m", "estat", "serve", "--workers", "1", "--reuse-port"],
            env=env,
        )
        log.info("worker started", worker=w.index, pid=w.proc.pid, instance=instance)

    workers = [_Worker(i) for i in range(n)]
    crashes: deque[float] = deque()
    status = 0
    try:
        for w in workers:
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
