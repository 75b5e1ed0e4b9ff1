"""`aimass backtest`: detectors flagged row by row, evaluation units, and real histories of any age
and span through a private pipeline (every reading stored and scored)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import aimass.backtest as bt
from aimass import cli
from aimass.backtest import (
    alarm_active,
    backtest_config,
    complete,
    alarm_cover,
    detector_flags,
    evaluation_table,
    evaluation_units,
    interval_labels,
    score_detectors,
)
from aimass.core.procs import StackError
from aimass.models.evaluation import evaluate
from aimass.core.config import Config
from tests.conftest import REPO


def test_alarm_is_active_from_raise_to_clear():
    events = pd.DataFrame({"ts_ms": [30, 10, 50], "transition": ["cleared", "raised", "reraised"]})
    ts = np.array([0, 10, 29, 30, 49, 50, 99])
    assert alarm_active(ts, events).tolist() == [False, True, True, False, False, True, True]
    assert alarm_active(ts, events.iloc[:0]).tolist() == [False] * 7


def test_detectors_flag_rows_by_score_and_by_the_rule_on_the_same_series():
    scored = pd.DataFrame({"device_id": ["a"] * 4 + ["b"] * 2, "metric": ["m"] * 6,
                           "ts_ms": [0, 10, 20, 30, 10, 20],
                           "anomaly": [0.1, 0.9, np.nan, 0.8, 0.95, 0.2],
                           "anomaly_triton": [0.0] * 6, "anomaly_level": [1.0] * 6, "anomaly_spread": [0.0] * 6,
                           "anomaly_change": [0.0] * 6, "anomaly_device": [np.nan] * 4 + [0.9] * 2})
    alerts = pd.DataFrame({"rule": ["hot", "hot", "dev", "dev"], "device_id": ["a", "a", "b", "b"],
                           "metric": ["m", "m", "*", "*"], "ts_ms": [10, 30, 20, 30],
                           "transition": ["raised", "cleared", "raised", "cleared"]})
    flags = detector_flags(scored, alerts, threshold=0.8)
    assert flags["model:anomaly"].tolist() == [False, True, False, True, True, False]   # NaN: no detection
    assert flags["model:anomaly_level"].all() and not flags["model:anomaly_triton"].any()
    assert flags["model:anomaly_device"].tolist() == [False] * 4 + [True] * 2
    assert flags["rule:hot"].tolist() == [False, True, True, False, False, False]       # only device a
    assert flags["rule:dev"].tolist() == [False] * 5 + [True]   # a device alarm covers every metric of it
    assert flags["rules:any"].tolist() == [False, True, True, False, False, True]


def test_window_alarms_cover_the_window_they_judged_and_a_reopen_dips_one_reading():
    alerts = pd.DataFrame({"rule": ["dev"] * 4 + ["raw"], "device_id": ["a"] * 5, "metric": ["*"] * 4 + ["m"],
                           "ts_ms": [20_000, 50_000, 50_000, 80_000, 20_000],
                           "transition": ["raised", "cleared", "reraised", "cleared", "raised"]})
    moved = alarm_cover(alerts, {"dev"}, 10)
    assert moved["ts_ms"].tolist() == [10_000, 40_000, 40_001, 70_000, 20_000]  # "raw" is not a window rule
    ts = np.arange(0, 90_000, 1000)
    active = alarm_active(ts, moved[moved["rule"] == "dev"])
    assert ts[active].min() == 10_000 and ts[active].max() == 69_000
    assert not active[ts == 40_000].any() and active[ts == 41_000].all()  # the re-open: one reading unalarmed


def test_wide_files_are_scored_per_device_timestamp_after_the_fitting_rows():
    readings = pd.DataFrame({"device_id": ["p"] * 6 + ["q"] * 2, "metric": ["x", "y"] * 4,
                             "ts_ms": [0, 0, 1, 1, 2, 2, 5, 5], "label": [0, 0, 1, 1, 0, 0, 1, 1],
                             "changepoint": [0, 0, 1, 1, 0, 0, 0, 0], "scored": [True] * 8})
    flags = pd.DataFrame({"model:anomaly": [0, 1, 0, 0, 1, 0, 0, 0]}).astype(bool)
    units = evaluation_units(readings.astype({"label": bool, "changepoint": bool}), flags, wide=True, fit_rows=1)
    assert units[["device_id", "ts_ms", "label", "model:anomaly"]].values.tolist() == [
        ["p", 1, True, False], ["p", 2, False, True]]                                  # q's one row is fitting
    long_units = evaluation_units(readings.astype({"label": bool, "changepoint": bool}), flags, wide=False,
                                  fit_rows=0)
    assert len(long_units) == 8 and long_units["file"].nunique() == 4


def test_evaluation_table_has_a_row_per_detector_and_no_precision_for_a_silent_one():
    ts = np.arange(200, dtype=np.int64) * 1000
    label = (ts >= 100_000) & (ts < 150_000)
    results = {"model:late": evaluate([(ts, label, ts >= 110_000)]), "rule:silent": evaluate([(ts, label, ts < 0)])}
    header, late, silent = evaluation_table(results)
    assert header.split()[:4] == ["detector", "precision", "recall", "F1"]
    assert late.split()[:4] == ["model:late", "0.44", "0.80", "0.57"]           # 40 TP, 50 FP, 10 FN
    assert silent.split()[:6] == ["rule:silent", "-", "0.00", "0.00", "0.0", "100.0"]


def test_interval_labels_match_device_and_named_metric():
    readings = pd.DataFrame({"device_id": ["a", "a", "b"], "metric": ["t", "p", "t"], "ts_ms": [5, 5, 5]})
    labels = pd.DataFrame({"device_id": ["a", "b"], "metric": ["", "p"], "start_ms": [0, 0], "end_ms": [10, 10]})
    assert interval_labels(readings, labels).tolist() == [True, True, False]


def test_private_pipeline_shares_no_port_keeps_history_and_notifies_nobody(tmp_path):
    cfg = Config()
    cfg.run.dir = str(tmp_path)
    private = backtest_config(cfg, "bt1")
    ports = [private.mqtt.port, int(private.kafka.bootstrap.rsplit(":", 1)[1]), private.triton.http_port,
             private.triton.grpc_port, private.triton.metrics_port, private.bridge.metrics_port,
             private.worker.metrics_port, private.predict.metrics_port, private.alert.metrics_port,
             private.clickhouse.metrics_port, private.worker.web_port, private.alert.api_port,
             private.clickhouse.query_port]
    live = [cfg.mqtt.port, 9092, 8000, 8001, 8002, 9101, 9102, 9103, 9104, 9105, 6066, 8080, 9125]
    assert len(set(ports)) == len(ports) and not set(ports) & set(live)
    assert private.run_dir == tmp_path / "backtests" / "bt1" and private.triton.grpc_address() == f"127.0.0.1:{ports[3]}"
    assert private.clickhouse.ttl_days == 0 and private.bridge.max_past_days > 20_000    # no TTL; 1970 on
    assert not private.alert.notify and cfg.alert.notify
    assert private.window.idle_close_s == 60 < cfg.window.idle_close_s          # the largest window: last ones close soon


def test_complete_needs_every_reading_window_and_prediction():
    done = {"stored": 90, "rejected": 10, "reading_windows": 7, "windows": 7, "predictions": 7}
    assert complete(done, 100)
    assert not complete({**done, "stored": 89}, 100)
    assert not complete({**done, "windows": 6}, 100)          # a window still open
    assert not complete({**done, "predictions": 6}, 100)


class QuietPipeline:
    """Stands in for the private pipeline: every reading acknowledged, nothing predicted."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def quiet_backtest(monkeypatch, tmp_path, store: dict[str, int], timeout: str) -> int:
    """`aimass backtest` (the CLI, in process) on 30 readings through a stand-in pipeline whose
    store reports ``store`` and holds no prediction."""
    path = tmp_path / "h.csv"
    pd.DataFrame({"timestamp": np.arange(30) * 1000 + 1_400_000_000_000, "value": 1.0}).to_csv(path, index=False)
    monkeypatch.setenv("AIMASS_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(bt, "Pipeline", QuietPipeline)
    monkeypatch.setattr(bt, "replay", lambda cfg, h, **kw: {"all_acked": True, "messages": len(h), "elapsed_s": 0.1})
    monkeypatch.setattr(bt, "progress", lambda *a: store)
    monkeypatch.setattr(bt.time, "sleep", lambda s: None)
    no_predictions = pd.DataFrame(columns=["device_id", "metric", "window_end_ms", "target_end_ms", *bt.SCORE_COLUMNS,
                                           "regime_change", "forecast", "band_low", "band_high"])
    no_alerts = pd.DataFrame(columns=["rule", "device_id", "metric", "ts_ms", "transition"])
    no_rejects = pd.DataFrame(columns=["device_id", "metric", "ts_ms", "reason"])
    monkeypatch.setattr(bt, "fetch", lambda *a: (no_predictions, no_alerts, no_rejects))
    return cli.main(["backtest", str(path), "--device", "d", "--metric", "m", "--timeout", timeout,
                     "--out", str(tmp_path / "out.csv")])


def test_a_backtest_timeout_exits_1_and_says_what_is_missing(monkeypatch, tmp_path, capsys):
    store = {"stored": 30, "rejected": 0, "reading_windows": 3, "windows": 2, "predictions": 2}
    assert quiet_backtest(monkeypatch, tmp_path, store, "0") == 1
    assert "aimass backtest: backtest timed out after 0s: 30 of 30 readings stored or rejected, 2 of 3 windows " \
           "closed, 2 of 2 windows predicted" in capsys.readouterr().err


def test_a_backtest_that_scores_nothing_exits_1_and_says_so(monkeypatch, tmp_path, capsys):
    store = {"stored": 30, "rejected": 0, "reading_windows": 3, "windows": 3, "predictions": 3}
    assert quiet_backtest(monkeypatch, tmp_path, store, "60") == 1
    assert "aimass backtest: nothing was scored: 3 predictions for 30 readings" in capsys.readouterr().err


def test_a_labels_file_scores_every_detector_and_each_labelled_event(tmp_path, capsys):
    """`--labels FILE`: intervals (no metric: all of the device's) re-tenanted to the backtest's."""
    ts = np.arange(100) * 1000 + 1_400_000_000_000
    history = pd.DataFrame({"device_id": "d", "metric": "m", "ts_ms": ts, "value": 1.0})
    hot = (ts >= ts[40]) & (ts <= ts[49])
    result = history.assign(**{c: np.nan for c in bt.SCORE_COLUMNS}).assign(anomaly=np.where(hot, 0.9, 0.1))
    alerts = pd.DataFrame({"rule": "high", "device_id": "d", "metric": "m", "ts_ms": [ts[42], ts[55]],
                           "transition": ["raised", "cleared"], "tenant": "bt1"})
    alerts["ts"] = alerts["ts_ms"]
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"device_id": ["d"], "start_ms": [ts[40]], "end_ms": [ts[49]]}).to_csv(labels, index=False)
    args = argparse.Namespace(labels=str(labels), fit_rows=0, nab_window_s=60.0)
    out = score_detectors(args, history, result, alerts, "bt1", Config())
    model, rule = out["evaluation"]["model:anomaly"]["outlier"], out["evaluation"]["rule:high"]["outlier"]
    assert (model["tp"], model["fp"], model["fn"]) == (10, 0, 0)
    assert (rule["tp"], rule["fp"], rule["fn"]) == (8, 5, 2)              # active from 42 s to 54 s
    events = {e["rule"]: e for e in out["events"]}
    assert (events["high"]["true_positives"], events["high"]["mean_delay_s"]) == (1, 2.0)
    printed = capsys.readouterr().out
    assert "model:anomaly" in printed and "labelled events" in printed
    pd.DataFrame({"device": ["d"]}).to_csv(labels, index=False)
    with pytest.raises(StackError, match=r"lacks columns \['device_id', 'end_ms', 'start_ms'\]"):
        score_detectors(args, history, result, alerts, "bt1", Config())


