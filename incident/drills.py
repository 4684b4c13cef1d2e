"""Drills as data, and the mark a drill leaves on its target while it runs.

``policies/drills.yaml`` says which fault of the lab's registry each scenario's drill
injects, into which drill target, with which deadline, and which steps the drill approval
policy approves. While a drill runs, its target carries a mark (the Prefect Variable
``runbooks_drill_<target>``, visible in the UI): a remediation run that starts on that target
meanwhile is the drill's run. It is tagged ``drill`` (kept out of the incident metrics), its
messages say [DRILL], and its approvals follow the drill policy ("policy" mode) or wait for a
person ("game-day" mode). A mark outlives a crashed drill by its deadline at most.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

import yaml
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import VariableCreate, VariableUpdate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from incident.approval import AutoApprovalPolicy
from incident.errors import ConfigurationError
from incident.record import DrillMark
from incident.settings import get_settings

DrillMode = Literal["policy", "game-day"]


class DrillSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    fault: str
    target: str = "web"
    deadline_s: float = Field(default=240, gt=0)


class DrillsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    drills: dict[str, DrillSpec] = {}
    approvals: list[AutoApprovalPolicy] = []

    def spec(self, scenario: str) -> DrillSpec:
        if scenario not in self.drills:
            raise ConfigurationError(scenario, "no drill is defined for this scenario",
                                     f"one of {sorted(self.drills)}",
                                     "add the scenario to policies/drills.yaml (RUNBOOKS_DRILLS)")
        return self.drills[scenario]


def load_drills(path: Path | None = None) -> DrillsFile:
    path = path or get_settings().drills
    try:
        return DrillsFile.model_validate(yaml.safe_load(path.read_text()) or {})
    except FileNotFoundError:
        return DrillsFile()
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigurationError(str(path), f"invalid drills file ({exc})", "a valid drills file",
                                 "fix policies/drills.yaml (RUNBOOKS_DRILLS)") from None


# -- the mark on the target ------------------------------------------------------------------
class _Mark(BaseModel):
    drill_run_id: str
    scenario: str
    mode: DrillMode
    until: datetime


def drill_policies(mark: DrillMark | None) -> list[AutoApprovalPolicy]:
    """The approval policies of a drill run: the drill policy in "policy" mode, none in
    game-day mode (a person answers) and outside drills."""
    return load_drills().approvals if mark is not None and mark.mode == "policy" else []


def mark_name(target: str) -> str:
    return "runbooks_drill_" + "".join(c if c.isalnum() else "_" for c in target.lower())


def mark_target(target: str, drill_run_id: str, scenario: str, mode: DrillMode, deadline_s: float) -> None:
    """Put the drill's mark on ``target`` (replacing an older one)."""
    mark = _Mark(drill_run_id=drill_run_id, scenario=scenario, mode=mode,
                 until=datetime.now(timezone.utc) + timedelta(seconds=deadline_s + 60))
    value = mark.model_dump_json()
    with get_client(sync_client=True) as client:
        try:
            client.create_variable(VariableCreate(name=mark_name(target), value=value,
                                                  tags=["runbooks", "drill"]))
        except ObjectAlreadyExists:  # an older drill's mark: overwrite it
            client.update_variable(VariableUpdate(name=mark_name(target), value=value))


def unmark_target(target: str, drill_run_id: str) -> None:
    """Take the drill's mark off ``target`` (only its own)."""
    with get_client(sync_client=True) as client:
        if (mark := _read(client, target)) is not None and mark.drill_run_id == drill_run_id:
            client.delete_variable_by_name(mark_name(target))


def drill_on(target: str) -> DrillMark | None:
    """The drill running on ``target`` now, if any (an expired mark is ignored)."""
    with get_client(sync_client=True) as client:
        mark = _read(client, target)
    if mark is None or mark.until < datetime.now(timezone.utc):
        return None
    return DrillMark(drill_run_id=mark.drill_run_id, scenario=mark.scenario, mode=mark.mode)


def _read(client: SyncPrefectClient, target: str) -> _Mark | None:
    try:
        variable = client.read_variable_by_name(mark_name(target))
    except ObjectNotFound:
        return None
    if variable is None:
        return None
    try:
        value = variable.value if isinstance(variable.value, str) else json.dumps(variable.value)
        return _Mark.model_validate_json(value)
    except ValidationError:
        return None  # not a mark this version wrote: no drill
