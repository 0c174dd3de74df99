"""``python -m estat`` and the ``estat`` command.

A long-running command (``serve``, ``relay``, ``store``, ``dispatch``) holds
SIGTERM and SIGINT from its first instruction, before the imports that take
most of a start-up, until its handlers are installed (``app.serve``): a stop
sent meanwhile ends it cleanly instead of killing it. The one-shot commands
are left as they are, except that a reader of their output that goes away
(``estat dlq ls | head``) ends them quietly, with status 141 as a shell
reports a command that SIGPIPE stopped.
"""

import os
import signal
import sys

LONG_RUNNING = {"serve", "relay", "store", "dispatch"}
#: subcommands of a long-running command's name that are one-shot
ONE_SHOT = {"verify-backup", "backfill"}


def _long_running(argv: list[str]) -> bool:
    return bool(argv[:1]) and argv[0] in LONG_RUNNING and not ONE_SHOT & set(argv[1:2])


def run() -> int:
    argv = sys.argv[1:]
    if _long_running(argv):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    from estat.cli import main

    if _long_running(argv):
        return main()
    try:
        rc = main()
    except BrokenPipeError:
        # stdout's reader left: no traceback, and nothing more written at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        rc = 128 + signal.SIGPIPE
    if "obstore" in sys.modules:
        _end_without_finalizing(rc)
    return rc


def _end_without_finalizing(rc: int) -> None:
    """obstore's Tokio worker threads run until the process ends, and one
    caught mid-task by the interpreter's finalization aborts the process
    (SIGABRT: status 134 instead of the command's; measured: about one run in
    four of `estat store backfill` on S3). A one-shot command that loaded it
    ends here, its output flushed, without finalizing."""
    import contextlib
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(rc)


if __name__ == "__main__":
    raise SystemExit(run())
