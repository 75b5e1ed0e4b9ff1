"""The embedded stack: `aimass up / status / down` on free ports, and clear start-up errors."""
import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from aimass.core.procs import StackError, free_port, pid_alive
from aimass.core.stack import start_mosquitto
from aimass.core import contract

REPO = Path(__file__).resolve().parent.parent


def _aimass(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "aimass.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.integration
def test_up_status_down_start_and_stop_exactly_the_stack(tmp_path):
    ports = {k: free_port() for k in ("mqtt", "kafka", "http", "grpc", "metrics")}
    env = dict(os.environ, AIMASS_RUN_DIR=str(tmp_path), AIMASS_MQTT_PORT=str(ports["mqtt"]),
               AIMASS_KAFKA_BOOTSTRAP=f"127.0.0.1:{ports['kafka']}", AIMASS_KAFKA_PARTITIONS="3",
               AIMASS_TRITON_HTTP_PORT=str(ports["http"]), AIMASS_TRITON_GRPC_PORT=str(ports["grpc"]),
               AIMASS_TRITON_METRICS_PORT=str(ports["metrics"]))
    up = _aimass(env, "up")
    try:
        assert up.returncode == 0, up.stderr
        stack = json.loads((tmp_path / "stack.json").read_text())
        pids = {s["name"]: s["pid"] for s in stack["servers"]}
        assert set(pids) == {"mosquitto", "kafka", "triton"}
        assert all(pid_alive(p) for p in pids.values())
        topics = AdminClient({"bootstrap.servers": f"127.0.0.1:{ports['kafka']}"}).list_topics(timeout=5).topics
        assert len(topics[contract.RAW.name()].partitions) == 3
        assert len(topics[contract.ALERT_EVENTS.name()].partitions) == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/v2/health/ready", timeout=5) as r:
            assert r.status == 200
        status = _aimass(env, "status")
        assert status.returncode == 0 and status.stdout.count("running") == 3
        again = _aimass(env, "up")  # idempotent: nothing new is started
        assert again.returncode == 0
        assert {s["pid"] for s in json.loads((tmp_path / "stack.json").read_text())["servers"]} == set(pids.values())
    finally:
        down = _aimass(env, "down")
    assert down.returncode == 0
    assert not any(pid_alive(p) for p in pids.values())
    assert "nothing started" in _aimass(env, "status").stdout


def test_port_in_use_is_detected_not_shared(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(StackError, match=f"port {s.getsockname()[1]} for mosquitto is already in use"):
            start_mosquitto(tmp_path, s.getsockname()[1])


def test_missing_binary_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(os.path, "exists", lambda p: False)
    with pytest.raises(StackError, match="apt-get install -y mosquitto"):
        start_mosquitto(tmp_path, free_port())


def test_bad_config_fails_at_start_naming_the_key(tmp_path):
    env = dict(os.environ, AIMASS_RUN_DIR=str(tmp_path), AIMASS_KAFKA_PARTITIONS="many")
    r = _aimass(env, "status")
    assert r.returncode == 2 and "kafka.partitions" in r.stderr


def test_help_lists_every_command():
    r = _aimass(dict(os.environ), "--help")
    from aimass.cli import COMMANDS
    assert r.returncode == 0
    assert all(name in r.stdout for name in COMMANDS)


def test_down_also_stops_supervised_stages(tmp_path):
    from aimass.core.config import Config
    from aimass.core.stack import down
    from aimass.core.supervisor import Supervisor

    cfg = Config()
    cfg.run.dir = str(tmp_path)
    sup = Supervisor(tmp_path)
    pid = sup.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    lines = []
    down(cfg, say=lines.append)
    assert not pid_alive(pid)
    assert any("sleeper" in line for line in lines)
    assert not (tmp_path / "stages.json").exists()
