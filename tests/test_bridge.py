"""The bridge against real Mosquitto and Kafka-protocol brokers, run as real `aimass bridge` processes."""
from __future__ import annotations

import collections
import copy
import dataclasses
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from aimass.core.procs import StackError, free_port
from aimass.core.stack import create_topics, start_kafka, start_mosquitto, stop_server
from aimass.core import contract
from aimass.streams.mqtt import Publisher, connect, make_client
from aimass.streams.payloads import TopicPattern, encode_reading
from aimass.streams.simulator import SimSpec, publish
from tests.conftest import REPO, make_config
from tests.fixtures_ingest import BridgeProcess, isolate, read_records, rows_of

pytestmark = pytest.mark.integration


def identity(row: dict) -> tuple:
    return row["tenant"], row["device_id"], row["metric"], row["ts_ms"]


def assert_device_order(rows: list[dict], partitions: int) -> None:
    """Every device sits in its own partition and each series' timestamps rise in Kafka order."""
    last: dict[tuple, int] = {}
    for row in rows:
        assert row["partition"] == contract.partition_for(row["tenant"], row["device_id"], partitions)
        key = (row["tenant"], row["device_id"], row["metric"])
        assert row["ts_ms"] > last.get(key, -1), f"out of order for {key}"
        last[key] = row["ts_ms"]


def mosquitto_pub(cfg, topic: str, lines: list[bytes], version: str = "mqttv5") -> None:
    """Publish one message per line with the real `mosquitto_pub` client (QoS 1)."""
    subprocess.run([shutil.which("mosquitto_pub") or "mosquitto_pub", "-h", cfg.mqtt.host,
                    "-p", str(cfg.mqtt.port), "-q", "1", "-V", version, "-t", topic, "-l"],
                   input=b"\n".join(lines) + b"\n", check=True, timeout=30)


