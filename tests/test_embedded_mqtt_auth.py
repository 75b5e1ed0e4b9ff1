"""The embedded Mosquitto with passwords, the per-device ACL and TLS (`mqtt.embedded_auth`,
`mqtt.embedded_tls_*_file`), started by `aimass up` and the stack functions on free ports; with
neither set it stays the anonymous loopback broker."""
import copy
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aimass.core.config import Config
from aimass.core.procs import StackError, free_port
from aimass.core.stack import embedded_acl, start_embedded_mosquitto, stop_server
from aimass.streams.mqtt import connect, make_client

REPO = Path(__file__).resolve().parent.parent
PIPELINE_USER, PIPELINE_PASSWORD = "aimass-bridge", "pipe-secret-1"
DEVICES = {"acme/dev-1": "dev-secret-1", "acme/dev-2": "dev:secret-2"}  # a ":" inside a password is kept


def auth_config(run_dir: Path, monkeypatch) -> Config:
    """Embedded auth on a free port; the pipeline user and two devices from the environment."""
    cfg = Config()
    cfg.run.dir = str(run_dir)
    cfg.mqtt.port = free_port()
    cfg.mqtt.embedded_auth = True
    cfg.mqtt.username, cfg.mqtt.password_env = PIPELINE_USER, "TEST_MQTT_PIPELINE_PASSWORD"
    cfg.mqtt.embedded_users_env = "TEST_MQTT_USERS"
    monkeypatch.setenv("TEST_MQTT_PIPELINE_PASSWORD", PIPELINE_PASSWORD)
    monkeypatch.setenv("TEST_MQTT_USERS", " ".join(f"{u}:{p}" for u, p in DEVICES.items()))
    return cfg


def as_user(cfg: Config, user: str, password: str, monkeypatch) -> Config:
    c = copy.deepcopy(cfg)
    c.mqtt.username, c.mqtt.password_env = user, f"TEST_MQTT_PW_{abs(hash(user))}"
    monkeypatch.setenv(c.mqtt.password_env, password)
    return c


class Watcher:
    """A client (the pipeline user) subscribed to every device's telemetry; collects (topic, payload)."""

    def __init__(self, cfg: Config):
        self.got: list[tuple[str, bytes]] = []
        self.client = make_client(cfg, "watcher")
        self.client.on_message = lambda _c, _u, msg: self.got.append((msg.topic, msg.payload))
        connect(self.client, cfg)
        self.client.subscribe("aimass/+/+/telemetry", qos=1)
        self.pump(0.5)

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.client.loop(timeout=0.05)


def publish_as(cfg: Config, client_id: str, messages: list[tuple[str, bytes]]) -> list[str]:
    """Publish QoS 1 messages; the broker's PUBACK reasons (Mosquitto 2.0 then drops a client whose
    publish the ACL refused)."""
    client = make_client(cfg, client_id)
    acked: list[str] = []
    client.on_publish = lambda _c, _u, _mid, rc, _p: acked.append(str(rc))
    connect(client, cfg)
    for topic, payload in messages:
        client.publish(topic, payload, qos=1)
    deadline = time.monotonic() + 5
    while len(acked) < len(messages) and time.monotonic() < deadline:
        client.loop(timeout=0.05)
    client.disconnect()
    return acked


