"""`aimass alerter` as a real process on the real Kafka broker fixture: windows/predictions/labels in,
alarm events, outcomes, quality rows, notifications and dead letters out; `aimass alerts` list/ack
through the API; SIGTERM exits 0 and alarm state survives the restart without duplicate raises; a
broken rule file is rejected while the previous rules keep running."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from aimass.core.procs import free_port, port_in_use, wait_until
from aimass.core import contract
from aimass.streams.kafka import consumer_config, producer_config
from aimass.core.clickhouse import ChdbStore
from tests.conftest import REPO
from tests.fixtures_rules import Reader, labels, predictions, windows
from tests.fixtures_store import Running, chdb_config, chdb_run_dir, sink_on, wait_for  # noqa: F401

pytestmark = pytest.mark.integration

RULES = """
receivers:
  hook: {{kind: webhook, url: "http://127.0.0.1:{port}/hook", secret_env: TEST_HOOK_SECRET, group_wait: 0s}}
rules:
  - name: hot
    stream: windows
    condition: mean > 80
    for: 2 windows
    clear: mean < 75
    severity: critical
    message: "{{device_id}} mean {{mean:.1f}}"
    receivers: [hook]
  - name: residual
    stream: outcomes
    condition: abs(forecast_residual()) > 5
    receivers: [hook]
"""


class Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append({"key": self.headers["Idempotency-Key"], **json.loads(body)})
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hook_server():
    Hook.received = []
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def write_config(cfg, tmp_path: Path, hook_port: int, checkpoint_ms: int = 1000, rules_text: str = RULES,
                 metrics_port: int = 0) -> Path:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text(rules_text.format(port=hook_port))
    path = tmp_path / "aimass.toml"
    path.write_text(f"""
