"""Two predictors and two alerters, each with its own run directory (no shared volume: state in the
Kafka state store), share the partitions; one of each is SIGKILLed mid-stream. Every window is
still predicted, with the values an undisturbed predictor gives (the state moved with its
partitions); every expected alarm event is in the alerts topic (no other, so none was raised twice
or lost its state) and reaches the webhook receiver exactly once, within kafka.session_timeout_ms
+ 5 s of its window; each stage's aimass_consumer_lag is served by its metrics endpoint. Either
alerter's API (alert.api_peers) lists every alarm while each holds only its own partitions'.

``AIMASS_HA_DEFECT=alert`` (or ``predict``) runs that stage with its partition state not taken over
on assignment: the test must then fail."""
from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from aimass.agents.predict import Predictor
from aimass.core import contract
from aimass.core.procs import free_port, wait_until
from aimass.core.stack import create_topics
from aimass.receiver import WebhookReceiver
from aimass.streams.kafka import producer_config
from tests.conftest import make_config
from tests.fixtures_rules import Reader, windows
from tests.fixtures_stream import config_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

DEVICES, STEPS, PACE_S, KILL_AT = 18, 56, 0.25, 18
HOT, NORMAL = 90.0, 50.0
SECRET = {"AIMASS_STATE_KEY": "ha-test-checkpoint-key", "TEST_HOOK_SECRET": "ha-hook-secret",
          "AIMASS_API_TOKEN": "ha-token"}
RULES = """
rules:
  - {{name: hot, stream: windows, selector: {{device: "pump-*"}}, condition: mean >= 85, clear: mean <= 60,
     for: 2 windows, flapping: {{changes: 10, within: 1m}}, receivers: [hook]}}
receivers:
  hook: {{kind: webhook, url: "{url}", secret_env: TEST_HOOK_SECRET, group_wait: 0s}}
"""
DEFECTS = {  # a partition's state is not taken over on assignment
    "alert": "from aimass.agents.alert import Alerter; Alerter.adopt = lambda self, part, state: None; ",
    "predict": "import aimass.agents.predict as p; "
               "p.state_from = lambda checkpoint, cfg: p.detect.PartitionDetectors(cfg.detect, cfg.predict.history_windows); ",
}


def episodes(i: int) -> list[int]:
    """First steps of device i's two hot episodes (3 hot windows each), one on each side of the kill."""
    return [6 + i % 7, KILL_AT + 2 + i % 9]


def stream(base_ms: int) -> pa.Table:
    """STEPS windows of each device, step-major; mean HOT in its episodes, else NORMAL."""
    rows = []
    for t in range(STEPS):
        for i in range(DEVICES):
            hot = any(h <= t < h + 3 for h in episodes(i))
            wobble = (i * 7 + t * 13) % 5 - 2.0  # gives the predictor's state something to learn
            rows.append(dict(device_id=f"pump-{i}", window_start_ms=base_ms + t * 10_000,
                             window_end_ms=base_ms + (t + 1) * 10_000, mean=(HOT if hot else NORMAL) + wobble,
                             max_received_ms=base_ms + (t + 1) * 10_000))
    return windows(*rows)


def expected_events(base_ms: int) -> dict[tuple[str, str, int], int]:
    """(device, transition, ts_ms) -> step of the window that causes it."""
    out = {}
    for i in range(DEVICES):
        first, second = episodes(i)
        for h, raised in ((first, "raised"), (second, "reraised")):
            out[(f"pump-{i}", raised, base_ms + (h + 2) * 10_000)] = h + 1  # the 2nd hot window
            out[(f"pump-{i}", "cleared", base_ms + (h + 4) * 10_000)] = h + 3  # the first normal one
    return out


def undisturbed_predictions(cfg, data: pa.Table, parts: np.ndarray) -> dict[tuple[str, int], tuple[float, float]]:
    """(device, window end) -> (online forecast, anomaly) of one predictor that never stops (series rows)."""
    predictor = Predictor(cfg, None)
    out = {}
    for t in range(STEPS):
        rows = slice(t * DEVICES, (t + 1) * DEVICES)
        batches = [(int(p), data.slice(rows.start, DEVICES).filter(pa.array(parts[rows] == p)))
                   for p in sorted(set(parts[rows].tolist()))]
        table, _ = asyncio.run(predictor.predict(batches, now_ms=0))
        out.update({(d, e): (f, a) for d, m, e, f, a in zip(*(table[c].to_pylist() for c in (
            "device_id", "metric", "window_end_ms", "forecast_online", "anomaly"))) if m != contract.DEVICE_METRIC})
    return out


