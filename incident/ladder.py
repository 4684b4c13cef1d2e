"""Severity levels and the escalation ladder, as data (``policies/escalation.yaml``).

The file says, per severity (P0..P3), how fast someone must respond, how often people hear
from an open incident, whether the public status page is told, and how long an incident may
sit at each level of the ladder (L1 on-call .. L4 executives) before it moves up. The clock
itself runs in the incident's run (``incident/comms.py``); this module only reads the rules
and answers "which level is due now".
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from incident.errors import ConfigurationError
from incident.inventory import Severity
from incident.settings import get_settings


class _Rules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SeverityRules(_Rules):
    name: str
    respond_within_minutes: float = Field(ge=0)
    update_every_minutes: float | None = Field(
        default=None, gt=0, description="status updates while open; None: no periodic update")
    status_page: bool = Field(default=False, description="the public status page is told")
    minutes: dict[str, float] = Field(
        default={}, description="per level, how long before moving up (overrides the ladder's)")


class Rung(_Rules):
    level: str = Field(pattern=r"^L\d$")
    who: str
    minutes: float | None = Field(default=None, gt=0, description="None: the clock never moves "
                                  "an incident off this level")

    def describe(self) -> str:
        return f"{self.level} {self.who}"


class EscalationPolicy(_Rules):
    severities: dict[Severity, SeverityRules]
    ladder: list[Rung] = Field(min_length=1)

    @model_validator(mode="after")
    def _complete(self) -> EscalationPolicy:
        missing = [s.value for s in Severity if s not in self.severities]
        if missing:
            raise ValueError(f"severities {missing} are missing")
        levels = [r.level for r in self.ladder]
        if len(set(levels)) != len(levels):
            raise ValueError(f"ladder levels repeat: {levels}")
        for sev, rules in self.severities.items():
            unknown = sorted(set(rules.minutes) - set(levels))
            if unknown:
                raise ValueError(f"{sev.value}: minutes for unknown levels {unknown}")
        return self

    @property
    def first(self) -> Rung:
        return self.ladder[0]

    def rung(self, level: str) -> Rung:
        return next((r for r in self.ladder if r.level == level), self.first)

    def above(self, level: str) -> Rung | None:
        """The next level up, or None at the top."""
        levels = [r.level for r in self.ladder]
        i = levels.index(level) if level in levels else 0
        return self.ladder[i + 1] if i + 1 < len(self.ladder) else None

    def limit(self, severity: Severity, level: str) -> timedelta | None:
        """How long an incident of ``severity`` may stay at ``level``; None: no limit."""
        minutes = self.severities[severity].minutes.get(level, self.rung(level).minutes)
        return None if minutes is None else timedelta(minutes=minutes)

    def update_every(self, severity: Severity) -> timedelta | None:
        minutes = self.severities[severity].update_every_minutes
        return None if minutes is None else timedelta(minutes=minutes)

    def due_moves(self, severity: Severity, level: str, since: datetime,
                  now: datetime) -> list[tuple[Rung, datetime]]:
        """The levels an incident at ``level`` since ``since`` has reached by ``now``, each
        with the moment its time came (several at once when the run could not look)."""
        moves: list[tuple[Rung, datetime]] = []
        while (limit := self.limit(severity, level)) is not None and since + limit <= now:
            nxt = self.above(level)
            if nxt is None:
                break
            since, level = since + limit, nxt.level
            moves.append((nxt, since))
        return moves


def load_escalation_policy(path: Path | None = None) -> EscalationPolicy:
    """The reviewed policy; a missing or broken file is an error that says what to fix."""
    path = path or get_settings().escalation_policy
    try:
        return EscalationPolicy.model_validate(yaml.safe_load(path.read_text()) or {})
    except FileNotFoundError:
        raise ConfigurationError(str(path), "the escalation policy file is missing",
                                 "policies/escalation.yaml or RUNBOOKS_ESCALATION_POLICY",
                                 "restore the file or point RUNBOOKS_ESCALATION_POLICY at one") from None
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigurationError(str(path), f"invalid escalation policy ({exc})",
                                 "a valid escalation policy (see policies/escalation.yaml)",
                                 "fix the file (RUNBOOKS_ESCALATION_POLICY)") from None
