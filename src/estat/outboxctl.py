"""``estat outbox summary | replay``: the source outbox from the command line
(the same answers as seed 004's admin calls)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from sqlalchemy.exc import SQLAlchemyError

from estat.settings import Settings
from estat.store.db import Database
from estat.store.outbox import SourceOutbox, requeue_failed


def run_outbox_command(settings: Settings, args: argparse.Namespace) -> int:
    db = Database(**settings.database_args)
    try:
        if args.outbox_command == "summary":
            print(json.dumps(SourceOutbox(db).summary()))
        else:
            if not 1 <= args.limit <= 100_000:
                print("estat: --limit must be from 1 to 100000", file=sys.stderr)
                return 2
            n = requeue_failed(db, args.limit, datetime.now(UTC))
            print(json.dumps({"requeuedCount": n}))
    except SQLAlchemyError as e:
        print(f"estat: database error: {str(e).splitlines()[0][:300]}", file=sys.stderr)
        return 1
    finally:
        db.close()
    return 0
