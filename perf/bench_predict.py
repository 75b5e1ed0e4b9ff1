"""Benchmark of the predict stage's model paths, side by side in one run.

- Triton through the agent's client (aimass.models.triton_client.TritonModels), both models per row:
  batched (``triton.max_rows_per_request`` rows per request) vs one request per row, same
  client settings otherwise (same number of requests in flight), same server.
- The online detectors (aimass.models.detect.PartitionDetectors.step: numba over arrays of series
  and devices) per second, beside River's per-window prequential updates (a forecaster and a
  half-space-trees detector per window: the old per-window path) on the same windows.
- The whole predict stage core (Predictor: every online detector + batched Triton), as
  ``predict_stage_windows_per_s``.
Floors: >= 100k rows/s batched Triton and >= 50x the per-row baseline (issue 4); the predict
stage >= 50k windows/s per process (issue 17).

    python perf/bench_predict.py [--quick] [--rows N]

Starts its own tritonserver on free ports (CPU here). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aimass.agents.predict import Predictor  # noqa: E402
from aimass.core.config import Config  # noqa: E402
from aimass.core.procs import free_port  # noqa: E402
from aimass.core.stack import start_triton, stop_server  # noqa: E402
from aimass.models import registry  # noqa: E402
from aimass.models.detect import PartitionDetectors  # noqa: E402
from aimass.models.triton_client import TritonModels  # noqa: E402
from tests.fixtures_predict import synthetic_windows  # noqa: E402


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def triton_rows_per_s(url: str, x: np.ndarray, rows_per_request: int, poll_rows: int, in_flight: int
                            ) -> tuple[float, int]:
    """(rows/s, rows not served) feeding ``x`` in agent-sized polls of ``poll_rows``."""
    client = TritonModels(url, timeout_s=30, max_rows_per_request=rows_per_request, max_in_flight=in_flight)
    await client.infer(x[:rows_per_request])  # connect and warm up
    lost, t0, last = 0, time.perf_counter(), time.perf_counter()
    for start in range(0, len(x), poll_rows):
        out = await client.infer(x[start:start + poll_rows])
        lost += int((~out.served).sum())
        if time.perf_counter() - last > 2:
            say(f"  {rows_per_request} rows/request: {start + poll_rows}/{len(x)} rows")
            last = time.perf_counter()
    elapsed = time.perf_counter() - t0
    await client.close()
    return len(x) / elapsed, lost


def river_updates_per_s(windows, limit: int) -> float:
    """Baseline: River's per-window prequential path (linear forecaster + half-space trees) per window."""
    from river import anomaly, linear_model

    forecaster, detector = linear_model.LinearRegression(), anomaly.HalfSpaceTrees(n_trees=10, height=3, seed=7)
    means = windows["mean"].to_pylist()[:limit]
    previous: dict = {}
    keys = windows["device_id"].to_pylist()[:limit]
    t0 = time.perf_counter()
    for key, mean in zip(keys, means):
        x = {"last": previous.get(key, mean)}
        forecaster.predict_one(x)
        forecaster.learn_one(x, mean)
        features = {"z": 0.5, "residual": 0.5}
        detector.score_one(features)
        detector.learn_one(features)
        previous[key] = mean
    return len(means) / (time.perf_counter() - t0)


def detector_windows_per_s(windows, k: int, cfg: Config, poll_rows: int) -> float:
    """The online detectors alone, in agent-sized polls (compiled before timing)."""
    PartitionDetectors(cfg.detect, k).step(windows.slice(0, poll_rows))
    state = PartitionDetectors(cfg.detect, k)
    t0 = time.perf_counter()
    for start in range(0, windows.num_rows, poll_rows):
        state.step(windows.slice(start, poll_rows))
    return windows.num_rows / (time.perf_counter() - t0)


async def predictor_rows_per_s(url: str, windows, cfg: Config, poll_rows: int) -> tuple[float, int]:
    client = TritonModels(url, timeout_s=30, max_rows_per_request=cfg.triton.max_rows_per_request,
                          max_in_flight=cfg.triton.max_in_flight)
    predictor = Predictor(cfg, client)
    lost, t0 = 0, time.perf_counter()
    for start in range(0, windows.num_rows, poll_rows):
        preds, _ = await predictor.predict([(0, windows.slice(start, poll_rows))])
        lost += int(np.sum(preds["degraded"].to_numpy()))
    elapsed = time.perf_counter() - t0
    await client.close()
    return windows.num_rows / elapsed, lost


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small run (CI smoke)")
    p.add_argument("--rows", type=int, help="feature rows for the batched Triton run (default 1M, quick 200k)")
    p.add_argument("--per-row-rows", type=int, help="rows for the one-request-per-row run (default 3000, quick 600)")
    args = p.parse_args()
    cfg = Config()
    k = cfg.predict.history_windows
    rows = args.rows or (200_000 if args.quick else 1_000_000)
    per_row_rows = args.per_row_rows or (600 if args.quick else 3000)
    x = np.random.default_rng(0).standard_normal((rows, k)).astype(np.float32)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    say(f"starting tritonserver on {ROOT / 'triton_repo'} (live: forecaster v"
        f"{registry.live_version(ROOT / 'triton_repo', 'forecaster')}, anomaly v"
        f"{registry.live_version(ROOT / 'triton_repo', 'anomaly')}) ...")
    server = start_triton(run_dir, free_port(), free_port(), free_port(), ROOT / "triton_repo")
    url = f"127.0.0.1:{server.ports['grpc']}"
    try:
        t = cfg.triton
        say(f"Triton batched: {rows} rows, {t.max_rows_per_request} rows/request, {t.max_in_flight} in flight ...")
        batched, lost_b = asyncio.run(triton_rows_per_s(url, x, t.max_rows_per_request, 65536, t.max_in_flight))
        say(f"  {batched:,.0f} rows/s")
        say(f"Triton one request per row: {per_row_rows} rows, {t.max_in_flight} in flight ...")
        per_row, lost_r = asyncio.run(triton_rows_per_s(url, x[:per_row_rows], 1, 512, t.max_in_flight))
        say(f"  {per_row:,.0f} rows/s")
        series, steps = (2000, 60) if args.quick else (10_000, 100)
        windows, _ = synthetic_windows(series, steps, spike_every=37)
        river_n = min(windows.num_rows, 20_000 if args.quick else 100_000)
        say(f"River per-window prequential updates (baseline): {river_n} windows ...")
        river = river_updates_per_s(windows, river_n)
        say(f"  {river:,.0f} windows/s")
        say(f"online detectors: {windows.num_rows} windows in polls of 5000 ...")
        detectors = detector_windows_per_s(windows, k, cfg, 5000)
        say(f"  {detectors:,.0f} windows/s")
        say(f"predict stage core (online detectors + batched Triton): {windows.num_rows} windows in polls of 5000 ...")
        whole, lost_p = asyncio.run(predictor_rows_per_s(url, windows, cfg, 5000))
        say(f"  {whole:,.0f} windows/s")
    finally:
        stop_server(server)
    result = {
        "triton_batched_rows_per_s": round(batched), "triton_per_row_rows_per_s": round(per_row),
        "speedup_vs_per_row": round(batched / per_row, 1), "river_windows_per_s": round(river),
        "detector_windows_per_s": round(detectors), "speedup_vs_river": round(detectors / river, 1),
        "predict_stage_windows_per_s": round(whole), "lost": lost_b + lost_r + lost_p,
        "floors_met": bool(batched >= 100_000 and batched / per_row >= 50 and whole >= 50_000),
        "rows": rows, "quick": args.quick,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
