"""Fit the forecaster (ridge AR) and the anomaly scorer (masked linear autoencoder) from window history.

Pure numpy: ``dataset`` turns WINDOWS rows (plus optional LABELS) into per-series-normalized
samples split by time into train and held-out; ``fit_*`` return weights; ``train`` writes a new
numbered version of each model with its metadata and promotes it only if it beats the live
version on the SAME held-out samples (both run through onnxruntime, as Triton runs them).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.compute as pc

from aimass.models import features, onnx_export, registry

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    """Normalized samples of many series, split by time into train / held-out."""

    x: np.ndarray          # [N, K] float32 features
    y: np.ndarray          # [N] next mean, normalized like its row
    anomalous: np.ndarray  # [N] bool: the newest input window overlaps a labeled anomaly
    onset: np.ndarray      # [N] bool: ... and is one of the first ONSET_WINDOWS windows of it
    target_bad: np.ndarray  # [N] bool: the target window overlaps a labeled anomaly
    holdout: np.ndarray    # [N] bool
    info: dict             # data range and sizes for the metadata


ONSET_WINDOWS = 2  # a detector with a K-window memory can only be asked to catch an anomaly's start


def _label_mask(ends: np.ndarray, starts: np.ndarray, series: tuple[str, str, str], labels: pa.Table | None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(overlap, onset) of one series' windows [starts, ends) with its labels (metric "" = any)."""
    mask, onset = np.zeros(len(ends), dtype=bool), np.zeros(len(ends), dtype=bool)
    if labels is None or labels.num_rows == 0:
        return mask, onset
    tenant, device, metric = series
    sel = labels.filter(pc.and_(pc.and_(pc.equal(labels["tenant"], tenant), pc.equal(labels["device_id"], device)),
                                pc.or_(pc.equal(labels["metric"], metric), pc.equal(labels["metric"], ""))))
    for lo, hi in zip(sel["start_ms"].to_numpy(), sel["end_ms"].to_numpy()):
        hit = (starts < hi) & (ends > lo)
        mask |= hit
        onset[np.flatnonzero(hit)[:ONSET_WINDOWS]] = True
    return mask, onset


def dataset(windows: pa.Table, k: int, window_s: int, labels: pa.Table | None = None,
            holdout_fraction: float = 0.25) -> Dataset:
    """Sliding K-window samples of every series of size ``window_s``; the newest time span is held out."""
    w = windows.filter(pc.equal(windows["window_s"], window_s))
    if w.num_rows == 0:
        raise ValueError(f"no windows of {window_s}s in the training data")
    w = w.sort_by([("tenant", "ascending"), ("device_id", "ascending"), ("metric", "ascending"),
                   ("window_end_ms", "ascending")])
    keys = [w[c].to_pylist() for c in ("tenant", "device_id", "metric")]
    means, starts, ends = (w[c].to_numpy() for c in ("mean", "window_start_ms", "window_end_ms"))
    bounds = [0] + [i for i in range(1, w.num_rows) if (keys[0][i], keys[1][i], keys[2][i]) !=
                    (keys[0][i - 1], keys[1][i - 1], keys[2][i - 1])] + [w.num_rows]
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        hist, target = features.training_samples(means[lo:hi], k)
        if len(hist) == 0:
            continue
        bad, onset = _label_mask(ends[lo:hi], starts[lo:hi], (keys[0][lo], keys[1][lo], keys[2][lo]), labels)
        parts.append((hist, target, bad[k - 1:hi - lo - 1], onset[k - 1:hi - lo - 1], bad[k:], ends[lo + k:hi]))
    if not parts:
        raise ValueError(f"no series has more than K={k} windows of {window_s}s")
    hist, target, anomalous, onset, target_bad, target_end = (np.concatenate(p) for p in zip(*parts))
    x, mu, sigma = features.normalize(hist)
    y = features.normalize_target(target, mu, sigma)
    split = np.quantile(target_end, 1.0 - holdout_fraction)
    info = {"from_ms": int(ends.min()), "to_ms": int(ends.max()), "split_ms": int(split), "series": len(parts),
            "windows": int(w.num_rows), "window_s": window_s, "samples": int(len(x)),
            "holdout_samples": int((target_end > split).sum()), "labeled_anomalous": int(anomalous.sum()),
            "labeled_onsets": int(onset.sum())}
    return Dataset(x, y, anomalous, onset, target_bad, target_end > split, info)


# --- fitting ----------------------------------------------------------------------------

def fit_forecaster(x: np.ndarray, y: np.ndarray, ridge: float = 1.0) -> tuple[np.ndarray, float]:
    """Ridge regression y ~ x @ w + b (intercept not penalized)."""
    xm, ym = x.mean(axis=0), y.mean()
    xc = (x - xm).astype(np.float64)
    w = np.linalg.solve(xc.T @ xc + ridge * np.eye(x.shape[1]), xc.T @ (y - ym))
    return w, float(ym - xm @ w)


