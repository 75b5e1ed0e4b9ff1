"""The embedded stack: `aimass up / status / down` on free ports, clear start-up errors, and the embedded
Mosquitto's limits (loopback only, maximum packet size)."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from aimass.core.config import MQTT_HEADER_ALLOWANCE, Config
from aimass.core.procs import StackError, free_port, pid_alive
from aimass.core.stack import start_mosquitto, stop_server
from aimass.core import contract
from aimass.streams.mqtt import encode_varint

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


def _mqtt_string(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


def _raw_publish_session(port: int, topic: bytes, payload: bytes) -> bool:
    """CONNECT (MQTT 3.1.1, anonymous) and one QoS 0 PUBLISH over a raw socket; True if the broker
    still answers a PINGREQ afterwards (False: it dropped the connection)."""
    def packet(kind: int, body: bytes) -> bytes:
        return bytes([kind]) + encode_varint(len(body)) + body

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(packet(0x10, _mqtt_string(b"MQTT") + b"\x04\x02\x00\x1e" + _mqtt_string(b"raw-publisher")))
        assert s.recv(4)[:1] == b"\x20"  # CONNACK
        s.sendall(packet(0x30, _mqtt_string(topic) + payload) + b"\xc0\x00")  # PUBLISH, PINGREQ
        try:
            return s.recv(2) == b"\xd0\x00"  # PINGRESP
        except ConnectionResetError:
            return False


@pytest.mark.integration
def test_embedded_mosquitto_is_loopback_only_and_refuses_packets_above_the_maximum(tmp_path):
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    limit = Config().bridge.max_packet_bytes
    assert limit == Config().bridge.max_payload_bytes + MQTT_HEADER_ALLOWANCE
    port = free_port()
    server = start_mosquitto(tmp_path, port)
    got: list[int] = []
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="size-watcher")
    sub.on_message = lambda _c, _u, msg: got.append(len(msg.payload))
    try:
        conf = (Path(server.log).parent / "mosquitto.conf").read_text()
        assert f"max_packet_size {limit}\n" in conf and f"listener {port} 127.0.0.1\n" in conf
        sub.connect("127.0.0.1", port)
        sub.subscribe("size/#")
        sub.loop_start()
        topic = b"size/test"
        # Mosquitto counts a packet as 1 byte of fixed header + its remaining length (topic + payload)
        fits = limit - 1 - (2 + len(topic))
        assert _raw_publish_session(port, topic, b"a" * fits)
        assert not _raw_publish_session(port, topic, b"b" * (fits + 1))  # one byte over: disconnected
        assert _raw_publish_session(port, topic, b"c")
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [fits, 1]  # the oversized message never reached a subscriber
    finally:
        sub.loop_stop()
        sub.disconnect()
        stop_server(server)
