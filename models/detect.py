"""The online detectors of one Kafka partition: per-series and per-device state in flat arrays.

``PartitionDetectors.step(windows)`` maps each window row to its series' slot (and its device's
slot), runs the numba kernels of ``aimass.models.series_model`` (forecast, residual scale,
level / spread / change scores) and ``aimass.models.device_model`` (all metrics of one device
at one window against the device's learned normal state), and returns every output as arrays:
Python pays per batch, not per window. The state moves with its partition: ``to_bytes`` /
``from_bytes`` write it as a NumPy ``.npz`` (arrays and the slot keys only, loaded with
``allow_pickle=False``, so a checkpoint is data and can never run code).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aimass.core.config import DetectConfig
from aimass.models import device_model as dm
from aimass.models import series_model as sm

FORMAT = 1  # checkpoint layout version; another version starts fresh


class Slots:
    """Dense int64 slots for string keys, in order of first appearance."""

    def __init__(self, keys: list[str] | None = None):
        self.keys: list[str] = list(keys or [])
        self.index = {k: i for i, k in enumerate(self.keys)}

    def lookup(self, keys: pa.Array) -> np.ndarray:
        """The slot of every key (new keys get new slots), one dictionary lookup per distinct key."""
        encoded = pc.dictionary_encode(keys).combine_chunks() if isinstance(keys, pa.ChunkedArray) \
            else pc.dictionary_encode(keys)
        distinct = encoded.dictionary.to_pylist()
        mapping = np.empty(len(distinct), np.int64)
        for j, key in enumerate(distinct):
            slot = self.index.get(key)
            if slot is None:
                slot = self.index[key] = len(self.keys)
                self.keys.append(key)
            mapping[j] = slot
        return mapping[encoded.indices.to_numpy(zero_copy_only=False)]


def _grown(a: np.ndarray, rows: int) -> np.ndarray:
    """``a`` with at least ``rows`` rows (doubling, zero-filled)."""
    if a.shape[0] >= rows:
        return a
    bigger = np.zeros((max(rows, 2 * a.shape[0], 64),) + a.shape[1:], a.dtype)
    bigger[:a.shape[0]] = a
    return bigger


@dataclass
class DetectResult:
    """Per processed row (``rows`` indexes the input table) outputs of one ``step``."""

    rows: np.ndarray       # input rows processed (rows replayed after a restart are skipped)
    series: np.ndarray     # [n, sm.N_OUT] per-series outputs
    history: np.ndarray    # [n, K] each row's series' last K window means (Triton's features)
    device_end: np.ndarray   # [n] end of the device window this row completed and judged, else 0
    device_score: np.ndarray  # [n] that window's device score 0..1 (NaN: not judged, e.g. in the warm-up)
    device_distance: np.ndarray  # [n] its Mahalanobis distance in units of the normal 99th percentile
    device_changed: np.ndarray  # [n] the device's open incident changed regime at that window


class PartitionDetectors:
    """Per-series and per-device detector state of one partition."""

    def __init__(self, cfg: DetectConfig, k: int):
        self.cfg, self.k = cfg, k
        self.series_slots, self.device_slots = Slots(), Slots()
        self.state = np.zeros((0, sm.N_STATE))
        self.history = np.zeros((0, k))
        self.tod = np.zeros((0, sm.TOD_BINS))
        self.dow = np.zeros((0, sm.DOW_BINS))
        self.device = dm.empty_state(0, cfg.device_warmup_windows)
        self.metric_pos: dict[str, dict[str, int]] = {}

    def __len__(self) -> int:
        return len(self.series_slots.keys)

    def step(self, w: pa.Table) -> DetectResult:
        """Advance every series and device of ``w`` (rows of a series in time order); the result's
        ``rows`` index ``w``."""
        # Window-major: a batch may hold several windows of a device series by series (a backlog, a
        # replay), and the device model judges a window once the next one starts.
        ends = w["window_end_ms"].to_numpy()
        if np.any(ends[1:] < ends[:-1]):  # (sorting only a batch that needs it: a live poll rarely does)
            order = np.argsort(ends, kind="stable")
            res = self._step(w.take(order))
            res.rows = order[res.rows]
            return res
        return self._step(w)

    def _step(self, w: pa.Table) -> DetectResult:
        window_s = pc.cast(w["window_s"], pa.string())
        device_key = pc.binary_join_element_wise(w["tenant"], w["device_id"], window_s, "\x1f")
        series_key = pc.binary_join_element_wise(device_key, w["metric"], "\x1f")
        slots = self.series_slots.lookup(series_key)
        rows = len(self.series_slots.keys)
        self.state, self.history = _grown(self.state, rows), _grown(self.history, rows)
        self.tod, self.dow = _grown(self.tod, rows), _grown(self.dow, rows)
        ends = w["window_end_ms"].to_numpy().astype(np.int64)
        next_ends = ends + w["window_s"].to_numpy().astype(np.int64) * 1000
        means, stds, counts, firsts, lasts = (w[name].to_numpy(zero_copy_only=False).astype(np.float64)
                                              for name in ("mean", "std", "count", "first", "last"))
        c = self.cfg
        out = sm.series_step(slots, ends, next_ends, means, stds, counts, firsts, lasts, self.state, self.history,
                             self.tod, self.dow, c.forecast_alpha, c.forecast_beta, float(c.long_windows),
                             c.warmup_windows, c.regime_windows, c.q_level, c.q_spread, c.q_change)
        done = np.flatnonzero(np.isfinite(out[:, sm.OUT_NEXT]))
        history = self.history[slots[done]].copy()
        judged, score, stat, changed, covered = self._device(w, device_key, done, ends[done], means[done],
                                                             stds[done], counts[done])
        series = out[done]
        # a metric the device model judges (fitted, fast metric) has its level judged there, jointly
        series[covered, sm.OUT_ANOMALY] = np.maximum(series[covered, sm.OUT_SPREAD], series[covered, sm.OUT_CHANGE])
        return DetectResult(done, series, history, judged, score, stat, changed)

    def _device(self, w: pa.Table, device_key: pa.Array, done: np.ndarray, ends: np.ndarray, means: np.ndarray,
                stds: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, ...]:
        """Device judgements of the processed rows (``ends`` ... ``counts`` are theirs: every metric of a
        device at a window together), and whether each row's metric is one the device model judges."""
        dev = self.device_slots.lookup(device_key)[done]
        self.device = dm.grown(self.device, len(self.device_slots.keys))
        metrics = w["metric"].to_pylist()
        keys = self.device_slots.keys
        pos, known = np.empty(len(done), np.int64), np.empty(len(done), np.int64)
        for j, (i, d) in enumerate(zip(done.tolist(), dev.tolist())):
            table = self.metric_pos.setdefault(keys[d], {})
            p = table.get(metrics[i])
            if p is None:
                p = table[metrics[i]] = len(table) if len(table) < dm.MAX_METRICS else -1
            pos[j] = p
        for j, d in enumerate(dev.tolist()):  # a device's metrics in this batch are known before it is judged
            known[j] = min(len(self.metric_pos[keys[d]]), dm.MAX_METRICS)
        window_s = float(w["window_s"][0].as_py()) if w.num_rows else 10.0
        return dm.device_step(dev, ends, pos, known, means, stds, counts, window_s, self.device, self.cfg)

    # --- checkpoints -----------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The whole state as ``.npz`` bytes (no pickles)."""
        n, d = len(self.series_slots.keys), len(self.device_slots.keys)
        metric_keys = [f"{dk}\x1e{m}\x1e{p}" for dk, table in self.metric_pos.items() for m, p in table.items()]
        buf = io.BytesIO()
        np.savez(buf, format=np.array([FORMAT, self.k]), state=self.state[:n], history=self.history[:n],
                 tod=self.tod[:n], dow=self.dow[:n], series_keys=np.array(self.series_slots.keys, dtype=str),
                 device_keys=np.array(self.device_slots.keys, dtype=str), metric_keys=np.array(metric_keys, dtype=str),
                 **{f"device_{name}": a[:d] for name, a in self.device.items()})
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, cfg: DetectConfig, k: int) -> "PartitionDetectors":
        """The state ``to_bytes`` wrote; a fresh one if it is of another layout or K."""
        fresh = cls(cfg, k)
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if z["format"].tolist() != [FORMAT, k]:
                return fresh
            fresh.series_slots = Slots(z["series_keys"].tolist())
            fresh.device_slots = Slots(z["device_keys"].tolist())
            fresh.state, fresh.history, fresh.tod, fresh.dow = z["state"], z["history"], z["tod"], z["dow"]
            fresh.device = {name: z[f"device_{name}"] for name in dm.empty_state(0, cfg.device_warmup_windows)}
            for entry in z["metric_keys"].tolist():
                dk, metric, p = entry.split("\x1e")
                fresh.metric_pos.setdefault(dk, {})[metric] = int(p)
        return fresh
