"""Latency probe of the worker hop: raw record produced -> clean record and window rows consumed.

Starts its own Kafka-protocol broker and one `aimass worker` process, produces RAW records at a
fixed rate (each ``--readings`` readings of one partition's devices, event time and
``received_ms`` = now), and consumes CLEAN and WINDOW_ROWS with a fast-polling consumer:

- raw -> clean latency: consume time - ``received_ms`` of the record's readings;
- window wait: consume time of a window row - (window end + allowed lateness), the earliest
  moment the row can exist (readings carry event time = now); what is left is the avoidable wait;
- worker CPU per reading: process CPU seconds (/proc, all threads) / clean readings seen;
- lost: readings produced - clean readings seen, over the whole run (negative: duplicates).

The measured phase starts once the worker has joined its group and caught up (1 record per
partition per second) and has run ``--warmup-s`` at the full rate. Baselines in the same run: a
plain confluent-kafka pass-through hop (decode + encode every raw record into the clean topic of
its own topic prefix: the floor any Kafka hop costs here) and, with ``--before CHECKOUT``, the
worker of another checkout (``git worktree add --detach /tmp/before <commit>``), which gives
``speedup_vs_before`` (CPU per reading, before / now), plus an in-process comparison of the clean
and window engines alone (``engines_speedup_vs_before``: no broker, no lag-dependent batching).

    python perf/probe_worker_latency.py [--quick] [--rate 100] [--readings 50] [--seconds 20]
                                        [--before CHECKOUT] [--profile DIR] [--run-dir DIR]
    python perf/probe_worker_latency.py --engines-only --before CHECKOUT [--engine-s 800]
                                        [--engine-rate 11700] [--engine-record 2340]

Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
from confluent_kafka import Consumer, Producer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("PROBE_CODE_DIR", str(REPO)))  # --before runs another checkout's code

from _cpu import cpu_seconds  # noqa: E402
from aimass.core.config import Config, to_env  # noqa: E402
from aimass.core.procs import free_port, stop_pid  # noqa: E402
from aimass.core.stack import create_topics, start_kafka, stop_server  # noqa: E402
from aimass.core.supervisor import aimass_argv  # noqa: E402
from aimass.core import contract  # noqa: E402
from aimass.streams.kafka import consumer_config, producer_config  # noqa: E402


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def device_table(cfg: Config, devices: int) -> list[np.ndarray]:
    """Device ids per partition (contract.partition_for), so every record holds one partition's devices."""
    names = np.array([f"dev{d:05d}" for d in range(devices)], dtype=object)
    parts = contract.partitions_for(np.array(["acme"] * devices, dtype=object), names, cfg.kafka.partitions)
    return [names[parts == p] for p in range(cfg.kafka.partitions)]


def raw_record(devices: np.ndarray, start: int, n: int, now_ms: int) -> bytes:
    """``n`` temperature readings of consecutive devices of one partition, event time = now."""
    ids = devices[(start + np.arange(n)) % len(devices)]
    return contract.encode(pa.table({
        "tenant": pa.array(["acme"] * n), "device_id": pa.array(ids), "metric": pa.array(["temp"] * n),
        "ts_ms": np.full(n, now_ms, np.int64), "value": 21.0 + np.random.default_rng(start).normal(0, 1, n),
        "unit": pa.array(["Cel"] * n), "received_ms": np.full(n, now_ms, np.int64),
    }, schema=contract.READINGS), contract.READINGS)


class Watcher(threading.Thread):
    """Consumes CLEAN and WINDOW_ROWS of a prefix; records per-record latencies (ms)."""

    def __init__(self, cfg: Config, prefix: str, lateness_ms: int):
        super().__init__(daemon=True)
        self.lateness_ms = lateness_ms
        self.clean_ms: list[float] = []
        self.window_wait_ms: list[float] = []
        self.clean_readings = 0
        self.total_clean_readings = 0  # never reset: for the loss count
        self.stop_event = threading.Event()
        self.consumer = Consumer(consumer_config(cfg, f"probe-{uuid.uuid4().hex[:8]}", **{"fetch.wait.max.ms": 5}))
        self.topics = {contract.CLEAN.name(prefix): "clean", contract.WINDOW_ROWS.name(prefix): "windows"}
        self.consumer.subscribe(list(self.topics))

    def run(self) -> None:
        while not self.stop_event.is_set():
            for msg in self.consumer.consume(1000, 0.05):
                if msg.error():
                    continue
                now = time.time() * 1000
                kind = self.topics[msg.topic()]
                if kind == "clean":
                    table = contract.decode(msg.value(), contract.READINGS)
                    self.clean_readings += table.num_rows
                    self.total_clean_readings += table.num_rows
                    self.clean_ms.append(now - pa.compute.max(table["received_ms"]).as_py())
                else:
                    table = contract.decode(msg.value(), contract.WINDOWS)
                    ends = table["window_end_ms"].to_numpy()
                    self.window_wait_ms.extend((now - (ends + self.lateness_ms)).tolist())
        self.consumer.close()

    def reset(self) -> None:
        self.clean_ms.clear()
        self.window_wait_ms.clear()
        self.clean_readings = 0


