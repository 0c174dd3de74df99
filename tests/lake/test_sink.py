"""The lake sink contract, against a local directory and a real S3 endpoint (moto_server)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from estat.codec import decode, encode
from estat.errors import PermanentDeliveryError, RetryableDeliveryError
from estat.lake.sink import ObjectStoreSink, local_sink, s3_sink
from tests.conftest import MotoServer, free_port

DATA = encode(b'{"a":1}\n{"b":2}\n')
META = {"estat-events": "2", "estat-first-ts": "1", "estat-last-ts": "2"}


@pytest.fixture(params=["local", "s3"])
def sink_and_reader(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[ObjectStoreSink, Callable[[str], bytes]]:
    if request.param == "local":
        root = tmp_path / "lake"
        return local_sink(root), lambda key: (root / key).read_bytes()
    moto: MotoServer = request.getfixturevalue("moto")
    bucket: str = request.getfixturevalue("bucket")
    client = moto.client()
    sink = s3_sink(bucket, region="us-east-1", endpoint=moto.endpoint, timeout=3)
    return sink, lambda key: client.get_object(Bucket=bucket, Key=key)["Body"].read()


async def test_put_then_read_back(
    sink_and_reader: tuple[ObjectStoreSink, Callable[[str], bytes]],
) -> None:
    sink, read = sink_and_reader
    key = "raw/dt=2026-01-01/hr=00/1_i_000000.jsonl.gz"
    await sink.put(key, DATA, META)
    assert decode(read(key)) == [{"a": 1}, {"b": 2}]
    # a retry with the same key overwrites identical bytes: still one object
    await sink.put(key, DATA, META)
    assert read(key) == DATA


async def test_local_writes_leave_no_partial_files(tmp_path: Path) -> None:
    sink = local_sink(tmp_path / "lake")
    for i in range(20):
        await sink.put(f"raw/dt=2026-01-01/hr=00/{i}_i_000000.jsonl.gz", DATA, META)
    files = [p for p in (tmp_path / "lake").rglob("*") if p.is_file()]
    assert len(files) == 20
    assert all(p.name.endswith(".jsonl.gz") for p in files)


async def test_s3_objects_carry_type_encoding_and_metadata(moto: MotoServer, bucket: str) -> None:
    sink = s3_sink(bucket, region="us-east-1", endpoint=moto.endpoint, timeout=3)
    await sink.put("raw/x.jsonl.gz", DATA, META)
    head = moto.client().head_object(Bucket=bucket, Key="raw/x.jsonl.gz")
    assert head["ContentType"] == "application/x-ndjson"
    assert head["ContentEncoding"] == "gzip"
    assert head["Metadata"]["estat-events"] == "2"


async def test_missing_bucket_is_permanent(moto: MotoServer) -> None:
    sink = s3_sink("no-such-bucket-here", region="us-east-1", endpoint=moto.endpoint, timeout=3)
    with pytest.raises(PermanentDeliveryError) as e:
        await sink.put("raw/x.jsonl.gz", DATA, META)
    assert e.value.error_class == "no_such_bucket"


async def test_unreachable_endpoint_is_retryable() -> None:
    sink = s3_sink("b", region="us-east-1", endpoint=f"http://127.0.0.1:{free_port()}", timeout=1)
    with pytest.raises(RetryableDeliveryError):
        await sink.put("raw/x.jsonl.gz", DATA, META)
