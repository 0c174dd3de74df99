from __future__ import annotations

import pytest

from estat.ingest.ip import client_ip


@pytest.mark.parametrize(
    ("xff", "cf", "peer", "expected"),
    [
        (b"81.2.69.160", None, "10.0.0.1", "81.2.69.160"),
        (b"10.0.0.7, 172.16.3.4, 81.2.69.160", None, "10.0.0.1", "81.2.69.160"),
        (b"192.168.1.1, 127.0.0.1, 169.254.1.1", None, "10.0.0.9", "10.0.0.9"),
        (b"100.64.0.1, 8.8.8.8", None, "10.0.0.1", "8.8.8.8"),  # shared CGNAT range skipped
        (b"garbage, , 999.1.1.1, 8.8.4.4", None, "10.0.0.1", "8.8.4.4"),
        (b"fe80::1, 2001:4860:4860::8888", None, "10.0.0.1", "2001:4860:4860::8888"),
        (b"[2001:4860:4860::8844]:443", None, "10.0.0.1", "2001:4860:4860::8844"),
        (b"81.2.69.160:5123", None, "10.0.0.1", "81.2.69.160"),
        (b"::ffff:81.2.69.160", None, "10.0.0.1", "81.2.69.160"),
        (b"10.1.1.1", b"81.2.69.142:46532", "10.0.0.1", "81.2.69.142"),
        (None, b"2001:db8:cafe::17:46532", "10.0.0.1", "2001:db8:cafe::17"),
        (None, b"nonsense", "10.0.0.1", "10.0.0.1"),
        (b"\xff\xfe", None, "127.0.0.1", "127.0.0.1"),
        (None, None, "127.0.0.1", "127.0.0.1"),
    ],
)
def test_first_public_ip(xff: bytes | None, cf: bytes | None, peer: str, expected: str) -> None:
    assert client_ip(xff, cf, peer) == expected
    assert client_ip(xff, cf, peer) == expected  # cached answer is the same