def passthrough_main(argv: list[str]) -> int:
    """Baseline hop: confluent consume RAW -> decode -> encode -> produce CLEAN, commit after delivery."""
    from aimass.core.config import load_config

    cfg = load_config()
    prefix = cfg.kafka.topic_prefix
    consumer = Consumer(consumer_config(cfg, f"{prefix}-passthrough"))
    producer = Producer(producer_config(cfg))
    consumer.subscribe([contract.RAW.name(prefix)])
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    while not stopping:
        msgs = consumer.consume(1000, 0.1)
        for msg in msgs:
            if msg.error():
                continue
            table = contract.decode(msg.value(), contract.READINGS)
            producer.produce(contract.CLEAN.name(prefix), contract.encode(table, contract.READINGS),
                             partition=msg.partition())
            consumer.store_offsets(msg)
        if msgs:
            producer.flush(10)
            consumer.commit(asynchronous=False)
        producer.poll(0)
    consumer.close()
    return 0


def profile(pid: int, out_dir: str, name: str, seconds: float) -> subprocess.Popen | None:
    """py-spy flame graph of the hop process while it is measured (``--profile DIR``)."""
    if not out_dir:
        return None
    return subprocess.Popen(["py-spy", "record", "--nonblocking", "--pid", str(pid), "--duration", str(int(seconds)), "--format",
                             "speedscope", "--output", str(Path(out_dir) / f"{name}.speedscope.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def engines_main(seconds: int, readings_per_s: int = 850, per_record: int = 50) -> int:
    """In-process CPU and worst record time (after the first second) of the clean + window engines
    over ``seconds`` of one partition's readings (default ~850/s: one of 6 partitions at 5k/s) in
    ``per_record``-reading records, the restart offsets asked once per second like the commit timer does (no broker, no
    lag: what changes is only the engine code on sys.path)."""
    from aimass.agents.clean import CleanEngine
    from aimass.agents.window import WindowEngine
    from aimass.streams.units import UnitTable

    cfg = Config()
    cfg.window.sizes_s = "2"
    cfg.clean.allowed_lateness_s = 1.0
    clean = CleanEngine(cfg.clean, UnitTable.load(cfg.clean.units_file))
    window = WindowEngine.from_config(cfg.window, cfg.clean.allowed_lateness_s)
    devices = np.array([f"dev{d:05d}" for d in range(max(100, per_record))], dtype=object)
    records_per_s, t0 = max(1, readings_per_s // per_record), 1_763_900_000_000
    cpu0, worst_ms, accounted = time.process_time(), 0.0, 0
    for offset in range(seconds * records_per_s):
        now = t0 + offset * 1000 // records_per_s
        raw = contract.decode(raw_record(devices, offset * per_record, per_record, now), contract.READINGS)
        started = time.perf_counter()
        result = clean.process(raw, offset)
        accounted += result.clean.num_rows + result.dead.num_rows + result.late.num_rows
        window.update(contract.decode(contract.encode(result.clean, contract.READINGS), contract.READINGS),
                      offset, source_offset=offset)
        if offset % records_per_s == 0:
            clean.live_offset()
            window.live_offset()
        if offset >= records_per_s:  # the first second loads the kernels
            worst_ms = max(worst_ms, (time.perf_counter() - started) * 1000)
    readings = seconds * records_per_s * per_record
    print(json.dumps({"cpu_us_per_reading": (time.process_time() - cpu0) / readings * 1e6,
                      "worst_record_ms": worst_ms, "lost": readings - accounted}))
    return 0


def import_root(code: Path) -> Path:
    """A folder whose ``aimass`` package is checkout ``code``'s, laid out as setup.cfg's package_dir
    maps it (``streams/`` as ``aimass.streams``, ...): put first on sys.path, it wins over the
    editable install of this checkout. The checkout must have the one-namespace layout."""
    root = Path(tempfile.mkdtemp(prefix="probe-code-"))
    (root / "aimass").mkdir()
    stages = ("streams", "agents", "models", "rules")
    for entry in (code / "aimass").iterdir():
        if entry.name not in stages:  # a worktree may hold links to the stages already
            (root / "aimass" / entry.name).symlink_to(entry)
    for stage in stages:
        (root / "aimass" / stage).symlink_to(code / stage)
    return root


def engines_run(code: Path, seconds: int, readings_per_s: int, per_record: int) -> dict:
    """``engines_main``'s figures, run with the engine code of checkout ``code``."""
    out = subprocess.run([sys.executable, __file__, "--engines", str(seconds), str(readings_per_s), str(per_record)],
                         cwd=code, check=True, env={**os.environ, "PROBE_CODE_DIR": str(import_root(code))},
                         capture_output=True, text=True).stdout
    return {k: round(v, 2) for k, v in json.loads(out.splitlines()[-1]).items()}


def run_hop(name: str, cfg: Config, argv: list[str], log: Path, args, lateness_ms: int, code: Path = REPO) -> dict:
    """Start one hop process (its code from checkout ``code``), warm it up, produce at the fixed
    rate, return latency/CPU figures."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMASS_")}
    env.update(to_env(cfg))
    env.update(AIMASS_RUN_LOG_LEVEL="INFO", PYTHONPATH=str(import_root(code)))
    proc = subprocess.Popen(argv, env=env, cwd=code, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    watcher = Watcher(cfg, cfg.kafka.topic_prefix, lateness_ms)
    watcher.start()
    producer = Producer(producer_config(cfg))
    raw = contract.RAW.name(cfg.kafka.topic_prefix)
    devices = device_table(cfg, args.devices)
    sent = total_sent = 0

    def produce(seconds: float, rate: float, say_every: float = 5.0) -> None:
        nonlocal sent, total_sent
        t0 = time.monotonic()
        last_say = t0
        i = 0
        while time.monotonic() - t0 < seconds:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            p = i % cfg.kafka.partitions
            producer.produce(raw, raw_record(devices[p], i // cfg.kafka.partitions * args.readings, args.readings,
                                             int(time.time() * 1000)), partition=p)
            producer.poll(0)
            sent += args.readings
            total_sent += args.readings
            i += 1
            if time.monotonic() - last_say > say_every:
                say(f"  {name}: {sent:,} readings sent, {watcher.clean_readings:,} clean seen")
                last_say = time.monotonic()
        producer.flush(10)

    try:
        say(f"{name}: waiting for the group join (one record per partition per second) ...")
        deadline = time.monotonic() + 90
        behind = lambda: sent == 0 or watcher.clean_readings < sent - cfg.kafka.partitions * args.readings  # noqa: E731
        while behind() and time.monotonic() < deadline:
            produce(1.0, cfg.kafka.partitions)
            say(f"  {name}: {sent:,} readings sent, {watcher.clean_readings:,} clean seen")
        if behind():
            raise RuntimeError(f"{name}: not caught up within 90 s; see {log}")
        produce(args.warmup_s, args.rate)
        watcher.reset()
        sent, cpu0 = 0, cpu_seconds(proc.pid)
        spy = profile(proc.pid, args.profile, name, args.seconds)
        say(f"{name}: measuring {args.seconds:.0f} s at {args.rate} records/s x {args.readings} readings")
        produce(args.seconds, args.rate)
        time.sleep(2.0)
        cpu = cpu_seconds(proc.pid) - cpu0
        deadline = time.monotonic() + 30
        while watcher.total_clean_readings < total_sent and time.monotonic() < deadline:
            time.sleep(0.2)
        if spy is not None:
            spy.wait(30)
    finally:
        stop_pid(proc.pid, timeout=30)
        watcher.stop_event.set()
        watcher.join(5)
    clean = np.array(watcher.clean_ms)
    waits = np.array(watcher.window_wait_ms)
    pct = lambda a, q: round(float(np.percentile(a, q)), 1) if len(a) else None  # noqa: E731
    return {"readings": sent, "clean_seen": watcher.clean_readings,
            "lost": total_sent - watcher.total_clean_readings,
            "clean_p50_ms": pct(clean, 50), "clean_p99_ms": pct(clean, 99), "clean_max_ms": pct(clean, 100),
            "window_wait_p50_ms": pct(waits, 50), "window_wait_p99_ms": pct(waits, 99),
            "cpu_s": round(cpu, 2), "cpu_us_per_reading": round(cpu / max(watcher.clean_readings, 1) * 1e6, 2)}


def engines_comparison(args: argparse.Namespace) -> dict:
    """The engines in-process, this checkout's and ``--before``'s, on the same input."""
    say(f"engines in-process, {args.engine_s} s of one partition's {args.engine_rate:,d} readings/s in records of "
        f"{args.engine_record:,d} (now, before) ...")
    now = engines_run(REPO, args.engine_s, args.engine_rate, args.engine_record)
    before = engines_run(Path(args.before).resolve(), args.engine_s, args.engine_rate, args.engine_record)
    return {"engines_readings_per_s": args.engine_rate, "engines_cpu_us_per_reading": now["cpu_us_per_reading"],
            "before_engines_cpu_us_per_reading": before["cpu_us_per_reading"],
            "engines_speedup_vs_before": round(before["cpu_us_per_reading"] / max(now["cpu_us_per_reading"], 1e-9), 2),
            "engines_worst_record_ms": now["worst_record_ms"],
            "before_engines_worst_record_ms": before["worst_record_ms"], "engines_lost": now["lost"] + before["lost"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short run (8 s measured, 3 s warm-up)")
    p.add_argument("--rate", type=float, default=100.0, help="raw records per second (default 100)")
    p.add_argument("--readings", type=int, default=50, help="readings per raw record (default 50)")
    p.add_argument("--devices", type=int, default=600, help="distinct devices (default 600)")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds (default 20)")
    p.add_argument("--warmup-s", type=float, default=5.0, help="seconds produced before measuring (default 5)")
    p.add_argument("--engine-s", type=int, default=300,
                   help="with --before: event-time seconds of the in-process engine comparison (default 300)")
    p.add_argument("--engine-rate", type=int, default=850,
                   help="readings/s of the one partition the engine comparison feeds (default 850)")
    p.add_argument("--engine-record", type=int, default=50, help="readings per record there (default 50)")
    p.add_argument("--engines-only", action="store_true",
                   help="with --before: only the in-process engine comparison, no broker and no worker process")
    p.add_argument("--run-dir", default="", help="keep broker and worker logs here (default: a temporary dir)")
    p.add_argument("--profile", default="", metavar="DIR", help="write py-spy profiles of each hop to DIR")
    p.add_argument("--skip-baseline", action="store_true", help="only the worker, no pass-through hop")
    p.add_argument("--before", default="", metavar="CHECKOUT",
                   help="also run the worker of another checkout (e.g. a `git worktree` of an older commit)")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.warmup_s, args.engine_s = 8.0, 3.0, min(args.engine_s, 60)
    if args.engines_only:
        if not args.before:
            p.error("--engines-only compares with another checkout: give --before CHECKOUT")
        out = engines_comparison(args)
        print(json.dumps({**out, "lost": out["engines_lost"]}))
        return 0
    with tempfile.TemporaryDirectory(prefix="probe-worker-") as tmp:
        run_dir = Path(args.run_dir or tmp)
        run_dir.mkdir(parents=True, exist_ok=True)
        kafka = start_kafka(run_dir, free_port())
        try:
            results = {}
            hops = ["worker"] + (["before"] if args.before else []) + ([] if args.skip_baseline else ["passthrough"])
            for name in hops:
                cfg = Config()
                cfg.run.dir = str(run_dir)
                cfg.kafka.bootstrap = f"127.0.0.1:{kafka.ports['kafka']}"
                cfg.kafka.topic_prefix = f"p{uuid.uuid4().hex[:8]}"
                cfg.worker.metrics_port = 0
                cfg.worker.web_port = free_port()
                cfg.window.sizes_s = "2"
                cfg.clean.allowed_lateness_s = 1.0
                create_topics(cfg)
                argv = [sys.executable, __file__, "--passthrough"] if name == "passthrough" else aimass_argv("worker")
                results[name] = run_hop(name, cfg, argv, run_dir / f"{name}.log", args,
                                        int(cfg.clean.allowed_lateness_s * 1000),
                                        Path(args.before).resolve() if name == "before" else REPO)
                say(f"{name}: {json.dumps(results[name])}")
        finally:
            stop_server(kafka)
    w = results["worker"]
    out = {"rate_readings_per_s": args.rate * args.readings, "readings_per_record": args.readings,
           "worker_readings_per_cpu_s": round(1e6 / max(w["cpu_us_per_reading"], 1e-9)),
           **{f"worker_{k}": v for k, v in w.items() if k != "lost"},
           "lost": sum(r["lost"] for r in results.values())}
    if args.before:
        out.update(engines_comparison(args))
        out["lost"] += out["engines_lost"]
    if "before" in results:
        b = results["before"]
        out.update({f"before_{k}": v for k, v in b.items() if k.startswith(("clean_p", "window_wait", "cpu_us"))})
        out["speedup_vs_before"] = round(b["cpu_us_per_reading"] / max(w["cpu_us_per_reading"], 1e-9), 2)
    if "passthrough" in results:
        b = results["passthrough"]
        out.update({f"passthrough_{k}": v for k, v in b.items() if k.startswith(("clean_p", "cpu_us"))})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--passthrough"]:
        sys.exit(passthrough_main(sys.argv))
    if sys.argv[1:2] == ["--engines"]:
        sys.exit(engines_main(*map(int, sys.argv[2:])))
    sys.exit(main())
