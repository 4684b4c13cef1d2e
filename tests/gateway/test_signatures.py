"""Signatures over the real payload bytes, signed with a test secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

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


def grafana_headers(ts: str, body: bytes = GRAFANA) -> dict[str, str]:
    return {"X-Grafana-Alerting-Signature": sign(f"{ts}:".encode() + body),
            "X-Grafana-Alerting-Signature-Timestamp": ts}


def test_grafana_timestamped_signature():
    ts = str(int(time.time()))
    headers = grafana_headers(ts)
    verify_grafana(GRAFANA, headers, S)
    headers["X-Grafana-Alerting-Signature-Timestamp"] = str(int(ts) + 1)  # replayed with new ts
    with pytest.raises(AuthError, match="does not match the body and timestamp"):
        verify_grafana(GRAFANA, headers, S)


NOW = 1_790_000_000.0


@pytest.mark.parametrize("offset, message", [(-301, "301 s old"), (-86400 * 365, "old"),
                                             (301, "301 s in the future")])
def test_grafana_stale_or_future_timestamp_is_a_replay(offset, message):
    """Correctly signed, but signed too long ago (or ahead): replayed or delayed; refused."""
    headers = grafana_headers(str(int(NOW + offset)))
    with pytest.raises(AuthError, match=message) as exc:
        verify_grafana(GRAFANA, headers, S, max_age_s=300, now=NOW)
    assert "RUNBOOKS_GATEWAY_SIGNATURE_MAX_AGE_S" in str(exc.value)
    verify_grafana(GRAFANA, grafana_headers(str(int(NOW - 299))), S, max_age_s=300, now=NOW)
    verify_grafana(GRAFANA, headers, S, max_age_s=abs(offset) + 1, now=NOW)  # the setting decides


@pytest.mark.parametrize("ts", ["", "1e9", "-5", "2026-01-01T00:00:00Z", "17900000000000", "\u00b2",
                                "\u0661\u0667\u0669\u0660", "9" * 400])
def test_grafana_timestamp_must_be_unix_seconds(ts):
    with pytest.raises(AuthError, match="Signature-Timestamp"):
        verify_grafana(GRAFANA, grafana_headers(ts), S, now=NOW)


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


def sentry_headers(ts: float, body: bytes = SENTRY) -> dict[str, str]:
    return {"Sentry-Hook-Signature": sign(body), "Sentry-Hook-Timestamp": str(int(ts))}


def test_sentry_signature():
    verify_sentry(SENTRY, sentry_headers(time.time()), S)
    with pytest.raises(AuthError, match="Sentry-Hook-Signature is missing"):
        verify_sentry(SENTRY, {}, S)
    with pytest.raises(AuthError, match="does not match") as exc:
        verify_sentry(SENTRY + b" ", sentry_headers(time.time()), S)
    assert_no_secret(exc, sign(SENTRY + b" "))


def test_sentry_timestamp_is_required_and_fresh():
    with pytest.raises(AuthError, match="Sentry-Hook-Timestamp is missing"):
        verify_sentry(SENTRY, {"Sentry-Hook-Signature": sign(SENTRY)}, S, now=NOW)
    with pytest.raises(AuthError, match="Sentry-Hook-Timestamp is 600 s old"):
        verify_sentry(SENTRY, sentry_headers(NOW - 600), S, now=NOW)
    with pytest.raises(AuthError, match="Sentry-Hook-Timestamp is 600 s in the future"):
        verify_sentry(SENTRY, sentry_headers(NOW + 600), S, now=NOW)
    verify_sentry(SENTRY, sentry_headers(NOW - 60), S, now=NOW)


def test_stale_timestamps_are_refused_through_the_settings():
    settings = GatewaySettings(grafana_secret=SECRET, sentry_client_secret=SECRET, signature_max_age_s=60)
    stale = str(int(time.time()) - 120)
    with pytest.raises(AuthError, match="120 s old, more than 60 s"):
        authenticate("grafana", GRAFANA, grafana_headers(stale), settings)
    with pytest.raises(AuthError, match="more than 60 s"):
        authenticate("sentry", SENTRY, sentry_headers(int(stale)), settings)
    authenticate("grafana", GRAFANA, grafana_headers(str(int(time.time()))), settings)
    assert GatewaySettings().signature_max_age_s == 300


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
    authenticate("sentry", SENTRY, sentry_headers(time.time()), settings)
    authenticate("grafana", GRAFANA, {}, settings)  # no grafana secret: not verified
    with pytest.raises(AuthError):
        authenticate("opsgenie", b"{}", {"X-Opsgenie-Secret": SECRET}, settings)
    assert settings.verification_enabled()["sentry"] is True
    assert SECRET not in repr(settings)
