#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian 12 machine (root): the Debian
# packages behind the lab, and the Python environment in .venv. Safe to run twice:
# it installs only what is missing and reinstalls Python deps only when pyproject.toml changes.
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
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing Python dependencies into .venv"
  mkdir -p .state
  if ! .venv/bin/pip install -q -e '.[test]' >.state/pip-install.log 2>&1; then
    grep -v "is ignored: it is neither" .state/pip-install.log | tail -30
    echo "bootstrap: pip install failed (full log: .state/pip-install.log)" >&2
    exit 1
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi
