"""The DLQ layout of earlier versions, converted at start.

Earlier versions kept a batch as two files in ``DLQ_DIR`` itself:
``<stem>.json`` (metadata) and ``<stem>.gz`` (data). ``DiskStore.recover``
finds them and ``migrate_flat`` rewrites each pair as a bucketed ``.dlq``
file: write and commit every new file, fsync their directories, then delete
the pairs. A crash midway can only replay a batch twice, under its own key
(identical bytes).
"""

from __future__ import annotations

import contextlib
import os

import msgspec

from estat.dlq.store import (
    DATA,
    LEGACY_DATA,
    LEGACY_META,
    TMP,
    DiskStore,
    Meta,
    bucket_of,
    fsync_dir,
    parse_stem,
    write_synced,
)


def migrate_flat(store: DiskStore, stems: list[str], metas: set[str]) -> int:
    """Rewrite flat-layout pairs as bucketed ``.dlq`` files (a crash
    midway can only replay a batch twice, under its own key)."""
    done: list[str] = []
    touched: set[str] = set()
    for stem in stems:
        e = parse_stem(stem)
        data_path = store.root / (stem + LEGACY_DATA)
        if e is None:
            continue
        data = data_path.read_bytes()
        meta: Meta | None = None
        if stem in metas:
            with contextlib.suppress(OSError, msgspec.DecodeError, msgspec.ValidationError):
                meta = store.meta_decoder.decode((store.root / (stem + LEGACY_META)).read_bytes())
        # torn metadata: the bytes are kept without a header, and replay
        # quarantines them under DLQ_PREFIX as ``missing_metadata``
        blob = store.encode(data, meta) if meta is not None else data
        bucket = bucket_of(e.created_ns)
        bdir = store.root / bucket
        bdir.mkdir(exist_ok=True)
        new_stem = store.new_stem(e.created_ns, e.events, len(blob))
        tmp = bdir / f"{TMP}{new_stem}{DATA}"
        write_synced(tmp, blob)
        os.rename(tmp, bdir / (new_stem + DATA))
        touched.add(bucket)
        done.append(stem)
    for bucket in touched:
        fsync_dir(store.root / bucket)
    for stem in done:
        with contextlib.suppress(FileNotFoundError):
            (store.root / (stem + LEGACY_DATA)).unlink()
    for stem in metas:
        with contextlib.suppress(FileNotFoundError):
            (store.root / (stem + LEGACY_META)).unlink()
    return len(done)
