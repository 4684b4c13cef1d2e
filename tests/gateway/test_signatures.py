"""Signatures over the real payload bytes, signed with a test secret."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from pydantic import SecretStr

from gateway.errors import AuthError
from gateway.settings import GatewaySettings
from gateway.signatures import (
    authenticate,
    verify_alertmanager,
    verify_bearer,
    verify_grafana,
    verify_pagerduty,
    verify_sentry,
    verify_shared_secret,
)
from tests.gateway.conftest import payload

SECRET = "test-secret-never-in-messages"
S = SecretStr(SECRET)


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def assert_no_secret(exc: pytest.ExceptionInfo[AuthError], *expected_values: str) -> None:
    text = str(exc.value)
    assert SECRET not in text
    for value in expected_values:
        assert value not in text


GRAFANA = payload("grafana/bougou_grafana-alert.json")
SENTRY = payload("sentry/zulip_issue_created_for_exception.json")
PAGERDUTY = payload("pagerduty/zulip_triggered_v3.json")


def test_grafana_good_signature():
    verify_grafana(GRAFANA, {"X-Grafana-Alerting-Signature": sign(GRAFANA)}, S)
    verify_grafana(GRAFANA, {"x-grafana-alerting-signature": sign(GRAFANA).upper()}, S)


def test_grafana_timestamped_signature():
    ts = "1711706470"
    headers = {"X-Grafana-Alerting-Signature": sign(f"{ts}:".encode() + GRAFANA),
               "X-Grafana-Alerting-Signature-Timestamp": ts}
    verify_grafana(GRAFANA, headers, S)
    headers["X-Grafana-Alerting-Signature-Timestamp"] = "1711706471"  # replayed with new ts
    with pytest.raises(AuthError, match="does not match the body and timestamp"):
        verify_grafana(GRAFANA, headers, S)


@pytest.mark.parametrize("headers, message", [
    ({}, "X-Grafana-Alerting-Signature is missing"),
    ({"X-Grafana-Alerting-Signature": "00" * 32}, "does not match"),
    ({"X-Grafana-Alerting-Signature": sign(GRAFANA, "other")}, "does not match"),
    ({"X-Grafana-Alerting-Signature": "é"}, "does not match"),
])
def test_grafana_forged_or_missing(headers, message):
    with pytest.raises(AuthError, match=message) as exc:
        verify_grafana(GRAFANA, headers, S)
    assert_no_secret(exc, sign(GRAFANA))


def test_grafana_signature_covers_every_byte():
    tampered = GRAFANA.replace(b'"firing"', b'"resolved"', 1)
    with pytest.raises(AuthError):
        verify_grafana(tampered, {"X-Grafana-Alerting-Signature": sign(GRAFANA)}, S)


def test_sentry_signature():
    verify_sentry(SENTRY, {"Sentry-Hook-Signature": sign(SENTRY)}, S)
    with pytest.raises(AuthError, match="Sentry-Hook-Signature is missing"):
        verify_sentry(SENTRY, {}, S)
    with pytest.raises(AuthError, match="does not match") as exc:
        verify_sentry(SENTRY + b" ", {"Sentry-Hook-Signature": sign(SENTRY)}, S)
    assert_no_secret(exc, sign(SENTRY + b" "))


def test_pagerduty_single_and_multiple_signatures():
    good = sign(PAGERDUTY)
    verify_pagerduty(PAGERDUTY, {"X-PagerDuty-Signature": f"v1={good}"}, S)
    # during secret rotation PagerDuty sends several; any match is enough, in any position
    old = sign(PAGERDUTY, "old-secret")
    verify_pagerduty(PAGERDUTY, {"X-PagerDuty-Signature": f"v1={old},v1={good}"}, S)
    verify_pagerduty(PAGERDUTY, {"X-PagerDuty-Signature": f"v1={good}, v1={old}"}, S)


@pytest.mark.parametrize("value, message", [
    (None, "X-PagerDuty-Signature is missing"),
    ("", "X-PagerDuty-Signature is missing"),
    ("sha256=abc", "no v1=<hex>"),
    ("v1=" + "0" * 64 + ",v1=" + "1" * 64, "none of the 2 signature"),
])
def test_pagerduty_rejected(value, message):
    headers = {} if value is None else {"X-PagerDuty-Signature": value}
    with pytest.raises(AuthError, match=message) as exc:
        verify_pagerduty(PAGERDUTY, headers, S)
    assert_no_secret(exc, sign(PAGERDUTY))


def test_opsgenie_shared_secret_header():
    verify_shared_secret({"X-Opsgenie-Secret": SECRET}, "X-Opsgenie-Secret", S)
    verify_shared_secret({"x-custom": SECRET}, "X-Custom", S)
    with pytest.raises(AuthError, match="X-Custom is missing"):
        verify_shared_secret({}, "X-Custom", S)
    with pytest.raises(AuthError, match="wrong value") as exc:
        verify_shared_secret({"X-Custom": SECRET[:-1]}, "X-Custom", S)
    assert_no_secret(exc)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_alertmanager_bearer_and_basic():
    verify_alertmanager({"Authorization": f"Bearer {SECRET}"}, S, "am", None)
    verify_alertmanager({"authorization": basic("am", SECRET)}, None, "am", S)
    verify_alertmanager({"Authorization": basic("am", SECRET)}, S, "am", S)  # either works
    verify_alertmanager({}, None, "am", None)  # nothing configured: no verification


@pytest.mark.parametrize("headers, message", [
    ({}, "Authorization is missing"),
    ({"Authorization": "Bearer"}, "no credentials"),
    ({"Authorization": "Bearer wrong"}, "bearer token is wrong"),
    ({"Authorization": basic("am", "wrong")}, "username or password is wrong"),
    ({"Authorization": basic("root", SECRET)}, "username or password is wrong"),
    ({"Authorization": "Basic !!!"}, "not base64"),
    ({"Authorization": "Digest abc"}, "expected Bearer or Basic"),
])
def test_alertmanager_rejected(headers, message):
    with pytest.raises(AuthError, match=message) as exc:
        verify_alertmanager(headers, S, "am", S)
    assert_no_secret(exc)


def test_cloudevents_bearer():
    verify_bearer({"Authorization": f"bearer {SECRET}"}, S)
    with pytest.raises(AuthError, match="expected Bearer"):
        verify_bearer({"Authorization": basic("a", SECRET)}, S)


def test_authenticate_dispatch_uses_settings():
    settings = GatewaySettings(sentry_client_secret=SECRET, opsgenie_secret=SECRET,
                               opsgenie_secret_header="X-Og")
    authenticate("sentry", SENTRY, {"Sentry-Hook-Signature": sign(SENTRY)}, settings)
    authenticate("grafana", GRAFANA, {}, settings)  # no grafana secret: not verified
    with pytest.raises(AuthError):
        authenticate("opsgenie", b"{}", {"X-Opsgenie-Secret": SECRET}, settings)
    assert settings.verification_enabled()["sentry"] is True
    assert SECRET not in repr(settings)
