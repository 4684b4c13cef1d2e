"""Send one incident message to every configured provider; a failure is recorded, never raised.

    notifiers = Notifiers.from_settings()          # the providers RUNBOOKS_* configure
    deliveries = notifiers.send(msg, earlier=record_deliveries)

Each provider gets one :class:`Delivery` per message it takes (Statuspage takes no drills and
no acknowledgements), whatever happened: delivered, refused (4xx, not retried, with the
provider's own error text), or given up after bounded retries. Only transport errors, 429 /
420 (after ``Retry-After``) and 5xx are retried, at most ``RUNBOOKS_NOTIFY_ATTEMPTS`` times
within ``RUNBOOKS_NOTIFY_BUDGET_S`` per provider; providers are served in parallel, so a
message takes at most about one budget. Every request has a timeout. Nothing here raises for
a provider's failure: a remediation must never break because a pager or a chat did.

Details and log lines (logger ``runbooks.comms``) never carry a credential or a webhook URL.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from functools import cache

import httpx
from pydantic import ValidationError

from comms.messages import Message
from comms.providers import Call, Delivery, NotSent, Opsgenie, PagerDuty, Provider, Slack, Statuspage
from comms.providers.base import truncate
from comms.settings import PROVIDER_SETTINGS, CommsSettings, env_name
from incident.errors import ConfigurationError
from incident.inventory import SecretRef

__all__ = ["Delivery", "Notifiers", "RetryPolicy"]

log = logging.getLogger("runbooks.comms")

#: answers worth another attempt besides 5xx: 429, and 420 (Statuspage's rate limit answer)
RATE_LIMITED = frozenset({420, 429})
_SECRET_REF = re.compile(r"^(env|file|prefect-secret):.+$")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one provider is tried for one message."""

    attempts: int = 3
    budget_s: float = 15.0
    backoff_s: float = 1.0
    timeout_s: float = 5.0

    @classmethod
    def of(cls, settings: CommsSettings) -> RetryPolicy:
        return cls(settings.notify_attempts, settings.notify_budget_s, settings.notify_backoff_s,
                   settings.notify_timeout_s)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def retry_after_s(response: httpx.Response) -> float | None:
    """The answer's ``Retry-After`` in seconds (delta-seconds or an HTTP date), if any."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - _now()).total_seconds())


@cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every request (building one per client costs ~25 ms)."""
    return httpx.create_ssl_context()


def _plural(n: int) -> str:
    return f"{n} attempt{'' if n == 1 else 's'}"


def _transport_text(exc: httpx.HTTPError) -> str:
    reason = " ".join(str(exc).split())
    return f"{type(exc).__name__} ({truncate(reason, 120)})" if reason else type(exc).__name__


class _Attempts:
    """The attempts of one provider for one message, within the policy's count and budget."""

    def __init__(self, provider: Provider, call: Call, policy: RetryPolicy) -> None:
        self.provider, self.call, self.policy = provider, call, policy
        self.deadline = time.monotonic() + policy.budget_s

    def run(self) -> tuple[bool, str, int, str | None]:
        """(delivered, detail, attempts, ref)."""
        last = ""
        with httpx.Client(follow_redirects=False, verify=_tls()) as client:
            for attempt in range(1, self.policy.attempts + 1):
                wait: float | None = None
                timeout = min(self.policy.timeout_s, max(self.deadline - time.monotonic(), 0.5))
                try:
                    response = client.request(self.call.method, self.call.url, json=self.call.json,
                                              headers=self.call.headers, timeout=timeout)
                except httpx.TransportError as exc:
                    last = _transport_text(exc)
                else:
                    code = response.status_code
                    if 200 <= code < 300:
                        accepted = self.provider.accepted(self.call, response)
                        return True, accepted.detail, attempt, accepted.ref
                    text = self.provider.error_text(response)
                    if code not in RATE_LIMITED and code < 500:
                        return False, f"rejected {code}: {text}", attempt, None
                    last = f"{code}: {text}"
                    wait = retry_after_s(response)  # 429/420, and a 503 may say when to come back
                if attempt == self.policy.attempts:
                    break
                told = wait is not None
                wait = self.policy.backoff_s * 2 ** (attempt - 1) if wait is None else wait
                left = self.deadline - time.monotonic()
                if wait > left:
                    why = f"Retry-After {wait:g} s" if told else f"the next attempt in {wait:g} s"
                    return (False, f"gave up after {_plural(attempt)}: {last} ({why} is beyond the "
                            f"{self.policy.budget_s:g} s budget)", attempt, None)
                time.sleep(wait)
        return False, f"gave up after {_plural(self.policy.attempts)}: {last}", self.policy.attempts, None


