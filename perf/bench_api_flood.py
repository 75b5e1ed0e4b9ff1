"""Benchmark: the alerter's publish->alert latency with and without a flood on its alarm API.

A real ``aimass alerter`` process on a local Kafka-protocol broker (free 127.0.0.1 ports) with two
read tokens. The bench produces window rows that raise an alarm (one new device each, ``mean > 80``)
at a steady rate and reads the alarm events back: latency = event_ms (the alerter's clock at the
transition) - source_received_ms (stamped just before the row is produced). Each round measures a
quiet phase, then the same load while a second process floods the API from one token with 10,000
requests in 10 s (paced, at most 64 in flight, 127.0.0.1 only) and a polite second token asks
every 0.1 s. ``lost`` counts triggers with no alarm event. Last line: one JSON object.

    python perf/bench_api_flood.py [--quick] [--rounds N] [--rate N]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aimass.core import contract  # noqa: E402
from aimass.core.config import Config  # noqa: E402
from aimass.core.procs import free_port, port_in_use, stop_pid, wait_until  # noqa: E402
from aimass.core.stack import create_topics, start_kafka, stop_server  # noqa: E402
from aimass.streams.kafka import consumer_config, producer_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RULES = """rules:
  - name: hot
    stream: windows
    condition: mean > 80
    clear: mean < 75
