"""Mapping of every sender's severity vocabulary to the runbooks' P0..P3."""

from __future__ import annotations

from incident.inventory import Severity

DEFAULT_SEVERITY = Severity.P2  # "degraded": used when the sender says nothing we know

_WORDS: dict[str, Severity] = {
    # P0: production down / someone must be paged now
    "critical": Severity.P0, "crit": Severity.P0, "page": Severity.P0, "fatal": Severity.P0,
    "emergency": Severity.P0, "disaster": Severity.P0, "p0": Severity.P0, "sev0": Severity.P0,
    # P1
    "high": Severity.P1, "error": Severity.P1, "major": Severity.P1, "p1": Severity.P1,
    "sev1": Severity.P1,
    # P2
    "warning": Severity.P2, "warn": Severity.P2, "medium": Severity.P2, "average": Severity.P2,
    "minor": Severity.P2, "p2": Severity.P2, "sev2": Severity.P2,
    # P3
    "info": Severity.P3, "informational": Severity.P3, "low": Severity.P3, "debug": Severity.P3,
    "none": Severity.P3, "notice": Severity.P3, "p3": Severity.P3, "sev3": Severity.P3,
}


def from_word(word: str | None) -> Severity | None:
    """Label ``severity``/``priority`` values, Sentry levels, PagerDuty urgencies."""
    if word is None:
        return None
    return _WORDS.get(word.strip().lower())


def from_p1_p5(priority: str | int | None) -> Severity | None:
    """Opsgenie (P1..P5) and PagerDuty (P1..P5 by default) priorities: P1 is the worst.

    P1 -> P0, P2 -> P1, P3 -> P2, P4 and P5 -> P3. Opsgenie sometimes sends a bare
    integer (``"priority": 3``), which means the same as ``"P3"``.
    """
    if priority is None or isinstance(priority, bool):
        return None
    text = str(priority).strip().upper().removeprefix("P")
    if not text.isdigit():
        return None
    n = int(text)
    if not 1 <= n <= 5:
        return None
    return (Severity.P0, Severity.P1, Severity.P2, Severity.P3, Severity.P3)[n - 1]