def fit_autoencoder(x: np.ndarray, ridge: float = 1.0, quantile: float = 0.99
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Masked linear autoencoder: the code sees the K-1 older features only (the newest is masked)
    and the decoder rebuilds all K, so the error measures how far the newest window breaks from
    its history. Returns (center [K], encoder [K, K] with a zero last row, decoder [K, K], err_ref)."""
    x = x.astype(np.float64)
    center = x.mean(axis=0)
    xc = x - center
    older = xc[:, :-1]
    encoder = np.vstack([np.linalg.solve(older.T @ older + ridge * np.eye(x.shape[1] - 1), older.T @ xc),
                         np.zeros((1, x.shape[1]))])
    decoder = np.eye(x.shape[1])
    err = ((xc - xc @ encoder) ** 2).mean(axis=1)
    return center, encoder, decoder, float(max(np.quantile(err, quantile), 1e-6))


# --- evaluation -------------------------------------------------------------------------

def run_onnx(model: bytes | Path, x: np.ndarray) -> np.ndarray:
    """Run a model's ONNX graph in-process on features [N, K]; returns [N]."""
    src = str(model) if isinstance(model, Path) else model
    session = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return session.run(None, {onnx_export.INPUT: x.astype(np.float32)})[0][:, 0]


def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC (Mann-Whitney, ties averaged); None without both classes."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores[order][np.r_[False, np.diff(scores[order]) == 0]]):
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(name: str, model: bytes | Path, ds: Dataset) -> dict:
    """Held-out metrics of one model's ONNX graph (the gate compares these)."""
    h = ds.holdout
    out = run_onnx(model, ds.x[h])
    if name == "forecaster":
        ok = ~ds.target_bad[h] & ~ds.anomalous[h]
        err = np.abs(out[ok] - ds.y[h][ok])
        return {"mae_norm": float(err.mean()), "rmse_norm": float(np.sqrt((err ** 2).mean())),
                "persistence_mae_norm": float(np.abs(ds.x[h][ok, -1] - ds.y[h][ok]).mean()), "rows": int(ok.sum())}
    # Onset windows of labeled anomalies against windows far from any label.
    onset, normal = ds.onset[h], ~ds.anomalous[h]
    judged = onset | normal
    return {"auc": auc(out[judged], onset[judged]), "mean_score_normal": float(out[normal].mean()),
            "mean_score_onset": float(out[onset].mean()) if onset.any() else None,
            "rows": int(judged.sum())}


# --- one training run -------------------------------------------------------------------

def build(ds: Dataset, ridge: float = 1.0) -> dict[str, tuple[bytes, dict]]:
    """ONNX bytes and fit parameters of both models from the training part of ``ds``."""
    train = ~ds.holdout
    clean = train & ~ds.anomalous & ~ds.target_bad
    w, b = fit_forecaster(ds.x[clean], ds.y[clean], ridge)
    center, encoder, decoder, err_ref = fit_autoencoder(ds.x[train & ~ds.anomalous], ridge)
    return {"forecaster": (onnx_export.forecaster_onnx(w, b), {"kind": "ridge_ar", "ridge": ridge}),
            "anomaly": (onnx_export.anomaly_onnx(center, encoder, decoder, err_ref),
                        {"kind": "masked_linear_autoencoder", "ridge": ridge, "err_ref_q99": err_ref})}


def train(repo: Path, ds: Dataset, k: int, source: str, http_url: str = "", ridge: float = 1.0,
          say=print) -> dict[str, dict]:
    """Write a new version of each model; promote each only if it beats the live one on held-out data."""
    results = {}
    for name, (onnx_bytes, params) in build(ds, ridge).items():
        live = registry.live_version(repo, name)
        metrics = evaluate(name, onnx_bytes, ds)
        # A live version with another K cannot score these samples: the new K (predict.history_windows) wins.
        comparable = live is not None and registry.read_metadata(repo, name, live).get("k") == k
        live_metrics = evaluate(name, registry.version_dir(repo, name, live) / "model.onnx", ds) if comparable else {}
        meta = {"model": name, "k": k, "features": features.feature_names(k),
                "normalization": "per series: (mean - mu) / sigma over the K-1 older windows, clipped to +-20",
                "data": {**ds.info, "source": source}, "params": params, "metrics": metrics,
                "trained_at_ms": int(time.time() * 1000),
                "gate": {"metric": registry.GATE_METRIC[name][0], "against_version": live,
                         "against_metrics": live_metrics}}
        version = registry.write_version(repo, name, onnx_bytes, meta)
        promote = not comparable or registry.beats(name, metrics, live_metrics)
        if promote and live is not None:
            registry.promote(repo, name, version, http_url)
        meta.update(version=version, promoted=promote)
        registry.write_metadata(repo, name, version, meta)
        metric = registry.GATE_METRIC[name][0]
        say(f"{name} v{version}: {metric}={metrics.get(metric)} vs live v{live}: {live_metrics.get(metric)} -> "
            f"{'PROMOTED' if promote else 'kept v' + str(live)}")
        results[name] = meta
    return results
