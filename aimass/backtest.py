"""`aimass backtest FILE [--labels FILE]`: check the detectors on your own history before going live.

The history (the `aimass replay` formats) is published through MQTT under its own tenant and
flows through the real pipeline: the one already running on this config's ports, or an
embedded one started for the run. Once the store has everything, one output row per input
reading is written: timestamp, value, each model's anomaly score (0..1) for the window the
reading fell in, the forecast of that window and the residual, the alerts raised in it, and
why a reading was rejected, if it was. With labels, precision, recall and detection delay
per rule are printed too.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from aimass.core.clickhouse import open_reader
from aimass.core.config import Config
from aimass.demo import Pipeline, detection_scores, pipeline_running
from aimass.core.procs import StackError
from aimass.streams.history_replay import configure as configure_replay, load_history, replay
from aimass.streams.simulator import write_table

SERIES = ["device_id", "metric"]


def reading_windows(ts_ms: np.ndarray, window_s: int) -> np.ndarray:
    """End (exclusive, ms) of the tumbling window each timestamp falls in."""
    w = window_s * 1000
    return (ts_ms // w + 1) * w


def score_readings(history: pd.DataFrame, predictions: pd.DataFrame, alerts: pd.DataFrame,
                   rejects: pd.DataFrame, window_s: int) -> pd.DataFrame:
    """One row per input reading with the scores, forecast, residual, alerts and reject reason of its window."""
    out = history[["device_id", "metric", "ts_ms", "value"]].copy()
    out["window_end_ms"] = reading_windows(out["ts_ms"].to_numpy(np.int64), window_s)
    scored = predictions[SERIES + ["window_end_ms", "anomaly_triton", "anomaly_river", "anomaly"]]
    forecast = predictions[SERIES + ["target_end_ms", "forecast", "band_low", "band_high"]].rename(
        columns={"target_end_ms": "window_end_ms"})
    out = out.merge(scored.drop_duplicates(SERIES + ["window_end_ms"]), on=SERIES + ["window_end_ms"], how="left")
    out = out.merge(forecast.drop_duplicates(SERIES + ["window_end_ms"]), on=SERIES + ["window_end_ms"], how="left")
    out["residual"] = out["value"] - out["forecast"]
    if len(alerts):
        a = alerts.assign(window_end_ms=reading_windows(alerts["ts_ms"].to_numpy(np.int64), window_s))
        raised = a.groupby(SERIES + ["window_end_ms"])["rule"].agg(lambda r: ";".join(sorted(set(r)))).rename("alerts")
        out = out.merge(raised.reset_index(), on=SERIES + ["window_end_ms"], how="left")
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


def fetch(cfg: Config, tenant: str, window_s: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """This tenant's predictions, raised alarms and rejected readings from the store."""
    reader, db, t = open_reader(cfg), cfg.clickhouse.database, f"tenant = '{tenant}'"
    predictions = reader.query(
        f"SELECT device_id, metric, toUnixTimestamp64Milli(window_end_at) AS window_end_ms, "
        f"toUnixTimestamp64Milli(target_end_at) AS target_end_ms, anomaly_triton, anomaly_river, anomaly, "
        f"forecast, band_low, band_high FROM {db}.predictions FINAL WHERE {t} AND window_s = {window_s}").to_pandas()
    alerts = reader.query(
        f"SELECT rule, device_id, metric, toUnixTimestamp64Milli(ts) AS ts_ms, transition, tenant, ts "
        f"FROM {db}.alerts FINAL WHERE {t} AND transition IN ('raised', 'reraised')").to_pandas()
    rejects = reader.query(
        f"SELECT device_id, metric, toUnixTimestamp64Milli(ts) AS ts_ms, reason FROM {db}.rejects FINAL "
        f"WHERE {t}").to_pandas()
    return predictions, alerts, rejects


def stored_count(cfg: Config, tenant: str) -> int:
    """Readings of this tenant stored or rejected so far."""
    reader, db = open_reader(cfg), cfg.clickhouse.database
    q = (f"SELECT (SELECT count() FROM {db}.readings WHERE tenant = '{tenant}') + "
         f"(SELECT count() FROM {db}.rejects WHERE tenant = '{tenant}') AS n")
    return int(reader.query(q).column("n")[0].as_py())


def wait_for_store(cfg: Config, tenant: str, expected: int, timeout_s: float, say=print) -> int:
    """Wait until the store holds every replayed reading and stops growing (windows, predictions)."""
    deadline, last, stable_since = time.monotonic() + timeout_s, -1, time.monotonic()
    while time.monotonic() < deadline:
        n = stored_count(cfg, tenant)
        if n != last:
            last, stable_since = n, time.monotonic()
            say(f"stored {n:,d} / {expected:,d} readings ...")
        elif n >= expected and time.monotonic() - stable_since > 10:
            return n
        time.sleep(2)
    say(f"timed out after {timeout_s:.0f}s with {last:,d} of {expected:,d} readings stored; writing what is there")
    return last


def configure(p: argparse.ArgumentParser) -> None:
    configure_replay(p)
    p.description = __doc__
    p.set_defaults(tenant=None)
    p.add_argument("--labels", metavar="FILE",
                   help="labelled anomalies (CSV/Parquet: tenant, device_id, metric, start_ms, end_ms, kind) "
                        "to score precision, recall and detection delay")
    p.add_argument("--out", metavar="FILE", help="output file, .csv or .parquet (default FILE.backtest.csv)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the pipeline (default 600)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    history = load_history(args.file, args.ts_column, args.value_column, args.device_column, args.metric_column,
                           args.unit_column, args.device, args.metric, args.unit)
    if history.empty:
        raise StackError(f"{args.file} has no readings")
    tenant = args.tenant if args.tenant not in (None, "replay") else f"bt{int(time.time()) % 1000000}"
    out_path = Path(args.out or f"{args.file}.backtest.csv")
    window_s = cfg.predict.window_s
    print(f"backtest of {len(history):,d} readings ({history['device_id'].nunique()} devices) as tenant {tenant}")
    running = pipeline_running(cfg)
    with contextlib.nullcontext() if running else Pipeline(cfg):
        summary = replay(cfg, history, tenant=tenant, speed=args.speed, qos=args.qos)
        print(f"published {summary['messages']:,d} readings in {summary['elapsed_s']:.1f}s")
        wait_for_store(cfg, tenant, summary["messages"], args.timeout)
        predictions, alerts, rejects = fetch(cfg, tenant, window_s)
    result = score_readings(history, predictions, alerts, rejects, window_s)
    write_table(pa.Table.from_pandas(result, preserve_index=False), out_path)
    print(f"wrote {len(result):,d} rows to {out_path} ({result['anomaly'].notna().sum():,d} scored, "
          f"{(result['alerts'] != '').sum():,d} in alerted windows, {(result['rejected'] != '').sum():,d} rejected)")
    if args.labels:
        labels = load_labels(args.labels, tenant)
        for s in detection_scores(labels, alerts.to_dict("records")):
            print(f"{s['rule'] or s['model']}: precision {s['precision']:.2f} recall {s['recall']:.2f} "
                  f"mean delay {s['mean_delay_s']:.1f}s (TP {s['true_positives']}, FP {s['false_positives']}, "
                  f"FN {s['false_negatives']})")
    return 0


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
