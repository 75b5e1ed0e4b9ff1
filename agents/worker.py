"""`aimass worker`: one Faust worker process running the clean and window agents.

Start several (on one or more machines, same configuration): they form one consumer group and
split the partitions; when one stops or dies, the others take its partitions over and rebuild
its state by replay (see ``aimass.streams.replay``). Prometheus metrics on ``worker.metrics_port``.
"""
from __future__ import annotations

import argparse
import logging

import pyarrow as pa
from prometheus_client import start_http_server

from aimass.agents import clean, window
from aimass.core.config import Config
from aimass.core import contract
from aimass.streams.app import make_app, run_worker
from aimass.streams.units import UnitTable

log = logging.getLogger(__name__)


def configure(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Consumes the raw telemetry topic; produces the clean, dead-letter, late and windows topics. "
                "Config: [clean] dedup_horizon_s, allowed_lateness_s, max_clock_skew_s, drop_non_finite, "
                "units_file; [window] sizes_s, sliding_s, ewma_alpha, zscore_history, zscore_min_history, "
                "idle_close_s; [worker] metrics_port. "
                "Stops cleanly on SIGTERM/SIGINT (flush, commit).")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (default: worker.metrics_port; 0 = off)")


def warm_up(cfg: Config) -> None:
    """Run a synthetic batch through fresh clean and window engines, so numba compiles (or loads from
    its cache) every kernel before the first live batch: otherwise that batch waits 1-2 s for it."""
    size_s = max(size for size, _ in cfg.window.specs())
    ts = [i * 1000 for i in range(size_s + int(cfg.clean.allowed_lateness_s) + 2)] + [0]  # + a late copy
    n = len(ts)
    raw = contract.decode(contract.encode(pa.table({  # decoded, so the arrays are read-only as in Kafka
        "tenant": ["warm-up"] * n, "device_id": ["d"] * n, "metric": ["temp"] * n, "ts_ms": ts,
        "value": [20.0] * (n - 2) + [float("nan"), 20.0], "unit": ["Cel"] * n, "received_ms": ts,
    }, schema=contract.READINGS), contract.READINGS), contract.READINGS)
    cleaner = clean.CleanEngine(cfg.clean, UnitTable.load(cfg.clean.units_file))
    result = cleaner.process(raw)
    windows = window.WindowEngine.from_config(cfg.window, cfg.clean.allowed_lateness_s)
    readings = contract.decode(contract.encode(result.clean, contract.READINGS), contract.READINGS)
    windows.update(readings, 0, 0)
    windows.tick(0, 1)  # the series turns active at the first tick ...
    windows.tick(windows.forget_ms, 2)  # ... and is closed as idle and forgotten at this one
    windows.live_offset()


def run(args: argparse.Namespace, cfg: Config) -> int:
    if args.metrics_port is not None:
        cfg.worker.metrics_port = args.metrics_port
    warm_up(cfg)
    app = make_app(cfg, "worker")
    clean.register(app, cfg)
    window.register(app, cfg)
    if cfg.worker.metrics_port:
        start_http_server(cfg.worker.metrics_port, addr=cfg.run.metrics_host)
        log.info("metrics on http://127.0.0.1:%d/metrics", cfg.worker.metrics_port)
    log.info("worker %s: clean + window agents on %s (windows %s)", app.conf.id,
             cfg.kafka.bootstrap, cfg.window.specs())
    return run_worker(app, cfg)
