"""What every provider is: it turns a message into one HTTP request and reads the answer.

A provider knows nothing about retries, budgets or threads (``comms.notifiers`` does that):
:meth:`Provider.request` builds the request for a message (or says why it sends nothing),
:meth:`Provider.accepted` reads a 2xx answer, :meth:`Provider.error_text` a refusal. The
credential is a secret reference resolved on first use and kept in memory only; every text
that leaves a provider goes through :meth:`Provider.scrub`, so no secret reaches a record or log.
"""

from __future__ import annotations

import json
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict

from comms.messages import Kind, Message
from incident.inventory import SecretRef

USER_AGENT = "incident-runbooks-comms/1"
SOURCE = "incident-runbooks"
MAX_ERROR_TEXT = 300


class Delivery(BaseModel):
    """What one provider did with one message: the incident record keeps a list of these."""

    model_config = ConfigDict(frozen=True)

    provider: str
    kind: Kind
    delivered: bool
    detail: str  # "202 accepted", "rejected 400: <provider's text>", "gave up after 3 attempts: 503"
    attempts: int
    ref: str | None = None  # provider-side id to keep (a Statuspage incident id), else None
    at: datetime


@dataclass(frozen=True)
class Call:
    """One HTTP request to a provider; ``what`` names it in details and logs (never the URL)."""

    what: str
    method: str
    url: str
    json: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NotSent:
    """The provider takes this kind but cannot send it now; ``why`` says what to do."""

    why: str


@dataclass(frozen=True)
class Accepted:
    detail: str
    ref: str | None = None


class _Redact(logging.Filter):
    """Takes every resolved credential out of log records of the HTTP client's logger: httpx logs
    each request's URL at INFO, and a Slack webhook URL is a credential."""

    def __init__(self) -> None:
        super().__init__("comms-redact")
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, *values: str) -> None:
        with self._lock:
            self._secrets.update(v for v in values if v)

    def scrub(self, text: str) -> str:
        with self._lock:
            values = sorted(self._secrets, key=len, reverse=True)
        for value in values:
            text = text.replace(value, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.scrub(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


REDACT = _Redact()
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).addFilter(REDACT)


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def answer_json(response: httpx.Response) -> Any:
    """The answer's JSON, or None when it is not JSON."""
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return None


class Provider(ABC):
    """One configured provider; subclasses set ``name`` and implement the three steps."""

    name: str = ""

    def __init__(self, credential: SecretRef, credential_setting: str) -> None:
        self.credential = credential
        self.credential_setting = credential_setting
        self._secret: str | None = None

    def secret(self) -> str:
        """The resolved credential (resolved once); raises SecretUnavailableError."""
        if self._secret is None:
            self._secret = self.credential.resolve().get_secret_value()
            REDACT.add(*self.secrets())
        return self._secret

    def secrets(self) -> list[str]:
        """Every string that must never appear in a detail or a log line."""
        return [self._secret] if self._secret else []

    def scrub(self, text: str) -> str:
        for value in sorted(self.secrets(), key=len, reverse=True):
            if value:
                text = text.replace(value, "***")
        return text

    def takes(self, msg: Message) -> bool:
        """Whether this provider is told about ``msg`` at all (no Delivery when not)."""
        return True

    @abstractmethod
    def request(self, msg: Message, earlier: Sequence[Delivery]) -> Call | NotSent:
        """The request that tells the provider about ``msg``."""

    def accepted(self, call: Call, response: httpx.Response) -> Accepted:
        """Read a 2xx answer (which may lack what was expected: then say so, do not raise).
        By default a JSON answer (PagerDuty's and Opsgenie's 202) is all there is to it."""
        if not isinstance(answer_json(response), dict):
            return Accepted(f"{response.status_code} accepted (the answer was not JSON)")
        return Accepted(f"{response.status_code} accepted")

    def error_text(self, response: httpx.Response) -> str:
        """The provider's own words for a refusal, short and scrubbed."""
        return self.scrub(truncate(" ".join(response.text.split()), MAX_ERROR_TEXT)) or "(empty answer)"


def json_headers(**extra: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "Accept": "application/json",
            "User-Agent": USER_AGENT, **extra}
