"""The lab: real targets on loopback, started and stopped by one command.

    from lab import Lab
    lab = Lab(get_settings().lab_dir)
    info = lab.up()        # dockerd + web container, PostgreSQL, Redis, sshd, inventory.yaml
    lab.up(alerting=True)  # also: blackbox exporter, Prometheus, Alertmanager -> webhook to
                           # lab.info.gateway_url (or Lab(lab_dir, alerting=True).up())
    lab.down()             # stops everything, the alerting stack included

CLI: ``python -m lab up [--alerting]|down|status|kill-web|break-web|reset-web``.
"""

from lab.core import Lab, LabError, LabInfo, http_get, pid_alive

__all__ = ["Lab", "LabError", "LabInfo", "http_get", "pid_alive"]