def start(role: str, cfg, tmp: Path, name: str, defect: str = "") -> tuple[subprocess.Popen, Path]:
    env = {**config_env(cfg), **SECRET}
    log = tmp / f"{name}.log"
    args = ["predict", "--no-triton"] if role == "predict" else ["alerter"]
    code = ["-c", DEFECTS[role] + "from aimass.cli import main; main()"] if defect == role else ["-m", "aimass.cli"]
    proc = subprocess.Popen([sys.executable, *code, *args], env=env, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def owns_partitions(log: Path) -> bool:
    """Whether the stage's last assignment (in its log) gave it partitions."""
    found = re.findall(r"assigned partitions \[([\d, ]*)\]", log.read_text() if log.exists() else "")
    return bool(found and found[-1])


def drain(reader: Reader, seconds: float) -> list[dict]:
    """Whatever else arrives within ``seconds``; the reader's rows."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for m in reader.consumer.consume(100, 0.3):
            if not m.error():
                reader.rows += contract.decode(m.value(), reader.topic.schema).to_pylist()
    return reader.rows


def alarm_devices(port: int, local: bool = False) -> tuple[set[str], list[str]]:
    """Devices with an alarm in an alerter's API listing (``local``: its own alarms only), and the
    peers it names as unreachable."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/alarms" + ("?local=1" if local else ""),
                                 headers={"Authorization": f"Bearer {SECRET['AIMASS_API_TOKEN']}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        doc = json.loads(r.read())
    return {a["device_id"] for a in doc["alarms"]}, doc.get("unreachable", [])


def lag(port: int) -> dict[tuple[str, str, str, str], float]:
    """aimass_consumer_lag samples a stage serves: (stage, group, topic, partition) -> records behind."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.labels["stage"], s.labels["group"], s.labels["topic"], s.labels["partition"]): s.value
            for family in text_string_to_metric_families(text) if family.name == "aimass_consumer_lag"
            for s in family.samples}


def test_killing_one_of_two_predictors_and_alerters_loses_and_duplicates_nothing(tmp_path, kafka):
    defect = os.environ.get("AIMASS_HA_DEFECT", "")
    cfg = make_config(tmp_path, kafka=kafka)
    cfg.state.store = "kafka"
    cfg.predict.checkpoint_every_s = 1.0
    create_topics(cfg)
    base_ms = (int(time.time()) // 10) * 10_000 - STEPS * 10_000
    data = stream(base_ms)
    parts = contract.partitions_for(data["tenant"].to_numpy(zero_copy_only=False),
                                    data["device_id"].to_numpy(zero_copy_only=False), cfg.kafka.partitions)
    assert set(parts.tolist()) == set(range(cfg.kafka.partitions))  # every partition carries devices

    receiver = WebhookReceiver(SECRET["TEST_HOOK_SECRET"], free_port()).start()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(url=receiver.url))
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    metrics = {}
    api = {name: free_port() for name in ("alert-a", "alert-b")}
    for name in ("predict-a", "predict-b", "alert-a", "alert-b"):
        c = copy.deepcopy(cfg)
        c.run.dir = str(tmp_path / name)  # nothing shared on disk
        c.alert.rules_path, c.alert.api_port = str(rules), api.get(name, free_port())
        c.alert.api_peers = ",".join(f"127.0.0.1:{port}" for port in api.values())
        metrics[name] = free_port()
        c.predict.metrics_port = c.alert.metrics_port = metrics[name]
        procs[name], logs[name] = start(name.split("-")[0], c, tmp_path, name, defect)
    alerts = Reader(cfg, contract.ALERT_EVENTS)
    predictions = Reader(cfg, contract.PREDICTION_ROWS)
    everyone = {f"pump-{i}" for i in range(DEVICES)}
    try:
        for name, proc in procs.items():
            wait_until(lambda: owns_partitions(logs[name]), 90, f"{name} owning partitions", proc, logs[name])

        producer = Producer(producer_config(cfg))
        topic = contract.WINDOW_ROWS.name(cfg.kafka.topic_prefix)
        produced_at: dict[int, float] = {}
        for t in range(STEPS):
            step = data.slice(t * DEVICES, DEVICES)
            for p in sorted(set(parts[t * DEVICES:(t + 1) * DEVICES].tolist())):
                producer.produce(topic, contract.encode(step.filter(pa.array(parts[t * DEVICES:(t + 1) * DEVICES] == p)),
                                                        contract.WINDOWS), partition=p)
            assert producer.flush(10) == 0
            produced_at[t] = time.time()
            if t == KILL_AT:
                # every device raised an alarm in its first episode; each alerter holds only its partitions'
                # alarms, and either one's API lists them all
                wait_until(lambda: alarm_devices(api["alert-a"])[0] == everyone, 30, "alert-a listing every alarm")
                assert alarm_devices(api["alert-b"])[0] == everyone
                held = [alarm_devices(api[name], local=True)[0] for name in ("alert-a", "alert-b")]
                assert held[0] and held[1] and not held[0] & held[1], held
                for name in ("predict-a", "alert-a"):
                    procs[name].send_signal(signal.SIGKILL)
            time.sleep(PACE_S)

        want = expected_events(base_ms)
        ids = lambda rows: {(r["device_id"], r["transition"], r["ts_ms"]) for r in rows}  # noqa: E731
        deadline = time.monotonic() + 90
        while len(ids(alerts.rows)) < len(want) and time.monotonic() < deadline:
            drain(alerts, 0.5)
        rows = drain(alerts, 3)  # anything extra would come now
        assert ids(rows) == set(want)  # none lost, none raised twice (a lost state re-"raises" or never clears)
        assert len({r["event_id"] for r in rows}) == len(want)  # copies after a replay are the same events
        first_ms = {}
        for r in rows:
            key = (r["device_id"], r["transition"], r["ts_ms"])
            first_ms[key] = min(first_ms.get(key, r["event_ms"]), r["event_ms"])
        delays = {k: first_ms[k] / 1000 - produced_at[step] for k, step in want.items()}
        print(f"alarm delay after the kill: max {max(delays.values()):.1f} s (session timeout "
              f"{cfg.kafka.session_timeout_ms / 1000:.0f} s)")
        assert max(delays.values()) <= cfg.kafka.session_timeout_ms / 1000 + 5, sorted(delays.values())[-5:]

        # the survivor holds every alarm now and says that its peer does not answer
        assert alarm_devices(api["alert-b"]) == (everyone, [f"127.0.0.1:{api['alert-a']}"])

        wait_until(lambda: len(receiver.events) >= len(want), 60, "notifications at the receiver")
        time.sleep(3)
        delivered = [(e["device_id"], e["transition"], e["ts_ms"]) for e in receiver.events]
        assert sorted(delivered) == sorted(want)  # each exactly once

        reference = undisturbed_predictions(cfg, data, parts)
        deadline = time.monotonic() + 90
        while len({(r["device_id"], r["window_end_ms"]) for r in predictions.rows
                   if r["metric"] != contract.DEVICE_METRIC}) < len(reference) and \
                time.monotonic() < deadline:
            drain(predictions, 0.5)
        got = {}
        for r in predictions.rows:  # a window predicted twice (at least once) must agree with itself
            if r["metric"] != contract.DEVICE_METRIC:
                got.setdefault((r["device_id"], r["window_end_ms"]), set()).add((r["forecast_online"], r["anomaly"]))
        assert got.keys() == reference.keys()  # every window predicted
        differ = sorted((k, v, reference[k]) for k, v in got.items() if v != {reference[k]})
        assert not differ, f"{len(differ)} predictions differ from an undisturbed run, e.g. {differ[:3]}"

        # Consumer lag per stage, group, topic and partition, from the survivors' metrics endpoints: each
        # owns every partition now, and has committed all it consumed.
        for name, stage, group in (("predict-b", "predict", "predict"), ("alert-b", "alert", "alerter")):
            group = f"{cfg.kafka.topic_prefix}-{group}"
            src = contract.WINDOW_ROWS.name(cfg.kafka.topic_prefix)
            want_lag = {(stage, group, src, str(p)): 0.0 for p in range(cfg.kafka.partitions)}
            deadline, got = time.monotonic() + 30, {}
            while not want_lag.items() <= got.items() and time.monotonic() < deadline:
                time.sleep(0.5)
                got = lag(metrics[name])
            assert want_lag.items() <= got.items(), got
        for name in ("predict-b", "alert-b"):
            procs[name].send_signal(signal.SIGTERM)
            assert procs[name].wait(30) == 0, logs[name].read_text()[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        alerts.close()
        predictions.close()
        receiver.stop()
