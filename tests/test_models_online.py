"""Pure logic of the predict area: features, ONNX graphs vs numpy, training gate, River state."""
from __future__ import annotations

import numpy as np
import pytest

from aimass.models import features, onnx_export, online, registry, train
from aimass.models.triton_client import CircuitBreaker
from tests.fixtures_predict import synthetic_windows


def test_normalization_scales_by_older_windows_and_inverts():
    hist = np.array([[10.0, 12.0, 10.0, 12.0, 30.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    z, mu, sigma = features.normalize(hist)
    assert mu.tolist() == [11.0, 5.0]
    assert sigma[0] == pytest.approx(1.0) and sigma[1] > 0  # flat series still get a finite scale
    assert z[0].tolist() == pytest.approx([-1, 1, -1, 1, 19])  # the newest window stands out
    assert z[1].tolist() == [0.0] * 5
    assert features.denormalize(features.normalize_target(np.array([13.0]), mu[:1], sigma[:1]), mu[:1],
                                sigma[:1]) == pytest.approx([13.0])


def test_one_series_normalization_pads_young_series_and_matches_the_batch_form():
    z, mu, sigma = features.normalize_one([3.0, 5.0], 4)  # padded to [3, 3, 3, 5]
    assert (mu, z[-1]) == (3.0, features.Z_CLIP) and z[:3] == [0.0, 0.0, 0.0]
    means = np.random.default_rng(2).normal(50, 4, 8)
    z, mu, sigma = features.normalize_one(list(means), 8)
    zb, mub, sigmab = features.normalize(means[None, :])
    assert z == pytest.approx(zb[0].tolist(), abs=1e-5) and (mu, sigma) == pytest.approx((mub[0], sigmab[0]))
    with pytest.raises(ValueError):
        features.normalize_one([], 4)


def test_training_samples_slide_over_a_series():
    hist, target = features.training_samples(np.arange(6.0), 4)
    assert hist.tolist() == [[0, 1, 2, 3], [1, 2, 3, 4]] and target.tolist() == [4, 5]


def test_onnx_graphs_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    w, b = rng.standard_normal(8), 0.3
    got = train.run_onnx(onnx_export.forecaster_onnx(w, b), x)
    assert got == pytest.approx(x @ w + b, rel=1e-5, abs=1e-5)
    center, encoder, decoder, err_ref = train.fit_autoencoder(rng.standard_normal((500, 8)))
    xc = x - center
    err = ((xc - xc @ encoder @ decoder) ** 2).mean(axis=1)
    assert train.run_onnx(onnx_export.anomaly_onnx(center, encoder, decoder, err_ref), x) == pytest.approx(
        1 - 0.5 ** (err / err_ref), rel=1e-4, abs=1e-5)


def test_trained_models_beat_baselines_and_a_worse_candidate_is_not_promoted(tmp_path):
    windows, labels = synthetic_windows(30, 240, spike_every=31, seed=3)
    ds = train.dataset(windows, 8, 10, labels)
    first = train.train(tmp_path, ds, 8, "test", say=lambda _: None)
    fm, am = first["forecaster"]["metrics"], first["anomaly"]["metrics"]
    assert fm["mae_norm"] < fm["persistence_mae_norm"]
    assert am["auc"] > 0.85 and am["mean_score_onset"] > 3 * am["mean_score_normal"]
    # A heavily over-regularized candidate forecasts ~ the series mean: worse, so v1 stays live.
    worse = train.train(tmp_path, ds, 8, "test", ridge=1e7, say=lambda _: None)
    assert worse["forecaster"]["promoted"] is False and worse["forecaster"]["version"] == 2
    assert worse["forecaster"]["metrics"]["mae_norm"] > fm["mae_norm"]
    assert registry.live_version(tmp_path, "forecaster") == 1
    assert registry.read_metadata(tmp_path, "forecaster", 2)["gate"]["against_version"] == 1


def test_a_new_history_length_replaces_the_live_version_it_cannot_be_compared_with(tmp_path):
    windows, labels = synthetic_windows(10, 120, spike_every=31, seed=4)
    train.train(tmp_path, train.dataset(windows, 8, 10, labels), 8, "test", say=lambda _: None)
    result = train.train(tmp_path, train.dataset(windows, 6, 10, labels), 6, "test", ridge=1e7, say=lambda _: None)
    assert all(r["promoted"] and r["gate"]["against_metrics"] == {} for r in result.values())
    assert "dims: [ 6 ]" in (tmp_path / "forecaster" / "config.pbtxt").read_text()


def test_gate_compares_the_metric_in_its_direction():
    assert registry.beats("forecaster", {"mae_norm": 0.5}, {"mae_norm": 0.6})
    assert not registry.beats("forecaster", {"mae_norm": 0.6}, {"mae_norm": 0.6})
    assert registry.beats("anomaly", {"auc": 0.9}, {"auc": 0.8})
    assert not registry.beats("anomaly", {"auc": None}, {"auc": 0.8})


def _feed(state: online.OnlinePartition, windows, start: int, stop: int) -> online.OnlineResult:
    w = windows.slice(start, stop - start)
    keys = list(zip(w["tenant"].to_pylist(), w["device_id"].to_pylist(), w["metric"].to_pylist(),
                    w["window_s"].to_pylist()))
    return state.step(keys, w["window_end_ms"].to_pylist(), w["mean"].to_pylist())


def test_checkpoint_round_trip_gives_identical_next_predictions(tmp_path):
    windows, _ = synthetic_windows(5, 120, spike_every=17)
    state = online.OnlinePartition(8)
    _feed(state, windows, 0, 400)
    state.save(tmp_path / "p0.pkl")
    restored = online.OnlinePartition.load(tmp_path / "p0.pkl", 8, 3.0)
    a, b = _feed(state, windows, 400, 600), _feed(restored, windows, 400, 600)
    assert len(a.rows) == 200
    for field in ("forecast", "anomaly", "band_scale", "x"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert online.OnlinePartition.load(tmp_path / "missing.pkl", 8, 3.0).series == {}


def test_a_loaded_partition_uses_the_configured_band_k(tmp_path):
    """predict.band_k holds after a partition assignment, whether a checkpoint exists or not."""
    windows, _ = synthetic_windows(5, 120, spike_every=17)
    state = online.OnlinePartition(8)  # checkpoint written under the default band_k (3)
    _feed(state, windows, 0, 400)
    state.save(tmp_path / "p0.pkl")
    restored = online.OnlinePartition.load(tmp_path / "p0.pkl", 8, 4.5)
    assert online.OnlinePartition.load(tmp_path / "missing.pkl", 8, 4.5).band_k == 4.5
    a, b = _feed(state, windows, 400, 600), _feed(restored, windows, 400, 600)
    assert np.all(a.band_scale > 0)
    np.testing.assert_allclose(b.band_scale, a.band_scale * 1.5)


def test_replayed_windows_are_skipped_and_river_learns():
    windows, _ = synthetic_windows(4, 200)
    state = online.OnlinePartition(8)
    first = _feed(state, windows, 0, 400)
    assert len(_feed(state, windows, 300, 400).rows) == 0  # a replay after a restart changes nothing
    last = _feed(state, windows, 400, 800)
    actual = windows["mean"].to_numpy()
    # forecasts made at row i are for the same series' next window, 4 rows later (time-major layout)
    early = np.abs(first.forecast[:-4][40:] - actual[4:400][40:]).mean()
    late = np.abs(last.forecast[:-4] - actual[404:800]).mean()
    assert late < early


def _drift_rows(means: np.ndarray) -> list[tuple[int, float, float]]:
    state = online.OnlinePartition(8)
    key = ("acme", "d1", "temp", 10)
    return state.step([key] * len(means), list(range(1, len(means) + 1)), means.tolist()).drift


def test_a_change_in_predictability_emits_drift_and_stationary_noise_does_not():
    rng = np.random.default_rng(0)
    t = np.arange(400)
    assert _drift_rows(10 + rng.standard_normal(800)) == []
    drift = _drift_rows(np.r_[10 + np.sin(t / 3) + 0.01 * rng.standard_normal(400), 10 + rng.standard_normal(400)])
    assert drift and 400 < drift[0][0] < 500
    _, before, after = drift[0]
    assert after > before  # the forecast error rate rose


def test_river_anomaly_scores_rank_labeled_spikes_high():
    windows, labels = synthetic_windows(60, 150, spike_every=37, seed=2)
    res = _feed(online.OnlinePartition(8), windows, 0, windows.num_rows)
    spikes = set(zip(labels["device_id"].to_pylist(), labels["end_ms"].to_pylist()))
    is_spike = np.array([(d, e) in spikes for d, e in zip(windows["device_id"].to_pylist(),
                                                          windows["window_end_ms"].to_pylist())])
    warm = windows.num_rows // 4  # after the detector's first windows
    assert ((res.anomaly >= 0) & (res.anomaly <= 1)).all()
    assert train.auc(res.anomaly[warm:], is_spike[warm:]) > 0.8


def test_circuit_breaker_opens_probes_once_and_closes():
    now = [0.0]
    breaker = CircuitBreaker(failures=3, reset_s=5.0, clock=lambda: now[0])
    for _ in range(2):
        assert breaker.allow()
        breaker.failure("refused")
    assert breaker.state == "closed"
    breaker.failure("refused")
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 5.0
    assert breaker.allow() and not breaker.allow()  # exactly one probe in half-open
    breaker.failure("still refused")
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 10.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.consecutive == 0
