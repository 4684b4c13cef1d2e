"""The gateway's HTTP surface: one POST endpoint per source, GET /healthz, OpenAPI.

Request pipeline (each step answers with a JSON ``{"error": ..., "detail": ...}``):

1. size: ``Content-Length`` above ``max_body_bytes`` -> 413 before reading; the body is
   read in chunks and counted too (chunked uploads) -> 413;
2. authentication on the raw bytes (:mod:`gateway.signatures`) -> 401;
3. content type: a declared non-JSON type -> 415 (absent is accepted as JSON);
4. parsing (:mod:`gateway.sources`) -> 422 with the offending field; a well-formed
   delivery without alert state change -> 202 with ``ignored``;
5. ``intake.accept(alerts, delivery)`` -> 202 with a summary. An intake failure is
   503, so that senders that retry on 5xx (Alertmanager, Grafana) deliver again.

Bad input never yields a 5xx: parser failures of any kind are 422.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from gateway.errors import AuthError, NotAnAlert, PayloadError
from gateway.models import SOURCES, Alert, Delivery
from gateway.settings import GatewaySettings
from gateway.signatures import authenticate
from gateway.sources import PARSERS

log = logging.getLogger("gateway")

DELIVERY_ID_HEADERS = ("X-Webhook-Id", "Request-ID", "X-Request-ID")
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or wrong credentials/signature."},
    413: {"description": "Body larger than max_body_bytes."},
    415: {"description": "Content type is not JSON."},
    422: {"description": "Malformed payload; detail names the field."},
    503: {"description": "Intake unavailable; retry."},
}


class Intake(Protocol):
    async def accept(self, alerts: list[Alert], delivery: Delivery) -> dict[str, Any]: ...


class _BodyTooLarge(Exception):
    pass


def create_app(settings: GatewaySettings, intake: Intake) -> FastAPI:
    app = FastAPI(title="Incident runbooks alert gateway", version="1",
                  description="Receives alerts, verifies and normalises them, hands them to "
                              "the intake that starts runbooks.")
    app.state.settings = settings
    app.state.intake = intake

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid request", str(exc.errors()))

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "sources": list(SOURCES),
                "verification": settings.verification_enabled()}

    for source in SOURCES:
        app.add_api_route(
            f"/alerts/{source}", _endpoint(source, settings, intake), methods=["POST"],
            status_code=202, name=f"receive_{source}", summary=f"Receive {source} alerts",
            responses=_ERROR_RESPONSES,
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/json": {"schema": {"type": "object"}}}}},
        )
    return app


def _endpoint(source: str, settings: GatewaySettings, intake: Intake):
    parse = PARSERS[source]

    async def receive(request: Request) -> JSONResponse:
        received_at = datetime.now(UTC)
        headers = request.headers
        declared = headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > settings.max_body_bytes:
            return _too_large(settings)
        try:
            body = await _read_capped(request, settings.max_body_bytes)
        except _BodyTooLarge:
            return _too_large(settings)
        try:
            authenticate(source, body, headers, settings)
        except AuthError as exc:
            return _error(401, "unauthorized", str(exc))
        if (problem := _content_type_problem(headers.get("content-type"))) is not None:
            return _error(415, "unsupported media type", problem)
        try:
            alerts = parse(body, headers)
        except NotAnAlert as exc:
            return JSONResponse(status_code=202, content={
                "source": source, "alerts": 0, "ignored": str(exc)})
        except PayloadError as exc:
            return _error(422, f"malformed {source} payload", str(exc))
        except ValidationError as exc:
            return _error(422, f"malformed {source} payload", _pydantic_problems(exc))
        except Exception as exc:  # a parser bug on odd input is still the input's fault
            log.exception("unexpected parser failure for %s payload", source)
            return _error(422, f"malformed {source} payload",
                          f"could not parse ({type(exc).__name__}: {exc})")
        delivery = Delivery(
            source=source,  # type: ignore[arg-type]
            delivery_id=_delivery_id(headers),
            received_at=received_at,
            remote_addr=request.client.host if request.client else None,
        )
        try:
            result = await intake.accept(alerts, delivery)
        except Exception as exc:
            log.exception("intake failed for %s delivery %s", source, delivery.delivery_id)
            return _error(503, "intake unavailable",
                          f"{type(exc).__name__}; the alerts were not accepted, retry")
        return JSONResponse(status_code=202, content={
            "source": source,
            "delivery_id": delivery.delivery_id,
            "alerts": len(alerts),
            "firing": sum(a.status == "firing" for a in alerts),
            "resolved": sum(a.status == "resolved" for a in alerts),
            "acknowledged": sum(a.acknowledged for a in alerts),
            "fingerprints": [a.fingerprint for a in alerts],
            "intake": result,
        })

    receive.__name__ = f"receive_{source}"
    receive.__doc__ = f"Receive one {source} webhook delivery (see gateway.sources.{source})."
    return receive


async def _read_capped(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _content_type_problem(content_type: str | None) -> str | None:
    if content_type is None or not content_type.strip():
        return None
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return None
    return f"content type {media!r} is not JSON; send application/json"


def _delivery_id(headers: Mapping[str, str]) -> str | None:
    for name in DELIVERY_ID_HEADERS:
        value = headers.get(name)
        if value:
            return value[:200]
    return None


def _pydantic_problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def _too_large(settings: GatewaySettings) -> JSONResponse:
    return _error(413, "payload too large",
                  f"the body exceeds {settings.max_body_bytes} bytes "
                  "(RUNBOOKS_GATEWAY_MAX_BODY_BYTES)")


def _error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": error, "detail": detail})
