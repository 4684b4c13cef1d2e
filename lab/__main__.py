"""``python -m lab up [--alerting]|down|status|kill-web|break-web|reset-web``."""

from __future__ import annotations

import sys
import time

from incident.settings import get_settings
from lab.core import Lab, LabError

USAGE = "usage: python -m lab up [--alerting]|down|status|kill-web|break-web|reset-web"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    alerting = len(argv) == 2 and argv[0] == "up" and argv[1] == "--alerting"
    if (len(argv) != 1 and not alerting) or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd = argv[0]
    lab = Lab(get_settings().lab_dir)
    try:
        if cmd == "up":
            t0 = time.monotonic()
            info = lab.up(alerting=alerting)
            print(f"lab up in {time.monotonic() - t0:.1f}s ({lab.lab_dir})")
            print(f"  health URL     {info.health_url}")
            print(f"  docker socket  {info.docker_base_url}   (docker -H {info.docker_base_url} ps)")
            print(f"  container      {info.container_name} ({info.web_image})")
            print(f"  postgres       127.0.0.1:{info.pg_port} db=app user=app password file {info.pg_password_file}")
            print(f"  redis          127.0.0.1:{info.redis_port}")
            print(f"  ssh            ssh -i {info.ssh_key} -o UserKnownHostsFile={info.known_hosts} "
                  f"-p {info.ssh_port} root@127.0.0.1")
            print(f"  inventory      {lab.inventory_path}")
            if alerting:
                print(f"  prometheus     {info.prometheus_url}   (alert ServiceDown on {info.health_url})")
                print(f"  alertmanager   {info.alertmanager_url}")
                print(f"  blackbox       {info.blackbox_url}")
                print(f"  webhook to     {info.gateway_url}/alerts/alertmanager   "
                      f"(Bearer token in {info.alertmanager_token_file})")
            print(f"  logs           {info.logs_dir}/")
        elif cmd == "down":
            lab.down()
            print("lab down")
        elif cmd == "status":
            st = lab.status()
            for name, state in st.items():
                print(f"  {name:<9} {state}")
            return 0 if all(v == "up" for v in st.values()) else 1
        elif cmd == "kill-web":
            lab.kill_web()
            print(f"killed container {lab.info.container_name}")
        elif cmd == "break-web":
            lab.deploy_broken_web()
            print(f"deployed {lab.info.broken_image} as {lab.info.container_name} (it exits at start)")
        elif cmd == "reset-web":
            lab.reset_web()
            print(f"{lab.info.container_name} runs {lab.info.web_image}; {lab.info.health_url} is 200")
        else:
            print(USAGE, file=sys.stderr)
            return 2
    except LabError as exc:
        print(f"lab {cmd} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
