"""Ground truth: predictions joined with the windows they predicted, and alerts scored against labels.

``OutcomeJoiner`` matches a prediction (series, window_s, target_end_ms) with the window row whose
window_end_ms == target_end_ms, whichever arrives first. Unmatched predictions wait ``horizon_s``
of event time, and windows are kept as long for late predictions.

``QualityTracker`` compares detections (alarm activations per rule; rising edges of the anomaly
score per model) with labelled intervals (tenant, device, metric or "" for all metrics,
start..end). A detection matches a label of its series when start <= t <= end + grace. Once the
watermark (latest event time seen) passes end + grace a label counts as a true positive for
each source that detected it (delay = first detection - start) and as a false negative for the
others; a detection that matched no label by t + grace is a false positive.
precision = matched detections / all decided detections, recall = TP / (TP + FN).
"""
from __future__ import annotations

import heapq
import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aimass.core import contract
from aimass.rules.model import RULE_ERROR

_SEP = "\x1f"
_PRED_COLUMNS = ["tenant", "device_id", "metric", "window_s", "target_end_ms", "forecast", "band_low", "band_high",
                 "forecaster_model", "degraded"]


def _join_key(table: pa.Table, end_column: str) -> pa.Array:
    """One string per row identifying (tenant, device_id, metric, window_s, end)."""
    parts = [table.column(c).fill_null("") for c in ("tenant", "device_id", "metric")]
    parts += [pc.cast(table.column("window_s"), pa.string()), pc.cast(table.column(end_column), pa.string())]
    return pc.binary_join_element_wise(*parts, _SEP)


def outcome_rows(joined: pa.Table) -> pa.Table:
    """contract.OUTCOMES rows from joined prediction + actual columns."""
    actual = joined.column("actual").to_numpy(zero_copy_only=False)
    forecast = joined.column("forecast").fill_null(np.nan).to_numpy(zero_copy_only=False)
    low = joined.column("band_low").fill_null(np.nan).to_numpy(zero_copy_only=False)
    high = joined.column("band_high").fill_null(np.nan).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore", divide="ignore"):
        residual = actual - forecast
        rel_error = np.abs(residual) / np.maximum(np.abs(actual), 1e-9)
        in_band = (actual >= low) & (actual <= high)
    return pa.table({
        "tenant": joined.column("tenant"), "device_id": joined.column("device_id"),
        "metric": joined.column("metric"), "window_s": joined.column("window_s"),
        "target_end_ms": joined.column("target_end_ms"), "forecast": forecast, "actual": actual,
        "residual": residual, "rel_error": rel_error, "in_band": in_band,
        "forecaster_model": joined.column("forecaster_model"), "degraded": joined.column("degraded"),
    }, schema=contract.OUTCOMES)


