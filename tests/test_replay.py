"""`aimass replay`: loading CSV/Parquet history and publishing it in event-time order."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pandas as pd
import pytest

from aimass.core.procs import StackError
from aimass.core import contract
from aimass.streams.history_replay import load_history, replay
from aimass.streams.payloads import Limits, parse_telemetry
from tests.conftest import REPO, make_config
from tests.fixtures_ingest import BridgeProcess, config_env, isolate, read_records, rows_of
from tests.fixtures_mqtt import Collector

T0_S = 1_700_000_000


def test_csv_in_seconds_is_sorted_by_event_time_and_named_on_the_command_line(tmp_path):
    path = tmp_path / "h.csv"
    pd.DataFrame({"timestamp": [T0_S + 2, T0_S, T0_S + 1, T0_S], "value": [3.0, 1.0, 2.0, 1.5]}).to_csv(path,
                                                                                                       index=False)
    h = load_history(path, device="pump-1", metric="flow", unit="l/s")
    assert h["ts_ms"].tolist() == [T0_S * 1000, T0_S * 1000, (T0_S + 1) * 1000, (T0_S + 2) * 1000]
    assert h["value"].tolist() == [1.0, 1.5, 2.0, 3.0]  # stable: equal timestamps keep file order
    assert set(h["device_id"]) == {"pump-1"} and set(h["unit"]) == {"l/s"}


def test_parquet_with_datetimes_device_and_metric_columns(tmp_path):
    path = tmp_path / "h.parquet"
    pd.DataFrame({
        "time": pd.to_datetime(["2023-11-14T22:13:21Z", "2023-11-14T22:13:20.5Z"], format="ISO8601"),
        "reading": [5, 6], "device": ["a", "b"], "sensor": ["temp", "hum"], "unit": ["Cel", "%RH"],
    }).to_parquet(path)
    h = load_history(path)
    assert h.to_dict("records") == [
        {"device_id": "b", "metric": "hum", "ts_ms": 1_700_000_000_500, "value": 6.0, "unit": "%RH"},
        {"device_id": "a", "metric": "temp", "ts_ms": 1_700_000_001_000, "value": 5.0, "unit": "Cel"},
    ]


def test_wide_semicolon_file_has_a_metric_per_column_and_keeps_its_labels(tmp_path):
    """SKAB's shape: `;`-separated, local datetimes, one column per sensor, per-row labels."""
    path = tmp_path / "skab.csv"
    path.write_text("datetime;Accelerometer1RMS;Volume Flow RateRMS;anomaly;changepoint\n"
                    "2020-03-09 10:14:34;0.5;32.0;1.0;1.0\n"
                    "2020-03-09 10:14:33;0.25;31.0;0.0;0.0\n")
    h = load_history(path, device="pump-1")
    assert h.attrs["wide"] is True
    assert h[["metric", "ts_ms", "value", "anomaly", "changepoint"]].to_dict("records") == [
        {"metric": "Accelerometer1RMS", "ts_ms": 1_583_748_873_000, "value": 0.25, "anomaly": 0.0, "changepoint": 0.0},
        {"metric": "Volume_Flow_RateRMS", "ts_ms": 1_583_748_873_000, "value": 31.0, "anomaly": 0.0, "changepoint": 0.0},
        {"metric": "Accelerometer1RMS", "ts_ms": 1_583_748_874_000, "value": 0.5, "anomaly": 1.0, "changepoint": 1.0},
        {"metric": "Volume_Flow_RateRMS", "ts_ms": 1_583_748_874_000, "value": 32.0, "anomaly": 1.0, "changepoint": 1.0},
    ]
    assert set(h["device_id"]) == {"pump-1"}
    with pytest.raises(StackError, match="--device-column"):
        load_history(path)                                   # one device per file needs a name


