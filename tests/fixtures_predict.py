"""Test data for the predict area: WINDOWS-schema tables built directly (no readings, no Kafka)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from aimass.core import contract

T0_MS = 1_790_000_000_000


def synthetic_windows(n_series: int = 20, n_windows: int = 200, window_s: int = 10, seed: int = 0,
                      spike_every: int = 0, spike_size: float = 8.0, t0_ms: int = T0_MS) -> tuple[pa.Table, pa.Table]:
    """(windows, labels): smooth periodic series with noise; every ``spike_every``-th window of a
    series (0: none) is a labeled spike of ``spike_size`` noise units. Rows are in time order."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_windows)
    level = rng.uniform(10, 100, n_series)[:, None]
    amp = rng.uniform(0.5, 5, n_series)[:, None]
    period = rng.uniform(20, 80, n_series)[:, None]
    noise = rng.uniform(0.05, 0.5, n_series)[:, None]
    means = level + amp * np.sin(2 * np.pi * t / period + rng.uniform(0, 6, n_series)[:, None]) \
        + noise * rng.standard_normal((n_series, n_windows))
    spiked = np.zeros_like(means, dtype=bool)
    if spike_every:
        offsets = rng.integers(0, spike_every, n_series)
        spiked = ((t[None, :] + offsets[:, None]) % spike_every == spike_every - 1) & (t[None, :] > 20)
        means = means + np.where(spiked, spike_size * noise * rng.choice([-1, 1], means.shape), 0.0)
    series = np.repeat(np.arange(n_series)[:, None], n_windows, axis=1).T.ravel()  # time-major
    means_t = means.T.ravel()
    start = t0_ms + np.repeat(t, n_series) * window_s * 1000
    n = len(series)
    windows = pa.table({
        "tenant": ["acme"] * n, "device_id": [f"dev-{s:04d}" for s in series], "metric": ["temp"] * n,
        "window_s": pa.array(np.full(n, window_s, np.int32)), "window_start_ms": start,
        "window_end_ms": start + window_s * 1000, "count": np.full(n, 10), "mean": means_t,
        "min": means_t - 1, "max": means_t + 1, "std": np.full(n, 0.5), "first": means_t, "last": means_t,
        "rate": np.zeros(n), "ewma": means_t, "zscore": np.zeros(n), "max_received_ms": start + window_s * 1000 + 5,
    }, schema=contract.WINDOWS)
    s_idx, w_idx = np.nonzero(spiked)
    labels = pa.table({
        "tenant": ["acme"] * len(s_idx), "device_id": [f"dev-{s:04d}" for s in s_idx], "metric": ["temp"] * len(s_idx),
        "start_ms": t0_ms + w_idx * window_s * 1000, "end_ms": t0_ms + (w_idx + 1) * window_s * 1000,
        "kind": ["spike"] * len(s_idx), "magnitude": np.full(len(s_idx), spike_size), "source": ["test"] * len(s_idx),
    }, schema=contract.LABELS)
    return windows, labels
