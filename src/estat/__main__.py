"""``python -m estat`` and the ``estat`` command.

A long-running command (``serve``, ``relay``, ``store``, ``dispatch``) holds
SIGTERM and SIGINT from its first instruction, before the imports that take
most of a start-up, until its handlers are installed (``app.serve``): a stop
sent meanwhile ends it cleanly instead of killing it. The one-shot commands
are left as they are.
"""

import signal
import sys

LONG_RUNNING = {"serve", "relay", "store", "dispatch"}


def run() -> int:
    argv = sys.argv[1:]
    if argv[:1] and argv[0] in LONG_RUNNING and "verify-backup" not in argv[1:2]:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    from estat.cli import main

    return main()


if __name__ == "__main__":
    raise SystemExit(run())
