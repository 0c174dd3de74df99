"""What the host tells about this process: resident memory, the memory it
may use (the cgroup's limit, else the machine's), the disk under
``DATA_DIR`` (the DLQ and the spool live there), and when the process
started (restarts show as ``changes(process_start_time_seconds[10m])``). Read at
most every ``every`` seconds, from the metrics flush."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from estat.ops.metrics import Metrics

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def memory_limit() -> int:
    """The cgroup v2 / v1 memory limit, else the machine's memory (bytes)."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            return int(text)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def resident_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


class HostGauges:
    def __init__(self, metrics: Metrics, data_dir: Path, every: float = 5.0) -> None:
        self._m = metrics
        self.data_dir = data_dir
        self.every = every
        self._next = 0.0
        metrics.process_start_time.set(time.time())
        metrics.memory_limit.set(memory_limit())

    def refresh(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every
        self._m.resident_memory.set(resident_bytes())
        try:
            du = shutil.disk_usage(self.data_dir)
        except OSError:
            return
        self._m.data_dir_total.set(du.total)
        self._m.data_dir_free.set(du.free)


def disk_status(path: Path, full: float = 0.9) -> str:
    """``ok``, ``low: 93% used`` above ``full``, or ``unreadable`` (for ``/ready``)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # not created yet: the filesystem it will be on
    try:
        du = shutil.disk_usage(probe)
    except OSError:
        return "unreadable"
    used = 1 - du.free / du.total if du.total else 0.0
    return f"low: {used:.0%} used" if used > full else "ok"
