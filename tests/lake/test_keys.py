from __future__ import annotations

import re
from datetime import datetime
from zoneinfo import ZoneInfo

from estat.lake.keys import KeyMaker

KEY = re.compile(r"^raw/dt=\d{4}-\d{2}-\d{2}/hr=\d{2}/\d+_[A-Za-z0-9.-]+_\d{6}\.jsonl\.gz$")


def test_layout_and_sequence() -> None:
    km = KeyMaker("raw", "host-abc", "UTC")
    t = datetime(2026, 3, 1, 23, 59, 59, tzinfo=ZoneInfo("UTC")).timestamp()
    k1, k2 = km.make(t), km.make(t)
    assert k1 == f"raw/dt=2026-03-01/hr=23/{int(t)}_host-abc_000000.jsonl.gz"
    assert k2.endswith("_000001.jsonl.gz")
    assert KEY.match(k1)


def test_partition_time_zone() -> None:
    # 2026-03-01 16:30 UTC is 2026-03-02 01:30 in Seoul
    t = datetime(2026, 3, 1, 16, 30, tzinfo=ZoneInfo("UTC")).timestamp()
    assert KeyMaker("raw", "i", "Asia/Seoul").make(t).startswith("raw/dt=2026-03-02/hr=01/")
    assert KeyMaker("raw/", "i", "UTC").make(t).startswith("raw/dt=2026-03-01/hr=16/")
