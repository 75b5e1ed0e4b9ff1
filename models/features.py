"""Model features: the last K window means of a series, normalized per series.

Every Triton model (the forecaster and the anomaly scorer) sees the same
vector: the K most recent window means ``x`` of one series, scaled by the mean and standard
deviation of the K-1 OLDER windows (the reference), so the newest window stands out when it
breaks from the recent past, and one model serves every device whatever its units. Targets
(the next window's mean) use the same scaling; ``denormalize`` maps them back.
"""
from __future__ import annotations

import math

import numpy as np

Z_CLIP = 20.0           # |z| beyond this carries no more information and would overflow fp32 tricks
REL_FLOOR = 1e-4        # sigma floor relative to |mu|: a flat series still gets a finite scale
ABS_FLOOR = 1e-6


def feature_names(k: int) -> list[str]:
    """Names of the K features, oldest first (``m-7`` ... ``m0`` for K=8)."""
    return [f"m-{k - 1 - i}" if i < k - 1 else "m0" for i in range(k)]


def reference_stats(history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (mu, sigma) of the K-1 oldest means of ``history`` [N, K], sigma floored."""
    ref = history[:, :-1] if history.shape[1] > 1 else history
    mu = ref.mean(axis=1)
    sigma = np.maximum(ref.std(axis=1), ABS_FLOOR + REL_FLOOR * np.abs(mu))
    return mu, sigma


def normalize(history: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features [N, K] float32 from raw means ``history`` [N, K], with the (mu, sigma) used."""
    history = np.asarray(history, dtype=np.float64)
    mu, sigma = reference_stats(history)
    z = np.clip((history - mu[:, None]) / sigma[:, None], -Z_CLIP, Z_CLIP)
    return z.astype(np.float32), mu, sigma


def normalize_one(means: list[float], k: int) -> tuple[list[float], float, float]:
    """``normalize`` of one series' last K means (left-padded), in plain Python: per-row numpy
    calls cost more than the arithmetic for K ~ 8."""
    m = list(means)[-k:]
    if not m:
        raise ValueError("a series needs at least one window mean")
    m = [m[0]] * (k - len(m)) + m
    ref = m[:-1] if k > 1 else m
    mu = sum(ref) / len(ref)
    var = sum((v - mu) ** 2 for v in ref) / len(ref)
    sigma = max(math.sqrt(var), ABS_FLOOR + REL_FLOOR * abs(mu))
    return [min(Z_CLIP, max(-Z_CLIP, (v - mu) / sigma)) for v in m], mu, sigma


def normalize_target(target: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """A raw next-window mean in the normalized units of its input row."""
    return np.clip((np.asarray(target, dtype=np.float64) - mu) / sigma, -Z_CLIP, Z_CLIP)


def denormalize(z: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Raw values from normalized model outputs."""
    return mu + np.asarray(z, dtype=np.float64) * sigma


def training_samples(means: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sliding (history [N, K], next mean [N]) pairs over one series' ordered window means."""
    means = np.asarray(means, dtype=np.float64)
    n = len(means) - k
    if n <= 0:
        return np.empty((0, k)), np.empty(0)
    idx = np.arange(k)[None, :] + np.arange(n)[:, None]
    return means[idx], means[k:]