def test_accepted_readings_reach_kafka_in_order_and_rejects_reach_the_dead_letter_topic(cfg, tmp_path):
    cfg = isolate(cfg)
    telemetry = TopicPattern(cfg.mqtt.topic_pattern)
    now_ms = int(time.time() * 1000)
    good = [encode_reading("temp", now_ms - 10_000 + i, 20.0 + i / 100, "Cel") for i in range(200)]
    bad = {
        b'{"metric": "temp", "value": "hot"}': "bad_value",
        b'{"metric": "temp", "value": 1, "unit": "furlongs"}': "unknown_unit",
        b'{"metric": "temp", "value": 1, "ts": 99999999999999}': "future_ts",
        b"not json": "bad_json",
        b"[]": "bad_schema",
    }
    # an MQTT 3.1.1 packet of exactly bridge.max_packet_bytes (fixed header with a 3-byte length, topic, QoS 1
    # packet id, payload): the broker takes it, and it reaches the (MQTT 5) bridge to be dead-lettered, never
    # dropped on the way for being a byte longer there
    largest = b"x" * (cfg.bridge.max_packet_bytes - 4 - (2 + len(telemetry.topic("cli", "cli-1"))) - 2)
    lines = good[:100] + list(bad) + good[100:]
    cfg.bridge.metrics_port = free_port()
    with BridgeProcess(cfg, "b1", tmp_path / "bridge.log") as bridge:
        sim = publish(cfg, SimSpec(devices=6, metrics=2, rate_hz=25, duration_s=4, tenant="sim", anomalies=2,
                                   publish_labels=True))
        packs = publish(cfg, SimSpec(devices=3, metrics=3, rate_hz=50, duration_s=1, tenant="pack", format="senml",
                                     pack_size=10, seed=1))
        mosquitto_pub(cfg, telemetry.topic("cli", "cli-1"), lines)
        mosquitto_pub(cfg, telemetry.topic("cli", "bad$id"), [good[0]])
        mosquitto_pub(cfg, telemetry.topic("cli", "cli-1"), [largest], "mqttv311")
        mosquitto_pub(cfg, TopicPattern(cfg.mqtt.labels_pattern).topic("cli", "cli-1"),
                      [orjson.dumps({"start": now_ms - 5000, "end": now_ms, "kind": "maintenance"})])
        expected = sim["readings"] + packs["readings"] + len(good)
        rows = rows_of(read_records(cfg, contract.RAW, expected))
        dead = rows_of(read_records(cfg, contract.DEAD_LETTER, len(bad) + 2, settle_s=0.2))
        labels = rows_of(read_records(cfg, contract.LABEL_ROWS, sim["labels_published"] + 1, settle_s=0.2))
        with urllib.request.urlopen(f"http://127.0.0.1:{cfg.bridge.metrics_port}/metrics", timeout=10) as resp:
            metrics = {name: value for name, value in re.findall(r"^(aimass_\S+) (\S+)$", resp.read().decode(), re.M)}
        counts = bridge.terminate()

    assert sim["all_acked"] and packs["all_acked"] and sim["labels_published"] >= 1
    assert len(rows) == expected and len({identity(r) for r in rows}) == expected  # all, once
    by_tenant = collections.Counter(r["tenant"] for r in rows)
    assert by_tenant == {"sim": sim["readings"], "pack": packs["readings"], "cli": len(good)}
    cli = [(r["ts_ms"], r["value"], r["unit"]) for r in rows if r["tenant"] == "cli"]
    assert cli == [(now_ms - 10_000 + i, 20.0 + i / 100, "Cel") for i in range(200)]
    assert_device_order(rows, cfg.kafka.partitions)
    assert all(r["received_ms"] >= r["ts_ms"] - 1000 for r in rows if r["tenant"] == "sim")

    got = {(r["payload"], r["reason"], r["mqtt_topic"], r["stage"]) for r in dead}
    want = {(p, reason, telemetry.topic("cli", "cli-1"), "bridge") for p, reason in bad.items()}
    want.add((good[0], "bad_device_id", telemetry.topic("cli", "bad$id"), "bridge"))
    kept, note = contract.payload_excerpt(largest)                    # a bounded prefix, its size and hash
    want.add((kept, "too_large", telemetry.topic("cli", "cli-1"), "bridge"))
    assert got == want and len(dead) == len(want)
    assert all(r["detail"] for r in dead)
    assert note and any(note in r["detail"] for r in dead if r["reason"] == "too_large")

    assert {(r["tenant"], r["device_id"], r["kind"], r["source"]) for r in labels} >= {
        ("cli", "cli-1", "maintenance", "mqtt")}
    assert len([r for r in labels if r["tenant"] == "sim"]) == sim["labels_published"]
    assert counts["readings"] == expected and counts["rejected"] == len(want)
    assert float(metrics["aimass_bridge_readings_produced_total"]) == expected
    assert float(metrics['aimass_bridge_rejected_total{reason="bad_json"}']) == 1
    assert float(metrics["aimass_bridge_messages_total"]) == counts["messages"]
    assert float(metrics["aimass_bridge_batch_readings_count"]) > 0
    assert float(metrics["aimass_bridge_publish_to_kafka_seconds_count"]) > 0


def publish_sequence(cfg, tenant: str, devices: int, start: int, stop: int, base_ms: int,
                     publisher: Publisher) -> None:
    """Readings start..stop-1 of every device, one message each, ts = base_ms + i."""
    telemetry = TopicPattern(cfg.mqtt.topic_pattern)
    topics = [telemetry.topic(tenant, f"d{d}") for d in range(devices)]
    for i in range(start, stop):
        for topic in topics:
            publisher.publish(topic, encode_reading("seq", base_ms + i, float(i)))


def test_sigkill_mid_stream_loses_no_accepted_reading(cfg, tmp_path):
    cfg = isolate(cfg)
    cfg.bridge.receive_maximum = 2000
    cfg.bridge.flush_readings = 500
    devices, per_device = 10, 1500
    base_ms = int(time.time() * 1000) - 60_000
    log = tmp_path / "bridge.log"
    with Publisher(cfg, "seq-pub") as pub:
        with BridgeProcess(cfg, "victim", log) as bridge:
            publish_sequence(cfg, "kill", devices, 0, 500, base_ms, pub)
            read_records(cfg, contract.RAW, 1, settle_s=0)  # the first flush is in Kafka: the bridge is busy
            bridge.kill()  # mid-stream: some flushes confirmed, some in flight, some unacked in MQTT
        publish_sequence(cfg, "kill", devices, 500, 1000, base_ms, pub)  # queued in the bridge's session
        assert pub.drain(30)
        with BridgeProcess(cfg, "victim", log) as bridge:
            publish_sequence(cfg, "kill", devices, 1000, per_device, base_ms, pub)
            assert pub.drain(30)
            rows = rows_of(read_records(cfg, contract.RAW, devices * per_device))
            bridge.terminate()
    ids = collections.Counter(identity(r) for r in rows)
    expected = {("kill", f"d{d}", "seq", base_ms + i) for d in range(devices) for i in range(per_device)}
    assert expected - set(ids) == set(), "accepted readings missing after SIGKILL"
    assert set(ids) == expected
    duplicates = sum(ids.values()) - len(ids)
    assert duplicates <= cfg.bridge.receive_maximum + cfg.bridge.flush_readings, f"{duplicates} duplicates"


