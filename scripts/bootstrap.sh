#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian 12 machine (root): the Debian
# packages behind the lab, and the Python environment in .venv. Safe to run twice:
# it installs only what is missing and reinstalls Python deps only when requirements.lock or
# pyproject.toml changes. Python deps come from requirements.lock only (every version pinned,
# every file checked against its hash); regenerate it with `make lock` after changing pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
have dockerd      || need+=(docker.io)
have busybox      || need+=(busybox-static)
have sshd         || need+=(openssh-server)
have ssh-keygen   || need+=(openssh-client)
have redis-server || need+=(redis-server)
have gcc          || need+=(gcc libc6-dev)
have runuser      || need+=(util-linux)
have prometheus   || need+=(prometheus)
have prometheus-alertmanager      || need+=(prometheus-alertmanager)
have prometheus-blackbox-exporter || need+=(prometheus-blackbox-exporter)
have prometheus-postgres-exporter || need+=(prometheus-postgres-exporter)
have prometheus-redis-exporter    || need+=(prometheus-redis-exporter)
have prometheus-node-exporter     || need+=(prometheus-node-exporter)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ "${#need[@]}" -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.installed-$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing Python dependencies into .venv (requirements.lock, hashes required)"
  rm -f .venv/.installed-*  # a failed or half-done install must not leave an older stamp standing
  mkdir -p .state
  if ! { .venv/bin/pip install -q --require-hashes -r requirements.lock \
         && .venv/bin/pip install -q --no-deps -e .; } >.state/pip-install.log 2>&1; then
    grep -v "is ignored: it is neither" .state/pip-install.log | tail -30
    echo "bootstrap: pip install failed (full log: .state/pip-install.log)" >&2
    exit 1
  fi
  # The lock must still satisfy every requirement of pyproject.toml (base and test extras):
  # a dependency added there but not locked would otherwise go missing on a fresh machine.
  if ! .venv/bin/python - <<'PY'
import re, sys, tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
locked = {canonicalize_name(m[1]): m[2] for m in
          re.finditer(r"^([A-Za-z0-9._-]+)==(\S+)", open("requirements.lock").read(), re.M)}
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
problems = []
for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
    req = Requirement(spec)
    pin = locked.get(canonicalize_name(req.name))
    if pin is None or not req.specifier.contains(pin, prereleases=True):
        problems.append(f"pyproject.toml wants {spec}, requirements.lock has {pin or 'nothing'}")
for problem in problems:
    print(f"bootstrap: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY
  then
    echo "bootstrap: requirements.lock is out of date with pyproject.toml: run \`make lock\`" >&2
    exit 1
  fi
  touch "$stamp"
fi
