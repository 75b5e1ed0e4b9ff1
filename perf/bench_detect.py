"""Detection quality through the real pipeline: SKAB's protocol and the demo's simulator.

- SKAB (an industrial pump testbed, labelled; its path is an option): the 34 labelled files as
  34 devices of one wide history, each file's first 400 rows its fitting part (replayed, not
  scored), through `aimass backtest --fit-rows 400`. Outlier scores pooled over the test rows
  (F1, FAR, MAR) and the changepoint NAB metric on the rows where a detector's 0/1 output changes
  against the files' `changepoint` column, 60 s windows: SKAB's variant (its published table) and
  NAB's own. Every detector is reported; the headline `skab_*` figures are the default rules'
  alarms together (`rules:any`), what an operator gets.
- The simulator: the demo's fleet with injected anomalies, 3 seeds as one history (device ids
  prefixed by seed), through `aimass backtest --labels`: event precision, recall and mean delay of
  the default rules' alarms together.

    python perf/bench_detect.py [--quick] [--skab DIR] [--out DIR]

Last line: one JSON object (`skab_f1`, `skab_far`, `skab_mar`, `skab_nab_standard`,
`sim_precision`, `sim_recall`, `sim_delay_s`, the published best, every detector's figures).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parent.parent
SKAB_DEFAULT = ROOT.parent / "shared" / "datasets" / "skab"
SKAB_GROUPS = ("valve1", "valve2", "other")
FIT_ROWS = 400
# SKAB's README, same protocol: best outlier F1 (Conv-AE) and best changepoint NAB standard (MSCRED).
PUBLISHED_BEST = {"outlier_f1": 0.78, "outlier_far_pct": 13.55, "outlier_mar_pct": 28.02, "outlier_detector": "Conv-AE",
                  "nab_standard": 32.42, "nab_low_fp": 16.53, "nab_low_fn": 40.28, "nab_detector": "MSCRED"}
HEADLINE = "rules:any"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def skab_history(skab_dir: Path, files_per_group: int | None) -> pd.DataFrame:
    """SKAB's labelled files as one wide frame, a device per file (``valve1-0``, ...)."""
    frames = []
    for group in SKAB_GROUPS:
        paths = sorted((skab_dir / group).glob("*.csv"), key=lambda p: int(p.stem))[:files_per_group]
        for path in paths:
            frame = pd.read_csv(path, sep=";")
            frames.append(frame.assign(device=f"{group}-{path.stem}"))
    if not frames:
        raise SystemExit(f"no SKAB files under {skab_dir} (expected {', '.join(SKAB_GROUPS)}/*.csv); pass --skab DIR")
    return pd.concat(frames, ignore_index=True)


def simulator_history(seeds: tuple[int, ...], devices: int, minutes: float, anomalies: int
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The demo's fleet (3 metrics at 2 readings/s), one copy per seed, as (readings, labels)."""
    from aimass.streams.simulator import generate

    readings, labels = [], []
    for seed in seeds:
        r, lab = generate(devices=devices, metrics=3, duration_s=minutes * 60, rate_hz=2.0, seed=seed,
                          anomalies=anomalies, start_ms=1_700_000_000_000)
        prefix = pc.binary_join_element_wise(f"s{seed}", r["device_id"], "-")
        readings.append(r.set_column(r.schema.get_field_index("device_id"), "device_id", prefix).to_pandas())
        lab_prefix = pc.binary_join_element_wise(f"s{seed}", lab["device_id"], "-")
        labels.append(lab.set_column(lab.schema.get_field_index("device_id"), "device_id", lab_prefix).to_pandas())
    return (pd.concat(readings, ignore_index=True)[["device_id", "metric", "ts_ms", "value", "unit"]],
            pd.concat(labels, ignore_index=True))


def backtest(history_path: Path, report: Path, extra: list[str], timeout_s: float) -> dict:
    """Run `aimass backtest` on a file; its JSON report."""
    cmd = [sys.executable, "-m", "aimass.cli", "backtest", str(history_path), "--report", str(report),
           "--out", str(history_path.with_suffix(".scored.parquet")), "--timeout", str(timeout_s), *extra]
    say("$ " + " ".join(cmd[2:]))
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=os.environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sys.stderr.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"aimass backtest failed (exit {proc.returncode}); its output is above")
    doc = json.loads(report.read_text())
    doc["elapsed_s"] = round(time.monotonic() - t0, 1)
    return doc


