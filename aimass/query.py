"""`aimass query REPORT`: named reports over the store, printed as a table or drawn with --plot.

Reads through the running sink's SQL endpoint in chDB mode (the sink owns the data dir),
opens chDB directly when no sink runs, or queries the ClickHouse server of clickhouse.url.
Reports use modern SQL (chDB, ClickHouse >= 22.3). `aimass query --list` shows them.

``--limit`` caps every report but summary (a row per table): the ranked ones (top-anomalous,
rejects, alerts, models) show their first 20 rows without it; the time series (device, ingest) show the whole time range
without it and their newest ``--limit`` rows, still in time order, with it.

Times are for people: every time column a report returns is a UTC ``DateTime64`` (``utc``), shown
as ISO 8601 in tables, CSV and JSON and as dates on plot axes; ``--epoch`` gives epoch
milliseconds in CSV / JSON for scripts.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from aimass.core.clickhouse import Store, StoreError, open_reader
from aimass.core.config import Config, ConfigError
from aimass.core import tables


def quote(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def utc(expr: str) -> str:
    """``expr`` as a UTC DateTime64(3): a plain DateTime (``toStartOfInterval``, rollup buckets)
    comes back from chDB as bare epoch seconds otherwise."""
    return f"toDateTime64({expr}, 3, 'UTC')"


@dataclass(frozen=True)
class Report:
    """A named query: its SQL from the options, and how --plot draws it."""

    name: str
    help: str
    sql: Callable[[argparse.Namespace, str], str]
    plot: Callable[[pa.Table, str, argparse.Namespace], list[str]]


# --- SQL ------------------------------------------------------------------------------

RANKED_LIMIT = 20  # rows of a ranked report without --limit


def ranked_limit(args: argparse.Namespace) -> int:
    """Rows a ranked report shows: --limit, else RANKED_LIMIT."""
    return RANKED_LIMIT if args.limit is None else args.limit


def newest(sql: str, order: str, newest_first: str, args: argparse.Namespace) -> str:
    """``sql`` ordered by ``order``; with --limit only its newest rows (by ``newest_first``), still so ordered."""
    if args.limit is None:
        return f"{sql}\nORDER BY {order}"
    return f"SELECT * FROM ({sql}\nORDER BY {newest_first} LIMIT {args.limit})\nORDER BY {order}"


def summary_sql(args: argparse.Namespace, db: str) -> str:
    parts = [f"SELECT '{t.name}' AS table, count() AS rows, {utc(f'max({t.time_column})')} AS latest, "
             f"{utc('max(inserted_at)')} AS last_insert FROM `{db}`.`{t.name}` FINAL" for t in tables.TABLES]
    return " UNION ALL ".join(parts) + " ORDER BY table"


def top_anomalous_sql(args: argparse.Namespace, db: str) -> str:
    return f"""
SELECT tenant, device_id, metric, count() AS windows, round(max(anomaly), 3) AS max_anomaly,
       round(avg(anomaly), 3) AS mean_anomaly, countIf(actual_outside) AS outside_band
FROM (
  SELECT p.tenant, p.device_id, p.metric, p.anomaly, o.in_band = false AS actual_outside
  FROM `{db}`.predictions AS p FINAL
  LEFT JOIN (SELECT tenant, device_id, metric, window_s, target_end_at, in_band FROM `{db}`.outcomes FINAL
             WHERE target_end_at >= now64(3) - INTERVAL {args.hours} HOUR) AS o
    USING (tenant, device_id, metric, window_s, target_end_at)
  WHERE p.target_end_at >= now64(3) - INTERVAL {args.hours} HOUR {tenant_filter(args, 'p.')}
)
GROUP BY tenant, device_id, metric
ORDER BY max_anomaly DESC, mean_anomaly DESC
LIMIT {ranked_limit(args)}"""


def device_sql(args: argparse.Namespace, db: str) -> str:
    if not args.device:
        raise ConfigError("the device report needs a device id: `aimass query device DEVICE --minutes 30`")
    where = f"device_id = {quote(args.device)} {tenant_filter(args)}"
    if args.metric:
        where += f" AND metric = {quote(args.metric)}"
    # Buckets without a prediction show NULLs: the joined columns are Nullable (no `SETTINGS
    # join_use_nulls`: the query port and read-only server users refuse SETTINGS).
    return newest(f"""
WITH r AS (
  SELECT metric, {utc(f"toStartOfInterval(ts, INTERVAL {args.window_s} SECOND)")} AS bucket, count() AS readings,
         avg(value) AS mean
  FROM `{db}`.readings FINAL
  WHERE {where} AND ts >= now64(3) - INTERVAL {args.minutes} MINUTE
  GROUP BY metric, bucket),
p AS (
  SELECT metric, {utc("target_end_at - INTERVAL window_s SECOND")} AS bucket, toNullable(forecast) AS forecast,
         toNullable(band_low) AS band_low, toNullable(band_high) AS band_high, toNullable(anomaly) AS anomaly
  FROM `{db}`.predictions FINAL
  WHERE {where} AND window_s = {args.window_s} AND target_end_at >= now64(3) - INTERVAL {args.minutes} MINUTE)
