"""Detection quality of anomaly detectors on labelled history (numpy only, no project imports).

Inputs are plain arrays per file: row timestamps (numpy ``datetime64`` of any unit, or integers
read as epoch milliseconds; strictly increasing), 0/1 labels ``y_true`` and a 0/1 prediction
``y_pred`` per row, or, for the changepoint metrics, event and detection timestamps.

Outlier detection (``outlier_scores``)
    Confusion counts over rows (pool files by concatenating them), precision, recall,
    F1 = 2TP / (2TP + FP + FN), FAR = FP / negatives and MAR = FN / positives, as fractions
    (SKAB's table prints FAR and MAR in %). An empty ratio means nothing was claimed, so nothing
    was wrong: precision = 1 without positive predictions, recall = 1 and MAR = 0 without
    positive labels, FAR = 0 without negative labels, F1 = 1 when TP = FP = FN = 0. So
    recall + MAR = 1 always, and a detector that never fires on labelled data gets F1 = 0,
    FAR = 0, MAR = 1, SKAB's published "never fires" row.

Changepoints
    A true event is the first row of a run of 1s in the labels (``label_changepoints``) or any
    given timestamp. SKAB's own ``changepoint`` column marks more than label starts (the first
    normal row after an anomaly and phase changes inside it): pass its timestamps to reproduce
    SKAB's table. The predicted changepoints are SKAB's notebooks' (``prediction_cp =
    abs(prediction.diff()); prediction_cp[0] = prediction[0]``): every row where the 0/1
    prediction changes, and row 0 if it is 1 (``predicted_changepoints``).

NAB metric, two variants (``nab_skab``, ``nab_numenta``)
    Profiles (A_tp, A_fp, A_fn): standard (1, -0.11, -1), low-FP (1, -0.22, -1), low-FN
    (1, -0.11, -2); NAB's ``profiles.json`` writes the FP and FN weights as positive costs.
    Raw scores S are summed over all files, then normalized once:
    100 * (S - S_null) / (S_perfect - S_null) with S_null = n_windows * A_fn (never fires) and
    S_perfect = n_windows * A_tp, so a perfect detector scores 100 and a silent one 0; NaN when
    no file has a window. Scores are not rounded (SKAB rounds them to 2 decimals).
    A window is placed at each distinct event t: [t, t + w] ("start", SKAB's "righter") or
    [t - w/2, t + w/2] ("center", NAB's labeler), w = ``window_s`` (at least 1 ms).

    ``nab_skab`` is SKAB's ``core/metrics.py`` ``chp_score(metric="nab", window_width=...,
    anomaly_window_destination="righter")`` (waico/SKAB; Katser and Kozitsin 2020), the variant of
    SKAB's published table. It works in time. A window that starts at or before its
    predecessor's end is cut to start at that end (SKAB's default "cut right window"), so two
    windows can share an instant, and a detection there belongs to both. The first detection in
    a window (both ends inclusive) earns SKAB's ``my_scale`` reward, the tanh curve
    (A_tp - A_fp) / 2 * (1 - tanh(x) / tanh(pi/2)) + A_fp sampled at 1000 points x from -pi/2
    to pi/2, taken at index int(1000 * (d - start) / (end - start)) clipped to 999: A_tp at the
    window's start, A_fp at its end. Further detections in the window count nothing, a window
    without one costs A_fn, and a detection outside every window costs A_fp flat.

    ``nab_numenta`` is NAB's own (Lavin and Ahmad 2015; numenta/NAB ``nab/sweeper.py``, the v1.1
    scorer, with the window merging of ``nab/labeler.py``). It works in rows. A window holds the
    rows whose timestamps lie in it, windows that overlap or touch are merged into one, and
    every detection must be a row timestamp. With sigma(y) = 2 / (1 + exp(5y)) - 1
    (sigma = -1 for y > 3), the first detection at row i of a window of rows L..R, width
    W = R - L + 1, earns A_tp * sigma(-(R - i + 1) / W) / sigma(-1): A_tp at its first row,
    little at its last. A window without one costs A_fn. A detection at row i outside every
    window costs -A_fp * sigma((i - R') / (W' - 1)), with R' and W' the last row and width of
    the nearest window before it: almost nothing right after that window, |A_fp| beyond three
    widths. With no window before it, it costs A_fp in full.
    Departures from NAB: its probationary period (the first 15 % of a file is ignored) is not
    applied, so pass only the scored part of each file (for SKAB, rows 400 onwards). Merging is
    transitive (NAB's labeler loop skips the window after a merge). A false positive after a
    one-row window, where NAB divides by zero, counts as infinitely far. A window holding no
    row counts as missed.

Detection delay (``detection_delay``)
    For each labelled segment (a run of 1s in ``y_true``), the delay is the time from its first
    row to the first row predicted 1 at or after that row, searched up to the segment's last
    row or ``horizon_s`` after its start, whichever is later, but never into the next segment.
    A segment with no such row is missed. Reported: the number of segments, detected and
    missed, the mean and median delay in seconds (NaN when none is detected) and every delay.

``evaluate`` runs all of these on a list of files, scoring both NAB variants on the predicted
changepoints with the same windows, and ``Evaluation.to_dict`` gives JSON-ready output.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

Placement = Literal["start", "center"]
FileTimes = tuple[ArrayLike, ArrayLike, ArrayLike]  # (row timestamps, event times, detection times)
FileRows = tuple[ArrayLike, ArrayLike, ArrayLike]  # (row timestamps, y_true, y_pred)

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000
SKAB_DETAIL = 1000  # SKAB's my_scale `detalization`: points on its reward curve


@dataclass(frozen=True)
class Profile:
    """NAB weights: A_tp for the earliest detection, A_fp per false positive, A_fn per missed window."""

    a_tp: float
    a_fp: float
    a_fn: float


PROFILES: Mapping[str, Profile] = MappingProxyType({
    "standard": Profile(1.0, -0.11, -1.0),
    "low_fp": Profile(1.0, -0.22, -1.0),
    "low_fn": Profile(1.0, -0.11, -2.0),
})


@dataclass(frozen=True)
class OutlierScores:
    """Row-wise confusion counts and rates (empty ratios as in the module docstring)."""

    tp: int
    fp: int
    fn: int
    tn: int
    precision: float
    recall: float
    f1: float
    far: float
    mar: float


@dataclass(frozen=True)
class NabScores:
    """Normalized NAB score per profile, with the profile-free counts behind it."""

    standard: float
    low_fp: float
    low_fn: float
    windows: int
    detected: int
    false_positives: int


@dataclass(frozen=True)
class DelayStats:
    """Detection delays of labelled segments, in seconds."""

    segments: int
    detected: int
    missed: int
    mean_s: float
    median_s: float
    delays_s: tuple[float, ...]


@dataclass(frozen=True)
class Evaluation:
    """Everything ``evaluate`` measures for one detector."""

    outlier: OutlierScores
    nab_skab: NabScores
    nab_numenta: NabScores
    delay: DelayStats
    window_s: float
    placement: str

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict for JSON output: NaN becomes None, tuples become lists."""
        return _jsonable(asdict(self))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _ns(times: ArrayLike) -> np.ndarray:
    """Timestamps as int64 ns: datetime64 of any unit, or integers read as epoch milliseconds."""
    a = np.asarray(times)
    if a.ndim != 1:
        raise ValueError("timestamps must be a 1-D array")
    if np.issubdtype(a.dtype, np.datetime64):
        return a.astype("datetime64[ns]").astype(np.int64)
    if a.size == 0:
        return np.zeros(0, np.int64)
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.int64) * NS_PER_MS
    raise TypeError(f"timestamps must be datetime64 or integer epoch ms, not {a.dtype}")


