"""The demo's screen: steady rates from counters that move once per flush, a table redrawn in place
no wider than 100 columns, a line every 10 s off a terminal, and aligned summary tables."""
from __future__ import annotations

import io
import math

import pyarrow as pa

from aimass.demo import detection_scores
from aimass.demo_screen import WIDTH, LiveScreen, Rates, aligned, detection_table, live_table, log_line, short


def flushing_counters(t: float) -> dict[str, float]:
    """Every stage at 1,000 readings/s, but each counter moves only once per 5 s flush."""
    flushed = math.floor(t / 5) * 5 * 1000
    return {"published": t * 1000, "aimass_bridge_readings_produced_total": flushed,
            "aimass_clean_readings_in_total": flushed, "aimass_clean_readings_out_total": flushed,
            'aimass_sink_rows_total{table="readings"}': flushed, "aimass_bridge_rejected_total": 3,
            "aimass_clean_rejected_total": 2, "aimass_clean_late_total": 1, "aimass_alarms_active": 4}


def test_rates_are_averaged_over_ten_seconds_not_one_flush():
    rates, seen = Rates(), []
    for i in range(1, 61):
        t = i * 1.0
        rates.add(t, flushing_counters(t))
        if t >= 12:
            seen.append(rates.rate("bridge"))
    # Over one 1 s tick the rate would be 0 or 5,000/s; over 10 s it stays near the real 1,000/s.
    assert min(seen) >= 500 and max(seen) <= 1500
    assert abs(sum(seen) / len(seen) - 1000) < 100
    assert rates.rate("publish") == 1000


def test_live_table_has_a_row_per_stage_and_fits_100_columns():
    rates = Rates()
    for t in (0.0, 10.0):
        rates.add(t, flushing_counters(t))
    lines = live_table(flushing_counters(10.0), rates, 75, 105)
    assert lines[0].startswith("AI Mass demo  elapsed 1:15  publishing, 1:45 left") and "alarms active 4" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == ["publish", "bridge", "clean", "window", "predict", "alert", "sink"]
    bridge = next(line for line in lines if line.startswith("bridge"))
    assert bridge.split()[1:5] == ["1,000", "10,000", "0", "3"]        # rate, total, backlog, rejected messages
    clean = next(line for line in lines if line.startswith("clean"))
    assert "2 +1 late" in clean
    lagging = {**flushing_counters(10.0), 'aimass_consumer_lag{group="p",partition="0",stage="predict",topic="w"}': 7,
               'aimass_consumer_lag{group="p",partition="1",stage="predict",topic="w"}': 5,
               'aimass_consumer_lag{group="a",partition="0",stage="alert",topic="p"}': 2}
    backlogs = {line.split()[0]: line[37:49].strip() for line in live_table(lagging, rates, 75, 105)[2:]}
    assert backlogs == {"publish": "-", "bridge": "0", "clean": "0", "window": "0 rec", "predict": "12 rec",
                        "alert": "2 rec", "sink": "0"}
    huge = {k: 1e12 for k in flushing_counters(0)}
    assert all(len(line) <= WIDTH for line in live_table(huge, rates, 1e6, None))
    assert "draining" in live_table(huge, rates, 1e6, None)[0]


def test_terminal_redraws_in_place_and_a_log_gets_a_line_every_ten_seconds():
    tty = io.StringIO()
    screen = LiveScreen(tty, terminal=True)
    for t in range(3):
        screen.update(float(t), flushing_counters(t), t, 60 - t)
    out = tty.getvalue()
    rows = len(live_table(flushing_counters(0), Rates(), 0, 0))
    assert out.count(f"\x1b[{rows}F") == 2                              # back to the top before each redraw
    assert out.count("\x1b[2K") == 3 * rows

    log = io.StringIO()
    screen = LiveScreen(log, terminal=False)
    for t in range(0, 31, 2):
        screen.update(float(t), flushing_counters(t), t, 60 - t)
    lines = log.getvalue().splitlines()
    assert [line.split("]")[0] for line in lines] == ["[0:00", "[0:10", "[0:20", "[0:30"]
    assert all(len(line) <= WIDTH and "\x1b" not in line for line in lines)


