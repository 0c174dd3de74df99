"""The DLQ on disk: one file per batch, in time-bucketed subdirectories.

Layout, in ``DLQ_DIR``::

    <bucket>/                                   one directory per UTC minute of creation,
                                                named YYYYMMDDTHHMM (they sort by time)
    <bucket>/<created_ns>-<events>-<bytes>-<rand>.dlq          a committed batch
    <bucket>/.tmp-<...>.dlq                     a write in progress
    <bucket>/<...>.dlq.claim                    a file being replayed

A ``.dlq`` file is ``ESTATDLQ1\\n``, one line of JSON metadata (``Meta``:
the object key, the destination it was bound for, counts, the error), then
exactly the lake object's gzip bytes. Data and metadata in one file means
one atomic rename commits a batch, and every committed name read by a scan
is a candidate (a window can never fill up with metadata names).

A write is: the file to a temp name, fsync, rename (the commit point),
fsync the bucket directory. A crash leaves either nothing, a temp file
(removed at start) or a committed batch. Replay claims a file by renaming
it (only one process can), uploads it under its original key, then deletes
it; a crash leaves a claim that is released at the next start, so the worst
case is uploading the same key twice, which writes identical bytes.

Names carry the creation time, the event count and the bytes on disk, so
counting the DLQ and choosing the oldest file never open a file. Choosing
lists the bucket names (at most one per minute of the TTL, cached until
the top directory changes), then reads the oldest bucket until it has seen
``SCAN_LIMIT`` entries with at least one candidate among them: the cost does
not grow with the number of files, and empty buckets are removed as they
are met. Totals are kept per bucket and re-read only for buckets whose
directory changed, so a resync with a million files costs a few ``stat``
calls.

The flat layout of earlier versions (``<stem>.gz`` + ``<stem>.json`` in
``DLQ_DIR`` itself) is migrated into buckets at start.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from estat.dlq.faults import crash_point

SCAN_LIMIT = 1000
MAGIC = b"ESTATDLQ1\n"
DATA = ".dlq"
CLAIM = ".dlq.claim"
TMP = ".tmp-"
LEGACY_DATA = ".gz"  # the flat layout of earlier versions: see estat.dlq.legacy
LEGACY_META = ".json"
LEGACY_CLAIM = ".gz.claim"
_BUCKET = re.compile(r"^\d{8}T\d{4}$")
#: a bucket directory changed less than this long ago is always re-read
#: (directory mtimes are coarser than the writes that move them)
MTIME_SLACK_NS = 2_000_000_000


class Meta(msgspec.Struct):
    """What a DLQ file is: where it belongs and why it is here."""

    key: str
    events: int
    first_ts: int
    last_ts: int
    attempts: int
    error_class: str
    instance: str
    created: float  # wall clock, seconds
    destination: str = ""  # the lake it was bound for ("" in files of earlier versions)


@dataclass(frozen=True, slots=True)
class Entry:
    """A committed DLQ file, known from its name alone."""

    bucket: str
    stem: str
    created_ns: int
    events: int
    nbytes: int

    @property
    def created(self) -> float:
        return self.created_ns / 1e9

    @property
    def name(self) -> str:
        return f"{self.bucket}/{self.stem}{DATA}"


def parse_stem(stem: str, bucket: str = "") -> Entry | None:
    parts = stem.split("-")
    if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]):
        return None
    return Entry(bucket, stem, int(parts[0]), int(parts[1]), int(parts[2]))


def bucket_of(created_ns: int) -> str:
    return time.strftime("%Y%m%dT%H%M", time.gmtime(created_ns // 1_000_000_000))


@dataclass(slots=True)
class _Tally:
    mtime_ns: int
    files: int
    events: int
    nbytes: int
    oldest_ns: int | None


class DiskStore:
    """Synchronous file operations; callers run them in a worker thread.

    Nothing is created until the first write (``create=True`` makes the
    top directory at once, as the server does at start). Every method
    raises ``OSError`` when the directory cannot be read or written; the
    caller decides what that means.
    """

    def __init__(self, root: Path, *, create: bool = True) -> None:
        self.root = root
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        self._meta_encoder = msgspec.json.Encoder()
        self.meta_decoder = msgspec.json.Decoder(Meta)
        #: directory entries a pick reads once it has a candidate (partial scan)
        self.scan_limit = SCAN_LIMIT
        self._buckets: list[str] = []
        self._buckets_mtime = -1
        self._tallies: dict[str, _Tally] = {}

    def exists(self) -> bool:
        return self.root.is_dir()

    # -- names ---------------------------------------------------------------
    def _path(self, bucket: str, stem: str, suffix: str) -> Path:
        return self.root / bucket / (stem + suffix)

    def new_stem(self, created_ns: int, events: int, nbytes: int) -> str:
        return f"{created_ns:019d}-{events}-{nbytes}-{secrets.token_hex(4)}"

    def encode(self, data: bytes, meta: Meta) -> bytes:
        return MAGIC + self._meta_encoder.encode(meta) + b"\n" + data

    def decode(self, blob: bytes) -> tuple[bytes, Meta | None]:
        """Split a ``.dlq`` file into the object bytes and its metadata (None if unreadable)."""
        if not blob.startswith(MAGIC):
            return blob, None
        end = blob.find(b"\n", len(MAGIC))
        if end < 0:
            return b"", None
        try:
            meta: Meta | None = self.meta_decoder.decode(blob[len(MAGIC) : end])
        except (msgspec.DecodeError, msgspec.ValidationError):
            meta = None
        return blob[end + 1 :], meta

    # -- write ---------------------------------------------------------------
    def write(self, data: bytes, meta: Meta, created_ns: int) -> Entry:
        """Commit one batch atomically; raise OSError on any failure (nothing is left behind)."""
        blob = self.encode(data, meta)
        bucket = bucket_of(created_ns)
        stem = self.new_stem(created_ns, meta.events, len(blob))
        bdir = self.root / bucket
        tmp = bdir / f"{TMP}{stem}{DATA}"
        committed = False
        try:
            try:
                write_synced(tmp, blob)
            except FileNotFoundError:
                # a new bucket (the top directory itself is never created
                # here: a DLQ_DIR that vanished must fail, not be re-made)
                with contextlib.suppress(FileExistsError):
                    bdir.mkdir()
                write_synced(tmp, blob)
            crash_point("dlq.after_temp_write")
            os.rename(tmp, self._path(bucket, stem, DATA))
            committed = True
            crash_point("dlq.after_rename")
            fsync_dir(bdir)
        except OSError:
            if committed:  # only the directory fsync failed: the rename stands
                return Entry(bucket, stem, created_ns, meta.events, len(blob))
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return Entry(bucket, stem, created_ns, meta.events, len(blob))

    # -- buckets ----------------------------------------------------------------
    def buckets(self) -> list[str]:
        """Bucket names, oldest first; re-listed only when the top directory changed."""
        st = os.stat(self.root)
        if st.st_mtime_ns != self._buckets_mtime or _recent(st.st_mtime_ns):
            with os.scandir(self.root) as it:
                names = sorted(d.name for d in it if _BUCKET.match(d.name))
            self._buckets = names
            self._buckets_mtime = st.st_mtime_ns
        return self._buckets

    def _drop_bucket(self, bucket: str) -> None:
        """Remove an empty bucket that no writer uses any more."""
        if bucket >= bucket_of(time.time_ns() - 120_000_000_000):
            return  # this minute's (or the last two minutes') bucket: a writer may be about to use it
        with contextlib.suppress(OSError):
            os.rmdir(self.root / bucket)  # fails unless empty
        self._tallies.pop(bucket, None)

    # -- scan ----------------------------------------------------------------
    def _scan_bucket(self, bucket: str, limit: int | None) -> Iterator[Entry]:
        seen = 0
        found = False
        with os.scandir(self.root / bucket) as it:
            for d in it:
                if limit is not None and seen >= limit and found:
                    return
                seen += 1
                name = d.name
                if name.endswith(DATA) and not name.startswith(TMP):
                    e = parse_stem(name[: -len(DATA)], bucket)
                    if e is not None:
                        found = True
                        yield e

    def window(self, limit: int | None = None) -> list[Entry]:
        """Committed files of the oldest bucket that has any, reading at most
        ``limit`` entries once one is found (partial scan). Empty buckets met
        on the way are removed."""
        limit = self.scan_limit if limit is None else limit
        for bucket in list(self.buckets()):
            try:
                entries = list(self._scan_bucket(bucket, limit))
            except FileNotFoundError:
                continue  # removed under us
            if entries:
                return entries
            self._drop_bucket(bucket)
        return []

    def oldest(self, limit: int | None = None) -> Entry | None:
        entries = self.window(limit)
        return min(entries, key=lambda e: e.stem) if entries else None

    def scan(self, limit: int | None = None) -> Iterator[Entry]:
        """Every committed file, bucket by bucket (oldest bucket first); ``limit``
        bounds the entries read per bucket."""
        for bucket in list(self.buckets()):
            with contextlib.suppress(FileNotFoundError):
                yield from self._scan_bucket(bucket, limit)

    def ordered(self) -> Iterator[Entry]:
        """Every committed file, oldest first (one bucket in memory at a time)."""
        for bucket in list(self.buckets()):
            with contextlib.suppress(FileNotFoundError):
                yield from sorted(self._scan_bucket(bucket, None), key=lambda e: e.stem)

    def totals(self) -> tuple[int, int, int, float | None]:
        """(files, events, bytes, oldest created) from names only.

        Buckets whose directory has not changed since the last call are not
        re-read."""
        files = events = nbytes = 0
        oldest: int | None = None
        live = set()
        for bucket in self.buckets():
            try:
                st = os.stat(self.root / bucket)
            except FileNotFoundError:
                continue
            live.add(bucket)
            t = self._tallies.get(bucket)
            if t is None or t.mtime_ns != st.st_mtime_ns or _recent(st.st_mtime_ns):
                t = _Tally(st.st_mtime_ns, 0, 0, 0, None)
                with contextlib.suppress(FileNotFoundError):
                    for e in self._scan_bucket(bucket, None):
                        t.files += 1
                        t.events += e.events
                        t.nbytes += e.nbytes
                        if t.oldest_ns is None or e.created_ns < t.oldest_ns:
                            t.oldest_ns = e.created_ns
                self._tallies[bucket] = t
            files += t.files
            events += t.events
            nbytes += t.nbytes
            if t.oldest_ns is not None and (oldest is None or t.oldest_ns < oldest):
                oldest = t.oldest_ns
        for gone in set(self._tallies) - live:
            del self._tallies[gone]
        return files, events, nbytes, (oldest / 1e9 if oldest is not None else None)

    # -- replay ----------------------------------------------------------------
    def claim(self, e: Entry) -> bool:
        try:
            os.rename(self._path(e.bucket, e.stem, DATA), self._path(e.bucket, e.stem, CLAIM))
        except FileNotFoundError:
            return False  # another process took it
        return True

    def release(self, e: Entry) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.rename(self._path(e.bucket, e.stem, CLAIM), self._path(e.bucket, e.stem, DATA))

    def read(self, e: Entry, claimed: bool = True) -> tuple[bytes, Meta | None]:
        return self.decode(self._path(e.bucket, e.stem, CLAIM if claimed else DATA).read_bytes())

    def delete(self, e: Entry, claimed: bool) -> bool:
        """Delete a file. False if it was already gone."""
        try:
            self._path(e.bucket, e.stem, CLAIM if claimed else DATA).unlink()
        except FileNotFoundError:
            return False
        crash_point("replay.after_delete_data")
        return True

    # -- recovery ----------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """At start: release claims, remove temp files, migrate the flat layout."""
        out = {"claims_released": 0, "temp_removed": 0, "legacy_migrated": 0}
        legacy: list[str] = []
        legacy_meta: set[str] = set()
        with os.scandir(self.root) as it:
            for d in it:
                n = d.name
                if _BUCKET.match(n):
                    self._recover_bucket(n, out)
                elif n.startswith(TMP):
                    with contextlib.suppress(OSError):
                        os.unlink(d.path)
                    out["temp_removed"] += 1
                elif n.endswith(LEGACY_CLAIM):
                    stem = n[: -len(LEGACY_CLAIM)]
                    os.rename(d.path, self.root / (stem + LEGACY_DATA))
                    legacy.append(stem)
                    out["claims_released"] += 1
                elif n.endswith(LEGACY_DATA):
                    legacy.append(n[: -len(LEGACY_DATA)])
                elif n.endswith(LEGACY_META):
                    legacy_meta.add(n[: -len(LEGACY_META)])
        from estat.dlq.legacy import migrate_flat  # the flat layout of earlier versions

        out["legacy_migrated"] = migrate_flat(self, legacy, legacy_meta)
        return out

    def _recover_bucket(self, bucket: str, out: dict[str, int]) -> None:
        bdir = self.root / bucket
        with os.scandir(bdir) as it:
            for d in it:
                n = d.name
                if n.startswith(TMP):
                    with contextlib.suppress(OSError):
                        os.unlink(d.path)
                    out["temp_removed"] += 1
                elif n.endswith(CLAIM):
                    with contextlib.suppress(OSError):
                        os.rename(d.path, bdir / (n[: -len(CLAIM)] + DATA))
                    out["claims_released"] += 1


def _recent(mtime_ns: int) -> bool:
    return time.time_ns() - mtime_ns < MTIME_SLACK_NS


def write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
