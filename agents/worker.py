"""`aimass worker`: one Faust worker process running the clean and window agents.

Start several (on one or more machines, same configuration): they form one consumer group and
split the partitions; when one stops or dies, the others take its partitions over and rebuild
its state by replay (see ``streams.replay``). Prometheus metrics on ``worker.metrics_port``.
"""
from __future__ import annotations

import argparse
import logging

from prometheus_client import start_http_server

from agents import clean, window
from aimass.config import Config
from streams.app import make_app, run_worker

log = logging.getLogger(__name__)


def configure(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Consumes the raw telemetry topic; produces the clean, dead-letter, late and windows topics. "
                "Config: [clean] dedup_horizon_s, allowed_lateness_s, max_clock_skew_s, drop_non_finite, "
                "units_file; [window] sizes_s, sliding_s, ewma_alpha, zscore_history, zscore_min_history; [worker] metrics_port. "
                "Stops cleanly on SIGTERM/SIGINT (flush, commit).")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (default: worker.metrics_port; 0 = off)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    if args.metrics_port is not None:
        cfg.worker.metrics_port = args.metrics_port
    app = make_app(cfg, "worker")
    clean.register(app, cfg)
    window.register(app, cfg)
    if cfg.worker.metrics_port:
        start_http_server(cfg.worker.metrics_port, addr=cfg.run.metrics_host)
        log.info("metrics on http://127.0.0.1:%d/metrics", cfg.worker.metrics_port)
    log.info("worker %s: clean + window agents on %s (windows %s)", app.conf.id,
             cfg.kafka.bootstrap, cfg.window.specs())
    return run_worker(app, cfg)
