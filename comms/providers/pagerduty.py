"""PagerDuty Events API v2: one alert per incident, ``dedup_key`` = the incident id.

``POST {base}/v2/enqueue`` with ``{routing_key, event_action, dedup_key, payload, links}``;
declared, update and escalated send ``trigger`` (the same dedup_key adds to the open alert),
acknowledged ``acknowledge``, resolved ``resolve``. ``payload`` (summary <= 1024 characters,
source, severity critical|error|warning|info, ...) is required for triggers only, so
acknowledge and resolve send the routing key, action and dedup key alone. PagerDuty answers
202 ``{status, message, dedup_key}``, 400 for an invalid event, 429 when throttled, 5xx.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from comms.messages import Message, render_text, title
from comms.providers.base import Call, Delivery, NotSent, Provider, answer_json, json_headers, truncate
from incident.inventory import SecretRef

SEVERITY = {"P0": "critical", "P1": "error", "P2": "warning", "P3": "info"}
ACTION = {"declared": "trigger", "update": "trigger", "escalated": "trigger",
          "acknowledged": "acknowledge", "resolved": "resolve"}
MAX_SUMMARY = 1024


class PagerDuty(Provider):
    name = "pagerduty"

    def __init__(self, routing_key: SecretRef, url: str = "https://events.pagerduty.com") -> None:
        super().__init__(routing_key, "RUNBOOKS_PAGERDUTY_ROUTING_KEY")
        self.url = url.rstrip("/") + "/v2/enqueue"

    def request(self, msg: Message, earlier: Sequence[Delivery]) -> Call | NotSent:
        action = ACTION[msg.kind]
        event: dict[str, Any] = {"routing_key": self.secret(), "event_action": action,
                                 "dedup_key": msg.incident_id}
        if action == "trigger":
            event["payload"] = {
                "summary": truncate(title(msg), MAX_SUMMARY),
                "source": msg.target,
                "severity": SEVERITY[msg.severity],
                "timestamp": msg.at.isoformat(),
                "component": msg.target,
                "group": msg.environment,
                "class": msg.scenario,
                "custom_details": {"incident_id": msg.incident_id, "status": msg.status,
                                   "text": render_text(msg), "drill": msg.drill},
            }
            if msg.run_url:
                event["links"] = [{"href": msg.run_url, "text": "Prefect run (incident record)"}]
        return Call(action, "POST", self.url, event, json_headers())

    def error_text(self, response: httpx.Response) -> str:
        body = answer_json(response)
        if isinstance(body, dict) and (body.get("message") or body.get("status")):
            errors = body.get("errors")
            text = str(body.get("message") or body.get("status"))
            if isinstance(errors, list) and errors:
                text += ": " + "; ".join(str(e) for e in errors)
            return self.scrub(truncate(text, 300))
        return super().error_text(response)