def test_missing_columns_and_bad_ids_are_clear_errors(tmp_path):
    path = tmp_path / "h.csv"
    pd.DataFrame({"when": [1], "value": [1.0]}).to_csv(path, index=False)
    with pytest.raises(StackError, match="--ts-column"):
        load_history(path, device="d", metric="m")
    pd.DataFrame({"ts": [T0_S], "value": [1.0], "device": ["bad id"]}).to_csv(path, index=False)
    with pytest.raises(StackError, match="invalid device ids"):
        load_history(path, metric="m")
    with pytest.raises(StackError, match="does not exist"):
        load_history(tmp_path / "nope.csv")


@pytest.mark.integration
def test_replay_keeps_event_time_order_and_paces_at_the_speed_up(mosquitto, tmp_path):
    cfg = make_config(tmp_path, mosquitto)
    cfg.mqtt.topic_pattern = "replay-pace/{tenant}/{device_id}/telemetry"
    ts = [T0_S * 1000 + i * 100 for i in range(40)]  # 3.9 s of history
    history = pd.DataFrame({"device_id": ["a", "b"] * 20, "metric": "temp", "ts_ms": ts,
                            "value": [float(i) for i in range(40)], "unit": "Cel"})
    history.loc[5, "value"] = float("nan")  # a gap in the history: skipped, counted
    with Collector(cfg, "replay-pace/#") as sub:
        start = time.monotonic()
        summary = replay(cfg, history, tenant="hist", speed=4)
        elapsed = time.monotonic() - start
        got = sub.wait_for(39)
    assert summary["all_acked"] and summary["messages"] == 39 and summary["skipped_non_finite"] == 1
    assert elapsed >= 3.9 / 4 - 0.05  # paced by event time, not as fast as possible
    received = [(topic.split("/")[2], ts_ms, value) for topic, p in got
                for _, ts_ms, value, _ in parse_telemetry(p, ts[-1], Limits(max_past_ms=10**13))]
    assert received == [(d, t, v) for d, t, v in zip(history["device_id"], ts, history["value"]) if v == v]


@pytest.mark.integration
def test_replayed_history_reaches_kafka_through_the_bridge(cfg, tmp_path):
    cfg = isolate(cfg)
    now_s = int(time.time())
    path = tmp_path / "history.csv"
    pd.DataFrame({"ts": [now_s - 600 + i for i in range(300)], "value": [i / 10 for i in range(300)],
                  "device_id": [f"h{i % 3}" for i in range(300)]}).to_csv(path, index=False)
    with BridgeProcess(cfg, "replay-bridge", tmp_path / "bridge.log") as bridge:
        summary = replay(cfg, load_history(path, metric="level", unit="m"), tenant="hist")
        rows = rows_of(read_records(cfg, contract.RAW, 300))
        bridge.terminate()
    assert summary["messages"] == 300
    assert sorted((r["device_id"], r["ts_ms"], r["value"], r["unit"]) for r in rows) == sorted(
        (f"h{i % 3}", (now_s - 600 + i) * 1000, i / 10, "m") for i in range(300))


@pytest.mark.integration
def test_cli_replays_a_file_and_prints_a_summary(mosquitto, tmp_path):
    cfg = make_config(tmp_path, mosquitto)
    cfg.mqtt.topic_pattern = "replay-cli/{tenant}/{device_id}/telemetry"
    path = tmp_path / "h.csv"
    pd.DataFrame({"time": [f"2023-11-14T22:13:{s:02d}Z" for s in range(20)], "value": range(20)}).to_csv(
        path, index=False)
    with Collector(cfg, "replay-cli/#") as sub:
        proc = subprocess.run([sys.executable, "-m", "aimass.cli", "replay", str(path), "--device", "pump-1",
                               "--metric", "flow", "--unit", "l/s", "--tenant", "plant"], cwd=REPO,
                              env=config_env(cfg), capture_output=True, text=True, timeout=60)
        got = sub.wait_for(20)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["messages"] == 20 and summary["all_acked"]
    assert [t for t, _ in got] == ["replay-cli/plant/pump-1/telemetry"] * 20
    assert [parse_telemetry(p, T0_S * 1000, Limits())[0][1] for _, p in got] == [
        (T0_S - 20 + s) * 1000 for s in range(20)]  # 22:13:20 is T0_S
