"""Authentication of webhook deliveries, on the raw body bytes, in constant time.

Every check raises :class:`gateway.errors.AuthError` naming what was missing or wrong,
never the secret or the expected value.

* Grafana: ``X-Grafana-Alerting-Signature`` = hex HMAC-SHA256 of the body with the
  contact point's secret; when ``X-Grafana-Alerting-Signature-Timestamp`` is sent (the
  contact point's HMAC timestamp header, Unix seconds), the signed string is
  ``"<timestamp>:<body>"`` and a timestamp further than ``signature_max_age_s`` from now
  (past or future) is rejected as a replay.
* Sentry: ``Sentry-Hook-Signature`` = hex HMAC-SHA256 of the raw body with the
  integration's client secret
  (https://docs.sentry.io/integrations/integration-platform/webhooks/#sentry-hook-signature);
  ``Sentry-Hook-Timestamp`` (Unix seconds, sent with every webhook) must be within
  ``signature_max_age_s`` of now. Sentry does not sign it, so it stops naive replays of a
  captured request, not a forger who has the secret.
* PagerDuty V3: ``X-PagerDuty-Signature: v1=<hex>[,v1=<hex>...]``, HMAC-SHA256 of the
  body; several signatures are sent while a secret is rotated, any match is enough
  (https://developer.pagerduty.com/docs/verifying-webhook-signatures).
* Opsgenie: a shared secret in a custom header configured on the webhook.
* Alertmanager: ``Authorization: Bearer <token>`` (http_config.authorization) or
  ``Basic`` (http_config.basic_auth).
* CloudEvents: ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

from pydantic import SecretStr

from gateway.errors import AuthError
from gateway.settings import GatewaySettings
from gateway.sources._common import header

GRAFANA_SIGNATURE = "X-Grafana-Alerting-Signature"
GRAFANA_TIMESTAMP = "X-Grafana-Alerting-Signature-Timestamp"
SENTRY_SIGNATURE = "Sentry-Hook-Signature"
SENTRY_TIMESTAMP = "Sentry-Hook-Timestamp"
DEFAULT_MAX_AGE_S = 300
PAGERDUTY_SIGNATURE = "X-PagerDuty-Signature"


def hmac_sha256_hex(secret: SecretStr | str, message: bytes) -> str:
    key = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    return hmac.new(key.encode("utf-8"), message, hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def _required(headers: Mapping[str, str], name: str, hint: str) -> str:
    value = header(headers, name)
    if value is None or not value.strip():
        raise AuthError(f"header {name} is missing; {hint}")
    return value.strip()


def check_fresh(name: str, value: str, max_age_s: int, now: float | None = None) -> None:
    """A signature timestamp (Unix seconds) must be within ``max_age_s`` of now, either way."""
    text = value.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 12):  # "²".isdigit() is True
        raise AuthError(f"header {name} is not a Unix time in seconds; a replayed or altered "
                        "delivery, or a sender that is not what it claims")
    skew = (time.time() if now is None else now) - int(text)
    if abs(skew) > max_age_s:
        when = f"{int(skew)} s old" if skew > 0 else f"{int(-skew)} s in the future"
        raise AuthError(f"header {name} is {when}, more than {max_age_s} s "
                        "(RUNBOOKS_GATEWAY_SIGNATURE_MAX_AGE_S): a replayed or long-delayed "
                        "delivery is refused; check the sender's and the gateway's clocks")


def verify_grafana(body: bytes, headers: Mapping[str, str], secret: SecretStr,
                   max_age_s: int = DEFAULT_MAX_AGE_S, now: float | None = None) -> None:
    given = _required(headers, GRAFANA_SIGNATURE,
                      "set the HMAC secret on the Grafana webhook contact point")
    timestamp = header(headers, GRAFANA_TIMESTAMP)
    message = f"{timestamp.strip()}:".encode() + body if timestamp is not None else body
    if not _same(given.lower(), hmac_sha256_hex(secret, message)):
        raise AuthError(f"header {GRAFANA_SIGNATURE} does not match the body"
                        + (" and timestamp" if timestamp is not None else "")
                        + "; check that Grafana and the gateway use the same secret")
    if timestamp is not None:
        check_fresh(GRAFANA_TIMESTAMP, timestamp, max_age_s, now)


def verify_sentry(body: bytes, headers: Mapping[str, str], secret: SecretStr,
                  max_age_s: int = DEFAULT_MAX_AGE_S, now: float | None = None) -> None:
    given = _required(headers, SENTRY_SIGNATURE, "Sentry signs every integration webhook")
    if not _same(given.lower(), hmac_sha256_hex(secret, body)):
        raise AuthError(f"header {SENTRY_SIGNATURE} does not match the body; check the "
                        "integration's client secret")
    timestamp = _required(headers, SENTRY_TIMESTAMP, "Sentry sends it with every webhook")
    check_fresh(SENTRY_TIMESTAMP, timestamp, max_age_s, now)


def verify_pagerduty(body: bytes, headers: Mapping[str, str], secret: SecretStr) -> None:
    raw = _required(headers, PAGERDUTY_SIGNATURE, "PagerDuty V3 webhooks are always signed")
    expected = hmac_sha256_hex(secret, body)
    candidates = [part.strip() for part in raw.split(",") if part.strip()]
    v1 = [c.removeprefix("v1=") for c in candidates if c.startswith("v1=")]
    if not v1:
        raise AuthError(f"header {PAGERDUTY_SIGNATURE} has no v1=<hex> signature")
    # compare against every candidate, no early exit
    matches = [_same(sig.lower(), expected) for sig in v1]
    if not any(matches):
        raise AuthError(f"none of the {len(v1)} signature(s) in {PAGERDUTY_SIGNATURE} match the "
                        "body; check the webhook subscription's secret")


def verify_shared_secret(headers: Mapping[str, str], header_name: str, secret: SecretStr) -> None:
    given = _required(headers, header_name, "add it as a custom header of the Opsgenie webhook")
    if not _same(given, secret.get_secret_value()):
        raise AuthError(f"header {header_name} has the wrong value")


def verify_bearer(headers: Mapping[str, str], token: SecretStr) -> None:
    scheme, credentials = _authorization(headers)
    if scheme != "bearer":
        raise AuthError(f"Authorization scheme is {scheme!r}; expected Bearer")
    if not _same(credentials, token.get_secret_value()):
        raise AuthError("the bearer token is wrong")


def verify_alertmanager(headers: Mapping[str, str], token: SecretStr | None,
                        username: str, password: SecretStr | None) -> None:
    """Bearer token or basic auth, whichever is configured (both may be)."""
    if token is None and password is None:
        return
    scheme, credentials = _authorization(headers)
    if scheme == "bearer" and token is not None:
        if not _same(credentials, token.get_secret_value()):
            raise AuthError("the bearer token is wrong")
        return
    if scheme == "basic" and password is not None:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise AuthError("basic credentials are not base64 of 'user:password'") from exc
        user, sep, given = decoded.partition(":")
        user_ok = _same(user, username)
        password_ok = _same(given, password.get_secret_value())
        if not (sep and user_ok and password_ok):
            raise AuthError("basic auth username or password is wrong")
        return
    accepted = " or ".join(n for n, v in (("Bearer", token), ("Basic", password)) if v is not None)
    raise AuthError(f"Authorization scheme is {scheme!r}; expected {accepted}")


def _authorization(headers: Mapping[str, str]) -> tuple[str, str]:
    value = _required(headers, "Authorization",
                      "configure http_config authorization/basic_auth on the sender")
    scheme, _, credentials = value.partition(" ")
    if not credentials.strip():
        raise AuthError("Authorization header has no credentials after the scheme")
    return scheme.lower(), credentials.strip()


def authenticate(source: str, body: bytes, headers: Mapping[str, str],
                 settings: GatewaySettings) -> None:
    """Verify one delivery for ``source``; no-op where no secret is configured (the gateway
    only starts so when the source is in ``insecure_sources``, on loopback)."""
    if source == "alertmanager":
        verify_alertmanager(headers, settings.alertmanager_bearer_token,
                            settings.alertmanager_basic_username,
                            settings.alertmanager_basic_password)
    elif source == "grafana" and settings.grafana_secret is not None:
        verify_grafana(body, headers, settings.grafana_secret, settings.signature_max_age_s)
    elif source == "sentry" and settings.sentry_client_secret is not None:
        verify_sentry(body, headers, settings.sentry_client_secret, settings.signature_max_age_s)
    elif source == "pagerduty" and settings.pagerduty_secret is not None:
        verify_pagerduty(body, headers, settings.pagerduty_secret)
    elif source == "opsgenie" and settings.opsgenie_secret is not None:
        verify_shared_secret(headers, settings.opsgenie_secret_header, settings.opsgenie_secret)
    elif source == "cloudevents" and settings.cloudevents_bearer_token is not None:
        verify_bearer(headers, settings.cloudevents_bearer_token)