def test_a_log_line_keeps_every_field_within_100_columns():
    assert [short(n) for n in (0, 999, 1_000, 54_000, 999_499, 999_500, 2_704_000, 1e12)] == \
        ["0", "999", "1.00k", "54.0k", "999k", "1.00M", "2.70M", "1.00T"]
    default_demo = {"published": 54_000, "aimass_bridge_readings_produced_total": 54_000,
                    "aimass_clean_readings_out_total": 54_000, "aimass_predict_rows_total": 3_600,
                    'aimass_sink_rows_total{table="readings"}': 54_000, "aimass_alarms_active": 12}
    rates = Rates()
    rates.add(0.0, {k: 0.0 for k in default_demo})
    rates.add(180.0, default_demo)
    assert log_line(default_demo, rates, 180) == \
        "[3:00] published 54.0k stored 54.0k alarms 12 | /s: bridge 300 clean 300 predict 20"
    huge = {k: 999e12 for k in default_demo}
    rates.add(181.0, huge)
    line = log_line(huge, rates, 999 * 60 + 59)
    assert len(line) <= WIDTH and line.endswith("predict 5.52T") and "alarms 999T" in line   # nothing cut off


def test_summary_tables_are_aligned():
    lines = aligned(["name", "n"], [["a", "1"], ["longer", "1,000"]])
    assert lines == ["name        n", "a           1", "longer  1,000"]
    scores = [{"rule": "window_zscore", "model": "", "precision": 0.3, "recall": 0.5, "mean_delay_s": 12.34,
               "true_positives": 6, "false_positives": 14, "false_negatives": 6},
              {"rule": "", "model": "anomaly", "precision": math.nan, "recall": 0.0, "mean_delay_s": math.nan,
               "true_positives": 0, "false_positives": 0, "false_negatives": 12}]
    header, zscore, model = detection_table(scores)
    assert header.split() == ["detection", "precision", "recall", "mean", "delay", "s", "TP", "FP", "FN"]
    assert zscore.split() == ["rule", "window_zscore", "0.30", "0.50", "12.3", "6", "14", "6"]
    assert model.split() == ["model", "anomaly", "-", "0.00", "-", "0", "0", "12"]
    assert len({len(line) for line in (header, zscore)}) == 1           # right-aligned to the same edge


def test_detection_scores_have_a_row_per_rule_all_rules_and_model():
    """The demo's detection table: alarm activations per rule and the anomaly score's rising edges
    over the threshold per model, against labelled intervals."""
    labels = pa.table({"tenant": ["t"], "device_id": ["d1"], "metric": ["temp"], "start_ms": [100_000],
                       "end_ms": [130_000], "kind": ["spike"]})
    alerts = [{"tenant": "t", "device_id": "d1", "metric": "temp", "rule": "high", "transition": "raised",
               "ts": 104_000}]
    ends = [90_000, 110_000, 120_000, 130_000, 500_000]
    predictions = pa.table({"tenant": ["t"] * 5, "device_id": ["d1"] * 5, "metric": ["temp"] * 5,
                            "window_s": [10] * 5, "window_end_ms": ends, "anomaly": [0.1, 0.9, 0.95, 0.1, 0.85],
                            "anomaly_model": ["series"] * 5})
    rows = {r["rule"] or r["model"]: r for r in detection_scores(labels, alerts, predictions, 60.0, 0.8)}
    assert set(rows) == {"high", "(any rule)", "series"}
    assert (rows["high"]["true_positives"], rows["high"]["mean_delay_s"]) == (1, 4.0)
    model = rows["series"]                  # rising edges at 110 s (in the label) and 500 s (none)
    assert (model["true_positives"], model["false_positives"], model["precision"], model["mean_delay_s"]) == \
        (1, 1, 0.5, 10.0)
    assert any(line.split()[:2] == ["model", "series"] for line in detection_table(list(rows.values())))
