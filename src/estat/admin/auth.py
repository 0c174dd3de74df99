"""Bearer tokens with scopes, checked in constant time, and a limit on
failed attempts per client address.

Only the SHA-256 of a token is configured (``ADMIN_TOKENS``); a presented
token is hashed and compared with every configured digest
(``hmac.compare_digest``, no early exit), so neither the answer nor its
timing says which digest came close.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from estat.clock import Clock
from estat.settings.admin import AdminTokenEntry

FAILURES_ALLOWED = 10  # failed authentications per client address ...
FAILURE_WINDOW = 60.0  # ... per this many seconds; then 429 until the window passes


@dataclass(frozen=True, slots=True)
class Denied:
    status: int  # 401, 403 or 429
    code: str
    message: str
    retry_after: int = 0


def new_token() -> tuple[str, str]:
    """A new random token and its SHA-256 (hex): the token for the client,
    the digest for ``ADMIN_TOKENS``."""
    token = "estat_" + secrets.token_urlsafe(32)
    return token, hashlib.sha256(token.encode()).hexdigest()


class Authenticator:
    def __init__(self, entries: Sequence[AdminTokenEntry], clock: Clock) -> None:
        self.entries = list(entries)
        self._digests = [bytes.fromhex(e.digest) for e in self.entries]
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self.allowed = FAILURES_ALLOWED

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def identify(self, authorization: str | None) -> AdminTokenEntry | None:
        if not authorization or not self._digests:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        presented = hashlib.sha256(token.strip().encode()).digest()
        found: AdminTokenEntry | None = None
        for entry, digest in zip(self.entries, self._digests, strict=True):
            if hmac.compare_digest(presented, digest):
                found = entry
        return found

    def check(
        self, authorization: str | None, client: str, scope: str
    ) -> tuple[AdminTokenEntry | None, Denied | None]:
        """The token's entry, or why the call is refused."""
        blocked = self._blocked(client)
        if blocked:
            return None, Denied(
                429,
                "ADMIN_TOO_MANY_FAILURES",
                "too many failed authentications from this address",
                blocked,
            )
        entry = self.identify(authorization)
        if entry is None:
            self._failed(client)
            if not self.enabled:
                return None, Denied(
                    401, "ADMIN_TOKEN_REQUIRED", "no admin token is configured (ADMIN_TOKENS)"
                )
            if not authorization:
                return None, Denied(401, "ADMIN_TOKEN_REQUIRED", "a bearer token is required")
            return None, Denied(401, "ADMIN_TOKEN_INVALID", "the token is not valid")
        if scope not in entry.scopes:
            return entry, Denied(
                403, "ADMIN_SCOPE_REQUIRED", f"the token {entry.name!r} lacks the {scope!r} scope"
            )
        return entry, None

    def _failed(self, client: str) -> None:
        q = self._failures.setdefault(client, deque())
        q.append(self._clock.monotonic())
        if len(self._failures) > 10_000:  # a flood of addresses: forget the oldest
            self._failures.pop(next(iter(self._failures)))

    def _blocked(self, client: str) -> int:
        q = self._failures.get(client)
        if not q:
            return 0
        now = self._clock.monotonic()
        while q and q[0] <= now - FAILURE_WINDOW:
            q.popleft()
        if not q:
            del self._failures[client]
            return 0
        if len(q) < self.allowed:
            return 0
        return max(1, int(q[0] + FAILURE_WINDOW - now + 0.999))
