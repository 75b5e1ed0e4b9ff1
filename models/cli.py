"""`aimass train` (fit both models, write new versions, gated promotion) and `aimass models`."""
from __future__ import annotations

import argparse
import json
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from aimass.core.config import Config
from aimass.core.procs import StackError
from aimass.models import registry, train
from aimass.core import contract


def read_table(path: str, schema: pa.Schema) -> pa.Table:
    """A Parquet (``.parquet``) or CSV file as a table of the contract ``schema``."""
    p = Path(path)
    if not p.is_file():
        raise StackError(f"{p} does not exist")
    table = pq.read_table(p) if p.suffix == ".parquet" else pcsv.read_csv(p)
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise StackError(f"{p} lacks columns {missing}; expected the contract schema {schema.names}")
    return table.select(schema.names).cast(schema)


def _windows_from_readings(readings: pa.Table, window_s: int) -> pa.Table:
    try:
        from aimass.agents.window import batch_windows
    except ImportError:
        raise StackError("training from readings needs aimass.agents.window.batch_windows, which this checkout lacks; "
                         "pass --windows FILE (a WINDOWS-schema export) instead") from None
    return batch_windows(readings, window_s)


def _ms_expr(field_name: str, dialect: str) -> str:
    """A contract ``X_ms`` field as Int64 ms in SQL (modern: DateTime64 column ``X_at``; legacy: stored as is)."""
    from aimass.core.tables import MODERN, column_name

    return f"toUnixTimestamp64Milli(`{column_name(field_name)}`)" if dialect == MODERN else f"`{field_name}`"


def query_contract(store, table: str, schema: pa.Schema, where: str = "1") -> pa.Table:
    """Rows of a stored contract table as a table of ``schema`` (time columns back to int64 ms)."""
    from aimass.core.tables import is_time_field

    cols = ", ".join(f"{_ms_expr(f.name, store.dialect)} AS `{f.name}`" if is_time_field(f) else f"`{f.name}`"
                     for f in schema)
    result = store.query(f"SELECT {cols} FROM `{store.database}`.`{table}` FINAL WHERE {where}")
    return result.select(schema.names).cast(schema)


def store_history(cfg: Config, window_s: int, hours: float) -> tuple[pa.Table, pa.Table]:
    """(windows of ``window_s`` from the last ``hours``, every label) from ClickHouse / chDB."""
    from aimass.core.clickhouse import open_reader

    store = open_reader(cfg)
    try:
        since_ms = int((time.time() - hours * 3600) * 1000)
        windows = query_contract(store, "windows", contract.WINDOWS,
                                 f"window_s = {int(window_s)} AND {_ms_expr('window_end_ms', store.dialect)} >= {since_ms}")
        return windows, query_contract(store, "labels", contract.LABELS)
    finally:
        store.close()


def training_data(args: argparse.Namespace, cfg: Config, window_s: int, say=print
                  ) -> tuple[pa.Table, pa.Table | None, str]:
    """(windows, labels, source description) from the options: store, windows file, readings file, or the simulator."""
    labels = read_table(args.labels, contract.LABELS) if args.labels else None
    if args.from_store:
        say(f"reading the last {args.hours:g} h of {window_s}s windows and the labels from the store ...")
        windows, stored_labels = store_history(cfg, window_s, args.hours)
        return windows, labels if labels is not None else stored_labels, f"store {cfg.clickhouse.url or 'chdb'} last {args.hours:g} h"
    if args.windows:
        return read_table(args.windows, contract.WINDOWS), labels, f"windows file {args.windows}"
    if args.readings:
        readings = read_table(args.readings, contract.READINGS)
        return _windows_from_readings(readings, window_s), labels, f"readings file {args.readings}"
    from aimass.streams.simulator import generate

    say(f"simulating {args.devices} devices x {args.metrics} metrics for {args.duration_s:.0f}s at {args.rate_hz} Hz "
        f"(seed {args.seed}, {args.anomalies} anomalies) ...")
    readings, sim_labels = generate(args.devices, args.metrics, args.duration_s, args.rate_hz, seed=args.seed,
                                    anomalies=args.anomalies)
    return (_windows_from_readings(readings, window_s), labels if labels is not None else sim_labels,
            f"simulator seed={args.seed} devices={args.devices} metrics={args.metrics} duration_s={args.duration_s}")


def triton_http_url(cfg: Config) -> str:
    """host:port of Triton's HTTP endpoint, or "" when no Triton answers there."""
    url = f"{cfg.triton.grpc_address().rsplit(':', 1)[0]}:{cfg.triton.http_port}"
    try:
        with urllib.request.urlopen(f"http://{url}/v2/health/live", timeout=2) as r:
            return url if r.status == 200 else ""
    except OSError:
        return ""


# --- aimass train -----------------------------------------------------------------------