class OutcomeJoiner:
    """Joins prediction rows with the actual window means they predicted.

    Waiting predictions are an Arrow table (few: about one window's worth); the actuals, kept for
    late predictions over the whole horizon (up to hundreds of thousands), are a dict with a heap for
    eviction, so a batch costs work in proportion to the batch, not to the state. ``shares`` /
    ``merge`` / ``forget`` work per input partition, so each partition's share moves on its own.
    """

    def __init__(self, horizon_s: float = 300.0):
        self.horizon_ms = int(horizon_s * 1000)
        self.predictions = self._empty_predictions()
        self.actuals: dict[str, tuple[float, int]] = {}  # join key -> (window mean, window end)
        self._ends: list[tuple[int, str]] = []  # heap of (window end, key) for eviction
        self.watermark_ms = 0
        self.expired = 0  # predictions whose window never arrived within the horizon

    @staticmethod
    def _empty_predictions() -> pa.Table:
        schema = pa.schema([contract.PREDICTIONS.field(c) for c in _PRED_COLUMNS] + [("key", pa.string())])
        return schema.empty_table()

    def add_predictions(self, table: pa.Table) -> pa.Table:
        """Outcomes for predictions whose window is already here; the rest wait."""
        preds = table.select(_PRED_COLUMNS)
        preds = preds.append_column("key", _join_key(preds, "target_end_ms"))
        found = [self.actuals.get(k) for k in preds.column("key").to_pylist()]
        matched = np.array([f is not None for f in found], dtype=bool)
        joined = preds.filter(pa.array(matched)).append_column(
            "actual", pa.array([f[0] for f in found if f is not None], pa.float64()))
        self.predictions = pa.concat_tables([self.predictions, preds.filter(pa.array(~matched))])
        return outcome_rows(joined)

    def add_windows(self, table: pa.Table) -> pa.Table:
        """Outcomes for waiting predictions of these windows; the windows are kept for late predictions."""
        if table.num_rows == 0:
            return contract.empty(contract.OUTCOMES)
        keys = _join_key(table, "window_end_ms")
        actuals = pa.table({"key": keys, "actual": table.column("mean")})
        joined = self.predictions.join(actuals, "key", join_type="inner")
        if joined.num_rows:
            self.predictions = self.predictions.filter(
                pc.invert(pc.is_in(self.predictions.column("key"), value_set=joined.column("key"))))
        ends = table.column("window_end_ms").to_pylist()
        rows = list(zip(keys.to_pylist(), table.column("mean").to_pylist(), ends))
        for key, mean, end in rows:  # a replayed window replaces its earlier copy
            self.actuals[key] = (mean, end)
            heapq.heappush(self._ends, (end, key))
        self.watermark_ms = max(self.watermark_ms, max(ends))
        self._evict()
        return outcome_rows(joined)

    def _evict(self) -> None:
        oldest = self.watermark_ms - self.horizon_ms
        while self._ends and self._ends[0][0] < oldest:
            _, key = heapq.heappop(self._ends)
            self.actuals.pop(key, None)
        waiting = self.predictions.num_rows
        self.predictions = self.predictions.filter(pc.greater_equal(self.predictions.column("target_end_ms"), oldest))
        self.expired += waiting - self.predictions.num_rows

    def shares(self, part_of: Callable[[str, str], int], parts: Iterable[int]) -> dict[int, bytes]:
        """A snapshot per partition in ``parts`` of the devices ``part_of(tenant, device_id)`` puts there, in one
        pass: watermark, expiry count and kept actuals as a JSON header line, then the waiting predictions (Arrow IPC)."""
        cache: dict[tuple[str, str], int] = {}

        def part(tenant: str, device_id: str) -> int:
            found = cache.get((tenant, device_id))
            if found is None:
                found = cache[(tenant, device_id)] = part_of(tenant, device_id)
            return found

        actuals: dict[int, list] = {p: [] for p in parts}
        for key, (mean, end) in self.actuals.items():
            tenant, device_id, _ = key.split(_SEP, 2)
            if (share := actuals.get(part(tenant, device_id))) is not None:
                share.append((key, mean, end))
        pred_parts = np.array([part(t, d) for t, d in zip(self.predictions["tenant"].to_pylist(),
                                                          self.predictions["device_id"].to_pylist())], dtype=np.int64)
        out = {}
        for p, share in actuals.items():
            preds = self.predictions.filter(pa.array(pred_parts == p, pa.bool_()))
            sink = io.BytesIO()
            with pa.ipc.new_stream(sink, preds.schema) as writer:
                writer.write_table(preds)
            head = {"watermark_ms": self.watermark_ms, "expired": self.expired, "actuals": share}
            out[p] = json.dumps(head).encode() + b"\n" + sink.getvalue()
        return out

    def snapshot(self) -> bytes:
        """The whole state, as one ``shares`` snapshot."""
        return self.shares(lambda tenant, device_id: 0, [0])[0]

    def restore(self, blob: bytes) -> None:
        """Exactly the state of a ``snapshot``."""
        self.predictions, self.actuals, self._ends, self.watermark_ms = self._empty_predictions(), {}, [], 0
        self.merge(blob)
        self.expired = json.loads(blob.partition(b"\n")[0])["expired"]

    def merge(self, blob: bytes) -> None:
        """Add the devices of another partition's ``snapshot`` (their partition came to this alerter)."""
        head, _, body = blob.partition(b"\n")
        meta = json.loads(head)
        self.watermark_ms = max(self.watermark_ms, meta["watermark_ms"])
        self.predictions = pa.concat_tables([self.predictions, pa.ipc.open_stream(pa.BufferReader(body)).read_all()])
        for key, mean, end in meta["actuals"]:
            self.actuals[key] = (mean, end)
            heapq.heappush(self._ends, (end, key))

    def forget(self, drop: Callable[[str, str], bool]) -> None:
        """Drop the predictions and actuals of the devices ``drop`` selects (their partition went elsewhere)."""
        self.predictions = self.predictions.filter(pa.array(
            [not drop(t, d) for t, d in zip(self.predictions["tenant"].to_pylist(),
                                            self.predictions["device_id"].to_pylist())], pa.bool_()))
        self.actuals = {k: v for k, v in self.actuals.items() if not drop(*k.split(_SEP, 2)[:2])}
        self._ends = [(end, key) for key, (_, end) in self.actuals.items()]
        heapq.heapify(self._ends)


