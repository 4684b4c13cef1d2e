"""The data tier's exporters in the lab, and the alert rules teams really run on them.

Debian's real exporters, one process each, on loopback, scraped by the lab's Prometheus
every second:

    prometheus-postgres-exporter  (role ``monitor``: pg_monitor only; password from a file)
    prometheus-redis-exporter     (redis_up; -check-keys: the length of the app's job queue)
    prometheus-node-exporter      (filesystem collector: the lab's disk; textfile collector: the
                                   web service's status file, labweb_start_failed)

and the application tier's own /metrics (jobs ``web``, ``upstream``, ``worker``: lab/labweb.c).

Rules (``data_tier_rules``), each labelled with the service they hurt so that routes.yaml
can send them to a runbook, and each with a short ``for`` so that a drill fires in seconds
(production: minutes):

    PostgresConnectionsExhausted  connections in use / max_connections above the threshold
    PostgresLockContention        sessions waiting on a lock held by another session
    RedisDown                     redis_up == 0
    DiskSpaceLow                  free bytes or free fraction of the service's disk too low

and the application tier's (``app_tier_rules``, group ``lab-app-tier``):

    AppMemoryHigh      RSS / the container's memory limit above the threshold
    AppCpuHigh         CPU use of the web process above the threshold (cores)
    UpstreamFailing    the web service's circuit breaker to its upstream is open
    HighErrorRate      share of 5xx answers of the web service above the threshold
    ServiceWontStart   the last start of the service failed (labweb_start_failed, by reason)
    LogFileTooLarge    the app log is larger than the inventory's log.max_bytes
    QueueBacklogHigh   the job queue holds more than the inventory's queue.max_backlog

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


#: The Redis list of the application's jobs (lab/app.py QUEUE_KEY): the redis exporter reports
#: its length as redis_key_size{key="jobs"}.
QUEUE_KEY = "jobs"


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
             f"-check-keys={QUEUE_KEY}",
         ], {}),
        ("node-exporter", NODE_EXPORTER_BIN, info.node_exporter_port,
         f"http://127.0.0.1:{info.node_exporter_port}/metrics", [
             _bin(NODE_EXPORTER_BIN), f"--web.listen-address=127.0.0.1:{info.node_exporter_port}",
             "--collector.disable-defaults", "--collector.filesystem",
             "--collector.textfile", f"--collector.textfile.directory={info.app_status_dir}",
         ], {}),
    ]


def exporter_scrape_configs(info: LabInfo) -> list[dict]:
    """One scrape job per exporter and per application process (web, upstream, worker: their
    own /metrics); the labels name the service they serve."""
    labels = {"service": "web", "environment": "lab"}
    return [
        {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": labels}]}
        for job, port in (("postgres", info.postgres_exporter_port), ("redis", info.redis_exporter_port),
                          ("node", info.node_exporter_port), ("web", info.web_port),
                          ("upstream", info.upstream_port), ("worker", info.worker_port))
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


def app_tier_rules(*, memory_alert_fraction: float, cpu_alert_cores: float, error_rate_threshold: float,
                   error_rate_window_s: int, log_max_bytes: int, max_backlog: int) -> dict:
    """The application tier's alert group (Prometheus rule file format)."""
    w = f"{error_rate_window_s}s"
    return {
        "name": "lab-app-tier",
        "rules": [
            _rule("AppMemoryHigh",
                  'max by (service) (process_resident_memory_bytes{job="web"} / labweb_memory_limit_bytes{job="web"})'
                  f" > {memory_alert_fraction}", "2s",
                  "Memory of {{ $labels.service }} near its limit",
                  "Resident memory is {{ $value | humanizePercentage }} of the container's limit (threshold "
                  f"{memory_alert_fraction:.0%}); scenario memory-cpu."),
            _rule("AppCpuHigh",
                  f'max by (service) (rate(process_cpu_seconds_total{{job="web"}}[{w}])) > {cpu_alert_cores}', "3s",
                  "CPU of {{ $labels.service }} high",
                  "The service's process uses {{ $value | humanize }} cores (threshold "
                  f"{cpu_alert_cores}); scenario memory-cpu."),
            _rule("UpstreamFailing", 'max by (service) (labweb_circuit_breaker_open{job="web"}) == 1', "1s",
                  "Upstream of {{ $labels.service }} failing",
                  "The circuit breaker to the service's upstream is open: its calls keep failing; scenario "
                  "upstream-outage."),
            _rule("HighErrorRate",
                  f'sum by (service) (rate(labweb_http_requests_total{{job="web",code=~"5.."}}[{w}])) / '
                  f'sum by (service) (rate(labweb_http_requests_total{{job="web"}}[{w}])) > {error_rate_threshold}',
                  "3s", "Error rate of {{ $labels.service }} high",
                  "{{ $value | humanizePercentage }} of requests answer 5xx (threshold "
                  f"{error_rate_threshold:.0%}); scenario bad-deploy: roll back."),
            # a broken release is service-down's (its fix is a rollback, not a cause to clear)
            _rule("ServiceWontStart", f"max by (service, reason) (labweb_start_failed{{{WONT_START}}}) > 0", "0s",
                  "{{ $labels.service }} does not start ({{ $labels.reason }})",
                  "The last start of the service failed: {{ $labels.reason }}; scenario "
                  "app-wont-start."),
            _rule("LogFileTooLarge", f'max by (service) (labweb_log_file_bytes{{job="web"}}) > {log_max_bytes}',
                  "1s", "Log file of {{ $labels.service }} too large",
                  "The app log holds {{ $value | humanize1024 }}B (limit "
                  f"{log_max_bytes} bytes); scenario logs-backlog: rotate it."),
            _rule("QueueBacklogHigh", f'max by (service) (redis_key_size{{key="{QUEUE_KEY}"}}) > {max_backlog}',
                  "2s", "Job queue of {{ $labels.service }} backs up",
                  "{{ $value }} jobs wait in '" + QUEUE_KEY + f"' (limit {max_backlog}); scenario logs-backlog: "
                  "restart the consumer."),
        ],
    }


#: Alertmanager inhibitions of the application tier (source alert, target alert; equal: service):
#: errors caused by a failing upstream are the upstream's incident, and a service that does not
#: start is one incident (why it won't start), not also a "down" one.
APP_INHIBITIONS = (("UpstreamFailing", "HighErrorRate"), ("ServiceWontStart", "ServiceDown"))

#: The start failures app-wont-start handles (label matcher on labweb_start_failed): a broken
#: release also fails at start, but its fix is a rollback, which service-down does.
WONT_START = 'reason!="broken_release"'

#: A service down because a dependency is down is the dependency's incident: Alertmanager
#: inhibits ServiceDown for the same service while one of these fires, so one outage opens
#: one incident (routed to the dependency's runbook), not two runbooks fighting.
DEPENDENCY_ALERTS = ("RedisDown",)
#: How long a dependency alert keeps firing (and inhibiting) after its cause is gone.
DEPENDENCY_SETTLE = "5s"
