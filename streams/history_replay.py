"""Replay history through the live pipeline (`aimass replay FILE`; module aimass.streams.history_replay).

Reads a CSV (separator `,`, `;` or tab, from the header) or Parquet file, sorts it by event time
and publishes every reading as a single-reading JSON message with its original timestamp, at a
chosen speed-up (``--speed 60``: one hour of history per minute; 0: as fast as possible).

Two shapes are accepted. Long: a timestamp and a value column, with optional device, metric and
unit columns (or one device / metric given on the command line). Wide: a timestamp and one numeric
column per metric (as SKAB and most exports have it); column names become metric names, with
characters a metric name cannot hold replaced by ``_``. Per-row label columns (``anomaly``,
``changepoint``: 0/1) are never published; they are kept with the readings for `aimass backtest`.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import orjson
import pandas as pd

from aimass.core.config import Config
from aimass.core.procs import StackError
from aimass.streams.mqtt import Publisher
from aimass.streams.payloads import ID_RE, METRIC_RE, MS_THRESHOLD, TopicPattern, check_unit, encode_reading

TS_COLUMNS = ("ts_ms", "ts", "timestamp", "time", "datetime", "date")
VALUE_COLUMNS = ("value", "y", "reading")
DEVICE_COLUMNS = ("device_id", "device")
METRIC_COLUMNS = ("metric", "sensor", "name")
LABEL_COLUMNS = ("anomaly", "changepoint")  # per-row 0/1 labels, SKAB's names
READING_COLUMNS = ["device_id", "metric", "ts_ms", "value", "unit"]


def _pick(frame: pd.DataFrame, given: str | None, candidates: tuple[str, ...], what: str,
          required: bool = True) -> str | None:
    if given:
        if given not in frame.columns:
            raise StackError(f"column {given!r} ({what}) is not in the file; columns: {', '.join(frame.columns)}")
        return given
    for name in candidates:
        if name in frame.columns:
            return name
    if required:
        raise StackError(f"no {what} column (looked for {', '.join(candidates)}); name it with --{what}-column; "
                         f"columns: {', '.join(frame.columns)}")
    return None


def to_epoch_ms(column: pd.Series) -> np.ndarray:
    """Epoch seconds, epoch milliseconds, datetimes or date strings -> int64 ms (UTC)."""
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        x = column.to_numpy(dtype=np.float64)
        return np.where(np.abs(x) >= MS_THRESHOLD, x, x * 1000).round().astype(np.int64)
    try:
        stamps = pd.to_datetime(column, utc=True, format="mixed")
    except (ValueError, TypeError) as exc:
        raise StackError(f"timestamp column {column.name!r} is neither epoch numbers nor dates: {exc}") from None
    return (stamps.astype("datetime64[ns, UTC]").astype(np.int64) // 1_000_000).to_numpy()


def read_frame(path: Path) -> pd.DataFrame:
    """A Parquet file, or a CSV whose separator (`,`, `;` or tab) is the one its header uses."""
    if path.suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    with path.open(newline="") as f:
        header = f.readline()
    sep = max((",", ";", "\t"), key=header.count)
    return pd.read_csv(path, sep=sep)


def metric_name(column: str) -> str:
    """A wide file's column name as a metric name (``Volume Flow RateRMS`` -> ``Volume_Flow_RateRMS``)."""
    name = re.sub(r"[^A-Za-z0-9_.:/-]+", "_", column.strip()).lstrip(".:/-")[:128]
    if not METRIC_RE.fullmatch(name):
        raise StackError(f"column {column!r} cannot be a metric name (metrics match {METRIC_RE.pattern})")
    return name


def wide_columns(frame: pd.DataFrame, taken: set[str]) -> list[str]:
    """The metric columns of a wide file: every numeric column not otherwise used."""
    return [c for c in frame.columns if c not in taken and c not in LABEL_COLUMNS
            and pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]


