"""Settings, read from the environment (prefix ``RUNBOOKS_``) with sane defaults.

Every setting is documented in the README's "Settings" table.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_", extra="ignore")

    state_dir: Path = Field(
        default=REPO_ROOT / ".state",
        description="Where the local stack keeps its state (lab, Prefect home, logs).",
    )
    inventory: Path | None = Field(
        default=None,
        description="Inventory file; defaults to the lab's own inventory in the state dir.",
    )
    policies: Path = Field(
        default=REPO_ROOT / "policies" / "approval.yaml",
        description="Auto-approval policy file (reviewed like code).",
    )
    guardrails: Path = Field(
        default=REPO_ROOT / "policies" / "guardrails.yaml",
        description="Guardrail rules (loop guard, shadow mode, blast radius, target lock), "
        "reviewed like code.",
    )
    escalation_policy: Path = Field(
        default=REPO_ROOT / "policies" / "escalation.yaml",
        description="Severity levels, the escalation ladder and status-update intervals "
        "(reviewed like code).",
    )
    drills: Path = Field(
        default=REPO_ROOT / "policies" / "drills.yaml",
        description="The drill of each scenario (fault, target, deadline) and the drill "
        "approval policy (reviewed like code).",
    )
    comms_tick_s: float = Field(
        default=30.0, gt=0, description="How often a run waiting (for a person or a lock) checks "
        "whether its incident is due to move up the escalation ladder or to send a status update.",
    )
    approval_timeout_s: int = Field(
        default=900, description="How long a destructive step waits for a human decision."
    )
    approval_poll_s: int = Field(
        default=2, description="How often a paused run checks whether it was resumed."
    )
    escalation_webhook_url: str | None = Field(
        default=None,
        description="Optional URL that receives a JSON POST when a run escalates to humans.",
    )
    http_timeout_s: float = Field(default=5.0, description="Timeout of every HTTP probe.")
    stale_run_after_s: float = Field(
        default=600.0, ge=60, description="A Running or Paused run with no heartbeat for this long "
        "is taken for dead: marked Crashed, its record closed and escalated (incident/sweeper.py). "
        "Keep it well above PREFECT_FLOWS_HEARTBEAT_FREQUENCY (180 s by default).")

    @property
    def lab_dir(self) -> Path:
        return self.state_dir / "lab"

    @property
    def inventory_path(self) -> Path:
        return self.inventory or (self.lab_dir / "inventory.yaml")


def get_settings() -> Settings:
    return Settings()
