"""Atlassian Statuspage (REST v1): the public incident and the component's status.

``Authorization: OAuth <api key>``. Declared creates the incident (``POST
{base}/v1/pages/{page_id}/incidents`` with ``{"incident": {name <= 255, status, body <= 25000,
component_ids, components: {id: status}, deliver_notifications}}``, answered 201 with the
incident and its ``id``); update and escalated patch its status and body (``PATCH
.../incidents/{id}``, answered 200); resolved patches it ``resolved`` with the component
``operational``. The incident id comes from the last delivered Statuspage Delivery's ``ref``:
without one an update creates nothing and says why. Statuspage is never told about drills
(a public page) nor about acknowledgements. Its API allows about one request per second per
key and answers 420 or 429 beyond that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx

from comms.messages import Message, render_status_page
from comms.providers.base import Accepted, Call, Delivery, NotSent, Provider, answer_json, json_headers, truncate
from incident.inventory import SecretRef

COMPONENT_STATUS = {"P0": "major_outage", "P1": "partial_outage",
                    "P2": "degraded_performance", "P3": "degraded_performance"}
INCIDENT_STATUS = {"investigating": "investigating", "identified": "identified", "fixing": "identified",
                   "monitoring": "monitoring", "resolved": "resolved"}
KINDS = ("declared", "update", "escalated", "resolved")
MAX_NAME, MAX_BODY = 255, 25000


def incident_ref(earlier: Sequence[Delivery]) -> str | None:
    """The Statuspage incident this incident created, from its earlier deliveries."""
    for d in reversed(earlier):
        if d.provider == "statuspage" and d.delivered and d.ref:
            return d.ref
    return None


class Statuspage(Provider):
    name = "statuspage"

    def __init__(self, api_key: SecretRef, page_id: str, component_id: str,
                 url: str = "https://api.statuspage.io", deliver_notifications: bool = True) -> None:
        super().__init__(api_key, "RUNBOOKS_STATUSPAGE_API_KEY")
        self.incidents_url = f"{url.rstrip('/')}/v1/pages/{quote(page_id, safe='')}/incidents"
        self.component_id = component_id
        self.deliver_notifications = deliver_notifications

    def takes(self, msg: Message) -> bool:
        return msg.kind in KINDS and not msg.drill

    def request(self, msg: Message, earlier: Sequence[Delivery]) -> Call | NotSent:
        ref = incident_ref(earlier)
        resolved = msg.kind == "resolved"
        component = "operational" if resolved else COMPONENT_STATUS[msg.severity]
        incident: dict[str, Any] = {
            "status": "resolved" if resolved else INCIDENT_STATUS[msg.status],
            "body": truncate(render_status_page(msg), MAX_BODY),
            "component_ids": [self.component_id],
            "components": {self.component_id: component},
            "deliver_notifications": self.deliver_notifications,
        }
        headers = json_headers(Authorization=f"OAuth {self.secret()}")
        if ref is not None:  # an update, or a declared message sent again: never a second incident
            url = f"{self.incidents_url}/{quote(ref, safe='')}"
            return Call("update incident", "PATCH", url, {"incident": incident}, headers)
        if msg.kind != "declared":
            return NotSent(f"no Statuspage incident to {'resolve' if resolved else 'update'}: the "
                           f"declared message of {msg.incident_id} did not create one (see its "
                           "earlier deliveries); update the status page by hand if it shows the incident")
        incident["name"] = truncate(msg.summary, MAX_NAME)
        return Call("create incident", "POST", self.incidents_url, {"incident": incident}, headers)

    def accepted(self, call: Call, response: httpx.Response) -> Accepted:
        body = answer_json(response)
        ref = body.get("id") if isinstance(body, dict) else None
        verb = "created" if call.method == "POST" else "updated"
        if not isinstance(ref, str) or not ref:
            return Accepted(f"{response.status_code} {verb}, but the answer carried no incident id: "
                            "later updates cannot reach this incident; update it by hand")
        return Accepted(f"{response.status_code} {verb} incident {ref}", ref=ref)

    def error_text(self, response: httpx.Response) -> str:
        body = answer_json(response)
        if isinstance(body, dict):
            error = body.get("error") or body.get("message") or body.get("errors")
            if isinstance(error, list):
                error = "; ".join(str(e) for e in error)
            if error:
                return self.scrub(truncate(str(error), 300))
        return super().error_text(response)
