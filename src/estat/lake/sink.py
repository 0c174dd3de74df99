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

import asyncio
import contextlib
import errno
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import obstore
from obstore.exceptions import PermissionDeniedError, UnauthenticatedError
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
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a Rust panic is a BaseException
            raise classify(e) from e

    async def check(self, prefix: str, timeout: float) -> DeliveryError | None:
        """One bounded request that proves the lake answers: list at most one
        key under ``prefix`` (needs s3:ListBucket on S3). None when it does,
        else the classified error. Also builds the client's runtime, so a
        broken environment shows at start rather than on the first upload."""
        try:
            stream = obstore.list(self._store, prefix=prefix.strip("/") + "/", chunk_size=1)
            with contextlib.suppress(StopAsyncIteration):
                await asyncio.wait_for(anext(aiter(stream)), timeout)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            return RetryableDeliveryError(f"no answer within {timeout:g}s", error_class="timeout")
        except BaseException as e:
            return classify(e)
        return None

    async def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (operator commands: one partition hour
        at a time)."""
        try:
            return [
                str(meta["path"])
                async for chunk in obstore.list(self._store, prefix=prefix)
                for meta in chunk
            ]
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a Rust panic is a BaseException
            raise classify(e) from e

    async def get(self, key: str) -> bytes:
        """Read an object back (operator commands and tests)."""
        try:
            result = await obstore.get_async(self._store, key)
            return bytes(await result.bytes_async())
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a Rust panic is a BaseException
            raise classify(e) from e

    async def close(self) -> None:
        return None


class LakeUnusable(Exception):
    """The local lake directory cannot be created (a configuration error)."""


def local_sink(root: Path) -> ObjectStoreSink:
    root = root.resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LakeUnusable(f"the lake directory {root} cannot be created: {e.strerror}") from e
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


_STATUS = re.compile(r"status(?: code:|:) (\d{3})")
_S3_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_UNAUTHENTICATED_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "MissingSecurityHeader",
}
_THROTTLED_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded"}
# what the text of an obstore (Rust) error says, most specific first
_TEXT_CLASSES = (
    # a failed credential lookup is reported as the request it made to the
    # instance metadata service (or the container credentials endpoint)
    (("/latest/api/token", "/latest/meta-data", "169.254.170.2", "credential"), "unauthenticated"),
    (("kind: Timeout", "TimedOut", "operation timed out"), "timeout"),
    (("dns error", "failed to lookup address"), "dns"),
    (
        (
            "InvalidCertificate",
            "InvalidContentType",
            "HandshakeFailure",
            "CorruptMessage",
            "certificate",
            "tls handshake",
        ),
        "tls",
    ),
    (
        ("ConnectionRefused", "ConnectionReset", "ConnectionAborted", "BrokenPipe"),
        "connection_refused",
    ),
    (("StorageFull", "No space left", "QuotaExceeded"), "disk_full"),
    (("ReadOnlyFilesystem", "Read-only file system", "Permission denied"), "permission"),
)
#: every class ``classify`` can return (the runbook lists exactly these)
ERROR_CLASSES = (
    "connection_refused",
    "dns",
    "tls",
    "timeout",
    "unauthenticated",
    "access_denied",
    "no_such_bucket",
    "throttled",
    "server_error",
    "disk_full",
    "permission",
    "internal",
)
_PERMANENT = {"unauthenticated", "access_denied", "no_such_bucket", "permission"}


def _error(cls: str, msg: str) -> DeliveryError:
    if cls in _PERMANENT:
        return PermanentDeliveryError(msg, error_class=cls)
    return RetryableDeliveryError(msg, error_class=cls)


def classify(exc: BaseException) -> DeliveryError:
    """Map a store error to retryable or permanent, with a low-cardinality class
    (one of ``ERROR_CLASSES``). Permanent classes need an operator (credentials,
    permissions, a bucket); the DLQ holds the data meanwhile."""
    msg = str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return _error("disk_full", msg)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return _error("permission", msg)
        if exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE):
            return _error("connection_refused", msg)
    if isinstance(exc, TimeoutError):
        return _error("timeout", msg or "timed out")
    code = _S3_CODE.search(msg)
    s3_code = code.group(1) if code else ""
    if s3_code == "NoSuchBucket":
        return _error("no_such_bucket", msg)
    if s3_code in _UNAUTHENTICATED_CODES or isinstance(exc, UnauthenticatedError):
        return _error("unauthenticated", msg)
    if s3_code in _THROTTLED_CODES:
        return _error("throttled", msg)
    if s3_code == "AccessDenied" or isinstance(exc, PermissionDeniedError):
        return _error("access_denied", msg)
    m = _STATUS.search(msg)
    if m:
        status = int(m.group(1))
        if status == 401:
            return _error("unauthenticated", msg)
        if status == 403:
            return _error("access_denied", msg)
        if status == 429:
            return _error("throttled", msg)
        if status == 408:
            return _error("timeout", msg)
        if status >= 500:
            return _error("server_error", msg)
        return PermanentDeliveryError(
            msg, error_class="internal"
        )  # another 4xx: a request estat got wrong
    for needles, cls in _TEXT_CLASSES:
        if any(n in msg for n in needles):
            return _error(cls, msg)
    return _error("internal", msg or type(exc).__name__)