def configure_train(p: argparse.ArgumentParser) -> None:
    p.description = ("Fit the forecaster (ridge AR) and the anomaly scorer (masked linear autoencoder) on the last "
                     "K window means of every series, write a new numbered version of each into the Triton "
                     "repository, and promote each only if it beats the live version on held-out data. "
                     "Data: --from-store, --windows, or --readings, else the simulator.")
    p.add_argument("--repo", help="Triton model repository (default: triton.model_repository)")
    p.add_argument("--from-store", action="store_true",
                   help="train on the stored windows and labels (ClickHouse / chDB, see [clickhouse])")
    p.add_argument("--hours", type=float, default=24.0, help="with --from-store: how much history (default 24)")
    p.add_argument("--windows", help="Parquet/CSV file of window rows (WINDOWS schema)")
    p.add_argument("--readings", help="Parquet/CSV file of readings (READINGS schema), windowed here")
    p.add_argument("--labels", help="Parquet/CSV file of anomaly labels (LABELS schema) for the anomaly gate")
    p.add_argument("--devices", type=int, default=40, help="simulator: devices (default 40)")
    p.add_argument("--metrics", type=int, default=3, help="simulator: metrics per device (default 3)")
    p.add_argument("--duration-s", type=float, default=4 * 3600, help="simulator: seconds of history (default 4h)")
    p.add_argument("--rate-hz", type=float, default=1.0, help="simulator: readings per second per series")
    p.add_argument("--anomalies", type=int, default=200, help="simulator: injected anomalies (default 200)")
    p.add_argument("--seed", type=int, default=0, help="simulator: random seed")
    p.add_argument("--ridge", type=float, default=1.0, help="L2 penalty of both linear fits (default 1.0)")
    p.add_argument("--holdout", type=float, default=0.25, help="newest fraction of time held out (default 0.25)")
    p.add_argument("--no-reload", action="store_true", help="do not ask a running Triton to swap to a promoted version")


def run_train(args: argparse.Namespace, cfg: Config) -> int:
    repo = Path(args.repo or cfg.triton.model_repository)
    k, window_s = cfg.predict.history_windows, cfg.predict.window_s
    windows, labels, source = training_data(args, cfg, window_s)
    print(f"building K={k} samples from {windows.num_rows} window rows ({window_s}s) ...")
    ds = train.dataset(windows, k, window_s, labels, args.holdout)
    print(f"{ds.info['samples']} samples of {ds.info['series']} series, {ds.info['holdout_samples']} held out, "
          f"{ds.info['labeled_anomalous']} labeled anomalous")
    http_url = "" if args.no_reload else triton_http_url(cfg)
    print(f"Triton at {http_url} will swap promoted versions live" if http_url else
          "no running Triton to reload: promoted versions serve when Triton (re)starts")
    t0 = time.perf_counter()
    train.train(repo, ds, k, source, http_url, args.ridge)
    print(f"done in {time.perf_counter() - t0:.1f}s; `aimass models` lists the versions")
    return 0


# --- aimass models ----------------------------------------------------------------------

def configure_models(p: argparse.ArgumentParser) -> None:
    p.description = "List model versions with their held-out metrics, show one, or promote one by hand."
    p.add_argument("action", nargs="?", choices=["list", "show", "promote"], default="list",
                   help="list (default) | show MODEL VERSION | promote MODEL VERSION (skips the gate)")
    p.add_argument("model", nargs="?", choices=list(registry.MODELS), help="model name")
    p.add_argument("version", nargs="?", type=int, help="version number")
    p.add_argument("--repo", help="Triton model repository (default: triton.model_repository)")


def version_lines(repo: Path) -> list[str]:
    """One line per model version: live marker, gate metric, data range, promotion decision."""
    lines = [f"{'model':11s} {'ver':>4s} {'live':4s} {'metric':9s} {'value':>8s} {'trained (UTC)':19s} data"]
    for name in registry.MODELS:
        live = registry.live_version(repo, name)
        metric = registry.GATE_METRIC[name][0]
        for v in registry.versions(repo, name):
            meta = registry.read_metadata(repo, name, v)
            value = meta.get("metrics", {}).get(metric)
            trained = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(meta.get("trained_at_ms", 0) / 1000))
            lines.append(f"{name:11s} {v:>4d} {'*' if v == live else '':4s} {metric:9s} "
                         f"{'-' if value is None else f'{value:.4f}':>8s} {trained:19s} "
                         f"{meta.get('data', {}).get('source', '?')}")
    return lines


def run_models(args: argparse.Namespace, cfg: Config) -> int:
    repo = Path(args.repo or cfg.triton.model_repository)
    if args.action == "list":
        print("\n".join(version_lines(repo)))
        return 0
    if args.model is None or args.version is None:
        raise StackError(f"`aimass models {args.action}` needs MODEL and VERSION, e.g. `aimass models {args.action} "
                         f"forecaster 2`")
    if args.version not in registry.versions(repo, args.model):
        raise StackError(f"{args.model} has no version {args.version} in {repo}; `aimass models` lists them")
    if args.action == "show":
        print(json.dumps(registry.read_metadata(repo, args.model, args.version), indent=2))
        return 0
    http_url = triton_http_url(cfg)
    registry.promote(repo, args.model, args.version, http_url)
    print(f"{args.model} v{args.version} is live" + (f" (Triton at {http_url} swapped)" if http_url else
                                                     " on disk (no running Triton)"))
    return 0
