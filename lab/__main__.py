"""``python -m lab up [--alerting] | down | status | faults | inject NAME | reset [NAME]``.

``kill-web``, ``break-web`` and ``reset-web`` are kept as aliases of
``inject web-killed``, ``inject web-broken-release`` and ``reset web-killed``.
Exit codes: 0 ok, 1 the lab failed (or ``status``: not all up), 2 usage.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import NamedTuple

from lab import app, faults
from lab.core import Lab, LabError


class Command(NamedTuple):
    args: str  # usage of the arguments
    nargs: tuple[int, int]  # min, max
    help: str
    run: Callable[[Lab, list[str]], int]


def _up(lab: Lab, args: list[str]) -> int:
    if args not in ([], ["--alerting"]):
        raise _Usage(f"up: unknown option {' '.join(args)}")
    alerting = bool(args)
    t0 = time.monotonic()
    info = lab.up(alerting=alerting)
    print(f"lab up in {time.monotonic() - t0:.1f}s ({lab.lab_dir})")
    print(f"  health URL     {info.health_url}")
    print(f"  docker socket  {info.docker_base_url}   (docker -H {info.docker_base_url} ps)")
    print(f"  container      {info.container_name} ({info.web_image}; metrics {info.metrics_url}, "
          f"admin token {info.admin_token_file})")
    print(f"  upstream       {info.upstream_url}/price   (container {app.UPSTREAM_CONTAINER})")
    print(f"  worker         {info.worker_url}/metrics   (container {app.WORKER_CONTAINER}, "
          f"consumes Redis list '{app.QUEUE_KEY}')")
    print(f"  traffic        {app.TRAFFIC_RPS} requests/s on http://127.0.0.1:{info.web_port}/api/price "
          f"(log {lab.log('traffic')})")
    print(f"  app log        {info.app_log_file}")
    print(f"  postgres       127.0.0.1:{info.pg_port} db=app user=app password file {info.pg_password_file}")
    print(f"  redis          127.0.0.1:{info.redis_port}")
    print(f"  ssh            ssh -i {info.ssh_key} -o UserKnownHostsFile={info.known_hosts} "
          f"-p {info.ssh_port} root@127.0.0.1")
    print(f"  inventory      {lab.inventory_path}")
    if alerting:
        print(f"  prometheus     {info.prometheus_url}   (rules: ServiceDown on {info.health_url}; "
              "PostgresConnectionsExhausted, PostgresLockContention, RedisDown, DiskSpaceLow, AppMemoryHigh, "
              "AppCpuHigh, UpstreamFailing, HighErrorRate, ServiceWontStart, LogFileTooLarge, QueueBacklogHigh)")
        print(f"  alertmanager   {info.alertmanager_url}")
        print(f"  blackbox       {info.blackbox_url}")
        print(f"  webhook to     {info.gateway_url}/alerts/alertmanager   "
              f"(Bearer token in {info.alertmanager_token_file})")
    print(f"  logs           {info.logs_dir}/")
    return 0


def _down(lab: Lab, args: list[str]) -> int:
    lab.down()
    print("lab down")
    return 0


def _status(lab: Lab, args: list[str]) -> int:
    st = lab.status()
    for name, state in st.items():
        print(f"  {name:<9} {state}")
    return 0 if all(v == "up" for v in st.values()) else 1


def _faults(lab: Lab, args: list[str]) -> int:
    rows = [(f.name, f.scenario, f.alert or "-", f.description) for f in faults.FAULTS.values()]
    w = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(("fault", "scenario", "alert"))]
    print(f"{'fault':<{w[0]}}  {'scenario':<{w[1]}}  {'alert':<{w[2]}}  description")
    for name, scenario, alert, description in rows:
        print(f"{name:<{w[0]}}  {scenario:<{w[1]}}  {alert:<{w[2]}}  {description}")
    return 0


def _known(name: str) -> faults.Fault:
    if name not in faults.FAULTS:
        raise _Usage(f"unknown fault {name!r}; known faults: {', '.join(faults.FAULTS)}")
    return faults.FAULTS[name]


def _inject(lab: Lab, args: list[str]) -> int:
    f = _known(args[0])
    lab.inject(f.name)
    print(f"injected {f.name}: {f.description}")
    print(f"  expected: alert {f.alert or '(none)'}, healed by runbook scenario {f.scenario}")
    return 0


def _reset(lab: Lab, args: list[str]) -> int:
    if args:
        f = _known(args[0])
        lab.reset_fault(f.name)
        print(f"reset {f.name}: healthy again" if lab.fault_healthy(f.name) else f"reset {f.name}: STILL NOT HEALTHY")
        return 0 if lab.fault_healthy(f.name) else 1
    done = lab.reset_all_faults()
    print(f"reset {', '.join(done)}" if done else "every fault's part is healthy; nothing to reset")
    return 0


COMMANDS: dict[str, Command] = {
    "up": Command("[--alerting]", (0, 1), "start what is not running (--alerting: also the alerting stack)", _up),
    "down": Command("", (0, 0), "stop everything the lab started, by PID", _down),
    "status": Command("", (0, 0), "state of each part (exit 1 unless all are up)", _status),
    "faults": Command("", (0, 0), "list the registered faults", _faults),
    "inject": Command("NAME", (1, 1), "break the lab with a registered fault", _inject),
    "reset": Command("[NAME]", (0, 1), "put a fault right (no NAME: every fault whose part is unhealthy)", _reset),
}
ALIASES: dict[str, list[str]] = {
    "kill-web": ["inject", "web-killed"],
    "break-web": ["inject", "web-broken-release"],
    "reset-web": ["reset", "web-killed"],
}


class _Usage(Exception):
    pass


def usage() -> str:
    lines = ["usage: python -m lab COMMAND", ""]
    for name, c in COMMANDS.items():
        lines.append(f"  {(name + ' ' + c.args).strip():<18} {c.help}")
    for alias, argv in ALIASES.items():
        lines.append(f"  {alias:<18} = {' '.join(argv)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stderr)
        return 0 if argv else 2
    if argv[0] in ALIASES and len(argv) == 1:
        argv = ALIASES[argv[0]]
    cmd, args = argv[0], argv[1:]
    c = COMMANDS.get(cmd)
    if c is None or not c.nargs[0] <= len(args) <= c.nargs[1]:
        print(usage(), file=sys.stderr)
        return 2
    from incident.settings import get_settings

    lab = Lab(get_settings().lab_dir)
    try:
        return c.run(lab, args)
    except _Usage as exc:
        print(f"lab {cmd}: {exc}", file=sys.stderr)
        return 2
    except LabError as exc:
        print(f"lab {cmd} failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
