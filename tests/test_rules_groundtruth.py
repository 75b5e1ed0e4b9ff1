"""Prediction/actual join (either arrival order, replays, expiry) and live quality vs labels, hand-computed."""
from __future__ import annotations

import math

import pytest

from aimass.rules.groundtruth import OutcomeJoiner, QualityTracker
from tests.fixtures_rules import labels, predictions, windows


def test_join_in_either_order_with_residual_and_band():
    j = OutcomeJoiner(horizon_s=600)
    # prediction first, its window later
    assert j.add_predictions(predictions(dict(window_end_ms=10_000, target_end_ms=20_000, forecast=20.0,
                                              band_low=19.0, band_high=21.0))).num_rows == 0
    out = j.add_windows(windows(dict(window_end_ms=20_000, mean=25.0), dict(window_end_ms=30_000, mean=-4.0)))
    [row] = out.to_pylist()
    assert (row["target_end_ms"], row["actual"], row["residual"], row["in_band"]) == (20_000, 25.0, 5.0, False)
    assert row["rel_error"] == pytest.approx(5 / 25)
    # window first (30 s), its prediction later
    [row] = j.add_predictions(predictions(dict(window_end_ms=20_000, target_end_ms=30_000, forecast=-3.5,
                                               band_low=-5.0, band_high=-3.0))).to_pylist()
    assert (row["actual"], row["residual"], row["in_band"]) == (-4.0, -0.5, True)
    assert row["rel_error"] == pytest.approx(0.5 / 4)
    assert j.predictions.num_rows == 0


def test_series_and_window_sizes_do_not_mix():
    j = OutcomeJoiner()
    j.add_predictions(predictions(dict(target_end_ms=60_000, window_s=60, forecast=1.0),
                                  dict(target_end_ms=60_000, device_id="pump-2", forecast=2.0)))
    out = j.add_windows(windows(dict(window_end_ms=60_000, window_s=10, mean=5.0),
                                dict(window_end_ms=60_000, window_s=60, device_id="pump-2", mean=5.0)))
    assert out.num_rows == 0
    out = j.add_windows(windows(dict(window_end_ms=60_000, window_s=60, mean=7.0)))
    assert [(r["window_s"], r["device_id"], r["residual"]) for r in out.to_pylist()] == [(60, "pump-1", 6.0)]


def test_unmatched_predictions_expire_and_checkpoint_round_trips():
    j = OutcomeJoiner(horizon_s=60)
    j.add_predictions(predictions(dict(target_end_ms=20_000), dict(target_end_ms=500_000)))
    j.add_windows(windows(dict(device_id="other", window_end_ms=200_000)))
    assert j.expired == 1 and j.predictions.num_rows == 1
    restored = OutcomeJoiner(horizon_s=60)
    restored.restore(j.snapshot())
    assert restored.expired == 1 and restored.watermark_ms == 200_000
    assert restored.add_windows(windows(dict(window_end_ms=500_000, mean=1.0))).num_rows == 1


def test_windows_wait_for_late_predictions_and_a_partition_share_moves_alone():
    j = OutcomeJoiner(horizon_s=60)
    j.add_windows(windows(dict(window_end_ms=20_000, mean=5.0), dict(window_end_ms=30_000, mean=6.0)))
    j.add_windows(windows(dict(window_end_ms=30_000, mean=7.0),  # a replayed window replaces its copy
                          dict(window_end_ms=95_000, mean=8.0),  # watermark 95 s: windows that ended before 35 s expire
                          dict(device_id="pump-2", window_end_ms=95_000, mean=3.0)))
    j.add_predictions(predictions(dict(device_id="pump-2", target_end_ms=105_000)))
    assert sorted(v for v in j.actuals.values()) == [(3.0, 95_000), (8.0, 95_000)]
    restored = OutcomeJoiner(horizon_s=60)
    shares = j.shares(lambda tenant, device: 1 if device == "pump-1" else 2, [1, 2])
    restored.merge(shares[1])  # pump-1's partition moves to another alerter
    j.forget(lambda tenant, device: device == "pump-1")
    [row] = restored.add_predictions(predictions(dict(window_end_ms=85_000, target_end_ms=95_000,
                                                      forecast=7.5))).to_pylist()  # late prediction
    assert (row["actual"], row["residual"]) == (8.0, 0.5)
    assert restored.predictions.num_rows == 0 and restored.watermark_ms == 95_000
    assert list(j.actuals.values()) == [(3.0, 95_000)] and j.predictions["device_id"].to_pylist() == ["pump-2"]
    assert j.add_predictions(predictions(dict(window_end_ms=85_000, target_end_ms=95_000))).num_rows == 0


