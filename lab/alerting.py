"""Configuration of the lab's optional alerting stack (blackbox exporter, the data tier's
exporters, Prometheus, Alertmanager). Pure functions: ports and paths in, YAML-ready dicts out.

The chain::

    blackbox exporter  --probes-->  web health URL
    postgres / redis / node exporters (lab/exporters.py)  --read-->  PostgreSQL, Redis, the disk
    Prometheus  --scrapes every 1s, rules ServiceDown (for: 2s) and the data tier's-->  Alertmanager
    Alertmanager  --webhook v4 (Bearer token)-->  <gateway_url>/alerts/alertmanager

All intervals are far shorter than in production so that a drill fires in seconds.

The pure config functions come first; :class:`Alerting` (at the end) writes them and
starts/stops the three processes under ``lab_dir/alerting``, each by its PID.
"""

from __future__ import annotations

import json
from functools import partial
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from lab import exporters as _ex
from lab.context import LabContext, LabInfo, new_secret
from lab.proc import LabError, cmdline, expect_cmdline, http_get, port_in_use

# Debian 12 package names == binary names in /usr/bin
BLACKBOX_BIN = "prometheus-blackbox-exporter"
PROMETHEUS_BIN = "prometheus"
ALERTMANAGER_BIN = "prometheus-alertmanager"
PROMTOOL_BIN = "promtool"
AMTOOL_BIN = "amtool"

ALERTING_COMPONENTS = ("blackbox", "prometheus", "alertmanager", *_ex.EXPORTERS)
WEBHOOK_PATH = "/alerts/alertmanager"

expect_cmdline("blackbox", BLACKBOX_BIN)
expect_cmdline("prometheus", PROMETHEUS_BIN)
expect_cmdline("alertmanager", ALERTMANAGER_BIN)


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


def prometheus_config(*, health_url: str, blackbox_port: int, alertmanager_port: int, rules_file: Path,
                      extra_scrape_configs: list[dict] | None = None) -> dict:
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
            *(extra_scrape_configs or []),
        ],
    }


