"""Every lake error class, produced for real: moto, closed ports, TLS
mismatches, an environment without credentials, S3 error answers, and full
or read-only file systems. The runbook lists exactly these classes."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from estat.codec import encode
from estat.errors import DeliveryError, PermanentDeliveryError
from estat.lake.sink import ERROR_CLASSES, ObjectStoreSink, classify, local_sink, s3_sink
from tests.conftest import MotoServer, free_port

DATA = encode(b'{"a":1}\n')
ROOT = Path(__file__).resolve().parents[2]


class S3ErrorServer:
    """An S3-speaking endpoint that answers every request with one error."""

    def __init__(self) -> None:
        self.status = 500
        self.code = "InternalError"
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{outer.code}</Code>'
                    f"<Message>test</Message></Error>"
                ).encode()
                self.send_response(outer.status)
                self.send_header("content-type", "application/xml")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_PUT = do_GET = do_HEAD = do_POST = _answer

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3_errors() -> Iterator[S3ErrorServer]:
    server = S3ErrorServer()
    yield server
    server.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield s.getsockname()[1]


Mount = Callable[..., Path]


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Mount]:
    """A small tmpfs (optionally read-only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mounted: list[Path] = []

    def mount(name: str, size: str = "64k", ro: bool = False) -> Path:
        where = tmp_path / name
        where.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=True)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def put_error(sink: ObjectStoreSink) -> DeliveryError:
    with pytest.raises(DeliveryError) as e:
        await sink.put("raw/x.jsonl.gz", DATA, {})
    return e.value


def s3(endpoint: str, bucket: str = "b", timeout: float = 1.0) -> ObjectStoreSink:
    return s3_sink(bucket, region="us-east-1", endpoint=endpoint, timeout=timeout)


async def test_no_such_bucket(moto: MotoServer) -> None:
    err = await put_error(s3(moto.endpoint, "estat-missing-bucket"))
    assert err.error_class == "no_such_bucket"
    assert isinstance(err, PermanentDeliveryError)


async def test_connection_refused() -> None:
    err = await put_error(s3(f"http://127.0.0.1:{free_port()}"))
    assert err.error_class == "connection_refused"
    assert err.retryable


async def test_dns() -> None:
    # a 64-character label: the resolver refuses it locally, nothing leaves the machine
    err = await put_error(s3("http://" + "a" * 64 + ".invalid:9000"))
    assert err.error_class == "dns"


async def test_tls_spoken_to_a_plain_http_endpoint(moto: MotoServer) -> None:
    err = await put_error(s3(moto.endpoint.replace("http://", "https://")))
    assert err.error_class == "tls"


async def test_timeout(silent_port: int) -> None:
    err = await put_error(s3(f"http://127.0.0.1:{silent_port}", timeout=0.5))
    assert err.error_class == "timeout"
    assert err.retryable


async def test_no_credentials_anywhere(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    # the instance metadata service is where the SDK looks last: here, a closed local port
    monkeypatch.setenv("AWS_METADATA_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    err = await put_error(s3(moto.endpoint, "estat-any"))
    assert err.error_class == "unauthenticated"
    assert isinstance(err, PermanentDeliveryError)


@pytest.mark.parametrize(
    ("status", "code", "expected", "permanent"),
    [
        (403, "AccessDenied", "access_denied", True),
        (403, "InvalidAccessKeyId", "unauthenticated", True),
        (403, "SignatureDoesNotMatch", "unauthenticated", True),
        (503, "SlowDown", "throttled", False),
        (429, "TooManyRequests", "throttled", False),
        (500, "InternalError", "server_error", False),
        (502, "BadGateway", "server_error", False),
    ],
)
async def test_s3_error_answers(
    s3_errors: S3ErrorServer, status: int, code: str, expected: str, permanent: bool
) -> None:
    s3_errors.status, s3_errors.code = status, code
    err = await put_error(s3(s3_errors.endpoint))
    assert err.error_class == expected
    assert err.retryable is not permanent


async def test_disk_full(mount_tmpfs: Mount) -> None:
    root = mount_tmpfs("full", size="64k")
    sink = local_sink(root)
    with pytest.raises(DeliveryError) as e:
        await sink.put("raw/big.jsonl.gz", os.urandom(256 * 1024), {})
    assert e.value.error_class == "disk_full"
    assert e.value.retryable


async def test_permission(mount_tmpfs: Mount) -> None:
    root = mount_tmpfs("readonly", ro=True)
    err = await put_error(local_sink(root))
    assert err.error_class == "permission"


def test_anything_else_is_internal() -> None:
    class PanicException(BaseException):
        pass

    assert classify(PanicException("called `Result::unwrap()` on an `Err`")).error_class == (
        "internal"
    )


async def test_startup_check_reports_the_same_classes(moto: MotoServer, bucket: str) -> None:
    assert await s3(moto.endpoint, bucket).check("raw", 2.0) is None
    missing = await s3(moto.endpoint, "estat-missing-bucket").check("raw", 2.0)
    assert missing is not None
    assert missing.error_class == "no_such_bucket"
    refused = await s3(f"http://127.0.0.1:{free_port()}").check("raw", 2.0)
    assert refused is not None
    assert refused.error_class == "connection_refused"


def test_the_runbook_lists_exactly_these_classes() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    section = runbook.split("<!-- error-classes -->")[1].split("<!-- /error-classes -->")[0]
    listed = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    assert listed == set(ERROR_CLASSES)
