"""File descriptors: the open-file limit and what it allows."""

from __future__ import annotations

import contextlib
import resource

#: descriptors kept for everything that is not a client connection
FD_RESERVE = 128


def raise_nofile_limit() -> int:
    """Raise the open-file limit to its hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def default_max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, (soft - FD_RESERVE) * 3 // 4)