def _row_times(timestamps: ArrayLike) -> np.ndarray:
    ts = _ns(timestamps)
    if np.any(np.diff(ts) <= 0):
        raise ValueError("row timestamps must be strictly increasing")
    return ts


def _flags(values: ArrayLike) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1:
        raise ValueError("labels and predictions must be 1-D arrays")
    if not np.isin(a, (0, 1)).all():
        raise ValueError("labels and predictions must hold only 0 and 1")
    return a.astype(bool)


def _rows(timestamps: ArrayLike, y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ts, t, p = _row_times(timestamps), _flags(y_true), _flags(y_pred)
    if not ts.size == t.size == p.size:
        raise ValueError(f"lengths differ: {ts.size} timestamps, {t.size} labels, {p.size} predictions")
    return ts, t, p


def _width_ns(window_s: float) -> int:
    width = round(window_s * NS_PER_S)
    if width < NS_PER_MS:
        raise ValueError(f"window_s must be at least 1 ms, not {window_s}")
    return width


def _ratio(num: int, den: int, empty: float) -> float:
    return num / den if den else empty


def outlier_scores(y_true: ArrayLike, y_pred: ArrayLike) -> OutlierScores:
    """Confusion counts, precision, recall, F1, FAR and MAR of a 0/1 prediction per row."""
    t, p = _flags(y_true), _flags(y_pred)
    if t.size != p.size:
        raise ValueError(f"lengths differ: {t.size} labels, {p.size} predictions")
    tp, fp = int(np.sum(t & p)), int(np.sum(~t & p))
    fn, tn = int(np.sum(t & ~p)), int(np.sum(~t & ~p))
    return OutlierScores(
        tp, fp, fn, tn,
        precision=_ratio(tp, tp + fp, 1.0),
        recall=_ratio(tp, tp + fn, 1.0),
        f1=_ratio(2 * tp, 2 * tp + fp + fn, 1.0),
        far=_ratio(fp, fp + tn, 0.0),
        mar=_ratio(fn, fn + tp, 0.0),
    )


def label_changepoints(labels: ArrayLike) -> np.ndarray:
    """Row indices where a run of 1s in a 0/1 label array starts."""
    y = _flags(labels)
    return np.flatnonzero(y & ~np.concatenate(([False], y[:-1])))


def predicted_changepoints(y_pred: ArrayLike) -> np.ndarray:
    """Row indices of SKAB's predicted changepoints: where the 0/1 prediction changes, and row 0 if it is 1."""
    y = _flags(y_pred)
    return np.flatnonzero(y != np.concatenate(([False], y[:-1])))


def _windows(events: np.ndarray, width: int, placement: Placement) -> tuple[np.ndarray, np.ndarray]:
    """Window (starts, ends) around sorted distinct events, before overlaps are resolved."""
    if placement == "start":
        return events.copy(), events + width
    if placement == "center":
        return events - width // 2, events + width // 2
    raise ValueError(f"placement must be 'start' or 'center', not {placement!r}")


def _first_within(values: np.ndarray, lows: np.ndarray, highs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per range [low, high]: whether sorted ``values`` has an element in it, and the index of the first such."""
    idx = np.searchsorted(values, lows, side="left")
    hit = idx < values.size
    hit[hit] = values[idx[hit]] <= highs[hit]
    return hit, idx


def _inside_any(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Whether each value lies in one of the sorted, non-overlapping (possibly touching) ranges."""
    k = np.searchsorted(starts, values, side="right") - 1
    inside = k >= 0
    inside[inside] = values[inside] <= ends[k[inside]]
    return inside


def _skab_curve(p: Profile) -> np.ndarray:
    """SKAB's ``my_scale`` curve (koef 1): A_tp at a window's start falling along a tanh to A_fp at its end."""
    x = np.linspace(-np.pi / 2, np.pi / 2, SKAB_DETAIL)
    return (p.a_tp - p.a_fp) / 2 * -1 * np.tanh(x) / np.tanh(np.pi / 2) + (p.a_tp - p.a_fp) / 2 + p.a_fp


def _skab_file(events: np.ndarray, detections: np.ndarray, width: int,
               placement: Placement) -> tuple[np.ndarray, int, int, int]:
    """One file under SKAB's variant: raw score per profile, windows, detected windows, false positives."""
    starts, ends = _windows(events, width, placement)
    starts[1:] = np.where(ends[:-1] >= starts[1:], ends[:-1], starts[1:])  # SKAB's "cut right window"
    hit, idx = _first_within(detections, starts, ends)
    first, s, e = detections[idx[hit]], starts[hit], ends[hit]
    points = np.minimum(((first - s) / (e - s) * SKAB_DETAIL).astype(np.int64), SKAB_DETAIL - 1)
    fps = int(np.count_nonzero(~_inside_any(detections, starts, ends)))
    missed = int(events.size - np.count_nonzero(hit))
    raw = np.array([p.a_fp * fps + p.a_fn * missed + _skab_curve(p)[points].sum() for p in PROFILES.values()])
    return raw, events.size, events.size - missed, fps


def _nab_sigmoid(y: np.ndarray) -> np.ndarray:
    """NAB's scaledSigmoid: 2 / (1 + exp(5y)) - 1, and -1 beyond three window widths (y > 3)."""
    out = np.full(y.shape, -1.0)
    near = y <= 3.0
    out[near] = 2 * (1 / (1 + np.exp(5 * y[near]))) - 1
    return out


NAB_MAX_TP = float(_nab_sigmoid(np.array([-1.0]))[0])  # sigma(-1): rewards are rescaled so a first row earns A_tp


def _merge(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union of windows that overlap or touch (ends must be sorted), as NAB's labeler merges them."""
    opens = np.ones(starts.size, dtype=bool)
    opens[1:] = starts[1:] > ends[:-1]
    closes = np.ones(starts.size, dtype=bool)
    closes[:-1] = opens[1:]
    return starts[opens], ends[closes]


def _detection_rows(timestamps: np.ndarray, detections: np.ndarray) -> np.ndarray:
    rows = np.searchsorted(timestamps, detections)
    if np.any(rows >= timestamps.size) or np.any(timestamps[np.minimum(rows, timestamps.size - 1)] != detections):
        raise ValueError("NAB's own variant scores rows: every detection must be a row timestamp")
    return rows


def _numenta_file(timestamps: np.ndarray, events: np.ndarray, detections: np.ndarray, width: int,
                  placement: Placement) -> tuple[np.ndarray, int, int, int]:
    """One file under NAB's variant: raw score per profile, windows, detected windows, false positives."""
    starts, ends = _merge(*_windows(events, width, placement))
    lo = np.searchsorted(timestamps, starts, side="left")
    hi = np.searchsorted(timestamps, ends, side="right") - 1
    lo, hi = lo[lo <= hi], hi[lo <= hi]  # a window without rows can only be missed
    size = hi - lo + 1
    rows = _detection_rows(timestamps, detections)
    hit, idx = _first_within(rows, lo, hi)
    tp = _nab_sigmoid(-(hi[hit] - rows[idx[hit]] + 1) / size[hit]) / NAB_MAX_TP
    outside = rows[~_inside_any(rows, lo, hi)]
    prev = np.searchsorted(hi, outside, side="left") - 1  # nearest window ending before the row
    past = np.full(outside.shape, np.inf)  # no window before it: as if infinitely far
    after = prev >= 0
    with np.errstate(divide="ignore"):
        past[after] = (outside[after] - hi[prev[after]]) / (size[prev[after]] - 1)
    fp = _nab_sigmoid(past)
    missed = int(starts.size - np.count_nonzero(hit))
    raw = np.array([(tp * p.a_tp).sum() + p.a_fn * missed - (fp * p.a_fp).sum() for p in PROFILES.values()])
    return raw, starts.size, starts.size - missed, outside.size


def _normalized(per_file: Iterable[tuple[np.ndarray, int, int, int]]) -> NabScores:
    raw, windows, detected, fps = np.zeros(len(PROFILES)), 0, 0, 0
    for file_raw, file_windows, file_detected, file_fps in per_file:
        raw, windows, detected, fps = raw + file_raw, windows + file_windows, detected + file_detected, fps + file_fps
    a_tp = np.array([p.a_tp for p in PROFILES.values()])
    a_fn = np.array([p.a_fn for p in PROFILES.values()])
    if windows:
        null, perfect = windows * a_fn, windows * a_tp
        scores = 100 * (raw - null) / (perfect - null)
    else:
        scores = np.full(len(PROFILES), np.nan)
    return NabScores(*(float(s) for s in scores), windows=windows, detected=detected, false_positives=fps)


def _events(times: ArrayLike) -> np.ndarray:
    return np.unique(_ns(times))


def nab_skab(files: Iterable[FileTimes], window_s: float = 60.0, placement: Placement = "start") -> NabScores:
    """SKAB's NAB variant over files of (row timestamps, true event times, detection times); rows are unused."""
    width = _width_ns(window_s)
    return _normalized(_skab_file(_events(ev), _events(det), width, placement) for _, ev, det in files)


def nab_numenta(files: Iterable[FileTimes], window_s: float, placement: Placement = "center") -> NabScores:
    """NAB's own scorer over files of (row timestamps, true event times, detection times at rows)."""
    width = _width_ns(window_s)
    return _normalized(_numenta_file(_row_times(ts), _events(ev), _events(det), width, placement)
                       for ts, ev, det in files)


def detection_delay(files: Iterable[FileRows], horizon_s: float = 0.0) -> DelayStats:
    """Delay from each labelled segment's start to the first predicted 1 (see the module docstring)."""
    return _delays((_rows(*f) for f in files), round(horizon_s * NS_PER_S))


def _delays(files: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], horizon: int) -> DelayStats:
    delays: list[float] = []
    segments = 0
    for ts, t, p in files:
        first = label_changepoints(t)
        last = np.flatnonzero(t & ~np.concatenate((t[1:], [False])))
        stop = np.maximum(last, np.searchsorted(ts, ts[first] + horizon, side="right") - 1)
        stop[:-1] = np.minimum(stop[:-1], first[1:] - 1)
        alarms = np.flatnonzero(p)
        hit, idx = _first_within(alarms, first, stop)
        delays.extend(((ts[alarms[idx[hit]]] - ts[first[hit]]) / NS_PER_S).tolist())
        segments += first.size
    found = np.array(delays)
    return DelayStats(
        segments=segments,
        detected=len(delays),
        missed=segments - len(delays),
        mean_s=float(found.mean()) if delays else math.nan,
        median_s=float(np.median(found)) if delays else math.nan,
        delays_s=tuple(delays),
    )


def evaluate(files: Sequence[Sequence[ArrayLike]], window_s: float = 60.0,
             placement: Placement = "start") -> Evaluation:
    """All metrics over files of (timestamps, y_true, y_pred[, true changepoint times]).

    True events default to the label segments' starts; detections are the predicted changepoints;
    both NAB variants use ``window_s`` and ``placement``, and the delay horizon is ``window_s``.
    """
    if not files:
        raise ValueError("evaluate needs at least one file")
    width = _width_ns(window_s)
    rows = [_rows(*f[:3]) for f in files]
    events = [_events(f[3]) if len(f) > 3 else ts[label_changepoints(t)] for f, (ts, t, _) in zip(files, rows)]
    scored = [(ts, ev, ts[predicted_changepoints(p)]) for (ts, _, p), ev in zip(rows, events)]
    return Evaluation(
        outlier=outlier_scores(np.concatenate([t for _, t, _ in rows]), np.concatenate([p for _, _, p in rows])),
        nab_skab=_normalized(_skab_file(ev, det, width, placement) for _, ev, det in scored),
        nab_numenta=_normalized(_numenta_file(ts, ev, det, width, placement) for ts, ev, det in scored),
        delay=_delays(rows, width),
        window_s=window_s,
        placement=placement,
    )
