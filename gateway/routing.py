"""Routes as data (routes.yaml): alert -> scenario (Prefect deployment) + target service.

First matching rule wins. Every alert gets a :class:`RouteDecision`; an alert no rule
matches, or whose target cannot be filled in, has ``routed=False`` and a reason.
The file format is documented at the top of routes.yaml.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.errors import RoutesFileError
from gateway.models import Alert, Severity, Source

REGEX_PREFIX = "=~"
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_FIELDS = ("service", "source", "fingerprint")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(_Strict):
    source: Source | list[Source] | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _regexes_compile(cls, labels: dict[str, str]) -> dict[str, str]:
        for name, pattern in labels.items():
            if pattern.startswith(REGEX_PREFIX):
                try:
                    re.compile(pattern[len(REGEX_PREFIX):])
                except re.error as exc:
                    raise ValueError(f"label {name}: invalid regex {pattern!r}: {exc}") from exc
        return labels


class Route(_Strict):
    name: str = Field(min_length=1)
    match: Match
    scenario: str = Field(pattern=r"^[^/\s]+/[^/\s]+$",
                          description="<flow name>/<deployment name>")
    target: str = Field(min_length=1)
    target_default: str | None = None
    severity: Severity | None = None

    @field_validator("target")
    @classmethod
    def _placeholders_known(cls, target: str) -> str:
        for ref in _PLACEHOLDER.findall(target):
            if ref not in _FIELDS and not re.fullmatch(r"(labels|annotations)\.[^.{}]+", ref):
                raise ValueError(f"unknown placeholder {{{ref}}}; use {{labels.NAME}}, "
                                 "{annotations.NAME}, {service}, {source} or {fingerprint}")
        return target


class RoutesFile(_Strict):
    routes: list[Route]


class RouteDecision(_Strict):
    """What to do with one alert. ``routed=False`` always comes with a reason."""

    routed: bool
    reason: str
    rule: str | None = None
    scenario: str | None = None
    target: str | None = None
    severity: Severity
    source: Source
    status: str
    fingerprint: str
    episode_key: str
    dedup_key: str


class Router:
    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = list(routes)

    @classmethod
    def from_yaml(cls, text: str, origin: str = "<routes>") -> Router:
        try:
            doc: Any = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RoutesFileError(f"{origin} is not valid YAML: {exc}") from exc
        try:
            return cls(RoutesFile.model_validate(doc).routes)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise RoutesFileError(f"{origin} is invalid: {problems}") from exc

    @classmethod
    def from_file(cls, path: Path) -> Router:
        try:
            text = path.read_text()
        except OSError as exc:
            raise RoutesFileError(
                f"cannot read routes file {path} ({exc.strerror}); set "
                "RUNBOOKS_GATEWAY_ROUTES_FILE or create it") from exc
        return cls.from_yaml(text, str(path))

    def route(self, alert: Alert) -> RouteDecision:
        for rule in self.routes:
            if not matches(rule.match, alert):
                continue
            target, missing = render_target(rule.target, alert)
            if missing and rule.target_default:
                target = rule.target_default
            elif missing:
                return _decision(alert, routed=False, rule=rule,
                                 reason=f"rule {rule.name!r} matched but the alert has no "
                                        f"{', '.join(missing)} for target {rule.target!r} and "
                                        "the rule has no target_default")
            return _decision(alert, routed=True, rule=rule, target=target,
                             reason=f"matched rule {rule.name!r}")
        return _decision(alert, routed=False, rule=None,
                         reason=f"no route matches (source={alert.source}, "
                                f"alertname={alert.labels.get('alertname', '')!r}); "
                                "add a rule to routes.yaml if it needs a runbook")

    def route_all(self, alerts: Iterable[Alert]) -> list[RouteDecision]:
        return [self.route(a) for a in alerts]


def matches(match: Match, alert: Alert) -> bool:
    if match.source is not None:
        sources = match.source if isinstance(match.source, list) else [match.source]
        if alert.source not in sources:
            return False
    for name, expected in match.labels.items():
        value = alert.labels.get(name, "")
        if expected.startswith(REGEX_PREFIX):
            if re.fullmatch(expected[len(REGEX_PREFIX):], value) is None:
                return False
        elif value != expected:
            return False
    return True


def render_target(template: str, alert: Alert) -> tuple[str, list[str]]:
    """Fill placeholders; returns the text and the placeholders that had no value."""
    missing: list[str] = []

    def value(m: re.Match[str]) -> str:
        ref = m.group(1)
        kind, _, name = ref.partition(".")
        found: str | None
        if kind == "labels":
            found = alert.labels.get(name)
        elif kind == "annotations":
            found = alert.annotations.get(name)
        else:
            found = getattr(alert, ref)
        if not found:
            missing.append(ref)
            return ""
        return found

    return _PLACEHOLDER.sub(value, template), missing


def _decision(alert: Alert, *, routed: bool, rule: Route | None, reason: str,
              target: str | None = None) -> RouteDecision:
    return RouteDecision(
        routed=routed,
        reason=reason,
        rule=rule.name if rule else None,
        scenario=rule.scenario if (rule and routed) else None,
        target=target if routed else None,
        severity=(rule.severity if rule and rule.severity else alert.severity),
        source=alert.source,
        status=alert.status,
        fingerprint=alert.fingerprint,
        episode_key=alert.episode_key,
        dedup_key=alert.dedup_key,
    )
