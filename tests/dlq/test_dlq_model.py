"""The DLQ as a state machine against a simple model (hypothesis).

Whatever happens (spills, replays with the lake up or down, evictions,
expiries, restarts), every event that went into the DLQ is delivered, still
held on disk, or counted as dropped or expired: never silently gone.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from pathlib import Path

import msgspec
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from prometheus_client import CollectorRegistry

from estat.clock import FakeClock
from estat.codec import decode, encode
from estat.dlq.queue import DeadLetterQueue
from estat.dlq.store import DiskStore
from estat.errors import RetryableDeliveryError
from estat.model import EncodedBatch
from estat.ops.metrics import Metrics
from tests.fakes import MemorySink

ERR = RetryableDeliveryError("down", error_class="connection")


class DLQMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="estat-dlq-model-"))
        self.clock = FakeClock()
        self.sink = MemorySink()
        self.ids = itertools.count()
        self.spilled: set[int] = set()
        self.lost_counted = 0.0  # dropped + expired, over every DLQ instance
        self.keys = itertools.count()
        self._open()

    def _open(self) -> None:
        self.metrics = Metrics(CollectorRegistry())
        self.dlq = DeadLetterQueue(
            DiskStore(self.root),
            max_bytes=6000,
            max_age=100,
            clock=self.clock,
            metrics=self.metrics,
            executor=None,
            quarantine_prefix="raw_dlq",
        )
        asyncio.run(self.dlq.start())

    def _lost_now(self) -> float:
        r = self.metrics.registry
        return (r.get_sample_value("dlq_events_dropped_total") or 0) + (
            r.get_sample_value("dlq_events_expired_total") or 0
        )

    @rule(n=st.integers(1, 20), pad=st.integers(0, 300))
    def spill(self, n: int, pad: int) -> None:
        ids = [next(self.ids) for _ in range(n)]
        data = encode(
            b"".join(
                msgspec.json.encode({"id": i, "p": os.urandom(pad // 2).hex()}) + b"\n" for i in ids
            )
        )
        b = EncodedBatch(f"raw/{next(self.keys)}.jsonl.gz", data, n, 0, 1, 2, {})
        assert asyncio.run(self.dlq.spill(b, ERR, 3))
        self.spilled.update(ids)

    @rule(lake_up=st.booleans())
    def replay(self, lake_up: bool) -> None:
        self.sink.always_fail = None if lake_up else ERR
        result = asyncio.run(self.dlq.replay_one(self.sink))
        # raced: the file picked was gone (evicted or expired since its window was read)
        assert result in ("empty", "ok", "failed", "raced")
        if not lake_up:
            assert result in ("empty", "failed", "raced")

    @rule(seconds=st.sampled_from([1, 30, 150]))
    def advance(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: True)
    @rule()
    def restart(self) -> None:
        self.lost_counted += self._lost_now()
        self._open()

    @invariant()
    def nothing_silently_gone(self) -> None:
        delivered = {r["id"] for d in self.sink.objects.values() for r in decode(d)}
        store = self.dlq.store
        held = {
            r["id"]
            for f in self.root.glob("*/*.dlq")
            for r in decode(store.decode(f.read_bytes())[0])
        }
        assert not delivered & held
        missing = self.spilled - delivered - held
        assert len(missing) == self.lost_counted + self._lost_now()
        assert self.dlq.nbytes <= 6000

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


DLQMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
TestDLQModel = DLQMachine.TestCase