def load_history(path: str | Path, ts_column: str | None = None, value_column: str | None = None,
                 device_column: str | None = None, metric_column: str | None = None, unit_column: str | None = None,
                 device: str | None = None, metric: str | None = None, unit: str = "") -> pd.DataFrame:
    """The file's readings as columns device_id, metric, ts_ms, value, unit (plus the label columns
    it has), in event-time order; ``attrs["wide"]`` says whether it had one column per metric."""
    path = Path(path)
    if not path.is_file():
        raise StackError(f"history file {path} does not exist")
    frame = read_frame(path)
    ts_col = _pick(frame, ts_column, TS_COLUMNS, "ts")
    device_col = None if device else _pick(frame, device_column, DEVICE_COLUMNS, "device", required=False)
    unit_col = _pick(frame, unit_column, ("unit",), "unit", required=False)
    value_col = _pick(frame, value_column, VALUE_COLUMNS, "value", required=False)
    labels = [c for c in LABEL_COLUMNS if c in frame.columns]
    ts_ms = to_epoch_ms(frame[ts_col])
    if value_col is None:  # wide: one column per metric
        metrics = wide_columns(frame, {ts_col, device_col, unit_col, metric_column})
        if not metrics:
            raise StackError(f"no value column (looked for {', '.join(VALUE_COLUMNS)}; name it with --value-column) "
                             f"and no numeric metric columns; columns: {', '.join(frame.columns)}")
        names = [metric_name(c) for c in metrics]
        n = len(frame)
        out = pd.DataFrame({
            "device_id": np.repeat(frame[device_col].astype(str).to_numpy(), len(metrics)) if device_col else device,
            "metric": np.tile(names, n), "ts_ms": np.repeat(ts_ms, len(metrics)),
            "value": frame[metrics].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64).ravel(),
            "unit": check_unit(unit),
            **{c: np.repeat(frame[c].to_numpy(np.float64), len(metrics)) for c in labels},
        })
    else:
        metric_col = None if metric else _pick(frame, metric_column, METRIC_COLUMNS, "metric")
        out = pd.DataFrame({
            "device_id": frame[device_col].astype(str) if device_col else device,
            "metric": frame[metric_col].astype(str) if metric_col else metric,
            "ts_ms": ts_ms,
            "value": pd.to_numeric(frame[value_col], errors="coerce").astype(np.float64),
            "unit": frame[unit_col].fillna("").astype(str) if unit_col else check_unit(unit),
            **{c: frame[c].to_numpy(np.float64) for c in labels},
        })
    if out["device_id"].isna().any():
        raise StackError(f"no device column (looked for {', '.join(DEVICE_COLUMNS)}); name it with --device-column "
                         f"or give one device with --device; columns: {', '.join(frame.columns)}")
    bad_ids = sorted({d for d in out["device_id"].unique() if not ID_RE.fullmatch(d)})
    bad_metrics = sorted({m for m in out["metric"].unique() if not METRIC_RE.fullmatch(m)})
    if bad_ids or bad_metrics:
        raise StackError(f"invalid device ids {bad_ids[:5]} / metric names {bad_metrics[:5]} "
                         f"(ids must match {ID_RE.pattern}, metrics {METRIC_RE.pattern})")
    out = out.sort_values("ts_ms", kind="stable").reset_index(drop=True)
    out.attrs["wide"] = value_col is None
    return out


def replay(cfg: Config, history: pd.DataFrame, tenant: str = "replay", speed: float = 0.0, qos: int | None = None,
           progress: Callable[[dict], None] | None = None, stop: Callable[[], bool] | None = None) -> dict:
    """Publish ``history`` in event-time order, ``speed`` x real time (0: as fast as possible); a summary."""
    telemetry = TopicPattern(cfg.mqtt.topic_pattern)
    topics = {d: telemetry.topic(tenant, d) for d in history["device_id"].unique()}
    summary = {"messages": 0, "skipped_non_finite": 0}
    start = time.time()
    last_report = start
    first_ts = int(history["ts_ms"].iloc[0]) if len(history) else 0
    with Publisher(cfg, f"aimass-replay-{tenant}-{int(start * 1000) % 1_000_000}", qos=qos) as pub:
        for device_id, metric, ts_ms, value, unit in history[READING_COLUMNS].itertuples(index=False, name=None):
            if stop and stop():
                break
            if not math.isfinite(value):
                summary["skipped_non_finite"] += 1
                continue
            if speed > 0:
                while (wait := start + (ts_ms - first_ts) / 1000 / speed - time.time()) > 0:
                    pub.service(wait)
            pub.publish(topics[device_id], encode_reading(metric, ts_ms, value, unit))
            summary["messages"] += 1
            if progress and summary["messages"] % 1000 == 0 and time.time() - last_report >= 1:
                last_report = time.time()
                progress({**summary, "rows": len(history), "elapsed_s": last_report - start})
        summary["all_acked"] = pub.drain(timeout_s=120)
    elapsed = time.time() - start
    summary.update(rows=len(history), elapsed_s=round(elapsed, 3),
                   messages_per_s=round(summary["messages"] / elapsed, 1) if elapsed else 0.0)
    return summary


# --- CLI ------------------------------------------------------------------------------

def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.add_argument("file", help="CSV or Parquet history file")
    p.add_argument("--speed", type=float, default=0.0,
                   help="speed-up over real time (60: an hour a minute); 0 = as fast as possible (default)")
    p.add_argument("--tenant", default="replay", help="tenant in the MQTT topic (default replay)")
    p.add_argument("--device", help="device id for every row (when the file has no device column)")
    p.add_argument("--metric", help="metric name for every row (when the file has no metric column)")
    p.add_argument("--unit", default="", help="SenML unit for every row (when the file has no unit column)")
    p.add_argument("--ts-column", help=f"timestamp column (default: first of {', '.join(TS_COLUMNS)})")
    p.add_argument("--value-column", help=f"value column (default: first of {', '.join(VALUE_COLUMNS)})")
    p.add_argument("--device-column", help=f"device column (default: first of {', '.join(DEVICE_COLUMNS)})")
    p.add_argument("--metric-column", help=f"metric column (default: first of {', '.join(METRIC_COLUMNS)})")
    p.add_argument("--unit-column", help="unit column (default: 'unit' if present)")
    p.add_argument("--qos", type=int, choices=(0, 1), help="MQTT QoS (default: mqtt.qos)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    try:
        history = load_history(args.file, args.ts_column, args.value_column, args.device_column, args.metric_column,
                               args.unit_column, args.device, args.metric, args.unit)
    except ValueError as exc:  # a bad --unit
        raise StackError(str(exc)) from None

    def show(p: dict) -> None:
        print(f"\r{p['messages']}/{p['rows']} readings  {p['elapsed_s']:.0f}s", end="", file=sys.stderr, flush=True)

    summary = replay(cfg, history, tenant=args.tenant, speed=args.speed, qos=args.qos, progress=show)
    print(file=sys.stderr)
    print(orjson.dumps(summary).decode())
    return 0 if summary["all_acked"] else 1