def history(tmp_path) -> tuple[str, pd.DataFrame]:
    """Two devices in one wide file: 'dense' in 2013 at 1 s with a labelled level shift, and
    'sparse' every 12 h over two years (730 daily partitions, far past any TTL)."""
    rng = np.random.default_rng(3)
    dense_ts = pd.date_range("2013-05-01 00:00:00", periods=900, freq="s")
    shift = (np.arange(900) >= 600) & (np.arange(900) < 720)
    dense = pd.DataFrame({"datetime": dense_ts, "device": "dense", "flow": 10 + rng.normal(0, 0.1, 900) + 5 * shift,
                          "valve": 2 + rng.normal(0, 0.05, 900), "anomaly": shift.astype(float)})
    sparse_ts = pd.date_range("2012-01-01", "2013-12-31", freq="12h")
    sparse = pd.DataFrame({"datetime": sparse_ts, "device": "sparse", "flow": 10 + rng.normal(0, 0.1, len(sparse_ts)),
                           "valve": 2.0, "anomaly": 0.0})
    frame = pd.concat([dense, sparse]).sort_values("datetime")
    path = tmp_path / "history.csv"
    frame.to_csv(path, sep=";", index=False)
    return str(path), frame


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_backtest_of_old_long_history_stores_and_scores_every_reading(tmp_path):
    path, frame = history(tmp_path)
    report = tmp_path / "report.json"
    env = {**os.environ, "AIMASS_RUN_DIR": str(tmp_path / "run")}
    r = subprocess.run([sys.executable, "-m", "aimass.cli", "backtest", path, "--fit-rows", "100",
                        "--report", str(report), "--out", str(tmp_path / "out.parquet"), "--timeout", os.environ.get("BT_TIMEOUT", "600")],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=840)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(report.read_text())
    readings = 2 * len(frame)
    assert doc["readings"] == readings and doc["scored"] == readings, doc
    assert doc["unscored"] == 0 and doc["rejected"] == 0 and doc["store"]["stored"] == readings
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert len(out) == readings and out["anomaly"].notna().all()
    assert set(out["device_id"]) == {"dense", "sparse"} and out["ts_ms"].min() < 1_330_000_000_000  # 2012
    # Scored per device and timestamp, after each device's 100 fitting rows.
    assert doc["units"] == len(frame) - 200 and doc["unscored_units"] == 0
    evaluation = doc["evaluation"]
    assert {"model:anomaly", "model:anomaly_triton", "model:anomaly_device", "rules:any"} <= set(evaluation)
    outlier = evaluation["model:anomaly"]["outlier"]
    assert outlier["tp"] + outlier["fn"] == 120                    # the labelled shift, row by row
    assert outlier["tp"] + outlier["fp"] + outlier["fn"] + outlier["tn"] == doc["units"]
    assert "nab_skab" in evaluation["rules:any"] and "delay" in evaluation["rules:any"]
    assert "detector" in r.stdout and "NAB" in r.stdout
    assert not (tmp_path / "run" / "backtests").exists() or not any((tmp_path / "run" / "backtests").iterdir())


def test_backtest_help_names_the_evaluation_options():
    r = subprocess.run([sys.executable, "-m", "aimass.cli", "backtest", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    assert all(opt in r.stdout for opt in ("--labels", "--fit-rows", "--nab-window-s", "--report", "--timeout"))
