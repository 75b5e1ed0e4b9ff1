"""aimass.models.evaluation against hand-computed cases and literal ports of SKAB's and NAB's scorers.

Hand cases use integer epoch-ms rows at 1 s steps. The expected NAB values come from the
definitions worked by hand, written with tanh identities: SKAB's reward at curve point k is
(A_tp - A_fp) / 2 * (1 - tanh(-pi/2 + k pi / 999) / tanh(pi/2)) + A_fp, and NAB's
2 / (1 + exp(5y)) - 1 = -tanh(5y / 2).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aimass.models.evaluation import (
    NabScores,
    detection_delay,
    evaluate,
    label_changepoints,
    nab_numenta,
    nab_skab,
    outlier_scores,
    predicted_changepoints,
)

MS = 1000  # ms per second
TS = np.arange(300, dtype=np.int64) * MS
FN_WEIGHTS = (-1.0, -1.0, -2.0)  # A_fn of standard, low-FP, low-FN
FP_WEIGHTS = (-0.11, -0.22, -0.11)


def secs(*t: float) -> np.ndarray:
    """Seconds as integer epoch ms."""
    return np.round(np.array(t, dtype=float) * MS).astype(np.int64)


def scores(r: NabScores) -> tuple[float, float, float]:
    return (r.standard, r.low_fp, r.low_fn)


def normalized(raw: tuple[float, float, float], windows: int) -> tuple[float, float, float]:
    """Hand-computed raw scores (standard, low-FP, low-FN) -> 100 (S - S_null) / (S_perfect - S_null)."""
    return tuple(100 * (s - windows * fn) / (windows - windows * fn) for s, fn in zip(raw, FN_WEIGHTS))


def skab_reward(k: int) -> tuple[float, float, float]:
    """SKAB's my_scale at curve point k for the three profiles."""
    falling = 1 - math.tanh(-math.pi / 2 + k * math.pi / 999) / math.tanh(math.pi / 2)
    return tuple((1 - a_fp) / 2 * falling + a_fp for a_fp in FP_WEIGHTS)


def nab_tp(y: float) -> float:
    """NAB's true-positive weight at relative position y (A_tp = 1): sigma(y) / sigma(-1)."""
    return math.tanh(-2.5 * y) / math.tanh(2.5)


def skab(dets: tuple[float, ...], events: tuple[float, ...] = (100,), window_s: float = 60.0) -> NabScores:
    return nab_skab([(TS, secs(*events), secs(*dets))], window_s)


def numenta(dets: tuple[float, ...], events: tuple[float, ...] = (100,), window_s: float = 9.0,
            placement: str = "start", ts: np.ndarray = TS) -> NabScores:
    return nab_numenta([(ts, secs(*events), secs(*dets))], window_s, placement)


# ---------------------------------------------------------------- outlier scores

