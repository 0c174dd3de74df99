"""The DLQ's policy: spill with capacity and TTL, and replay one file at a time.

``DeadLetterQueue.spill`` is the uploader's ``Spill``: a batch the lake
would not take is written to disk (in a worker thread) and counted in
``dlq_events_enqueued_total``. Capacity (``DLQ_MAX_SIZE_BYTES``) is kept by
evicting the oldest files first; evicted events are lost and counted in
``dlq_events_dropped_total`` with an ERROR line, as is a batch larger than
the whole capacity. Files older than ``DLQ_MAX_AGE`` expire
(``dlq_files_expired_total``, WARN line). A write error (disk full, I/O
error, read-only) is counted, logged as ``local DLQ save failed: …`` and
reported as not saved: the uploader keeps the batch. So is a batch for
which nothing can be evicted (``dlq_spills_refused_total``): eviction reads
one bounded window per round and stops when a round frees nothing, so it
cannot spin.

``replay_one`` takes the oldest file of the oldest bucket (a partial scan), claims it,
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
import contextlib
import hashlib
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
from estat.ops.ledger import Ledger
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
        destination: str = "",
    ) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._clock = clock
        self._m = metrics
        self._executor = executor
        self.quarantine_prefix = quarantine_prefix.strip("/")
        self.attempt_timeout = attempt_timeout
        #: the lake this DLQ's batches are bound for (recorded in every file)
        self.destination = destination
        #: counts what a replay stores in the lake (the completeness ledger)
        self.ledger: Ledger | None = None
        self.files = 0
        self.nbytes = 0
        self.events = 0
        self._resynced_at = 0.0
        self._lock = asyncio.Lock()  # one writer/evictor at a time in this process
        self._candidates: list[Entry] = []  # the rest of the last window, newest first

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
        dropped and counted because it alone exceeds the capacity; False when
        it could not be saved (write error, nothing left to evict): the caller
        keeps it. Never raises (a native library may raise anything: that is
        a write error too)."""
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
            destination=self.destination,
        )
        size = len(batch.data) + 512  # header and metadata are well under 512 bytes
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
            try:
                if not await self._make_room(size):
                    self._m.dlq_spills_refused.inc()
                    log.error(
                        "local DLQ full and nothing can be evicted: batch kept in memory",
                        batchKey=batch.key,
                        events=batch.events,
                        dlqBytes=self.nbytes,
                    )
                    return False
                entry: Entry = await self._run(self.store.write, batch.data, meta, int(now * 1e9))
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # OSError, or anything a failing disk raises
                self._m.dlq_write_errors.inc()
                reason = e.strerror if isinstance(e, OSError) and e.strerror else repr(e)
                log.error(
                    "local DLQ save failed",
                    reason=reason,
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

    async def _make_room(self, size: int) -> bool:
        """Evict the oldest files until ``size`` more bytes fit. False when
        nothing (more) can be evicted: every round reads one bounded window,
        and a round that frees nothing ends the attempt."""
        if self._clock.monotonic() - self._resynced_at > RESYNC_SECONDS:
            await self.resync()
        resynced = False
        while self.nbytes + size > self.max_bytes:
            victims = sorted(await self._run(self.store.window), key=lambda e: e.stem)
            freed = False
            for victim in victims:
                if self.nbytes + size <= self.max_bytes:
                    break
                if await self._run(self.store.delete, victim, False):
                    freed = True
                    self._moved(-1, -victim.events, -victim.nbytes)
                    self._m.dlq_events_dropped.inc(victim.events)
                    log.error(
                        f"DLQ capacity → removed={victim.name}",
                        events=victim.events,
                        bytes=victim.nbytes,
                    )
            if not freed:
                if resynced:
                    return self.nbytes + size <= self.max_bytes
                await self.resync()  # our view may be stale (another process replayed)
                resynced = True
        return True

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
                log.warning(f"DLQ TTL → removed={e.name}", events=e.events)
        return n

    # -- replay ------------------------------------------------------------------------
    async def pick(self) -> Entry | None:
        """The oldest unexpired file of the oldest bucket; expired files met on
        the way are removed. One directory window serves many picks: its
        files are taken oldest first until it is used up (a file gone in the
        meantime only makes its claim fail)."""
        while True:
            if not self._candidates:
                entries: list[Entry] = await self._run(self.store.window)
                if not entries:
                    return None
                self._candidates = sorted(entries, key=lambda e: e.stem, reverse=True)
            entry = self._candidates.pop()
            if entry.created >= self._clock.time() - self.max_age:
                return entry
            await self.expire([entry])

    async def replay_one(self, sink: Sink, *, same_destination: bool = False) -> ReplayResult:
        """Replay the oldest file. ``same_destination`` refuses (raises
        ``WrongDestination``, the file stays) a file recorded as bound for
        another lake than this DLQ's ``destination``."""
        try:
            if self._clock.monotonic() - self._resynced_at > RESYNC_SECONDS:
                await self.resync()
            entry = await self.pick()
        except OSError as e:
            self._m.dlq_replay_failures.inc()
            log.warning("DLQ replay: directory unreadable", error=str(e)[:200])
            return "failed"
        if entry is None:
            return "empty"
        try:
            if not await self._run(self.store.claim, entry):
                return "raced"
        except OSError as e:
            self._m.dlq_replay_failures.inc()
            log.warning("DLQ replay: cannot claim", file=entry.name, error=str(e)[:200])
            return "failed"
        try:
            data, meta = await self._run(self.store.read, entry)
            bound = meta.destination if meta is not None else ""
            if bound and bound != self.destination:
                if same_destination:
                    raise WrongDestination(entry, bound, self.destination)
                log.warning(
                    "DLQ file bound for another lake: replaying it to this one",
                    file=entry.name,
                    boundFor=bound,
                    lake=self.destination,
                )
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
            await self._release(entry)
            self._candidates.append(entry)  # still the oldest: next in line
            self._m.dlq_replay_failures.inc()
            log.debug("DLQ replay failed", file=entry.name, error=str(e).splitlines()[0][:200])
            return "failed"
        except BaseException:
            await self._release(entry)
            raise
        with contextlib.suppress(OSError):  # a leftover claim is released at the next start
            if await self._run(self.store.delete, entry, True):
                self._moved(-1, -entry.events, -entry.nbytes)
        if problem is None:
            self._m.dlq_events_reuploaded.inc(entry.events)
            self._m.lake_last_upload.set(time.time())
            if self.ledger is not None:
                digest = await self._run(lambda: hashlib.sha256(data).hexdigest())
                self.ledger.stored_object(key, entry.events, len(data), digest)
            log.info(
                f"DLQ → RAW success: {key} events={entry.events}", batchKey=key, events=entry.events
            )
            return "ok"
        self._m.dlq_files_quarantined.inc()
        self._m.dlq_events_quarantined.inc(entry.events)
        log.error(
            "DLQ file invalid: quarantined",
            file=entry.name,
            reason=problem,
            quarantineKey=key,
            events=entry.events,
        )
        return "quarantined"

    async def _release(self, entry: Entry) -> None:
        with contextlib.suppress(OSError):  # else released at the next start
            await self._run(self.store.release, entry)


class WrongDestination(Exception):
    """A DLQ file was written for another lake than the one configured now."""

    def __init__(self, entry: Entry, bound: str, current: str) -> None:
        super().__init__(
            f"{entry.name} was bound for {bound}, not {current}; "
            "check RAW_BUCKET / S3_ENDPOINT_URL / LAKE_DIR, or pass --to-current-lake"
        )
        self.entry = entry
        self.bound = bound
        self.current = current
