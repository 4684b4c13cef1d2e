"""The notifiers against the fake providers (lab/saas.py): a real HTTP server that checks every
request against the provider's documented schema and answers as the provider would, also with
429, 5xx and 4xx. No mocks; every test takes well under a second but the Retry-After one (1 s)."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterator

import httpx
import pytest

from comms import Delivery, Message, Notifiers
from incident.errors import ConfigurationError
from tests.comms.conftest import FAST

LIFECYCLE = ("declared", "acknowledged", "update", "escalated", "resolved")


def lifecycle(notifiers: Notifiers, message: Callable[..., Message], **changes: object) -> list[Delivery]:
    deliveries: list[Delivery] = []
    for minutes, kind in enumerate(LIFECYCLE):
        deliveries += notifiers.send(message(kind, minutes=minutes * 5, **changes), deliveries)
    return deliveries


def one(deliveries: list[Delivery], provider: str) -> Delivery:
    [delivery] = [d for d in deliveries if d.provider == provider]
    return delivery


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections (backlog) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


def test_every_provider_and_kind_is_delivered_and_schema_valid(notifiers, fake, message):
    assert notifiers.configured() == ["pagerduty", "opsgenie", "slack", "statuspage"]

    deliveries = lifecycle(notifiers, message)

    assert all(d.delivered for d in deliveries), [d for d in deliveries if not d.delivered]
    by_kind = {kind: sorted(d.provider for d in deliveries if d.kind == kind) for kind in LIFECYCLE}
    everyone = ["opsgenie", "pagerduty", "slack", "statuspage"]
    assert by_kind == {"declared": everyone, "acknowledged": ["opsgenie", "pagerduty", "slack"],
                       "update": everyone, "escalated": everyone, "resolved": everyone}
    assert all(d.attempts == 1 for d in deliveries)
    recorded = fake.requests()
    assert [(r.provider, r.problems) for r in recorded if not r.valid] == []
    assert {p: len(fake.requests(p)) for p in everyone} == {"pagerduty": 5, "opsgenie": 5, "slack": 5, "statuspage": 4}
    assert {r.status for r in recorded} <= {200, 201, 202}


def test_pagerduty_dedup_key_is_the_incident_id_from_trigger_to_resolve(notifiers, fake, message):
    lifecycle(notifiers, message)

    events = [r.body for r in fake.requests("pagerduty")]
    assert [e["event_action"] for e in events] == ["trigger", "acknowledge", "trigger", "trigger", "resolve"]
    assert {e["dedup_key"] for e in events} == {"INC-20250304-5f3a9c1e"}
    trigger = events[0]
    assert trigger["payload"]["severity"] == "critical"
    assert trigger["payload"]["summary"] == "P0 INCIDENT DECLARED: web is down: container lab-web exited"
    assert trigger["payload"]["source"] == "web"
    assert trigger["links"] == [{"href": "http://127.0.0.1:4200/runs/flow-run/1",
                                 "text": "Prefect run (incident record)"}]
    assert "payload" not in events[1] and "payload" not in events[4]  # ack/resolve: key and action only


@pytest.mark.parametrize("severity, pagerduty, opsgenie", [
    ("P0", "critical", "P1"), ("P1", "error", "P2"), ("P2", "warning", "P3"), ("P3", "info", "P4")])
def test_severity_maps_to_each_providers_scale(notifiers, fake, message, severity, pagerduty, opsgenie):
    [*_] = notifiers.send(message("declared", severity=severity))
    assert fake.requests("pagerduty")[0].body["payload"]["severity"] == pagerduty
    assert fake.requests("opsgenie")[0].body["priority"] == opsgenie


def test_opsgenie_alias_is_the_incident_id_from_create_to_close(notifiers, fake, message):
    lifecycle(notifiers, message)

    create, *actions = fake.requests("opsgenie")
    assert create.path == "/v2/alerts" and create.body["alias"] == "INC-20250304-5f3a9c1e"
    assert create.headers["authorization"] == f"GenieKey {fake.opsgenie_api_key}"
    assert len(create.body["message"]) <= 130
    assert [(r.path, r.query) for r in actions] == [
        (f"/v2/alerts/INC-20250304-5f3a9c1e/{action}", {"identifierType": "alias"})
        for action in ("acknowledge", "notes", "notes", "close")]
    assert actions[-1].body["note"].startswith("INCIDENT RESOLVED: ")
    [alert] = fake.alerts.values()  # one alert, acted on by alias throughout
    assert (alert["status"], alert["acknowledged"], len(alert["notes"])) == ("closed", True, 4)


def test_statuspage_creates_the_incident_then_patches_the_created_id(notifiers, fake, message):
    deliveries = lifecycle(notifiers, message)

    created = [d for d in deliveries if d.provider == "statuspage"][0]
    assert created.detail == f"201 created incident {created.ref}" and created.ref in fake.incidents
    create, *patches = fake.requests("statuspage")
    assert (create.method, create.path) == ("POST", f"/v1/pages/{fake.statuspage_page_id}/incidents")
    assert create.headers["authorization"] == f"OAuth {fake.statuspage_api_key}"
    component = fake.statuspage_component_id
    assert create.body["incident"]["components"] == {component: "major_outage"}
    assert create.body["incident"]["body"].startswith("We are currently investigating reports of checkout unavailable.")
    assert [(r.method, r.path) for r in patches] == [
        ("PATCH", f"/v1/pages/{fake.statuspage_page_id}/incidents/{created.ref}")] * 3
    assert [r.body["incident"]["status"] for r in patches] == ["identified", "identified", "resolved"]
    assert patches[0].body["incident"]["body"].startswith("We have identified the issue: checkout unavailable.")
    assert patches[-1].body["incident"]["components"] == {component: "operational"}
    assert patches[-1].body["incident"]["body"].startswith(
        "The issue has been resolved. All services are now operational.")
    incident = fake.incidents[created.ref]
    assert incident["status"] == "resolved" and incident["components"][0]["status"] == "operational"


def test_statuspage_update_without_a_created_incident_creates_nothing(notifiers, fake, message):
    deliveries = notifiers.send(message("update"), earlier=())

    statuspage = one(deliveries, "statuspage")
    assert (statuspage.delivered, statuspage.attempts) == (False, 0)
    assert statuspage.detail.startswith("not sent: no Statuspage incident to update")
    assert fake.requests("statuspage") == [] and fake.incidents == {}
    assert all(d.delivered for d in deliveries if d.provider != "statuspage")


def test_statuspage_declared_twice_updates_instead_of_opening_a_second_incident(notifiers, fake, message):
    first = notifiers.send(message("declared"))
    notifiers.send(message("declared"), first)
    assert [r.method for r in fake.requests("statuspage")] == ["POST", "PATCH"] and len(fake.incidents) == 1


def test_slack_posts_text_and_blocks(notifiers, fake, message):
    notifiers.send(message("update"))

    [post] = fake.requests("slack")
    assert post.path == fake.slack_path and post.valid
    assert post.body["text"].startswith("UPDATE: 14:05 UTC\nStatus: Identified\n")
    assert [b["type"] for b in post.body["blocks"]] == ["header", "section", "context"]
    assert post.body["blocks"][0]["text"]["text"] == "P0 UPDATE: web is down: container lab-web exited"
    assert "*Next Update:* 14:20 UTC" in post.body["blocks"][1]["text"]["text"]


def test_slack_429_waits_for_retry_after_then_delivers(notifiers, fake, message):
    fake.fail_next("slack", 429, retry_after=1)

    slack = one(notifiers.send(message("declared")), "slack")

    assert (slack.delivered, slack.attempts, slack.detail) == (True, 2, "200 ok")
    first, second = fake.requests("slack")
    assert (first.status, second.status) == (429, 200)
    assert second.monotonic - first.monotonic >= 1.0  # the second attempt came no earlier than Retry-After


def test_retry_after_beyond_the_budget_gives_up_at_once(notifiers, fake, message):
    fake.fail_next("slack", 429, retry_after=30)

    slack = one(notifiers.send(message("declared")), "slack")

    assert (slack.delivered, slack.attempts) == (False, 1)
    assert slack.detail == "gave up after 1 attempt: 429: rate_limited (Retry-After 30 s is beyond the 5 s budget)"
    assert len(fake.requests("slack")) == 1


def test_5xx_is_retried_then_delivered(notifiers, fake, message):
    fake.fail_next("pagerduty", 503, times=2)

    pagerduty = one(notifiers.send(message("declared")), "pagerduty")

    assert (pagerduty.delivered, pagerduty.attempts) == (True, 3)
    assert [r.status for r in fake.requests("pagerduty")] == [503, 503, 202]


def test_5xx_beyond_the_attempts_is_not_delivered(notifiers, fake, message):
    fake.fail_next("opsgenie", 500, times=3)

    deliveries = notifiers.send(message("declared"))

    opsgenie = one(deliveries, "opsgenie")
    assert (opsgenie.delivered, opsgenie.attempts) == (False, 3)
    assert opsgenie.detail == "gave up after 3 attempts: 500: Internal Server Error"
    assert len(fake.requests("opsgenie")) == 3 and fake.alerts == {}
    assert all(d.delivered for d in deliveries if d.provider != "opsgenie")  # the others are not held back


def test_4xx_is_not_retried_and_keeps_the_providers_words(notifiers, fake, message):
    fake.fail_next("slack", 400, error="invalid_blocks")
    fake.fail_next("statuspage", 422, error="Incident status is not valid")

    deliveries = notifiers.send(message("declared"))

    assert one(deliveries, "slack").model_dump(include={"delivered", "attempts", "detail"}) == {
        "delivered": False, "attempts": 1, "detail": "rejected 400: invalid_blocks"}
    assert one(deliveries, "statuspage").detail == "rejected 422: Incident status is not valid"
    assert len(fake.requests("slack")) == 1 and len(fake.requests("statuspage")) == 1


def test_a_refused_event_says_why_in_pagerdutys_words(fake, comms_env, message):
    comms_env({**fake.env(), **FAST, "FAKE_PROVIDERS_PAGERDUTY_ROUTING_KEY": "0" * 32})  # not the service's key

    pagerduty = one(Notifiers.from_settings().send(message("declared")), "pagerduty")

    assert (pagerduty.delivered, pagerduty.attempts) == (False, 1)
    assert pagerduty.detail == "rejected 400: Event object is invalid: Invalid routing key"
    assert "0" * 32 not in pagerduty.detail


def test_an_unreachable_provider_is_recorded_not_raised(fake, comms_env, message, closed_port):
    comms_env({**FAST, "RUNBOOKS_SLACK_WEBHOOK_URL": "env:FAKE_PROVIDERS_SLACK_WEBHOOK_URL",
               "FAKE_PROVIDERS_SLACK_WEBHOOK_URL": f"http://127.0.0.1:{closed_port}/services/T1/B1/secret-token"})

    [slack] = Notifiers.from_settings().send(message("declared"))

    assert (slack.provider, slack.delivered, slack.attempts) == ("slack", False, 3)
    assert slack.detail.startswith("gave up after 3 attempts: ConnectError")
    assert "secret-token" not in slack.detail and str(closed_port) not in slack.detail


def test_every_request_has_a_timeout(fake, comms_env, message, silent_port):
    comms_env({"RUNBOOKS_NOTIFY_ATTEMPTS": "1", "RUNBOOKS_NOTIFY_TIMEOUT_S": "0.3",
               "RUNBOOKS_OPSGENIE_API_KEY": "env:FAKE_PROVIDERS_OPSGENIE_API_KEY",
               "FAKE_PROVIDERS_OPSGENIE_API_KEY": "k", "RUNBOOKS_OPSGENIE_URL": f"http://127.0.0.1:{silent_port}"})

    [opsgenie] = Notifiers.from_settings().send(message("declared"))

    assert (opsgenie.delivered, opsgenie.attempts) == (False, 1)
    assert opsgenie.detail.startswith("gave up after 1 attempt: ReadTimeout")


def test_an_unresolvable_credential_is_recorded_not_raised(fake, comms_env, message):
    comms_env({"RUNBOOKS_SLACK_WEBHOOK_URL": "env:FAKE_PROVIDERS_NOT_SET"})

    [slack] = Notifiers.from_settings().send(message("declared"))

    assert (slack.delivered, slack.attempts) == (False, 0)
    assert slack.detail.startswith("not sent: credentials unavailable: [env:FAKE_PROVIDERS_NOT_SET]")


def test_no_secret_in_any_detail_or_log_line(notifiers, fake, comms_env, message, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, the HTTP client's included
    fake.fail_next("slack", 429, retry_after=0.1)
    fake.fail_next("opsgenie", 401)
    fake.fail_next("statuspage", 503)
    fake.fail_next("pagerduty", 400)
    deliveries = lifecycle(notifiers, message)
    comms_env({**fake.env(), **FAST, "FAKE_PROVIDERS_SLACK_WEBHOOK_URL": fake.slack_webhook_url + "x"})
    deliveries += Notifiers.from_settings().send(message("declared"))  # Slack: 404 no_service

    assert not all(d.delivered for d in deliveries) and any(d.delivered for d in deliveries)
    assert "HTTP Request: POST" in caplog.text  # the HTTP client logged its requests: they were checked
    texts = [d.detail for d in deliveries] + [r.getMessage() for r in caplog.records] + [caplog.text]
    for secret in fake.credentials():
        leaks = [t for t in texts if secret in t]
        assert leaks == [], f"a credential shows in {leaks[:2]}"
    assert any(r.name == "runbooks.comms" and r.levelno == logging.WARNING for r in caplog.records)


def test_half_configured_statuspage_names_the_missing_settings(comms_env):
    comms_env({"RUNBOOKS_STATUSPAGE_API_KEY": "env:SP_KEY", "RUNBOOKS_STATUSPAGE_PAGE_ID": "abc123"})

    with pytest.raises(ConfigurationError) as raised:
        Notifiers.from_settings()

    assert "RUNBOOKS_STATUSPAGE_COMPONENT_ID" in str(raised.value)
    assert raised.value.next_step.startswith("set RUNBOOKS_STATUSPAGE_COMPONENT_ID")


def test_a_credential_that_is_not_a_secret_reference_is_refused_unshown(comms_env):
    comms_env({"RUNBOOKS_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T1/B1/very-secret"})

    with pytest.raises(ConfigurationError) as raised:
        Notifiers.from_settings()

    assert "RUNBOOKS_SLACK_WEBHOOK_URL" in str(raised.value) and "very-secret" not in str(raised.value)


def test_an_invalid_number_names_its_setting(comms_env):
    comms_env({"RUNBOOKS_NOTIFY_ATTEMPTS": "many"})
    with pytest.raises(ConfigurationError, match="RUNBOOKS_NOTIFY_ATTEMPTS"):
        Notifiers.from_settings()


def test_nothing_configured_sends_nothing(comms_env, fake, message):
    comms_env({})
    notifiers = Notifiers.from_settings()
    assert notifiers.configured() == [] and notifiers.send(message("declared")) == []
    assert fake.requests() == []


def test_a_drill_says_so_everywhere_and_never_reaches_the_status_page(notifiers, fake, message):
    deliveries = lifecycle(notifiers, message, drill=True)

    assert all(d.delivered for d in deliveries) and "statuspage" not in {d.provider for d in deliveries}
    assert fake.requests("statuspage") == [] and fake.incidents == {}
    assert all(r.valid for r in fake.requests())
    for event in (r.body for r in fake.requests("pagerduty")):
        assert "payload" not in event or event["payload"]["summary"].startswith("[DRILL] ")
    create, *actions = fake.requests("opsgenie")
    assert create.body["message"].startswith("[DRILL] ") and create.body["description"].startswith("[DRILL] ")
    assert "drill" in create.body["tags"] and all(a.body["note"].startswith("[DRILL] ") for a in actions)
    for post in fake.requests("slack"):
        assert post.body["text"].startswith("[DRILL] ")
        assert post.body["blocks"][0]["text"]["text"].startswith("[DRILL] ")


def test_fake_providers_refuse_schema_violations_in_each_providers_shape(fake):
    def post(path: str, body: object, method: str = "POST", **headers: str) -> httpx.Response:
        return httpx.request(method, fake.url + path, content=json.dumps(body),
                             headers={"Content-Type": "application/json", **headers}, timeout=5)

    pd = post("/v2/enqueue", {"routing_key": fake.pagerduty_routing_key, "event_action": "trigger"})
    assert pd.status_code == 400 and pd.json()["status"] == "invalid event"
    og = post("/v2/alerts", {"message": "x" * 131, "priority": "P9"},
              Authorization=f"GenieKey {fake.opsgenie_api_key}")
    assert og.status_code == 422 and set(og.json()["errors"]) == {"message", "priority"}
    slack = post(fake.slack_path, {"text": "t", "blocks": [{"type": "header", "text": {
        "type": "plain_text", "text": "h" * 151}}]})
    assert (slack.status_code, slack.text) == (400, "invalid_blocks")
    sp = post(f"/v1/pages/{fake.statuspage_page_id}/incidents", {"incident": {
        "name": "n", "components": {fake.statuspage_component_id: "broken"}}},
        Authorization=f"OAuth {fake.statuspage_api_key}")
    assert sp.status_code == 422 and "error" in sp.json()
    assert post("/v2/alerts", {"message": "m"}, Authorization="GenieKey wrong").status_code == 401
    assert post("/v2/alerts/nope/close?identifierType=alias", {}, Authorization=f"GenieKey {fake.opsgenie_api_key}"
                ).status_code == 202  # as Opsgenie: accepted, failed asynchronously

    recorded = fake.requests()
    assert [r.valid for r in recorded] == [False] * 6
    assert any("payload is required" in p for p in recorded[0].problems)
    assert any("alias 'nope'" in p for p in recorded[-1].problems)


def test_an_alias_with_a_slash_is_quoted_in_the_path(notifiers, fake, message):
    earlier = notifiers.send(message("declared", incident_id="INC 1/2"))
    notifiers.send(message("update", incident_id="INC 1/2"), earlier)

    create, note = fake.requests("opsgenie")
    assert note.valid, note.problems  # the fake found the alert by its alias
    assert len(fake.alerts) == 1 and [a["notes"] for a in fake.alerts.values()] != [[]]
