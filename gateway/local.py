"""The gateway of the local stack (``make up``): where it listens and the secrets it verifies.

``make up`` (deployments/stack.py) keeps them in ``<state dir>/gateway/local.json``, mode
0600 in a private directory: one secret per source, generated at the first ``make up`` and
kept by the next ones (so that senders configured with them keep working); Alertmanager's
bearer token is the lab's own token file, the one Alertmanager presents. The gateway
process gets them in its environment. ``python -m gateway send-test`` reads the file to
find the running gateway and to sign as each source does.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ValidationError

from gateway.settings import ENV_PREFIX, SECRET_SETTINGS, GatewaySettings, env_name

FILE_NAME = "local.json"

#: the variable that carries each source's secret in the local stack
SECRET_ENV: dict[str, str] = {source: env_name(fields[0]) for source, fields in SECRET_SETTINGS.items()}


class LocalGateway(BaseModel):
    """What ``make up`` recorded about the gateway it started."""

    url: str
    pid: int | None = None
    env: dict[str, str]

    def settings(self) -> GatewaySettings:
        """Gateway settings carrying these secrets (for signing test alerts)."""
        fields = {name.removeprefix(ENV_PREFIX).lower(): value for name, value in self.env.items()
                  if name.startswith(ENV_PREFIX)}
        return GatewaySettings(**fields)  # type: ignore[arg-type]  # values are validated


#: the token the runner processes present to the gateway (``gateway.runner``)
RUNNER_TOKEN_ENV = env_name("runner_token")


def local_state_path(state_dir: Path | None = None) -> Path:
    if state_dir is None:
        from incident.settings import get_settings

        state_dir = get_settings().state_dir
    return state_dir / "gateway" / FILE_NAME


def load_local(path: Path) -> LocalGateway | None:
    """The recorded gateway, or None when there is no (readable, valid) file."""
    try:
        return LocalGateway.model_validate_json(path.read_text())
    except (OSError, ValidationError, ValueError):
        return None


def save_local(path: Path, gateway: LocalGateway) -> None:
    """Write atomically, 0600, in a directory only this user can enter."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.parent.chmod(0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(gateway.model_dump(), indent=2))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def stack_secrets(previous: dict[str, str] | None, alertmanager_token: str,
                  new: Callable[[], str] = lambda: secrets.token_urlsafe(32)) -> dict[str, str]:
    """A secret for every source, and the runners' token: the previous ones where they exist,
    ``new()`` ones otherwise;
    Alertmanager's bearer token is the one the lab's Alertmanager presents."""
    previous = previous or {}
    env = {name: previous.get(name) or new() for name in [*SECRET_ENV.values(), RUNNER_TOKEN_ENV]}
    env[SECRET_ENV["alertmanager"]] = alertmanager_token
    return env
