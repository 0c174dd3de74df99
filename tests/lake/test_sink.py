"""What the local and S3 sinks add to the seam's contract (tests/contracts/test_sink.py)."""

from __future__ import annotations

from pathlib import Path

from estat.codec import encode
from estat.lake.sink import local_sink, s3_sink
from tests.conftest import MotoServer

DATA = encode(b'{"a":1}\n{"b":2}\n')
META = {"estat-events": "2", "estat-first-ts": "1", "estat-last-ts": "2"}


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
