"""Who sent a request: a member (verified JWT ``sub``) or an anonymous id.

``Authorization: Bearer <JWT>`` is verified with ``AUTH_JWT_SECRET`` (HS256)
or ``AUTH_JWT_PUBLIC_KEY`` (RS256 or ES256, PEM); its ``sub`` claim is the
member id; ``exp`` and ``nbf`` are checked when present. A token that fails
verification is an error (401), never silently ignored. Without a verifier
configured, bearer tokens are not accepted (401) rather than trusted.
"""

from __future__ import annotations

import jwt

from estat.model import MEMBER_ID_MAX


class InvalidToken(Exception):
    """The bearer token is missing a subject, malformed, expired or forged."""


class TokenVerifier:
    def __init__(self, secret: str | None, public_key: str | None) -> None:
        self._key: str | None
        if public_key:
            self._key = public_key
            self._algorithms = ["RS256", "ES256"]
        elif secret:
            self._key = secret
            self._algorithms = ["HS256"]
        else:
            self._key = None
            self._algorithms = []

    def member_id(self, authorization: bytes) -> str:
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InvalidToken("expected 'Bearer <token>'")
        if self._key is None:
            raise InvalidToken("bearer tokens are not configured on this server")
        try:
            claims = jwt.decode(
                token.strip(),
                self._key,
                algorithms=self._algorithms,
                options={"require": ["sub"], "verify_aud": False},
            )
        except jwt.PyJWTError as e:
            raise InvalidToken(type(e).__name__) from None
        sub = claims.get("sub")
        if not isinstance(sub, str | int) or str(sub) == "":
            raise InvalidToken("sub claim missing")
        if len(str(sub)) > MEMBER_ID_MAX:
            raise InvalidToken(f"sub claim longer than {MEMBER_ID_MAX} characters")
        return str(sub)
