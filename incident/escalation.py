"""The escalation hook: the run hands the incident to humans.

It always emits the Prefect event ``runbooks.incident.escalated`` (automations,
and later the PagerDuty / Opsgenie / Slack integrations, hang off it) and, when
``RUNBOOKS_ESCALATION_WEBHOOK_URL`` is set, POSTs the same JSON there.
"""

from __future__ import annotations

import httpx
from prefect.events import emit_event
from prefect.runtime import flow_run

from incident.errors import TargetUnreachableError
from incident.record import Incident
from incident.settings import get_settings

ESCALATED_EVENT = "runbooks.incident.escalated"


def escalate(incident: Incident, reason: str) -> None:
    rec = incident.record
    incident.escalated(reason)
    payload = {
        "incident_id": rec.incident_id,
        "scenario": rec.scenario,
        "target": rec.target,
        "environment": rec.environment,
        "severity": rec.severity.value,
        "reason": reason,
        "flow_run_id": str(flow_run.get_id() or ""),
    }
    emit_event(
        event=ESCALATED_EVENT,
        resource={"prefect.resource.id": f"runbooks.incident.{rec.incident_id}",
                  "prefect.resource.name": rec.incident_id},
        related=[{"prefect.resource.id": f"runbooks.service.{rec.target}",
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