def prometheus_rules(extra_groups: list[dict] | None = None) -> dict:
    return {
        "groups": [
            {
                "name": "lab-services",
                "rules": [
                    {
                        "alert": "ServiceDown",
                        # a service that fails to start is ServiceWontStart's incident (the
                        # status file its start writes, through the node exporter)
                        "expr": ('probe_success{job="blackbox"} == 0 unless on (service) '
                                 f"(labweb_start_failed{{{_ex.WONT_START}}} > 0)"),
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
            *(extra_groups or []),
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
        # one outage, one incident: a service down because its dependency is down is the
        # dependency's incident (lab/exporters.py DEPENDENCY_ALERTS)
        "inhibit_rules": [
            {
                "source_matchers": [f'alertname=~"{"|".join(_ex.DEPENDENCY_ALERTS)}"'],
                "target_matchers": ['alertname="ServiceDown"'],
                "equal": ["service"],
            },
            *({"source_matchers": [f'alertname="{source}"'], "target_matchers": [f'alertname="{target}"'],
               "equal": ["service"]} for source, target in _ex.APP_INHIBITIONS),
        ],
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


# --------------------------------------------------------------------------- the processes


def _answers_200(url: str) -> bool:
    return http_get(url, timeout=2)[0] == 200


class Alerting:
    """The blackbox exporter, Prometheus and Alertmanager of one lab (optional)."""

    def __init__(self, ctx: LabContext) -> None:
        self.ctx = ctx
        self.dir = ctx.alerting_dir

    def pids(self) -> dict[str, int]:
        """PIDs of the alerting processes according to their pidfiles (alive or not)."""
        return {n: pid for n in ALERTING_COMPONENTS if (pid := self.ctx.read_pid(n))}

    def any_pidfile(self) -> bool:
        return any(self.ctx.pidfile(n).exists() for n in ALERTING_COMPONENTS)

    def config(self, name: str) -> Path:
        return self.dir / f"{name}.yml"

    def alive(self, name: str) -> int | None:
        """The PID if it runs our binary with this lab's config file, or for an exporter on
        this lab's port (no name-only matches)."""
        pid = self.ctx.procs.alive(name)
        if not pid:
            return None
        mark = (f"127.0.0.1:{self._port(name)}" if name in _ex.EXPORTERS
                else f"--config.file={self.config(name)}")
        return pid if mark in cmdline(pid) else None

    def _port(self, name: str) -> int | None:
        return getattr(self.ctx.info, name.replace("-", "_") + "_port")

    def _token(self) -> str:
        f = self.ctx.info.alertmanager_token_file
        token = f.read_text().strip() if f.exists() else ""
        if not token:
            token = new_secret(32)
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(token)  # no newline: it is sent verbatim as the Bearer credentials
        os.chmod(f, 0o600)
        return token

    @staticmethod
    def _write_yaml(path: Path, data: dict, what: str) -> bool:
        """Write ``data`` as YAML; True if the file changed."""
        import yaml

        text = f"# {what} (written by lab/alerting.py; rewritten at every up)\n"
        text += yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=1000)
        if path.exists() and path.read_text() == text:
            return False
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return True

    def _check_config(self, name: str, argv: list[str]) -> None:
        if shutil.which(argv[0]) is None:
            return  # the checker ships with the package; without it the daemon itself validates
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=str(self.ctx.lab_dir))
        if r.returncode != 0:
            out = (r.stdout + r.stderr).strip()
            raise LabError(f"{name}: `{' '.join(argv)}` failed:\n{out}\nlog: {self.ctx.log(name)}")

    def _write_configs(self) -> dict[str, bool]:
        from lab import app
        from lab.disk import MIN_FREE_BYTES, MIN_FREE_FRACTION, mount_path
        from lab.postgres import LAB_CONNECTIONS_THRESHOLD

        i = self.ctx.info
        rules = self.dir / "rules.yml"
        data_tier = _ex.data_tier_rules(
            connections_threshold=LAB_CONNECTIONS_THRESHOLD, disk_mount=str(mount_path(i.lab_dir)),
            min_free_bytes=MIN_FREE_BYTES, min_free_fraction=MIN_FREE_FRACTION)
        changed = {
            "postgres-exporter": self._write_yaml(self.dir / "postgres-queries.yml", _ex.POSTGRES_QUERIES,
                                                  "postgres exporter: custom queries"),
            "blackbox": self._write_yaml(self.config("blackbox"), blackbox_config(), "blackbox exporter modules"),
            "alertmanager": self._write_yaml(
                self.config("alertmanager"),
                alertmanager_config(gateway_url=i.gateway_url, token_file=i.alertmanager_token_file),
                "Alertmanager: route every alert to the runbooks gateway webhook"),
        }
        app_tier = _ex.app_tier_rules(
            memory_alert_fraction=app.MEMORY_ALERT_FRACTION, cpu_alert_cores=app.CPU_ALERT_CORES,
            error_rate_threshold=app.ERROR_RATE_THRESHOLD, error_rate_window_s=app.ERROR_RATE_WINDOW_S,
            log_max_bytes=app.LOG_MAX_BYTES, max_backlog=app.MAX_BACKLOG)
        rules_changed = self._write_yaml(rules, prometheus_rules([data_tier, app_tier]), "Prometheus alerting rules")
        changed["prometheus"] = self._write_yaml(
            self.config("prometheus"),
            prometheus_config(health_url=i.health_url, blackbox_port=i.blackbox_port,
                              alertmanager_port=i.alertmanager_port, rules_file=rules,
                              extra_scrape_configs=_ex.exporter_scrape_configs(i)),
            "Prometheus: probe the web service through blackbox, scrape the exporters, "
            "alert to Alertmanager") or rules_changed
        self._check_config("prometheus", [PROMTOOL_BIN, "check", "config", str(self.config("prometheus"))])
        self._check_config("alertmanager", [AMTOOL_BIN, "check-config", str(self.config("alertmanager"))])
        return changed

    def _specs(self) -> list[tuple[str, str, int, str, list[str], dict[str, str]]]:
        """(name, package, port, readiness URL, argv, extra environment) per alerting component;
        the exporters first, Prometheus last (it scrapes the others)."""
        i = self.ctx.info
        d = self.dir
        assert i.blackbox_port and i.alertmanager_port and i.prometheus_port
        return [*_ex.exporter_specs(i, d / "postgres-queries.yml"), *[(*spec, {}) for spec in [
            ("blackbox", BLACKBOX_BIN, i.blackbox_port, f"{i.blackbox_url}/metrics", [
                shutil.which(BLACKBOX_BIN) or f"/usr/bin/{BLACKBOX_BIN}",
                f"--config.file={self.config('blackbox')}",
                f"--web.listen-address=127.0.0.1:{i.blackbox_port}",
            ]),
            ("alertmanager", ALERTMANAGER_BIN, i.alertmanager_port, f"{i.alertmanager_url}/-/ready", [
                shutil.which(ALERTMANAGER_BIN) or f"/usr/bin/{ALERTMANAGER_BIN}",
                f"--config.file={self.config('alertmanager')}",
                f"--storage.path={d / 'alertmanager-data'}",
                f"--web.listen-address=127.0.0.1:{i.alertmanager_port}",
                f"--web.external-url={i.alertmanager_url}",
                "--cluster.listen-address=",  # empty: no clustering/gossip, nothing beyond loopback
            ]),
            ("prometheus", PROMETHEUS_BIN, i.prometheus_port, f"{i.prometheus_url}/-/ready", [
                shutil.which(PROMETHEUS_BIN) or f"/usr/bin/{PROMETHEUS_BIN}",
                f"--config.file={self.config('prometheus')}",
                f"--storage.tsdb.path={d / 'prometheus-data'}",
                "--storage.tsdb.retention.time=2d",
                # 1 s scrapes: a series no longer scraped is gone from queries after 10 s, not the
                # default 5 min - across a restart of the stack (no staleness marker is written
                # then) an old start failure would otherwise keep ServiceWontStart firing
                "--query.lookback-delta=10s",
                f"--web.listen-address=127.0.0.1:{i.prometheus_port}",
                f"--web.external-url={i.prometheus_url}",
                "--web.enable-lifecycle",  # POST /-/reload when the lab rewrites the config
            ]),
        ]]]

    def up(self) -> LabInfo:
        """Start (or keep) the exporters, Prometheus and Alertmanager; rewrite configs and reload
        (exporters: restart) what changed."""
        ctx = self.ctx
        info = ctx.info
        for name, pkg, *_ in self._specs():
            if shutil.which(pkg) is None and not Path(f"/usr/bin/{pkg}").exists():
                raise LabError(f"{name}: {pkg} not installed (apt-get install {pkg}); log: {ctx.log(name)}")
        self.dir.mkdir(exist_ok=True)
        for sub in ("alertmanager-data", "prometheus-data"):
            (self.dir / sub).mkdir(exist_ok=True)
        self._token()
        ctx.save_info()
        changed = self._write_configs()
        procs: dict[str, subprocess.Popen | None] = {}
        for name, _pkg, port, _url, argv, env in self._specs():
            pid = self.alive(name)
            if pid and changed.get(name) and name in _ex.EXPORTERS:
                self.ctx.procs.stop_pid(name, pid)  # exporters read their config at start only
            elif pid:
                procs[name] = None
                if changed.get(name):
                    self._reload(name)
                continue
            if port_in_use(port):
                raise LabError(f"{name}: port {port} on 127.0.0.1 is taken by another program; log: {ctx.log(name)}")
            ctx.pidfile(name).unlink(missing_ok=True)
            procs[name] = ctx.procs.start(name, argv, env=env)  # pidfile now: down() stops it even if up fails
        deadline = time.monotonic() + 30
        for name, _pkg, _port, url, _argv, _env in self._specs():
            ctx.procs.wait_started(name, procs[name], partial(_answers_200, url),
                                   max(1.0, deadline - time.monotonic()), f"{url} did not answer 200")
        # Prometheus applies discovered targets only every ~5s after start: wait for the
        # first scrape of every job so alerts work from the moment up() returns.
        ctx.procs.wait_started("prometheus", None, self._probe_scraped, 30,
                               f"not every scrape job is up, e.g. the blackbox probe of {info.health_url} "
                               f"(see {info.prometheus_url}/targets)")
        return info

    def _probe_scraped(self) -> bool:
        code, body = http_get(f"{self.ctx.info.prometheus_url}/api/v1/targets?state=active", timeout=2)
        if code != 200:
            return False
        targets = json.loads(body)["data"]["activeTargets"]
        up = {t["labels"].get("job") for t in targets if t.get("health") == "up"}
        return {"blackbox", "postgres", "redis", "node"} <= up

    def _reload(self, name: str) -> None:
        i = self.ctx.info
        base = {"blackbox": i.blackbox_url, "prometheus": i.prometheus_url, "alertmanager": i.alertmanager_url}[name]
        req = urllib.request.Request(f"{base}/-/reload", method="POST", data=b"")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                if r.status == 200:
                    return
                what = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            what = f"HTTP {e.code}: {e.read().decode(errors='replace').strip()}"
        except (urllib.error.URLError, OSError) as e:
            what = str(getattr(e, "reason", e))
        raise self.ctx.fail(name, f"config reload (POST {base}/-/reload) failed: {what}")

    def stop(self) -> None:
        for name in ("prometheus", "alertmanager", "blackbox", *_ex.EXPORTERS):
            pid = self.ctx.read_pid(name)
            if pid and self.alive(name):
                self.ctx.procs.stop_pid(name, pid, signal.SIGTERM, timeout=15.0)
            self.ctx.pidfile(name).unlink(missing_ok=True)

    def status(self) -> dict[str, str]:
        i = self.ctx.info
        out: dict[str, str] = {}
        for name, url in (("blackbox", f"{i.blackbox_url}/metrics"), ("prometheus", f"{i.prometheus_url}/-/ready"),
                          ("alertmanager", f"{i.alertmanager_url}/-/ready"),
                          *((n, f"http://127.0.0.1:{self._port(n)}/metrics") for n in _ex.EXPORTERS)):
            if not self.alive(name):
                out[name] = "down"
                continue
            code, body = http_get(url, timeout=3)
            out[name] = "up" if code == 200 else f"not answering ({code or body})"
        return out
