"""``make bench``: estat's /collect against a bare uvloop + httptools server,
side by side in one run, each server pinned to core 0 and wrk to core 1.

Prints requests/s and p50/p99 latency per round and the median ratio
estat / ceiling, lake throughput, and peak RSS (with the lake healthy and
with the lake hanging so every queue is full). Figures, not assertions.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
EVENTS_BODY = (HERE / "events.lua").read_text().split("[==[")[1].split("]==]")[0]
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
CONNECTIONS = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} never opened")


def pinned(cpu: int, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if shutil.which("taskset") else cmd


def wrk(url: str, seconds: int = SECONDS, script: str = "collect.lua") -> dict[str, float]:
    out = subprocess.run(
        pinned(
            1,
            [
                "wrk",
                "-t1",
                f"-c{CONNECTIONS}",
                f"-d{seconds}s",
                "--latency",
                "-s",
                str(HERE / script),
                url,
            ],
        ),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        assert m is not None
        v = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
        lat[pct] = v
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    return {
        "rps": rps,
        "requests": float(total.group(1)) if total else rps * seconds,
        "p50_ms": lat["50"],
        "p99_ms": lat["99"],
        "non2xx": float(non2xx.group(1)) if non2xx else 0.0,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, url: str) -> dict[str, float]:
    """A wrk round plus the server's CPU time per request (µs): the machine's
    noise moves requests/s more than it moves the work each request costs."""
    c0 = cpu_seconds(pid)
    m = wrk(url)
    m["cpu_us"] = (cpu_seconds(pid) - c0) / m["requests"] * 1e6
    return m


def rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


#: ingest port -> admin port of the estat processes started here
ADMIN_PORTS: dict[int, int] = {}


def metrics(port: int) -> dict[str, float]:
    """The metrics of the estat listening on ``port`` (from its admin listener)."""
    admin = ADMIN_PORTS[port]
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def start_estat(
    workdir: Path, port: int, extra: dict[str, str], roles: str = "ingest,relay,store"
) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    ADMIN_PORTS[port] = free_port()
    env = {
        **os.environ,
        "HTTP_ADDR": f"127.0.0.1:{port}",
        "ADMIN_ADDR": f"127.0.0.1:{ADMIN_PORTS[port]}",
        "DATA_DIR": str(workdir / "data"),
        "LOG_LEVEL": "warning",
        # static credentials: the S3 client must never look for instance credentials here
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
        **extra,
    }
    proc = subprocess.Popen(
        pinned(0, [PY, "-m", "estat", "serve", "--workers", "1", "--roles", roles]),
        env=env,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def main() -> int:
    if not shutil.which("wrk"):
        print("wrk is not installed (make bench installs it)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="estat-bench-"))
    noop_port, estat_port, down_port = free_port(), free_port(), free_port()
    noop = subprocess.Popen(
        pinned(0, [PY, str(HERE / "noop_server.py"), str(noop_port)]), stdout=subprocess.DEVNULL
    )
    rows: list[tuple[str, dict[str, float]]] = []
    try:
        wait_port(noop_port)
        estat = start_estat(
            work / "healthy",
            estat_port,
            # the lake path alone; benchmarks/pipeline_bench.py measures the bus
            {"ANALYTICS_RATE_LIMIT_MAX_REQUESTS": "1000000000", "MQ_PROVIDER": "none"},
        )
        # warm-up (allocator, caches, first batches), not reported
        wrk(f"http://127.0.0.1:{noop_port}/collect", seconds=2)
        wrk(f"http://127.0.0.1:{estat_port}/collect", seconds=2)
        before = metrics(estat_port)
        t0 = time.monotonic()
        estat_time = 0.0
        for r in range(ROUNDS):
            rows.append(("noop", measured(noop.pid, f"http://127.0.0.1:{noop_port}/collect")))
            t = time.monotonic()
            rows.append(("estat", measured(estat.pid, f"http://127.0.0.1:{estat_port}/collect")))
            estat_time += time.monotonic() - t
            print(
                f"round {r + 1}: noop {rows[-2][1]['rps']:,.0f} req/s, estat {rows[-1][1]['rps']:,.0f} req/s",
                flush=True,
            )
        time.sleep(1.0)
        after = metrics(estat_port)
        events_url = f"http://127.0.0.1:{estat_port}/api/v1/analytics/events"
        wrk(events_url, seconds=2, script="events.lua")
        event_rounds = [wrk(events_url, script="events.lua") for _ in range(ROUNDS)]
        healthy_rss = rss_peak_mb(estat.pid)
        _ = t0
        stop(estat)
    finally:
        noop.terminate()
        noop.wait(10)

    # full queues: the lake hangs (accepts connections, never answers), so
    # uploads stall, every queue fills, and ingest answers 503
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(1024)
    down = start_estat(
        work / "down",
        down_port,
        {
            "RAW_BUCKET": "bench",
            "S3_ENDPOINT_URL": f"http://127.0.0.1:{hole.getsockname()[1]}",
            "S3_TIMEOUT": "120s",
            "SHUTDOWN_TIMEOUT": "2s",
            # keep every batch on its retry budget (no early spill to the DLQ),
            # so that every queue fills: the memory bound under full queues
            "LAKE_FAILURE_THRESHOLD": "1000",
        },
    )
    try:
        full = wrk(f"http://127.0.0.1:{down_port}/collect")
        full_rss = rss_peak_mb(down.pid)
    finally:
        stop(down)
        hole.close()

    noop_rps = [m["rps"] for name, m in rows if name == "noop"]
    estat_rps = [m["rps"] for name, m in rows if name == "estat"]
    ratios = [e / n for n, e in zip(noop_rps, estat_rps, strict=True)]
    noop_cpu = [m["cpu_us"] for name, m in rows if name == "noop"]
    estat_cpu = [m["cpu_us"] for name, m in rows if name == "estat"]
    cpu_ratios = [n / e for n, e in zip(noop_cpu, estat_cpu, strict=True)]
    stored = after.get("s3_events_stored_total", 0) - before.get("s3_events_stored_total", 0)
    gz = after.get("s3_bytes_stored_total", 0) - before.get("s3_bytes_stored_total", 0)
    print()
    print(
        f"POST /collect, ~320-byte JSON body, {CONNECTIONS} keep-alive connections, "
        f"{ROUNDS} rounds of {SECONDS}s, server on core 0, wrk on core 1"
    )
    print()
    print("| server | req/s (median) | req/s per round | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for name, values in (
        ("bare uvloop+httptools (ceiling)", noop_rps),
        ("estat, local lake", estat_rps),
    ):
        key = "noop" if name.startswith("bare") else "estat"
        p50 = statistics.median(m["p50_ms"] for n, m in rows if n == key)
        p99 = statistics.median(m["p99_ms"] for n, m in rows if n == key)
        print(
            f"| {name} | {statistics.median(values):,.0f} | "
            f"{', '.join(f'{v:,.0f}' for v in values)} | {p50:.2f} | {p99:.2f} |"
        )
    print()
    print(
        f"estat / ceiling: median {statistics.median(ratios):.2f} "
        f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    print(
        f"by CPU time per request (ceiling µs / estat µs): median "
        f"{statistics.median(cpu_ratios):.2f} (per round: "
        f"{', '.join(f'{n:.1f}/{e:.1f}' for n, e in zip(noop_cpu, estat_cpu, strict=True))} µs)"
    )
    print(
        f"lake: {stored / estat_time:,.0f} events/s stored during the estat rounds, "
        f"{gz / estat_time / 1e6:.2f} MB/s gzip written"
    )
    ev = [m["rps"] * 50 for m in event_rounds]
    print(
        f"POST /api/v1/analytics/events, 50-event batches ({len(EVENTS_BODY):,} bytes): "
        f"median {statistics.median(ev):,.0f} events/s "
        f"(per round: {', '.join(f'{v:,.0f}' for v in ev)}; "
        f"non-2xx: {sum(m['non2xx'] for m in event_rounds):,.0f}), "
        f"p99 {statistics.median(m['p99_ms'] for m in event_rounds):.2f} ms"
    )
    print(
        f"peak RSS: {healthy_rss:.0f} MB (healthy lake), {full_rss:.0f} MB "
        f"(lake hanging, queues full; {full['non2xx']:,.0f} requests answered 503)"
    )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
