"""`aimass backtest FILE [--labels FILE]`: measure the detectors on labelled history before going live.

The history (the `aimass replay` formats, long or wide: one column per metric, like SKAB) is
published through MQTT under its own tenant and flows through the real pipeline, started for the
run in its own run directory on free ports. Its store keeps history of any age (no TTL) and
nothing is notified, so live data, its TTL and the people on call are never touched.

The backtest waits until every reading is stored or rejected, every window of those readings is
closed and every window has its prediction; a timeout, or nothing scored, is an error (exit 1,
saying what is missing). Then it writes one row per input reading (timestamp, value, each model's
anomaly score for the window the reading fell in, forecast, residual, alerts, reject reason).

With labels (a label column in the file, ``anomaly`` 0/1 per row, or ``--labels`` intervals) it
scores every detector, each model's score above ``alert.anomaly_threshold`` and each rule's
alarms (a row is flagged while an alarm of the rule is active), with ``aimass.models.evaluation``:
precision, recall, F1, false- and missing-alarm rates, detection delay and the NAB metric (SKAB's
variant and NAB's own, three profiles each). A wide file is scored per device and timestamp (a
model's score is the highest over the device's metrics, a rule fires when it fires on any), a
long file per reading. ``--fit-rows N`` leaves the first N rows of each device out of the scores
(its fitting part: SKAB's protocol uses 400).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from aimass.core import contract
from aimass.core.clickhouse import open_reader
from aimass.core.config import Config
from aimass.core.procs import StackError, free_port
from aimass.demo import Pipeline, detection_scores, json_safe
from aimass.demo_screen import aligned, detection_table, number
from aimass.models.evaluation import Evaluation, evaluate
from aimass.rules.model import load_rules
from aimass.streams.history_replay import configure as configure_replay, load_history, replay
from aimass.streams.simulator import write_table

SERIES = ["device_id", "metric"]
SCORE_COLUMNS = ("anomaly", "anomaly_level", "anomaly_spread", "anomaly_change", "anomaly_device", "anomaly_triton")
BACKTEST_IDLE_CLOSE_S = 30


def backtest_config(cfg: Config, tenant: str) -> Config:
    """A private pipeline for one backtest: own run dir and chDB store, free ports, no TTL, no notifications."""
    private = copy.deepcopy(cfg)
    private.run.dir = str(cfg.run_dir / "backtests" / tenant)
    private.mqtt.port = free_port()
    private.kafka.bootstrap = f"127.0.0.1:{free_port()}"
    t = private.triton
    t.http_port, t.grpc_port, t.metrics_port = free_port(), free_port(), free_port()
    t.url = ""  # predict talks to the backtest's own tritonserver, on its grpc_port
    for section in (private.bridge, private.worker, private.predict, private.alert, private.clickhouse):
        section.metrics_port = free_port()
    private.worker.web_port, private.alert.api_port, private.clickhouse.query_port = free_port(), free_port(), free_port()
    private.clickhouse.url, private.clickhouse.ttl_days, private.clickhouse.ttl_overrides = "", 0, ""  # no TTL
    private.bridge.max_past_days = time.time() / 86400 + 1  # history of any age since 1970 is accepted
    private.alert.notify = False
    # The replay ends every series at once: close their last windows soon after (their next
    # reading, if any, is published in event-time order, so an idle close never cuts one short).
    private.window.idle_close_s = max(BACKTEST_IDLE_CLOSE_S, *(size for size, _ in private.window.specs()))
    return private


def reading_windows(ts_ms: np.ndarray, window_s: int) -> np.ndarray:
    """End (exclusive, ms) of the tumbling window each timestamp falls in."""
    w = window_s * 1000
    return (ts_ms // w + 1) * w


def score_readings(history: pd.DataFrame, predictions: pd.DataFrame, alerts: pd.DataFrame,
                   rejects: pd.DataFrame, window_s: int) -> pd.DataFrame:
    """One row per input reading with the scores, forecast, residual, alerts and reject reason of its window."""
    out = history[["device_id", "metric", "ts_ms", "value"]].copy()
    out["window_end_ms"] = reading_windows(out["ts_ms"].to_numpy(np.int64), window_s)
    device_rows = predictions["metric"] == contract.DEVICE_METRIC
    scored = predictions[~device_rows][SERIES + ["window_end_ms", *SCORE_COLUMNS]].drop(columns="anomaly_device")
    device = predictions[device_rows][["device_id", "window_end_ms", "anomaly_device"]]
    out = out.merge(device.drop_duplicates(["device_id", "window_end_ms"]), on=["device_id", "window_end_ms"],
                    how="left")  # a device's score applies to every reading of the device in the window
    forecast = predictions[SERIES + ["target_end_ms", "forecast", "band_low", "band_high"]].rename(
        columns={"target_end_ms": "window_end_ms"})
    out = out.merge(scored.drop_duplicates(SERIES + ["window_end_ms"]), on=SERIES + ["window_end_ms"], how="left")
    out = out.merge(forecast.drop_duplicates(SERIES + ["window_end_ms"]), on=SERIES + ["window_end_ms"], how="left")
    out["residual"] = out["value"] - out["forecast"]
    raised = alerts[alerts["transition"].isin(["raised", "reraised"])] if len(alerts) else alerts
    if len(raised):
        a = raised.assign(window_end_ms=reading_windows(raised["ts_ms"].to_numpy(np.int64), window_s))
        names = a.groupby(SERIES + ["window_end_ms"])["rule"].agg(lambda r: ";".join(sorted(set(r)))).rename("alerts")
        out = out.merge(names.reset_index(), on=SERIES + ["window_end_ms"], how="left")
    else:
        out["alerts"] = ""
    if len(rejects):
        reasons = rejects.drop_duplicates(SERIES + ["ts_ms"])[SERIES + ["ts_ms", "reason"]]
        out = out.merge(reasons.rename(columns={"reason": "rejected"}), on=SERIES + ["ts_ms"], how="left")
    else:
        out["rejected"] = ""
    out["alerts"] = out["alerts"].fillna("")
    out["rejected"] = out["rejected"].fillna("")
    return out


# --- detectors row by row --------------------------------------------------------------

def alarm_cover(alerts: pd.DataFrame, windowed_rules: set[str], window_s: int) -> pd.DataFrame:
    """Alarm events moved to the readings they judge: a rule on windows or predictions decides about
    a whole window (its event time is the window's end), so its transitions count from the window's
    start; a re-open (cleared and raised at one time) leaves the window's first reading unalarmed."""
    if not len(alerts):
        return alerts
    a = alerts.copy()
    windowed = a["rule"].isin(windowed_rules).to_numpy()
    a.loc[windowed, "ts_ms"] = a.loc[windowed, "ts_ms"] - window_s * 1000
    key = ["rule", "device_id", "metric", "ts_ms"]
    cleared = a[a["transition"] == "cleared"][key].drop_duplicates().assign(reopen=True)
    a = a.merge(cleared, on=key, how="left")
    raise_again = a["transition"].isin(["raised", "reraised"]) & a["reopen"].eq(True)
    a.loc[raise_again, "ts_ms"] += 1
    return a.drop(columns="reopen")


def alarm_active(ts_ms: np.ndarray, events: pd.DataFrame) -> np.ndarray:
    """Whether an alarm with these lifecycle events (one series, one rule) is active at each time.

    Active from a raise (``raised`` / ``reraised``) up to, not including, the next ``cleared``."""
    events = events.sort_values("ts_ms", kind="stable")
    up = events["transition"].isin(["raised", "reraised"]).to_numpy()
    down = (events["transition"] == "cleared").to_numpy()
    times = events["ts_ms"].to_numpy(np.int64)[up | down]
    state = np.append(up[up | down], False)  # True: active from that time on; [-1]: before any event
    return state[np.searchsorted(times, ts_ms, side="right") - 1]


def detector_flags(scored: pd.DataFrame, alerts: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """0/1 per reading for every detector: ``model:<score>`` above the threshold, ``rule:<name>``
    while its alarm on the reading's series is active, and ``rules:any``."""
    flags = pd.DataFrame(index=scored.index)
    for col in SCORE_COLUMNS:
        flags[f"model:{col}"] = (scored[col].fillna(0.0) >= threshold).to_numpy()
    rules = sorted(alerts["rule"].unique()) if len(alerts) else []
    series_rows = scored.groupby(SERIES, sort=False).indices
    ts_ms = scored["ts_ms"].to_numpy(np.int64)
    device_rows = scored.groupby("device_id", sort=False).indices
    for rule in rules:
        active = np.zeros(len(scored), bool)
        for (device, metric), events in alerts[alerts["rule"] == rule].groupby(SERIES):
            rows = (device_rows.get(device, np.empty(0, np.int64)) if metric == contract.DEVICE_METRIC
                    else series_rows.get((device, metric), np.empty(0, np.int64)))
            active[rows] |= alarm_active(ts_ms[rows], events)
        flags[f"rule:{rule}"] = active
    flags["rules:any"] = flags[[f"rule:{r}" for r in rules]].any(axis=1) if rules else False
    return flags


def interval_labels(readings: pd.DataFrame, labels: pd.DataFrame) -> np.ndarray:
    """1 for readings inside a labelled interval of their device (and metric, where the label names one)."""
    out = np.zeros(len(readings), bool)
    for lab in labels.itertuples(index=False):
        hit = (readings["device_id"] == lab.device_id) & readings["ts_ms"].between(lab.start_ms, lab.end_ms)
        if lab.metric:
            hit &= readings["metric"] == lab.metric
        out |= hit.to_numpy()
    return out


def evaluation_units(readings: pd.DataFrame, flags: pd.DataFrame, wide: bool, fit_rows: int) -> pd.DataFrame:
    """The rows that are scored: per device and timestamp for a wide file (a detector fires when it
    fires on any metric), per reading for a long one; each file's first ``fit_rows`` rows dropped."""
    frame = pd.concat([readings[["device_id", "metric", "ts_ms", "label", "changepoint", "scored"]], flags], axis=1)
    key = ["device_id"] if wide else SERIES
    if wide:
        frame = frame.groupby(["device_id", "ts_ms"], sort=True).max(numeric_only=False).reset_index()
    frame = frame.drop_duplicates([*key, "ts_ms"]).sort_values([*key, "ts_ms"], kind="stable")
    frame = frame[frame.groupby(key, sort=False).cumcount() >= fit_rows]
    return frame.assign(file=frame.groupby(key, sort=True).ngroup())


def evaluate_detectors(units: pd.DataFrame, detectors: list[str], nab_window_s: float,
                       changepoints: bool) -> dict[str, Evaluation]:
    """Every detector's evaluation over the units, one file per device (or series)."""
    files = [f for _, f in units.groupby("file", sort=True)]
    results = {}
    for name in detectors:
        per_file = []
        for f in files:
            ts, label, pred = f["ts_ms"].to_numpy(np.int64), f["label"].to_numpy(bool), f[name].to_numpy(bool)
            per_file.append((ts, label, pred, ts[f["changepoint"].to_numpy(bool)]) if changepoints
                            else (ts, label, pred))
        results[name] = evaluate(per_file, window_s=nab_window_s)
    return results


def evaluation_table(results: dict[str, Evaluation]) -> list[str]:
    """One aligned row per detector: outlier scores, delay and both NAB variants (standard profile)."""
    # precision of a detector that never fired is 1 by convention (nothing claimed); shown as "-"
    rows = [[name, number(e.outlier.precision if e.outlier.tp + e.outlier.fp else math.nan, ".2f"),
             number(e.outlier.recall, ".2f"), number(e.outlier.f1, ".2f"), number(100 * e.outlier.far, ".1f"),
             number(100 * e.outlier.mar, ".1f"), number(e.delay.mean_s, ".1f"), number(e.nab_skab.standard, ".1f"),
             number(e.nab_skab.low_fp, ".1f"), number(e.nab_skab.low_fn, ".1f"), number(e.nab_numenta.standard, ".1f")]
            for name, e in results.items()]
    return aligned(["detector", "precision", "recall", "F1", "FAR %", "MAR %", "delay s", "NAB", "NAB lowFP",
                    "NAB lowFN", "NAB (Numenta)"], rows)


# --- waiting for the pipeline ------------------------------------------------------------

def progress(cfg: Config, tenant: str, window_s: int) -> dict[str, int]:
    """How far the store is: readings in, their windows, windows closed, predictions."""
    reader, db, t, w = open_reader(cfg), cfg.clickhouse.database, f"tenant = '{tenant}'", window_s * 1000
    q = (f"SELECT (SELECT count() FROM {db}.readings FINAL WHERE {t}) AS stored, "
         f"(SELECT count() FROM {db}.rejects FINAL WHERE {t}) AS rejected, "
         f"(SELECT uniqExact(device_id, metric, intDiv(toUnixTimestamp64Milli(ts), {w})) FROM {db}.readings FINAL "
         f"WHERE {t} AND isFinite(value)) AS reading_windows, "
         f"(SELECT count() FROM {db}.windows FINAL WHERE {t} AND window_s = {window_s} AND isFinite(mean)) AS windows, "
         f"(SELECT count() FROM {db}.predictions FINAL WHERE {t} AND window_s = {window_s}) AS predictions")
    return {k: int(v[0]) for k, v in reader.query(q).to_pydict().items()}


def complete(p: dict[str, int], published: int) -> bool:
    return (p["stored"] + p["rejected"] >= published and p["windows"] >= p["reading_windows"]
            and p["predictions"] >= p["windows"])


def wait_for_pipeline(cfg: Config, tenant: str, published: int, window_s: int, timeout_s: float,
                      say=print) -> dict[str, int]:
    """Wait until every reading is in, every window is closed and predicted; StackError on timeout."""
    deadline, last, shown = time.monotonic() + timeout_s, None, 0.0
    while True:
        p = progress(cfg, tenant, window_s)
        if complete(p, published) and p == last:  # and nothing moved since the last look (late duplicates)
            return p
        if time.monotonic() - shown >= 10:
            shown = time.monotonic()
            say(f"stored {p['stored'] + p['rejected']:,d} / {published:,d} readings, windows closed "
                f"{p['windows']:,d} / {p['reading_windows']:,d}, predicted {p['predictions']:,d}")
        if time.monotonic() > deadline:
            raise StackError(
                f"backtest timed out after {timeout_s:.0f}s: {p['stored'] + p['rejected']:,d} of {published:,d} "
                f"readings stored or rejected, {p['windows']:,d} of {p['reading_windows']:,d} windows closed, "
                f"{p['predictions']:,d} of {p['windows']:,d} windows predicted; the stage logs are in "
                f"{cfg.run_dir / 'logs'}; a larger --timeout helps a long history")
        last = p
        time.sleep(3)


def fetch(cfg: Config, tenant: str, window_s: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """This tenant's predictions, alarm lifecycle events and rejected readings from the store."""
    reader, db, t = open_reader(cfg), cfg.clickhouse.database, f"tenant = '{tenant}'"
    predictions = reader.query(
        f"SELECT device_id, metric, toUnixTimestamp64Milli(window_end_at) AS window_end_ms, "
        f"toUnixTimestamp64Milli(target_end_at) AS target_end_ms, anomaly_triton, anomaly_level, anomaly_spread, anomaly_change, anomaly_device, anomaly, regime_change, "
        f"forecast, band_low, band_high FROM {db}.predictions FINAL WHERE {t} AND window_s = {window_s}").to_pandas()
    alerts = reader.query(
        f"SELECT rule, device_id, metric, toUnixTimestamp64Milli(ts) AS ts_ms, transition, tenant, ts "
        f"FROM {db}.alerts FINAL WHERE {t} AND transition IN ('raised', 'reraised', 'cleared')").to_pandas()
    rejects = reader.query(
        f"SELECT device_id, metric, toUnixTimestamp64Milli(ts) AS ts_ms, reason FROM {db}.rejects FINAL "
        f"WHERE {t}").to_pandas()
    return predictions, alerts, rejects


# --- CLI ------------------------------------------------------------------------------

def configure(p: argparse.ArgumentParser) -> None:
    configure_replay(p)
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.set_defaults(tenant=None)
    p.add_argument("--labels", metavar="FILE",
                   help="labelled anomalies (CSV/Parquet: device_id, start_ms, end_ms; optional metric, kind); "
                        "without it, the file's own 'anomaly' column (0/1 per row) is the labels")
    p.add_argument("--fit-rows", type=int, default=0, metavar="N",
                   help="the first N rows of each device are its fitting part: replayed, not scored (default 0)")
    p.add_argument("--nab-window-s", type=float, default=60.0,
                   help="NAB window after each true changepoint, in seconds (default 60, SKAB's)")
    p.add_argument("--out", metavar="FILE", help="per-reading output, .csv or .parquet (default FILE.backtest.csv)")
    p.add_argument("--report", metavar="FILE.json", help="also write every figure as JSON here")
    p.add_argument("--keep-store", action="store_true",
                   help="keep the backtest's run dir (its store) afterwards; `AIMASS_RUN_DIR=DIR aimass query` reads it")
    p.add_argument("--workers", type=int, default=1, help="Faust workers of the private pipeline (default 1)")
    p.add_argument("--timeout", type=float, default=900,
                   help="seconds to wait for the pipeline after publishing (default 900); a timeout is an error")


def run(args: argparse.Namespace, cfg: Config) -> int:
    history = load_history(args.file, args.ts_column, args.value_column, args.device_column, args.metric_column,
                           args.unit_column, args.device, args.metric, args.unit)
    if history.empty:
        raise StackError(f"{args.file} has no readings")
    tenant = args.tenant if args.tenant not in (None, "replay") else f"bt{int(time.time()) % 1000000}"
    out_path = Path(args.out or f"{args.file}.backtest.csv")
    window_s = cfg.predict.window_s
    private = backtest_config(cfg, tenant)
    span_days = (history["ts_ms"].iloc[-1] - history["ts_ms"].iloc[0]) / 86_400_000
    print(f"backtest of {len(history):,d} readings ({history['device_id'].nunique()} devices, "
          f"{history['metric'].nunique()} metrics, {span_days:,.1f} days) as tenant {tenant}; "
          f"private pipeline in {private.run_dir}")
    with Pipeline(private, args.workers, webhook_port=None):
        summary = replay(private, history, tenant=tenant, speed=args.speed, qos=args.qos)
        if not summary["all_acked"]:
            raise StackError(f"the broker did not acknowledge every published reading; logs in {private.run_dir}")
        print(f"published {summary['messages']:,d} readings in {summary['elapsed_s']:.1f}s")
        done = wait_for_pipeline(private, tenant, summary["messages"], window_s, args.timeout)
        predictions, alerts, rejects = fetch(private, tenant, window_s)
    if not args.keep_store:  # a failed backtest keeps it: its logs say why
        shutil.rmtree(private.run_dir, ignore_errors=True)
    result = score_readings(history, predictions, alerts, rejects, window_s)
    write_table(pa.Table.from_pandas(result, preserve_index=False), out_path)
    scored = int(result["anomaly"].notna().sum())
    rejected = int((result["rejected"] != "").sum())  # a re-sent copy is rejected while its original is scored
    unscored = int((result["anomaly"].isna() & (result["rejected"] == "")).sum())
    print(f"wrote {len(result):,d} rows to {out_path}: {scored:,d} scored, {unscored:,d} accepted but unscored, "
          f"{rejected:,d} rejected, {int((result['alerts'] != '').sum()):,d} in alerted windows")
    print(f"store: {done['stored']:,d} readings, {done['windows']:,d} windows, {done['predictions']:,d} predictions")
    if scored == 0:
        raise StackError(f"nothing was scored: {done['predictions']:,d} predictions for {len(result):,d} readings")
    report = {"tenant": tenant, "readings": len(result), "scored": scored, "unscored": unscored,
              "rejected": rejected, "store": done}
    report.update(score_detectors(args, history, result, alerts, tenant, cfg))
    if args.report:
        Path(args.report).write_text(json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n")
        print(f"report written to {args.report}")
    return 0


def score_detectors(args: argparse.Namespace, history: pd.DataFrame, result: pd.DataFrame, alerts: pd.DataFrame,
                    tenant: str, cfg: Config) -> dict:
    """Print and return the detectors' scores against the labels (nothing when there are none)."""
    labels = load_labels(args.labels, tenant) if args.labels else None
    if labels is not None:
        history_labels = interval_labels(history, labels.to_pandas())
    elif "anomaly" in history.columns:
        history_labels = history["anomaly"].to_numpy(np.float64) > 0.5
    else:
        print("no labels (--labels FILE, or an 'anomaly' column in the file): detectors not scored")
        return {}
    readings = result[["device_id", "metric", "ts_ms"]].assign(
        label=history_labels, scored=result["anomaly"].notna().to_numpy(),
        changepoint=history["changepoint"].to_numpy(np.float64) > 0.5 if "changepoint" in history.columns else False)
    windowed = {r.name for r in load_rules(cfg.alert.rules_path).rules if r.stream in ("windows", "predictions")}
    flags = detector_flags(result, alarm_cover(alerts, windowed, cfg.predict.window_s), cfg.alert.anomaly_threshold)
    units = evaluation_units(readings, flags, history.attrs.get("wide", False), args.fit_rows)
    results = evaluate_detectors(units, list(flags.columns), args.nab_window_s, "changepoint" in history.columns)
    print(f"\ndetection per {'device and timestamp' if history.attrs.get('wide') else 'reading'}: "
          f"{len(units):,d} rows scored ({int(units['label'].sum()):,d} labelled anomalous, "
          f"{int((~units['scored']).sum()):,d} without a score); models above {cfg.alert.anomaly_threshold}; "
          f"NAB window {args.nab_window_s:g}s")
    for line in evaluation_table(results):
        print(line)
    out = {"evaluation": {name: e.to_dict() for name, e in results.items()},
           "units": len(units), "unscored_units": int((~units["scored"]).sum())}
    if labels is not None:  # labelled events: is each one alarmed, and how soon (the demo's table)
        out["events"] = detection_scores(labels, alerts.to_dict("records"))
        print("\nlabelled events (an alarm overlapping the event's interval detects it):")
        for line in detection_table(out["events"]):
            print(line)
    return out


def load_labels(path: str, tenant: str) -> pa.Table:
    """A labels file (simulator output or hand-made) re-tenanted to the backtest's tenant."""
    frame = pd.read_parquet(path) if path.endswith((".parquet", ".pq")) else pd.read_csv(path)
    missing = {"device_id", "start_ms", "end_ms"} - set(frame.columns)
    if missing:
        raise StackError(f"labels file {path} lacks columns {sorted(missing)} (needs device_id, start_ms, end_ms; "
                         f"optional metric, kind)")
    return pa.table({
        "tenant": [tenant] * len(frame), "device_id": frame["device_id"].astype(str),
        "metric": frame["metric"].fillna("").astype(str) if "metric" in frame else [""] * len(frame),
        "start_ms": frame["start_ms"].astype("int64"), "end_ms": frame["end_ms"].astype("int64"),
        "kind": frame["kind"].fillna("").astype(str) if "kind" in frame else [""] * len(frame),
    })