"""
TOKENS = {"flooder": "f" * 24, "polite": "p" * 24}
FLOOD_REQUESTS, FLOOD_SECONDS, IN_FLIGHT = 10_000, 10.0, 64
WINDOW = dict(tenant="bench", metric="temperature", window_s=10, window_start_ms=0, count=10, mean=90.0,
              min=85.0, max=95.0, std=1.0, first=88.0, last=92.0, rate=0.0, ewma=90.0, zscore=0.0)


def flood(port: int, out: multiprocessing.Queue) -> None:
    """10,000 GET /alarms from one token in 10 s, and a second token every 0.1 s; results to ``out``."""
    import aiohttp

    async def run() -> dict:
        url = f"http://127.0.0.1:{port}/alarms"
        flooded: list[int] = []
        polite: list[tuple[int, float]] = []
        gate = asyncio.Semaphore(IN_FLIGHT)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=IN_FLIGHT + 4)) as s:
            async def one(at: float) -> None:
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                async with gate, s.get(url, headers={"Authorization": f"Bearer {TOKENS['flooder']}"}) as r:
                    await r.read()
                    flooded.append(r.status)

            async def ask_politely(until: float) -> None:
                while time.monotonic() < until:
                    t0 = time.monotonic()
                    async with s.get(url, headers={"Authorization": f"Bearer {TOKENS['polite']}"}) as r:
                        await r.read()
                        polite.append((r.status, time.monotonic() - t0))
                    await asyncio.sleep(0.1)

            start = time.monotonic()
            step = FLOOD_SECONDS / FLOOD_REQUESTS
            await asyncio.gather(ask_politely(start + FLOOD_SECONDS),
                                 *(one(start + i * step) for i in range(FLOOD_REQUESTS)))
            elapsed = time.monotonic() - start
        return {"flooded": flooded, "elapsed": elapsed, "polite": polite}

    out.put(asyncio.run(run()))


class Bench:
    """Kafka broker + alerter process + producer/reader of the bench's topics."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.kafka = start_kafka(workdir, free_port())
        cfg = Config()
        cfg.run.dir = str(workdir / "run")
        cfg.kafka.bootstrap = f"127.0.0.1:{self.kafka.ports['kafka']}"
        cfg.kafka.topic_prefix = "bench"
        cfg.kafka.partitions = 1
        cfg.alert.api_port = free_port()
        self.cfg = cfg
        try:
            create_topics(cfg)
            self.alerter = self._start_alerter()
        except BaseException:
            stop_server(self.kafka)
            raise
        from confluent_kafka import Consumer, Producer

        self.producer = Producer(producer_config(cfg))
        self.events = Consumer(consumer_config(cfg, "bench-reader"))
        self.events.subscribe([contract.ALERT_EVENTS.name(cfg.kafka.topic_prefix)])
        self.sent_ms: dict[str, int] = {}
        self.latency_s: dict[str, float] = {}

    def _start_alerter(self) -> subprocess.Popen:
        (self.workdir / "rules").mkdir()
        (self.workdir / "rules/rules.yaml").write_text(RULES)
        config = self.workdir / "aimass.toml"
        c = self.cfg
        config.write_text(f"""[run]\ndir = "{c.run.dir}"\n[kafka]\nbootstrap = "{c.kafka.bootstrap}"
topic_prefix = "{c.kafka.topic_prefix}"\npartitions = {c.kafka.partitions}
[alert]\nrules_path = "{self.workdir / 'rules'}"\napi_port = {c.alert.api_port}\nmetrics_port = 0
quality_every_s = 5\nlabel_grace_s = 0\n""")
        env = {**os.environ, "AIMASS_API_TOKENS": ",".join(f"{n}:read:{s}" for n, s in TOKENS.items())}
        log = self.workdir / "alerter.log"
        proc = subprocess.Popen([sys.executable, "-m", "aimass.cli", "--config", str(config), "alerter"],
                                stdout=subprocess.DEVNULL, stderr=log.open("a"), env=env, cwd=REPO)
        wait_until(lambda: port_in_use(c.alert.api_port), 60, "alerter API", proc, log)
        return proc

    def trigger(self, device: str) -> None:
        """One window row that raises an alarm for a new device, stamped just before it is produced."""
        now_ms = int(time.time() * 1000)
        row = {**WINDOW, "device_id": device, "window_end_ms": now_ms, "max_received_ms": now_ms}
        topic = contract.WINDOW_ROWS
        self.producer.produce(topic.name(self.cfg.kafka.topic_prefix),
                              contract.encode(pa.Table.from_pylist([row], schema=topic.schema), topic.schema),
                              partition=contract.partition_for("bench", device, contract.topic_partitions(
                                  topic, self.cfg.kafka.partitions)))
        self.producer.poll(0)
        self.sent_ms[device] = now_ms

    def read_events(self, timeout_s: float) -> None:
        """Collect raised events until every trigger has one or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while len(self.latency_s) < len(self.sent_ms) and time.monotonic() < deadline:
            for m in self.events.consume(500, 0.2):
                if m.error():
                    continue
                for e in contract.decode(m.value(), contract.ALERT_EVENTS.schema).to_pylist():
                    if e["transition"] == "raised" and e["device_id"] in self.sent_ms:
                        self.latency_s[e["device_id"]] = (e["event_ms"] - e["source_received_ms"]) / 1000

    def phase(self, name: str, seconds: float, rate: float) -> list[str]:
        """Trigger ``rate`` alarms per second for ``seconds``; the devices used."""
        devices = [f"{name}-{i}" for i in range(int(seconds * rate))]
        start = time.monotonic()
        for i, device in enumerate(devices):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            self.trigger(device)
            self.read_events(0)
        self.producer.flush(10)
        return devices

    def close(self) -> None:
        self.events.close()
        stop_pid(self.alerter.pid, 20)
        stop_server(self.kafka)


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round (default 3)")
    ap.add_argument("--rounds", type=int, default=0, help="quiet + flood rounds (default 3, --quick 1)")
    ap.add_argument("--rate", type=float, default=5.0, help="alarms triggered per second (default 5)")
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="aimass-bench-flood-") as tmp:
        bench = Bench(Path(tmp))
        quiet: list[str] = []
        flooded: list[str] = []
        results: list[dict] = []
        try:
            bench.phase("warmup", 2, args.rate)
            bench.read_events(30)
            for r in range(rounds):
                quiet += bench.phase(f"quiet{r}", FLOOD_SECONDS, args.rate)
                bench.read_events(30)
                out: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
                proc = multiprocessing.get_context("spawn").Process(target=flood, args=(bench.cfg.alert.api_port, out))
                proc.start()
                time.sleep(1.0)  # the flooding process's interpreter start-up
                flooded += bench.phase(f"flood{r}", FLOOD_SECONDS, args.rate)
                results.append(out.get(timeout=120))
                proc.join(30)
                bench.read_events(30)
        finally:
            bench.close()
    lat = bench.latency_s
    statuses = [s for r in results for s in r["flooded"]]
    polite = [p for r in results for p in r["polite"]]
    summary = {
        "rounds": rounds, "alarms_per_s": args.rate,
        "alert_latency_p50_s_quiet": float(np.median([lat[d] for d in quiet if d in lat])),
        "alert_latency_p99_s_quiet": p99([lat[d] for d in quiet if d in lat]),
        "alert_latency_p50_s_flood": float(np.median([lat[d] for d in flooded if d in lat])),
        "alert_latency_p99_s_flood": p99([lat[d] for d in flooded if d in lat]),
        "api_requests": len(statuses),
        "api_requests_per_s": len(statuses) / sum(r["elapsed"] for r in results),
        "flood_429_share": statuses.count(429) / len(statuses),
        "flood_200": statuses.count(200),
        "flood_other_statuses": sorted({s for s in statuses} - {200, 429}),
        "other_token_requests": len(polite),
        "other_token_ok_share": sum(1 for s, _ in polite if s == 200) / max(1, len(polite)),
        "other_token_p99_s": p99([t for _, t in polite]),
        "lost": sum(1 for d in quiet + flooded if d not in lat),
    }
    summary["latency_p99_ratio_flood_to_quiet"] = summary["alert_latency_p99_s_flood"] / summary[
        "alert_latency_p99_s_quiet"]
    print(f"quiet: {len(quiet)} alarms, p50 {summary['alert_latency_p50_s_quiet']:.3f}s "
          f"p99 {summary['alert_latency_p99_s_quiet']:.3f}s")
    print(f"flood: {len(flooded)} alarms, p50 {summary['alert_latency_p50_s_flood']:.3f}s "
          f"p99 {summary['alert_latency_p99_s_flood']:.3f}s; {len(statuses)} API requests at "
          f"{summary['api_requests_per_s']:.0f}/s, {summary['flood_429_share']:.1%} answered 429; other token "
          f"{summary['other_token_ok_share']:.0%} ok of {len(polite)}, p99 {summary['other_token_p99_s']:.3f}s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
