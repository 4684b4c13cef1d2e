"""The HTTP surface, in-process (httpx ASGITransport): 202 / 401 / 413 / 415 / 422, never 5xx."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from gateway.__main__ import service_down_alert
from gateway.app import create_app
from gateway.intake_memory import RecordingIntake
from gateway.models import SOURCES, Alert, Delivery
from gateway.routing import Router
from gateway.settings import GatewaySettings
from gateway.sources import PARSERS
from incident.settings import REPO_ROOT
from tests.gateway.conftest import payload, payload_files

SECRET = "app-test-secret"
JSON = {"content-type": "application/json"}


@pytest.fixture(autouse=True)
def _inventory(test_inventory):
    """The router checks targets against this inventory."""


def call(app, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None):
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.request(method, path, content=body, headers=headers or {})
    return asyncio.run(go())


def make(**settings: Any) -> tuple[Any, RecordingIntake]:
    """An app whose sources without a secret here are explicitly allowed unverified (loopback)."""
    settings.setdefault("insecure_sources", list(SOURCES))
    intake = RecordingIntake(Router.from_file(REPO_ROOT / "routes.yaml"))
    return create_app(GatewaySettings(**settings), intake), intake


@pytest.mark.parametrize("path", [p.relative_to(p.parents[1]).as_posix() for p in payload_files()])
def test_every_payload_file_is_accepted(path):
    app, intake = make()
    source = path.split("/")[0]
    response = call(app, "POST", f"/alerts/{source}", payload(path),
                    {**JSON, "X-Webhook-Id": "d-1"})
    assert response.status_code == 202, response.text
    body = response.json()
    [(delivery, alerts)] = intake.deliveries
    assert body["alerts"] == len(alerts) >= 1
    assert body["firing"] + body["resolved"] == len(alerts)
    assert body["fingerprints"] == [a.fingerprint for a in alerts]
    assert len(body["intake"]["routes"]) == body["intake"]["accepted"]
    assert (delivery.source, delivery.delivery_id, delivery.remote_addr) == (source, "d-1", "10.1.2.3")


def test_summary_counts_mixed_statuses_and_intake_dedups():
    app, intake = make()
    body = payload("alertmanager/bougou_mixed-firing-resolved.json")
    first = call(app, "POST", "/alerts/alertmanager", body, JSON).json()
    assert (first["alerts"], first["firing"], first["resolved"]) == (4, 3, 1)
    again = call(app, "POST", "/alerts/alertmanager", body, JSON).json()
    assert again["intake"] == {"accepted": 0, "duplicates": 4, "routes": []}


def test_acknowledged_counted():
    app, _ = make()
    body = call(app, "POST", "/alerts/pagerduty", payload("pagerduty/zulip_acknowledged_v3.json"),
                JSON).json()
    assert (body["firing"], body["acknowledged"]) == (1, 1)


def test_routed_decision_in_response():
    app, intake = make()
    alert = (b'{"status":"firing","alerts":[{"status":"firing","labels":'
             b'{"alertname":"ServiceDown","service":"web"},"startsAt":"2024-05-01T10:00:00Z"}]}')
    body = call(app, "POST", "/alerts/alertmanager", alert, JSON).json()
    [route] = body["intake"]["routes"]
    assert route["routed"] and route["scenario"] == "service-down/service-down"
    assert route["target"] == "web"


def sign(body: bytes) -> str:
    return hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


SIGNED = [
    ("grafana", "grafana/bougou_grafana-alert.json", {"grafana_secret": SECRET},
     lambda b: {"X-Grafana-Alerting-Signature": sign(b)}),
    ("sentry", "sentry/zulip_issue_resolved.json", {"sentry_client_secret": SECRET},
     lambda b: {"Sentry-Hook-Signature": sign(b), "Sentry-Hook-Timestamp": str(int(time.time()))}),
    ("pagerduty", "pagerduty/zulip_resolved_v3.json", {"pagerduty_secret": SECRET},
     lambda b: {"X-PagerDuty-Signature": f"v1={'0' * 64},v1={sign(b)}"}),
    ("opsgenie", "opsgenie/zulip_close.json", {"opsgenie_secret": SECRET},
     lambda b: {"X-Opsgenie-Secret": SECRET}),
    ("alertmanager", "alertmanager/zulip_alert.json", {"alertmanager_bearer_token": SECRET},
     lambda b: {"Authorization": f"Bearer {SECRET}"}),
    ("cloudevents", "cloudevents/ce-conformance_validMinimal.json",
     {"cloudevents_bearer_token": SECRET}, lambda b: {"Authorization": f"Bearer {SECRET}"}),
]


@pytest.mark.parametrize("source, path, settings, auth", SIGNED, ids=[s[0] for s in SIGNED])
def test_authentication(source, path, settings, auth):
    app, intake = make(**settings)
    body = payload(path)
    ok = call(app, "POST", f"/alerts/{source}", body, {**JSON, **auth(body)})
    assert ok.status_code == 202, ok.text
    missing = call(app, "POST", f"/alerts/{source}", body, JSON)
    assert missing.status_code == 401 and "missing" in missing.json()["detail"]
    missing_ts = {k: v for k, v in auth(body).items() if k != "Sentry-Hook-Timestamp"}
    if source == "sentry":  # Sentry sends its timestamp with every webhook
        response = call(app, "POST", "/alerts/sentry", body, {**JSON, **missing_ts})
        assert response.status_code == 401 and "Sentry-Hook-Timestamp is missing" in response.text
    forged = {k: ("v1=" + "1" * 64 if k == "X-PagerDuty-Signature" else
                  "Bearer nope" if k == "Authorization" else
                  v if k == "Sentry-Hook-Timestamp" else "f" * 64)
              for k, v in auth(body).items()}
    wrong = call(app, "POST", f"/alerts/{source}", body, {**JSON, **forged})
    assert wrong.status_code == 401
    assert SECRET not in wrong.text and sign(body) not in wrong.text
    assert len(intake.deliveries) == 1
    assert call(app, "GET", "/healthz").json()["verification"][source] is True


def test_authentication_happens_before_parsing():
    app, _ = make(sentry_client_secret=SECRET)
    response = call(app, "POST", "/alerts/sentry", b"\x00\xff", JSON)
    assert response.status_code == 401


def test_413_on_content_length_and_on_actual_bytes():
    app, intake = make(max_body_bytes=1000)
    big = b'{"alerts": [' + b" " * 2000 + b"]}"
    assert call(app, "POST", "/alerts/alertmanager", big, JSON).status_code == 413

    async def chunks():  # no Content-Length: chunked upload, counted while reading
        for _ in range(10):
            yield b" " * 200

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.post("/alerts/alertmanager", content=chunks(), headers=JSON)
    response = asyncio.run(go())
    assert response.status_code == 413 and "RUNBOOKS_GATEWAY_MAX_BODY_BYTES" in response.text
    assert intake.deliveries == []


def test_default_limit_is_one_mib():
    app, _ = make()
    huge = b"{" + b" " * (1024 * 1024) + b"}"
    assert call(app, "POST", "/alerts/grafana", huge, JSON).status_code == 413


@pytest.mark.parametrize("content_type, status", [
    ("text/plain", 415),
    ("text/plain;charset=UTF-8", 415),
    ("application/x-www-form-urlencoded", 415),
    ("multipart/form-data; boundary=x", 415),
    ("application/json; charset=utf-16", 415),
    ("application/json; charset=utf-8", 202),
    ("application/cloudevents+json", 202),
    ("application/cloudevents-batch+json", 202),
    ("", 415),  # no Content-Type at all: what a browser form or fetch without headers sends
])
def test_content_types(content_type, status):
    app, intake = make()
    headers = {"content-type": content_type} if content_type else {}
    response = call(app, "POST", "/alerts/cloudevents",
                    payload("cloudevents/ce-conformance_validMinimal.json"), headers)
    assert response.status_code == status, response.text
    if status == 415:
        assert "UTF-8" in response.json()["detail"] or "application/json" in response.json()["detail"]
        assert intake.deliveries == []


def test_a_request_without_content_type_is_refused_even_when_authenticated():
    """A page in a browser can POST text/plain or a form cross-origin without a CORS
    preflight, never application/json: requiring JSON keeps web pages out."""
    app, intake = make(alertmanager_bearer_token=SECRET)
    body = payload("alertmanager/zulip_alert.json")
    for headers in ({}, {"content-type": "text/plain"}):
        response = call(app, "POST", "/alerts/alertmanager", body,
                        {**headers, "Authorization": f"Bearer {SECRET}"})
        assert response.status_code == 415, response.text
        assert "application/json" in response.json()["detail"]
    assert intake.deliveries == []


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1"])
def test_bodies_that_are_not_utf8_are_refused(encoding):
    app, intake = make()
    text = '{"status": "firing", "alerts": [{"status": "firing", "labels": {"alertname": "\u00c9t\u00e9"}}]}'
    assert call(app, "POST", "/alerts/alertmanager", text.encode(), JSON).status_code == 202
    body = text.encode(encoding)
    response = call(app, "POST", "/alerts/alertmanager", body, JSON)
    assert response.status_code == 415, response.text
    assert "UTF-8" in response.json()["detail"]
    assert len(intake.deliveries) == 1, "only the UTF-8 delivery was accepted"


def test_alerts_without_labels_are_refused():
    app, intake = make()
    for labels in ({}, {"alertname": ""}, None):
        item: dict[str, Any] = {"status": "firing", "startsAt": "2024-05-01T10:00:00Z"}
        if labels is not None:
            item["labels"] = labels
        body = json.dumps({"status": "firing", "alerts": [item]}).encode()
        response = call(app, "POST", "/alerts/alertmanager", body, JSON)
        assert response.status_code == 422, response.text
        assert response.json()["detail"].startswith("alerts[0].labels: the alert has no labels")
    ce = {"specversion": "1.0", "id": "1", "source": "/x", "type": "t", "data": {"labels": {}}}
    response = call(app, "POST", "/alerts/cloudevents", json.dumps(ce).encode(), JSON)
    assert response.status_code == 422 and "data.labels" in response.text
    assert intake.deliveries == []


def test_alerts_per_delivery_are_capped():
    body = payload("alertmanager/bougou_mixed-firing-resolved.json")  # 4 alerts
    app, intake = make(max_alerts_per_delivery=3)
    response = call(app, "POST", "/alerts/alertmanager", body, JSON)
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert "4 alerts, more than 3" in detail and "RUNBOOKS_GATEWAY_MAX_ALERTS_PER_DELIVERY" in detail
    assert intake.deliveries == []
    app, intake = make(max_alerts_per_delivery=4)
    assert call(app, "POST", "/alerts/alertmanager", body, JSON).status_code == 202
    assert GatewaySettings().max_alerts_per_delivery == 500


def test_parsing_runs_off_the_event_loop():
    """A large body is parsed in a worker thread: the event loop keeps serving meanwhile."""
    threads: list[int] = []

    def recording(body, headers):
        threads.append(threading.get_ident())
        return PARSERS["alertmanager"](body, headers)

    intake = RecordingIntake()
    app = create_app(GatewaySettings(insecure_sources=list(SOURCES)), intake,
                     parsers={**PARSERS, "alertmanager": recording})
    loop_thread = threading.get_ident()  # asyncio.run in call() runs the loop in this thread
    response = call(app, "POST", "/alerts/alertmanager", payload("alertmanager/zulip_alert.json"), JSON)
    assert response.status_code == 202, response.text
    assert threads and loop_thread not in threads


GARBAGE = [b"", b"\x00\xff", b"[]", b"{}", b"null", b"42", b'"x"', b"{", b"[" * 50_000,
           b'{"alerts": [null]}', b'{"alerts": [{"labels": []}]}', b'{"event": []}',
           b'{"action": 5, "alert": {}}', b'{"data": {"issue": {}}}',
           b'{"specversion": "1.0"}', b'{"alerts": [{"status": "firing", "labels": {"a": 1.5e400}}]}',
           "{\"alerts\": [{\"status\": \"firing\", \"labels\": {\"\u00e9\": \"\ud800\"}}]}".encode(
               "utf-8", "surrogatepass"),
           rb'{"alerts": [{"status": "firing", "labels": {"a": "\ud800"}}]}',
           rb'{"alerts": [{"status": "firing", "startsAt": "9999-12-31T23:59:59-23:59"}]}',
           rb'{"action": "Create", "alert": {"alertId": "a", "createdAt": 99999999999999999999}}',
           rb'{"action": "Close", "alert": {"alertId": "a", "updatedAt": -99999999999999999999}}',
           rb'{"action": "triggered", "data": {"event": {"issue_id": "1", "tags": {"a": 1}}}}',
           rb'{"event": {"event_type": "incident.resolved", "data": {"id": "P", "service": "x"}}}',
           rb'{"action": "resolved", "data": {"metric_alert": {"id": "4", "alert_rule": {"id": "7",'
           rb' "projects": {"a": 1}}}}}']


@pytest.mark.parametrize("source", SOURCES)
def test_garbage_never_yields_5xx(source, caplog):
    app, _ = make()
    for body in GARBAGE:
        response = call(app, "POST", f"/alerts/{source}", body, JSON)
        assert response.status_code in (202, 415, 422), (body[:40], response.status_code, response.text)
        if response.status_code in (415, 422):
            assert response.json()["detail"]
    # every rejection was an explicit PayloadError, not the catch-all for parser bugs
    assert not [r for r in caplog.records if "unexpected parser failure" in r.getMessage()]


def test_422_names_the_field():
    app, _ = make()
    response = call(app, "POST", "/alerts/alertmanager",
                    b'{"alerts": [{"status": "firing", "labels": {"x": {}}}]}', JSON)
    assert response.status_code == 422
    assert response.json() == {"error": "malformed alertmanager payload",
                               "detail": "alerts[0].labels.x: expected a string value, got an object"}


def test_not_an_alert_is_202_with_reason():
    app, intake = make()
    response = call(app, "POST", "/alerts/pagerduty",
                    b'{"event": {"event_type": "pagey.ping", "resource_type": "pagey"}}', JSON)
    assert response.status_code == 202
    assert response.json()["alerts"] == 0 and "pagey.ping" in response.json()["ignored"]
    assert intake.deliveries == []


class FailingIntake:
    async def accept(self, alerts: list[Alert], delivery: Delivery) -> dict[str, Any]:
        raise ConnectionError("prefect down")


def test_intake_failure_is_503_so_senders_retry():
    app = create_app(GatewaySettings(insecure_sources=list(SOURCES)), FailingIntake())
    response = call(app, "POST", "/alerts/alertmanager",
                    payload("alertmanager/zulip_alert.json"), JSON)
    assert response.status_code == 503 and "retry" in response.json()["detail"]


def test_healthz_openapi_and_methods():
    app, _ = make(grafana_secret=SECRET)
    health = call(app, "GET", "/healthz")
    assert health.status_code == 200 and SECRET not in health.text
    assert health.json()["verification"]["grafana"] is True
    spec = call(app, "GET", "/openapi.json").json()
    for source in SOURCES:
        op = spec["paths"][f"/alerts/{source}"]["post"]
        assert {"202", "401", "413", "415", "422"} <= set(op["responses"])
    assert call(app, "GET", "/alerts/grafana").status_code == 405
    assert call(app, "POST", "/alerts/nagios", b"{}", JSON).status_code == 404


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("RUNBOOKS_GATEWAY_PORT", "9999")
    monkeypatch.setenv("RUNBOOKS_GATEWAY_PAGERDUTY_SECRET", SECRET)
    settings = GatewaySettings()
    assert (settings.host, settings.port, settings.max_body_bytes) == ("127.0.0.1", 9999, 1 << 20)
    assert settings.pagerduty_secret is not None and SECRET not in repr(settings)
    assert settings.routes_file == REPO_ROOT / "routes.yaml"


@pytest.mark.parametrize("length", ["\u00b2", "\u0661", " 12 ", "-1", "1e3", "99999999999999999999999"])
def test_odd_content_length_headers_are_never_a_server_error(length):
    app, _ = make(max_body_bytes=1000)
    body = payload("cloudevents/ce-conformance_validMinimal.json")

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            request = client.build_request("POST", "/alerts/cloudevents", content=body, headers=JSON)
            request.headers["content-length"] = length.encode("utf-8").decode("latin-1")
            return await client.send(request)
    response = asyncio.run(go())
    assert response.status_code < 500, response.text
    if length.strip().isascii() and length.strip().isdigit() and int(length) > 1000:
        assert response.status_code == 413


# -- a busy runner: 503 with Retry-After, nothing recorded ------------------------------------

@pytest.fixture
def busy_gateway(tmp_path):
    """The real intake (store, router, runner-mode dispatcher) with the runners' queue full:
    one run queued for a runner, at most one may queue. Yields the app, the store and what
    the store held before the test."""
    from gateway.intake import AlertIntake, Dispatcher
    from gateway.store import AlertStore

    store = AlertStore(tmp_path / "alerts.db")
    dispatcher = Dispatcher(store, mode="runner", max_queued=1)
    router = Router.from_file(REPO_ROOT / "routes.yaml")
    intake = AlertIntake(store, router, dispatcher)
    app = create_app(GatewaySettings(insecure_sources=list(SOURCES), runner_token="t" * 20), intake,
                     runners=dispatcher)
    [alert] = PARSERS["alertmanager"](json.dumps(service_down_alert("api")).encode(), {})
    [queued] = store.record_delivery(Delivery(source="alertmanager", received_at=datetime.now(UTC)),
                                     [alert], router.route_all([alert]))
    store.set_flow_run(queued.incident.incident_id, "a-queued-run")
    yield app, store
    dispatcher.shutdown()
    store.close()


@pytest.mark.parametrize("path", ["alertmanager/zulip_alert.json", "alertmanager/bougou_mixed-firing-resolved.json"])
def test_a_full_runner_queue_refuses_firing_alerts_with_503_and_records_nothing(busy_gateway, path):
    app, store = busy_gateway
    response = call(app, "POST", "/alerts/alertmanager", payload(path), JSON)
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "30"
    body = response.json()
    assert body["error"] == "runner busy"
    assert "RUNBOOKS_GATEWAY_MAX_QUEUED_RUNS=1" in body["detail"] and "again" in body["detail"]
    assert len(store.recent_alerts()) == 1 and store.counts() == {"opened": 1, "incidents": 1}, \
        "nothing recorded: the retry must not be a duplicate"


def test_a_full_runner_queue_still_accepts_resolves_and_acknowledgements(busy_gateway):
    app, store = busy_gateway
    response = call(app, "POST", "/alerts/alertmanager", payload("alertmanager/bougou_alert-resolved.json"), JSON)
    assert response.status_code == 202, response.text
    assert [a["disposition"] for a in response.json()["intake"]["alerts"]] == ["resolved-unknown"] * 2
    acked = call(app, "POST", "/alerts/pagerduty", payload("pagerduty/zulip_acknowledged_v3.json"), JSON)
    assert acked.status_code == 202, acked.text
    assert acked.json()["intake"]["alerts"][0]["disposition"] == "acknowledged"
    assert len(store.recent_alerts()) == 1 + 3


def test_healthz_shows_the_runners_load(busy_gateway):
    app, _ = busy_gateway
    assert call(app, "GET", "/healthz").json()["runner"] == {"queued": 1, "max_queued": 1, "runners": {}}
    spec = call(app, "GET", "/openapi.json").json()
    assert "Retry-After" in spec["paths"]["/alerts/grafana"]["post"]["responses"]["503"]["headers"]
    without_runner, _ = make()
    assert "runner" not in call(without_runner, "GET", "/healthz").json()
