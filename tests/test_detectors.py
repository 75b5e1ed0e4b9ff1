"""The online detectors (aimass.models.series_model, device_model, detect): kernels against a plain
numpy reference, each detector on the behaviour it exists for, and checkpoints that are data."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest

from aimass.core import contract
from aimass.core.config import DetectConfig
from aimass.models import device_model as dm
from aimass.models import series_model as sm
from aimass.models.detect import PartitionDetectors
from tests import reference_device

T0 = 1_790_000_000_000


def windows(means: np.ndarray, stds: np.ndarray, counts: np.ndarray, device: str = "pump-1",
            metrics: list[str] | None = None, t0_ms: int = T0) -> pa.Table:
    """WINDOWS rows of one device: ``means`` / ``stds`` [K, p], time-major (all metrics of a window together)."""
    k, p = means.shape
    metrics = metrics or [f"m{j}" for j in range(p)]
    kk, jj = np.repeat(np.arange(k), p), np.tile(np.arange(p), k)
    end = t0_ms + (kk + 1) * 10_000
    n = k * p
    mean = means[kk, jj]
    return pa.table({
        "tenant": ["acme"] * n, "device_id": [device] * n, "metric": [metrics[j] for j in jj],
        "window_s": pa.array(np.full(n, 10, np.int32)), "window_start_ms": end - 10_000, "window_end_ms": end,
        "count": counts[kk].astype(np.int64), "mean": mean, "min": mean, "max": mean, "std": stds[kk, jj],
        "first": mean, "last": mean, "rate": np.zeros(n), "ewma": mean, "zscore": np.zeros(n),
        "max_received_ms": end}, schema=contract.WINDOWS)


def pump(k: int = 160, seed: int = 0, anomaly: slice = slice(90, 110)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A device: 3 correlated fast metrics, 1 slowly drifting one; an anomaly breaking the correlation."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(k)
    means = np.stack([10 + 0.3 * common + 0.1 * rng.standard_normal(k), 5 - 0.2 * common + 0.1 * rng.standard_normal(k),
                      3 + 0.1 * rng.standard_normal(k), 60 + np.cumsum(0.3 + 0.05 * rng.standard_normal(k))], axis=1)
    means[anomaly, 0] += 1.5   # metric 0 rises while its partner does not follow
    stds = np.abs(0.3 + 0.02 * rng.standard_normal((k, 4)))
    return means, stds, np.full(k, 10.0)


# --- the device model ---------------------------------------------------------------------

def test_device_kernel_matches_the_numpy_reference():
    means, stds, counts = pump()
    warm = 45
    ref_score, ref_alarm, ref_rearm = reference_device.device_scores(
        np.arange(len(means)) * 10.0, counts, means, stds, warm)
    # the reference's alarm settings: open at D > 2q (score 0.75), closed after 3 quiet windows
    det = PartitionDetectors(DetectConfig(device_warmup_windows=warm, device_alarm_score=0.75,
                                          device_clear_windows=3), 8)
    res = det.step(windows(means, stds, counts))
    judged = res.device_end > 0
    assert judged.sum() == len(means)
    assert np.isnan(res.device_score[judged][:warm]).all()  # not judged while it learns
    np.testing.assert_allclose(res.device_score[judged][warm:], ref_score[warm:], rtol=1e-9, atol=1e-12)
    assert det.device["use"][0, :4].tolist() == [1.0, 1.0, 1.0, 2.0]  # the drifting metric: by its change
    # the kernel's incident state and regime changes are the reference's alarm / re-arm
    assert (res.device_changed[judged] == ref_rearm).all()
    assert ref_alarm[90:110].mean() > 0.8 and ref_alarm[:85].sum() <= 2


def test_device_windows_split_over_batches_are_judged_once_when_complete():
    means, stds, counts = pump()
    table = windows(means, stds, counts)
    whole = PartitionDetectors(DetectConfig(), 8).step(table)
    split = PartitionDetectors(DetectConfig(), 8)
    parts = [split.step(table.slice(i, 7)) for i in range(0, table.num_rows, 7)]  # cuts through windows
    scores = np.concatenate([p.device_score[p.device_end > 0] for p in parts])
    np.testing.assert_allclose(scores, whole.device_score[whole.device_end > 0])
    assert np.isfinite(scores).sum() == len(scores) - DetectConfig().device_warmup_windows


def test_a_batch_holding_several_windows_series_by_series_is_judged_window_by_window():
    """A backlog or a replay gives predict many windows of a device at once, grouped by series;
    every window is still judged with all its metrics, and each output row maps to its input row."""
    means, stds, counts = pump()
    table = windows(means, stds, counts)
    series_major = np.lexsort((table["window_end_ms"].to_numpy(), np.array(table["metric"].to_pylist())))
    whole = PartitionDetectors(DetectConfig(), 8).step(table)
    shuffled = table.take(series_major)
    res = PartitionDetectors(DetectConfig(), 8).step(shuffled)
    got = res.device_score[res.device_end > 0]
    assert np.isfinite(got).sum() == len(means) - DetectConfig().device_warmup_windows
    np.testing.assert_allclose(got, whole.device_score[whole.device_end > 0])
    assert shuffled.take(res.rows)["window_end_ms"].to_pylist() == sorted(table["window_end_ms"].to_pylist())
    by_row = dict(zip(zip(shuffled.take(res.rows)["metric"].to_pylist(), shuffled.take(res.rows)["window_end_ms"].to_pylist()),
                      res.series.tolist()))
    assert by_row == dict(zip(zip(table.take(whole.rows)["metric"].to_pylist(),
                                  table.take(whole.rows)["window_end_ms"].to_pylist()), whole.series.tolist()))


def test_a_missing_metric_is_judged_when_the_next_window_starts_and_not_scored():
    means, stds, counts = pump(k=60)  # 45 windows of warm-up, then judged
    table = windows(means, stds, counts)
    keep = np.ones(table.num_rows, bool)
    keep[55 * 4 + 2] = False  # metric m2 of window 55 never arrives
    res = PartitionDetectors(DetectConfig(), 8).step(table.filter(pa.array(keep)))
    ends = res.device_end[res.device_end > 0]
    assert sorted(set(ends.tolist())) == ends.tolist()  # every window judged once
    missing_end = T0 + 56 * 10_000
    assert missing_end in ends.tolist()
    assert np.isnan(res.device_score[res.device_end == missing_end]).all()  # incomplete: not scored


def test_constant_and_degenerate_devices_never_raise():
    """A device whose metrics never move in the warm-up, or move by NaN / inf: scores, no exception."""
    k = 80
    means = np.ones((k, 3)) * np.array([5.0, 0.0, 1e12])
    means[60, 0] = 6.0
    stds = np.zeros((k, 3))
    res = PartitionDetectors(DetectConfig(), 8).step(windows(means, stds, np.full(k, 10.0)))
    per_window = res.device_score[res.device_end > 0]
    assert per_window[60] > 0.99 and (per_window[50:60] < 0.5).all()
    means[70, 1] = np.inf
    PartitionDetectors(DetectConfig(), 8).step(windows(means, stds, np.full(k, 1.0)))


def test_inverse_matches_numpy():
    a = np.array([[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]])
    np.testing.assert_allclose(dm.inverse(a), np.linalg.inv(a), rtol=1e-12)


# --- the per-series detectors ----------------------------------------------------------------

def series(values: np.ndarray, std: float | np.ndarray = 0.5, count: int = 20) -> pa.Table:
    k = len(values)
    stds = np.broadcast_to(np.asarray(std, float), (k,)).reshape(k, 1)
    return windows(values.reshape(k, 1), stds, np.full(k, float(count)))


def scores(values: np.ndarray, **kw) -> np.ndarray:
    """Per-series outputs of one series (a one-metric device: no device model)."""
    res = PartitionDetectors(DetectConfig(), 8).step(series(values, **kw))
    return res.series


def two_metrics(values: np.ndarray, other: np.ndarray, std: float = 0.45) -> pa.Table:
    k = len(values)
    return windows(np.stack([values, other], axis=1), np.full((k, 2), std), np.full(k, 20.0))


def test_a_metric_the_device_model_judges_leaves_its_level_to_it():
    rng = np.random.default_rng(5)
    values, other = 50 + 0.1 * rng.standard_normal(200), 20 + 0.1 * rng.standard_normal(200)  # fast metrics
    values[150] += 3.0
    res = PartitionDetectors(DetectConfig(), 8).step(two_metrics(values, other))
    series = res.series.reshape(200, 2, -1)[:, 0]
    assert series[150, sm.OUT_LEVEL] > 0.95  # still scored and stored ...
    assert series[150, sm.OUT_ANOMALY] < 0.5  # ... but the combined score leaves it to the device score
    assert res.device_score[res.device_end > 0][150] > 0.95
    assert series[20, sm.OUT_ANOMALY] >= series[20, sm.OUT_LEVEL]  # not yet fitted: the level counts


def test_a_device_whose_metrics_all_drift_is_judged_by_their_changes():
    values, other = smooth(), smooth(seed=2) * 2  # slow sines: window means vary far more than noise explains
    values[150] += 3.0
    det = PartitionDetectors(DetectConfig(), 8)
    res = det.step(two_metrics(values, other))
    assert det.device["use"][0, :2].tolist() == [dm.SLOW, dm.SLOW]
    per_window = res.device_score[res.device_end > 0]
    judged = per_window[np.isfinite(per_window)]
    assert len(judged) == len(values) - DetectConfig().device_warmup_windows
    assert per_window[150] > 0.95 and np.quantile(judged, 0.95) < 0.75


def test_a_single_metric_device_has_no_device_model():
    res = PartitionDetectors(DetectConfig(), 8).step(series(smooth()))
    assert np.isnan(res.device_score).all()
    assert (res.series[:, sm.OUT_ANOMALY] >= res.series[:, sm.OUT_LEVEL]).all()  # its level always counts


def smooth(k: int = 200, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(k)
    return 50 + 5 * np.sin(2 * np.pi * t / 400) + 0.02 * t + 0.1 * rng.standard_normal(k)


def test_a_spike_scores_high_and_normal_windows_stay_low():
    values = smooth()
    values[150] += 3.0  # 30 noise units
    out = scores(values)
    assert out[150, sm.OUT_LEVEL] > 0.95 and out[150, sm.OUT_ANOMALY] > 0.95
    normal = np.delete(out[40:, sm.OUT_ANOMALY], [110, 111, 112])
    assert np.quantile(normal, 0.99) < 0.9, np.sort(normal)[-5:]


def test_a_level_shift_alarms_then_the_forecaster_follows_it():
    values = smooth(400)
    values[150:] += 3.0
    out = scores(values)
    assert out[150, sm.OUT_ANOMALY] > 0.95
    assert out[200:, sm.OUT_ANOMALY].max() < 0.9  # the new level is forecast again


def test_a_lasting_change_of_behaviour_becomes_the_new_normal():
    values = smooth(400)
    std = np.full(len(values), 0.45)
    std[150:] = 4.5  # ten times noisier from here on
    out = scores(values, std=std)
    assert out[150, sm.OUT_SPREAD] > 0.95
    regime = np.flatnonzero(out[:, sm.OUT_REGIME] > 0)
    assert regime.size == 1 and 150 < regime[0] <= 150 + DetectConfig().regime_windows
    assert out[regime[0] + 5:, sm.OUT_ANOMALY].max() < 0.9


def test_a_stuck_sensor_has_a_high_spread_score():
    values = smooth()
    std = np.full(len(values), 0.45)
    std[120:130] = 0.0
    out = scores(values, std=std)
    assert out[120, sm.OUT_SPREAD] > 0.95  # the first window of std 0 is judged ...
    assert (out[121:130, sm.OUT_SPREAD] == 0).all()  # ... later ones may be the sensor's resolution
    assert out[40:115, sm.OUT_SPREAD].max() < 0.9  # (the stuck_sensor rule watches std == 0 for longer)


def test_a_young_series_is_judged_against_its_own_noise():
    rng = np.random.default_rng(3)
    values = 20 + 0.05 * rng.standard_normal(12)  # window means of 20 readings of noise 0.2
    values[8] += 1.5
    out = scores(values, std=0.2)
    assert out[8, sm.OUT_LEVEL] > 0.9
    assert out[2:8, sm.OUT_ANOMALY].max() < 0.5


def test_a_daily_profile_is_learned_and_used_after_two_days():
    """A series whose level depends on the hour: after two days the forecast knows the hour's level."""
    k = 6 * 24 * 4  # 4 days of 10-minute windows
    t = np.arange(k)
    hour = (t // 6) % 24
    values = 100 + np.where((hour >= 8) & (hour < 18), 20.0, 0.0) + 0.1 * np.random.default_rng(4).standard_normal(k)
    table = series(values)
    table = table.set_column(table.schema.get_field_index("window_end_ms"), "window_end_ms",
                             pa.array(T0 - T0 % 86_400_000 + (t + 1) * 600_000))
    det = PartitionDetectors(DetectConfig(), 8)
    out = det.step(table).series
    day4 = slice(3 * 144, 4 * 144)
    jumps = day4.start + np.flatnonzero(np.diff(hour[day4]) != 0) + 1
    morning = [j for j in jumps if hour[j] == 8]
    assert morning and all(abs(values[j] - out[j, sm.OUT_FORECAST]) < 5 for j in morning)
    assert det.tod[0, 9] > 5  # the daytime bins learned the offset


def test_replayed_windows_are_skipped():
    values = smooth(60)
    table = series(values)
    det = PartitionDetectors(DetectConfig(), 8)
    det.step(table.slice(0, 40))
    res = det.step(table)  # the first 40 again, then 20 new
    assert res.rows.tolist() == list(range(40, 60))


def test_calibrate_is_half_at_q():
    assert sm.calibrate(0.0, 3.0) == 0.0 and sm.calibrate(3.0, 3.0) == pytest.approx(0.5)
    assert sm.calibrate(9.0, 3.0) == pytest.approx(0.875)


# --- checkpoints ---------------------------------------------------------------------------

def test_a_checkpoint_resumes_exactly():
    means, stds, counts = pump()
    table = windows(means, stds, counts)
    cfg = DetectConfig()
    straight = PartitionDetectors(cfg, 8).step(table)
    first = PartitionDetectors(cfg, 8)
    a = first.step(table.slice(0, 300))
    resumed = PartitionDetectors.from_bytes(first.to_bytes(), cfg, 8)
    b = resumed.step(table.slice(300))
    np.testing.assert_allclose(np.concatenate([a.series, b.series]), straight.series)
    got = np.concatenate([a.device_score, b.device_score])
    np.testing.assert_allclose(got, straight.device_score)


def test_a_checkpoint_is_data_never_code():
    det = PartitionDetectors(DetectConfig(), 8)
    det.step(series(smooth(50)))
    with np.load(io.BytesIO(det.to_bytes())) as z:
        arrays = dict(z)
    arrays["state"] = np.array([object()], dtype=object)  # a pickle inside: would run code on load
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(ValueError, match="allow_pickle"):
        PartitionDetectors.from_bytes(buf.getvalue(), DetectConfig(), 8)


def test_a_checkpoint_of_another_layout_starts_fresh():
    det = PartitionDetectors(DetectConfig(), 8)
    det.step(series(smooth(50)))
    assert len(PartitionDetectors.from_bytes(det.to_bytes(), DetectConfig(), 4)) == 0


def test_a_reading_repeated_across_windows_is_a_stuck_sign_once():
    """A sensor that gets stuck mid-window: its windows only look a little calmer, but its reading
    repeats exactly across the window boundary, which a continuous reading never does."""
    values = smooth(80)
    table = series(values)
    first = np.asarray(values, float) + 0.01
    last = np.asarray(values, float) - 0.01
    last[49] = first[50] = 42.123  # stuck from the end of window 49 into window 50
    last[59] = first[60] = 42.5    # a second repeat: from now on repeats may be the sensor's resolution
    table = table.set_column(table.schema.get_field_index("first"), "first", pa.array(first))
    table = table.set_column(table.schema.get_field_index("last"), "last", pa.array(last))
    out = PartitionDetectors(DetectConfig(device_warmup_windows=256), 8).step(table).series
    assert out[50, sm.OUT_SPREAD] > 0.99 and out[50, sm.OUT_ANOMALY] > 0.99
    assert out[60, sm.OUT_SPREAD] < 0.9
    assert np.delete(out[3:, sm.OUT_SPREAD], [47]).max() < 0.9
