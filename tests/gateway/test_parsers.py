"""Every shared payload parses unchanged and normalises to the expected alerts."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from gateway.errors import NotAnAlert, PayloadError
from gateway.fingerprint import labels_fingerprint
from gateway.models import Severity
from gateway.sources import PARSERS
from tests.gateway.conftest import payload, payload_files

P0, P1, P2, P3 = Severity.P0, Severity.P1, Severity.P2, Severity.P3

# file -> one (status, fingerprint, service, severity) per expected alert, in order
EXPECTED: dict[str, list[tuple[str, str, str | None, Severity]]] = {
    "alertmanager/zulip_alert.json": [
        ("firing", "a1bc48475b20e73d", None, P0),
        ("firing", "a1bc48475b20e73d", None, P0),  # label-edited: given c2ea... is wrong
    ],
    "alertmanager/bougou_mixed-firing-resolved.json": [
        ("firing", "72d99c17d805fc56", None, P2),
        ("resolved", "aca87c508efac354", None, P2),
        ("firing", "08a9f5e706cb2da6", None, P0),
        ("firing", "bef551aceb6e332e", None, P3),
    ],
    "alertmanager/bougou_alert-resolved.json": [
        ("resolved", "aca87c508efac354", None, P2),
        ("resolved", "caa4018fc449b512", None, P2),
    ],
    "alertmanager/am-executor_legacy-no-version.json": [
        ("firing", "5714ca6177701704", "broken", P2),
        ("firing", "4a66b51f01c085c4", "broken", P2),
    ],
    "grafana/bougou_grafana-alert.json": [("firing", "1075d336a973852c", None, P2)],
    "grafana/zulip_alert_values_v11.json": [("firing", "170b552f540b4c1f", None, P2)],
    "grafana/zulip_alert-9-resolved.json": [("resolved", "7778b1dc6f14daf0", None, P2)],
    "sentry/zulip_issue_created_for_exception.json": [
        ("firing", "sentry:issue:1635244907", "zulip-integration-testing", P1)],
    "sentry/zulip_issue_resolved.json": [
        ("resolved", "sentry:issue:1638821441", "zulip-integration-testing", P1)],
    "sentry/sentry-docs_metric_alert_resolved.json": [
        ("resolved", "sentry:metric_alert:7", "bar", P2)],
    "pagerduty/zulip_triggered_v3.json": [("firing", "pagerduty:incident:PFQZPSY", "pig208", P1)],
    "pagerduty/zulip_acknowledged_v3.json": [
        ("firing", "pagerduty:incident:PQ1K5C8", "pig208", P1)],
    "pagerduty/zulip_resolved_v3.json": [
        ("resolved", "pagerduty:incident:PCPZE64", "pig208", P1)],
    "opsgenie/zulip_create.json": [("firing", "opsgenie:alert-alias", "Server", P2)],
    "opsgenie/zulip_acknowledge.json": [("firing", "opsgenie:aliastest", None, P2)],
    "opsgenie/zulip_close.json": [("resolved", "opsgenie:aliastest", None, P2)],
    "cloudevents/ce-spec_json-format_C234_json-data.json": [
        ("firing", labels_fingerprint({"alertname": "com.example.someevent",
                                       "ce_source": "/mycontext"}), None, P2)],
    "cloudevents/ce-conformance_validMinimal.json": [
        ("firing", labels_fingerprint({"alertname": "io.cloudevents.test",
                                       "ce_source": "https://cloudevents.io"}), None, P2)],
    "cloudevents/ce-conformance_validAllCoreAttributes.json": [
        ("firing", labels_fingerprint({"alertname": "io.cloudevents.test",
                                       "ce_source": "https://cloudevents.io",
                                       "ce_subject": "tests"}), None, P2)],
}


def parse_file(relative: str):
    return PARSERS[relative.split("/")[0]](payload(relative), {})


def test_every_payload_file_has_expectations(payloads_dir):
    found = {p.relative_to(payloads_dir).as_posix() for p in payload_files()}
    assert found == set(EXPECTED), "add new payload files to EXPECTED"


@pytest.mark.parametrize("relative", sorted(EXPECTED))
def test_payload_normalises(relative):
    alerts = parse_file(relative)
    got = [(a.status, a.fingerprint, a.service, a.severity) for a in alerts]
    assert got == EXPECTED[relative]
    for a in alerts:
        assert a.source == relative.split("/")[0]
        assert a.summary
        assert a.episode_key and a.dedup_key.startswith(a.episode_key + "|")
        for dt in (a.starts_at, a.ends_at):
            assert dt is None or dt.tzinfo is not None
        json.loads(a.model_dump_json())  # serialisable


# --- Alertmanager ---------------------------------------------------------------------

def test_fingerprint_algorithm_matches_real_alertmanager_capture():
    labels = {"alertname": "High CPU Temperature", "host": "andromeda", "severity": "critical"}
    assert labels_fingerprint(labels) == "a1bc48475b20e73d"
    assert labels_fingerprint({}) == "cbf29ce484222325"  # FNV-1a 64 offset basis


def test_alertmanager_trusts_consistent_fingerprint_only():
    first, second = parse_file("alertmanager/zulip_alert.json")
    assert (first.fingerprint_origin, first.source_fingerprint) == ("source", "a1bc48475b20e73d")
    assert (second.fingerprint_origin, second.source_fingerprint) == ("computed", "c2ea85182f28cbd9")
    assert first.episode_key == second.episode_key == (
        "alertmanager:a1bc48475b20e73d:2020-02-06T00:17:58.432911+00:00")
    assert first.starts_at == datetime(2020, 2, 6, 0, 17, 58, 432911, tzinfo=UTC)
    assert first.ends_at is None  # Go zero time
    assert first.summary == "High CPU core temperature"
    assert first.links["generator"].startswith("http://cobalt:9090/graph")
    assert first.extra["groupKey"] == "{}/{}:{}"


def test_shared_fingerprint_is_not_trusted_and_status_is_per_alert():
    alerts = parse_file("alertmanager/bougou_mixed-firing-resolved.json")
    assert len({a.fingerprint for a in alerts}) == 4
    assert all(a.source_fingerprint == "83eb2c81e0da3faf" for a in alerts)
    assert all(a.fingerprint_origin == "computed" for a in alerts)
    resolved = alerts[1]
    assert resolved.labels["host"] == "10.30.1.161"
    assert resolved.ends_at == datetime(2021, 3, 30, 13, 17, 50, 814674, tzinfo=UTC)
    assert [a.labels["alertname"] for a in alerts] == ["CPUHigh", "CPUHigh", "CPUHigh1", "CPUHigh2"]
    assert alerts[0].extra["truncated_alerts"] == 0


def test_firing_and_resolved_of_one_episode_share_the_episode_key():
    firing = parse_file("alertmanager/bougou_mixed-firing-resolved.json")[1]
    resolved = parse_file("alertmanager/bougou_alert-resolved.json")[0]
    assert firing.episode_key == resolved.episode_key
    assert firing.dedup_key != resolved.dedup_key or firing.status == resolved.status


def test_legacy_alertmanager_without_version():
    alerts = parse_file("alertmanager/am-executor_legacy-no-version.json")
    assert [a.source_fingerprint for a in alerts] == [None, None]
    assert [a.labels["instance"] for a in alerts] == ["localhost:1234", "localhost:5678"]
    assert alerts[0].starts_at == datetime(2016, 4, 7, 16, 8, 52, tzinfo=UTC)
    assert "version" not in alerts[0].extra and "truncated_alerts" not in alerts[0].extra
    assert alerts[0].summary == "InstanceDown"


def test_alertmanager_status_falls_back_to_group_and_rejects_unknown():
    from gateway.sources import alertmanager
    body = {"status": "resolved", "alerts": [{"labels": {"alertname": "X"}}]}
    [alert] = alertmanager.parse(json.dumps(body).encode(), {})
    assert alert.status == "resolved" and alert.starts_at is None
    body["alerts"][0]["status"] = "pending"
    with pytest.raises(PayloadError, match=r"alerts\[0\].*'pending'"):
        alertmanager.parse(json.dumps(body).encode(), {})


@pytest.mark.parametrize("body, message", [
    (b"", "empty"),
    (b"\x00\xff", "not valid JSON|not UTF-8"),
    (b"[]", "expected a JSON object"),
    (b"{}", "alerts: is missing"),
    (b'{"alerts": "x"}', "expected a JSON array"),
    (b'{"alerts": [{"status": "firing", "labels": {"a": {"b": 1}}}]}', r"labels\.a"),
    (b'{"alerts": [{"status": "firing", "labels": {"a": "b"}, "startsAt": "yesterday"}]}', "RFC 3339"),
    (b'{"alerts": [{"status": "firing", "labels": {"a": "b"}, "startsAt": "2020-01-01T00:00:00"}]}',
     "no UTC offset"),
    (b'{"alerts": [{"status": "firing", "labels": {}}]}', r"alerts\[0\]\.labels: the alert has no labels"),
    (b'{"alerts": [{"status": "firing", "labels": {"a": ""}}]}', "no labels"),
    (b'{"alerts": [{"status": "firing"}]}', "no labels"),
    ('{"alerts": []}'.encode("utf-16"), "not UTF-8"),
    ('{"alerts": []}'.encode("utf-16-le"), "not UTF-8"),
    (b'{"alerts": [], "x": NaN}', "not valid JSON"),
    (b"[" * 100_000, "nested too deeply"),
])
def test_alertmanager_malformed_bodies_say_what_is_wrong(body, message):
    with pytest.raises(PayloadError, match=message):
        PARSERS["alertmanager"](body, {})


def test_empty_alerts_array_is_not_an_alert():
    with pytest.raises(NotAnAlert):
        PARSERS["alertmanager"](b'{"status": "firing", "alerts": []}', {})


# --- Grafana ----------------------------------------------------------------------------

def test_grafana_fields():
    [alert] = parse_file("grafana/zulip_alert_values_v11.json")
    assert alert.source_fingerprint == "e6349a25f5ef0e9e"
    assert alert.fingerprint_origin == "computed"
    assert alert.extra["values"] == {"A": 2473545728, "B": 0, "C": 1, "minute": 9}
    assert alert.links["image"] == "https://grafana.com/assets/img/blog/mixed_styles.png"
    assert alert.links["panel"].endswith("?orgId=1&viewPanel=2")  # \u0026 unescaped
    [old] = parse_file("grafana/bougou_grafana-alert.json")
    assert old.links["silence"].count("&matcher=") == 3
    assert old.summary == "CPU Usage High"


def test_grafana_resolved_state_ok():
    [alert] = parse_file("grafana/zulip_alert-9-resolved.json")
    assert alert.status == "resolved"
    assert alert.extra["valueString"].startswith("[ var='B0'")
    assert "dashboard" not in alert.links  # empty URLs are dropped
    assert alert.links["runbook"] == "https://example.com/"
    assert alert.ends_at == datetime(2022, 6, 17, 0, 51, 24, 67337, tzinfo=UTC)


def test_grafana_legacy_payload_is_rejected_with_reason():
    with pytest.raises(PayloadError, match="legacy Grafana"):
        PARSERS["grafana"](b'{"ruleName": "x", "state": "alerting", "evalMatches": []}', {})


# --- Sentry -----------------------------------------------------------------------------

def test_sentry_issue_created_and_resolved():
    [created] = parse_file("sentry/zulip_issue_created_for_exception.json")
    assert created.episode_key == "sentry:issue:1635244907"
    assert created.event_type == "issue.created"
    assert created.labels["project"] == "zulip-integration-testing"
    assert created.severity_raw == "error"
    assert created.summary == "Exception: Custom exception!"
    [resolved] = parse_file("sentry/zulip_issue_resolved.json")
    assert resolved.extra["resolution_type"] == "now"
    assert resolved.extra["actor"]["id"] == 662437


def test_sentry_metric_alert():
    [alert] = parse_file("sentry/sentry-docs_metric_alert_resolved.json")
    assert alert.episode_key == "sentry:metric_alert:7:4"
    assert alert.labels["alertname"] == "Too many errors"
    assert alert.links["alert"] == "https://sentry.io/organizations/baz/alerts/1/"
    assert alert.ends_at is None


def test_sentry_header_must_agree_with_body():
    body = payload("sentry/zulip_issue_resolved.json")
    assert PARSERS["sentry"](body, {"Sentry-Hook-Resource": "issue"})[0].status == "resolved"
    with pytest.raises(PayloadError, match="says 'metric_alert'"):
        PARSERS["sentry"](body, {"sentry-hook-resource": "metric_alert"})
    with pytest.raises(NotAnAlert, match="installation"):
        PARSERS["sentry"](body, {"Sentry-Hook-Resource": "installation"})


def test_sentry_event_alert_joins_the_issue_episode():
    body = {"action": "triggered", "data": {
        "event": {"event_id": "e1", "issue_id": "1635244907", "title": "Boom", "level": "fatal",
                  "tags": [["environment", "prod"], ["service", "web"]],
                  "web_url": "https://sentry.io/e/1", "datetime": "2019-08-19T21:06:04Z"},
        "triggered_rule": "Prod errors"}}
    [alert] = PARSERS["sentry"](json.dumps(body).encode(), {"Sentry-Hook-Resource": "event_alert"})
    assert alert.episode_key == "sentry:issue:1635244907"
    assert (alert.severity, alert.service, alert.event_id) == (P0, "web", "e1")
    assert alert.labels["rule"] == "Prod errors"


# --- PagerDuty --------------------------------------------------------------------------

def test_pagerduty_acknowledged_is_firing_with_flag():
    [alert] = parse_file("pagerduty/zulip_acknowledged_v3.json")
    assert alert.acknowledged is True
    assert alert.dedup_key == "pagerduty:incident:PQ1K5C8|acknowledged"
    assert alert.event_id == "01BZYK8N47N5JG55J1EEEHPEJI"
    assert alert.event_type == "incident.acknowledged"
    assert alert.links["incident"] == "https://pig208.pagerduty.com/incidents/PQ1K5C8"


def test_pagerduty_triggered_and_resolved():
    [trig] = parse_file("pagerduty/zulip_triggered_v3.json")
    assert (trig.acknowledged, trig.severity_raw, trig.source_fingerprint) == (False, "high", None)
    assert trig.starts_at == datetime(2021, 6, 4, 13, 35, 29, 781000, tzinfo=UTC)
    [res] = parse_file("pagerduty/zulip_resolved_v3.json")
    assert res.ends_at == datetime(2021, 6, 4, 13, 16, 53, 816000, tzinfo=UTC)
    assert res.extra["number"] == 6


def test_pagerduty_priority_and_incident_key():
    doc = json.loads(payload("pagerduty/zulip_triggered_v3.json"))
    doc["event"]["data"]["priority"] = {"summary": "P1", "id": "X"}
    doc["event"]["data"]["incident_key"] = "a1bc48475b20e73d"
    [alert] = PARSERS["pagerduty"](json.dumps(doc).encode(), {})
    assert alert.severity == P0
    assert alert.fingerprint == "pagerduty:a1bc48475b20e73d"
    assert alert.episode_key == "pagerduty:incident:PFQZPSY"


def test_pagerduty_non_state_events_are_not_alerts():
    with pytest.raises(NotAnAlert, match="pagey.ping"):
        PARSERS["pagerduty"](b'{"event": {"event_type": "pagey.ping", "data": null}}', {})
    with pytest.raises(PayloadError, match="event: is missing"):
        PARSERS["pagerduty"](b'{}', {})


# --- Opsgenie ---------------------------------------------------------------------------

def test_opsgenie_nanosecond_integers_keep_precision():
    [alert] = parse_file("opsgenie/zulip_create.json")
    assert alert.extra["updatedAt"] == 1502709956288000110  # > 2**53, exact
    assert alert.extra["insertedAt"] == 1502709956288000110
    assert '"updatedAt":1502709956288000110' in alert.model_dump_json()
    assert alert.severity_raw == "3"
    assert alert.episode_key == "opsgenie:alert:ec03dad6-62c8-4c94-b38b-d88f398e900f"
    assert alert.event_id == "df3ad546-c7b6-4520-8de3-52bb12d1e99a"
    assert alert.labels["tags"] == "vip"
    assert alert.starts_at == datetime(2017, 8, 14, 11, 25, 56, 288000, tzinfo=UTC)


def test_opsgenie_acknowledge_and_close_share_the_episode():
    [ack] = parse_file("opsgenie/zulip_acknowledge.json")
    [close] = parse_file("opsgenie/zulip_close.json")
    assert ack.acknowledged and not close.acknowledged
    assert ack.episode_key == close.episode_key
    assert close.extra["updatedAt"] == 1420452374669001603
    assert close.ends_at == datetime(2015, 1, 5, 10, 6, 14, 669001, tzinfo=UTC)


def test_opsgenie_priority_string_and_ignored_actions():
    doc = json.loads(payload("opsgenie/zulip_create.json"))
    doc["alert"]["priority"] = "P1"
    doc["alert"]["details"] = {"service": "web"}
    [alert] = PARSERS["opsgenie"](json.dumps(doc).encode(), {})
    assert (alert.severity, alert.service) == (P0, "web")
    doc["action"] = "AddNote"
    with pytest.raises(NotAnAlert, match="AddNote"):
        PARSERS["opsgenie"](json.dumps(doc).encode(), {})


# --- CloudEvents ------------------------------------------------------------------------

def test_cloudevents_object_data_and_null_subject():
    [alert] = parse_file("cloudevents/ce-spec_json-format_C234_json-data.json")
    assert alert.episode_key == "cloudevents:/mycontext:C234-1234-1234"
    assert alert.event_id == "C234-1234-1234"
    assert alert.extra["data"] == {"appinfoA": "abc", "appinfoB": 123, "appinfoC": True}
    assert alert.extra["extensions"] == {"comexampleextension1": "value", "comexampleothervalue": 5}
    assert "ce_subject" not in alert.labels


def test_cloudevents_alert_like_data_uses_alertmanager_rules():
    event = {"specversion": "1.0", "id": "1", "source": "/prom", "type": "alert",
             "data": {"status": "resolved", "labels": {"alertname": "ServiceDown", "service": "web"},
                      "startsAt": "2024-01-01T00:00:00Z"}}
    [alert] = PARSERS["cloudevents"](json.dumps(event).encode(), {})
    assert alert.status == "resolved" and alert.service == "web"
    assert alert.fingerprint == labels_fingerprint({"alertname": "ServiceDown", "service": "web"})
    assert alert.event_id == "1"


def test_cloudevents_binary_mode_and_batch():
    headers = {"ce-specversion": "1.0", "ce-id": "b1", "ce-source": "/x", "ce-type": "t"}
    [alert] = PARSERS["cloudevents"](b'{"labels": {"alertname": "A"}}', headers)
    assert alert.labels == {"alertname": "A"} and alert.event_id == "b1"
    minimal = json.loads(payload("cloudevents/ce-conformance_validMinimal.json"))
    assert len(PARSERS["cloudevents"](json.dumps([minimal, minimal]).encode(), {})) == 2


@pytest.mark.parametrize("event, message", [
    ({"id": "1", "source": "/s", "type": "t"}, "specversion is missing"),
    ({"specversion": "0.3", "id": "1", "source": "/s", "type": "t"}, "not supported"),
    ({"specversion": "1.0", "source": "/s", "type": "t"}, "'id'"),
    ({"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "subject": 5}, "subject"),
])
def test_cloudevents_required_attributes(event, message):
    with pytest.raises(PayloadError, match=message):
        PARSERS["cloudevents"](json.dumps(event).encode(), {})