def test_two_bridges_share_the_stream(cfg, tmp_path):
    cfg = isolate(cfg)
    with BridgeProcess(cfg, "share-1", tmp_path / "b1.log") as b1, \
            BridgeProcess(cfg, "share-2", tmp_path / "b2.log") as b2:
        summary = publish(cfg, SimSpec(devices=20, metrics=2, rate_hz=50, duration_s=2, tenant="share"))
        rows = rows_of(read_records(cfg, contract.RAW, summary["readings"]))
        c1, c2 = b1.terminate(), b2.terminate()
    assert len(rows) == len({identity(r) for r in rows}) == summary["readings"]
    assert c1["messages"] > 0 and c2["messages"] > 0
    assert c1["messages"] + c2["messages"] == summary["messages"]


def test_a_bridge_that_ran_alone_joins_a_share_group_without_duplicates(cfg, tmp_path):
    cfg = isolate(cfg)
    alone = dataclasses.replace(cfg, bridge=dataclasses.replace(cfg.bridge, share_group=""))
    with BridgeProcess(alone, "solo", tmp_path / "solo.log") as solo:  # plain, persistent subscription
        solo.terminate()
    with BridgeProcess(cfg, "solo", tmp_path / "solo.log") as b1, \
            BridgeProcess(cfg, "other", tmp_path / "other.log") as b2:
        summary = publish(cfg, SimSpec(devices=20, metrics=2, rate_hz=50, duration_s=2, tenant="rejoin"))
        rows = rows_of(read_records(cfg, contract.RAW, summary["readings"]))
        c1, c2 = b1.terminate(), b2.terminate()
    assert c1["messages"] + c2["messages"] == summary["messages"], "the resumed session kept its plain filter"
    assert len(rows) == summary["readings"]


def test_bridge_survives_an_mqtt_broker_restart(cfg, tmp_path):
    cfg = isolate(cfg)
    port = free_port()
    broker = start_mosquitto(tmp_path, port)
    cfg.mqtt.port = port
    base_ms = int(time.time() * 1000) - 60_000
    try:
        with BridgeProcess(cfg, "restart", tmp_path / "bridge.log") as bridge:
            with Publisher(cfg, "before") as pub:
                publish_sequence(cfg, "mr", 4, 0, 200, base_ms, pub)
            read_records(cfg, contract.RAW, 800, settle_s=0)
            stop_server(broker)
            broker = start_mosquitto(tmp_path, port)  # same directory: the persisted sessions come back
            bridge.wait_for("reconnected to the MQTT broker")
            with Publisher(cfg, "after") as pub:
                publish_sequence(cfg, "mr", 4, 200, 400, base_ms, pub)
            rows = rows_of(read_records(cfg, contract.RAW, 1600))
            bridge.terminate()
    finally:
        stop_server(broker)
    assert {identity(r) for r in rows} == {("mr", f"d{d}", "seq", base_ms + i) for d in range(4) for i in range(400)}


@pytest.fixture
def secured_mosquitto(tmp_path):
    """Mosquitto with a password file, the shipped deploy/mosquitto/acl and a TLS listener (test CA)."""
    port = free_port()
    d = Path(tempfile.mkdtemp(prefix="aimass-auth-"))  # mosquitto drops to its own user: not under pytest's 0700
    d.chmod(0o755)
    for i, (user, password) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(d / "passwd"), user, password],
                       check=True, timeout=30)
    shutil.copy(REPO / "deploy/mosquitto/acl", d / "acl")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for argv in (["req", "-x509", *ec, "-days", "2", "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=test-ca"],
                 ["req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"],
                 ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                  "-days", "2", "-out", "server.crt", "-extfile", "san.ext"]):
        subprocess.run(["openssl", *argv], cwd=d, check=True, capture_output=True, timeout=30)
    if os.geteuid() == 0:
        uid = pwd.getpwnam("mosquitto").pw_uid
        for f in d.iterdir():
            os.chown(f, uid, -1)
    server = start_mosquitto(tmp_path, port, password_file=str(d / "passwd"), acl_file=str(d / "acl"),
                             tls={"cafile": str(d / "ca.crt"), "certfile": str(d / "server.crt"),
                                  "keyfile": str(d / "server.key")})
    yield server, d / "ca.crt"
    stop_server(server)
    shutil.rmtree(d, ignore_errors=True)