def deliver(provider: Provider, msg: Message, earlier: Sequence[Delivery], policy: RetryPolicy) -> Delivery:
    """Tell one provider about ``msg``; whatever happens, a Delivery says what it was."""
    try:
        call = provider.request(msg, earlier)
        if isinstance(call, NotSent):
            delivered, detail, attempts, ref = False, f"not sent: {call.why}", 0, None
        else:
            delivered, detail, attempts, ref = _Attempts(provider, call, policy).run()
    except ConfigurationError as exc:  # the credential's secret reference did not resolve
        delivered, detail, attempts, ref = False, f"not sent: credentials unavailable: {exc}", 0, None
    except Exception as exc:  # a bug or an unforeseen answer: recorded, never raised
        delivered, detail, attempts, ref = (
            False, f"not sent: {type(exc).__name__} while notifying: {truncate(str(exc), 200)}", 0, None)
    detail = provider.scrub(detail)
    if delivered:
        log.info("%s: %s of %s delivered: %s (%s)", provider.name, msg.kind, msg.incident_id, detail,
                 _plural(attempts))
    else:
        log.warning("%s: %s of %s NOT delivered: %s (%s); the incident record keeps this, tell "
                    "people by hand if it matters", provider.name, msg.kind, msg.incident_id, detail,
                    _plural(attempts))
    return Delivery(provider=provider.name, kind=msg.kind, delivered=delivered, detail=detail,
                    attempts=attempts, ref=ref, at=_now())


class Notifiers:
    """The configured providers; :meth:`send` tells each of them about one message."""

    def __init__(self, providers: Sequence[Provider] = (), policy: RetryPolicy | None = None) -> None:
        self.providers: tuple[Provider, ...] = tuple(providers)
        self.policy = policy or RetryPolicy()

    @classmethod
    def from_settings(cls, settings: CommsSettings | None = None) -> Notifiers:
        """The providers the ``RUNBOOKS_*`` settings configure (none: an empty Notifiers).

        Raises ConfigurationError for a half-configured provider, a credential that is not a
        secret reference, a URL that is not http(s) or an invalid number, naming the setting.
        """
        settings = settings or load_settings()
        for provider, names in PROVIDER_SETTINGS.items():
            _check_complete(settings, provider, names)
        providers: list[Provider] = []
        if settings.pagerduty_routing_key is not None:
            providers.append(PagerDuty(_ref(settings, "pagerduty_routing_key"), _url(settings, "pagerduty_url")))
        if settings.opsgenie_api_key is not None:
            providers.append(Opsgenie(_ref(settings, "opsgenie_api_key"), _url(settings, "opsgenie_url")))
        if settings.slack_webhook_url is not None:
            providers.append(Slack(_ref(settings, "slack_webhook_url")))
        if settings.statuspage_api_key is not None:
            providers.append(Statuspage(
                _ref(settings, "statuspage_api_key"), str(settings.statuspage_page_id),
                str(settings.statuspage_component_id), _url(settings, "statuspage_url"),
                settings.statuspage_deliver_notifications))
        return cls(providers, RetryPolicy.of(settings))

    def configured(self) -> list[str]:
        return [p.name for p in self.providers]

    def send(self, msg: Message, earlier: Sequence[Delivery] = ()) -> list[Delivery]:
        """One Delivery per configured provider that takes ``msg``; never raises for a provider.

        ``earlier``: this incident's previous deliveries (Statuspage finds its incident there).
        """
        chosen = [p for p in self.providers if p.takes(msg)]
        earlier = tuple(earlier)
        if len(chosen) <= 1:
            return [deliver(p, msg, earlier, self.policy) for p in chosen]
        with ThreadPoolExecutor(max_workers=len(chosen), thread_name_prefix="comms") as pool:
            return list(pool.map(lambda p: deliver(p, msg, earlier, self.policy), chosen))


def load_settings() -> CommsSettings:
    """CommsSettings from the environment; an invalid value is a ConfigurationError (value not shown)."""
    try:
        return CommsSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{env_name(str(e['loc'][0])) if e['loc'] else 'settings'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False))
        raise ConfigurationError("notifiers", problems, "valid RUNBOOKS_* notifier settings",
                                 "fix the named environment variables (README: Settings)") from None


def _check_complete(settings: CommsSettings, provider: str, names: tuple[str, ...]) -> None:
    values = {name: getattr(settings, name) for name in names}
    for name, value in values.items():
        if value is not None and not str(value).strip():
            raise ConfigurationError(
                f"{provider} notifier", f"{env_name(name)} is set but empty", "a value, or the variable unset",
                f"set {env_name(name)}, or unset it to leave {provider} out")
    missing = [env_name(n) for n, v in values.items() if v is None]
    if missing and len(missing) < len(names):
        present = [env_name(n) for n, v in values.items() if v is not None]
        raise ConfigurationError(
            f"{provider} notifier", f"{', '.join(present)} set but {', '.join(missing)} not",
            f"all of {', '.join(env_name(n) for n in names)} set, or none",
            f"set {', '.join(missing)} (README: Settings), or unset {', '.join(present)} to leave {provider} out")


def _ref(settings: CommsSettings, name: str) -> SecretRef:
    value = str(getattr(settings, name)).strip()
    if not _SECRET_REF.match(value):
        raise ConfigurationError(
            env_name(name), "a value that is not a secret reference (not shown)",
            "env:NAME, file:/path or prefect-secret:block-name",
            f"store the credential in a Prefect Secret block (or a file, or another variable) and set "
            f"{env_name(name)}=prefect-secret:<block name>")
    return SecretRef(ref=value)


def _url(settings: CommsSettings, name: str) -> str:
    value = str(getattr(settings, name)).strip()
    if not re.match(r"^https?://[^/\s]+", value):
        raise ConfigurationError(env_name(name), f"{value!r} is not an http(s) URL", "https://host[:port]",
                                 f"set {env_name(name)} to the provider's API base URL, or unset it for the default")
    return value