@pytest.mark.integration
def test_aimass_up_with_embedded_auth_refuses_anonymous_and_enforces_the_per_device_acl(tmp_path, monkeypatch):
    cfg = auth_config(tmp_path, monkeypatch)
    kafka_port = free_port()
    env = dict(os.environ, AIMASS_RUN_DIR=str(tmp_path), AIMASS_MQTT_PORT=str(cfg.mqtt.port),
               AIMASS_KAFKA_BOOTSTRAP=f"127.0.0.1:{kafka_port}", AIMASS_KAFKA_PARTITIONS="1",
               AIMASS_MQTT_EMBEDDED_AUTH="true", AIMASS_MQTT_USERNAME=PIPELINE_USER,
               AIMASS_MQTT_PASSWORD_ENV="TEST_MQTT_PIPELINE_PASSWORD", AIMASS_MQTT_EMBEDDED_USERS_ENV="TEST_MQTT_USERS")
    up = subprocess.run([sys.executable, "-m", "aimass.cli", "up", "--no-triton"], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stderr
        assert "passwords and per-device ACL" in up.stdout
        assert PIPELINE_PASSWORD not in up.stdout + up.stderr
        broker_dir = (tmp_path / f"mosquitto-{cfg.mqtt.port}")
        broker_dir = (broker_dir / "data").resolve() if (broker_dir / "data").is_symlink() else broker_dir
        conf = (broker_dir / "mosquitto.conf").read_text()
        assert "allow_anonymous false\n" in conf and "password_file " in conf and "acl_file " in conf
        passwd = broker_dir / "passwd"
        assert stat.S_IMODE(passwd.stat().st_mode) == 0o600
        text = passwd.read_text()
        assert {line.split(":", 1)[0] for line in text.splitlines()} == {PIPELINE_USER, *DEVICES}
        assert not any(p in text for p in (PIPELINE_PASSWORD, *DEVICES.values()))

        anonymous = copy.deepcopy(cfg)
        anonymous.mqtt.username = ""
        with pytest.raises(StackError, match="refused"):
            connect(make_client(anonymous, "anon"), anonymous)
        with pytest.raises(StackError, match="refused"):
            wrong = as_user(cfg, PIPELINE_USER, "not-the-password", monkeypatch)
            connect(make_client(wrong, "wrong"), wrong)

        watcher = Watcher(cfg)  # the bridge's credentials (make_client / connect, as the bridge does)
        dev1 = as_user(cfg, "acme/dev-1", DEVICES["acme/dev-1"], monkeypatch)
        assert publish_as(dev1, "dev-1", [("aimass/acme/dev-1/telemetry", b"own-1")]) == ["Success"]
        forged = publish_as(dev1, "dev-1", [("aimass/acme/dev-2/telemetry", b"forged")])  # another device's topic
        assert forged == ["Not authorized"]
        assert publish_as(dev1, "dev-1", [("aimass/acme/dev-1/telemetry", b"own-2")]) == ["Success"]
        # the pipeline user (the simulator and replay share its configuration) publishes for any device
        assert publish_as(cfg, "simulator", [("aimass/acme/dev-9/telemetry", b"sim")]) == ["Success"]
        watcher.pump(1.0)
        assert sorted(watcher.got) == [("aimass/acme/dev-1/telemetry", b"own-1"),
                                       ("aimass/acme/dev-1/telemetry", b"own-2"),
                                       ("aimass/acme/dev-9/telemetry", b"sim")]

        snoop = make_client(dev1, "snoop")  # a device may not read other devices' telemetry
        snooped: list = []
        snoop.on_message = lambda _c, _u, msg: snooped.append(msg.topic)
        connect(snoop, dev1)
        snoop.subscribe("aimass/+/+/telemetry", qos=1)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            snoop.loop(timeout=0.05)
        publish_as(cfg, "simulator-2", [("aimass/acme/dev-2/telemetry", b"private")])
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            snoop.loop(timeout=0.05)
        assert snooped == []
    finally:
        down = subprocess.run([sys.executable, "-m", "aimass.cli", "down"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr


def test_embedded_auth_without_the_pipeline_password_says_what_to_set(tmp_path, monkeypatch):
    cfg = auth_config(tmp_path, monkeypatch)
    monkeypatch.delenv("TEST_MQTT_PIPELINE_PASSWORD")
    with pytest.raises(StackError, match=r"set mqtt.username .* \$TEST_MQTT_PIPELINE_PASSWORD"):
        start_embedded_mosquitto(cfg)
    monkeypatch.setenv("TEST_MQTT_PIPELINE_PASSWORD", PIPELINE_PASSWORD)
    monkeypatch.setenv("TEST_MQTT_USERS", "acme/dev-1:ok acme/dev-2")
    with pytest.raises(StackError, match="entry 2 is not user:password") as err:
        start_embedded_mosquitto(cfg)
    assert "ok" not in str(err.value).split("(")[0]  # the message never echoes an entry


def test_embedded_acl_grants_devices_what_the_shipped_acl_grants():
    shipped = (REPO / "deploy/mosquitto/acl").read_text().splitlines()
    generated = embedded_acl(Config().mqtt).splitlines()
    assert [line for line in generated if line.startswith("pattern ")] == \
        [line for line in shipped if line.startswith("pattern ")]
    assert "topic read aimass/+/+/telemetry" in shipped and "topic readwrite aimass/+/+/telemetry" in generated


@pytest.mark.integration
def test_embedded_tls_listener_with_a_self_signed_certificate(tmp_path, monkeypatch):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    key.chmod(0o600)
    cfg = auth_config(tmp_path / "run", monkeypatch)
    cfg.mqtt.embedded_tls_cert_file, cfg.mqtt.embedded_tls_key_file = str(cert), str(key)
    with pytest.raises(StackError, match="set mqtt.tls=true"):
        start_embedded_mosquitto(cfg)
    cfg.mqtt.tls, cfg.mqtt.tls_ca_file = True, str(cert)
    server = start_embedded_mosquitto(cfg)
    try:
        client = make_client(cfg, "tls-bridge")  # the bridge's TLS options and credentials
        connect(client, cfg)
        assert client.socket().version() in ("TLSv1.2", "TLSv1.3")
        client.disconnect()
        ctx = ssl.create_default_context(cafile=str(cert))
        with socket.create_connection(("127.0.0.1", cfg.mqtt.port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.getpeercert()["subject"] == ((("commonName", "localhost"),),)
        plain = copy.deepcopy(cfg)
        plain.mqtt.tls = False  # the listener speaks TLS only
        with pytest.raises(StackError):
            connect(make_client(plain, "plain"), plain, timeout_s=3)
        anonymous = copy.deepcopy(cfg)
        anonymous.mqtt.username = ""
        with pytest.raises(StackError, match="refused"):
            connect(make_client(anonymous, "anon-tls"), anonymous)
    finally:
        stop_server(server)


@pytest.mark.integration
def test_without_embedded_auth_the_broker_stays_anonymous_on_loopback(tmp_path):
    cfg = Config()
    cfg.run.dir = str(tmp_path)
    cfg.mqtt.port = free_port()
    server = start_embedded_mosquitto(cfg)
    try:
        conf = (Path(server.log).parent / "mosquitto.conf").read_text()
        assert "allow_anonymous true\n" in conf and "password_file" not in conf and "certfile" not in conf
        assert f"listener {cfg.mqtt.port} 127.0.0.1\n" in conf
        client = make_client(cfg, "anon-ok")
        connect(client, cfg)
        client.disconnect()
    finally:
        stop_server(server)
