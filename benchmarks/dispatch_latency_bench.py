"""``make bench`` (dispatch across a network): what one dispatcher process
reaches when the destination is far away. PostHog's cloud answers a
``/batch/`` request in tens to hundreds of milliseconds; a dispatcher lane
has ``DISPATCH_LANE_IN_FLIGHT`` requests in flight at once, so its rate is
bounded by ``DISPATCH_LANE_IN_FLIGHT x DISPATCH_BATCH_SIZE / round trip``
and a process's by ``DISPATCH_CONCURRENCY`` (lanes) times that, until the
database or the CPU bounds it first.

The capture server (its own process, as in ``dispatch_bench.py``) answers
each request after a fixed delay; the dispatcher drains a PostgreSQL
dispatch outbox into it. Each line prints the measured rate beside that
bound. Figures, not assertions.
"""

from __future__ import annotations

import importlib
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
bench = importlib.import_module("dispatch_bench")

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SECONDS = 4.0  # about how long each run drains
DELAYS = (0.05, 0.15)  # seconds before each answer
# (batch size, lanes, requests in flight per lane); the defaults: 100, 2, 4
SETTINGS = ((100, 2, 1), (100, 2, 4), (100, 2, 16), (100, 8, 4), (1000, 2, 1), (1000, 2, 4))


async def main_async(pg: Any) -> None:
    print(
        f"dispatch to a capture server that answers late, {ROUNDS} runs, medians\n"
        f"{'delay ms':>8} {'batch':>6} {'lanes':>5} {'in flight':>9} {'events':>7} {'bound ev/s':>11} "
        f"{'estat ev/s':>11} {'of bound':>8}"
    )
    for delay in DELAYS:
        proc, url = bench.start_capture(delay)
        try:
            for batch, lanes, in_flight in SETTINGS:
                bound = lanes * in_flight * batch / delay
                # enough events for a few seconds at the bound and ten
                # batches per lane at least; at most 30,000
                n = min(30_000, max(lanes * in_flight * batch * 10, int(bound * SECONDS)))
                rates = []
                for _ in range(ROUNDS):
                    rate, _split = await bench.dispatch(
                        pg.create_database(),
                        url,
                        bench.events(n),
                        batch,
                        proc.pid,
                        lanes,
                        in_flight,
                    )
                    rates.append(rate)
                rate = statistics.median(rates)
                print(
                    f"{delay * 1000:>8.0f} {batch:>6} {lanes:>5} {in_flight:>9} {n:>7,} "
                    f"{bound:>11,.0f} "
                    f"{rate:>11,.0f} {rate / bound:>8.2f}"
                )
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> int:
    code: int = bench.on_postgres(main_async)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
