"""Stream benchmark: clean + window readings/s of one `aimass worker` through the broker, next to a
naive per-message Faust agent computing the same windows, in the same run.

- worker: N readings already on the raw topic as Arrow records of 5,000 readings (the bridge's
  default flush), one `aimass worker` process (clean agent -> clean topic -> window agent ->
  windows topic, offsets committed by replay checkpoints). Timed from its first reading in to the
  last expected window row out (Prometheus metrics); also per CPU second of the worker process.
- naive (baseline): one Faust agent, one Kafka message (JSON) per reading, Python dict state per
  open window (the same specs and statistics: count, mean, min, max, std, first, last, rate,
  EWMA, z-score), one JSON message per window row.

Floors (issue 3): worker >= 300k readings/s and >= 30x the naive agent.

    python perf/bench_stream.py [--quick] [--readings N] [--naive-readings M]

Starts its own Kafka-protocol broker on a free port. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
from confluent_kafka import Producer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _cpu import cpu_seconds  # noqa: E402
from aimass.agents.clean import CleanEngine  # noqa: E402
from aimass.agents.window import WindowEngine  # noqa: E402
from aimass.core.config import Config, to_env  # noqa: E402
from aimass.core.procs import free_port  # noqa: E402
from aimass.core.stack import create_topics, start_kafka, stop_server  # noqa: E402
from aimass.core import contract  # noqa: E402
from aimass.streams.kafka import producer_config  # noqa: E402
from aimass.streams.units import UnitTable  # noqa: E402

RECORD_ROWS = 5_000
T0 = 1_763_899_980_000


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_readings(n: int, devices: int = 2_000, metrics: tuple[str, ...] = ("temp", "humidity")) -> pa.Table:
    """n readings of devices x metrics at 1 Hz per series, arrival order with jitter."""
    rng = np.random.default_rng(1)
    per_tick = devices * len(metrics)
    k = np.arange(n)
    dev, met = (k // len(metrics)) % devices, k % len(metrics)
    ts = T0 + (k // per_tick) * 1000 + rng.integers(0, 900, n)
    names = np.array([f"dev{d:05d}" for d in range(devices)], dtype=object)
    return pa.table({
        "tenant": pa.array(["acme"] * n), "device_id": pa.array(names[dev]),
        "metric": pa.array(np.array(metrics, dtype=object)[met]), "ts_ms": ts,
        "value": np.where(met == 0, 21.0, 45.0) + rng.normal(0, 1, n),
        "unit": pa.array(np.array(["Cel", "%RH"], dtype=object)[met]), "received_ms": ts + 50,
    }, schema=contract.READINGS)


def per_partition(cfg: Config, table: pa.Table) -> list[pa.Table]:
    parts = contract.partitions_for(table["tenant"].to_numpy(zero_copy_only=False),
                                    table["device_id"].to_numpy(zero_copy_only=False), cfg.kafka.partitions)
    return [table.filter(pa.array(parts == p)) for p in range(cfg.kafka.partitions)]


def expected_window_rows(cfg: Config, partitions: list[pa.Table]) -> int:
    """Window rows one undisturbed worker emits for these raw records (clean + window engines)."""
    rows = 0
    for p, table in enumerate(partitions):
        clean, window = CleanEngine(cfg.clean, UnitTable.load()), WindowEngine.from_config(
            cfg.window, cfg.clean.allowed_lateness_s)
        for i, start in enumerate(range(0, table.num_rows, RECORD_ROWS)):
            result = clean.process(table.slice(start, RECORD_ROWS), i)
            rows += window.update(result.clean, i, i)[0].num_rows
    return rows


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def run_stage(cfg: Config, argv: list[str], log: Path, port: int, done, what: str, total: int
              ) -> tuple[float, float, str]:
    """Start a stage process, time it from its first reading to done(metrics); (wall s, cpu s, metrics)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMASS_")}
    env.update(to_env(cfg))
    proc = subprocess.Popen(argv, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        text, started, cpu0, last_say = "", None, 0.0, 0.0
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}; see {log}")
            try:
                text = urllib.request.urlopen(url, timeout=2).read().decode()
            except OSError:
                time.sleep(0.2)
                continue
            readings_in = metric(text, "aimass_clean_readings_in_total") or metric(text, "naive_readings_total")
            if started is None and readings_in > 0:
                started, cpu0 = time.perf_counter(), cpu_seconds(proc.pid)
            if started is not None and done(text):
                wall, cpu = time.perf_counter() - started, cpu_seconds(proc.pid) - cpu0
                return wall, cpu, text
            if time.monotonic() - last_say > 2:
                say(f"  {what}: {int(readings_in):,}/{total:,} readings in")
                last_say = time.monotonic()
            time.sleep(0.05)
        raise RuntimeError(f"{what} did not finish; see {log}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the naive per-message agent ---------------------------------------------------------

def naive_agent_main() -> int:
    """A Faust worker with one per-message agent: JSON reading in, dict-based windows, JSON rows out."""
    from prometheus_client import Counter, start_http_server

    from aimass.core.config import load_config
    from aimass.streams.app import make_app, run_worker

    cfg = load_config()
    app = make_app(cfg, "naive")
    source = app.topic(f"{cfg.kafka.topic_prefix}.naive.raw", value_serializer="raw")
    sink = app.topic(f"{cfg.kafka.topic_prefix}.naive.windows", value_serializer="raw")
    readings = Counter("naive_readings_total", "readings processed")
    rows = Counter("naive_window_rows_total", "window rows emitted")
    specs = cfg.window.specs()
    lateness = int(cfg.clean.allowed_lateness_s * 1000)
    alpha, history, min_history = cfg.window.ewma_alpha, cfg.window.zscore_history, cfg.window.zscore_min_history
    min_hop = min(hop for _, hop in specs) * 1000
    state: dict[int, dict] = {}

    @app.agent(source)
    async def naive(stream):
        async for event in stream.events():
            r = json.loads(event.value)
            st = state.setdefault(event.message.partition, {"max_ts": -math.inf, "open": {}, "hist": {}})
            if r["ts_ms"] < st["max_ts"] - lateness:
                readings.inc()
                continue
            st["max_ts"] = max(st["max_ts"], r["ts_ms"])
            series = (r["tenant"], r["device_id"], r["metric"])
            for size_s, hop_s in specs:
                hop = hop_s * 1000
                first_end = (r["ts_ms"] // hop + 1) * hop
                for end in range(first_end, first_end + size_s * 1000, hop):
                    w = st["open"].setdefault((series, size_s, end), [0, 0.0, 0.0, math.inf, -math.inf,
                                                                      None, None, 0])
                    v = r["value"]
                    w[0] += 1
                    w[1] += v
                    w[2] += v * v
                    w[3], w[4] = min(w[3], v), max(w[4], v)
                    if w[5] is None or r["ts_ms"] < w[5][0]:
                        w[5] = (r["ts_ms"], v)
                    if w[6] is None or r["ts_ms"] >= w[6][0]:
                        w[6] = (r["ts_ms"], v)
                    w[7] = max(w[7], r["received_ms"])
            readings.inc()
            watermark = st["max_ts"] - lateness
            if watermark // min_hop <= st.setdefault("swept", -math.inf):
                continue  # no window can have closed since the last sweep
            st["swept"] = watermark // min_hop
            for key in sorted(k for k in st["open"] if k[2] <= watermark):
                series, size_s, end = key
                n, s1, s2, lo, hi, first, last, recv = st["open"].pop(key)
                mean = s1 / n
                hist = st["hist"].setdefault((series, size_s), [])
                hop = dict(specs)[size_s] * 1000
                recent = [m for e, m in hist if e >= end - history * hop]
                ewma = mean
                if recent:
                    ewma = recent[0]
                    for m in recent[1:] + [mean]:
                        ewma = alpha * m + (1 - alpha) * ewma
                z = 0.0
                if len(recent) >= min_history:
                    mu = sum(recent) / len(recent)
                    sd = math.sqrt(sum((m - mu) ** 2 for m in recent) / (len(recent) - 1))
                    z = (mean - mu) / sd if sd > 1e-12 else 0.0
                hist.append((end, mean))
                span = (last[0] - first[0]) / 1000
                await sink.send(value=json.dumps({
                    "tenant": series[0], "device_id": series[1], "metric": series[2], "window_s": size_s,
                    "window_start_ms": end - size_s * 1000, "window_end_ms": end, "count": n, "mean": mean,
                    "min": lo, "max": hi, "std": math.sqrt(max(s2 / n - mean * mean, 0.0)), "first": first[1],
                    "last": last[1], "rate": (last[1] - first[1]) / span if span > 0 else 0.0, "ewma": ewma,
                    "zscore": z, "max_received_ms": recv}).encode(), partition=event.message.partition)
                rows.inc()

    start_http_server(cfg.worker.metrics_port, addr="127.0.0.1")
    return run_worker(app, cfg)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small data sets (about a minute)")
    p.add_argument("--readings", type=int, default=None, help="readings for the worker (default 2M, quick 400k)")
    p.add_argument("--naive-readings", type=int, default=None, help="readings for the naive agent (default 60k, "
                                                                      "quick 20k)")
    p.add_argument("--naive-agent", action="store_true", help=argparse.SUPPRESS)  # the baseline's own process
    args = p.parse_args()
    if args.naive_agent:
        return naive_agent_main()
    n = args.readings or (400_000 if args.quick else 2_000_000)
    n_naive = args.naive_readings or (20_000 if args.quick else 60_000)

    run_dir = Path(tempfile.mkdtemp(prefix="aimass-bench-stream-"))
    say(f"starting the Kafka-protocol broker in {run_dir} ...")
    broker = start_kafka(run_dir, free_port())
    try:
        cfg = Config()
        cfg.run.dir = str(run_dir)
        cfg.kafka.bootstrap = f"127.0.0.1:{broker.ports['kafka']}"
        cfg.kafka.topic_prefix = f"b{uuid.uuid4().hex[:8]}"
        for section in ("bridge", "predict", "alert", "clickhouse"):
            getattr(cfg, section).metrics_port = 0
        create_topics(cfg)
        producer = Producer(producer_config(cfg))

        say(f"worker: {n:,} readings as records of {RECORD_ROWS:,} ...")
        partitions = per_partition(cfg, make_readings(n))
        expected = expected_window_rows(cfg, partitions)
        raw = contract.RAW.name(cfg.kafka.topic_prefix)
        for part, table in enumerate(partitions):
            for start in range(0, table.num_rows, RECORD_ROWS):
                producer.produce(raw, contract.encode(table.slice(start, RECORD_ROWS), contract.READINGS),
                                 partition=part)
                producer.poll(0)
        assert producer.flush(60) == 0
        cfg.worker.metrics_port = free_port()
        profile = ["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"]] if os.environ.get("BENCH_PROFILE") else []
        wall, cpu, text = run_stage(
            cfg, [sys.executable, *profile, "-m", "aimass.cli", "worker"], run_dir / "worker.log", cfg.worker.metrics_port,
            lambda t: metric(t, "aimass_window_rows_total") >= expected
            and metric(t, "aimass_clean_readings_in_total") >= n, "worker", n)
        worker_rows = int(metric(text, "aimass_window_rows_total"))
        say(f"  {n / wall:,.0f} readings/s ({n / cpu:,.0f} per worker CPU second), {worker_rows:,} window rows")

        say(f"naive per-message agent: {n_naive:,} JSON messages ...")
        naive_topics = [f"{cfg.kafka.topic_prefix}.naive.raw", f"{cfg.kafka.topic_prefix}.naive.windows"]
        from confluent_kafka.admin import AdminClient, NewTopic

        from aimass.core.stack import kafka_client_config
        admin = AdminClient(kafka_client_config(cfg))
        for fut in admin.create_topics([NewTopic(t, cfg.kafka.partitions, 1, config={
                "retention.ms": "604800000", "retention.bytes": "-1"}) for t in naive_topics]).values():
            fut.result()
        naive_parts = per_partition(cfg, make_readings(n_naive, devices=100))  # fewer series: windows close
        naive_expected = expected_window_rows(cfg, naive_parts)
        for part, table in enumerate(naive_parts):
            for row in table.to_pylist():
                producer.produce(naive_topics[0], json.dumps(row).encode(), partition=part)
                producer.poll(0)
        assert producer.flush(60) == 0
        cfg.worker.metrics_port = free_port()
        nwall, ncpu, ntext = run_stage(
            cfg, [sys.executable, str(Path(__file__).resolve()), "--naive-agent"], run_dir / "naive.log",
            cfg.worker.metrics_port, lambda t: metric(t, "naive_readings_total") >= n_naive, "naive", n_naive)
        naive_rows = int(metric(ntext, "naive_window_rows_total"))
        say(f"  {n_naive / nwall:,.0f} readings/s ({n_naive / ncpu:,.0f} per CPU second), {naive_rows:,} window rows "
            f"(worker engines: {naive_expected:,})")
    finally:
        stop_server(broker)

    result = {
        "readings": n, "naive_readings": n_naive,
        "worker_readings_per_s": round(n / wall), "worker_readings_per_cpu_s": round(n / cpu),
        "naive_readings_per_s": round(n_naive / nwall), "naive_readings_per_cpu_s": round(n_naive / ncpu),
        "speedup_vs_naive": round((n / wall) / (n_naive / nwall), 1),
        "speedup_vs_naive_per_cpu_s": round((n / cpu) / (n_naive / ncpu), 1),
        "window_rows": worker_rows, "naive_window_rows": naive_rows, "naive_expected_window_rows": naive_expected,
        "floor_300k_ok": n / wall >= 300_000, "floor_30x_ok": (n / wall) / (n_naive / nwall) >= 30,
        "lost": max(0, expected - worker_rows),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
