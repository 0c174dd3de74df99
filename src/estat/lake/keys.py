"""Object key layout: ``<prefix>/dt=YYYY-MM-DD/hr=HH/<unix>_<instance>_<seq>.jsonl.gz``.

A key is made once per batch, when the batch is cut, from the wall-clock
time of the cut in ``PARTITION_TZ``. ``seq`` counts batches per process, so
``(unix, instance, seq)`` never repeats within a process; ``instance`` is
unique per process start (see ``INSTANCE_ID``).
"""

from __future__ import annotations

import itertools
from datetime import datetime
from zoneinfo import ZoneInfo


class KeyMaker:
    __slots__ = ("_instance", "_prefix", "_seq", "_tz")

    def __init__(self, prefix: str, instance: str, tz: str = "UTC", start_seq: int = 0) -> None:
        self._prefix = prefix.strip("/")
        self._instance = instance
        self._tz = ZoneInfo(tz)
        self._seq = itertools.count(start_seq)

    def make(self, epoch_seconds: float) -> str:
        return object_key(self._prefix, epoch_seconds, self._tz, self._instance, next(self._seq))


def object_key(prefix: str, epoch_seconds: float, tz: ZoneInfo, instance: str, seq: int) -> str:
    unix = int(epoch_seconds)
    local = datetime.fromtimestamp(unix, tz)
    return f"{prefix}/dt={local:%Y-%m-%d}/hr={local:%H}/{unix}_{instance}_{seq:06d}.jsonl.gz"
