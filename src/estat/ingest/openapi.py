"""The OpenAPI document of the ingest listener, generated from the same
msgspec types that decode requests (served at ``GET /openapi.json``;
``docs/openapi.json`` is this document, kept current by a test)."""

from __future__ import annotations

from typing import Any

import msgspec

from estat import __version__
from estat.ingest.codes import ERROR_CODES
from estat.ingest.schema import batch_type


def _error(description: str, codes: list[str]) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string", "enum": codes},
                        "message": {"type": "string"},
                    },
                }
            }
        },
    }


def document() -> dict[str, Any]:
    batch = batch_type(None)  # the decoder's type, properties as any object
    _, components = msgspec.json.schema_components(
        [batch], ref_template="#/components/schemas/{name}"
    )
    by_status: dict[int, list[str]] = {}
    for code, (status, _) in ERROR_CODES.items():
        by_status.setdefault(status, []).append(code)
    errors = {
        str(status): _error("; ".join(f"{c}: {ERROR_CODES[c][1]}" for c in codes), codes)
        for status, codes in sorted(by_status.items())
    }
    retry_after = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    errors["429"]["headers"] = retry_after
    errors["503"]["headers"] = retry_after
    return {
        "openapi": "3.1.0",
        "info": {"title": "estat ingest API", "version": __version__},
        "paths": {
            "/api/v1/analytics/events": {
                "post": {
                    "summary": "Send client events (JSON; text/plain for sendBeacon; optional gzip)",
                    "parameters": [
                        {
                            "name": "X-Anonymous-Id",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "Authorization",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                            "description": "Bearer <JWT>; claim sub is the member id",
                        },
                        {
                            "name": "Content-Encoding",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string", "enum": ["gzip", "identity"]},
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ClientBatch"}
                            },
                            "text/plain": {"schema": {"$ref": "#/components/schemas/ClientBatch"}},
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "all events accepted",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["acceptedCount"],
                                        "properties": {"acceptedCount": {"type": "integer"}},
                                    }
                                }
                            },
                        },
                        **errors,
                    },
                },
                "options": {
                    "summary": "CORS preflight",
                    "responses": {"204": {"description": "preflight answer"}},
                },
            },
            "/collect": {
                "post": {
                    "summary": "Send one raw event (any body, at most MAX_BODY_SIZE)",
                    "requestBody": {"content": {"*/*": {"schema": {"type": "string"}}}},
                    "responses": {
                        "200": {"description": "enqueued"},
                        "413": {"description": "body too large"},
                        "503": {"description": "queue full; see Retry-After"},
                    },
                },
                "get": {
                    "summary": "Send one raw event as the query string",
                    "responses": {
                        "200": {"description": "enqueued"},
                        "503": {"description": "queue full"},
                    },
                },
                "options": {
                    "summary": "CORS preflight",
                    "responses": {"204": {"description": "preflight answer"}},
                },
            },
            "/health": {
                "get": {"summary": "liveness", "responses": {"200": {"description": "alive"}}}
            },
            "/ready": {
                "get": {
                    "summary": "readiness",
                    "responses": {
                        "200": {"description": "ready"},
                        "503": {"description": "draining or full"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "text format"}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "this document",
                    "responses": {"200": {"description": "OpenAPI 3.1"}},
                }
            },
        },
        "components": {"schemas": components},
    }


def render() -> bytes:
    return msgspec.json.format(msgspec.json.encode(document()), indent=2) + b"\n"
