"""The escalation hook: the run hands the incident to humans.

It always emits the Prefect event ``runbooks.incident.escalated`` (automations hang off
it), POSTs the same JSON to ``RUNBOOKS_ESCALATION_WEBHOOK_URL`` when set, and moves the
incident one level up the escalation ladder, telling the configured notifiers
(``incident/comms.py``).
"""

from __future__ import annotations

import httpx
from pydantic import BaseModel, Field
from prefect.events import emit_event
from prefect.runtime import flow_run

from incident.comms import clock_for
from incident.errors import TargetUnreachableError
from incident.record import Incident, IncidentRecord
from incident.settings import get_settings

ESCALATED_EVENT = "runbooks.incident.escalated"


class EscalationNotice(BaseModel):
    """What an escalation says, as the event payload and the webhook's JSON body.

    One schema whoever sends it (a run, its failure hook, the gateway's recovery): build it
    with ``of`` from the incident record, so ``scenario`` is the flow's scenario name and
    ``environment`` the inventory's, never a deployment name or a blank.
    """

    incident_id: str
    scenario: str
    target: str
    environment: str
    severity: str
    reason: str
    flow_run_id: str = ""
    outcome: str = Field(description="the record's outcome when it escalated: open, failed, ...")

    @classmethod
    def of(cls, record: IncidentRecord, reason: str, flow_run_id: object = "") -> EscalationNotice:
        return cls(incident_id=record.incident_id, scenario=record.scenario, target=record.target,
                   environment=record.environment, severity=record.severity.value, reason=reason,
                   flow_run_id=str(flow_run_id or ""), outcome=record.outcome)


def escalate(incident: Incident, reason: str) -> None:
    """Inside a flow: mark the record escalated and hand the incident to humans."""
    incident.escalated(reason)
    send_escalation(EscalationNotice.of(incident.record, reason, flow_run.get_id()))
    clock_for(incident).escalate_now(reason)  # the ladder: one level up, told


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