[run]
dir = "{tmp_path / 'run'}"
[kafka]
bootstrap = "{cfg.kafka.bootstrap}"
topic_prefix = "{cfg.kafka.topic_prefix}"
partitions = {cfg.kafka.partitions}
[alert]
rules_path = "{rules}"
api_port = {cfg.alert.api_port}
metrics_port = {metrics_port}
reload_s = 0.5
quality_every_s = 1
label_grace_s = 0
backoff_initial_s = 0.1
checkpoint_ms = {checkpoint_ms}
""")
    return path


ENV = {**os.environ, "AIMASS_API_TOKEN": "test-token", "TEST_HOOK_SECRET": "hook-secret"}


def start_alerter(config: Path, log: Path, api_port: int, python: tuple[str, ...] = ("-m", "aimass.cli"),
                  env: dict[str, str] = ENV) -> subprocess.Popen:
    """`aimass alerter` (or ``python`` args that run aimass.cli, e.g. after injecting a fault)."""
    proc = subprocess.Popen([sys.executable, *python, "--config", str(config), "alerter"],
                            stdout=subprocess.DEVNULL, stderr=log.open("a"), env=env, cwd=REPO)
    wait_until(lambda: port_in_use(api_port), 30, "alerter API", proc, log)
    return proc


def pump_partition(cfg, topic: contract.Topic) -> int:
    """The partition of the test device (acme/pump-1) in ``topic``."""
    return contract.partition_for("acme", "pump-1", contract.topic_partitions(topic, cfg.kafka.partitions))


def produce(cfg, topic: contract.Topic, table: pa.Table) -> None:
    producer = Producer(producer_config(cfg))
    producer.produce(topic.name(cfg.kafka.topic_prefix), contract.encode(table, topic.schema),
                     partition=pump_partition(cfg, topic))
    assert producer.flush(10) == 0


def committed_windows(cfg) -> int:
    """The alerter group's committed offset in the test device's window-rows partition."""
    group = Consumer(consumer_config(cfg, f"{cfg.kafka.topic_prefix}-alerter"))
    try:
        name = contract.WINDOW_ROWS.name(cfg.kafka.topic_prefix)
        [tp] = group.committed([TopicPartition(name, pump_partition(cfg, contract.WINDOW_ROWS))], timeout=10)
        return tp.offset
    finally:
        group.close()


def cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aimass.cli", "--config", str(config), "alerts", *args],
                          capture_output=True, text=True, env=ENV, timeout=60)


def api_status(port: int) -> dict:
    """GET /status of the alerter's API with the read token of ENV."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/status",
                                 headers={"Authorization": f"Bearer {ENV['AIMASS_API_TOKEN']}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def transitions(rows: list[dict]) -> list[tuple[str, str]]:
    return [(r["rule"], r["transition"]) for r in rows]


def test_alerter_end_to_end_on_kafka(cfg, tmp_path, hook_server, chdb_run_dir):  # noqa: F811
    config = write_config(cfg, tmp_path, hook_server.server_address[1])
    log = tmp_path / "alerter.log"
    alerts, outcomes = Reader(cfg, contract.ALERT_EVENTS), Reader(cfg, contract.OUTCOME_ROWS)
    quality, dead = Reader(cfg, contract.QUALITY_ROWS), Reader(cfg, contract.DEAD_LETTER)
    notifications = Reader(cfg, contract.NOTIFICATION_ROWS)
    proc = start_alerter(config, log, cfg.alert.api_port)
    try:
        produce(cfg, contract.LABEL_ROWS, labels(dict(start_ms=15_000, end_ms=30_000)))
        produce(cfg, contract.PREDICTION_ROWS, predictions(dict(window_end_ms=10_000, target_end_ms=20_000,
                                                                forecast=70.0, band_low=65.0, band_high=75.0)))
        produce(cfg, contract.WINDOW_ROWS, windows(dict(window_end_ms=10_000, mean=85.0),
                                                   dict(window_end_ms=20_000, mean=90.0, max_received_ms=1)))
        rows = alerts.until(lambda rs: len(rs) >= 2)
        assert sorted(transitions(rows)) == [("hot", "raised"), ("residual", "raised")]
        hot = next(r for r in rows if r["rule"] == "hot")
        assert (hot["state"], hot["severity"], hot["message"], hot["device_id"]) == (
            "active_unack", "critical", "pump-1 mean 90.0", "pump-1")
        [outcome] = outcomes.until(lambda rs: len(rs) >= 1)
        assert (outcome["target_end_ms"], outcome["actual"], outcome["residual"], outcome["in_band"]) == (
            20_000, 90.0, 20.0, False)
        # both alarm events reached the webhook (signed delivery is covered in test_rules_delivery)
        notified = notifications.until(lambda rs: sum(r["status"] == "delivered" for r in rs) >= 2)
        assert {r["event_id"] for r in notified if r["status"] == "delivered"} == {r["event_id"] for r in rows}
        assert sorted(e["rule"] for h in Hook.received for e in h["events"]) == ["hot", "residual"]

        # a record that is not Arrow goes to the dead-letter topic; the alerter keeps running
        producer = Producer(producer_config(cfg))
        producer.produce(contract.WINDOW_ROWS.name(cfg.kafka.topic_prefix), b"not arrow", partition=0)
        producer.flush(10)
        [bad] = dead.until(lambda rs: len(rs) >= 1)
        assert (bad["stage"], bad["reason"], bad["payload"]) == ("alert", "bad_record", b"not arrow")

        # the window after the label ends moves the watermark: the rule detected the label 5 s after it began
        produce(cfg, contract.WINDOW_ROWS, windows(dict(window_end_ms=40_000, mean=78.0)))
        q = quality.until(lambda rs: any(r["rule"] == "hot" and r["true_positives"] == 1 for r in rs))
        hot_q = [r for r in q if r["rule"] == "hot" and r["true_positives"] == 1][-1]
        assert (hot_q["false_negatives"], hot_q["mean_delay_s"]) == (0, 5.0)

        # /status with a token: rules, active alarms, Kafka health, lag per input partition, delivery state
        status = api_status(cfg.alert.api_port)
        assert (status["rules"], status["rule_file_errors"], status["alarms_active"]) == (2, [], 2)
        assert status["kafka"]["ok"] and status["delivery"]["retrying_by_receiver"] == {}
        lag = status["consumer_lag"]
        windows_topic = contract.WINDOW_ROWS.name(cfg.kafka.topic_prefix)
        window_part = f"{windows_topic}[{pump_partition(cfg, contract.WINDOW_ROWS)}]"
        assert window_part in lag and lag[window_part] in (0, None)

        listing = cli(config, "list")
        assert listing.returncode == 0, listing.stderr
        assert "hot" in listing.stdout and "active_unack" in listing.stdout
        [hot_alarm] = [a for a in json.loads(cli(config, "list", "--json").stdout) if a["rule"] == "hot"]
        acked = cli(config, "ack", hot_alarm["alarm_id"], "--by", "alice")
        assert acked.returncode == 0, acked.stderr
        assert "active_ack" in acked.stdout
        assert cli(config, "ack", hot_alarm["alarm_id"]).returncode == 1  # already acknowledged
        rows = alerts.until(lambda rs: ("hot", "acknowledged") in transitions(rs))
        [acked_event] = [r for r in rows if r["transition"] == "acknowledged"]  # the audit record: who, when, what
        assert (acked_event["actor"], acked_event["rule"], acked_event["device_id"]) == ("default", "hot", "pump-1")
        assert time.time() * 1000 - 60_000 < acked_event["event_ms"] <= time.time() * 1000

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0

        # restart: the acknowledged alarm is still there; replayed input raises nothing twice
        proc = start_alerter(config, log, cfg.alert.api_port)
        [again] = [a for a in json.loads(cli(config, "list", "--json").stdout) if a["rule"] == "hot"]
        assert (again["state"], again["acked_by"], again["count"]) == ("active_ack", "alice", 1)
        # a broken rule file is rejected with its location; the rules loaded before keep running
        rules_file = tmp_path / "rules" / "rules.yaml"
        rules_file.write_text(rules_file.read_text().replace("condition: mean > 80", "condition: mean >> 80"))
        wait_until(lambda: f"{rules_file}:7:22: condition: expected a value" in log.read_text(), 30, "the rejected reload in the log", proc, log)
        produce(cfg, contract.WINDOW_ROWS, windows(dict(window_end_ms=50_000, mean=60.0)))
        rows = alerts.until(lambda rs: ("hot", "cleared") in transitions(rs))
        cleared = next(r for r in rows if r["transition"] == "cleared")
        assert cleared["state"] == "cleared"  # acknowledged before it cleared: nothing left to do
        assert transitions(rows).count(("hot", "raised")) == 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        for reader in (alerts, outcomes, quality, dead, notifications):
            reader.close()
    assert proc.returncode == 0, log.read_text()[-3000:]
    # the sink stores the acknowledgement with the token's name (never its secret) next to the alarm
    sink_cfg = chdb_config(cfg, chdb_run_dir)
    db = sink_cfg.clickhouse.database
    sink = sink_on(sink_cfg, ChdbStore(sink_cfg.run_dir / "chdb", db))
    with Running(sink):
        stored = wait_for(lambda: sink.store.query(
            f"SELECT rule, device_id, actor, toUnixTimestamp64Milli(event_at) AS at FROM `{db}`.alerts FINAL "
            f"WHERE transition = 'acknowledged'").to_pylist() or None, 60, "the acknowledgement in the store")
    assert stored == [{"rule": "hot", "device_id": "pump-1", "actor": "default", "at": acked_event["event_ms"]}]


def test_alerter_sigkill_replays_what_its_checkpoint_does_not_cover(cfg, tmp_path, hook_server):
    """Offsets are committed only with a checkpoint (alert.checkpoint_ms): a SIGKILL between two
    replays the input since the last one, and the replay raises nothing twice: the raise it repeats
    is the same event (same id, at least once), and the alarm was raised once."""
    config = write_config(cfg, tmp_path, hook_server.server_address[1], checkpoint_ms=600_000)
    log = tmp_path / "alerter.log"
    alerts = Reader(cfg, contract.ALERT_EVENTS)
    proc = start_alerter(config, log, cfg.alert.api_port)
    try:
        produce(cfg, contract.WINDOW_ROWS, windows(dict(window_end_ms=10_000, mean=85.0)))
        wait_until(lambda: committed_windows(cfg) == 1, 30, "the first batch's checkpoint", proc, log)
        produce(cfg, contract.WINDOW_ROWS, windows(dict(window_end_ms=20_000, mean=90.0)))  # 2 windows hot: raised
        alerts.until(lambda rs: ("hot", "raised") in transitions(rs))
        proc.kill()
        proc.wait(30)
        assert committed_windows(cfg) == 1  # the raising window is not covered by a checkpoint: it comes again

        proc = start_alerter(config, log, cfg.alert.api_port)
        produce(cfg, contract.WINDOW_ROWS, windows(dict(window_end_ms=30_000, mean=60.0)))
        rows = alerts.until(lambda rs: ("hot", "cleared") in transitions(rs))
        assert len({r["event_id"] for r in rows if (r["rule"], r["transition"]) == ("hot", "raised")}) == 1
        assert ("hot", "reraised") not in transitions(rows)
        [alarm] = [a for a in json.loads(cli(config, "list", "--json").stdout) if a["rule"] == "hot"]
        assert (alarm["state"], alarm["count"]) == ("cleared_unack", 1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert committed_windows(cfg) == 3  # a clean stop checkpoints and commits what it processed
    finally:
        if proc.poll() is None:
            proc.kill()
        alerts.close()
