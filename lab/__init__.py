"""The lab: real targets on loopback, started and stopped by one command.

    from lab import Lab
    lab = Lab(get_settings().lab_dir)
    info = lab.up()        # dockerd + web, upstream and worker containers, PostgreSQL, Redis, sshd,
                           # client traffic, inventory.yaml
    lab.up(alerting=True)  # also: blackbox, postgres, redis and node exporters, Prometheus,
                           # Alertmanager -> webhook to lab.info.gateway_url
    lab.inject("web-killed")   # a registered fault (lab/faults.py); lab.reset_all_faults()
    lab.down()             # stops everything, the alerting stack included

Layout: ``core`` (the Lab façade), ``proc`` (pidfiles, start/stop by PID, wait_until),
``context`` (paths, LabInfo), one module per system (``docker``, ``web``, ``app`` (the upstream,
the queue consumer, the traffic), ``postgres``, ``redis``, ``sshd``, ``disk``, ``alerting`` +
``exporters``), ``inventory``, ``faults`` (the fault registry), the programs the lab runs as its
own processes: ``traffic`` (client requests), ``pg_holders`` (the long-lived clients of the
database faults) and ``port_holder`` (a program holding the web port).

CLI: ``python -m lab up [--alerting]|down|status|faults|inject NAME|reset [NAME]``
(and the aliases ``kill-web``, ``break-web``, ``reset-web``).
"""

from lab.core import Lab, LabError, LabInfo, http_get, pid_alive

__all__ = ["Lab", "LabError", "LabInfo", "http_get", "pid_alive"]
