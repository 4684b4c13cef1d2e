"""The inventory (incident/inventory.py's format) that points the runbooks at the lab."""

from __future__ import annotations

from pathlib import Path

from lab.app import app_inventory
from lab.context import LabInfo
from lab.postgres import LAB_CONNECTIONS_THRESHOLD, LAB_MAX_IDLE_S, RUNBOOKS_ROLE, runbooks_password_file
from lab.disk import disk_inventory
from lab.redis import redisctl_path


def inventory_dict(i: LabInfo) -> dict:
    return {
        "docker_hosts": {"lab": {"base_url": i.docker_base_url}},
        "ssh_hosts": {"lab": {
            "hostname": "127.0.0.1", "port": i.ssh_port, "username": "root",
            "key_file": str(i.ssh_key), "known_hosts": str(i.known_hosts),
        }},
        "databases": {"lab": {
            "host": "127.0.0.1", "port": i.pg_port, "dbname": "app", "user": "app",
            "password": f"file:{i.pg_password_file}",
            # the database runbooks: their own role (pg_monitor + pg_signal_backend), and
            # lab thresholds that let lab faults qualify quickly (real default max_idle_s: 300)
            "admin_user": RUNBOOKS_ROLE, "admin_password": f"file:{runbooks_password_file(i)}",
            "max_idle_s": LAB_MAX_IDLE_S, "connections_threshold": LAB_CONNECTIONS_THRESHOLD,
        }},
        "redis": {"lab": {
            "host": "127.0.0.1", "port": i.redis_port,
            # the redis-down runbook starts it over SSH, as `systemctl start redis-server` would
            "ssh_host": "lab", "start_command": [str(redisctl_path(i.lab_dir)), "start"],
        }},
        "services": {"web": {
            "environment": "lab", "owner": "sre-lab", "health_url": i.health_url,
            "container": i.container_name, "docker_host": "lab", "ssh_host": "lab",
            "database": "lab", "redis": "lab", "stateless": True, "severity_down": "P0",
            # the disk-full runbook: the lab's 64 MiB tmpfs (lab/disk.py; thresholds scaled)
            "disk": disk_inventory(i.lab_dir),
            # the application runbooks: metrics, admin endpoints, upstream, log, queue (lab/app.py)
            "app": app_inventory(i),
        }},
    }


def write_inventory(path: Path, info: LabInfo) -> None:
    """Written atomically: flows may read it while ``up`` rewrites it."""
    import yaml

    header = "# Written by `python -m lab up` (lab/inventory.py); rewritten at every up.\n"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(header + yaml.safe_dump(inventory_dict(info), sort_keys=False))
    tmp.replace(path)
