"""The fields of the dispatcher and its destinations (PostHog, a
webhook). ``Settings`` (``fields.py``) inherits them."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings

from estat.settings.values import Duration, EndpointUrl, Targets, accepts

DESTINATIONS = ("POSTHOG", "WEBHOOK")


class DispatchFields(BaseSettings):
    dispatch_targets: Targets | None = Field(
        None,
        description="Destinations every stored event is dispatched to, comma-separated: POSTHOG, WEBHOOK. Unset: POSTHOG when POSTHOG_HOST or POSTHOG_API_KEY is set (both are then required), WEBHOOK when WEBHOOK_URL or WEBHOOK_SECRET is; empty: none.",
        json_schema_extra=accepts("POSTHOG, WEBHOOK, both separated by a comma, or empty"),
    )
    posthog_host: EndpointUrl | None = Field(
        None,
        description="PostHog's address (events go to <POSTHOG_HOST>/batch/), e.g. https://us.i.posthog.com or a self-hosted PostHog.",
        json_schema_extra=accepts("an http:// or https:// URL"),
    )
    posthog_api_key: SecretStr | None = Field(
        None,
        description="The PostHog project API key (phc_...).",
        json_schema_extra=accepts("a project API key"),
    )
    webhook_url: EndpointUrl | None = Field(
        None,
        description="The webhook destination's URL: a POST of a JSON batch per DISPATCH_BATCH_SIZE events, signed with WEBHOOK_SECRET.",
        json_schema_extra=accepts("an http:// or https:// URL"),
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="The webhook's HMAC-SHA256 key (X-Estat-Signature: t=<unix seconds>,v1=<hex HMAC of '<t>.<body>'>).",
        json_schema_extra=accepts("a secret string"),
    )
    dispatch_batch_size: int = Field(
        100,
        ge=1,
        le=1000,
        description="Dispatch outbox rows sent per request to a destination.",
        json_schema_extra=accepts("an integer from 1 to 1000"),
    )
    dispatch_concurrency: int = Field(
        2,
        ge=1,
        le=16,
        description="Lanes per destination and dispatcher process: each leases ten requests' worth of rows (at most 1,000 rows), rounded up to whole windows of DISPATCH_LANE_IN_FLIGHT requests, and sends them DISPATCH_LANE_IN_FLIGHT requests at a time; on PostgreSQL each lane keeps a database connection of its own. Requests in flight per destination: DISPATCH_CONCURRENCY x DISPATCH_LANE_IN_FLIGHT (docs/runbook.md, Throughput).",
        json_schema_extra=accepts("an integer from 1 to 16"),
    )
    dispatch_lane_in_flight: int = Field(
        4,
        ge=1,
        le=16,
        description="Requests a dispatch lane has in flight at once, from its lease, while the target's circuit is closed with no failure counted (one at a time otherwise: a probe, or a destination already failing). A lane delivers up to DISPATCH_LANE_IN_FLIGHT x DISPATCH_BATCH_SIZE events per round trip: raise it for a destination far away, lower it to spare a destination of your own.",
        json_schema_extra=accepts("an integer from 1 to 16"),
    )
    dispatch_poll_interval: Duration = Field(
        1.0,
        gt=0,
        description="How often an idle dispatcher looks for due rows (the store consumer of the same process wakes it at once).",
        json_schema_extra=accepts("a duration"),
    )
    dispatch_lease: Duration = Field(
        60.0,
        gt=0,
        description="How long leased dispatch rows stay invisible to other dispatchers (one that dies leaves them due after this; also a dead probe's lease). On PostgreSQL a lease is its transaction's row locks, gone the moment a dispatcher dies, and ended by the database once idle this long (a dispatcher whose host died or was cut off): it must exceed the longest send of a lease (checked at start: ceil(10 / DISPATCH_LANE_IN_FLIGHT) x (DISPATCH_CONNECT_TIMEOUT + DISPATCH_READ_TIMEOUT)), or its rows would be sent again.",
        json_schema_extra=accepts("a duration"),
    )
    dispatch_max_attempts: int = Field(
        20,
        ge=1,
        le=1000,
        description="Attempts of a dispatch row before it is parked (FAILED, no next retry) until replayed; a refused credential (401/403) never parks.",
        json_schema_extra=accepts("an integer from 1 to 1000"),
    )
    dispatch_retry_base_delay: Duration = Field(
        10.0,
        gt=0,
        description="First retry delay of a dispatch row; doubled per attempt (2^min(retries, 10)), jittered, a Retry-After as the minimum.",
        json_schema_extra=accepts("a duration"),
    )
    dispatch_retry_max_delay: Duration = Field(
        600.0,
        gt=0,
        description="Longest retry delay of a dispatch row.",
        json_schema_extra=accepts("a duration"),
    )
    dispatch_circuit_failure_threshold: int = Field(
        5,
        ge=0,
        le=1000,
        description="Consecutive failed batches (every event to retry) that open a target's circuit; 0 disables the breaker.",
        json_schema_extra=accepts("an integer from 0 to 1000"),
    )
    dispatch_circuit_open_duration: Duration = Field(
        60.0,
        gt=0,
        description="How long an open circuit leaves the target alone before one probe batch; doubled after a failed probe.",
        json_schema_extra=accepts("a duration"),
    )
    dispatch_circuit_max_open_duration: Duration = Field(
        600.0,
        gt=0,
        description="Longest open time of a circuit.",
        json_schema_extra=accepts("a duration"),
    )
    dispatch_connect_timeout: Duration = Field(
        2.0,
        gt=0,
        description="Connect timeout of a destination request.",
        json_schema_extra=accepts("a duration"),
    )
    dispatch_read_timeout: Duration = Field(
        3.0,
        gt=0,
        description="Read timeout of a destination request.",
        json_schema_extra=accepts("a duration"),
    )

    @property
    def targets(self) -> tuple[str, ...]:
        if self.dispatch_targets is None:
            auto = (  # half a destination is one too: the check below names what is missing
                "POSTHOG" if self.posthog_host or self.posthog_api_key else "",
                "WEBHOOK" if self.webhook_url or self.webhook_secret else "",
            )
            return tuple(t for t in auto if t)
        return tuple(
            dict.fromkeys(t.strip().upper() for t in self.dispatch_targets.split(",") if t.strip())
        )

    @model_validator(mode="after")
    def _destinations(self) -> DispatchFields:
        for t in self.targets:
            if t not in DESTINATIONS:
                raise ValueError(
                    f"DISPATCH_TARGETS: unknown destination {t!r} (known: {', '.join(DESTINATIONS)})"
                )
        for target, needed in (
            (
                "POSTHOG",
                {"POSTHOG_HOST": self.posthog_host, "POSTHOG_API_KEY": self.posthog_api_key},
            ),
            ("WEBHOOK", {"WEBHOOK_URL": self.webhook_url, "WEBHOOK_SECRET": self.webhook_secret}),
        ):
            missing = [name for name, value in needed.items() if not value]
            if target in self.targets and missing:
                both = " and ".join(needed)
                raise ValueError(
                    f"DISPATCH_TARGETS={self.dispatch_targets} needs {both}"
                    if self.dispatch_targets is not None
                    else f"{' and '.join(missing)} not set: {target} needs {both} "
                    "(DISPATCH_TARGETS= sends nowhere)"
                )
        if self.dispatch_retry_max_delay < self.dispatch_retry_base_delay:
            raise ValueError("DISPATCH_RETRY_MAX_DELAY must be at least DISPATCH_RETRY_BASE_DELAY")
        # a lease is sent in at most ceil(10 / DISPATCH_LANE_IN_FLIGHT) rounds,
        # each as long as a request may take; on PostgreSQL the database ends a
        # lease idle longer than DISPATCH_LEASE (its rows then sent again), so a
        # destination that slow would have every lease cut and never marked
        rounds = -(-10 // self.dispatch_lane_in_flight)
        longest = rounds * (self.dispatch_connect_timeout + self.dispatch_read_timeout)
        if self.dispatch_lease < longest:
            raise ValueError(
                f"DISPATCH_LEASE={self.dispatch_lease:g}s is shorter than a lease's sends may take "
                f"({longest:g}s: {rounds} rounds of DISPATCH_CONNECT_TIMEOUT + "
                "DISPATCH_READ_TIMEOUT at DISPATCH_LANE_IN_FLIGHT="
                f"{self.dispatch_lane_in_flight}): raise DISPATCH_LEASE to at least {longest:g}s"
            )
        return self
