"""routes.yaml and the router: first match wins, unrouted alerts carry a reason."""

from __future__ import annotations

import json

import pytest

from gateway.errors import RoutesFileError
from gateway.models import Alert, Severity
from gateway.routing import Router
from gateway.sources import PARSERS
from incident.settings import REPO_ROOT
from tests.gateway.conftest import payload, write_inventory


@pytest.fixture(autouse=True)
def _inventory(test_inventory):
    """The router checks targets against this inventory (RUNBOOKS_INVENTORY)."""


def am_alert(labels: dict[str, str], status: str = "firing") -> Alert:
    body = {"status": status, "alerts": [{"status": status, "labels": labels,
                                          "startsAt": "2024-05-01T10:00:00Z"}]}
    return PARSERS["alertmanager"](json.dumps(body).encode(), {})[0]


@pytest.fixture(scope="module")
def repo_router() -> Router:
    return Router.from_file(REPO_ROOT / "routes.yaml")


def test_service_down_routes_to_runbook_with_target_from_label(repo_router):
    decision = repo_router.route(am_alert({"alertname": "ServiceDown", "service": "api"}))
    assert decision.routed and decision.rule == "service-down"
    assert (decision.scenario, decision.target) == ("service-down/service-down", "api")


def test_service_down_without_service_label_defaults_to_web(repo_router):
    decision = repo_router.route(am_alert({"alertname": "ServiceDown"}, status="resolved"))
    assert decision.routed and decision.target == "web" and decision.status == "resolved"


def test_unrouted_alerts_have_a_reason(repo_router):
    alerts = PARSERS["alertmanager"](payload("alertmanager/zulip_alert.json"), {})
    for decision in repo_router.route_all(alerts):
        assert not decision.routed and decision.scenario is None
        assert "no route matches" in decision.reason and "High CPU Temperature" in decision.reason
        assert decision.severity == Severity.P0


ROUTES = """
routes:
  - name: grafana-memory
    match: {source: grafana, labels: {alertname: "=~Memory.*", grafana_folder: device}}
    scenario: memory/memory
    target: "{labels.instance}"
  - name: sentry-any
    match: {source: [sentry, pagerduty]}
    scenario: app-errors/app-errors
    target: "{service}"
    severity: P1
  - name: catch-cpu
    match: {labels: {alertname: "=~CPUHigh\\\\d*"}}
    scenario: cpu/cpu
    target: "{labels.component}-{labels.region}"
"""


def test_regex_source_list_templates_and_severity_override():
    router = Router.from_yaml(ROUTES)
    [grafana] = PARSERS["grafana"](payload("grafana/zulip_alert_values_v11.json"), {})
    decision = router.route(grafana)
    assert not decision.routed and decision.rule == "grafana-memory"
    assert "labels.instance" in decision.reason and "target_default" in decision.reason

    [issue] = PARSERS["sentry"](payload("sentry/zulip_issue_resolved.json"), {})
    decision = router.route(issue)
    assert decision.routed and decision.target == "zulip-integration-testing"
    assert decision.severity == Severity.P1

    cpu = PARSERS["alertmanager"](payload("alertmanager/bougou_mixed-firing-resolved.json"), {})
    decisions = router.route_all(cpu)
    assert [d.target for d in decisions] == ["component-x-region-x", "component-y-region-y",
                                             "component-x-region-x", "component-x-region-x"]
    assert {d.rule for d in decisions} == {"catch-cpu"}


def test_first_match_wins():
    router = Router.from_yaml("""
routes:
  - {name: a, match: {labels: {alertname: X}}, scenario: a/a, target: one}
  - {name: b, match: {labels: {alertname: X}}, scenario: b/b, target: two}
""")
    assert router.route(am_alert({"alertname": "X"})).rule == "a"


def test_regex_is_anchored_and_missing_label_is_empty():
    router = Router.from_yaml("""
routes:
  - {name: a, match: {labels: {alertname: "=~Service"}}, scenario: a/a, target: t}
  - {name: b, match: {labels: {team: "=~(ops)?"}}, scenario: b/b, target: t}
""")
    assert router.route(am_alert({"alertname": "ServiceDown"})).rule == "b"
    assert router.route(am_alert({"alertname": "Service"})).rule == "a"
    assert not router.route(am_alert({"alertname": "Y", "team": "dev"})).routed


