"""The in-process listener most HTTP tests use: short deadlines and small
limits, so that timeouts and limits are quick to reach."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ingest.helpers import close_all, start_app


@pytest.fixture
async def app(tmp_path: Path):  # type: ignore[no-untyped-def]
    a = await start_app(
        tmp_path,
        http_header_timeout="1s",
        http_body_timeout="1s",
        http_keepalive_timeout="2s",
        max_body_size=1000,
        http_max_header_size=2048,
    )
    yield a
    await close_all()
    if not a.draining:
        await a.shutdown()
