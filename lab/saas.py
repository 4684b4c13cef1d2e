"""Fake PagerDuty, Opsgenie, Slack and Statuspage on one loopback port, for tests and ``make up``.

    fake = FakeProviders().start()
    os.environ.update(fake.env())          # RUNBOOKS_* pointing every notifier here
    ... Notifiers.from_settings().send(msg) ...
    [r.valid for r in fake.requests("slack")]   # each request checked against the provider's schema
    fake.fail_next("slack", 429, retry_after=1) # the next Slack request is rate limited
    fake.stop()

A real HTTP server (``http.server.ThreadingHTTPServer`` on 127.0.0.1, port 0), not a mock: it
records every request (:class:`Recorded`: method, path, query, headers, JSON body, times, the
status it answered), checks it against the provider's documented request schema (pydantic
models with ``extra="forbid"`` where the documentation defines the whole object: required
fields, enums, maximum lengths, the auth header's form and value) and answers as the provider
does: the documented success status and JSON shape, or the provider's refusal with its error
shape. A request that breaks the schema is recorded with ``valid=False`` and its ``problems``.

Endpoints (as documented by each provider):

- PagerDuty Events API v2: ``POST /v2/enqueue``: 202 ``{status, message, dedup_key}``;
  400 ``{status: "invalid event", message, errors: [...]}``.
- Opsgenie Alert API: ``POST /v2/alerts`` and ``POST /v2/alerts/{identifier}/{notes|acknowledge|close}``
  (``?identifierType=id|tiny|alias``), ``Authorization: GenieKey <key>``: 202 ``{result, took,
  requestId}``; 422 ``{message, errors: {field: text}, took, requestId}`` for semantic errors,
  400 for a body that is not JSON, 401 for a wrong key. Like Opsgenie, an action on an alert
  that does not exist is answered 202 (Opsgenie fails it asynchronously): it is recorded invalid.
- Slack incoming webhook: ``POST /services/T.../B.../<token>``: 200 ``ok``; 400 ``invalid_payload``,
  ``no_text``, ``invalid_blocks`` (header, section, context and divider blocks are modelled);
  404 ``no_service`` for an unknown webhook.
- Statuspage REST v1: ``POST /v1/pages/{page_id}/incidents``, ``PATCH|PUT
  /v1/pages/{page_id}/incidents/{incident_id}``, ``Authorization: OAuth <key>``: 201 / 200 with
  the incident JSON (``id``, ``status``, ``components``, ``incident_updates``...); 401, 404,
  400 ``{error}`` for a body without ``incident``, 422 ``{error: [...]}`` for invalid fields.

:meth:`FakeProviders.fail_next` makes the next requests of a provider fail with a given status
(429 with ``Retry-After``, 500, 503, or a 4xx) in that provider's error shape.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lab.context import SECRET_CANARY_ENV, new_secret

PROVIDERS = ("pagerduty", "opsgenie", "slack", "statuspage")
Provider = Literal["pagerduty", "opsgenie", "slack", "statuspage", "unknown"]


# --- the providers' documented request schemas ------------------------------------------------

class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# PagerDuty Events API v2 (developer.pagerduty.com, "Send an Alert Event"; events-v2 OpenAPI)
class PdLink(_Schema):
    href: str = Field(min_length=1)
    text: str | None = None


class PdImage(_Schema):
    src: str = Field(min_length=1)
    href: str | None = None
    alt: str | None = None


class PdPayload(_Schema):
    summary: str = Field(min_length=1, max_length=1024)
    source: str = Field(min_length=1)
    severity: Literal["critical", "error", "warning", "info"]
    timestamp: datetime | None = None
    component: str | None = None
    group: str | None = None
    class_: str | None = Field(None, alias="class")
    custom_details: dict[str, Any] | None = None


class PdEvent(_Schema):
    routing_key: str = Field(min_length=32, max_length=32)
    event_action: Literal["trigger", "acknowledge", "resolve"]
    dedup_key: str | None = Field(None, min_length=1, max_length=255)
    payload: PdPayload | None = None
    client: str | None = None
    client_url: str | None = None
    links: list[PdLink] | None = None
    images: list[PdImage] | None = None

    @model_validator(mode="after")
    def _per_action(self) -> PdEvent:
        if self.event_action == "trigger" and self.payload is None:
            raise ValueError("payload is required for a trigger event")
        if self.event_action != "trigger" and not self.dedup_key:
            raise ValueError(f"dedup_key is required for an {self.event_action} event")
        return self


# Opsgenie Alert API (docs.opsgenie.com/docs/alert-api; opsgenie-oas definitions/alert.yaml)
class OgResponder(_Schema):
    type: Literal["team", "user", "escalation", "schedule"]
    id: str | None = None
    name: str | None = None
    username: str | None = None


class OgAction(_Schema):
    user: str | None = Field(None, max_length=100)
    source: str | None = Field(None, max_length=100)
    note: str | None = Field(None, max_length=25000)


class OgNote(OgAction):
    note: str = Field(min_length=1, max_length=25000)


class OgCreate(OgAction):
    message: str = Field(min_length=1, max_length=130)
    alias: str | None = Field(None, max_length=512)
    description: str | None = Field(None, max_length=15000)
    responders: list[OgResponder] | None = Field(None, max_length=50)
    visibleTo: list[OgResponder] | None = Field(None, max_length=50)
    actions: list[Annotated[str, Field(max_length=50)]] | None = Field(None, max_length=10)
    tags: list[Annotated[str, Field(max_length=50)]] | None = Field(None, max_length=20)
    details: dict[str, str] | None = None
    entity: str | None = Field(None, max_length=512)
    priority: Literal["P1", "P2", "P3", "P4", "P5"] | None = None

    @model_validator(mode="after")
    def _details_size(self) -> OgCreate:
        if self.details and sum(len(k) + len(v) for k, v in self.details.items()) > 8000:
            raise ValueError("details are limited to 8000 characters in total")
        return self


# Slack incoming webhooks + Block Kit (docs.slack.dev: header, section, context, divider blocks)
class SlackPlainText(_Schema):
    type: Literal["plain_text"]
    text: str = Field(min_length=1, max_length=3000)
    emoji: bool | None = None


class SlackHeaderText(SlackPlainText):
    text: str = Field(min_length=1, max_length=150)


class SlackMrkdwn(_Schema):
    type: Literal["mrkdwn"]
    text: str = Field(min_length=1, max_length=3000)
    verbatim: bool | None = None


class SlackFieldText(_Schema):
    type: Literal["plain_text", "mrkdwn"]
    text: str = Field(min_length=1, max_length=2000)
    emoji: bool | None = None
    verbatim: bool | None = None


class SlackImage(_Schema):
    type: Literal["image"]
    image_url: str
    alt_text: str


SlackText = Annotated[SlackPlainText | SlackMrkdwn, Field(discriminator="type")]


class SlackHeader(_Schema):
    type: Literal["header"]
    text: SlackHeaderText
    block_id: str | None = Field(None, max_length=255)


class SlackSection(_Schema):
    type: Literal["section"]
    text: SlackText | None = None
    fields: list[SlackFieldText] | None = Field(None, max_length=10)
    accessory: dict[str, Any] | None = None
    block_id: str | None = Field(None, max_length=255)

    @model_validator(mode="after")
    def _text_or_fields(self) -> SlackSection:
        if self.text is None and not self.fields:
            raise ValueError("a section needs text or fields")
        return self


class SlackContext(_Schema):
    type: Literal["context"]
    elements: list[Annotated[SlackPlainText | SlackMrkdwn | SlackImage, Field(discriminator="type")]] = Field(
        min_length=1, max_length=10)
    block_id: str | None = Field(None, max_length=255)


class SlackDivider(_Schema):
    type: Literal["divider"]
    block_id: str | None = Field(None, max_length=255)


SlackBlock = Annotated[SlackHeader | SlackSection | SlackContext | SlackDivider, Field(discriminator="type")]


class SlackBlocks(_Schema):
    blocks: list[SlackBlock] = Field(max_length=50)


class SlackWebhook(_Schema):
    text: str | None = Field(None, max_length=40000)
    blocks: list[dict[str, Any]] | None = None  # checked by SlackBlocks (a separate error: invalid_blocks)
    attachments: list[dict[str, Any]] | None = None
    thread_ts: str | None = None
    mrkdwn: bool | None = None
    unfurl_links: bool | None = None
    unfurl_media: bool | None = None
    username: str | None = None
    icon_emoji: str | None = None
    icon_url: str | None = None
    channel: str | None = None


# Atlassian Statuspage REST v1 (developer.statuspage.io: postPagesPageIdIncidents,
# patchPagesPageIdIncidentsIncidentId)
SpIncidentStatus = Literal["investigating", "identified", "monitoring", "resolved",
                           "scheduled", "in_progress", "verifying", "completed"]
SpComponentStatus = Literal["operational", "under_maintenance", "degraded_performance",
                            "partial_outage", "major_outage"]


class SpIncidentPatch(_Schema):
    name: str | None = Field(None, min_length=1, max_length=255)
    status: SpIncidentStatus | None = None
    impact_override: Literal["none", "minor", "major", "critical"] | None = None
    scheduled_for: datetime | None = None
    scheduled_until: datetime | None = None
    scheduled_remind_prior: bool | None = None
    scheduled_auto_in_progress: bool | None = None
    scheduled_auto_completed: bool | None = None
    scheduled_auto_transition: bool | None = None
    auto_transition_to_maintenance_state: bool | None = None
    auto_transition_to_operational_state: bool | None = None
    auto_transition_deliver_notifications_at_start: bool | None = None
    auto_transition_deliver_notifications_at_end: bool | None = None
    auto_tweet_at_beginning: bool | None = None
    auto_tweet_on_completion: bool | None = None
    auto_tweet_on_creation: bool | None = None
    auto_tweet_one_hour_before: bool | None = None
    metadata: dict[str, dict[str, Any]] | None = None
    deliver_notifications: bool | None = None
    backfill_date: str | None = None
    backfilled: bool | None = None
    body: str | None = Field(None, max_length=25000)
    components: dict[str, SpComponentStatus] | None = None
    component_ids: list[str] | None = None


class SpIncidentCreate(SpIncidentPatch):
    name: str = Field(min_length=1, max_length=255)


class SpCreate(_Schema):
    incident: SpIncidentCreate


class SpPatch(_Schema):
    incident: SpIncidentPatch


def _problems(exc: ValidationError) -> list[str]:
    return [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors(include_url=False)]


# --- what was asked and what was answered -----------------------------------------------------

@dataclass
class Recorded:
    """One request the fake received, as it arrived, and what the fake made of it."""

    provider: str
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: Any  # the parsed JSON, or None when the body was not JSON
    raw: bytes
    at: datetime  # arrival, UTC
    monotonic: float  # arrival, time.monotonic(): compare these for waits between requests
    status: int = 0  # what the fake answered
    valid: bool = True  # the request followed the provider's documented schema
    problems: list[str] = field(default_factory=list)


@dataclass
class _Answer:
    status: int
    body: Any  # dict/list -> JSON, str -> text/plain
    headers: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class _Failure:
    status: int
    retry_after: float | None
    error: str | None


_NOT_JSON = object()


def _rid() -> str:
    return str(uuid.uuid4())


def _now() -> datetime:
    return datetime.now(timezone.utc)


class FakeProviders:
    """The four providers on one loopback port, recording and checking every request."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        canary = os.environ.get(SECRET_CANARY_ENV, "")
        # PagerDuty routing keys are 32 characters
        self.pagerduty_routing_key = (f"{canary}-{secrets.token_hex(16)}" if canary else secrets.token_hex(16))[:32]
        self.opsgenie_api_key = new_secret()
        self.statuspage_api_key = new_secret()
        self.slack_path = f"/services/T{secrets.token_hex(4).upper()}/B{secrets.token_hex(4).upper()}/{new_secret()}"
        self.statuspage_page_id = secrets.token_hex(6)
        self.statuspage_component_id = secrets.token_hex(6)
        self._lock = threading.Lock()
        self._records: list[Recorded] = []
        self._failures: dict[str, deque[_Failure]] = {p: deque() for p in PROVIDERS}
        self.alerts: dict[str, dict[str, Any]] = {}  # Opsgenie alerts by id
        self.incidents: dict[str, dict[str, Any]] = {}  # Statuspage incidents by id
        self.components: dict[str, dict[str, Any]] = {}
        self._reset_state()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeProviders:
        if self._server is not None:
            return self
        fake = self

        class Handler(_Handler):
            providers = fake

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fake-providers", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server, self._thread = None, None

    def __enter__(self) -> FakeProviders:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeProviders is not started: call start() first")
        return f"http://{self.host}:{self.port}"

    @property
    def slack_webhook_url(self) -> str:
        return self.url + self.slack_path

    def env(self) -> dict[str, str]:
        """The RUNBOOKS_* settings that point every notifier here, with the throwaway credentials
        (settings hold secret references, so the referenced ``FAKE_PROVIDERS_*`` variables too)."""
        secret_vars = {
            "FAKE_PROVIDERS_PAGERDUTY_ROUTING_KEY": self.pagerduty_routing_key,
            "FAKE_PROVIDERS_OPSGENIE_API_KEY": self.opsgenie_api_key,
            "FAKE_PROVIDERS_SLACK_WEBHOOK_URL": self.slack_webhook_url,
            "FAKE_PROVIDERS_STATUSPAGE_API_KEY": self.statuspage_api_key,
        }
        return {
            **secret_vars,
            "RUNBOOKS_PAGERDUTY_ROUTING_KEY": "env:FAKE_PROVIDERS_PAGERDUTY_ROUTING_KEY",
            "RUNBOOKS_PAGERDUTY_URL": self.url,
            "RUNBOOKS_OPSGENIE_API_KEY": "env:FAKE_PROVIDERS_OPSGENIE_API_KEY",
            "RUNBOOKS_OPSGENIE_URL": self.url,
            "RUNBOOKS_SLACK_WEBHOOK_URL": "env:FAKE_PROVIDERS_SLACK_WEBHOOK_URL",
            "RUNBOOKS_STATUSPAGE_API_KEY": "env:FAKE_PROVIDERS_STATUSPAGE_API_KEY",
            "RUNBOOKS_STATUSPAGE_PAGE_ID": self.statuspage_page_id,
            "RUNBOOKS_STATUSPAGE_COMPONENT_ID": self.statuspage_component_id,
            "RUNBOOKS_STATUSPAGE_URL": self.url,
        }

    def credentials(self) -> list[str]:
        """Every secret the fake hands out (tests assert none of them shows up anywhere)."""
        return [self.pagerduty_routing_key, self.opsgenie_api_key, self.statuspage_api_key,
                self.slack_webhook_url, self.slack_path]

    # --- what tests look at and program ------------------------------------------------------

    def requests(self, provider: str | None = None) -> list[Recorded]:
        with self._lock:
            return [r for r in self._records if provider is None or r.provider == provider]

    def clear(self) -> None:
        """Forget the recorded requests, the pending failures and the providers' state."""
        with self._lock:
            self._records.clear()
            for queue in self._failures.values():
                queue.clear()
            self._reset_state()

    def fail_next(self, provider: str, status: int, times: int = 1, retry_after: float | None = None,
                  error: str | None = None) -> None:
        """The next ``times`` requests to ``provider`` are answered ``status`` in its error shape
        (``retry_after``: a ``Retry-After`` header in seconds; ``error``: the error text)."""
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}: one of {', '.join(PROVIDERS)}")
        with self._lock:
            self._failures[provider].extend(_Failure(status, retry_after, error) for _ in range(times))

    def _reset_state(self) -> None:
        self.alerts = {}
        self.incidents = {}
        self.components = {self.statuspage_component_id: {
            "id": self.statuspage_component_id, "name": "Web", "status": "operational"}}

    # --- request handling (called by the HTTP handler's threads) -----------------------------

    def handle(self, method: str, target: str, headers: dict[str, str], raw: bytes) -> tuple[Recorded, _Answer]:
        parts = urlsplit(target)
        path = unquote(parts.path)
        query = dict(parse_qsl(parts.query))
        try:
            body: Any = json.loads(raw) if raw else None
            parsed: Any = body
        except (json.JSONDecodeError, UnicodeDecodeError):
            body, parsed = None, _NOT_JSON
        provider, route = self._route(method, parts.path)
        rec = Recorded(provider, method, path, query, headers, body, raw, _now(), time.monotonic())
        with self._lock:
            answer = self._answer(provider, route, rec, parsed)
            self._records.append(rec)
        rec.status = answer.status
        rec.problems = answer.problems
        rec.valid = not answer.problems
        return rec, answer

    def _route(self, method: str, raw_path: str) -> tuple[Provider, list[str]]:
        segments = [unquote(s) for s in raw_path.strip("/").split("/")]
        if segments[-1].endswith(".json"):
            segments[-1] = segments[-1][: -len(".json")]
        if segments[:2] == ["v2", "enqueue"]:
            return "pagerduty", segments
        if segments[:2] == ["v2", "alerts"]:
            return "opsgenie", segments
        if segments[:1] == ["services"]:
            return "slack", segments
        if segments[:1] == ["v1"] and segments[1:2] == ["pages"]:
            return "statuspage", segments
        return "unknown", segments

    def _answer(self, provider: Provider, route: list[str], rec: Recorded, parsed: Any) -> _Answer:
        if provider == "unknown":
            return _Answer(404, {"error": f"no fake provider serves {rec.method} {rec.path}"},
                           problems=[f"no provider endpoint {rec.method} {rec.path}"])
        serve = getattr(self, f"_{provider}")
        queue = self._failures[provider]
        if queue:  # checked all the same, but it changes nothing: the provider "failed"
            injected = _error_answer(provider, queue.popleft())
            injected.problems = serve(route, rec, parsed, apply=False).problems
            return injected
        answer: _Answer = serve(route, rec, parsed, apply=True)
        return answer

    # --- PagerDuty ---------------------------------------------------------------------------

    def _pagerduty(self, route: list[str], rec: Recorded, parsed: Any, apply: bool) -> _Answer:
        def invalid(*errors: str) -> _Answer:
            return _Answer(400, {"status": "invalid event", "message": "Event object is invalid",
                                 "errors": list(errors)}, problems=list(errors))

        if rec.method != "POST" or len(route) != 2:
            return _Answer(404, {"status": "not found", "message": "Not found"}, problems=["not an endpoint"])
        if parsed is _NOT_JSON or not isinstance(parsed, dict):
            return _Answer(400, {"status": "Unrecognized object", "message": "Event object format is unrecognized",
                                 "errors": ["JSON parse error"]}, problems=["body is not a JSON object"])
        problems = _content_type(rec)
        try:
            event = PdEvent.model_validate_json(rec.raw)
        except ValidationError as exc:
            return invalid(*problems, *_problems(exc))
        if event.routing_key != self.pagerduty_routing_key:
            return invalid(*problems, "Invalid routing key")
        if problems:
            return invalid(*problems)
        dedup_key = event.dedup_key or uuid.uuid4().hex
        return _Answer(202, {"status": "success", "message": "Event processed", "dedup_key": dedup_key})

    # --- Opsgenie ----------------------------------------------------------------------------

    def _opsgenie(self, route: list[str], rec: Recorded, parsed: Any, apply: bool) -> _Answer:
        def error(status: int, message: str, errors: dict[str, str] | None = None,
                  problems: list[str] | None = None) -> _Answer:
            body: dict[str, Any] = {"message": message, "took": 0.001, "requestId": _rid()}
            if errors:
                body["errors"] = errors
            return _Answer(status, body, problems=problems or [message])

        if rec.method != "POST" or len(route) not in (2, 4) or (len(route) == 4 and route[3] not in
                                                                ("notes", "acknowledge", "close")):
            return error(404, "Could not find the handler of the request", problems=["not an endpoint"])
        if rec.headers.get("authorization") != f"GenieKey {self.opsgenie_api_key}":
            return error(401, "Could not authenticate", problems=["Authorization is not 'GenieKey <the key>'"])
        if "application/json" not in rec.headers.get("content-type", ""):
            return error(415, "Unsupported Media Type", problems=["Content-Type is not application/json"])
        if parsed is _NOT_JSON or not isinstance(parsed, dict):
            return error(400, "Invalid JSON body", problems=["body is not a JSON object"])
        schema: type[_Schema] = OgCreate if len(route) == 2 else OgNote if route[3] == "notes" else OgAction
        try:
            request: Any = schema.model_validate_json(rec.raw)
        except ValidationError as exc:
            errors = {".".join(str(p) for p in e["loc"]) or "body": e["msg"] for e in exc.errors(include_url=False)}
            return error(422, "Request body is not processable. Please check the errors.", errors,
                         problems=_problems(exc))
        accepted = _Answer(202, {"result": "Request will be processed", "took": 0.01, "requestId": _rid()})
        if len(route) == 2:
            if apply:
                self._og_create(request)
            return accepted
        id_type = rec.query.get("identifierType", "id")
        if id_type not in ("id", "tiny", "alias"):
            return error(422, "Request is not processable", {"identifierType": "should be one of [id, tiny, alias]"},
                         problems=[f"identifierType {id_type!r} is not id, tiny or alias"])
        alert = self._og_find(route[2], id_type)
        if alert is None:  # Opsgenie accepts and fails asynchronously ("Alert does not exist")
            accepted.problems = [f"no alert with {id_type} {route[2]!r}: Opsgenie answers 202 and fails "
                                 "the request asynchronously (Alert does not exist)"]
            return accepted
        if apply:
            if request.note:
                alert["notes"].append(request.note)
            if route[3] == "acknowledge":
                alert["acknowledged"] = True
            elif route[3] == "close":
                alert["status"] = "closed"
        return accepted

    def _og_create(self, request: OgCreate) -> None:
        alias = request.alias or request.message
        existing = self._og_find(alias, "alias")
        if existing is not None and existing["status"] == "open":  # de-duplication by alias
            existing["count"] += 1
            return
        alert_id = _rid()
        self.alerts[alert_id] = {"id": alert_id, "tinyId": str(len(self.alerts) + 1), "alias": alias,
                                 "message": request.message, "priority": request.priority or "P3",
                                 "status": "open", "acknowledged": False, "count": 1, "notes": []}

    def _og_find(self, identifier: str, id_type: str) -> dict[str, Any] | None:
        key = {"id": "id", "tiny": "tinyId", "alias": "alias"}[id_type]
        matches = [a for a in self.alerts.values() if a[key] == identifier]
        open_ = [a for a in matches if a["status"] == "open"]
        found = open_ or matches
        return found[-1] if found else None

    # --- Slack -------------------------------------------------------------------------------

    def _slack(self, route: list[str], rec: Recorded, parsed: Any, apply: bool) -> _Answer:
        if rec.method != "POST" or rec.path != self.slack_path:
            return _Answer(404, "no_service", problems=["not the webhook's URL"])
        if parsed is _NOT_JSON or not isinstance(parsed, dict):
            return _Answer(400, "invalid_payload", problems=["body is not a JSON object"])
        problems = _content_type(rec)
        try:
            message = SlackWebhook.model_validate_json(rec.raw)
        except ValidationError as exc:
            return _Answer(400, "invalid_payload", problems=problems + _problems(exc))
        if not message.text and not message.blocks and not message.attachments:
            return _Answer(400, "no_text", problems=problems + ["neither text nor blocks nor attachments"])
        if message.blocks is not None:
            try:
                SlackBlocks.model_validate_json(json.dumps({"blocks": parsed["blocks"]}))
            except ValidationError as exc:
                return _Answer(400, "invalid_blocks", problems=problems + _problems(exc))
        if problems:
            return _Answer(400, "invalid_payload", problems=problems)
        return _Answer(200, "ok")

    # --- Statuspage --------------------------------------------------------------------------

    def _statuspage(self, route: list[str], rec: Recorded, parsed: Any, apply: bool) -> _Answer:
        def error(status: int, text: str | list[str], problems: list[str]) -> _Answer:
            return _Answer(status, {"error": text}, problems=problems)

        # route: v1 pages {page_id} incidents [{incident_id}]
        if len(route) not in (4, 5) or route[3] != "incidents" or \
                (len(route) == 4 and rec.method != "POST") or (len(route) == 5 and rec.method not in ("PATCH", "PUT")):
            return error(404, "Not found", ["not an endpoint"])
        if rec.headers.get("authorization") != f"OAuth {self.statuspage_api_key}":
            return error(401, "Could not authenticate", ["Authorization is not 'OAuth <the key>'"])
        if route[2] != self.statuspage_page_id:
            return error(404, "Page not found", [f"unknown page {route[2]!r}"])
        if parsed is _NOT_JSON or not isinstance(parsed, dict) or not isinstance(parsed.get("incident"), dict):
            return error(400, "incident is missing", ["body is not a JSON object with an incident object"])
        problems = _content_type(rec)
        creating = len(route) == 4
        try:
            request = (SpCreate if creating else SpPatch).model_validate_json(rec.raw)
        except ValidationError as exc:
            return error(422, [p for p in problems + _problems(exc)], problems + _problems(exc))
        incident_fields = request.incident
        unknown = [c for c in [*(incident_fields.components or {}), *(incident_fields.component_ids or [])]
                   if c not in self.components]
        problems += [f"component {c!r} does not exist on this page" for c in unknown]
        if incident_fields.status in ("scheduled", "in_progress", "verifying", "completed"):
            problems.append(f"status {incident_fields.status!r} is for scheduled maintenances, not realtime incidents")
        if problems:
            return error(422, problems, problems)
        if creating:
            return _Answer(201, self._sp_create(incident_fields) if apply else {})
        incident = self.incidents.get(route[4])
        if incident is None:
            return error(404, "Incident not found", [f"no incident {route[4]!r}"])
        return _Answer(200, self._sp_update(incident, incident_fields) if apply else {})

    def _sp_create(self, fields_: SpIncidentPatch) -> dict[str, Any]:
        incident_id = secrets.token_hex(6)
        now = _now().isoformat()
        incident: dict[str, Any] = {
                    "id": incident_id, "name": fields_.name, "status": "investigating", "impact": "none",
                    "page_id": self.statuspage_page_id, "created_at": now, "updated_at": now,
                    "monitoring_at": None, "resolved_at": None, "shortlink": f"https://stspg.io/{incident_id}",
                    "incident_updates": [], "components": []}
        self.incidents[incident_id] = incident
        return self._sp_update(incident, fields_)

    def _sp_update(self, incident: dict[str, Any], fields_: SpIncidentPatch) -> dict[str, Any]:
        now = _now().isoformat()
        if fields_.name:
            incident["name"] = fields_.name
        if fields_.status:
            incident["status"] = fields_.status
            if fields_.status == "monitoring":
                incident["monitoring_at"] = now
            if fields_.status == "resolved":
                incident["resolved_at"] = now
        for cid, status in (fields_.components or {}).items():
            self.components[cid]["status"] = status
        if fields_.status == "resolved":
            for cid in [c["id"] for c in incident["components"]]:
                self.components[cid]["status"] = "operational"
        affected = set(fields_.component_ids or []) | set(fields_.components or {}) | \
            {c["id"] for c in incident["components"]}
        incident["components"] = [dict(self.components[c]) for c in sorted(affected)]
        worst = {"major_outage": "critical", "partial_outage": "major", "degraded_performance": "minor"}
        impacts = [worst[c["status"]] for c in incident["components"] if c["status"] in worst]
        order = ["none", "minor", "major", "critical"]
        computed: str = max([*impacts, str(incident["impact"])], key=order.index)
        incident["impact"] = fields_.impact_override or computed
        incident["incident_updates"].insert(0, {
            "id": secrets.token_hex(6), "incident_id": incident["id"], "status": incident["status"],
            "body": fields_.body or "", "created_at": now, "display_at": now, "updated_at": now,
            "deliver_notifications": fields_.deliver_notifications is not False,
            "affected_components": [{"code": c["id"], "name": c["name"], "new_status": c["status"]}
                                    for c in incident["components"]]})
        incident["updated_at"] = now
        return json.loads(json.dumps(incident))


