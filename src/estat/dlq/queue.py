"""The DLQ's policy: spill with capacity and TTL, and replay one file at a time.

``DeadLetterQueue.spill`` is the uploader's ``Spill``: a batch the lake
would not take is written to disk (in a worker thread) and counted in
``dlq_events_enqueued_total``. Capacity (``DLQ_MAX_SIZE_BYTES``) is kept by
evicting the oldest files first; evicted events are lost and counted in
``dlq_events_dropped_total`` with an ERROR line, as is a batch larger than
the whole capacity. Files older than ``DLQ_MAX_AGE`` expire
(``dlq_files_expired_total``, WARN line). A write error (disk full, I/O
error, read-only) is counted, logged as ``local DLQ save failed: …`` and
reported as not saved: the uploader keeps the batch.

``replay_one`` takes the oldest file among a partial scan, claims it,
validates the whole file (gzip CRC, every line JSON) and uploads it under
its original key; an invalid file is uploaded under ``DLQ_PREFIX``
(quarantine). The file is deleted only after its upload succeeded.

The byte and file totals are this process's view: read from the names at
start, moved by its own writes and deletes, and re-read from the names
every ``RESYNC_SECONDS`` so that other workers and ``estat dlq`` commands
sharing the directory are reflected.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any, Literal, Protocol, TypeVar

from estat.clock import Clock
from estat.codec import CodecError, decode
from estat.dlq.faults import crash_point
from estat.dlq.store import DiskStore, Entry, Meta
from estat.errors import DeliveryError
from estat.model import EncodedBatch
from estat.ops.logging import get_logger
from estat.ops.metrics import Metrics

log = get_logger("estat.dlq")

RESYNC_SECONDS = 10.0
T = TypeVar("T")
ReplayResult = Literal["empty", "ok", "quarantined", "failed", "raced"]


class Sink(Protocol):
    """Where replayed files go (the lake); see ``estat.pipeline.uploader.Sink``."""

    async def put(self, key: str, data: bytes, metadata: Mapping[str, str]) -> None: ...


class DeadLetterQueue:
    def __init__(
        self,
        store: DiskStore,
        *,
        max_bytes: int,
        max_age: float,
        clock: Clock,
        metrics: Metrics,
        executor: Executor | None,
        quarantine_prefix: str,
        attempt_timeout: float = 3.0,
    ) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._clock = clock
        self._m = metrics
        self._executor = executor
        self.quarantine_prefix = quarantine_prefix.strip("/")
        self.attempt_timeout = attempt_timeout
        self.files = 0
        self.nbytes = 0
        self.events = 0
        self._resynced_at = 0.0
        self._lock = asyncio.Lock()  # one writer/evictor at a time in this process

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> dict[str, int]:
        """Recover after a restart and rebuild the gauges from the file names."""
        t0 = time.perf_counter()
        out: dict[str, int] = await self._run(self.store.recover)
        await self.resync()
        log.info(
            "DLQ ready",
            dir=str(self.store.root),
            files=self.files,
            events=self.events,
            bytes=self.nbytes,
            durationMs=round((time.perf_counter() - t0) * 1000, 1),
            **out,
        )
        return out

    async def resync(self) -> None:
        files, events, nbytes, _ = await self._run(self.store.totals)
        self.files, self.events, self.nbytes = files, events, nbytes
        self._resynced_at = self._clock.monotonic()
        self._publish()

    def _publish(self) -> None:
        self._m.dlq_files_current.set(self.files)
        self._m.dlq_size_bytes.set(self.nbytes)

    def _moved(self, files: int, events: int, nbytes: int) -> None:
        self.files = max(0, self.files + files)
        self.events = max(0, self.events + events)
        self.nbytes = max(0, self.nbytes + nbytes)
        self._publish()

    # -- spill -------------------------------------------------------------------
    async def spill(self, batch: EncodedBatch, error: DeliveryError, attempts: int) -> bool:
        """Save a batch the lake would not take. True once it is saved, or
        dropped and counted because it alone exceeds the capacity."""
        now = self._clock.time()
        meta = Meta(
            key=batch.key,
            events=batch.events,
            first_ts=batch.first_ts,
            last_ts=batch.last_ts,
            attempts=attempts,
            error_class=error.error_class,
            instance=batch.metadata.get("estat-instance", ""),
            created=now,
        )
        size = len(batch.data) + 512  # metadata is well under 512 bytes
        async with self._lock:
            if size > self.max_bytes:
                self._m.dlq_events_dropped.inc(batch.events)
                log.error(
                    "DLQ capacity: batch larger than DLQ_MAX_SIZE_BYTES dropped",
                    batchKey=batch.key,
                    events=batch.events,
                    bytes=len(batch.data),
                )
                return True
            await self._make_room(size)
            try:
                entry: Entry = await self._run(self.store.write, batch.data, meta, int(now * 1e9))
            except OSError as e:
                self._m.dlq_write_errors.inc()
                log.error(
                    f"local DLQ save failed: {e.strerror or e}",
                    batchKey=batch.key,
                    events=batch.events,
                )
                return False
        self._moved(1, entry.events, entry.nbytes)
        self._m.dlq_events_enqueued.inc(batch.events)
        log.warning(
            "batch saved to local DLQ",
            batchKey=batch.key,
            events=batch.events,
            errorClass=error.error_class,
            attempts=attempts,
        )
        return True

    async def _make_room(self, size: int) -> None:
        if self._clock.monotonic() - self._resynced_at > RESYNC_SECONDS:
            await self.resync()
        while self.files and self.nbytes + size > self.max_bytes:
            victim = await self._run(self.store.oldest)
            if victim is None:
                await self.resync()
                if not self.files:
                    return
                continue
            if await self._run(self.store.delete, victim, False):
                self._moved(-1, -victim.events, -victim.nbytes)
                self._m.dlq_events_dropped.inc(victim.events)
                log.error(
                    f"DLQ capacity → removed={victim.stem}.gz",
                    events=victim.events,
                    bytes=victim.nbytes,
                )

    # -- TTL -------------------------------------------------------------------------
    async def expire(self, entries: list[Entry]) -> int:
        cutoff = self._clock.time() - self.max_age
        n = 0
        for e in entries:
            if e.created < cutoff and await self._run(self.store.delete, e, False):
                n += 1
                self._moved(-1, -e.events, -e.nbytes)
                self._m.dlq_files_expired.inc()
                self._m.dlq_events_expired.inc(e.events)
                log.warning(f"DLQ TTL → removed={e.stem}.gz", events=e.events)
        return n

    # -- replay ------------------------------------------------------------------------
    async def pick(self) -> Entry | None:
        """The oldest unexpired file among a partial scan; expired ones are removed."""
        entries: list[Entry] = await self._run(lambda: list(self.store.scan()))
        if not entries:
            return None
        await self.expire(entries)
        cutoff = self._clock.time() - self.max_age
        live = [e for e in entries if e.created >= cutoff]
        return min(live, key=lambda e: e.stem) if live else None

    async def replay_one(self, sink: Sink, *, dry_run: bool = False) -> ReplayResult:
        if self._clock.monotonic() - self._resynced_at > RESYNC_SECONDS:
            await self.resync()
        entry = await self.pick()
        if entry is None:
            return "empty"
        if dry_run:
            return "ok"
        if not await self._run(self.store.claim, entry):
            return "raced"
        try:
            data, meta = await self._run(self.store.read_claimed, entry)
            problem = None if meta is not None else "missing_metadata"
            if problem is None:
                try:
                    await self._run(decode, data)
                except CodecError as e:
                    problem = e.reason
            if problem is None:
                assert meta is not None
                key = meta.key
                attrs = {"estat-events": str(meta.events), "estat-replayed": "1"}
            else:
                key = f"{self.quarantine_prefix}/{meta.key if meta else entry.stem + '.jsonl.gz'}"
                attrs = {"estat-quarantine-reason": problem}
            await asyncio.wait_for(sink.put(key, data, attrs), self.attempt_timeout)
            crash_point("replay.after_upload")
        except (DeliveryError, TimeoutError, OSError) as e:
            await self._run(self.store.release, entry)
            self._m.dlq_replay_failures.inc()
            log.debug("DLQ replay failed", file=entry.stem, error=str(e).splitlines()[0][:200])
            return "failed"
        except BaseException:
            await self._run(self.store.release, entry)
            raise
        if await self._run(self.store.delete, entry, True):
            self._moved(-1, -entry.events, -entry.nbytes)
        if problem is None:
            self._m.dlq_events_reuploaded.inc(entry.events)
            log.info(
                f"DLQ → RAW success: {key} events={entry.events}", batchKey=key, events=entry.events
            )
            return "ok"
        self._m.dlq_files_quarantined.inc()
        self._m.dlq_events_quarantined.inc(entry.events)
        log.error(
            "DLQ file invalid: quarantined",
            file=entry.stem,
            reason=problem,
            quarantineKey=key,
            events=entry.events,
        )
        return "quarantined"
