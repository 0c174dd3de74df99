"""The webhook destination against a receiver that checks the HMAC
signature: every event arrives once with its stored fields; a wrong secret
is a configuration error (retried, never parked); a tampered body or an
old timestamp fails the receiver's check."""

from __future__ import annotations

import time

from estat.dispatch.webhook import Webhook, signature, verify
from tests.capture import CaptureServer
from tests.store.test_store import rec


async def test_signed_batches_arrive_with_the_stored_fields(capture: CaptureServer) -> None:
    hook = Webhook(capture.url + "/hook", "whsec_test", gzip_above=2000)
    events = [rec() for _ in range(40)]
    outcomes = await hook.send(events)
    await hook.close()
    assert [o.kind for o in outcomes] == ["delivered"] * 40
    assert [e["event_id"] for e in capture.hooked] == [e.event_id for e in events]
    first = capture.hooked[0]
    assert first["event_name"] == events[0].event_name
    assert first["member_id"] == events[0].member_id
    assert capture.hook_refused == 0


async def test_a_wrong_secret_is_a_configuration_error(capture: CaptureServer) -> None:
    hook = Webhook(capture.url + "/hook", "not-the-secret")
    outcomes = await hook.send([rec() for _ in range(3)])
    await hook.close()
    assert {(o.kind, o.config_error) for o in outcomes} == {("retry", True)}
    assert capture.hook_refused == 1
    assert capture.hooked == []


def test_the_receiver_check_refuses_tampering_and_old_requests() -> None:
    body = b'{"batch":[]}'
    now = int(time.time())
    good = signature(b"k", body, now)
    assert verify(b"k", body, good, now)
    assert not verify(b"k", body + b" ", good, now)
    assert not verify(b"other", body, good, now)
    assert not verify(b"k", body, good, now + 301)
    assert not verify(b"k", body, "t=abc,v1=00", now)


def test_the_receiver_check_docs_api_shows_accepts_what_estat_signs() -> None:
    """The ``verify_estat`` a receiver copies from docs/api.md (standalone,
    no estat) accepts estat's signature and refuses the same tampering."""
    import re
    from pathlib import Path

    api = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    section = api.split("## Outgoing: the webhook", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    scope: dict[str, object] = {}
    exec(code, scope)  # the documented snippet, as a receiver would paste it
    verify_estat = scope["verify_estat"]
    assert callable(verify_estat)
    body = b'{"batch":[{"event_id":"e-1"}],"sent_at":"2026-12-01T00:00:00.000Z"}'
    header = signature(b"whsec", body, int(time.time()))
    assert verify_estat(b"whsec", body, header)
    assert not verify_estat(b"whsec", body + b" ", header)
    assert not verify_estat(b"other", body, header)
    assert not verify_estat(b"whsec", body, signature(b"whsec", body, int(time.time()) - 600))
    assert not verify_estat(b"whsec", body, "t=abc,v1=00")