SELECT r.metric AS metric, r.bucket AS bucket, r.readings AS readings, round(r.mean, 4) AS mean,
       round(p.forecast, 4) AS forecast, round(p.band_low, 4) AS band_low, round(p.band_high, 4) AS band_high,
       round(p.anomaly, 3) AS anomaly
FROM r LEFT JOIN p ON r.metric = p.metric AND r.bucket = p.bucket""", "metric, bucket", "bucket DESC, metric", args)


def rejects_sql(args: argparse.Namespace, db: str) -> str:
    return f"""
SELECT stage, reason, count() AS rejects, {utc("max(rejected_at)")} AS last_seen, any(detail) AS example
FROM `{db}`.rejects FINAL
WHERE rejected_at >= now64(3) - INTERVAL {args.hours} HOUR {tenant_filter(args)}
GROUP BY stage, reason ORDER BY rejects DESC LIMIT {ranked_limit(args)}"""


def alerts_sql(args: argparse.Namespace, db: str) -> str:
    return f"""
SELECT rule, tenant, device_id, metric, argMax(severity, event_at) AS severity, argMax(state, event_at) AS state,
       count() AS transitions, {utc("min(event_at)")} AS first_event, {utc("max(event_at)")} AS last_event,
       argMaxIf(message, event_at, transition IN ('raised', 'reraised')) AS raised_message,
       argMax(message, event_at) AS latest_message
FROM `{db}`.alerts FINAL
WHERE event_at >= now64(3) - INTERVAL {args.hours} HOUR {tenant_filter(args)}
GROUP BY rule, tenant, device_id, metric
ORDER BY last_event DESC LIMIT {ranked_limit(args)}"""


def models_sql(args: argparse.Namespace, db: str) -> str:
    return f"""
SELECT forecaster_model, countMerge(n) AS outcomes, round(sumMerge(in_band_n) / outcomes, 3) AS in_band_share,
       round(sumMerge(abs_residual_sum) / outcomes, 4) AS mae, round(sqrt(sumMerge(sq_residual_sum) / outcomes), 4) AS rmse
FROM `{db}`.outcomes_1m
WHERE bucket >= now() - INTERVAL {args.hours} HOUR
GROUP BY forecaster_model ORDER BY outcomes DESC LIMIT {ranked_limit(args)}"""


def ingest_sql(args: argparse.Namespace, db: str) -> str:
    return newest(f"""
