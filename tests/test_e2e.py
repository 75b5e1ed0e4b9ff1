"""End to end with exact accounting: simulator -> MQTT -> bridge -> Kafka -> workers -> predict ->
alerter -> sink -> chDB, every stage a real process, every server real.

Stated guarantees checked here:
- every published reading is in ClickHouse exactly once or in the dead-letter topic with a reason
  (by identity, raw rows: ``tests.accounting``), every closed 2 s window it implies is stored once
  with exactly one prediction, and every alarm event is stored once with no raise or clear missing;
- every injected spike or level shift of at least 1.5x the metric's typical anomaly size, and every
  stuck sensor of at least 4 s, that starts after the 20 s warm-up (and not within the z-score's
  60 s history after another anomaly of its series) is alerted on its own series within 10 s (by the
  window rules, or by the rejects rule when its readings leave the sensor's range: whether a power
  spike does depends on the time of day, the simulator's daily cycle);
- series without an injected anomaly raise no alarm;
- every alarm event that notifies reaches the webhook receiver, signed, exactly once.
"""
from __future__ import annotations

import subprocess
import time

import pytest
import pyarrow.parquet as pq

from aimass.core.procs import free_port
from aimass.streams.simulator import METRICS, Chaos, SimSpec, chaos_messages, publish
from aimass.rules.alarms import should_notify
from tests.accounting import alarm_events, check_anomalies_alerted, qualifying_anomalies
from tests.pipeline_harness import TestPipeline, pipeline_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WARM_UP_S = 20
MAX_DELAY_S = 10
STUCK_MIN_S = 4  # a stuck sensor is alerted once one whole 2 s window is flat
MALFORMED = [b"not json", b'{"ts": 1, "metric": "temp", "value": "NaN"}', b'{"metric": "temp", "value": Infinity}']


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, mosquitto, kafka, triton):
    tmp = tmp_path_factory.mktemp("e2e")
    port = free_port()
    p = TestPipeline(pipeline_config(tmp, mosquitto, kafka, triton, port), webhook_port=port).start()
    yield p
    p.stop()


def test_every_reading_accounted_for_and_anomalies_alerted(pipeline, tmp_path):
    cfg = pipeline.cfg
    tenant = "e2e"
    # Seed 12 leaves qualifying anomalies of every alerted kind (two spikes, a level shift, two stuck sensors).
    spec = SimSpec(devices=6, metrics=["temp", "power"], rate_hz=5, duration_s=70, seed=12, tenant=tenant,
                   anomalies=8, format="senml", pack_size=10)
    for payload in MALFORMED:
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(cfg.mqtt.port), "-q", "1",
                        "-t", f"aimass/{tenant}/dev-bad/telemetry", "-m", payload], check=True, timeout=10)
    sim_start = int(time.time() * 1000)
    sent: set = set()
    summary = publish(cfg, spec, labels_path=tmp_path / "labels.parquet", sent=sent)
    assert summary["all_acked"] and len(sent) == summary["readings"]

    # 1. Exact accounting by identity: readings, windows, predictions, alarm events.
    pipeline.account(tenant, sent, extra_rejects=len(MALFORMED))
    bridge = pipeline.query(f"SELECT hex(payload) AS payload, reason FROM {{db}}.rejects WHERE tenant = '{tenant}' "
                            "AND stage = 'bridge'").to_pylist()
    assert sorted(bytes.fromhex(r["payload"]) for r in bridge) == sorted(MALFORMED), bridge
    assert all(r["reason"] for r in bridge), bridge

    # 2. Detection: sizeable anomalies after warm-up are alerted on their own series in time.
    labels = pq.read_table(tmp_path / "labels.parquet").to_pylist()
    alerts = settled_alerts(pipeline, tenant)
    history_ms = cfg.window.zscore_history * 2000  # the z-score's history, 2 s windows
    stated = qualifying_anomalies(labels, sim_start + WARM_UP_S * 1000, history_ms,
                                  lambda metric: 1.5 * METRICS[metric].scale, STUCK_MIN_S * 1000)
    assert {lab["kind"] for lab in stated} == {"spike", "level_shift", "stuck"}, stated
    check_anomalies_alerted(stated, alerts, MAX_DELAY_S * 1000 + 2000)

    # 3. Series without an injected anomaly raise no alarm.
    raised = [a for a in alerts if a["transition"] in ("raised", "reraised")]
    anomalous = {(lab["device_id"], lab["metric"]) for lab in labels}
    false_alarms = [a for a in raised if (a["device_id"], a["metric"]) not in anomalous]
    for a in false_alarms:
        print("false alarm", a, series_windows(pipeline, tenant, a["device_id"], a["metric"], sim_start))
    assert not false_alarms, false_alarms

    # 4. Every notifying alarm event reached the webhook, signed, exactly once.
    deadline = time.monotonic() + 30
    notified = {a["event_id"] for a in alerts if should_notify(a)}
    assert notified, "no alarm event notifies: this check would pass on nothing"
    while not notified <= {e["event_id"] for e in pipeline.receiver.events} and time.monotonic() < deadline:
        time.sleep(1)
    received = [e["event_id"] for e in pipeline.receiver.events]
    assert notified <= set(received), (notified - set(received), pipeline.logs())
    assert len(received) == len(set(received)), "an event was acted on twice"
    assert pipeline.receiver.bad_signatures == 0


