"""Crash points for fault tests.

``ESTAT_CRASH_AT=<point>`` makes the process kill itself with SIGKILL when it
reaches ``<point>`` (see the calls to ``crash_point``), so tests can prove
that a crash between any two steps of a DLQ write or replay loses nothing.
Unset (always, in production) it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_POINT = os.environ.get("ESTAT_CRASH_AT", "")


def crash_point(name: str) -> None:
    if _POINT and name == _POINT:
        os.kill(os.getpid(), signal.SIGKILL)
