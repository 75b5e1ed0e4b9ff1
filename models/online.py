"""River online models, prequential (predict, then learn) on every window, with checkpoints.

State is kept per Kafka partition (``OnlinePartition``) so a partition's whole state moves
with it on a rebalance: one online forecaster (linear AR on the normalized features) and one
anomaly detector per metric within the partition, plus per series its recent window means,
the pending forecast, a residual scale for the band, and an ADWIN detector on the forecast
residuals that emits drift events. The detector is HalfSpaceTrees on two features squashed
into [0, 1] by a fixed tanh (a MinMaxScaler is stretched by the first outlier): the newest
normalized mean and the forecaster's residual on it; its raw score is calibrated to 0..1
like Triton's (0 at the running median, 0.5 at the running 99th percentile).
``save``/``load`` pickle a partition's state atomically (mode 0600) under the checkpoint directory;
``load`` refuses a file another user owns or may write (unpickling runs code).
"""
from __future__ import annotations

import math
import pickle
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from river import anomaly, drift, linear_model, optim, stats

from aimass.core.files import check_private
from aimass.models import features
from aimass.models.registry import atomic_write

FORECASTER_NAME = "river_ar:online"
ANOMALY_NAME = "river_hst:online"
RESIDUAL_CLIP = 5.0      # a single spike must not look like a regime change to ADWIN
RESIDUAL_DECAY = 0.05    # EWM weight of a new squared residual in the band scale
SQUASH_SCALE = 4.0       # tanh(z / 4): |z| < 1 stays near-linear, spikes saturate toward 0 / 1
CALIBRATION_WARMUP = 100  # raw scores seen before calibrated scores are trusted (0 until then)


def _metric_forecaster():
    return linear_model.LinearRegression(optimizer=optim.SGD(0.01), l2=1e-4)


def _metric_detector():
    return anomaly.HalfSpaceTrees(n_trees=10, height=3, window_size=250, seed=7)


def _squash(z: float) -> float:
    return 0.5 + 0.5 * math.tanh(z / SQUASH_SCALE)


class ScoreCalibrator:
    """Raw detector scores -> 0..1: 0 up to the running median, 0.5 at the running 99th percentile."""

    def __init__(self):
        self.median, self.high, self.seen = stats.Quantile(0.5), stats.Quantile(0.99), 0

    def __call__(self, raw: float) -> float:
        """Calibrated score of ``raw`` (judged before ``raw`` joins the running quantiles)."""
        score = 0.0
        if self.seen >= CALIBRATION_WARMUP:
            med, high = self.median.get(), self.high.get()
            score = 1.0 - 0.5 ** (max(raw - med, 0.0) / max(high - med, 1e-3))
        self.median.update(raw)
        self.high.update(raw)
        self.seen += 1
        return score


@dataclass
class SeriesState:
    """What one series remembers between windows."""

    means: deque
    last_end_ms: int = -1
    pending_x: dict | None = None    # features the pending forecast was made from
    pending_mu: float = 0.0
    pending_sigma: float = 1.0
    pending_forecast: float = 0.0   # normalized, as predicted (prequential residuals use this)
    residual_sq: float = 1.0         # EWM of squared normalized residuals (band half-width scale)
    adwin: drift.ADWIN = field(default_factory=lambda: drift.ADWIN(delta=0.002))


@dataclass
class OnlineResult:
    """Per-row outputs of one ``step`` (rows skipped as already seen are not included)."""

    rows: np.ndarray          # indices of the input rows that were processed
    x: np.ndarray             # [n, K] float32 features (the Triton input)
    mu: np.ndarray
    sigma: np.ndarray
    forecast: np.ndarray      # River forecast, raw units
    anomaly: np.ndarray       # River anomaly score 0..1
    band_scale: np.ndarray    # band half-width per unit forecast, raw units (k * residual rms * sigma)
    drift: list[tuple[int, float, float]]  # (row index, residual mean before, after)