SELECT {utc("bucket")} AS minute, countMerge(n) AS readings, uniqExact(device_id) AS devices
FROM `{db}`.readings_1m
WHERE bucket >= now() - INTERVAL {args.minutes} MINUTE {tenant_filter(args)}
GROUP BY minute""", "minute", "minute DESC", args)


def tenant_filter(args: argparse.Namespace, prefix: str = "") -> str:
    return f"AND {prefix}tenant = {quote(args.tenant)}" if args.tenant else ""


# --- plots ----------------------------------------------------------------------------

def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    return plt, fig, ax


def _save(plt, fig, ax, path: str, title: str) -> list[str]:
    """Write the figure; returns the x axis' tick labels as drawn."""
    ax.set_title(title)
    if ax.xaxis.get_converter() is not None:  # a time axis: dates in UTC, never epoch numbers
        import matplotlib.dates as mdates

        locator = mdates.AutoDateLocator(tz="UTC")
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz="UTC"))
        ax.set_xlabel("time (UTC)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    ticks = [label.get_text() for label in ax.get_xticklabels()]
    plt.close(fig)
    return ticks


def bar_plot(x: str | tuple[str, ...], y: str) -> Callable[[pa.Table, str, argparse.Namespace], list[str]]:
    """A horizontal bar chart of ``y`` per ``x`` (columns joined with "/")."""
    def draw(table: pa.Table, path: str, args: argparse.Namespace) -> list[str]:
        plt, fig, ax = _figure()
        cols = (x,) if isinstance(x, str) else x
        labels = ["/".join(str(table.column(c)[i].as_py()) for c in cols) for i in range(table.num_rows)]
        ax.barh(labels[::-1], table.column(y).to_pylist()[::-1])
        ax.set_xlabel(y)
        return _save(plt, fig, ax, path, f"{args.report}: {y}")
    return draw


def line_plot(x: str, ys: tuple[str, ...]) -> Callable[[pa.Table, str, argparse.Namespace], list[str]]:
    def draw(table: pa.Table, path: str, args: argparse.Namespace) -> list[str]:
        plt, fig, ax = _figure()
        for y in ys:
            ax.plot(table.column(x).to_pylist(), table.column(y).to_pylist(), label=y)
        ax.legend()
        return _save(plt, fig, ax, path, args.report)
    return draw


def device_plot(table: pa.Table, path: str, args: argparse.Namespace) -> list[str]:
    """Window means against the forecast and its band, one colour per metric."""
    plt, fig, ax = _figure()
    for metric in sorted(set(table.column("metric").to_pylist())):
        rows = table.filter(pa.compute.equal(table.column("metric"), metric)).to_pydict()
        t = rows["bucket"]
        line, = ax.plot(t, rows["mean"], label=f"{metric} mean")
        ax.plot(t, rows["forecast"], "--", color=line.get_color(), label=f"{metric} forecast")
        low = [v if v is not None else float("nan") for v in rows["band_low"]]
        high = [v if v is not None else float("nan") for v in rows["band_high"]]
        ax.fill_between(t, low, high, color=line.get_color(), alpha=0.15)
    ax.legend()
    return _save(plt, fig, ax, path, f"device {args.device}: readings vs predictions")


REPORTS: dict[str, Report] = {r.name: r for r in (
    Report("summary", "rows, newest event and last insert per table", summary_sql, bar_plot("table", "rows")),
    Report("top-anomalous", "devices with the highest anomaly scores (--hours, --limit)", top_anomalous_sql,
           bar_plot(("device_id", "metric"), "max_anomaly")),
    Report("device", "one device's readings vs predicted band per window (DEVICE --minutes --metric --window-s --limit)",
           device_sql, device_plot),
    Report("rejects", "rejected and late readings by stage and reason (--hours)", rejects_sql,
           bar_plot(("stage", "reason"), "rejects")),
    Report("alerts", "alarms and their latest state (--hours)", alerts_sql, bar_plot(("rule", "device_id"), "transitions")),
    Report("models", "forecast quality per model: MAE, RMSE, in-band share (--hours)", models_sql,
           bar_plot("forecaster_model", "mae")),
    Report("ingest", "readings per minute from the 1-minute rollup (--minutes --limit)", ingest_sql,
           line_plot("minute", ("readings",))),
)}


def run_report(store: Store, args: argparse.Namespace) -> pa.Table:
    """The report's rows."""
    return store.query(REPORTS[args.report].sql(args, store.database))


def readable_times(table: pa.Table, epoch: bool = False) -> pa.Table:
    """Time columns as ISO 8601 UTC strings (``2026-12-03T09:15:00.000Z``), or epoch milliseconds."""
    columns = []
    for name, col in zip(table.column_names, table.columns):
        if pa.types.is_timestamp(col.type):
            ms = pc.cast(col, pa.timestamp("ms", "UTC"))
            # Arrow's %S of a millisecond timestamp carries the milliseconds: 09:15:00.000
            col = pc.cast(ms, pa.int64()) if epoch else pc.strftime(ms, "%Y-%m-%dT%H:%M:%SZ")
        columns.append(col)
    return pa.table(columns, names=table.column_names)


def format_table(table: pa.Table) -> str:
    """A plain-text table with UTC times, or a note when there are no rows."""
    if table.num_rows == 0:
        return "(no rows)"
    return readable_times(table).to_pandas().to_string(index=False, max_colwidth=60)


# --- CLI ------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("report", nargs="?", choices=list(REPORTS), metavar="REPORT",
                   help="one of: " + ", ".join(REPORTS))
    p.add_argument("device", nargs="?", help="device id (the device report)")
    p.add_argument("--list", action="store_true", help="list the reports and exit")
    p.add_argument("--hours", type=float, default=1.0, help="time range for hour-based reports (default 1)")
    p.add_argument("--minutes", type=float, default=30.0, help="time range for minute-based reports (default 30)")
    p.add_argument("--limit", type=positive_int, help=f"most rows to show (default {RANKED_LIMIT}; device and ingest: "
                   "the whole time range, else their newest rows)")
    p.add_argument("--tenant", help="only this tenant")
    p.add_argument("--metric", help="only this metric (device report)")
    p.add_argument("--window-s", type=int, default=10, help="window size of the device report (default 10)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="output format (default table); times are ISO 8601 UTC")
    p.add_argument("--epoch", action="store_true", help="with --format csv/json: times as epoch milliseconds")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the report into this PNG file")
    p.add_argument("--sql", action="store_true", help="print the report's SQL instead of running it")
    p.epilog = "reports:\n" + "\n".join(f"  {r.name:14s} {r.help}" for r in REPORTS.values())


def run(args: argparse.Namespace, cfg: Config) -> int:
    if args.list or not args.report:
        print("\n".join(f"{r.name:14s} {r.help}" for r in REPORTS.values()))
        return 0 if args.list else 2
    if args.sql:
        print(REPORTS[args.report].sql(args, cfg.clickhouse.database).strip())
        return 0
    store = open_reader(cfg)
    try:
        table = run_report(store, args)
    except StoreError as exc:
        print(f"aimass query {args.report}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if args.format == "csv":
        readable_times(table, args.epoch).to_pandas().to_csv(sys.stdout, index=False)
    elif args.format == "json":
        print(json.dumps(readable_times(table, args.epoch).to_pylist(), default=str, indent=1))
    else:
        print(format_table(table))
    if args.plot:
        REPORTS[args.report].plot(table, args.plot, args)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0
