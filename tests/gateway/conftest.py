"""Fixtures of the gateway tests: the real webhook payloads of the shared directory.

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