class OnlinePartition:
    """River state of the series of one Kafka partition."""

    def __init__(self, k: int, band_k: float = 3.0):
        self.k, self.band_k = k, band_k
        self.names = features.feature_names(k)
        self.forecasters: dict[str, object] = {}
        self.detectors: dict[str, object] = {}
        self.calibrators: dict[str, ScoreCalibrator] = {}
        self.series: dict[tuple[str, str, str, int], SeriesState] = {}

    def _learn_pending(self, metric: str, s: SeriesState, actual: float) -> tuple[float, tuple[float, float] | None]:
        """Learn from the previous forecast now that its target arrived; feed ADWIN.
        Returns (normalized residual, (residual rate before, after) on drift else None)."""
        target = min(features.Z_CLIP, max(-features.Z_CLIP, (actual - s.pending_mu) / s.pending_sigma))
        residual = target - s.pending_forecast
        self.forecasters[metric].learn_one(s.pending_x, target)
        s.residual_sq += RESIDUAL_DECAY * (min(residual * residual, features.Z_CLIP ** 2) - s.residual_sq)
        before = s.adwin.estimation
        s.adwin.update(min(abs(residual), RESIDUAL_CLIP) / RESIDUAL_CLIP)  # error rate in [0, 1], as ADWIN assumes
        # Drift = the error rate ROSE; ADWIN also flags drops (e.g. while the model warms up): not reported.
        rose = s.adwin.drift_detected and s.adwin.estimation > before
        return residual, ((before, s.adwin.estimation) if rose else None)

    def step(self, keys: list[tuple[str, str, str, int]], end_ms: list[int], means: list[float]) -> OnlineResult:
        """Prequential pass over window rows in arrival order (rows of a series in time order)."""
        n = len(keys)
        rows, xs = [], np.empty((n, self.k), dtype=np.float32)
        mu, sigma, fc, an, band = (np.empty(n) for _ in range(5))
        drifts = []
        for i, (key, end, mean) in enumerate(zip(keys, end_ms, means)):
            s = self.series.get(key)
            if s is None:
                s = self.series[key] = SeriesState(deque(maxlen=self.k))
            elif end <= s.last_end_ms:
                continue  # already processed (replay after a restart): state has it
            metric = key[2]
            if metric not in self.forecasters:
                self.forecasters[metric], self.detectors[metric] = _metric_forecaster(), _metric_detector()
                self.calibrators[metric] = ScoreCalibrator()
            residual = 0.0
            if s.pending_x is not None:
                residual, change = self._learn_pending(metric, s, mean)
                if change:
                    drifts.append((i, *change))
            s.means.append(mean)
            s.last_end_ms = end
            z, m, sd = features.normalize_one(s.means, self.k)
            x = dict(zip(self.names, z))
            j = len(rows)
            rows.append(i)
            xs[j], mu[j], sigma[j] = z, m, sd
            forecast = self.forecasters[metric].predict_one(x)
            fc[j] = m + sd * forecast
            a = {"z": _squash(z[-1]), "residual": _squash(residual)}
            detector = self.detectors[metric]
            an[j] = self.calibrators[metric](detector.score_one(a))
            detector.learn_one(a)
            band[j] = self.band_k * math.sqrt(s.residual_sq) * sd
            s.pending_x, s.pending_mu, s.pending_sigma, s.pending_forecast = x, m, sd, forecast
        j = len(rows)
        return OnlineResult(np.array(rows, dtype=np.int64), xs[:j], mu[:j], sigma[:j], fc[:j],
                            np.clip(an[:j], 0.0, 1.0), band[:j], drifts)

    # --- checkpoints ---------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Pickle this partition's state to ``path`` atomically."""
        atomic_write(Path(path), pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL))

    @staticmethod
    def load(path: Path, k: int, band_k: float) -> "OnlinePartition":
        """The checkpointed state at ``path``, or a fresh one if there is none (or it is for another K);
        either way with the configured ``band_k`` (a checkpoint keeps the one it was written with).

        UnsafeFileError, before anything is unpickled, if another user owns it or may write it."""
        path = Path(path)
        if path.exists():
            check_private(path, "checkpoint")
            state = pickle.loads(path.read_bytes())
            if isinstance(state, OnlinePartition) and state.k == k:
                state.band_k = band_k
                return state
        return OnlinePartition(k, band_k)
