"""The upstream-outage runbook against the real lab: the prices API down or rate limiting, the
web's circuit breaker open; the run serves cached prices, waits for the upstream (backoff,
Retry-After honoured), goes back to it and proves it - or stays degraded and escalates."""

from __future__ import annotations

import re
from uuid import UUID

import pytest

from flows.upstream_outage import upstream_outage
from incident.inventory import load_target
from tasks.app import AppStatus, read_app_status
from tests.helpers import (
    alert_ids, escalations, new_incident_id, report, wait_for, wait_for_alert_incident, wait_run_final,
)

pytestmark = pytest.mark.lab

POLICY = "policy:degrade-service-in-lab"
PROBE = re.compile(r"upstream probe \d+ after waiting ([\d.]+) s \((?:the upstream had asked for ([\d.]+) s"
                   r"|no Retry-After asked)\)")


def _status(lab) -> AppStatus:
    return read_app_status.fn(load_target("web", lab.inventory_path))


def _breaker_open(lab) -> None:
    wait_for(lambda: _status(lab).breaker != "closed", "the web's circuit breaker to open", timeout_s=20)


def _probe_waits(text: str) -> list[tuple[float, float]]:
    """(waited, asked) of every probe of the wait on the timeline."""
    return [(float(w), float(a or 0)) for w, a in PROBE.findall(text)]


def _upstream_name(lab) -> str:
    return load_target("web", lab.inventory_path).service.app.upstream.name


def test_upstream_down_alert_degrades_waits_and_goes_back(quiet_pipeline):
    lab, store = quiet_pipeline
    since = alert_ids(store)
    lab.inject("upstream-down")

    row = wait_for_alert_incident(store, "upstream-outage", since)
    run = wait_run_final(UUID(row["flow_run_id"]))

    assert run.state.is_completed() and run.state.name == "Completed", run.state.message
    assert lab.fault_healthy("upstream-down")
    status = _status(lab)
    assert status.breaker == "closed" and not status.degraded, status.describe()

    text = report(row["incident_id"])
    name = _upstream_name(lab)
    assert "**Status:** resolved" in text
    assert "- kind: alert; source: alertmanager" in text and "UpstreamFailing" in text
    assert f"| set_degraded_mode | approved | {POLICY} |" in text
    assert f"| leave_degraded_mode | approved | {POLICY} |" in text, "one step, one approval: out of it"
    assert "| set_degraded_mode | web | yes | degraded mode on" in text
    assert re.search(r"\| leave_degraded_mode \| web \| yes \| breaker closed \(was (open|half_open), "
                     r"\d+ consecutive failures\); degraded mode off", text)
    assert f"| upstream {name} | **problem** |" in text and "health 503" in text, "the upstream's own health"
    assert re.search(r"\| circuit breaker \| \*\*problem\*\* \| circuit breaker (open|half_open) ", text)
    assert "| upstream failures | **problem** |" in text
    assert re.search(r"by reason: rate_limited \d+, error [1-9]", text), "the failures by reason"
    assert "| serving from cache | ok |" in text
    assert "| upstream recovery | ok |" in text and _probe_waits(text), "the wait's probes on the timeline"
    assert "## Verification\n\nverified: in " in text and "breaker closed" in text
    for phase in ("| diagnose |", "| contain |", "| fix |", "| verify |", "| close |"):
        assert phase in text, f"timeline lacks {phase}"


def test_rate_limited_upstream_is_never_probed_sooner_than_it_asked(prefect_api, healthy_lab):
    lab = healthy_lab
    lab.inject("upstream-rate-limited")
    _breaker_open(lab)

    incident_id = new_incident_id()
    state = upstream_outage(target="web", incident_id=incident_id, first_wait_s=0.5, max_wait_s=2,
                            containment_window_s=1, verify_window_s=2, return_state=True)

    assert state.is_completed() and state.name == "Completed", state.message
    assert lab.fault_healthy("upstream-rate-limited")
    status = _status(lab)
    assert status.breaker == "closed" and not status.degraded, status.describe()
    text = report(incident_id)
    assert "Retry-After 3 s" in text.split("## Findings", 1)[1].split("##", 1)[0], "the diagnosis saw the 429"
    waits = _probe_waits(text)
    assert any(asked >= 3 for _, asked in waits), f"no probe followed a Retry-After: {waits}"
    assert all(waited >= asked for waited, asked in waits), f"probed sooner than asked: {waits}"
    assert "| upstream recovery | ok |" in text and "**Status:** resolved" in text


def test_upstream_down_for_good_stays_degraded_and_escalates(prefect_api, healthy_lab):
    lab = healthy_lab
    lab.inject("upstream-down-for-good")
    _breaker_open(lab)
    params = dict(target="web", upstream_deadline_s=3, first_wait_s=0.5, max_wait_s=1,
                  containment_window_s=1, return_state=True)

    # a dry run first: it plans degraded mode and changes nothing
    dry_id = new_incident_id()
    dry = upstream_outage(dry_run=True, incident_id=dry_id, **params)
    assert dry.name == "Dry Run", dry.message
    assert not _status(lab).degraded, "the dry run switched degraded mode on"
    assert "| set_degraded_mode | dry run | dry run |" in report(dry_id)

    incident_id = new_incident_id()
    state = upstream_outage(incident_id=incident_id, **params)

    assert state.is_failed(), state
    message = state.message or ""
    assert "did not answer again within 3 s" in message
    assert "stays in degraded mode, serving cached prices" in message
    assert "contact the provider" in message and "keep web in degraded mode until" in message
    assert "/admin/breaker?state=closed" in message and "/admin/degraded?on=0" in message
    status = _status(lab)
    assert status.degraded and status.breaker != "closed", "the service must be left degraded"
    assert not lab.fault_healthy("upstream-down-for-good")

    text = report(incident_id)
    assert "**Status:** failed" in text
    escalation = text.split("## Escalations", 1)[1]
    assert "stays in degraded mode, serving cached prices" in escalation
    assert "this run changed: set_degraded_mode on web" in escalation
    assert f"| set_degraded_mode | approved | {POLICY} |" in text
    assert "| leave_degraded_mode |" not in text, "the breaker must not be closed for a dead upstream"
    assert "| upstream recovery | **problem** |" in text and "| left degraded | ok |" in text
    token = load_target("web", lab.inventory_path).service.app.admin_token.resolve().get_secret_value()
    assert token not in text and token not in message
    found = escalations(prefect_api, incident_id)
    assert found and found[0]["payload"]["target"] == "web"


def test_healthy_upstream_is_left_alone(prefect_api, healthy_lab):
    incident_id = new_incident_id()
    state = upstream_outage(target="web", incident_id=incident_id, return_state=True)
    assert state.is_completed() and state.name == "Already Fine", state.message
    text = report(incident_id)
    assert "| - | none | - | - | - |" in text and "| circuit breaker | ok |" in text
