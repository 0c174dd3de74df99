"""The admin and ops routes (FastAPI): ops routes without a token
(``/health``, ``/ready``, ``/metrics``), the rest behind a bearer token with
a scope (``read``, ``replay``, ``operate``).

Every ``/api/v1/admin`` call, refused ones included, is a row of
``admin_audit_log`` and a count in ``admin_requests_total``. Parameters out
of range get ``400`` with a code (``ADMIN_INVALID_PARAMETER``), never a
silent clamp. The OpenAPI document is generated from these routes
(``/api/v1/admin/openapi.json``), so it cannot drift from them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.routing import Match

from estat.admin.context import (
    ADMIN_PREFIX,
    AdminContext,
    AdminError,
    doc,
    scope_checker,
)
from estat.admin.models import (
    REFUSALS,
    client_of,
)
from estat.admin.routes_dispatch import add_dispatch_routes
from estat.admin.routes_ops import add_operations_routes
from estat.admin.routes_pipeline import add_pipeline_routes
from estat.ops.logging import get_logger, mask_ip
from estat.ops.metrics import CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE
from estat.settings.admin import AdminTokenEntry

log = get_logger("estat.admin")


def build_admin_app(ctx: AdminContext) -> FastAPI:
    app = FastAPI(
        title="estat admin API",
        version=ctx.version,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        description="The admin and ops listener of estat (ADMIN_ADDR). Bearer tokens "
        "from ADMIN_TOKENS; each route names the scope it needs (x-scope).",
    )
    app.state.ctx = ctx
    m = ctx.metrics

    def openapi() -> dict[str, Any]:
        """FastAPI's document, without the 422 it adds to every operation:
        invalid parameters are 400 ``ADMIN_INVALID_PARAMETER`` here."""
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=app.routes,
            )  # fmt: skip
            for ops in doc.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                doc.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    scope = scope_checker(ctx)

    @app.exception_handler(AdminError)
    async def _admin_error(request: Request, exc: AdminError) -> JSONResponse:
        headers = {"retry-after": str(exc.retry_after)} if exc.retry_after else None
        if exc.status == 401:
            headers = {**(headers or {}), "www-authenticate": "Bearer"}
        return JSONResponse(
            {"code": exc.code, "message": exc.message}, status_code=exc.status, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "query")
        return JSONResponse(
            {
                "code": "ADMIN_INVALID_PARAMETER",
                "message": f"{where}: {first.get('msg', 'invalid')}",
            },
            status_code=400,
        )

    @app.middleware("http")
    async def _audit(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        route = _template(app, request)
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            log.exception("admin route failed", route=route)
            response = JSONResponse(
                {"code": "ADMIN_INTERNAL", "message": "internal error"}, status_code=500
            )
        m.admin_requests.labels(route, str(response.status_code)).inc()
        if path.startswith(ADMIN_PREFIX) or path == "/openapi.json":
            token_name = getattr(request.state, "token_name", None)
            effect = getattr(request.state, "effect", None)
            if ctx.audit is not None:
                try:
                    await ctx.audit.write(
                        token_name=token_name,
                        client=client_of(request),
                        method=request.method,
                        route=route,
                        parameters=dict(request.query_params),
                        status=response.status_code,
                        effect=effect,
                    )
                except Exception as e:  # the database is down: the log still has it
                    log.error("admin audit row not written", route=route, error=str(e)[:300])
            log.info(
                "admin call",
                token=token_name,
                client=mask_ip(client_of(request)),  # the audit row has the full address
                method=request.method,
                route=route,
                params=dict(request.query_params),
                status=response.status_code,
                effect=effect,
                durationMs=round((time.perf_counter() - started) * 1000, 1),
            )
        return response

    # -- ops routes: no token ------------------------------------------------
    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], responses={503: {"description": "not ready"}})
    async def ready() -> JSONResponse:
        ok, detail = await ctx.ready()
        return JSONResponse({"ready": ok, **detail}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics(request: Request) -> Response:
        om = "application/openmetrics-text" in request.headers.get("accept", "")
        body = m.exposition(openmetrics=om)
        return Response(body, media_type=OPENMETRICS_CONTENT_TYPE if om else CONTENT_TYPE)

    # -- documents -------------------------------------------------------------
    @app.get(
        "/openapi.json", tags=["docs"], response_class=Response, responses=REFUSALS,
        openapi_extra=doc("read"),
    )  # fmt: skip
    async def ingest_openapi(_: AdminTokenEntry = scope("read")) -> Response:
        """The OpenAPI document of the ingest API."""
        return Response(ctx.ingest_openapi, media_type="application/json")

    @app.get(
        f"{ADMIN_PREFIX}/openapi.json", tags=["docs"], responses=REFUSALS,
        openapi_extra=doc("read"),
    )  # fmt: skip
    async def admin_openapi(_: AdminTokenEntry = scope("read")) -> dict[str, Any]:
        """This document."""
        return app.openapi()

    add_pipeline_routes(app, ctx, scope)
    add_dispatch_routes(app, ctx, scope)
    add_operations_routes(app, ctx, scope)
    return app


def _template(app: FastAPI, request: Request) -> str:
    """The route's path template (bounded label values), or ``other``."""
    for r in app.router.routes:
        match, _ = r.matches(request.scope)
        if match == Match.FULL:
            return str(getattr(r, "path", "other"))
    return "other"


__all__ = ["ADMIN_PREFIX", "AdminContext", "AdminError", "build_admin_app"]