USERS = {"aimass-bridge": "bridge-secret-1", "acme/dev-1": "device-secret-1"}


def test_tls_passwords_and_the_shipped_per_device_acl(secured_mosquitto, kafka, tmp_path, monkeypatch):
    server, ca_file = secured_mosquitto
    cfg = make_config(tmp_path, server, kafka)
    create_topics(cfg)
    cfg.bridge.share_group = cfg.kafka.topic_prefix
    cfg.mqtt.tls, cfg.mqtt.tls_ca_file = True, str(ca_file)
    cfg.mqtt.username, cfg.mqtt.password_env = "aimass-bridge", "TEST_BRIDGE_PASSWORD"
    monkeypatch.setenv("TEST_BRIDGE_PASSWORD", USERS["aimass-bridge"])
    device = copy.deepcopy(cfg)
    device.mqtt.username, device.mqtt.password_env = "acme/dev-1", "TEST_DEVICE_PASSWORD"
    monkeypatch.setenv("TEST_DEVICE_PASSWORD", USERS["acme/dev-1"])
    now_ms = int(time.time() * 1000)
    with BridgeProcess(cfg, "secure", tmp_path / "bridge.log") as bridge:
        with Publisher(device, "dev-1") as pub:
            for i in range(3):
                pub.publish("aimass/acme/dev-1/telemetry", encode_reading("temp", now_ms + i, 20.0 + i, "Cel"))
            pub.publish("aimass/acme/dev-2/telemetry", encode_reading("temp", now_ms, 99.0))  # not its own topic
        rows = rows_of(read_records(cfg, contract.RAW, 3, settle_s=1.5))
        bridge.terminate()
        assert USERS["aimass-bridge"] not in bridge.text()
    assert [(r["device_id"], r["value"]) for r in rows] == [("dev-1", 20.0), ("dev-1", 21.0), ("dev-1", 22.0)]

    monkeypatch.setenv("TEST_DEVICE_PASSWORD", "wrong")
    with pytest.raises(StackError, match="refused"):
        connect(make_client(device, "intruder"), device)
    plain = copy.deepcopy(device)
    plain.mqtt.tls = False  # the listener speaks TLS only
    with pytest.raises(StackError):
        connect(make_client(plain, "plain"), plain, timeout_s=3)


def test_bridge_survives_a_kafka_broker_restart(mosquitto, tmp_path):
    """The local broker keeps topics in memory only: after its restart the topics are created again."""
    port = free_port()
    broker = start_kafka(tmp_path, port)
    cfg = isolate(make_config(tmp_path, mosquitto, broker))
    cfg.bridge.kafka_timeout_s = 5  # a stuck producer is replaced after 5 s
    create_topics(cfg)
    base_ms = int(time.time() * 1000) - 60_000
    try:
        with BridgeProcess(cfg, "kafka-restart", tmp_path / "bridge.log") as bridge, \
                Publisher(cfg, "kr-pub") as pub:
            publish_sequence(cfg, "kr", 4, 0, 100, base_ms, pub)
            assert len(rows_of(read_records(cfg, contract.RAW, 400, settle_s=0))) >= 400
            stop_server(broker)
            publish_sequence(cfg, "kr", 4, 100, 200, base_ms, pub)  # held unacked in MQTT meanwhile
            assert pub.drain(30)
            time.sleep(1.0)
            broker = start_kafka(tmp_path, port)
            create_topics(cfg)
            rows = rows_of(read_records(cfg, contract.RAW, 400, timeout=90))
            bridge.terminate()
    finally:
        stop_server(broker)
    ids = {identity(r) for r in rows}
    assert ids >= {("kr", f"d{d}", "seq", base_ms + i) for d in range(4) for i in range(100, 200)}
