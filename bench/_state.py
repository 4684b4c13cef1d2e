"""What every benchmark does first: its own state dir, set before Prefect is imported.

Imported by the scripts in bench/ (run as ``python bench/NAME.py``) before anything else
of the project, so that their Prefect server, lab and settings never touch ``.state``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
STATE = Path(tempfile.mkdtemp(prefix="rb-bench-"))
STATE.chmod(0o755)  # the lab runs PostgreSQL as user postgres below it
os.environ["RUNBOOKS_STATE_DIR"] = str(STATE)
os.environ["RUNBOOKS_INVENTORY"] = str(STATE / "lab" / "inventory.yaml")