def alert(rule: str, ts_ms: int, device: str = "pump-1", transition: str = "raised", metric: str = "temperature"
          ) -> dict:
    return dict(rule=rule, tenant="acme", device_id=device, metric=metric, ts_ms=ts_ms, transition=transition)


def test_quality_precision_recall_delay_hand_computed():
    q = QualityTracker(grace_s=10, anomaly_threshold=0.8)
    q.add_labels(labels(dict(start_ms=100_000, end_ms=120_000),                         # L1
                        dict(start_ms=300_000, end_ms=310_000, metric="temperature"),   # L2
                        dict(start_ms=500_000, end_ms=510_000, device_id="pump-9")))    # L3
    q.add_alert_events([
        alert("hot", 104_000),                    # detects L1, delay 4 s
        alert("hot", 125_000),                    # within L1's grace: matched, not a new TP
        alert("hot", 200_000),                    # no label: false positive
        alert("hot", 300_000, transition="cleared"),  # not a detection
        alert("hot", 307_000),                    # detects L2, delay 7 s
        alert("hot", 505_000, device="pump-1"),   # L3 is another device: false positive
        alert("rule_error", 104_000),             # the alerter's own alarm (a rule failed): no detection
    ])
    # model: rising edges over 0.8 per series (114 s only; 116 s is the same episode)
    q.add_predictions(predictions(dict(window_end_ms=114_000, anomaly=0.9), dict(window_end_ms=116_000, anomaly=0.95),
                                  dict(window_end_ms=118_000, anomaly=0.1)))
    q.advance(1_000_000)
    rows = {(r["rule"], r["model"]): r for r in q.rows(computed_ms=1)}
    assert set(rows) == {("hot", ""), ("", "ae:1")}
    hot = rows[("hot", "")]
    assert (hot["true_positives"], hot["false_positives"], hot["false_negatives"]) == (2, 2, 1)
    assert hot["precision"] == pytest.approx(3 / 5)     # 3 matched of 5 detections
    assert hot["recall"] == pytest.approx(2 / 3)
    assert hot["mean_delay_s"] == pytest.approx((4 + 7) / 2)
    model = rows[("", "ae:1")]
    assert (model["true_positives"], model["false_positives"], model["false_negatives"]) == (1, 0, 2)
    assert model["precision"] == 1.0 and model["mean_delay_s"] == pytest.approx(14.0)


def test_quality_waits_for_the_grace_period_and_survives_restart():
    q = QualityTracker(grace_s=10)
    q.add_labels(labels(dict(start_ms=100_000, end_ms=120_000)))
    q.add_alert_events([alert("hot", 90_000)])  # before the label: undecided until 100 s + grace
    q.advance(95_000)
    [row] = q.rows(1)
    assert row["true_positives"] == row["false_positives"] == row["false_negatives"] == 0
    assert math.isnan(row["precision"]) and math.isnan(row["recall"])
    restored = QualityTracker(grace_s=10)
    restored.restore(q.snapshot())
    restored.advance(200_000)
    [row] = restored.rows(2)
    assert (row["true_positives"], row["false_positives"], row["false_negatives"]) == (0, 1, 1)


def test_a_device_level_detection_covers_a_label_on_any_metric_of_its_device():
    q = QualityTracker(grace_s=10)
    q.add_labels(labels(dict(start_ms=100_000, end_ms=120_000, metric="temperature"),
                        dict(start_ms=300_000, end_ms=310_000, metric="temperature")))
    q.add_alert_events([alert("dev", 110_000, metric="*"),        # the device's alarm: detects the metric's label
                        alert("dev", 305_000, metric="pressure")])  # another metric's alarm does not
    q.advance(1_000_000)
    [row] = q.rows(computed_ms=1)
    assert (row["true_positives"], row["false_positives"], row["false_negatives"]) == (1, 1, 1)
