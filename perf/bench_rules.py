"""Benchmark: 100 rules over window rows, vectorized engine vs the same rules row by row in Python.

Both sides run in the same process on the same rows and must emit the same signals (``lost``
counts any difference). Rates are rows per CPU second of this process (the machine is shared and
wall time swings with other people's load); wall-clock rates are printed too. Vectorized: ``aimass.rules.engine.Engine`` on Arrow batches (one batch = one
Kafka record's worth of rows). Baseline: for every row and every rule, the selector globs, the
condition's row evaluator (``Compiled.row``) and the same for/clear/repeat state machine in plain
Python. Last line: one JSON object.

    python perf/bench_rules.py [--quick] [--rows N] [--batch N]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aimass.rules.engine import Engine  # noqa: E402
from aimass.rules.model import Rule, RuleSet, load_rules  # noqa: E402
from aimass.core import contract  # noqa: E402

TEMPLATES = [
    ("mean > {t}", "mean < {t} - 5", "2 windows"),
    ("abs(zscore) > {z} and count >= 3", "abs(zscore) < 2", ""),
    ("std == 0 and count > 1", "std > 0", "3 windows"),
    ("max - min > {r} or rate > {rate}", "", ""),
    ("(mean - ewma) / max(std, 0.001) > {z}", "", "2 windows"),
]


def make_rules(n: int, path: Path) -> RuleSet:
    """``n`` rules cycling through realistic templates, thresholds and selectors."""
    rng = np.random.default_rng(7)
    lines = ["rules:"]
    for i in range(n):
        cond, clear, for_ = TEMPLATES[i % len(TEMPLATES)]
        values = dict(t=round(float(rng.uniform(60, 64)), 2), z=round(float(rng.uniform(2.8, 3.5)), 2),
                      r=round(float(rng.uniform(24, 30)), 1), rate=round(float(rng.uniform(2.5, 3.0)), 2))
        cond, clear = cond.format(**values), clear.format(**values)
        selector = ["", ', selector: {device: "dev-1*"}', ', selector: {metric: "temp*", window_s: 10}'][i % 3]
        lines.append(f"  - {{name: r{i}, stream: windows, condition: \"{cond}\"{selector}"
                     + (f", clear: \"{clear}\"" if clear else "") + (f", for: {for_}" if for_ else "")
                     + (", repeat: 60s" if i % 4 == 0 else "") + "}")
    path.write_text("\n".join(lines) + "\n")
    return load_rules(path)


def make_windows(rows: int, series: int, seed: int = 1) -> pa.Table:
    """Window rows of ``series`` series in event-time order, mostly normal with rare excursions."""
    rng = np.random.default_rng(seed)
    per = rows // series
    idx = np.arange(per * series)
    s, k = idx % series, idx // series
    mean = 50 + 4 * rng.standard_normal(idx.size)
    mean[rng.random(idx.size) < 0.004] += 15
    std = np.abs(rng.normal(2, 0.5, idx.size))
    std[(s % 97 == 0) & (k % 20 < 5)] = 0.0  # some stuck sensors
    spread = std * rng.uniform(3, 6, idx.size)
    return pa.table({
        "tenant": pa.array(np.where(s % 2 == 0, "acme", "globex").astype(object), pa.string()),
        "device_id": pa.array(np.char.add("dev-", (s // 2).astype(str)).astype(object), pa.string()),
        "metric": pa.array(np.where(s % 3 == 0, "temperature", "pressure").astype(object), pa.string()),
        "window_s": pa.array(np.full(idx.size, 10), pa.int32()),
        "window_start_ms": (k * 10_000).astype(np.int64), "window_end_ms": ((k + 1) * 10_000).astype(np.int64),
        "count": np.full(idx.size, 10, np.int64), "mean": mean, "min": mean - spread / 2, "max": mean + spread / 2,
        "std": std, "first": mean, "last": mean, "rate": rng.normal(0, 1, idx.size),
        "ewma": 50 + 4 * rng.standard_normal(idx.size) * 0.1 + (mean - 50) * 0.3,
        "zscore": rng.standard_normal(idx.size),
        "max_received_ms": ((k + 1) * 10_000).astype(np.int64),
    }, schema=contract.WINDOWS)


class RowByRow:
    """The baseline: every rule on every row in plain Python, the engine's state machine per (rule, series)."""

    def __init__(self, rules: list[Rule]):
        self.rules = [(r, r.selector.regexes()) for r in rules]
        self.states: dict[tuple, list] = {}  # (rule, series) -> [since, count, active, last_notify]

    def process(self, rows: list[dict]) -> list[tuple]:
        out = []
        for row in rows:
            key = (row["tenant"], row["device_id"], row["metric"], row["window_s"])
            t = row["window_end_ms"]
            for rule, (rt, rd, rm) in self.rules:
                sel = rule.selector
                if not (rt.match(row["tenant"]) and rd.match(row["device_id"]) and rm.match(row["metric"])
                        and (not sel.window_s or sel.window_s == row["window_s"])):
                    continue
                cond = bool(rule.condition.row(row))
                st = self.states.get((rule.name, key))
                if st is None:
                    if not cond:
                        continue
                    st = self.states[(rule.name, key)] = [0, 0, False, 0]
                if not st[2]:
                    if not cond:
                        del self.states[(rule.name, key)]
                        continue
                    if st[1] == 0:
                        st[0] = t
                    st[1] += 1
                    if (st[1] >= rule.for_windows) if rule.for_windows else (t - st[0] >= rule.for_s * 1000):
                        st[2], st[3] = True, t
                        out.append(("fire", rule.name, key, t))
                elif bool(rule.clear.row(row)) if rule.clear else not cond:
                    del self.states[(rule.name, key)]
                    out.append(("clear", rule.name, key, t))
                elif rule.repeat_s and t - st[3] >= rule.repeat_s * 1000:
                    st[3] = t
                    out.append(("repeat", rule.name, key, t))
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small run (seconds)")
    p.add_argument("--rows", type=int, default=200_000, help="window rows for the vectorized engine")
    p.add_argument("--batch", type=int, default=10_000, help="rows per Arrow batch (one Kafka record)")
    p.add_argument("--rules", type=int, default=100)
    args = p.parse_args()
    rows = 40_000 if args.quick else args.rows
    baseline_rows = min(rows, 4_000 if args.quick else 20_000)
    series = 2_000
    with tempfile.TemporaryDirectory() as tmp:
        ruleset = make_rules(args.rules, Path(tmp) / "bench.yaml")
    table = make_windows(rows, series)
    print(f"{len(ruleset.rules)} rules, {table.num_rows} window rows of {series} series, batches of {args.batch}",
          file=sys.stderr)

    Engine(ruleset).process("windows", table.slice(0, args.batch))  # warm-up: JIT-compile the kernel
    engine = Engine(ruleset)
    vec_signals = 0  # counted, not kept: like the alerter, which hands them on and drops them
    vec = Clock()
    for i, off in enumerate(range(0, table.num_rows, args.batch)):
        vec_signals += len(engine.process("windows", table.slice(off, args.batch)))
        if i % 5 == 0:
            print(f"  vectorized: {off + args.batch:>8} rows, {vec_signals} signals", file=sys.stderr)
    vec_wall, vec_cpu = vec.stop()

    head = table.slice(0, baseline_rows)
    pylist = head.to_pylist()
    baseline = RowByRow(ruleset.rules)
    base_signals = []
    step = max(1, len(pylist) // 5)
    base = Clock()
    for off in range(0, len(pylist), step):
        base_signals += baseline.process(pylist[off:off + step])
        print(f"  row by row: {off + step:>8} rows, {len(base_signals)} signals", file=sys.stderr)
    base_wall, base_cpu = base.stop()

    # the same rows through a fresh engine, for the signal comparison
    check = Engine(ruleset)
    check_signals = []
    for off in range(0, head.num_rows, args.batch):
        check_signals += check.process("windows", head.slice(off, args.batch))
    vec_set = {(s.kind, s.rule.name, s.series, s.ts_ms) for s in check_signals}
    lost = len(vec_set.symmetric_difference(base_signals))
    vec_rate, base_rate = table.num_rows / vec_cpu, len(pylist) / base_cpu
    print(f"vectorized {vec_rate:,.0f} rows/s CPU ({table.num_rows / vec_wall:,.0f} wall, {vec_signals} signals); "
          f"row by row {base_rate:,.0f} rows/s CPU ({len(pylist) / base_wall:,.0f} wall, {len(base_signals)} signals "
          f"on the first {len(pylist)} rows); mismatched signals {lost}", file=sys.stderr)
    print(json.dumps({"rules": len(ruleset.rules), "rows": table.num_rows, "baseline_rows": len(pylist),
                      "vectorized_rows_per_s": round(vec_rate), "row_by_row_rows_per_s": round(base_rate),
                      "vectorized_wall_rows_per_s": round(table.num_rows / vec_wall),
                      "row_by_row_wall_rows_per_s": round(len(pylist) / base_wall),
                      "rule_evaluations_per_s": round(vec_rate * len(ruleset.rules)),
                      "speedup_vs_row_by_row": round(vec_rate / base_rate, 1), "signals": vec_signals,
                      "lost": lost}))


class Clock:
    """Wall and CPU seconds of this process since creation (CPU time is what load on a shared machine spares)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


if __name__ == "__main__":
    main()
