"""Configuration of the lab's optional alerting stack (blackbox exporter, Prometheus,
Alertmanager). Pure functions: ports and paths in, YAML-ready dicts out.

The chain::

    blackbox exporter  --probes-->  web health URL
    Prometheus  --scrapes /probe every 1s, rule ServiceDown (for: 2s)-->  Alertmanager
    Alertmanager  --webhook v4 (Bearer token)-->  <gateway_url>/alerts/alertmanager

All intervals are far shorter than in production so that a drill fires in seconds.
"""

from __future__ import annotations

from pathlib import Path

# Debian 12 package names == binary names in /usr/bin
BLACKBOX_BIN = "prometheus-blackbox-exporter"
PROMETHEUS_BIN = "prometheus"
ALERTMANAGER_BIN = "prometheus-alertmanager"
PROMTOOL_BIN = "promtool"
AMTOOL_BIN = "amtool"

ALERTING_COMPONENTS = ("blackbox", "prometheus", "alertmanager")
WEBHOOK_PATH = "/alerts/alertmanager"


def blackbox_config() -> dict:
    return {
        "modules": {
            "http_2xx": {
                "prober": "http",
                "timeout": "2s",
                "http": {
                    "valid_status_codes": [200],
                    "method": "GET",
                    "preferred_ip_protocol": "ip4",
                    "ip_protocol_fallback": False,
                },
            },
        },
    }


def prometheus_config(*, health_url: str, blackbox_port: int, alertmanager_port: int, rules_file: Path) -> dict:
    return {
        "global": {
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "evaluation_interval": "1s",
        },
        "rule_files": [str(rules_file)],
        "alerting": {
            "alertmanagers": [
                {"static_configs": [{"targets": [f"127.0.0.1:{alertmanager_port}"]}]},
            ],
        },
        "scrape_configs": [
            {
                "job_name": "blackbox",
                "metrics_path": "/probe",
                "params": {"module": ["http_2xx"]},
                "static_configs": [
                    {"targets": [health_url], "labels": {"service": "web", "environment": "lab"}},
                ],
                # the standard blackbox relabelling: the target becomes ?target=,
                # the instance label keeps the URL, the scrape goes to the exporter
                "relabel_configs": [
                    {"source_labels": ["__address__"], "target_label": "__param_target"},
                    {"source_labels": ["__param_target"], "target_label": "instance"},
                    {"target_label": "__address__", "replacement": f"127.0.0.1:{blackbox_port}"},
                ],
            },
        ],
    }


def prometheus_rules() -> dict:
    return {
        "groups": [
            {
                "name": "lab-services",
                "rules": [
                    {
                        "alert": "ServiceDown",
                        "expr": 'probe_success{job="blackbox"} == 0',
                        "for": "2s",  # short for the lab; production would use 1m or more
                        "labels": {"severity": "critical", "service": "{{ $labels.service }}"},
                        "annotations": {
                            "summary": "Service {{ $labels.service }} is down",
                            "description": (
                                "The blackbox probe of {{ $labels.instance }} (service {{ $labels.service }}, "
                                "environment {{ $labels.environment }}) has failed for more than 2s."
                            ),
                        },
                    },
                ],
            },
        ],
    }


def alertmanager_config(*, gateway_url: str, token_file: Path) -> dict:
    return {
        "route": {
            "receiver": "runbooks",
            "group_by": ["alertname", "service"],
            # Short for the lab, so that a drill notifies within seconds. Production
            # values are typically group_wait 30s, group_interval 5m, repeat_interval 4h.
            "group_wait": "1s",
            "group_interval": "2s",
            "repeat_interval": "1h",
        },
        "receivers": [
            {
                "name": "runbooks",
                "webhook_configs": [
                    {
                        "url": gateway_url.rstrip("/") + WEBHOOK_PATH,
                        "send_resolved": True,
                        "max_alerts": 0,
                        "http_config": {
                            "authorization": {"type": "Bearer", "credentials_file": str(token_file)},
                        },
                    },
                ],
            },
        ],
    }
