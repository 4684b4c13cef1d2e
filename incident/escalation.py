"""The escalation hook: the run hands the incident to humans.

It always emits the Prefect event ``runbooks.incident.escalated`` (automations,
and later the PagerDuty / Opsgenie / Slack integrations, hang off it) and, when
``RUNBOOKS_ESCALATION_WEBHOOK_URL`` is set, POSTs the same JSON there.
"""

from __future__ import annotations

import httpx
from pydantic import BaseModel
from prefect.events import emit_event
from prefect.runtime import flow_run

from incident.errors import TargetUnreachableError
from incident.record import Incident
from incident.settings import get_settings

ESCALATED_EVENT = "runbooks.incident.escalated"


class EscalationNotice(BaseModel):
    """What an escalation says, as the event payload and the webhook's JSON body."""

    incident_id: str
    scenario: str
    target: str
    environment: str = ""
    severity: str = ""
    reason: str
    flow_run_id: str = ""


def escalate(incident: Incident, reason: str) -> None:
    """Inside a flow: mark the record escalated and hand the incident to humans."""
    rec = incident.record
    incident.escalated(reason)
    send_escalation(EscalationNotice(
        incident_id=rec.incident_id, scenario=rec.scenario, target=rec.target,
        environment=rec.environment, severity=rec.severity.value, reason=reason,
        flow_run_id=str(flow_run.get_id() or "")))


def send_escalation(notice: EscalationNotice) -> None:
    """Emit ``runbooks.incident.escalated`` and POST the optional webhook."""
    payload = notice.model_dump()
    emit_event(
        event=ESCALATED_EVENT,
        resource={"prefect.resource.id": f"runbooks.incident.{notice.incident_id}",
                  "prefect.resource.name": notice.incident_id},
        related=[{"prefect.resource.id": f"runbooks.service.{notice.target}",
                  "prefect.resource.role": "service"}],
        payload=payload,
    )
    url = get_settings().escalation_webhook_url
    if url:
        try:
            httpx.post(url, json=payload, timeout=5.0).raise_for_status()
        except httpx.HTTPError as exc:
            raise TargetUnreachableError(
                "escalation webhook", f"POST failed ({type(exc).__name__})", "a 2xx answer",
                "page the on-call by hand: the escalation webhook did not accept the incident",
            ) from None
