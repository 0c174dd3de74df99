"""Shared fixtures: real servers on free loopback ports, estat as a subprocess."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from estat.store.db import Database
from tests.servers import NatsServer, NetnsHost, PostgresServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
            last = e
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"{url} not reachable: {last}")


class MotoServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        if exe is None:
            raise RuntimeError("moto_server is not installed (pip install 'moto[server]')")
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(self.endpoint + "/moto-api/")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    server = MotoServer(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    name = f"estat-{uuid.uuid4().hex[:12]}"
    moto.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


class EstatProcess:
    """``estat serve`` as a real subprocess."""

    def __init__(
        self, workdir: Path, env: dict[str, str], workers: int = 1, args: list[str] | None = None
    ) -> None:
        self.args = args
        self.port = free_port()
        self.admin_port = free_port()
        self.workdir = workdir
        self.env = {
            **os.environ,
            "HTTP_ADDR": f"127.0.0.1:{self.port}",
            "ADMIN_ADDR": f"127.0.0.1:{self.admin_port}",
            "DATA_DIR": str(workdir / "data"),
            "LOG_LEVEL": "info",
            **env,
        }
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"estat-{uuid.uuid4().hex[:6]}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        """The admin listener (/metrics, detailed /ready, the admin API)."""
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, wait: bool = True) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._logf = self.log.open("wb")
        args = self.args or ["serve", "--workers", str(self.workers)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "estat", *args],
            cwd=self.workdir,
            env=self.env,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
        )
        if wait and self.args and self.args[0] != "serve":
            self.wait_log("estat started")
        elif wait:
            wait_http(self.url + "/health", timeout=60)
            if self.workers > 1:
                # every worker must be listening before load is spread
                self.wait_log("estat started", count=self.workers)

    def wait_log(self, text: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.read_text(errors="replace").count(text) >= count:
                return
            time.sleep(0.05)
        raise TimeoutError(f"log never said {text!r} {count} times:\n{self.log.read_text()}")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.admin_url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        return parse_metrics(text)

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(15)
        rc = self.proc.wait(timeout)
        self._logf.close()
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if hasattr(self, "_logf"):
            self._logf.close()


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        out[name] = float(value)
    return out


@pytest.fixture
def estat_factory(tmp_path: Path) -> Iterator[object]:
    procs: list[EstatProcess] = []

    def make(
        env: dict[str, str] | None = None, workers: int = 1, args: list[str] | None = None
    ) -> EstatProcess:
        p = EstatProcess(tmp_path, env or {}, workers, args)
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.kill()


class RedisServer:
    def __init__(self, port: int, workdir: Path, persist: bool = False) -> None:
        """``persist``: every write in an fsynced append-only file, so a
        restart keeps the streams (how a bus Redis must run)."""
        self.persist = persist
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (make test installs it)")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.persist else "no",
                "--appendfsync",
                "always",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test stale compiled modules: a ``.so`` built by
    ``scripts/build_native.py`` shadows its ``.py``, so an edit to the source
    would otherwise go untested until ``make install`` rebuilds it."""
    src = Path(__file__).resolve().parent.parent / "src"
    stale = [
        str(so.relative_to(src))
        for so in src.glob("estat/**/*.so")
        if (py := so.with_name(so.name.split(".", 1)[0] + ".py")).exists()
        and py.stat().st_mtime > so.stat().st_mtime
    ]
    if stale:
        pytest.exit(
            f"compiled modules older than their source: {', '.join(stale)}; run `make install`",
            returncode=2,
        )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer(free_port())
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    """A fresh empty database on the session's PostgreSQL server."""
    return postgres_server.create_database()


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    server = NatsServer(free_port())
    server.start()
    yield server
    server.destroy()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated database on each engine: SQLite in a temp file, a fresh
    database on the session's real PostgreSQL server."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'estat.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    d = Database(url)
    d.upgrade()
    yield d
    d.close()


@pytest.fixture
def far() -> Iterator[tuple[NetnsHost, PostgresServer]]:
    """PostgreSQL on a host of its own (a network namespace), reached at
    ``host.addr``: ``host.partition()`` silences it, ``destroy()`` then
    ``create()`` replaces it (a failover). Needs root and iproute2."""
    host = NetnsHost()
    host.create()
    pg = PostgresServer(free_port(), host)
    try:
        pg.start()
        yield host, pg
    finally:
        host.heal()
        pg.destroy()
        host.destroy()


# Tests that start a real server (PostgreSQL, Redis, NATS, moto's S3): marked
# ``servers`` so that ``make test-fast`` can leave them to ``make test``. A
# test is one when it asks for a server fixture, or when a contract suite's
# parameter names a real implementation.
_SERVER_FIXTURES = frozenset(
    {
        "postgres_server",
        "pg_url",
        "redis_server",
        "nats_server",
        "moto",
        "moto_server",
        "bucket",
        "far",
    }
)
_SERVER_PARAMS = frozenset(
    {"postgresql", "redis-stream", "redis-stream-event", "nats", "redis", "s3"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        params = {str(v) for v in callspec.params.values()} if callspec is not None else set()
        if names & _SERVER_FIXTURES or params & _SERVER_PARAMS:
            item.add_marker(pytest.mark.servers)


@pytest.fixture
def capture() -> Iterator[Any]:
    """A PostHog-compatible capture server (and signed-webhook receiver) on
    a free port (``tests/capture.py``); stopped at the end if still up."""
    from tests.capture import CaptureServer

    c = CaptureServer()
    c.start()
    yield c
    if c.server.started and not c.server.should_exit:
        c.stop()


def losing_lake_env() -> dict[str, str]:
    """estat settings under which every accepted event is lost, counted: an
    S3 lake nobody answers (every upload fails at once) and a DLQ too small
    for any batch (each one dropped), cut every 200 ms."""
    return {
        "RAW_BUCKET": "lake",
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "S3_APP_RETRIES": "0",
        "DLQ_MAX_SIZE_BYTES": "64",
        "FLUSH_INTERVAL": "200ms",
        "MQ_PROVIDER": "none",
    }
