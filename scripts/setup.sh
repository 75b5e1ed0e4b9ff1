#!/usr/bin/env bash
# Installs what AI Mass needs on a fresh Debian/Ubuntu machine: system packages (mosquitto,
# Debian's clickhouse-server for the native-protocol tests, podman for the container run) and a Python venv in .venv.
# Sourced by scripts/demo and scripts/test; safe to run again (skips what is there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
[ -x /usr/sbin/clickhouse-server ] || [ -x /usr/bin/clickhouse-server ] || need+=(clickhouse-server)
# The shipped compose deployment runs in containers in tests/test_compose_run.py (deploy/local/).
for tool in podman podman-compose debootstrap runc; do command -v $tool >/dev/null 2>&1 || need+=($tool); done
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing system packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# promtool / amtool check the shipped Prometheus rules and Alertmanager config
# (tests/test_prometheus_rules.py), and tests/test_pipeline_alerts.py runs the real Alertmanager:
# unpacked from Debian's packages into .cache/tools, not installed (the packages would start daemons).
if [ ! -x .cache/tools/bin/promtool ] || [ ! -x .cache/tools/bin/amtool ] || [ ! -x .cache/tools/bin/alertmanager ]; then
  echo "==> unpacking promtool, amtool and alertmanager into .cache/tools"
  mkdir -p .cache/tools/debs .cache/tools/bin
  (cd .cache/tools/debs && { apt-get download prometheus prometheus-alertmanager >/dev/null 2>&1 \
    || { $SUDO apt-get update -qq && apt-get download prometheus prometheus-alertmanager >/dev/null; }; })
  for deb in .cache/tools/debs/*.deb; do dpkg-deb -x "$deb" .cache/tools/root; done
  ln -sf ../root/usr/bin/promtool .cache/tools/bin/promtool
  ln -sf ../root/usr/bin/amtool .cache/tools/bin/amtool
  ln -sf ../../../scripts/alertmanager .cache/tools/bin/alertmanager  # runs ../root/usr/bin/prometheus-alertmanager
  rm -rf .cache/tools/debs
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($PY --version)"
  $PY -m venv .venv || { $SUDO apt-get install -y -qq python3-venv >/dev/null && $PY -m venv .venv; }
fi
stamp=.venv/.aimass-installed
want=$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat $stamp 2>/dev/null)" != "$want" ]; then
  echo "==> installing Python packages into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > $stamp
fi
