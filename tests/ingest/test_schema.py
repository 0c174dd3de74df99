"""The client request is defined once: the OpenAPI document and the decoder
agree on every field, its type, its limits and whether it is required."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from estat.ingest.openapi import render
from estat.ingest.schema import batch_type


def components(t: Any) -> dict[str, Any]:
    _, comps = msgspec.json.schema_components([t], ref_template="#/components/schemas/{name}")
    return dict(comps)


def test_openapi_and_decoder_agree() -> None:
    documented = json.loads(render())["components"]["schemas"]
    decoded = components(batch_type(8))
    assert set(decoded) <= set(documented)
    for name, schema in decoded.items():
        doc = documented[name]
        assert doc.get("required", []) == schema.get("required", []), name
        assert set(doc["properties"]) == set(schema["properties"]), name
        for field, spec in schema["properties"].items():
            if field == "properties":  # the depth cap is enforced, documented in words
                continue
            assert doc["properties"][field] == spec, (name, field)


def test_the_depth_cap_is_in_the_decoder() -> None:
    decoder = msgspec.json.Decoder(batch_type(2))
    ok = b'{"events":[{"eventId":"a","eventName":"b","properties":{"x":[1]}}]}'
    assert decoder.decode(ok).events[0].properties == {"x": [1]}
    too_deep = b'{"events":[{"eventId":"a","eventName":"b","properties":{"x":[[1]]}}]}'
    try:
        decoder.decode(too_deep)
    except msgspec.ValidationError:
        return
    raise AssertionError("properties deeper than the cap were accepted")


def test_error_codes_are_registered_documented_and_served() -> None:
    import re
    from pathlib import Path

    from estat.ingest.codes import ERROR_CODES

    root = Path(__file__).resolve().parents[2]
    used = set(
        re.findall(
            r'"(ANALYTICS_INGEST_[A-Z_]+)"', (root / "src/estat/ingest/events.py").read_text()
        )
    )
    assert used <= set(ERROR_CODES)  # the route raises registered codes only
    doc = (root / "docs" / "api.md").read_text()
    for code in ERROR_CODES:
        assert f"`{code}`" in doc, code
    served = render().decode()
    assert all(code in served for code in ERROR_CODES)
