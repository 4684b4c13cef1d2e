"""The fault registry: named ways to break one part of the lab, for drills and tests.

A fault knows how to break its part (``inject``), how to put it right by hand
(``reset``) and whether its part is healthy again (``healthy``: what a runbook run
should achieve), plus which runbook ``scenario`` handles it, which Prometheus ``alert``
is expected to fire (None: no alert rule covers it yet) and whether that scenario is
expected to heal it on its own (``heals``, default True; False: the run should escalate).

Each system module defines its faults next to its own code, e.g. in lab/web.py::

    from lab.faults import fault

    @fault("web-killed", scenario="service-down", alert="ServiceDown",
           description="docker kill the web container: /health stops answering",
           reset=lambda lab: lab.reset_web(), healthy=lambda lab: lab.web.healthy())
    def _inject_web_killed(lab):
        lab.kill_web()

and :mod:`lab.core` imports that module, so the fault is known to ``Lab.inject(name)``,
``Lab.reset_fault(name)``, ``Lab.reset_all_faults()`` and ``python -m lab faults``.

**Faults that need a long-lived helper process** (say, a client holding every database
connection) start it with :func:`start_holder` from their ``inject``: the helper runs as
a lab process ``fault-<name>`` with its own pidfile (``pids/fault-<name>.pid``) and log,
started by the process helper like every lab process. It is stopped by that PID, never
by name: before the fault's ``reset`` runs (:meth:`Lab.reset_fault` does it, so ``reset``
need not), by ``reset_all_faults`` whenever a holder is left, and by ``Lab.down()``::

    @fault("pg-connections-exhausted", scenario="db-connections", alert=None,
           description="a client holds every PostgreSQL connection",
           reset=lambda lab: None, healthy=lambda lab: lab.postgres.accepts_connections())
    def _inject(lab):
        start_holder(lab, "pg-connections-exhausted",
                     [sys.executable, "-m", "lab.holders.pg_conns", str(lab.info.pg_port)],
                     ready=lambda: not lab.postgres.accepts_connections())
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lab.proc import LabError, cmdline, pid_alive

if TYPE_CHECKING:
    from lab.core import Lab

HOLDER_PREFIX = "fault-"


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    scenario: str  # the runbook scenario expected to heal it, e.g. "service-down"
    alert: str | None  # the Prometheus alert expected to fire, or None
    inject: Callable[[Lab], None]
    reset: Callable[[Lab], None]
    healthy: Callable[[Lab], bool]  # is the part this fault breaks healthy (again)?
    # the scenario's run is expected to heal it on its own; False: the runbook should see
    # it cannot (say, a disk full of data it must not delete) and escalate instead
    heals: bool = True
    # is the part as `up` / `reset` leave it? Stricter than healthy where a runbook's fix is not
    # the baseline (a rollback heals a broken release but runs the previous image); what
    # reset_all_faults looks at. None: the same as healthy.
    at_baseline: Callable[[Lab], bool] | None = None

    def is_at_baseline(self, lab: Lab) -> bool:
        return (self.at_baseline or self.healthy)(lab)


FAULTS: dict[str, Fault] = {}  # by name, in registration order


def register(f: Fault) -> Fault:
    if f.name in FAULTS and FAULTS[f.name] != f:
        raise ValueError(f"fault {f.name!r} is already registered")
    FAULTS[f.name] = f
    return f


def unregister(name: str) -> None:
    """Forget a fault (for tests that register a throwaway one)."""
    FAULTS.pop(name, None)


def fault(name: str, *, description: str, scenario: str, alert: str | None,
          reset: Callable[[Lab], None], healthy: Callable[[Lab], bool], heals: bool = True,
          at_baseline: Callable[[Lab], bool] | None = None):
    """Decorator: register the decorated ``inject(lab)`` function as fault ``name``."""

    def deco(inject: Callable[[Lab], None]) -> Callable[[Lab], None]:
        register(Fault(name=name, description=description, scenario=scenario, alert=alert,
                       inject=inject, reset=reset, healthy=healthy, heals=heals, at_baseline=at_baseline))
        return inject

    return deco


def get(name: str) -> Fault:
    try:
        return FAULTS[name]
    except KeyError:
        raise LabError(f"unknown fault {name!r}; known faults: {', '.join(FAULTS) or '(none)'}") from None


# --------------------------------------------------------------------------- holders


def holder_name(fault_name: str) -> str:
    return f"{HOLDER_PREFIX}{fault_name}"


def _holder_expect(lab: Lab, fault_name: str) -> str:
    """The cmdline recorded with the holder's PID (line 2 of its pidfile, as a JSON string)."""
    try:
        lines = lab.ctx.pidfile(holder_name(fault_name)).read_text().splitlines()
        return str(json.loads(lines[1])) if len(lines) > 1 else ""
    except (OSError, ValueError):
        return ""


def holder_pid(lab: Lab, fault_name: str) -> int | None:
    """The holder's PID if it runs the program it was started with."""
    pid = lab.ctx.read_pid(holder_name(fault_name))
    expect = _holder_expect(lab, fault_name)
    if pid and expect and pid_alive(pid) and expect in cmdline(pid):
        return pid
    return None


def start_holder(lab: Lab, fault_name: str, argv: list[str], ready: Callable[[], bool] | None = None,
                 timeout: float = 20.0) -> int:
    """Start ``argv`` as lab process ``fault-<fault_name>`` (pidfile + log), replacing a
    holder left from before; wait for ``ready()`` (failing at once if it exits). Its PID."""
    name = holder_name(fault_name)
    stop_holder(lab, fault_name)
    proc = lab.ctx.procs.start(name, argv, write_pid=False)
    # the cmdline goes with the PID: a stale pidfile must never make us signal another program
    lab.ctx.pidfile(name).write_text(f"{proc.pid}\n{json.dumps(' '.join(argv))}\n")
    if ready is not None:
        try:
            lab.ctx.procs.wait_started(name, proc, ready, timeout, f"{shlex.join(argv)} did not take effect")
        except LabError:
            stop_holder(lab, fault_name)
            raise
    return proc.pid


def stop_holder(lab: Lab, fault_name: str, timeout: float = 10.0) -> None:
    """Stop the fault's holder by the PID in its pidfile (if it still runs that program)."""
    name = holder_name(fault_name)
    expect = _holder_expect(lab, fault_name)
    if expect:
        lab.ctx.procs.stop(name, timeout=timeout, expect=expect)
    lab.ctx.pidfile(name).unlink(missing_ok=True)


def held_faults(lab: Lab) -> list[str]:
    """Names of the faults that have a holder pidfile (alive or not)."""
    pids_dir = lab.ctx.pids_dir
    if not pids_dir.is_dir():
        return []
    return sorted(p.stem[len(HOLDER_PREFIX):] for p in pids_dir.glob(f"{HOLDER_PREFIX}*.pid"))


def stop_all_holders(lab: Lab) -> None:
    for name in held_faults(lab):
        stop_holder(lab, name)
