"""The data tier's exporters in the lab, and the alert rules teams really run on them.

Debian's real exporters, one process each, on loopback, scraped by the lab's Prometheus
every second:

    prometheus-postgres-exporter  (role ``monitor``: pg_monitor only; password from a file)
    prometheus-redis-exporter     (redis_up)
    prometheus-node-exporter      (filesystem collector only: the lab's disk)

Rules (``data_tier_rules``), each labelled with the service they hurt so that routes.yaml
can send them to a runbook, and each with a short ``for`` so that a drill fires in seconds
(production: minutes):

    PostgresConnectionsExhausted  connections in use / max_connections above the threshold
    PostgresLockContention        sessions waiting on a lock held by another session
    RedisDown                     redis_up == 0
    DiskSpaceLow                  free bytes or free fraction of the service's disk too low

Thresholds come from the lab's inventory values, so the alert and the runbook agree.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lab.context import LabInfo
from lab.proc import expect_cmdline

POSTGRES_EXPORTER_BIN = "prometheus-postgres-exporter"
REDIS_EXPORTER_BIN = "prometheus-redis-exporter"
NODE_EXPORTER_BIN = "prometheus-node-exporter"
EXPORTERS = ("postgres-exporter", "redis-exporter", "node-exporter")
MONITOR_ROLE = "monitor"
#: the exporter's sessions name themselves so; the runbooks never end them (protected_applications)
EXPORTER_APPLICATION = "postgres_exporter"

expect_cmdline("postgres-exporter", POSTGRES_EXPORTER_BIN)
expect_cmdline("redis-exporter", REDIS_EXPORTER_BIN)
expect_cmdline("node-exporter", NODE_EXPORTER_BIN)

#: Custom query of the postgres exporter (its --extend.query-path format): sessions that wait
#: for a lock another session holds. The exporter has no such metric by default.
POSTGRES_QUERIES = {
    "pg_blocked": {
        "query": "SELECT count(*) AS sessions FROM pg_stat_activity "
                 "WHERE cardinality(pg_blocking_pids(pid)) > 0",
        "metrics": [{"sessions": {"usage": "GAUGE",
                                  "description": "Sessions waiting for a lock held by another session"}}],
    },
}


def monitor_password_file(info: LabInfo) -> Path:
    return info.pg_password_file.with_name("pg_monitor_password")


def _bin(name: str) -> str:
    return shutil.which(name) or f"/usr/bin/{name}"


def exporter_specs(info: LabInfo, queries_file: Path) -> list[tuple[str, str, int, str, list[str], dict[str, str]]]:
    """(name, package, port, readiness URL, argv, extra environment) per exporter."""
    assert info.postgres_exporter_port and info.redis_exporter_port and info.node_exporter_port
    pg_env = {
        # no secret in argv or the environment: the exporter reads the password from its file
        "DATA_SOURCE_URI": f"127.0.0.1:{info.pg_port}/app?sslmode=disable&application_name={EXPORTER_APPLICATION}",
        "DATA_SOURCE_USER": MONITOR_ROLE,
        "DATA_SOURCE_PASS_FILE": str(monitor_password_file(info)),
    }
    return [
        ("postgres-exporter", POSTGRES_EXPORTER_BIN, info.postgres_exporter_port,
         f"http://127.0.0.1:{info.postgres_exporter_port}/metrics", [
             _bin(POSTGRES_EXPORTER_BIN), f"--web.listen-address=127.0.0.1:{info.postgres_exporter_port}",
             f"--extend.query-path={queries_file}", "--log.level=warn",
         ], pg_env),
        ("redis-exporter", REDIS_EXPORTER_BIN, info.redis_exporter_port,
         f"http://127.0.0.1:{info.redis_exporter_port}/metrics", [
             _bin(REDIS_EXPORTER_BIN), f"-redis.addr=redis://127.0.0.1:{info.redis_port}",
             f"-web.listen-address=127.0.0.1:{info.redis_exporter_port}",
         ], {}),
        ("node-exporter", NODE_EXPORTER_BIN, info.node_exporter_port,
         f"http://127.0.0.1:{info.node_exporter_port}/metrics", [
             _bin(NODE_EXPORTER_BIN), f"--web.listen-address=127.0.0.1:{info.node_exporter_port}",
             "--collector.disable-defaults", "--collector.filesystem",
         ], {}),
    ]


def exporter_scrape_configs(info: LabInfo) -> list[dict]:
    """One scrape job per exporter; the labels name the service the data tier serves."""
    labels = {"service": "web", "environment": "lab"}
    return [
        {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": labels}]}
        for job, port in (("postgres", info.postgres_exporter_port), ("redis", info.redis_exporter_port),
                          ("node", info.node_exporter_port))
    ]


def _rule(alert: str, expr: str, for_: str, summary: str, description: str) -> dict:
    rule = {
        "alert": alert, "expr": expr, "for": for_,
        "labels": {"severity": "critical", "service": "{{ $labels.service }}"},
        "annotations": {"summary": summary, "description": description},
    }
    if alert in DEPENDENCY_ALERTS:
        # Alertmanager lifts an inhibition the moment its source resolves. The service's own
        # probe recovers a scrape or two after its dependency, so without this the symptom
        # (ServiceDown) would be sent just as the dependency comes back, and open a second
        # incident for an outage that is already over. Keeping the source firing a little
        # longer covers that lag; the dependency's own resolve arrives as much later.
        rule["keep_firing_for"] = DEPENDENCY_SETTLE
    return rule


def data_tier_rules(*, connections_threshold: float, disk_mount: str, min_free_bytes: int,
                    min_free_fraction: float) -> dict:
    """The data tier's alert group (Prometheus rule file format)."""
    fs = f'mountpoint="{disk_mount}"'
    return {
        "name": "lab-data-tier",
        "rules": [
            _rule("PostgresConnectionsExhausted",
                  f"sum by (service) (pg_stat_activity_count) / max by (service) (pg_settings_max_connections)"
                  f" > {connections_threshold}", "2s",
                  "PostgreSQL connections of {{ $labels.service }} nearly exhausted",
                  "{{ $value | humanizePercentage }} of max_connections in use (threshold "
                  f"{connections_threshold:.0%}); runbook 002 'Database Connection Exhausted'."),
            _rule("PostgresLockContention", "max by (service) (pg_blocked_sessions) > 0", "2s",
                  "Sessions of {{ $labels.service }}'s database wait on locks",
                  "{{ $value }} sessions wait for a lock another session holds; runbook 004 "
                  "'Database Performance Issues'."),
            _rule("RedisDown", "redis_up == 0", "1s",
                  "Redis of {{ $labels.service }} is down",
                  "The redis exporter cannot reach {{ $labels.instance }}'s Redis; runbook 000 "
                  "'Redis connection failures'."),
            _rule("DiskSpaceLow",
                  f"node_filesystem_avail_bytes{{{fs}}} < {min_free_bytes} or "
                  f"node_filesystem_avail_bytes{{{fs}}} / node_filesystem_size_bytes{{{fs}}} < {min_free_fraction}",
                  "2s", "Disk of {{ $labels.service }} nearly full",
                  "{{ $labels.mountpoint }} has less than "
                  f"{min_free_bytes} bytes or {min_free_fraction:.0%} free; runbook 003 'Disk Space Critically Low'."),
        ],
    }


#: A service down because a dependency is down is the dependency's incident: Alertmanager
#: inhibits ServiceDown for the same service while one of these fires, so one outage opens
#: one incident (routed to the dependency's runbook), not two runbooks fighting.
DEPENDENCY_ALERTS = ("RedisDown",)
#: How long a dependency alert keeps firing (and inhibiting) after its cause is gone.
DEPENDENCY_SETTLE = "5s"
