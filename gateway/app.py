"""The gateway's HTTP surface: one POST endpoint per source, GET /healthz, OpenAPI.

The app refuses to be built with a source that is not verified unless the settings allow
it (:meth:`gateway.settings.GatewaySettings.check_can_start`).

Request pipeline (each step answers with a JSON ``{"error": ..., "detail": ...}``):

1. size: ``Content-Length`` above ``max_body_bytes`` -> 413 before reading; the body is
   read in chunks and counted too (chunked uploads) -> 413;
2. content type: JSON is required - ``application/json`` or an ``application/*+json``
   type such as ``application/cloudevents+json`` - and a missing one is refused too (415):
   a browser page can only POST a CORS-safelisted type (text/plain, forms) without a
   preflight, so it can never get a JSON request through; a charset other than UTF-8 -> 415;
3. authentication on the raw bytes (:mod:`gateway.signatures`) -> 401;
4. parsing (:mod:`gateway.sources`), in a worker thread so that a large body never stalls
   the event loop: not UTF-8 text (UTF-16 ...) -> 415; malformed -> 422 with the offending
   field; a well-formed delivery without alert state change -> 202 with ``ignored``;
   more than ``max_alerts_per_delivery`` alerts -> 413;
5. ``intake.accept(alerts, delivery)`` -> 202 with a summary. An intake failure is
   503, so that senders that retry on 5xx (Alertmanager, Grafana) deliver again. So is a
   full runner queue (:class:`gateway.errors.RunnerBusy`): 503 "runner busy" with
   ``Retry-After``, nothing recorded, only for deliveries that carry a firing alert.

``GET /healthz`` shows which sources verify and, in runner dispatch, the runners' queue and
each runner's last reported load (``runner``: queued runs, and per runner its working,
waiting, resuming and queued runs and their limits).

``POST /runner/claim``, ``/runner/heartbeat``, ``/runner/done``: the runner processes' side
(:mod:`gateway.runner`), in runner dispatch only, each with Bearer
``RUNBOOKS_GATEWAY_RUNNER_TOKEN``; left out of the OpenAPI page.

Bad input never yields a 5xx: parser failures of any kind are 4xx.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from gateway.errors import AuthError, NotAnAlert, NotUtf8Error, PayloadError, RunnerBusy
from gateway.models import SOURCES, Alert, Delivery
from gateway.settings import GatewaySettings
from gateway.signatures import authenticate
from gateway.runner import ClaimRequest, Claims, Heartbeat, RunDone
from gateway.sources import PARSERS, Parser

log = logging.getLogger("gateway")

DELIVERY_ID_HEADERS = ("X-Webhook-Id", "Request-ID", "X-Request-ID")
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or wrong credentials/signature."},
    413: {"description": "Body larger than max_body_bytes, or more alerts than max_alerts_per_delivery."},
    415: {"description": "Content type missing or not JSON, or the body is not UTF-8."},
    422: {"description": "Malformed payload; detail names the field."},
    503: {"description": "Intake unavailable, or the runner busy (its queue of runs is full): "
               "nothing was recorded; retry (after Retry-After seconds when given).",
          "headers": {"Retry-After": {"description": "Seconds to wait before delivering again "
                                                     "(runner busy).", "schema": {"type": "integer"}}}},
}


class Intake(Protocol):
    async def accept(self, alerts: list[Alert], delivery: Delivery) -> dict[str, Any]: ...


class RunnerQueue(Protocol):
    """What runners call (``gateway.intake.Dispatcher`` in runner dispatch)."""

    def load(self) -> dict[str, Any]: ...
    def claim(self, runner: str, limit: int, wait_s: float) -> Claims: ...
    def heartbeat(self, beat: Heartbeat) -> list[str]: ...
    def done(self, report: RunDone) -> None: ...


class _BodyTooLarge(Exception):
    pass


def create_app(settings: GatewaySettings, intake: Intake,
               parsers: Mapping[str, Parser] | None = None,
               runners: RunnerQueue | None = None,
               runner_load: Callable[[], dict[str, Any]] | None = None) -> FastAPI:
    """The gateway's app. Raises GatewayConfigError when a source would go unverified
    without being allowed to (see the settings). ``parsers``: default :data:`PARSERS`.
    ``runners``: the queue runner processes take runs from (runner dispatch only; needs
    ``settings.runner_token``). ``runner_load``: for ``/healthz`` (default: the queue's)."""
    settings.check_can_start()
    parsers = PARSERS if parsers is None else parsers
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
        health: dict[str, Any] = {"status": "ok", "sources": list(SOURCES),
                                  "verification": settings.verification_enabled()}
        load = runner_load or (runners.load if runners is not None else None)
        if load is not None:
            health["runner"] = load()
        return health

    if runners is not None:
        _runner_routes(app, settings, runners)

    for source in SOURCES:
        app.add_api_route(
            f"/alerts/{source}", _endpoint(source, settings, intake, parsers[source]), methods=["POST"],
            status_code=202, name=f"receive_{source}", summary=f"Receive {source} alerts",
            responses=_ERROR_RESPONSES,
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/json": {"schema": {"type": "object"}}}}},
        )
    return app


def _runner_routes(app: FastAPI, settings: GatewaySettings, runners: RunnerQueue) -> None:
    if settings.runner_token is None:
        from gateway.errors import GatewayConfigError

        raise GatewayConfigError("runner dispatch needs RUNBOOKS_GATEWAY_RUNNER_TOKEN: the runners "
                                 "(`python -m gateway runner`) present it to take runs; `make up` "
                                 "generates one")
    expected = f"Bearer {settings.runner_token.get_secret_value()}".encode()
    long_polls = anyio.CapacityLimiter(64)  # runners' claims wait in threads of their own

    def authorized(request: Request) -> bool:
        return hmac.compare_digest(request.headers.get("authorization", "").encode(), expected)

    refused = lambda: _error(401, "unauthorized", "runner endpoints need Bearer "  # noqa: E731
                             "RUNBOOKS_GATEWAY_RUNNER_TOKEN")

    @app.post("/runner/claim", include_in_schema=False)
    async def claim(request: Request, body: ClaimRequest) -> Any:
        if not authorized(request):
            return refused()
        return await anyio.to_thread.run_sync(runners.claim, body.runner, body.limit, body.wait_s,
                                              limiter=long_polls)

    @app.post("/runner/heartbeat", include_in_schema=False)
    async def heartbeat(request: Request, body: Heartbeat) -> Any:
        if not authorized(request):
            return refused()
        return {"held": await anyio.to_thread.run_sync(runners.heartbeat, body)}

    @app.post("/runner/done", include_in_schema=False)
    async def done(request: Request, body: RunDone) -> Any:
        if not authorized(request):
            return refused()
        await anyio.to_thread.run_sync(runners.done, body)
        return {"ok": True}


def _endpoint(source: str, settings: GatewaySettings, intake: Intake, parse: Parser):
    async def receive(request: Request) -> JSONResponse:
        received_at = datetime.now(UTC)
        headers = request.headers
        declared = (headers.get("content-length") or "").strip()
        if declared.isascii() and declared.isdigit() and int(declared) > settings.max_body_bytes:
            return _too_large(settings)  # ("²".isdigit() is True: only ASCII digits count)
        try:
            body = await _read_capped(request, settings.max_body_bytes)
        except _BodyTooLarge:
            return _too_large(settings)
        if (problem := _content_type_problem(headers.get("content-type"))) is not None:
            return _error(415, "unsupported media type", problem)
        try:
            authenticate(source, body, headers, settings)
        except AuthError as exc:
            return _error(401, "unauthorized", str(exc))
        try:
            alerts = await run_in_threadpool(parse, body, headers)
        except NotAnAlert as exc:
            return JSONResponse(status_code=202, content={
                "source": source, "alerts": 0, "ignored": str(exc)})
        except NotUtf8Error as exc:
            return _error(415, "unsupported media type", str(exc))
        except PayloadError as exc:
            return _error(422, f"malformed {source} payload", str(exc))
        except ValidationError as exc:
            return _error(422, f"malformed {source} payload", _pydantic_problems(exc))
        except Exception as exc:  # a parser bug on odd input is still the input's fault
            log.exception("unexpected parser failure for %s payload", source)
            return _error(422, f"malformed {source} payload",
                          f"could not parse ({type(exc).__name__}: {exc})")
        if len(alerts) > settings.max_alerts_per_delivery:
            return _error(413, "too many alerts",
                          f"the delivery carries {len(alerts)} alerts, more than "
                          f"{settings.max_alerts_per_delivery} (RUNBOOKS_GATEWAY_MAX_ALERTS_PER_DELIVERY); "
                          "none were accepted - send them in smaller deliveries (Alertmanager: "
                          "max_alerts in webhook_config, or finer group_by)")
        delivery = Delivery(
            source=source,  # type: ignore[arg-type]
            delivery_id=_delivery_id(headers),
            received_at=received_at,
            remote_addr=request.client.host if request.client else None,
        )
        try:
            result = await intake.accept(alerts, delivery)
        except RunnerBusy as exc:
            log.warning("refused %s delivery %s (503, retry after %d s): %s", source,
                        delivery.delivery_id, exc.retry_after_s, exc)
            return _error(503, "runner busy", str(exc), headers={"Retry-After": str(exc.retry_after_s)})
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
        return ("no Content-Type; send the body as application/json (CloudEvents: "
                "application/cloudevents+json or application/cloudevents-batch+json)")
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
        return f"content type {media!r} is not JSON; send application/json"
    for param in params.split(";"):
        name, _, value = param.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            return f"charset {charset!r} is not supported; send the JSON as UTF-8 (charset=utf-8)"
    return None


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


def _error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": error, "detail": detail}, headers=headers)
