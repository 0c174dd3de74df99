"""The DLQ on disk: one gzip JSON Lines file per batch plus its metadata.

Layout, in ``DLQ_DIR``::

    <created_ns>-<events>-<bytes>-<rand>.json   metadata (written first)
    <created_ns>-<events>-<bytes>-<rand>.gz     the batch, exactly the lake object's bytes
    .tmp-...                                    a write in progress
    <...>.gz.claim                              a file being replayed

A write is: metadata to a temp file, fsync, rename; data to a temp file,
fsync, rename (the commit point); fsync the directory. A crash at any step
leaves either nothing, an orphan temp file or an orphan metadata file (both
removed at start), or a committed batch. Replay claims a file by renaming it
(only one process can), uploads it under its original key, then deletes the
data file and then its metadata; a crash leaves a claim that is released at
the next start, so the worst case is uploading the same key twice, which
writes identical bytes.

Names carry the creation time, the event count and the bytes on disk, so
counting the DLQ and choosing the oldest file never read a file. Choosing
reads at most ``SCAN_LIMIT`` directory entries (partial scan): the cost does
not grow with the number of files.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from estat.dlq.faults import crash_point

SCAN_LIMIT = 1000
DATA = ".gz"
META = ".json"
CLAIM = ".gz.claim"
TMP = ".tmp-"


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


@dataclass(frozen=True, slots=True)
class Entry:
    """A committed DLQ file, known from its name alone."""

    stem: str
    created_ns: int
    events: int
    nbytes: int

    @property
    def created(self) -> float:
        return self.created_ns / 1e9


def parse_stem(stem: str) -> Entry | None:
    parts = stem.split("-")
    if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]):
        return None
    return Entry(stem, int(parts[0]), int(parts[1]), int(parts[2]))


class DLQFull(Exception):
    """The batch alone is larger than the DLQ's capacity."""


class DiskStore:
    """Synchronous file operations; callers run them in a worker thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._meta_encoder = msgspec.json.Encoder()
        self._meta_decoder = msgspec.json.Decoder(Meta)

    # -- names ---------------------------------------------------------------
    def _path(self, stem: str, suffix: str) -> Path:
        return self.root / (stem + suffix)

    def new_stem(self, created_ns: int, events: int, nbytes: int) -> str:
        return f"{created_ns:019d}-{events}-{nbytes}-{secrets.token_hex(4)}"

    # -- write ---------------------------------------------------------------
    def write(self, data: bytes, meta: Meta, created_ns: int) -> Entry:
        """Commit one batch atomically; raise OSError on any failure (nothing is left behind)."""
        meta_bytes = self._meta_encoder.encode(meta)
        nbytes = len(data) + len(meta_bytes)
        stem = self.new_stem(created_ns, meta.events, nbytes)
        tmp_meta = self.root / f"{TMP}{stem}{META}"
        tmp_data = self.root / f"{TMP}{stem}{DATA}"
        committed = False
        try:
            _write_synced(tmp_meta, meta_bytes)
            os.rename(tmp_meta, self._path(stem, META))
            crash_point("dlq.after_meta")
            _write_synced(tmp_data, data)
            crash_point("dlq.after_temp_write")
            os.rename(tmp_data, self._path(stem, DATA))
            committed = True
            crash_point("dlq.after_rename")
            _fsync_dir(self.root)
        except OSError:
            if committed:  # only the directory fsync failed: the rename stands
                return Entry(stem, created_ns, meta.events, nbytes)
            for p in (tmp_meta, tmp_data, self._path(stem, META)):
                with contextlib.suppress(OSError):
                    p.unlink()
            raise
        return Entry(stem, created_ns, meta.events, nbytes)

    # -- scan ----------------------------------------------------------------
    def scan(self, limit: int | None = SCAN_LIMIT) -> Iterator[Entry]:
        """Committed files among the first ``limit`` directory entries read."""
        seen = 0
        with os.scandir(self.root) as it:
            for d in it:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                name = d.name
                if name.endswith(DATA) and not name.startswith(TMP):
                    e = parse_stem(name[: -len(DATA)])
                    if e is not None:
                        yield e

    def oldest(self, limit: int = SCAN_LIMIT) -> Entry | None:
        best: Entry | None = None
        for e in self.scan(limit):
            if best is None or e.stem < best.stem:
                best = e
        return best

    def totals(self) -> tuple[int, int, int, float | None]:
        """(files, events, bytes, oldest created) from names only, all entries."""
        files = events = nbytes = 0
        oldest: int | None = None
        for e in self.scan(None):
            files += 1
            events += e.events
            nbytes += e.nbytes
            if oldest is None or e.created_ns < oldest:
                oldest = e.created_ns
        return files, events, nbytes, (oldest / 1e9 if oldest is not None else None)

    # -- replay ----------------------------------------------------------------
    def claim(self, e: Entry) -> bool:
        try:
            os.rename(self._path(e.stem, DATA), self._path(e.stem, CLAIM))
        except FileNotFoundError:
            return False  # another process took it
        return True

    def release(self, e: Entry) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.rename(self._path(e.stem, CLAIM), self._path(e.stem, DATA))

    def read_claimed(self, e: Entry) -> tuple[bytes, Meta | None]:
        data = self._path(e.stem, CLAIM).read_bytes()
        try:
            meta: Meta | None = self._meta_decoder.decode(self._path(e.stem, META).read_bytes())
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            meta = None
        return data, meta

    def delete(self, e: Entry, claimed: bool) -> bool:
        """Delete the data file, then its metadata. False if it was already gone."""
        try:
            self._path(e.stem, CLAIM if claimed else DATA).unlink()
        except FileNotFoundError:
            return False
        crash_point("replay.after_delete_data")
        with contextlib.suppress(FileNotFoundError):
            self._path(e.stem, META).unlink()
        return True

    # -- recovery ----------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """At start: release claims, remove temp files and orphan metadata."""
        out = {"claims_released": 0, "temp_removed": 0, "orphan_meta_removed": 0}
        metas: list[str] = []
        datas: set[str] = set()
        with os.scandir(self.root) as it:
            for d in it:
                n = d.name
                if n.startswith(TMP):
                    with contextlib.suppress(OSError):
                        os.unlink(d.path)
                    out["temp_removed"] += 1
                elif n.endswith(CLAIM):
                    stem = n[: -len(CLAIM)]
                    with contextlib.suppress(OSError):
                        os.rename(d.path, self._path(stem, DATA))
                    datas.add(stem)
                    out["claims_released"] += 1
                elif n.endswith(DATA):
                    datas.add(n[: -len(DATA)])
                elif n.endswith(META):
                    metas.append(n[: -len(META)])
        for stem in metas:
            if stem not in datas:
                with contextlib.suppress(OSError):
                    self._path(stem, META).unlink()
                out["orphan_meta_removed"] += 1
        return out


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
