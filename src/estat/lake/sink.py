"""The object-store sink, over ``obstore`` for both the local directory and S3.

``ObjectStoreSink`` implements the uploader's ``Sink`` seam
(``estat.pipeline.uploader``) for any ``obstore`` store; ``local_sink`` and ``s3_sink`` build the two
that estat supports. Local writes are atomic: the store writes a staging
file next to the target and renames it, so a reader never sees half an
object (staging names contain ``#`` and never end in ``.jsonl.gz``).

SDK-level retries are off (``max_retries=0``): the uploader retries, with
its own budget (``S3_APP_RETRIES``) and deadline, so a slow store never
stretches an attempt past ``S3_TIMEOUT``.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    InvalidPathError,
    NotSupportedError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import LocalStore, S3Store

from estat.errors import DeliveryError, PermanentDeliveryError, RetryableDeliveryError

CONTENT_TYPE = "application/x-ndjson"
CONTENT_ENCODING = "gzip"


class ObjectStoreSink:
    def __init__(self, store: Any, *, description: str, attributes: bool) -> None:
        self._store = store
        self._attributes = attributes
        self.description = description

    async def put(self, key: str, data: bytes, metadata: Mapping[str, str]) -> None:
        attrs: dict[str, str] | None = None
        if self._attributes:
            attrs = {"Content-Type": CONTENT_TYPE, "Content-Encoding": CONTENT_ENCODING}
            attrs.update(metadata)
        try:
            await obstore.put_async(self._store, key, data, attributes=attrs, use_multipart=False)
        except Exception as e:
            raise classify(e) from e

    async def get(self, key: str) -> bytes:
        """Read an object back (operator commands and tests)."""
        result = await obstore.get_async(self._store, key)
        return bytes(await result.bytes_async())

    async def close(self) -> None:
        return None


def local_sink(root: Path) -> ObjectStoreSink:
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    # LocalFileSystem has no per-object attributes; the key and the gzip
    # container say what the object is.
    return ObjectStoreSink(
        LocalStore(str(root), mkdir=True), description=f"file://{root}", attributes=False
    )


def s3_sink(
    bucket: str,
    *,
    region: str | None,
    endpoint: str | None,
    timeout: float,
) -> ObjectStoreSink:
    config: dict[str, Any] = {}
    if region:
        config["region"] = region
    if endpoint:
        config["endpoint"] = endpoint
        config["virtual_hosted_style_request"] = False
    client: dict[str, Any] = {
        "timeout": timedelta(seconds=timeout),
        "connect_timeout": timedelta(seconds=min(timeout, 5.0)),
    }
    if endpoint and endpoint.startswith("http://"):
        client["allow_http"] = True
    store = S3Store(
        bucket,
        client_options=client,  # type: ignore[arg-type]
        retry_config={"max_retries": 0},
        **config,
    )
    where = endpoint.rstrip("/") + "/" + bucket if endpoint else f"s3://{bucket}"
    return ObjectStoreSink(store, description=where, attributes=True)


_STATUS = re.compile(r"status code: (\d{3})")


def classify(exc: BaseException) -> DeliveryError:
    """Map a store error to retryable or permanent, with a low-cardinality class."""
    msg = str(exc)
    if isinstance(exc, PermissionDeniedError):
        return PermanentDeliveryError(msg, error_class="access_denied")
    if isinstance(exc, UnauthenticatedError):
        return PermanentDeliveryError(msg, error_class="unauthenticated")
    if isinstance(exc, InvalidPathError):
        return PermanentDeliveryError(msg, error_class="invalid_key")
    if isinstance(exc, NotSupportedError | AlreadyExistsError | PreconditionError):
        return PermanentDeliveryError(msg, error_class="unsupported")
    if isinstance(exc, FileNotFoundError):
        if "NoSuchBucket" in msg:
            return PermanentDeliveryError(msg, error_class="no_such_bucket")
        if "status code" not in msg:  # local filesystem: directory vanished
            return RetryableDeliveryError(msg, error_class="io_error")
        return PermanentDeliveryError(msg, error_class="not_found")
    if isinstance(exc, TimeoutError):
        return RetryableDeliveryError(msg or "timed out", error_class="timeout")
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return PermanentDeliveryError(msg, error_class="access_denied")
        if exc.errno == errno.ENOSPC:
            return RetryableDeliveryError(msg, error_class="no_space")
        return RetryableDeliveryError(msg, error_class="io_error")
    m = _STATUS.search(msg)
    if m:
        status = int(m.group(1))
        if status in (408, 429) or status >= 500:
            return RetryableDeliveryError(msg, error_class=f"http_{status // 100}xx")
        return PermanentDeliveryError(msg, error_class="http_4xx")
    if "timed out" in msg.lower() or "timeout" in msg.lower():
        return RetryableDeliveryError(msg, error_class="timeout")
    if "No space left" in msg:
        return RetryableDeliveryError(msg, error_class="no_space")
    if "Permission denied" in msg or "Read-only file system" in msg:
        return PermanentDeliveryError(msg, error_class="access_denied")
    return RetryableDeliveryError(msg, error_class="connection")
