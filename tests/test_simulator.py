"""The device simulator: offline generation (pure) and live publishing to a real Mosquitto."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from aimass.core import contract
from aimass.core.config import MQTT_HEADER_ALLOWANCE
from aimass.streams.payloads import Limits, Rejected, parse_label, parse_telemetry
from aimass.streams.simulator import METRICS, Chaos, SimSpec, chaos_messages, generate, publish
from tests.conftest import REPO, make_config
from tests.fixtures_ingest import config_env
from tests.fixtures_mqtt import Collector

START_MS = 1_700_000_000_000


def test_generate_is_deterministic_and_matches_the_contract():
    a, la = generate(4, 3, duration_s=120, rate_hz=2, seed=7, anomalies=4, start_ms=START_MS)
    b, lb = generate(4, 3, duration_s=120, rate_hz=2, seed=7, anomalies=4, start_ms=START_MS)
    c, _ = generate(4, 3, duration_s=120, rate_hz=2, seed=8, anomalies=4, start_ms=START_MS)
    assert a.schema.equals(contract.READINGS) and la.schema.equals(contract.LABELS)
    assert a.equals(b) and la.equals(lb) and not a.equals(c)
    assert a.num_rows == 4 * 3 * 240
    ts = a.column("ts_ms").to_numpy()
    assert (np.diff(ts) >= 0).all() and ts[0] == START_MS and ts[-1] == START_MS + 239 * 500
    assert set(a.column("metric").to_pylist()) == set(list(METRICS)[:3])
    units = {r["metric"]: r["unit"] for r in a.slice(0, 3).to_pylist()}
    assert units == {m: METRICS[m].unit for m in units}
    assert np.isfinite(a.column("value").to_numpy()).all()


def series(readings, device: str, metric: str):
    mask = pc.and_(pc.equal(readings["device_id"], device), pc.equal(readings["metric"], metric))
    t = readings.filter(mask)
    return t.column("ts_ms").to_numpy(), t.column("value").to_numpy()


def test_injected_anomalies_are_labelled_and_visible_in_the_signal():
    readings, labels = generate(3, ["temp", "power"], duration_s=600, rate_hz=1, seed=3, anomalies=8,
                                start_ms=START_MS)
    baseline, _ = generate(3, ["temp", "power"], duration_s=600, rate_hz=1, seed=3, anomalies=0, start_ms=START_MS)
    assert labels.num_rows == 8
    assert sorted(set(labels.column("kind").to_pylist())) == ["drift", "level_shift", "spike", "stuck"]
    assert set(labels.column("source").to_pylist()) == {"simulator"}
    for label in labels.to_pylist():
        ts, v = series(readings, label["device_id"], label["metric"])
        inside = (ts >= label["start_ms"]) & (ts < label["end_ms"])
        assert inside.any()
        if label["kind"] == "stuck":
            assert np.ptp(v[inside]) == 0.0
        elif label["kind"] in ("spike", "level_shift"):
            noise = METRICS[label["metric"]].noise_sd
            # same seed without anomalies differs in noise draws, so compare against the local level
            outside = v[~inside][:50]
            assert abs(v[inside].mean() - outside.mean()) > abs(label["magnitude"]) / 2 - 10 * noise
        else:  # drift ramps up to its magnitude
            assert abs(v[inside][-1] - v[inside][0]) > abs(label["magnitude"]) / 3
    assert baseline.num_rows == readings.num_rows


def test_dropouts_remove_readings_but_never_hide_an_anomaly():
    full, _ = generate(5, 2, duration_s=600, rate_hz=1, seed=1, start_ms=START_MS)
    sparse, labels = generate(5, 2, duration_s=600, rate_hz=1, seed=1, dropout=0.2, anomalies=6, start_ms=START_MS)
    assert 0.5 * full.num_rows < sparse.num_rows < full.num_rows
    for label in labels.to_pylist():
        ts, _ = series(sparse, label["device_id"], label["metric"])
        assert ((ts >= label["start_ms"]) & (ts < label["end_ms"])).any()


@pytest.mark.integration
@pytest.mark.parametrize("fmt, pack_size", [("json", 1), ("multi", 1), ("senml", 4)])
def test_live_publish_sends_every_reading_stamped_with_the_wall_clock(mosquitto, tmp_path, fmt, pack_size):
    cfg = make_config(tmp_path, mosquitto)
    cfg.mqtt.topic_pattern = f"sim-{fmt}/{{tenant}}/{{device_id}}/telemetry"
    cfg.mqtt.labels_pattern = f"sim-{fmt}/{{tenant}}/{{device_id}}/labels"
    spec = SimSpec(devices=3, metrics=2, rate_hz=20, duration_s=2, tenant="live", format=fmt, pack_size=pack_size,
                   anomalies=2, publish_labels=True)
    with Collector(cfg, f"sim-{fmt}/#") as sub:
        before = int(time.time() * 1000)
        summary = publish(cfg, spec, labels_path=tmp_path / "labels.parquet")
        after = int(time.time() * 1000)
        got = sub.wait_for(summary["messages"] + summary["labels_published"])
    assert summary["all_acked"] and summary["readings"] == 3 * 2 * 40
    telemetry = [(t, p) for t, p in got if t.endswith("/telemetry")]
    assert len(telemetry) == summary["messages"]
    readings = [r for _, p in telemetry for r in parse_telemetry(p, after, Limits())]
    assert len(readings) == summary["readings"]
    assert all(before <= ts_ms <= after for _, ts_ms, _, _ in readings)
    labels = [parse_label(p, after, Limits()) for t, p in got if t.endswith("/labels")]
    assert len(labels) == summary["labels_published"]
    written = pq.read_table(tmp_path / "labels.parquet")
    assert written.schema.equals(contract.LABELS) and written.num_rows == summary["labels"]


def test_cli_offline_writes_readings_and_labels(tmp_path):
    out, labels = tmp_path / "readings.parquet", tmp_path / "labels.csv"
    proc = subprocess.run([sys.executable, "-m", "aimass.cli", "simulate", "--devices", "2", "--metrics", "temp,power",
                           "--duration", "30", "--rate", "2", "--anomalies", "2", "--out", str(out),
                           "--labels", str(labels)], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=config_env(make_config(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert pq.read_table(out).num_rows == 2 * 2 * 60
    assert pacsv.read_csv(labels).num_rows == 2
    assert "wrote 240 readings" in proc.stdout


def test_cli_help_lists_every_option():
    proc = subprocess.run([sys.executable, "-m", "aimass.cli", "simulate", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    for option in ("--devices", "--metrics", "--rate", "--duration", "--seed", "--qos", "--format", "--pack-size",
                   "--anomalies", "--dropout", "--labels", "--publish-labels", "--out", "--skewed-devices", "--skew",
                   "--drift", "--reorder", "--late", "--resend", "--outages", "--outage-s", "--oversized",
                   "--malformed"):
        assert option in proc.stdout


def test_unknown_metric_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown metrics"):
        generate(1, ["temp", "nope"], duration_s=10)


# --- chaos: the generator's promises, pure ----------------------------------------------

CHAOS_SPEC = SimSpec(devices=4, metrics=["temp", "power"], rate_hz=5, duration_s=60, seed=2, format="senml")


def sent_order_verdicts(messages, lateness_ms: int) -> list[str]:
    """Per message: "late" when its series already saw a reading more than the lateness newer, else "ok"."""
    newest: dict[tuple[str, str], int] = {}
    out = []
    for m in messages:
        late = any(ts < newest.get((m.device, metric), ts) - lateness_ms for metric, ts, _, _ in m.readings)
        out.append("late" if late else "ok")
        for metric, ts, _, _ in m.readings:
            newest[(m.device, metric)] = max(ts, newest.get((m.device, metric), ts))
    return out


def test_chaos_off_is_the_plain_run_in_time_order():
    messages = chaos_messages(CHAOS_SPEC, Chaos(), START_MS)
    readings, _ = generate(4, ["temp", "power"], duration_s=60, rate_hz=5, seed=2, start_ms=START_MS)
    assert len(messages) == 4 * 300 and not any(m.effects for m in messages)
    ids = [(m.device, metric, ts) for m in messages for metric, ts, _, _ in m.readings]
    assert sorted(ids) == sorted(zip(readings["device_id"].to_pylist(), readings["metric"].to_pylist(),
                                     readings["ts_ms"].to_pylist()))
    assert all(START_MS + m.send_ms == m.readings[0][1] for m in messages)
    assert chaos_messages(CHAOS_SPEC, Chaos(), START_MS) == messages  # deterministic


def test_skewed_clocks_are_fixed_plus_drift_on_the_chosen_devices_only():
    chaos = Chaos(skewed_devices=1, skew_s=30, drift_s_per_min=6, seed=4)
    messages = chaos_messages(CHAOS_SPEC, chaos, START_MS)
    skewed = {m.device for m in messages if "skewed" in m.effects}
    assert len(skewed) == 1
    for m in messages:
        offset = m.readings[0][1] - (START_MS + m.send_ms)
        if m.device in skewed:  # +30 s, plus 6 s per minute of run
            assert offset == round(30_000 + 6 * m.send_ms / 60)
        else:
            assert offset == 0
    assert len({(m.device, r[0], r[1]) for m in messages for r in m.readings}) == 4 * 300 * 2


def test_reordered_messages_stay_within_the_lateness_and_late_ones_go_beyond():
    chaos = Chaos(reorder=0.1, late=0.05, lateness_s=1.0, seed=1)
    messages = chaos_messages(CHAOS_SPEC, chaos, START_MS)
    counts = {e: sum(e in m.effects for m in messages) for e in ("reordered", "late")}
    assert counts["reordered"] > 50 and counts["late"] > 20, counts
    verdicts = sent_order_verdicts(messages, 1000)
    for m, verdict in zip(messages, verdicts):
        assert verdict == ("late" if "late" in m.effects else "ok"), m
    # reordered: really sent after newer readings of its series
    ts_sent = [(m.device, m.readings[0][1]) for m in messages]
    assert any(ts_sent[i][1] < max(t for d, t in ts_sent[:i] if d == ts_sent[i][0])
               for i, m in enumerate(messages) if "reordered" in m.effects)


def test_resent_copies_repeat_their_original_soon_after_it():
    chaos = Chaos(resend=0.1, lateness_s=1.0, seed=3)
    messages = chaos_messages(CHAOS_SPEC, chaos, START_MS)
    copies = [m for m in messages if "resent" in m.effects]
    assert len(copies) > 50
    originals = {(m.device, m.payload): m.send_ms for m in messages if "resent" not in m.effects}
    for c in copies:
        assert 0 <= c.send_ms - originals[(c.device, c.payload)] < 500
    firsts = [(m.device, r[0], r[1]) for m in messages if "resent" not in m.effects for r in m.readings]
    assert len(firsts) == len(set(firsts))  # only the copies repeat an identity
    verdicts = sent_order_verdicts([m for m in messages if "resent" not in m.effects], 1000)
    assert set(verdicts) == {"ok"}


def test_an_outage_sends_its_backlog_in_one_burst_in_order():
    chaos = Chaos(outages=1, outage_s=8, seed=5)
    messages = chaos_messages(CHAOS_SPEC, chaos, START_MS)
    burst = [m for m in messages if "burst" in m.effects]
    assert len(burst) == 8 * 5 and len({m.device for m in burst}) == 1 and len({m.send_ms for m in burst}) == 1
    stamps = [m.readings[0][1] for m in burst]
    assert stamps == sorted(stamps) and 0 < burst[0].send_ms - (stamps[-1] - START_MS) <= 200
    assert set(sent_order_verdicts(messages, 1000)) == {"ok"}  # late for other series' watermarks, not its own


def test_oversized_and_malformed_messages_are_rejected_by_the_parser():
    chaos = Chaos(oversized=3, malformed=7, max_payload_bytes=4096, seed=6)
    messages = chaos_messages(CHAOS_SPEC, chaos, START_MS)
    bad = [m for m in messages if m.effects and m.effects[0] in ("oversized", "malformed")]
    assert sorted(m.effects[0] for m in bad) == ["malformed"] * 7 + ["oversized"] * 3
    limits = Limits(max_payload_bytes=4096)
    for m in bad:
        assert not m.readings
        with pytest.raises(Rejected) as err:
            parse_telemetry(m.payload, START_MS + m.send_ms, limits)
        assert (err.value.reason == "too_large") == ("oversized" in m.effects), (m.effects, err.value.reason)
        if "oversized" in m.effects:
            assert len(m.payload) < 4096 + MQTT_HEADER_ALLOWANCE  # the broker still takes it
