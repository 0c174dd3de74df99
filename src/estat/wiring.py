"""Builders of the parts ``App`` and the ``estat dlq`` command share: the
lake sink, the DLQ, the rate limiter, from ``Settings``."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from pydantic import SecretStr

from estat.clock import Clock
from estat.dlq.queue import DeadLetterQueue
from estat.dlq.store import DiskStore
from estat.ingest.ratelimit import (
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    SharedRateLimiter,
)
from estat.lake.sink import ObjectStoreSink, local_sink, s3_sink
from estat.ops.metrics import Metrics
from estat.settings import Settings


def build_sink(settings: Settings, *, timeout: float | None = None) -> ObjectStoreSink:
    """``timeout``: of one request, instead of ``S3_TIMEOUT`` (an operator
    command reading whole objects)."""
    if settings.raw_bucket:
        return s3_sink(
            settings.raw_bucket,
            region=settings.aws_region,
            endpoint=settings.s3_endpoint_url,
            timeout=settings.s3_timeout if timeout is None else timeout,
        )
    return local_sink(settings.lake_path)


def build_dlq(
    settings: Settings,
    store: DiskStore,
    clock: Clock,
    metrics: Metrics,
    executor: ThreadPoolExecutor | None,
    destination: str,
) -> DeadLetterQueue:
    """The DLQ over ``store`` with the configured capacity, TTL and quarantine
    prefix; ``destination`` (the lake's description) is recorded in every file."""
    return DeadLetterQueue(
        store,
        max_bytes=settings.dlq_max_size_bytes,
        max_age=settings.dlq_max_age,
        clock=clock,
        metrics=metrics,
        executor=executor,
        quarantine_prefix=settings.dlq_prefix,
        attempt_timeout=settings.s3_timeout,
        destination=destination,
    )


def secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def build_limiter(settings: Settings, clock: Clock, metrics: Metrics) -> RateLimiter:
    """Redis when configured (every replica shares it); else, under
    ``--workers N``, the supervisor's shared limiter (one limit for the
    server); else in-process windows."""
    if settings.rate_limit_redis_url:
        return RedisRateLimiter(
            settings.rate_limit_redis_url.get_secret_value(),
            settings.analytics_rate_limit_max_requests,
            settings.analytics_rate_limit_window,
            metrics,
        )
    shared = os.environ.get("ESTAT_RATE_LIMIT_SOCKET")
    if shared:
        return SharedRateLimiter(shared, metrics)
    return MemoryRateLimiter(
        settings.analytics_rate_limit_max_requests, settings.analytics_rate_limit_window, clock
    )
