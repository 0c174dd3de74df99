"""One estat process: signals, start, wait, drain, exit status.

``estat serve --workers 1`` (and every worker of ``--workers N``) runs
``serve``: the open-file limit is raised, SIGTERM/SIGINT (blocked by the CLI
until now) are routed to a drain, and the exit status says whether every
accepted event was saved (0) or not, or a stage failed (1), or the process
could not start (2).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys

import uvloop

from estat.activity_app import ROLES, StartFailed
from estat.admin.listener import AdminListenFailed
from estat.app import App, LakeCheckFailed
from estat.lake.sink import LakeUnusable
from estat.ops.fds import raise_nofile_limit
from estat.ops.logging import get_logger, setup_logging
from estat.roles_app import RolesApp
from estat.settings import Settings

log = get_logger("estat.app")


async def _serve(settings: Settings, reuse_port: bool, roles: tuple[str, ...]) -> int:
    raise_nofile_limit()
    try:
        app: App | RolesApp = (
            App(settings, reuse_port=reuse_port, roles=roles)
            if "ingest" in roles
            else RolesApp(settings, roles)
        )
    except LakeUnusable as e:
        log.error("cannot start", error=str(e))
        return 2
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.request_stop)
    # blocked by the CLI from the start, so a signal that arrived during
    # start-up is delivered now, to the handler, instead of killing the process
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        await app.start()
    except AdminListenFailed as e:
        log.error("cannot listen", error=str(e))
        return 2
    except OSError as e:
        log.error("cannot listen", addr=settings.http_addr, error=str(e))
        return 2
    except StartFailed as e:
        log.error("cannot start", error=str(e))
        return 2
    except LakeCheckFailed as e:
        log.error("LAKE_STARTUP_CHECK=require: not starting", errorClass=e.error.error_class)
        return 2
    await app.wait_for_stop()
    # The handlers stay installed: a second SIGTERM (systemd and `docker stop`
    # signal every process of the group; an impatient operator) must not cut
    # the drain short.
    unsaved = await app.shutdown()
    # Drained: a late signal must not turn this clean exit into a kill. The
    # loop's handlers would fall back to the default action when it closes.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    if unsaved or app.supervisor.failed:
        log.error(
            "exiting with an error",
            unsavedEvents=unsaved,
            failedStages=list(app.supervisor.failed),
        )
        return 1
    return 0


def _die_with_supervisor() -> None:
    """A worker of ``--workers N`` gets SIGTERM (a drain) when its supervisor
    dies, even by SIGKILL: no orphan keeps the port (Linux)."""
    parent = os.environ.get("ESTAT_SUPERVISOR_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


PR_SET_PDEATHSIG = 1


def serve(settings: Settings, *, reuse_port: bool = False, roles: tuple[str, ...] = ROLES) -> int:
    """Run one estat process until SIGTERM/SIGINT; exit status 0 after a drain."""
    setup_logging(settings.log_level, pretty=settings.log_pretty, env=settings.deploy_env)
    if reuse_port:
        _die_with_supervisor()
    return uvloop.run(_serve(settings, reuse_port, roles))
