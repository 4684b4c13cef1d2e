"""Errors of the gateway. Messages say what was wrong and what to do; never a secret."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class AuthError(GatewayError):
    """The request is not authenticated: credential missing, malformed or wrong (HTTP 401)."""


class PayloadError(GatewayError):
    """The body is not a valid webhook of the source it was sent to (HTTP 422).

    ``path`` names the offending field (``alerts[2].labels``) when there is one.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class NotUtf8Error(PayloadError):
    """The body is not UTF-8 text (UTF-16, UTF-32, Latin-1 ...): JSON on the wire is UTF-8
    (RFC 8259 section 8.1). The app answers 415."""


class NotAnAlert(GatewayError):
    """A well-formed, authentic webhook that carries no alert state change.

    Examples: a PagerDuty ``pagey.ping``, a Sentry ``installation`` hook, an Opsgenie
    ``AddNote``. The app answers 202 with the reason, so it is never dropped silently.
    """


class RoutesFileError(GatewayError):
    """routes.yaml is missing or invalid; a human must fix the file."""


class GatewayConfigError(GatewayError):
    """The gateway's settings are unsafe or inconsistent; it refuses to start until they are fixed."""


class RunnerBusy(GatewayError):
    """The runner's queue is full: the delivery was not recorded (HTTP 503 with Retry-After).

    Raised before the store sees the delivery, so that the sender's retry is news, not a
    duplicate."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)
