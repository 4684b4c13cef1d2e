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

# The benchmarks heal the same target over and over on purpose: the loop guard and the restart
# budget (policies/guardrails.yaml) would rightly stop that, so they get limits never reached.
GUARDRAILS = STATE / "guardrails.yaml"
GUARDRAILS.write_text("defaults: {max_automatic_fixes: 100000, max_failed_fixes: 100000}\n"
                      "blast_radius: {max_restarts_per_service: 100000}\n"
                      "lock: {poll_s: 0.5}\n")
os.environ["RUNBOOKS_GUARDRAILS"] = str(GUARDRAILS)
