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


def run() -> int:
    argv = sys.argv[1:]
    if argv[:1] and argv[0] in LONG_RUNNING and "verify-backup" not in argv[1:2]:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    from estat.cli import main

    if argv[:1] and argv[0] in LONG_RUNNING:
        return main()
    try:
        return main()
    except BrokenPipeError:
        # stdout's reader left: no traceback, and nothing more written at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    raise SystemExit(run())