def test_chaos_every_reading_accounted_for(pipeline):
    """Skewed clocks, reordering, late and re-sent messages, an outage's burst, oversized and
    malformed messages: what is on time is stored (windows, predictions too), the rest rejected
    with its reason."""
    cfg, tenant = pipeline.cfg, "chaos"
    chaos = Chaos(skewed_devices=1, skew_s=30, drift_s_per_min=3, reorder=0.05, late=0.02, resend=0.05, outages=1,
                  outage_s=8, oversized=2, malformed=3, lateness_s=cfg.clean.allowed_lateness_s,
                  max_payload_bytes=cfg.bridge.max_payload_bytes, seed=7)
    spec = SimSpec(devices=6, metrics=["temp", "power"], rate_hz=5, duration_s=40, seed=3, tenant=tenant,
                   format="senml", chaos=chaos)
    sent: set = set()
    summary = publish(cfg, spec, sent=sent)
    assert summary["all_acked"] and all(summary["chaos"].values()), summary
    messages = chaos_messages(spec, chaos, summary["start_ms"])
    late = {(tenant, m.device, r[0], r[1]) for m in messages if "late" in m.effects and "resent" not in m.effects
            for r in m.readings}
    copies = {(tenant, m.device, r[0], r[1]) for m in messages if "resent" in m.effects for r in m.readings}
    ledger = pipeline.account(tenant, sent, extra_rejects=len(copies) + chaos.oversized + chaos.malformed)
    on_time = sent - late
    assert set(ledger.stored) == on_time, (f"{len(on_time - set(ledger.stored))} on-time readings not stored, e.g. "
                                           f"{sorted(on_time - set(ledger.stored))[:3]}; rejected as "
                                           f"{ledger.reasons()}")
    assert all("clean:late" in ledger.rejected.get(i, ()) for i in late), ledger.reasons()
    assert all(ledger.rejected.get(i) for i in copies), "a re-sent copy was neither stored nor rejected"
    bridge = pipeline.query(f"SELECT reason FROM {{db}}.rejects WHERE tenant = '{tenant}' AND stage = 'bridge'")
    assert len(bridge) == chaos.oversized + chaos.malformed
    assert bridge.column("reason").to_pylist().count("too_large") == chaos.oversized


def series_windows(pipeline: TestPipeline, tenant: str, device: str, metric: str, since_ms: int) -> list[tuple]:
    """(seconds after ``since_ms`` of the window end, count, mean, zscore) of a series' 2 s windows: why it alarmed."""
    rows = pipeline.query("SELECT toUnixTimestamp64Milli(window_end_at) AS e, `count` AS c, mean, zscore "
                          f"FROM {{db}}.windows FINAL WHERE tenant = '{tenant}' AND device_id = '{device}' "
                          f"AND metric = '{metric}' AND window_s = 2 ORDER BY e").to_pylist()
    return [((r["e"] - since_ms) / 1000, r["c"], round(r["mean"], 3), round(r["zscore"], 2)) for r in rows]


def settled_alerts(pipeline: TestPipeline, tenant: str, settle_s: float = 6, timeout_s: float = 40) -> list[dict]:
    """The tenant's stored alarm events (raw rows) once their number stopped changing (they trail the readings)."""
    deadline, last, since = time.monotonic() + timeout_s, None, time.monotonic()
    while time.monotonic() < deadline:
        alerts = alarm_events(pipeline.query, tenant)
        if last is None or len(alerts) != len(last):
            last, since = alerts, time.monotonic()
        elif time.monotonic() - since > settle_s:
            break
        time.sleep(1)
    return last
