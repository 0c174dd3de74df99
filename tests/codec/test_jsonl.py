from __future__ import annotations

import gzip

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from estat.codec import CodecError, decode, encode

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)
records = st.lists(st.dictionaries(st.text(), json_values, max_size=5), max_size=30)


def lines_of(recs: list[dict[str, object]]) -> bytes:
    return b"".join(msgspec.json.encode(r) + b"\n" for r in recs)


@given(records)
def test_round_trip(recs: list[dict[str, object]]) -> None:
    data = encode(lines_of(recs))
    assert decode(data) == recs
    # any gzip reader reads it: it is a standard gzip member
    assert gzip.decompress(data) == lines_of(recs)


def test_same_lines_same_bytes() -> None:
    raw = lines_of([{"a": 1}, {"b": "x"}])
    assert encode(raw) == encode(bytearray(raw))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d[: len(d) // 2], "truncated"),
        (lambda d: d[:10] + bytes([d[10] ^ 0xFF]) + d[11:], "corrupt_gzip"),
        (lambda d: b"", "truncated"),
        (lambda d: b"not gzip at all", "corrupt_gzip"),
        (lambda d: d + b"junk", "trailing_data"),
    ],
)
def test_corruption_is_detected(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    data = encode(lines_of([{"n": i, "pad": "x" * 50} for i in range(200)]))
    with pytest.raises(CodecError) as e:
        decode(mutate(data))
    assert e.value.reason == reason


def test_bad_line_is_detected() -> None:
    data = encode(b'{"ok":1}\n{broken\n{"ok":2}\n')
    with pytest.raises(CodecError) as e:
        decode(data)
    assert e.value.reason == "bad_json"
