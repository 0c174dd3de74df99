"""Throwaway PostgreSQL and nats-server processes on free loopback ports,
in temporary directories; the fixtures in ``conftest.py`` start and stop them."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _wait_port(
    port: int,
    what: str,
    proc: subprocess.Popen[bytes],
    timeout: float = 30,
    addr: str = "127.0.0.1",
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            with socket.create_connection((addr, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not start")


def libpq(url: str) -> str:
    """A database URL as libpq (psycopg, pg_dump) takes it."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.contextmanager
def table_locked(url: str, table: str) -> Iterator[Any]:
    """Another session holds ``table`` in ACCESS EXCLUSIVE mode (every
    statement on it waits) until the block ends; yields that session."""
    import psycopg

    with psycopg.connect(libpq(url)) as holder:
        holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        yield holder


def pg_bin(name: str) -> str:
    """A PostgreSQL program: from ``ESTAT_TEST_PG_BINDIR`` when set (``make
    test-postgres`` runs the suite on other majors that way), else the
    newest Debian install, else ``PATH``."""
    bindir = os.environ.get("ESTAT_TEST_PG_BINDIR")
    if bindir:
        return str(Path(bindir) / name)
    found = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return found[-1]
    exe = shutil.which(name)
    if exe is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (make test installs it)")
    return exe


class PostgresServer:
    """``initdb`` into a temporary directory, ``pg_ctl start`` on a free port.
    As root, the server runs as the ``postgres`` user (it refuses root)."""

    def __init__(
        self, port: int, host: NetnsHost | None = None, clients: NetnsHost | None = None
    ) -> None:
        """``host``: the server runs there (at its address); ``clients``: it
        runs here and also takes connections from that host (at its gateway)."""
        self.port = port
        self.host = host
        self.clients = clients
        self.addr = host.addr if host is not None else "127.0.0.1"
        self.dir = Path(tempfile.mkdtemp(prefix="estat-pg-"))
        self.data = self.dir / "data"
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.url = f"postgresql://postgres@{self.addr}:{port}/postgres"

    def _run(self, *args: str) -> None:
        cmd, user = list(args), self.user
        if self.host is not None:  # inside the host's namespace (as root), then as postgres
            cmd = ["ip", "netns", "exec", self.host.name, "runuser", "-u", "postgres", "--", *cmd]
            user = None
        # no pipes: the server started by pg_ctl would inherit and hold them
        subprocess.run(
            cmd,
            check=True,
            user=user,
            cwd=self.dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )

    def start(self) -> None:
        if not self.data.exists():
            self._run(
                pg_bin("initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            )
            peer = (
                self.host.gateway
                if self.host is not None
                else self.clients.addr
                if self.clients is not None
                else None
            )
            if peer is not None:  # the client is on the other end of the link
                with (self.data / "pg_hba.conf").open("a") as f:
                    f.write(f"host all all {peer}/32 trust\n")
        self._run(
            pg_bin("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "log"),
            "-w",
            "-o",
            f"-p {self.port} -c listen_addresses={self._listen} -k {self.dir} -c fsync=off -c max_connections=200",
            "start",
        )

    @property
    def _listen(self) -> str:
        extra = f",{self.clients.gateway}" if self.clients is not None else ""
        return f"'{self.addr}{extra}'"

    def restart_immediate(self) -> None:
        """``pg_ctl restart -m immediate``: a crash and a recovery."""
        self._run(
            pg_bin("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "log"),
            "-m",
            "immediate",
            "-w",
            "restart",
        )

    def stop(self, mode: str = "fast") -> None:
        if self.data.exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + "/" + name


class NetnsHost:
    """A host of its own on this machine: a network namespace joined to this
    one by a veth pair, ``addr`` its address. ``partition()`` takes its end
    of the link down: its packets stop, both ways, with no reset and no
    error (a host that froze, a cable pulled, a failover that left the old
    primary unreachable); ``heal()`` brings it back. Needs root and
    iproute2 (``available()``)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"estat-{tag}"
        self.outer, self.inner = f"ve{tag}o", f"ve{tag}i"
        # a /30 of 10.231.0.0/16 of its own: 16,384 to draw from
        block = int(tag[:4], 16) % 16384 * 4
        a, b = divmod(block, 256)
        self.gateway, self.addr = f"10.231.{a}.{b + 1}", f"10.231.{a}.{b + 2}"

    @staticmethod
    def available() -> bool:
        return os.geteuid() == 0 and shutil.which("ip") is not None

    def _ip(self, *args: str, inside: bool = False) -> None:
        cmd = ["ip", "netns", "exec", self.name, "ip", *args] if inside else ["ip", *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)

    def create(self) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=30)
        self._ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        self._ip("link", "set", self.inner, "netns", self.name)
        self._ip("addr", "add", f"{self.gateway}/30", "dev", self.outer)
        self._ip("link", "set", self.outer, "up")
        self._ip("addr", "add", f"{self.addr}/30", "dev", self.inner, inside=True)
        self._ip("link", "set", self.inner, "up", inside=True)
        self._ip("link", "set", "lo", "up", inside=True)

    def partition(self) -> None:
        self._ip("link", "set", self.inner, "down", inside=True)

    def heal(self) -> None:
        self._ip("link", "set", self.inner, "up", inside=True)

    def destroy(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True, timeout=30)


class NatsServer:
    """nats-server with JetStream, its store in a temporary directory."""

    def __init__(self, port: int, host: NetnsHost | None = None) -> None:
        """``host``: the server runs there (at its address)."""
        self.port = port
        self.host = host
        self.addr = host.addr if host is not None else "127.0.0.1"
        self.dir = Path(tempfile.mkdtemp(prefix="estat-nats-"))
        self.url = f"nats://{self.addr}:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not os.path.exists(exe):
            raise RuntimeError("nats-server is not installed (make test installs it)")
        cmd = [exe, "-js", "-a", self.addr, "-p", str(self.port), "-sd", str(self.dir)]
        if self.host is not None:
            cmd = ["ip", "netns", "exec", self.host.name, *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, "nats-server", self.proc, addr=self.addr)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