def _content_type(rec: Recorded) -> list[str]:
    ctype = rec.headers.get("content-type", "")
    return [] if re.match(r"^application/json\b", ctype) else [f"Content-Type is {ctype!r}, not application/json"]


_SLACK_ERRORS = {400: "invalid_payload", 403: "invalid_token", 404: "channel_not_found",
                 410: "channel_is_archived", 429: "rate_limited"}
_PD_STATUS = {429: "throttle event", 400: "invalid event"}


def _error_answer(provider: str, failure: _Failure) -> _Answer:
    """The provider's own error shape for an injected failure."""
    status, text = failure.status, failure.error
    headers = {} if failure.retry_after is None else {"Retry-After": f"{failure.retry_after:g}"}
    body: Any
    if provider == "pagerduty":
        body = {"status": _PD_STATUS.get(status, "error"),
                "message": text or ("Too many requests" if status == 429 else "Internal server error"
                                    if status >= 500 else "Event object is invalid"),
                "errors": [text] if text else []}
    elif provider == "opsgenie":
        body = {"message": text or ("You are making too many requests! To avoid errors, we recommend you "
                                    "limit requests." if status == 429 else "Internal Server Error"
                                    if status >= 500 else "Request body is not processable."),
                "took": 0.001, "requestId": _rid()}
    elif provider == "slack":
        body = text or _SLACK_ERRORS.get(status, "rollup_error")
    else:
        body = {"error": text or ("Rate limit exceeded" if status in (420, 429) else "Internal server error"
                                  if status >= 500 else "Bad request")}
    return _Answer(status, body, headers)


class _Handler(BaseHTTPRequestHandler):
    """Hands every request to the FakeProviders it belongs to and writes its answer."""

    providers: FakeProviders
    server_version = "fake-providers/1"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        _, answer = self.providers.handle(self.command, self.path, headers, raw)
        if isinstance(answer.body, str):
            data, ctype = answer.body.encode(), "text/html"
        else:
            data, ctype = json.dumps(answer.body).encode(), "application/json"
        self.send_response(answer.status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the records tell what happened
        pass