def outlier_figures(evaluation: dict, prefix: str) -> dict:
    o, nab, numenta = evaluation["outlier"], evaluation["nab_skab"], evaluation["nab_numenta"]
    return {f"{prefix}_f1": o["f1"], f"{prefix}_far": o["far"], f"{prefix}_mar": o["mar"],
            f"{prefix}_precision": o["precision"], f"{prefix}_recall": o["recall"],
            f"{prefix}_nab_standard": nab["standard"], f"{prefix}_nab_low_fp": nab["low_fp"],
            f"{prefix}_nab_low_fn": nab["low_fn"], f"{prefix}_nab_numenta_standard": numenta["standard"],
            f"{prefix}_delay_s": evaluation["delay"]["mean_s"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="2 SKAB files per group and one short simulator seed (CI-sized: a few minutes)")
    p.add_argument("--skab", type=Path, default=SKAB_DEFAULT, help=f"SKAB's folder (default {SKAB_DEFAULT})")
    p.add_argument("--out", type=Path, help="keep the histories, per-reading outputs and reports here")
    p.add_argument("--timeout", type=float, default=1800, help="seconds each backtest may wait (default 1800)")
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-detect-"))
    out.mkdir(parents=True, exist_ok=True)

    skab = skab_history(args.skab, 2 if args.quick else None)
    skab_path = out / "skab.csv"
    skab.to_csv(skab_path, sep=";", index=False)
    say(f"SKAB: {skab['device'].nunique()} files, {len(skab):,d} rows x 8 metrics")
    skab_doc = backtest(skab_path, out / "skab-report.json", ["--device-column", "device", "--fit-rows", str(FIT_ROWS)],
                        args.timeout)

    seeds = (1,) if args.quick else (1, 2, 3)
    readings, labels = simulator_history(seeds, devices=10 if args.quick else 50, minutes=2 if args.quick else 3,
                                         anomalies=4 if args.quick else 12)
    sim_path, labels_path = out / "sim.parquet", out / "sim-labels.parquet"
    readings.to_parquet(sim_path)
    labels.to_parquet(labels_path)
    say(f"simulator: seeds {seeds}, {len(readings):,d} readings, {len(labels)} labelled anomalies")
    sim_doc = backtest(sim_path, out / "sim-report.json", ["--labels", str(labels_path)], args.timeout)
    events = {e["rule"] or e["model"]: e for e in sim_doc.get("events", [])}
    any_rule = events.get("(any rule)", {})

    result = {
        **outlier_figures(skab_doc["evaluation"][HEADLINE], "skab"),
        "skab_headline_detector": HEADLINE,
        "skab_files": int(skab["device"].nunique()), "skab_rows_scored": skab_doc["units"],
        "skab_readings_scored": skab_doc["scored"], "skab_readings_unscored": skab_doc["unscored"],
        "sim_seeds": list(seeds), "sim_precision": any_rule.get("precision"), "sim_recall": any_rule.get("recall"),
        "sim_delay_s": any_rule.get("mean_delay_s"), "sim_readings_unscored": sim_doc["unscored"],
        "published_best": PUBLISHED_BEST,
        "skab_detectors": {name: outlier_figures(e, "skab") for name, e in skab_doc["evaluation"].items()},
        "sim_detectors": {name: {k: e[k] for k in ("precision", "recall", "mean_delay_s", "true_positives",
                                                   "false_positives", "false_negatives")} for name, e in events.items()},
        "elapsed_s": {"skab": skab_doc["elapsed_s"], "sim": sim_doc["elapsed_s"]},
        "lost": skab_doc["unscored"] + sim_doc["unscored"],
        "quick": args.quick,
    }
    say(f"outputs in {out}")
    print(json.dumps(result, allow_nan=False, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
