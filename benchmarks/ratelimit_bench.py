"""The in-memory rate limiter's cost per request with 100,000 live
identities and rotating new ones (anonymous ids that change every request)."""

from __future__ import annotations

import time

from estat.clock import FakeClock
from estat.ingest.ratelimit import MemoryRateLimiter


def main() -> None:
    clock = FakeClock()
    rl = MemoryRateLimiter(120, 60, clock, max_keys=100_000)
    for i in range(100_000):
        rl.hit(f"anonymous:warm-{i}")
    n = 200_000
    t0 = time.perf_counter()
    for i in range(n):
        rl.hit(f"anonymous:new-{i}")
    dt = time.perf_counter() - t0
    print(
        f"memory rate limiter, 100,000 live identities, {n:,} new ones: "
        f"{dt / n * 1e6:.2f} µs per request"
    )


if __name__ == "__main__":
    main()