@pytest.mark.parametrize("text, message", [
    ("routes: [", "not valid YAML"),
    ("{}", "routes"),
    ("routes: [{name: a, match: {}, scenario: nodeployment, target: t}]", "scenario"),
    ("routes: [{name: a, match: {labels: {x: '=~('}}, scenario: a/b, target: t}]", "invalid regex"),
    ("routes: [{name: a, match: {}, scenario: a/b, target: '{labels}'}]", "unknown placeholder"),
    ("routes: [{name: a, match: {source: nagios}, scenario: a/b, target: t}]", "source"),
    ("routes: [{name: a, match: {}, scenario: a/b, target: t, severity: P9}]", "severity"),
    ("routes: [{name: a, match: {}, scenario: a/b, target: t, typo: 1}]", "typo"),
    ("routes: [{name: a, match: {}, scenario: a/b, target: t, targets: ['web; rm']}]", "not a service name"),
    ("routes: [{name: a, match: {}, scenario: a/b, target: t, targets: ['=~(']}]", "invalid regex"),
    ("routes: [{name: a, match: {}, scenario: a/b, target: t, sources: [nagios]}]", "sources"),
    ("routes: [{name: a, match: {}, scenario: a/b, target: '{labels.x}', target_default: 'a b'}]",
     "target_default"),
])
def test_invalid_routes_file_is_explained(text, message):
    with pytest.raises(RoutesFileError, match=message):
        Router.from_yaml(text)


def test_missing_routes_file(tmp_path):
    with pytest.raises(RoutesFileError, match="RUNBOOKS_GATEWAY_ROUTES_FILE"):
        Router.from_file(tmp_path / "nope.yaml")


@pytest.mark.parametrize("service", ["web; touch /tmp/x", "$(touch /tmp/x)", "web\nweb", "../web", "web x",
                                     "-web", "a" * 200])
def test_a_target_that_is_not_a_service_name_is_unrouted(repo_router, service):
    decision = repo_router.route(am_alert({"alertname": "ServiceDown", "service": service}))
    assert not decision.routed and decision.scenario is None and decision.target is None
    assert "not a service name" in decision.reason and "no run started" in decision.reason


def test_a_target_missing_from_the_inventory_is_unrouted(repo_router, test_inventory):
    decision = repo_router.route(am_alert({"alertname": "ServiceDown", "service": "payments"}))
    assert not decision.routed and decision.target is None
    assert "'payments'" in decision.reason and "not a service of the inventory" in decision.reason
    assert str(test_inventory) in decision.reason and "known: api, " in decision.reason


def test_targets_are_checked_against_the_inventory_file_as_it_changes(tmp_path):
    inventory = write_inventory(tmp_path / "inventory.yaml", ["web"])
    router = Router.from_file(REPO_ROOT / "routes.yaml", inventory=inventory)
    alert = am_alert({"alertname": "ServiceDown", "service": "api"})
    assert not router.route(alert).routed
    write_inventory(inventory, ["web", "api", "extra-service-to-change-the-size"])
    assert router.route(alert).routed and router.route(alert).target == "api"
    inventory.unlink()
    decision = router.route(alert)
    assert not decision.routed and "the inventory cannot be read" in decision.reason
    assert "RUNBOOKS_INVENTORY" in decision.reason


def test_a_route_lists_the_sources_and_targets_it_accepts():
    router = Router.from_yaml("""
routes:
  - name: restart-web-only
    match: {labels: {alertname: ServiceDown}}
    sources: [alertmanager]
    targets: [web, "=~svc-[0-9]+"]
    scenario: service-down/service-down
    target: "{labels.service}"
  - {name: later, match: {}, scenario: other/other, target: web}
""")
    assert router.route(am_alert({"alertname": "ServiceDown", "service": "web"})).routed
    assert router.route(am_alert({"alertname": "ServiceDown", "service": "svc-7"})).routed
    refused = router.route(am_alert({"alertname": "ServiceDown", "service": "api"}))  # in the inventory
    assert not refused.routed and refused.rule == "restart-web-only", "refused, not passed to a later rule"
    assert "does not accept the target 'api'" in refused.reason and "targets" in refused.reason
    grafana = {"status": "firing", "alerts": [{"status": "firing", "startsAt": "2024-05-01T10:00:00Z",
                                               "labels": {"alertname": "ServiceDown", "service": "web"}}]}
    [alert] = PARSERS["grafana"](json.dumps(grafana).encode(), {})
    decision = router.route(alert)
    assert not decision.routed and "does not accept alerts from grafana" in decision.reason
