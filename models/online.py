"""River online models, prequential (predict, then learn) on every window, with checkpoints.

State is kept per Kafka partition (``OnlinePartition``) so a partition's whole state moves
with it on a rebalance: one online forecaster (linear AR on the normalized features) and one
anomaly detector (HalfSpaceTrees behind a MinMaxScaler) per metric within the partition,
plus per series its recent window means, the pending forecast, a residual scale for the
band, and an ADWIN detector on the forecast residuals that emits drift events.
``save``/``load`` pickle a partition's state atomically under the checkpoint directory.
"""
from __future__ import annotations

import math
import pickle
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from river import anomaly, drift, linear_model, optim, preprocessing

from models import features
from models.registry import atomic_write

FORECASTER_NAME = "river_ar:online"
ANOMALY_NAME = "river_hst:online"
RESIDUAL_CLIP = 5.0      # a single spike must not look like a regime change to ADWIN
RESIDUAL_DECAY = 0.05    # EWM weight of a new squared residual in the band scale


def _metric_forecaster():
    return linear_model.LinearRegression(optimizer=optim.SGD(0.01), l2=1e-4)


def _metric_detector():
    return preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(n_trees=10, height=6, window_size=100, seed=7)


@dataclass
class SeriesState:
    """What one series remembers between windows."""

    means: deque
    last_end_ms: int = -1
    pending_x: dict | None = None    # features the pending forecast was made from
    pending_mu: float = 0.0
    pending_sigma: float = 1.0
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
        self.series: dict[tuple[str, str, str, int], SeriesState] = {}

    def _learn_pending(self, metric: str, s: SeriesState, actual: float) -> tuple[float, float] | None:
        """Learn from the previous forecast now that its target arrived; feed ADWIN. Drift -> (before, after)."""
        target = float(features.normalize_target(actual, s.pending_mu, s.pending_sigma))
        model = self.forecasters[metric]
        residual = target - model.predict_one(s.pending_x)
        model.learn_one(s.pending_x, target)
        s.residual_sq += RESIDUAL_DECAY * (min(residual * residual, features.Z_CLIP ** 2) - s.residual_sq)
        before = s.adwin.estimation
        s.adwin.update(min(abs(residual), RESIDUAL_CLIP) / RESIDUAL_CLIP)  # error rate in [0, 1], as ADWIN assumes
        return (before, s.adwin.estimation) if s.adwin.drift_detected else None

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
            if s.pending_x is not None:
                change = self._learn_pending(metric, s, mean)
                if change:
                    drifts.append((i, *change))
            s.means.append(mean)
            s.last_end_ms = end
            z, m, sd = features.normalize(features.left_pad(s.means, self.k)[None, :])
            x = dict(zip(self.names, z[0].tolist()))
            j = len(rows)
            rows.append(i)
            xs[j], mu[j], sigma[j] = z[0], m[0], sd[0]
            fc[j] = m[0] + sd[0] * self.forecasters[metric].predict_one(x)
            detector = self.detectors[metric]
            an[j] = detector.score_one(x)
            detector.learn_one(x)
            band[j] = self.band_k * math.sqrt(s.residual_sq) * sd[0]
            s.pending_x, s.pending_mu, s.pending_sigma = x, float(m[0]), float(sd[0])
        j = len(rows)
        return OnlineResult(np.array(rows, dtype=np.int64), xs[:j], mu[:j], sigma[:j], fc[:j],
                            np.clip(an[:j], 0.0, 1.0), band[:j], drifts)

    # --- checkpoints ---------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Pickle this partition's state to ``path`` atomically."""
        atomic_write(Path(path), pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL))

    @staticmethod
    def load(path: Path, k: int) -> "OnlinePartition":
        """The checkpointed state at ``path``, or a fresh one if there is none (or it is for another K)."""
        path = Path(path)
        if path.exists():
            state = pickle.loads(path.read_bytes())
            if isinstance(state, OnlinePartition) and state.k == k:
                return state
        return OnlinePartition(k)
