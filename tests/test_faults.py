"""Fault tests on the real servers, one fault each, on one running pipeline (a tenant per test).

After each fault: nothing lost (every published reading stored or dead-lettered with a
reason), nothing duplicated in query results, the pipeline back to normal on its own, and the
fault visible in metrics. This module has its own mosquitto and tritonserver (they get
restarted and killed); Kafka is the session's.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from aimass.core.contract import partition_for
from aimass.core.procs import free_port
from aimass.core.stack import start_mosquitto, start_triton, stop_server
from aimass.streams.mqtt import Publisher
from aimass.streams.simulator import SimSpec, publish
from aimass.rules.alarms import should_notify
from tests.accounting import Identity
from tests.pipeline_harness import (TEST_RULES, SeriesTraffic, TestPipeline, check_every_series_produced,
                                    pipeline_config, wait_rising)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


class Servers:
    """This module's mosquitto and tritonserver, restartable on the same ports."""

    def __init__(self, run: Path):
        self.run = run
        self.mqtt_port = free_port()
        self.triton_ports = (free_port(), free_port(), free_port())
        self.mosquitto = start_mosquitto(run, self.mqtt_port)
        self.triton = self.start_triton()

    def start_triton(self):
        return start_triton(self.run, *self.triton_ports, REPO / "triton_repo")

    def restart_mosquitto(self, down_s: float) -> None:
        stop_server(self.mosquitto)
        time.sleep(down_s)
        self.mosquitto = start_mosquitto(self.run, self.mqtt_port)

    def stop(self) -> None:
        stop_server(self.triton)
        stop_server(self.mosquitto)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    s = Servers(tmp_path_factory.mktemp("fault-servers"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, servers, kafka):
    port = free_port()
    p = TestPipeline(pipeline_config(tmp_path_factory.mktemp("faults"), servers.mosquitto, kafka, servers.triton,
                                     port), webhook_port=port).start()
    yield p
    p.stop()


class Traffic:
    """Simulated telemetry for one tenant, published in a background thread."""

    def __init__(self, pipeline: TestPipeline, tenant: str, seconds: float = 30, anomalies: int = 0, devices: int = 4):
        self.spec = SimSpec(devices=devices, metrics=["temp", "power"], rate_hz=5, duration_s=seconds, seed=5,
                            tenant=tenant, anomalies=anomalies, format="senml", pack_size=10)
        self.summary: dict = {}
        self.sent: set[Identity] = set()
        self.thread = threading.Thread(
            target=lambda: self.summary.update(publish(pipeline.cfg, self.spec, sent=self.sent)), daemon=True)
        self.thread.start()

    def join(self) -> set[Identity]:
        """The identities of every reading published, once the publisher has every ack."""
        self.thread.join(timeout=self.spec.duration_s + 180)
        assert self.summary.get("all_acked"), f"publisher did not get every ack: {self.summary}"
        assert len(self.sent) == self.summary["readings"]
        return self.sent


def assert_accounted(pipeline: TestPipeline, tenant: str, published: set[Identity], extra_rejects: int = 0) -> None:
    """Readings, windows, predictions and alarm events accounted by identity; every reject has a reason."""
    pipeline.account(tenant, published, extra_rejects)
    assert pipeline.count(f"SELECT count() FROM {{db}}.rejects WHERE tenant = '{tenant}' AND reason = ''") == 0


ASSIGNED = re.compile(r"(\S+): assigned partitions \[([^\]]*)\]")


def owned_partitions(log: str) -> dict[str, list[int]]:
    """Topic -> partitions of the latest assignment a worker's log names."""
    return {topic: [int(p) for p in parts.split(",") if p.strip()] for topic, parts in ASSIGNED.findall(log)}


def test_worker_sigkill_mid_stream(pipeline):
    traffic = Traffic(pipeline, "f-worker")
    # The tenant's devices may all hash to one worker's partitions: kill the one cleaning them now.
    worker = wait_rising(pipeline.ports("worker-"), "aimass_clean_readings_in_total")
    owned = owned_partitions(pipeline.log_of(worker))
    assert any(owned.values()), f"{worker} owns no partition: killing it proves nothing; {owned}"
    pipeline.sup.kill(worker, signal.SIGKILL)
    published = traffic.join()
    assert pipeline.sup.restarts(worker) >= 1  # the supervisor brought it back
    assert_accounted(pipeline, "f-worker", published)
    assert pipeline.sup.alive("worker-1") and pipeline.sup.alive("worker-2")


def test_predict_sigkill_mid_stream(pipeline):
    traffic = Traffic(pipeline, "f-predict")
    wait_rising(pipeline.ports("predict"), "aimass_predict_rows_total")  # predicting right now
    assert re.search(r"assigned partitions \[\d", pipeline.log_of("predict")), "predict owns no partition"
    pipeline.sup.kill("predict", signal.SIGKILL)
    published = traffic.join()
    assert pipeline.sup.restarts("predict") >= 1
    assert_accounted(pipeline, "f-predict", published)  # every window predicted exactly once across the kill
    assert pipeline.sup.alive("predict")


def test_mqtt_broker_restart(pipeline, servers):
    traffic = Traffic(pipeline, "f-mqtt")
    wait_rising(pipeline.ports("bridge"), "aimass_bridge_messages_total")
    servers.restart_mosquitto(down_s=3)
    published = traffic.join()
    assert_accounted(pipeline, "f-mqtt", published)
    assert pipeline.sup.restarts("bridge") == 0 and pipeline.sup.alive("bridge"), "the bridge died instead of reconnecting"
    assert "reconnect" in pipeline.logs().lower()


def test_mosquitto_sigkill(pipeline, servers):
    """The broker dies without saving: the publisher (QoS 1) resends what was not acknowledged."""
    traffic = Traffic(pipeline, "f-mqtt-kill")
    wait_rising(pipeline.ports("bridge"), "aimass_bridge_messages_total")
    os.kill(servers.mosquitto.pid, signal.SIGKILL)
    servers.restart_mosquitto(down_s=3)
    published = traffic.join()
    assert_accounted(pipeline, "f-mqtt-kill", published)
    assert pipeline.sup.restarts("bridge") == 0 and pipeline.sup.alive("bridge"), "the bridge died instead of reconnecting"


def test_tritonserver_killed_then_back(pipeline, servers):
    traffic = Traffic(pipeline, "f-triton", seconds=40)
    # Triton is serving predict right now
    wait_rising({"tritonserver": servers.triton_ports[2]}, "nv_inference_request_success_total")
    os.kill(servers.triton.pid, signal.SIGKILL)
    open_seen = False
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        open_seen |= pipeline.metrics().get("aimass_predict_breaker_open", 0) >= 1
        time.sleep(0.5)
    stop_server(servers.triton)  # reaps the process and its shared memory
    servers.triton = servers.start_triton()
    published = traffic.join()
    assert_accounted(pipeline, "f-triton", published)  # every window predicted once, degraded or not
    assert open_seen, "the breaker never opened while tritonserver was down"
    t = "tenant = 'f-triton'"
    degraded = pipeline.count(f"SELECT countIf(degraded) FROM {{db}}.predictions FINAL WHERE {t}")
    assert degraded > 0, "no degraded predictions while tritonserver was down"
    deadline = time.monotonic() + 30  # recovery: fresh predictions come from Triton again
    while time.monotonic() < deadline:
        recent = pipeline.query(f"SELECT degraded FROM {{db}}.predictions FINAL WHERE {t} "
                                "ORDER BY window_end_at DESC LIMIT 5").column("degraded").to_pylist()
        if recent and not any(recent):
            break
        time.sleep(1)
    assert recent and not any(recent), f"predictions still degraded after tritonserver returned: {recent}"
    assert pipeline.metrics().get("aimass_predict_breaker_open", 0) == 0


def test_sink_killed_mid_batch(pipeline):
    traffic = Traffic(pipeline, "f-sink")
    wait_rising(pipeline.ports("sink"), "aimass_sink_rows_total")
    # The journal exists from just before an insert until its offsets are committed: kill then.
    journal = pipeline.cfg.run_dir / "sink" / f"{pipeline.cfg.clickhouse.group_id}.journal.json"
    deadline = time.monotonic() + 20
    while not journal.exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert journal.exists(), "the sink never had a batch in flight"
    pipeline.sup.kill("sink", signal.SIGKILL)
    published = traffic.join()
    assert pipeline.sup.restarts("sink") >= 1
    assert_accounted(pipeline, "f-sink", published)
    log = pipeline.log_of("sink")  # the restarted sink found the killed one's batch
    assert "re-reading" in log or "was already committed" in log, log[-3000:]


def test_kafka_broker_stopped_for_a_minute_then_continued(pipeline, kafka):
    """Every stage loses the broker at once for 60 s (SIGSTOP: connections hang, nothing is refused),
    ten session timeouts. One drill covers every stage because all of them run at once and each
    consumes or produces through the broker: after SIGCONT each one's own output for readings sent
    after the outage is asserted per series (the bridge's readings and the sink storing them, the
    workers' windows, predict's predictions, the alerter's `stuck` alarms for values that went flat
    only after the broker returned), and everything, before, during and after, by identity."""
    tenant = "f-kafka"
    traffic = SeriesTraffic(pipeline.cfg, tenant, {f"dev-k{i}": 0.0 for i in range(4)}, seconds=80)
    wait_rising(pipeline.ports("sink"), "aimass_sink_rows_total")
    os.kill(kafka.pid, signal.SIGSTOP)
    try:
        time.sleep(60)
    finally:
        os.kill(kafka.pid, signal.SIGCONT)
    resumed_ms = int(time.time() * 1000)
    traffic.stick()
    published = traffic.join()
    assert_accounted(pipeline, tenant, published)
    check_every_series_produced(pipeline, tenant, {(d, m) for _, d, m, _ in published}, since_ms=resumed_ms)
    assert all(pipeline.sup.alive(p.name) for p in pipeline.plans), pipeline.logs()


def test_device_clock_30s_ahead_next_to_normal_devices(pipeline):
    """A device whose clock runs 30 s fast (accepted: the skew limit is 60 s) shares a Kafka partition
    with normal devices: every reading of all of them is stored (none late), and each series has
    its windows, predictions and alarms."""
    tenant, fast, parts = "f-skew", "dev-fast", pipeline.cfg.kafka.partitions
    names = [f"dev-n{i}" for i in range(100)]
    same = [d for d in names if partition_for(tenant, d, parts) == partition_for(tenant, fast, parts)][:2]
    other = next(d for d in names if partition_for(tenant, d, parts) != partition_for(tenant, fast, parts))
    assert len(same) == 2
    traffic = SeriesTraffic(pipeline.cfg, tenant, {fast: 30.0, **dict.fromkeys([*same, other], 0.0)}, seconds=24,
                            stuck_after_s=12)
    published = traffic.join()
    ledger = pipeline.account(tenant, published)
    assert set(ledger.stored) == published and not ledger.rejected, ledger.reasons()
    check_every_series_produced(pipeline, tenant, {(d, m) for _, d, m, _ in published})
    fast_ts = max(ts for _, d, _, ts in ledger.stored if d == fast)
    assert fast_ts > max(ts for _, d, _, ts in ledger.stored if d != fast) + 25_000  # it did run ahead


def test_malformed_flood(pipeline):
    traffic = Traffic(pipeline, "f-flood", seconds=20)
    flood = [b"{", b"null", b'{"ts": "x", "value": 1}', b'{"metric": "temp", "value": NaN}', b"\xff\xfe" * 100,
             b'{"ts": 1, "metric": "temp", "value": 1e400}', b"[" * 10000]
    n = 0
    before = pipeline.metrics().get("aimass_bridge_rejected_total", 0)
    with Publisher(pipeline.cfg, "flood", qos=1) as pub:
        for i in range(2000):
            pub.publish(f"aimass/f-flood/dev-bad{i % 7}/telemetry", flood[i % len(flood)])
            n += 1
        assert pub.drain(timeout_s=60)
    published = traffic.join()
    assert_accounted(pipeline, "f-flood", published, extra_rejects=n)
    bridge_rejects = pipeline.count("SELECT count() FROM {db}.rejects FINAL WHERE tenant = 'f-flood' AND stage = 'bridge'")
    assert bridge_rejects == n
    assert pipeline.metrics().get("aimass_bridge_rejected_total", 0) - before == n
    assert pipeline.sup.restarts("bridge") == 0


def test_bad_rule_file_pushed_during_run(pipeline):
    rules_dir = Path(pipeline.cfg.alert.rules_path)
    bad = rules_dir / "broken.yaml"
    traffic = Traffic(pipeline, "f-rules", seconds=40, anomalies=4)
    time.sleep(5)
    bad.write_text("rules:\n  - name: broken\n    stream: windows\n    condition: (value >\n")
    try:
        deadline = time.monotonic() + 15
        while pipeline.metrics().get("aimass_rule_file_errors", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert pipeline.metrics().get("aimass_rule_file_errors", 0) >= 1, "the bad file is not visible in metrics"
        assert pipeline.metrics().get("aimass_rules_loaded", 0) == len(yaml.safe_load(TEST_RULES)["rules"])  # still run
        published = traffic.join()
        assert_accounted(pipeline, "f-rules", published)
        assert pipeline.sup.restarts("alerter") == 0 and pipeline.sup.alive("alerter")
        assert "broken.yaml" in (pipeline.sup.log_dir / "alerter.log").read_text()
        raised = pipeline.count("SELECT count() FROM {db}.alerts FINAL WHERE tenant = 'f-rules' "
                                "AND transition = 'raised'")
        assert raised > 0, "the previous rules stopped alerting after a bad file was pushed"
    finally:
        bad.unlink()


def test_webhook_receiver_down_for_a_minute(pipeline):
    pipeline.receiver.stop()
    traffic = Traffic(pipeline, "f-webhook", seconds=30, anomalies=4)
    published = traffic.join()
    time.sleep(30)  # down for a minute in all
    failed = sum(v for k, v in pipeline.metrics().items()
                 if k.startswith("aimass_notifications_total{") and 'status="delivered"' not in k)
    pipeline.receiver.start()
    assert failed > 0, "the receiver outage is not visible in the notification metrics"
    assert_accounted(pipeline, "f-webhook", published)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        notified = {r["event_id"] for r in pipeline.query(
            "SELECT event_id, transition, flapping FROM {db}.alerts FINAL WHERE tenant = 'f-webhook'").to_pylist()
            if should_notify(r)}
        got = {e["event_id"] for e in pipeline.receiver.events}
        if notified and notified <= got:
            break
        time.sleep(1)
    assert notified, "no alarm events in this run"
    assert notified <= got, notified - got
    received = [e["event_id"] for e in pipeline.receiver.events]
    assert len(received) == len(set(received)), "an event was acted on twice"
