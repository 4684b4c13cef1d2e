"""Fixtures of the gateway tests: the real webhook payloads of the shared directory, and
inventories for the router's target check.

CI clones the repo with ``shared/`` beside it; ``RUNBOOKS_SHARED_DIR`` overrides that.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from incident.settings import REPO_ROOT

SHARED_DIR = Path(os.environ.get("RUNBOOKS_SHARED_DIR", REPO_ROOT.parent / "shared"))
PAYLOADS_DIR = SHARED_DIR / "payloads"


def payload_files() -> list[Path]:
    return sorted(PAYLOADS_DIR.glob("*/*.json"))


def payload(relative: str) -> bytes:
    path = PAYLOADS_DIR / relative
    if not path.is_file():
        pytest.fail(f"payload {path} not found; set RUNBOOKS_SHARED_DIR to the directory that "
                    "holds payloads/ (default: <repo>/../shared)")
    return path.read_bytes()


@pytest.fixture(scope="session")
def payloads_dir() -> Path:
    if not PAYLOADS_DIR.is_dir():
        pytest.fail(f"{PAYLOADS_DIR} does not exist; set RUNBOOKS_SHARED_DIR")
    return PAYLOADS_DIR


#: every target the gateway unit tests route to (the router checks targets against the inventory)
TEST_SERVICES = ("web", "api", "zulip-integration-testing", "component-x-region-x",
                 "component-y-region-y", *(f"svc-{i}" for i in range(200)))


def write_inventory(path: Path, services: tuple[str, ...] | list[str] = TEST_SERVICES) -> Path:
    """A valid inventory naming ``services`` (nothing behind them is reachable)."""
    lines = ["services:"] + [f"  {name}: {{environment: drill, owner: sre, "
                             f"health_url: 'http://127.0.0.1:9/health'}}" for name in services]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def inventory_file(tmp_path_factory) -> Path:
    return write_inventory(tmp_path_factory.mktemp("inventory") / "inventory.yaml")


@pytest.fixture
def test_inventory(inventory_file: Path, monkeypatch) -> Path:
    """RUNBOOKS_INVENTORY pointing at the test inventory for one test (the router reads it)."""
    monkeypatch.setenv("RUNBOOKS_INVENTORY", str(inventory_file))
    return inventory_file