@dataclass
class Label:
    """One labelled interval and, per detection source, when it was first detected."""

    tenant: str
    device_id: str
    metric: str
    start_ms: int
    end_ms: int
    kind: str
    first_detection: dict = field(default_factory=dict)  # source -> event time
    decided: bool = False

    def covers(self, tenant: str, device_id: str, metric: str, ts_ms: int, grace_ms: int) -> bool:
        """Whether a detection on (device, metric) at ``ts_ms`` is one of this label; a device-level
        detection (metric ``DEVICE_METRIC``) covers a label on any metric of its device."""
        return (self.tenant == tenant and self.device_id == device_id
                and (metric == contract.DEVICE_METRIC or self.metric in ("", metric))
                and self.start_ms <= ts_ms <= self.end_ms + grace_ms)


@dataclass
class Score:
    """Decided counts of one detection source."""

    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0
    matched: int = 0
    delay_ms_sum: float = 0.0


class QualityTracker:
    """Live precision, recall and detection delay per rule and per model against labels."""

    def __init__(self, grace_s: float = 60.0, anomaly_threshold: float = 0.8):
        self.grace_ms = int(grace_s * 1000)
        self.threshold = anomaly_threshold
        self.labels: list[Label] = []
        self.pending: dict[str, list[tuple[str, str, str, int]]] = {}  # source -> detections
        self.scores: dict[str, Score] = {}
        self.above: set[tuple[str, str, str, int]] = set()  # series whose anomaly score is above threshold
        self.watermark_ms = 0

    @staticmethod
    def source(kind: str, name: str) -> str:
        return f"{kind}:{name}"

    def add_labels(self, table: pa.Table) -> None:
        for row in table.to_pylist():
            self.labels.append(Label(row["tenant"], row["device_id"], row["metric"] or "", row["start_ms"],
                                     row["end_ms"], row["kind"] or ""))

    def add_detection(self, source: str, tenant: str, device_id: str, metric: str, ts_ms: int) -> None:
        self.scores.setdefault(source, Score())
        self.pending.setdefault(source, []).append((tenant, device_id, metric, ts_ms))

    def add_alert_events(self, events: Iterable[dict]) -> None:
        """Alarm activations are the rules' detections (``rule_error``, the alerter's own alarm, is none)."""
        for e in events:
            if e["transition"] in ("raised", "reraised") and e["rule"] != RULE_ERROR:
                self.add_detection(self.source("rule", e["rule"]), e["tenant"], e["device_id"], e["metric"],
                                   e["ts_ms"])

    def add_predictions(self, table: pa.Table) -> None:
        """Rising edges of the anomaly score over the threshold are the models' detections."""
        if table.num_rows == 0:
            return
        self.watermark_ms = max(self.watermark_ms, pc.max(table.column("window_end_ms")).as_py() or 0)
        score = table.column("anomaly").fill_null(np.nan).to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            above = score >= self.threshold
        if not above.any() and not self.above:
            return
        cols = {c: table.column(c).to_pylist() for c in ("tenant", "device_id", "metric", "window_s",
                                                           "window_end_ms", "anomaly_model")}
        for i in range(table.num_rows):
            key = (cols["tenant"][i], cols["device_id"][i], cols["metric"][i], cols["window_s"][i])
            if above[i] and key not in self.above:
                self.above.add(key)
                self.add_detection(self.source("model", cols["anomaly_model"][i] or "unknown"), *key[:3],
                                   cols["window_end_ms"][i])
            elif not above[i]:
                self.above.discard(key)

    def advance(self, watermark_ms: int) -> None:
        self.watermark_ms = max(self.watermark_ms, watermark_ms)

    def decide(self) -> None:
        """Match pending detections to labels and settle everything older than the grace period."""
        wm, grace = self.watermark_ms, self.grace_ms
        for source, detections in self.pending.items():
            score, waiting = self.scores[source], []
            for det in detections:
                hits = [lab for lab in self.labels if lab.covers(*det, grace)]
                for lab in hits:
                    lab.first_detection[source] = min(lab.first_detection.get(source, det[3]), det[3])
                if hits:
                    score.matched += 1
                elif det[3] + grace < wm:
                    score.false_positives += 1
                else:
                    waiting.append(det)
            self.pending[source] = waiting
        for lab in self.labels:
            if lab.decided or lab.end_ms + grace >= wm:
                continue
            lab.decided = True
            for source, score in self.scores.items():
                if source in lab.first_detection:
                    score.true_positives += 1
                    score.delay_ms_sum += max(0, lab.first_detection[source] - lab.start_ms)
                else:
                    score.false_negatives += 1
        self.labels = [lab for lab in self.labels if not lab.decided or lab.end_ms + 2 * grace >= wm]

    def rows(self, computed_ms: int) -> list[dict]:
        """contract.QUALITY rows, one per rule and per model seen so far."""
        self.decide()
        out = []
        for source, s in sorted(self.scores.items()):
            kind, name = source.split(":", 1)
            decided = s.matched + s.false_positives
            out.append({
                "computed_ms": computed_ms, "rule": name if kind == "rule" else "",
                "model": name if kind == "model" else "",
                "true_positives": s.true_positives, "false_positives": s.false_positives,
                "false_negatives": s.false_negatives,
                "precision": s.matched / decided if decided else math.nan,
                "recall": s.true_positives / (s.true_positives + s.false_negatives)
                if s.true_positives + s.false_negatives else math.nan,
                "mean_delay_s": s.delay_ms_sum / s.true_positives / 1000 if s.true_positives else math.nan,
            })
        return out

    def snapshot(self) -> str:
        return json.dumps({"labels": [asdict(lab) for lab in self.labels], "pending": self.pending,
                           "scores": {k: asdict(v) for k, v in self.scores.items()},
                           "above": [list(k) for k in self.above], "watermark_ms": self.watermark_ms})

    def restore(self, text: str) -> None:
        snap = json.loads(text)
        self.labels = [Label(**d) for d in snap["labels"]]
        self.pending = {k: [tuple(d) for d in v] for k, v in snap["pending"].items()}
        self.scores = {k: Score(**v) for k, v in snap["scores"].items()}
        self.above = {tuple(k) for k in snap["above"]}
        self.watermark_ms = snap["watermark_ms"]
