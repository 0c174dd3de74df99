"""The lake ``Sink`` seam (``estat.pipeline.uploader.Sink``), one suite run
against every implementation: the in-memory fake the unit tests use, the
local directory and S3 (moto_server over HTTP). A fake that passes this
suite behaves like the real thing where the pipeline relies on it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from estat.codec import decode, encode
from estat.errors import DeliveryError
from estat.lake.sink import local_sink, s3_sink
from tests.conftest import MotoServer, free_port
from tests.fakes import MemorySink

DATA = encode(b'{"a":1}\n{"b":2}\n')
META = {"estat-events": "2"}
KEY = "raw/dt=2026-01-01/hr=00/1_i_000000.jsonl.gz"


@pytest.fixture(params=["memory", "local", "s3"])
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Any, Callable[[str], bytes]]:
    if request.param == "memory":
        mem = MemorySink()
        return mem, lambda key: mem.objects[key]
    if request.param == "local":
        root = tmp_path / "lake"
        return local_sink(root), lambda key: (root / key).read_bytes()
    moto: MotoServer = request.getfixturevalue("moto")
    bucket: str = request.getfixturevalue("bucket")
    client = moto.client()
    return (
        s3_sink(bucket, region="us-east-1", endpoint=moto.endpoint, timeout=3),
        lambda key: client.get_object(Bucket=bucket, Key=key)["Body"].read(),
    )


async def test_put_stores_the_bytes_at_the_key(sink: tuple[Any, Callable[[str], bytes]]) -> None:
    s, read = sink
    await s.put(KEY, DATA, META)
    assert decode(read(KEY)) == [{"a": 1}, {"b": 2}]


async def test_a_retry_overwrites_the_same_key(sink: tuple[Any, Callable[[str], bytes]]) -> None:
    s, read = sink
    await s.put(KEY, DATA, META)
    other = encode(b'{"c":3}\n')
    await s.put(KEY, other, META)
    assert read(KEY) == other


async def test_close_is_safe_and_describes_itself(sink: tuple[Any, Callable[[str], bytes]]) -> None:
    s, _ = sink
    assert isinstance(s.description, str)
    assert s.description
    await s.close()
    await s.close()


@pytest.mark.parametrize("kind", ["memory", "s3"])
async def test_failures_are_delivery_errors_with_a_class(kind: str) -> None:
    if kind == "memory":
        s: Any = MemorySink()
        s.fail(1)
    else:
        s = s3_sink("b", region="us-east-1", endpoint=f"http://127.0.0.1:{free_port()}", timeout=1)
    with pytest.raises(DeliveryError) as e:
        await s.put(KEY, DATA, META)
    assert e.value.error_class
