"""The shapes of the admin API's answers, its refusals and its time
parameters (pydantic models: the OpenAPI document is generated from them)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Request
from pydantic import BaseModel, BeforeValidator


class ErrorBody(BaseModel):
    code: str
    message: str


class OutboxSummary(BaseModel):
    pendingCount: int
    failedCount: int
    publishedCount: int
    maxRetryCount: int
    # true: the exact count overran SUMMARY_BUDGET; publishedCount is
    # PostgreSQL's estimate, maxRetryCount that of the rows still to publish
    publishedCountEstimated: bool = False


class ReplayResult(BaseModel):
    processedCount: int
    successCount: int
    failedCount: int
    dryRun: bool = False


class DispatchTargetSummary(BaseModel):
    target: str
    pendingCount: int
    failedCount: int  # waiting for their next retry
    parkedCount: int  # FAILED with no next retry: replay them
    dispatchedCount: int
    maxRetryCount: int
    oldestDueAt: datetime | None  # created_at of the oldest row due now
    # true: the exact count overran SUMMARY_BUDGET; dispatchedCount is
    # PostgreSQL's estimate, maxRetryCount that of the rows still to send
    dispatchedCountEstimated: bool = False


class DispatchReplayResult(BaseModel):
    replayedCount: int
    target: str | None
    dryRun: bool = False
    lastId: int | None = None  # the highest row id taken: the next call's afterId


class DispatchDiscardResult(BaseModel):
    discardedCount: int
    target: str
    dryRun: bool = False


class CircuitView(BaseModel):
    target: str
    state: str  # closed, open, half_open
    failures: int  # consecutive failed batches while closed
    openForSeconds: float  # the open time of the next opening (doubles after a failed probe)
    retryInSeconds: float  # until the next probe (0 when closed)
    configured: bool  # in DISPATCH_TARGETS of this process


class CompletenessHour(BaseModel):
    dataset: str  # a lake prefix (raw, events), or user-activity (the event store)
    hour: datetime  # the partition hour's start
    accepted: int  # taken into batches bound for the hour's partition
    lake: int  # stored in the lake (live uploads and DLQ replays)
    stored: int  # user-activity: new events stored in the hour
    dispatched: dict[str, int]  # user-activity: of those, delivered per destination
    closed: bool  # the hour and COMPLETENESS_GRACE have passed
    complete: bool  # closed, and every accepted event is in the lake
    gap: int  # closed: accepted and not in the lake


class TraceRow(BaseModel):
    id: int
    messageId: str
    topic: str
    provider: str
    messageKey: str | None
    consumerGroup: str | None
    stage: str
    processingMillis: int | None
    errorMessage: str | None
    createdAt: datetime


class Worker(BaseModel):
    name: str
    paused: bool
    running: bool  # this process runs it
    updatedAt: datetime | None
    updatedBy: str | None


class DlqStats(BaseModel):
    files: int
    events: int
    bytes: int
    oldestAgeSeconds: float | None


class DlqFile(BaseModel):
    name: str
    createdAt: datetime
    events: int
    bytes: int


class DlqReplay(BaseModel):
    replayed: int
    quarantined: int
    failed: int


class Parked(BaseModel):
    id: str
    messageId: str
    key: str
    occurredAt: str
    error: str
    deliveries: int


class Requeued(BaseModel):
    requeuedCount: int


class StoreCounts(BaseModel):
    events: int
    dispatchOutbox: dict[str, dict[str, int]]
    sourceOutbox: dict[str, int]
    busPending: int | None
    busParked: int | None
    # true: counting every row overran SUMMARY_BUDGET; events, PUBLISHED and
    # DISPATCHED are PostgreSQL's estimates, the rows still to be sent exact
    estimated: bool = False


class AuditRow(BaseModel):
    id: int
    createdAt: datetime
    tokenName: str | None
    client: str
    method: str
    route: str
    parameters: dict[str, Any]
    status: int
    effect: dict[str, Any] | None


REFUSALS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "ADMIN_INVALID_PARAMETER"},
    401: {"model": ErrorBody, "description": "ADMIN_TOKEN_REQUIRED, ADMIN_TOKEN_INVALID"},
    403: {"model": ErrorBody, "description": "ADMIN_SCOPE_REQUIRED"},
    429: {"model": ErrorBody, "description": "ADMIN_TOO_MANY_FAILURES"},
    409: {
        "model": ErrorBody,
        "description": "this process lacks the part the route needs: ADMIN_PIPELINE_DISABLED, "
        "ADMIN_BUS_UNAVAILABLE, ADMIN_DLQ_UNAVAILABLE, ADMIN_WORKERS_UNAVAILABLE, "
        "ADMIN_AUDIT_UNAVAILABLE; or a state that forbids it: ADMIN_TARGET_CONFIGURED",
    },
    503: {"model": ErrorBody, "description": "ADMIN_BUS_UNAVAILABLE: the bus did not answer"},
}


def iso_only(v: Any) -> Any:
    """Only ISO 8601 text is a time here (pydantic would also take a bare
    number as a Unix time, which the document does not promise)."""
    if isinstance(v, str) and not re.match(r"\d{4}-\d{2}-\d{2}", v):
        raise ValueError("expected an ISO 8601 date-time, e.g. 2026-12-01T00:00:00Z")
    return v


IsoTime = Annotated[datetime | None, BeforeValidator(iso_only)]


def client_of(request: Request) -> str:
    return request.client.host if request.client else ""


def aware(t: datetime | None) -> datetime | None:
    if t is None or t.tzinfo is not None:
        return t
    return t.replace(tzinfo=UTC)
