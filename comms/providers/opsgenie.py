"""Opsgenie Alert API: one alert per incident, ``alias`` = the incident id.

Every request carries ``Authorization: GenieKey <key>``. Declared creates the alert
(``POST {base}/v2/alerts``: message <= 130 characters, alias <= 512, description <= 15000,
priority P1..P5, tags <= 20 of <= 50 characters, details string map, source, entity);
update and escalated add a note (``POST /v2/alerts/{alias}/notes?identifierType=alias``,
note <= 25000); acknowledged acknowledges and resolved closes the alert (``.../acknowledge``,
``.../close``, each with a note). Opsgenie answers 202 ``{result, took, requestId}`` and
processes the request asynchronously; 422 for semantic errors ``{message, errors, ...}``,
400 for a body that is not JSON, 401 for a bad key, 429, 5xx.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx

from comms.messages import Message, render_text, title
from comms.providers.base import (
    SOURCE, Call, Delivery, NotSent, Provider, answer_json, json_headers, truncate,
)
from incident.inventory import SecretRef

PRIORITY = {"P0": "P1", "P1": "P2", "P2": "P3", "P3": "P4"}
ACTION = {"update": "notes", "escalated": "notes", "acknowledged": "acknowledge", "resolved": "close"}
MAX_MESSAGE, MAX_DESCRIPTION, MAX_NOTE, MAX_TAG = 130, 15000, 25000, 50


class Opsgenie(Provider):
    name = "opsgenie"

    def __init__(self, api_key: SecretRef, url: str = "https://api.opsgenie.com") -> None:
        super().__init__(api_key, "RUNBOOKS_OPSGENIE_API_KEY")
        self.url = url.rstrip("/") + "/v2/alerts"

    def _headers(self) -> dict[str, str]:
        return json_headers(Authorization=f"GenieKey {self.secret()}")

    def request(self, msg: Message, earlier: Sequence[Delivery]) -> Call | NotSent:
        if msg.kind == "declared":
            return Call("create alert", "POST", self.url, self._create(msg), self._headers())
        action = ACTION[msg.kind]
        url = f"{self.url}/{quote(msg.incident_id, safe='')}/{action}?identifierType=alias"
        body = {"note": truncate(render_text(msg), MAX_NOTE), "source": SOURCE}
        return Call({"notes": "add note"}.get(action, action), "POST", url, body, self._headers())

    def _create(self, msg: Message) -> dict[str, Any]:
        tags = [msg.severity, msg.scenario, msg.target, msg.environment] + (["drill"] if msg.drill else [])
        details = {"incident_id": msg.incident_id, "scenario": msg.scenario, "target": msg.target,
                   "environment": msg.environment, "severity": msg.severity, "status": msg.status}
        if msg.run_url:
            details["run_url"] = msg.run_url
        return {
            "message": truncate(title(msg), MAX_MESSAGE),
            "alias": msg.incident_id,
            "description": truncate(render_text(msg), MAX_DESCRIPTION),
            "priority": PRIORITY[msg.severity],
            "tags": [truncate(t, MAX_TAG) for t in dict.fromkeys(tags) if t],
            "details": details,
            "entity": truncate(msg.target, 512),
            "source": SOURCE,
        }

    def error_text(self, response: httpx.Response) -> str:
        body = answer_json(response)
        if isinstance(body, dict) and body.get("message"):
            text = str(body["message"])
            errors = body.get("errors")
            if isinstance(errors, dict) and errors:
                text += " (" + "; ".join(f"{k}: {v}" for k, v in errors.items()) + ")"
            return self.scrub(truncate(text, 300))
        return super().error_text(response)
