"""CPU instructions per ``POST /collect`` request, counted by valgrind.

Wall-clock figures on this small, shared machine swing by ±30 % from round
to round; instruction counts do not. This feeds the benchmark's request
(same body and headers as ``collect.lua``) to estat's HTTP connection in
process, with a transport that drops the answers, and to the ceiling
server's protocol the same way, so the counts are user-space work only (no
kernel, no lake: the queue is emptied every 1,000 requests).

    python benchmarks/instructions.py            # the modules as installed (compiled by make install)
    python benchmarks/instructions.py --pure     # the same modules as plain Python

Each count is (instructions with N requests - instructions with none) / N,
so start-up and imports cancel out.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
N = 3000
BODY = (HERE / "collect.lua").read_text().split("wrk.body = '")[1].split("'\n")[0].encode()
REQUEST = (
    b"POST /collect HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
    b"User-Agent: Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 "
    b"(KHTML, like Gecko) Chrome/131.0 Safari/537.36\r\n"
    b"Cookie: _ga=GA1.2.1234567890.1732160000; sid=abcdef0123456789\r\n"
    b"X-Forwarded-For: 81.2.69.160, 10.0.0.12\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY)
) + BODY


class _Drop:
    """A transport that takes the answers and drops them."""

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def feed_estat(n: int) -> None:
    from prometheus_client import CollectorRegistry

    from estat.ingest.http import HttpConnection
    from estat.ingest.routes import CollectRoute
    from estat.ingest.server import HttpLimits, HttpServer
    from estat.ops.metrics import Metrics
    from estat.pipeline.queue import EventQueue

    queue = EventQueue(10**9, 10**12)
    route = CollectRoute(queue.put_line, max_body=16384)
    server = HttpServer(
        {b"/collect": route}, limits=HttpLimits(), metrics=Metrics(CollectorRegistry())
    )
    conn = HttpConnection(server)
    conn.transport = _Drop()  # type: ignore[assignment]
    for _ in range(200):  # warm-up: caches of header names and answers
        conn.data_received(REQUEST)
    queue.take(10**9, 10**12)
    for i in range(n):
        conn.data_received(REQUEST)
        if i % 1000 == 999:
            queue.take(10**9, 10**12)
    if n and server.mounts[b"/collect"].counts.get(200, 0) != n + 200:
        raise SystemExit("estat did not answer every request with 200")


def feed_ceiling(n: int) -> None:
    sys.path.insert(0, str(HERE))
    from noop_server import Noop

    conn = Noop()
    conn.transport = _Drop()  # type: ignore[assignment]
    for _ in range(200 + n):
        conn.data_received(REQUEST)


def count(which: str, n: int, env: dict[str, str]) -> int:
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--feed",
            which,
            str(n),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stderr
    m = re.search(r"Collected : (\d+)", out)
    if m is None:
        raise SystemExit(f"no count from valgrind:\n{out}")
    return int(m.group(1))


def per_request(which: str, env: dict[str, str]) -> int:
    count(which, 0, env)  # the first run may write bytecode caches
    return (count(which, N, env) - count(which, 0, env)) // N


def main() -> int:
    if sys.argv[1:2] == ["--feed"]:
        (feed_estat if sys.argv[2] == "estat" else feed_ceiling)(int(sys.argv[3]))
        return 0
    if not shutil.which("valgrind"):
        print("valgrind is not installed (make bench installs it)", file=sys.stderr)
        return 2
    env = dict(os.environ)
    pure = "--pure" in sys.argv[1:]
    tmp = None
    if pure:  # a copy of the sources without the compiled modules
        tmp = Path(tempfile.mkdtemp(prefix="estat-pure-"))
        shutil.copytree(
            ROOT / "src" / "estat", tmp / "estat", ignore=shutil.ignore_patterns("*.so")
        )
        env["PYTHONPATH"] = str(tmp)
    try:
        from estat.ingest.http import http_compiled

        mode = "pure Python" if pure else ("compiled" if http_compiled() else "pure Python")
        ceiling = per_request("ceiling", env)
        estat = per_request("estat", env)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"instructions per POST /collect request ({N:,} requests, valgrind callgrind):")
    print(f"  ceiling (bare httptools protocol): {ceiling:,}")
    print(f"  estat ({mode}): {estat:,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