def test_outlier_scores_hand_worked_confusion_matrix():
    y_true = [1, 1, 1, 0, 0, 0, 0, 0, 1, 0]
    y_pred = [1, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    s = outlier_scores(y_true, y_pred)
    assert (s.tp, s.fp, s.fn, s.tn) == (2, 1, 2, 5)
    assert s.precision == pytest.approx(2 / 3)
    assert s.recall == pytest.approx(0.5)
    assert s.f1 == pytest.approx(4 / 7)  # SKAB's TP / (TP + (FN + FP) / 2)
    assert s.far == pytest.approx(1 / 6)
    assert s.mar == pytest.approx(0.5)


def test_outlier_scores_never_fires_is_skabs_published_row():
    s = outlier_scores([0, 1, 1, 0, 1], [0, 0, 0, 0, 0])
    assert (s.f1, s.far, s.mar) == (0.0, 0.0, 1.0)
    assert (s.precision, s.recall) == (1.0, 0.0)


def test_outlier_scores_without_positive_labels():
    s = outlier_scores([0, 0, 0, 0], [0, 1, 0, 1])
    assert (s.tp, s.fp, s.fn, s.tn) == (0, 2, 0, 2)
    assert (s.precision, s.recall, s.f1, s.far, s.mar) == (0.0, 1.0, 0.0, 0.5, 0.0)


def test_outlier_scores_all_quiet_is_perfect():
    s = outlier_scores([0, 0, 0], np.zeros(3, dtype=bool))
    assert (s.precision, s.recall, s.f1, s.far, s.mar) == (1.0, 1.0, 1.0, 0.0, 0.0)


def test_outlier_scores_rejects_non_binary_and_mismatched_input():
    with pytest.raises(ValueError):
        outlier_scores([0, 2, 1], [0, 1, 1])
    with pytest.raises(ValueError):
        outlier_scores([0, 1], [0, 1, 1])


# ---------------------------------------------------------------- changepoints

def test_label_changepoints_are_segment_starts():
    assert label_changepoints([1, 1, 0, 1, 0, 0, 1]).tolist() == [0, 3, 6]
    assert label_changepoints([0, 0, 0]).tolist() == []


def test_predicted_changepoints_are_every_change_and_a_leading_one():
    assert predicted_changepoints([1, 1, 0, 0, 1]).tolist() == [0, 2, 4]
    assert predicted_changepoints([0, 0, 1, 1, 1]).tolist() == [2]
    assert predicted_changepoints([0, 1, 1, 0]).tolist() == [1, 3]
    assert predicted_changepoints([0.0, 0.0]).tolist() == []


@given(st.lists(st.integers(0, 1), min_size=1, max_size=60))
def test_predicted_changepoints_match_skabs_notebook_rule(pred):
    prediction = pd.Series(pred, index=pd.date_range("2020-03-09", periods=len(pred), freq="s"))
    prediction_cp = abs(prediction.diff())  # SKAB notebooks, e.g. notebooks/Conv-AE.ipynb
    prediction_cp.iloc[0] = prediction.iloc[0]
    assert predicted_changepoints(pred).tolist() == np.flatnonzero(prediction_cp.to_numpy() == 1).tolist()


# ---------------------------------------------------------------- NAB, SKAB's variant (window 60 s from t = 100 s)

def test_skab_detection_at_window_start_scores_100():
    assert scores(skab((100,))) == pytest.approx((100, 100, 100))


def test_skab_detection_mid_window_takes_curve_point_500():
    # (130 - 100) / 60 * 1000 = 500
    assert scores(skab((130,))) == pytest.approx(normalized(skab_reward(500), 1))


def test_skab_curve_point_is_truncated_not_rounded():
    # (101.55 - 100) / 60 * 1000 = 25.83 -> point 25
    assert scores(skab((101.55,))) == pytest.approx(normalized(skab_reward(25), 1))
    assert scores(skab((101.55,))) != pytest.approx(normalized(skab_reward(26), 1))


def test_skab_detection_at_window_end_earns_a_fp():
    assert scores(skab((160,))) == pytest.approx((44.5, 39.0, 63.0))  # raw -0.11, -0.22, -0.11


def test_skab_late_detection_is_a_miss_plus_a_false_positive():
    r = skab((161,))
    assert scores(r) == pytest.approx((-5.5, -11.0, -11 / 3))  # raw -1.11, -1.22, -2.11
    assert (r.windows, r.detected, r.false_positives) == (1, 0, 1)


def test_skab_missed_event_scores_0():
    assert scores(skab(())) == pytest.approx((0, 0, 0))


def test_skab_false_positive_before_the_window_costs_a_fp():
    assert scores(skab((50, 100))) == pytest.approx((94.5, 89.0, 100 * 2.89 / 3))


def test_skab_false_positive_after_the_window_costs_a_fp():
    assert scores(skab((100, 200))) == pytest.approx((94.5, 89.0, 100 * 2.89 / 3))


def test_skab_second_detection_in_a_window_counts_nothing():
    r = skab((100, 120, 160))
    assert scores(r) == pytest.approx((100, 100, 100))
    assert r.false_positives == 0


def test_skab_two_files_are_summed_before_normalizing():
    files = [(TS, secs(100), secs(100)), (TS, secs(100, 200), secs())]
    r = nab_skab(files)
    assert scores(r) == pytest.approx(normalized((-1.0, -1.0, -3.0), 3))
    assert r.standard == pytest.approx(100 / 3)  # not the mean of the files' 100 and 0
    assert (r.windows, r.detected) == (3, 1)


def test_skab_overlapping_window_is_cut_to_start_at_its_predecessors_end():
    # windows [100, 160] and [160, 190]: the detection at 130 is the second one in the first window
    assert scores(skab((100, 130), events=(100, 130))) == pytest.approx((50, 50, 50))
    # the shared instant 160 belongs to both windows, first in the second one
    assert scores(skab((100, 160), events=(100, 130))) == pytest.approx((100, 100, 100))
    # a detection is placed within the cut window: (175 - 160) / 30 * 1000 = 500
    raw = tuple(1 + s for s in skab_reward(500))
    assert scores(skab((100, 175), events=(100, 130))) == pytest.approx(normalized(raw, 2))


def test_skab_centered_windows():
    # window [70, 130]: (100 - 70) / 60 * 1000 = 500
    r = nab_skab([(TS, secs(100), secs(100))], 60.0, placement="center")
    assert scores(r) == pytest.approx(normalized(skab_reward(500), 1))


# ---------------------------------------------------------------- NAB's own variant (9 s from t = 100 s: rows 100..109)

def test_numenta_detection_at_window_start_scores_100():
    assert scores(numenta((100,))) == pytest.approx((100, 100, 100))


def test_numenta_detection_mid_window():
    # position -(109 - 105 + 1) / 10 = -0.5
    tp = nab_tp(-0.5)
    assert scores(numenta((105,))) == pytest.approx(normalized((tp, tp, tp), 1))


def test_numenta_detection_at_window_end_still_earns_a_little():
    tp = nab_tp(-0.1)  # position -(109 - 109 + 1) / 10
    assert tp == pytest.approx(0.24824, abs=1e-5)
    assert scores(numenta((109,))) == pytest.approx(normalized((tp, tp, tp), 1))


def test_numenta_late_detection_costs_by_distance_from_the_window():
    # (114 - 109) / (10 - 1) = 5/9 past the window: -A_fp * sigma(5/9) = A_fp * tanh(25/18)
    r = numenta((114,))
    raw = tuple(fn + fp * math.tanh(25 / 18) for fn, fp in zip(FN_WEIGHTS, FP_WEIGHTS))
    assert scores(r) == pytest.approx(normalized(raw, 1))
    assert (r.detected, r.false_positives) == (0, 1)


def test_numenta_false_positive_three_widths_after_costs_a_fp_in_full():
    # 137: (137 - 109) / 9 > 3 -> sigma = -1 exactly; 136: exactly 3 -> sigma(3) = -tanh(7.5)
    far = tuple(fn + fp for fn, fp in zip(FN_WEIGHTS, FP_WEIGHTS))
    assert scores(numenta((137,))) == pytest.approx(normalized(far, 1), rel=1e-12)
    at_three = tuple(fn + fp * math.tanh(7.5) for fn, fp in zip(FN_WEIGHTS, FP_WEIGHTS))
    assert scores(numenta((136,))) == pytest.approx(normalized(at_three, 1), rel=1e-12)
    assert scores(numenta((136,))) != pytest.approx(normalized(far, 1), rel=1e-12)


def test_numenta_false_positive_before_any_window_costs_a_fp():
    assert scores(numenta((50, 100))) == pytest.approx((94.5, 89.0, 100 * 2.89 / 3))


def test_numenta_false_positive_is_measured_from_the_nearest_preceding_window():
    # windows rows 100..109 and 150..159; 165 is (165 - 159) / 9 = 2/3 past the second
    raw = tuple(2 + fp * math.tanh(5 / 3) for fp in FP_WEIGHTS)
    assert scores(numenta((100, 150, 165), events=(100, 150))) == pytest.approx(normalized(raw, 2))


def test_numenta_second_detection_in_a_window_counts_nothing():
    r = numenta((100, 104, 109))
    assert scores(r) == pytest.approx((100, 100, 100))
    assert r.false_positives == 0


def test_numenta_missed_event_scores_0():
    assert scores(numenta(())) == pytest.approx((0, 0, 0))


def test_numenta_two_files_are_summed_before_normalizing():
    files = [(TS, secs(100), secs(100)), (TS, secs(100, 200), secs())]
    assert scores(nab_numenta(files, 9.0, "start")) == pytest.approx(normalized((-1.0, -1.0, -3.0), 3))


def test_numenta_overlapping_windows_merge_into_one():
    # [100, 109] and [105, 114] -> rows 100..114, width 15
    r = numenta((112,), events=(100, 105))
    tp = nab_tp(-(114 - 112 + 1) / 15)
    assert scores(r) == pytest.approx(normalized((tp, tp, tp), 1))
    assert r.windows == 1


def test_numenta_centered_window():
    # window [95, 105], width 11: position -(105 - 100 + 1) / 11
    tp = nab_tp(-6 / 11)
    assert scores(numenta((100,), window_s=10.0, placement="center")) == pytest.approx(normalized((tp, tp, tp), 1))


def test_numenta_false_positive_after_a_one_row_window_counts_as_far():
    r = numenta((100, 101), window_s=0.5)  # window [100, 100.5] holds row 100 only
    assert scores(r) == pytest.approx(normalized(tuple(1 + fp for fp in FP_WEIGHTS), 1))


def test_numenta_window_without_rows_is_missed():
    ts = secs(*range(100), *range(110, 200))
    r = numenta((50,), events=(105,), window_s=2.0, ts=ts)  # [105, 107] falls in the gap
    assert (r.windows, r.detected, r.false_positives) == (1, 0, 1)
    assert scores(r) == pytest.approx(normalized(tuple(fn + fp for fn, fp in zip(FN_WEIGHTS, FP_WEIGHTS)), 1))


def test_numenta_rejects_detections_off_the_rows():
    with pytest.raises(ValueError, match="row timestamp"):
        numenta((100.5,))


# ---------------------------------------------------------------- SKAB's published rows: never fires 0, perfect 100

PUBLISHED_EVENTS = [(30, 120, 200), (15,), (60, 250)]


@pytest.mark.parametrize("variant", [nab_skab, nab_numenta])
def test_never_fires_scores_0_and_perfect_scores_100(variant):
    never = [(TS, secs(*ev), secs()) for ev in PUBLISHED_EVENTS]
    perfect = [(TS, secs(*ev), secs(*ev)) for ev in PUBLISHED_EVENTS]
    assert scores(variant(never, 60.0, "start")) == (0.0, 0.0, 0.0)
    assert scores(variant(perfect, 60.0, "start")) == pytest.approx((100, 100, 100))


def test_no_windows_at_all_is_nan():
    r = nab_skab([(TS, secs(), secs(100))])
    assert all(math.isnan(s) for s in scores(r))
    assert r.false_positives == 1


def test_datetime64_and_epoch_ms_timestamps_agree():
    base = np.datetime64("2020-03-09T10:14:33", "s")
    as_dt = [(base + TS // MS, base + secs(100, 150) // MS, base + secs(105, 170, 250) // MS)]
    as_ms = [(TS + base.astype(np.int64) * MS, secs(100, 150) + base.astype(np.int64) * MS,
              secs(105, 170, 250) + base.astype(np.int64) * MS)]
    assert nab_skab(as_dt) == nab_skab(as_ms)
    assert nab_numenta(as_dt, 9.0) == nab_numenta(as_ms, 9.0)


# ---------------------------------------------------------------- detection delay

def _segments() -> np.ndarray:
    y = np.zeros(100, dtype=int)
    y[10:20] = y[40:50] = y[70:80] = 1
    return y


def test_delay_per_segment_start_to_first_predicted_one():
    p = np.zeros(100, dtype=int)
    p[13] = p[15] = p[40] = 1  # third segment missed
    d = detection_delay([(TS[:100], _segments(), p)])
    assert (d.segments, d.detected, d.missed) == (3, 2, 1)
    assert d.delays_s == (3.0, 0.0)
    assert (d.mean_s, d.median_s) == (1.5, 1.5)


def test_delay_counts_an_alarm_already_on_at_the_start_as_0():
    p = np.zeros(100, dtype=int)
    p[5:12] = 1
    assert detection_delay([(TS[:100], _segments(), p)]).delays_s == (0.0,)


def test_delay_horizon_extends_past_a_short_segment_but_not_into_the_next():
    p = np.zeros(100, dtype=int)
    p[52] = 1  # after the second segment (40..49)
    assert detection_delay([(TS[:100], _segments(), p)]).detected == 0
    assert detection_delay([(TS[:100], _segments(), p)], horizon_s=15).delays_s == (12.0,)
    y = np.zeros(30, dtype=int)
    y[10:13] = y[14:17] = 1
    p = np.zeros(30, dtype=int)
    p[14] = 1
    d = detection_delay([(TS[:30], y, p)], horizon_s=10)
    assert (d.detected, d.missed, d.delays_s) == (1, 1, (0.0,))


def test_delay_pools_files_and_is_nan_when_nothing_is_detected():
    p = np.zeros(100, dtype=int)
    p[12] = 1
    d = detection_delay([(TS[:100], _segments(), p), (TS[:100], _segments(), np.zeros(100, dtype=int))])
    assert (d.segments, d.detected, d.delays_s) == (6, 1, (2.0,))
    d = detection_delay([(TS[:100], _segments(), np.zeros(100, dtype=int))])
    assert math.isnan(d.mean_s) and math.isnan(d.median_s)


# ---------------------------------------------------------------- evaluate

def test_evaluate_combines_all_metrics_and_serializes():
    y1, p1 = _segments(), np.zeros(100, dtype=int)
    p1[12:25] = 1  # changepoints 12 and 25
    y2 = np.zeros(100, dtype=int)
    y2[50:60] = 1
    p2 = np.zeros(100, dtype=int)
    p2[5] = 1  # changepoints 5 and 6
    files = [(TS[:100], y1, p1), (TS[:100], y2, p2)]
    r = evaluate(files, window_s=30.0)
    assert r.outlier == outlier_scores(np.concatenate([y1, y2]), np.concatenate([p1, p2]))
    events = [TS[:100][label_changepoints(y)] for y in (y1, y2)]
    scored = [(TS[:100], ev, TS[:100][predicted_changepoints(p)]) for ev, p in zip(events, (p1, p2))]
    assert r.nab_skab == nab_skab(scored, 30.0)
    assert r.nab_numenta == nab_numenta(scored, 30.0, "start")
    assert r.nab_skab.windows == 4 and r.nab_skab.false_positives == 2
    assert r.delay == detection_delay(files, horizon_s=30.0)
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["nab_skab"]["standard"] == pytest.approx(r.nab_skab.standard)
    assert d["delay"]["delays_s"] == [2.0]
    assert d["outlier"]["tp"] == r.outlier.tp


def test_evaluate_takes_explicit_true_changepoints():
    y = _segments()
    p = np.zeros(100, dtype=int)
    p[20] = 1  # changepoints 20, 21
    r = evaluate([(TS[:100], y, p, TS[[10, 20]])], window_s=5.0)
    assert r.nab_skab == nab_skab([(TS[:100], TS[[10, 20]], TS[[20, 21]])], 5.0)
    assert r.nab_skab.detected == 1


def test_evaluate_nan_serializes_as_null():
    y = np.zeros(10, dtype=int)
    d = evaluate([(TS[:10], y, y)]).to_dict()
    assert d["nab_skab"]["standard"] is None and d["delay"]["mean_s"] is None
    json.dumps(d, allow_nan=False)


# ---------------------------------------------------------------- cross-check: SKAB's chp_score, ported literally

def skab_my_scale(fp_case_window, A_tp=1, A_fp=0, koef=1, detalization=1000):
    """waico/SKAB core/metrics.py my_scale (clear_anomalies_mode=True)."""
    x = np.linspace(-np.pi / 2, np.pi / 2, detalization)
    y = (A_tp - A_fp) / 2 * -1 * np.tanh(koef * x) / (np.tanh(np.pi * koef / 2)) + (A_tp - A_fp) / 2 + A_fp
    event = int((fp_case_window[1] - fp_case_window[0]) / (fp_case_window[-1] - fp_case_window[0]) * detalization)
    if event >= len(x):
        event = len(x) - 1
    return y[event]


def skab_chp_score_nab(true: list[list[pd.Timestamp]], prediction: list[pd.Series], window_width: str) -> dict:
    """chp_score(true, prediction, metric="nab", window_width=..., anomaly_window_destination="righter"),
    defaults otherwise (cut right window, first detection), without the final round(..., 2)."""
    table = {"Standard": (1.0, -0.11, -1.0), "LowFP": (1.0, -0.22, -1.0), "LowFN": (1.0, -0.11, -2.0)}
    matrix = np.zeros((3, 3))
    for true_ts, pred in zip(true, prediction):
        td = pd.Timedelta(window_width)  # single_detecting_boundaries
        boundaries = [[val, val + td] for val in true_ts]
        for i in range(len(boundaries) - 1):
            if boundaries[i][1] >= boundaries[i + 1][0]:
                boundaries[i + 1][0] = boundaries[i][1]
        times_pred = pred[pred.dropna() == 1].sort_index().index  # extract_cp_confusion_matrix
        tps, fps, fns = {}, [], []
        if len(boundaries) != 0:
            fps.append(times_pred[times_pred < boundaries[0][0]])
            for i in range(len(boundaries)):
                in_window = times_pred[(times_pred >= boundaries[i][0]) & (times_pred <= boundaries[i][1])]
                if len(in_window) == 0:
                    fns.append(i)
                else:
                    tps[i] = [boundaries[i][0], in_window[0], boundaries[i][1]]
                if len(boundaries) > i + 1:
                    fps.append(times_pred[(times_pred > boundaries[i][1]) & (times_pred < boundaries[i + 1][0])])
            fps.append(times_pred[times_pred > boundaries[i][1]])
        else:
            fps.append(times_pred)
        n_fps = len(np.concatenate(fps))
        rows = []  # single_evaluate_nab
        for a_tp, a_fp, a_fn in table.values():
            score = 0
            score += a_fp * n_fps
            score += a_fn * len(fns)
            for set_times in tps.values():
                score += skab_my_scale(set_times, a_tp, a_fp)
            rows.append((score, len(boundaries) * a_fn, len(boundaries) * a_tp))
        matrix = matrix + np.array(rows).T
    return {name: 100 * (matrix[0, t] - matrix[1, t]) / (matrix[2, t] - matrix[1, t]) for t, name in enumerate(table)}


BASE = pd.Timestamp("2020-03-09 10:14:33")


@st.composite
def changepoint_cases(draw, events_on_rows: bool):
    """Files of irregular 1 s-grained rows, a 0/1 prediction and sorted distinct events, plus a window."""
    files = []
    for _ in range(draw(st.integers(1, 3))):
        offsets = sorted(set(draw(st.lists(st.integers(0, 300), min_size=1, max_size=60))))
        pred = draw(st.lists(st.integers(0, 1), min_size=len(offsets), max_size=len(offsets)))
        if events_on_rows:
            events = sorted(set(draw(st.lists(st.sampled_from(offsets), max_size=5))))
        else:
            events = sorted(set(draw(st.lists(st.integers(-30, 330), max_size=5))))
        files.append((offsets, pred, events))
    assume(any(events for _, _, events in files))
    return files, draw(st.integers(1, 90))


def to_times(offsets: list[int]) -> pd.DatetimeIndex:
    return BASE + pd.to_timedelta(offsets, unit="s")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changepoint_cases(events_on_rows=False))
def test_nab_skab_matches_skabs_chp_score(case):
    files, window = case
    predictions, true = [], []
    for offsets, pred, events in files:
        prediction = pd.Series(pred, index=to_times(offsets))
        prediction_cp = abs(prediction.diff())
        prediction_cp.iloc[0] = prediction.iloc[0]
        predictions.append(prediction_cp)
        true.append(list(to_times(events)))
    expected = skab_chp_score_nab(true, predictions, f"{window}s")
    ours = nab_skab([(to_times(o).values, to_times(ev).values, to_times(o).values[predicted_changepoints(p)])
                     for o, p, ev in files], float(window))
    assert scores(ours) == pytest.approx(tuple(expected.values()), rel=1e-9, abs=1e-9)


# ---------------------------------------------------------------- cross-check: NAB's sweeper, ported literally

NAB_COSTS = [{"tpWeight": 1.0, "fpWeight": 0.11, "fnWeight": 1.0},   # standard
             {"tpWeight": 1.0, "fpWeight": 0.22, "fnWeight": 1.0},   # reward_low_FP_rate
             {"tpWeight": 1.0, "fpWeight": 0.11, "fnWeight": 2.0}]   # reward_low_FN_rate


def nab_scaled_sigmoid(relative_position):
    """numenta/NAB nab/sweeper.py scaledSigmoid."""
    if relative_position > 3.0:
        return -1.0
    return 2 * (1 / (1 + math.exp(-(-5 * relative_position)))) - 1.0


def nab_sweeper_score(timestamps, anomaly_scores, window_limits, name, cost, threshold=1.0):
    """Sweeper(probationPercent=0, costMatrix=cost).scoreDataSet(...)[1].score, ported line by line;
    a false positive after a one-row window (a division by zero in NAB) is infinitely far."""
    timestamps, window_limits = list(timestamps), list(window_limits)
    anomaly_list = []  # calcSweepScore
    max_tp = nab_scaled_sigmoid(-1.0)
    cur_limits = cur_name = cur_width = cur_right = prev_width = prev_right = None
    for i, (cur_time, cur_anomaly) in enumerate(zip(timestamps, anomaly_scores)):
        if window_limits and cur_time == window_limits[0][0]:
            cur_limits = window_limits.pop(0)
            cur_name = f"{name}|{cur_limits[0]}"
            cur_right = timestamps.index(cur_limits[1])
            cur_width = float(cur_right - timestamps.index(cur_limits[0]) + 1)
        if cur_limits is not None:
            weighted = nab_scaled_sigmoid(-(cur_right - i + 1) / cur_width) * cost["tpWeight"] / max_tp
        else:
            if prev_right is None:
                unweighted = -1.0
            else:
                denominator = float(prev_width - 1)
                unweighted = nab_scaled_sigmoid(abs(prev_right - i) / denominator if denominator else math.inf)
            weighted = unweighted * cost["fpWeight"]
        anomaly_list.append((cur_time, cur_anomaly, weighted, cur_name))
        if cur_limits is not None and cur_time == cur_limits[1]:
            prev_right, prev_width = i, cur_width
            cur_limits = cur_name = cur_width = cur_right = None
    scorable = sorted(anomaly_list, key=lambda x: x[1], reverse=True)  # calcScoreByThreshold
    parts = {"fp": 0}
    for row in scorable:
        if row[3] is not None:
            parts[row[3]] = -cost["fnWeight"]
    by_threshold, cur_threshold = [], 1.1
    for _, anomaly, sweep, window in scorable:
        if anomaly != cur_threshold:
            by_threshold.append((cur_threshold, sum(parts.values())))
            cur_threshold = anomaly
        if window is None:
            parts["fp"] += sweep
        else:
            parts[window] = max(parts[window], sweep)
    by_threshold.append((cur_threshold, sum(parts.values())))
    prev = None  # scoreDataSet
    for t, score in by_threshold:
        if t == threshold:
            return score
        if t < threshold:
            return prev[1]
        prev = (t, score)
    return prev[1]


def nab_window_limits(timestamps, events, window):
    """Row-snapped [event, event + window] limits, merged where they overlap or touch (transitively)."""
    limits = []
    for e in events:
        inside = [t for t in timestamps if e <= t <= e + window]
        limits.append([inside[0], inside[-1]])
    i = 0
    while len(limits) - 1 > i:
        if limits[i + 1][0] - limits[i][1] <= 0:
            limits[i] = [limits[i][0], limits[i + 1][1]]
            del limits[i + 1]
        else:
            i += 1
    return limits


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changepoint_cases(events_on_rows=True))
def test_nab_numenta_matches_nabs_sweeper(case):
    files, window = case
    raw, null, windows = np.zeros(3), np.zeros(3), 0
    for n, (offsets, pred, events) in enumerate(files):
        detections = np.zeros(len(offsets))
        detections[predicted_changepoints(pred)] = 1.0
        limits = nab_window_limits(offsets, events, window)
        windows += len(limits)
        for k, cost in enumerate(NAB_COSTS):
            raw[k] += nab_sweeper_score(offsets, detections, limits, n, cost)
            null[k] += nab_sweeper_score(offsets, np.zeros(len(offsets)), limits, n, cost)
    perfect = windows * np.array([c["tpWeight"] for c in NAB_COSTS])
    expected = 100 * (raw - null) / (perfect - null)  # nab/runner.py normalize()
    ours = nab_numenta([(secs(*o), secs(*ev), secs(*o)[predicted_changepoints(p)]) for o, p, ev in files],
                       float(window), "start")
    assert scores(ours) == pytest.approx(tuple(expected), rel=1e-9, abs=1e-9)
