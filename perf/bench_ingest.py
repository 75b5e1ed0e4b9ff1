"""Ingest benchmark: Mosquitto -> bridge -> Kafka, next to a plain per-message forwarder.

Scenarios (all QoS 1, MQTT v5, real Mosquitto and the local Kafka-protocol broker):

- drain_single: N single-reading messages are queued in the consumer's persistent session
  first, then the bridge (or the baseline) drains them; throughput comes from the Kafka
  record timestamps (first -> last record), so neither the publisher nor this script's
  consumer is measured.
- drain_senml10: the same with SenML packs of 10 readings.
- live latency: the simulator publishes at a fixed rate while the bridge runs; latency is the
  time a consumer here sees a reading in Kafka minus the wall clock the device stamped it
  with (an upper bound of publish -> Kafka, includes the consumer's fetch).

Baseline: a plain paho -> confluent-kafka forwarder (one Kafka message per MQTT message, auto
ack on receipt, no validation, no batching), run the same way in its own process.
Last line: one JSON object with `*_per_s`, `speedup_vs_baseline`, latencies and `lost`.
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
from pathlib import Path

import numpy as np
import orjson
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _cpu import cpu_seconds  # noqa: E402
from aimass.core.config import Config  # noqa: E402
from aimass.core.procs import free_port, stop_pid  # noqa: E402
from aimass.core.stack import create_topics, kafka_client_config, start_kafka, start_mosquitto, stop_server  # noqa: E402
from aimass.core import contract  # noqa: E402
from aimass.streams.bridge import subscriptions  # noqa: E402
from aimass.streams.kafka import consumer_config, producer_config  # noqa: E402
from aimass.streams.mqtt import Publisher, connect, make_client  # noqa: E402
from aimass.streams.payloads import TopicPattern, encode_reading, encode_senml  # noqa: E402
from tests.fixtures_ingest import config_env  # noqa: E402

DEVICES = 100


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the baseline forwarder (runs in its own process: `bench_ingest.py --forwarder`) -------

def forwarder(cfg: Config, client_id: str, topic: str) -> None:
    """Plain paho client (MQTT v5, auto ack on receipt) producing every message as one Kafka message."""
    import paho.mqtt.client as paho
    from confluent_kafka import Producer
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    producer = Producer(producer_config(cfg))
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))

    def on_message(_c, _u, msg) -> None:
        producer.produce(topic, msg.payload, key=msg.topic.encode())
        producer.poll(0)

    client.on_message = on_message
    client.on_subscribe = lambda *_a: print("subscribed", file=sys.stderr, flush=True)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client.connect(cfg.mqtt.host, cfg.mqtt.port, clean_start=False, properties=props)
    client.subscribe(f"$share/{cfg.bridge.share_group}/{TopicPattern(cfg.mqtt.topic_pattern).subscription()}",
                     qos=1)
    while not stopping:
        client.loop(timeout=0.05)
    producer.flush(30)
    client.disconnect()


# --- helpers ----------------------------------------------------------------------------

def env_for(cfg: Config) -> dict[str, str]:
    return {**config_env(cfg), "AIMASS_RUN_LOG_LEVEL": "INFO"}


def start_consumer_process(cfg: Config, kind: str, client_id: str, topic: str, log: Path) -> subprocess.Popen:
    """The bridge (`aimass bridge`) or the baseline forwarder, as its own process."""
    if kind == "bridge":
        argv = [sys.executable, "-m", "aimass.cli", "bridge", "--client-id", client_id]
    else:
        argv = [sys.executable, __file__, "--forwarder", client_id, topic]
    return subprocess.Popen(argv, env=env_for(cfg), cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def wait_subscribed(proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "subscribed" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args} did not subscribe:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)


def create_session(cfg: Config, client_id: str) -> None:
    """Create the bridge's persistent session (its subscriptions) so that a backlog queues for it."""
    client = make_client(cfg, client_id, manual_ack=True)
    connect(client, cfg, clean_start=False, session_expiry_s=3600, receive_maximum=cfg.bridge.receive_maximum)
    done = []
    client.on_subscribe = lambda *_a: done.append(1)
    client.subscribe([(sub, 1) for sub in subscriptions(cfg)])  # exactly the bridge's: overlaps deliver twice
    while not done:
        client.loop(0.05)
    client.disconnect()


def publish_backlog(cfg: Config, messages: int, pack: int, base_ms: int) -> float:
    """Publish ``messages`` QoS 1 messages (single readings or packs) round-robin over devices; msgs/s."""
    topics = [TopicPattern(cfg.mqtt.topic_pattern).topic("bench", f"d{d:03d}") for d in range(DEVICES)]
    start = time.monotonic()
    with Publisher(cfg, f"bench-pub-{time.monotonic_ns()}", qos=1) as pub:
        for i in range(messages):
            seq, device = divmod(i, DEVICES)
            if pack == 1:
                payload = encode_reading("temp", base_ms + seq, float(seq), "Cel")
            else:
                payload = encode_senml([("temp", base_ms + seq * pack + k, float(k), "Cel") for k in range(pack)])
            pub.publish(topics[device], payload)
            if i % 20000 == 0 and i:
                say(f"  published {i}/{messages}")
        assert pub.drain(120), "publisher did not get every PUBACK"
    return messages / (time.monotonic() - start)


def consume(cfg: Config, topic: str, until_rows: int, arrow: bool, timeout: float,
            on_rows=None) -> tuple[list[tuple[int, int]], set]:
    """Read ``topic`` from the start: [(record timestamp ms, rows)] and the set of reading identities."""
    consumer = Consumer(consumer_config(cfg, f"bench-check-{time.monotonic_ns()}", **{"fetch.wait.max.ms": 10}))
    consumer.assign([TopicPartition(topic, p, 0) for p in range(cfg.kafka.partitions)])
    stamps: list[tuple[int, int]] = []
    ids: set = set()
    rows = 0
    deadline = time.monotonic() + timeout
    try:
        while rows < until_rows and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.2):
                if msg.error():
                    continue
                seen_ms = time.time_ns() // 1_000_000
                if arrow:
                    t = contract.decode(msg.value(), contract.READINGS)
                    batch = list(zip(t.column("device_id").to_pylist(), t.column("ts_ms").to_pylist()))
                else:
                    key = msg.key().decode().split("/")[2]
                    doc = orjson.loads(msg.value())
                    batch = [(key, ts) for ts in json_times(doc)]
                stamps.append((msg.timestamp()[1], len(batch)))
                ids.update(batch)
                rows += len(batch)
                if on_rows:
                    on_rows(seen_ms, batch)
    finally:
        consumer.close()
    return stamps, ids


def json_times(doc) -> list[int]:
    """Event times (ms) of a forwarded JSON payload: a single reading or a SenML pack from this script."""
    if isinstance(doc, dict):
        return [doc["ts"]]
    base_s = doc[0]["bt"]
    return [int(round((base_s + r.get("t", 0)) * 1000)) for r in doc]


class CpuSampler(threading.Thread):
    """Samples a process's CPU seconds (user + system, all threads) every 10 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, float]] = []  # (wall ms, cpu s)
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                cpu = cpu_seconds(self.pid)
            except OSError:
                return
            self.samples.append((time.time() * 1000, cpu))
            time.sleep(0.01)

    def cpu_between(self, t0_ms: float, t1_ms: float) -> float:
        wall, cpu = zip(*self.samples)
        return float(np.interp(t1_ms, wall, cpu) - np.interp(t0_ms, wall, cpu))


def drain_rates(stamps: list[tuple[int, int]], cpu: CpuSampler) -> tuple[float, float]:
    """(rows per wall second, rows per CPU second of the draining process), first to last Kafka record.

    The rows stamped with the first timestamp were received before it, in unknown time: excluded.
    """
    stamps = sorted(stamps)
    first, last = stamps[0][0], stamps[-1][0]
    after_first = sum(n for ts, n in stamps if ts > first)
    if last <= first:
        return float("nan"), float("nan")
    return after_first / ((last - first) / 1000), after_first / max(cpu.cpu_between(first, last), 1e-9)


class Bench:
    def __init__(self, workdir: Path):
        self.dir = workdir
        self.mosquitto = start_mosquitto(workdir, free_port())
        self.kafka = start_kafka(workdir, free_port())
        self.runs = 0

    def config(self) -> Config:
        """A fresh topic prefix, MQTT topic root and share group per run."""
        self.runs += 1
        cfg = Config()
        cfg.run.dir = str(self.dir)
        cfg.mqtt.port = self.mosquitto.ports["mqtt"]
        cfg.kafka.bootstrap = f"127.0.0.1:{self.kafka.ports['kafka']}"
        cfg.kafka.topic_prefix = f"bench{self.runs}"
        cfg.mqtt.topic_pattern = f"bench{self.runs}/{{tenant}}/{{device_id}}/telemetry"
        cfg.mqtt.labels_pattern = ""
        cfg.bridge.share_group = f"bench{self.runs}"
        cfg.bridge.metrics_port = 0
        create_topics(cfg)
        admin = AdminClient(kafka_client_config(cfg))
        for fut in admin.create_topics([NewTopic(f"bench{self.runs}.baseline", cfg.kafka.partitions, 1, config={
                "retention.ms": "604800000", "retention.bytes": "-1"})]).values():
            fut.result()
        return cfg

    def drain(self, kind: str, messages: int, pack: int) -> dict:
        """Queue a backlog, then let the bridge/baseline drain it; rate from Kafka record timestamps."""
        cfg = self.config()
        topic = contract.RAW.name(cfg.kafka.topic_prefix) if kind == "bridge" else f"{cfg.kafka.topic_prefix}.baseline"
        client_id = f"{kind}-{self.runs}"
        create_session(cfg, client_id)
        base_ms = int(time.time() * 1000) - 3_600_000
        say(f"{kind}: queueing {messages} messages (pack of {pack}) ...")
        pub_rate = publish_backlog(cfg, messages, pack, base_ms)
        say(f"{kind}: draining (publisher did {pub_rate:,.0f} msgs/s) ...")
        proc = start_consumer_process(cfg, kind, client_id, topic, self.dir / f"{client_id}.log")
        cpu, broker_cpu = CpuSampler(proc.pid), CpuSampler(self.mosquitto.pid)
        cpu.start()
        broker_cpu.start()
        try:
            stamps, ids = consume(cfg, topic, messages * pack, arrow=kind == "bridge", timeout=180)
        finally:
            cpu.running = broker_cpu.running = False
            stop_pid(proc.pid, timeout=30)
        rate, per_cpu = drain_rates(stamps, cpu)
        _, broker_per_cpu = drain_rates(stamps, broker_cpu)
        mosquitto_cores = rate / broker_per_cpu  # share of one core Mosquitto used while draining
        lost = messages * pack - len(ids)
        say(f"{kind}: {rate:,.0f} readings/s = {rate / pack:,.0f} msgs/s wall; {per_cpu / pack:,.0f} msgs per CPU "
            f"second of its process; Mosquitto busy {mosquitto_cores:.0%} of a core; {len(stamps)} Kafka records, "
            f"lost {lost}")
        return {"readings_per_s": rate, "msgs_per_s": rate / pack, "readings_per_cpu_s": per_cpu,
                "msgs_per_cpu_s": per_cpu / pack, "mosquitto_cores": mosquitto_cores, "lost": lost,
                "publisher_msgs_per_s": pub_rate}

    def latency(self, kind: str, rate_msgs: int, seconds: float) -> dict:
        """Live load from the simulator at ``rate_msgs`` msgs/s; p50/p99 of publish -> seen in Kafka."""
        cfg = self.config()
        topic = contract.RAW.name(cfg.kafka.topic_prefix) if kind == "bridge" else f"{cfg.kafka.topic_prefix}.baseline"
        log = self.dir / f"{kind}-lat.log"
        proc = start_consumer_process(cfg, kind, f"{kind}-lat-{self.runs}", topic, log)
        latencies: list[int] = []
        try:
            wait_subscribed(proc, log)
            sim = subprocess.Popen([sys.executable, "-m", "aimass.cli", "simulate", "--devices", str(DEVICES),
                                    "--metrics", "1", "--rate", str(rate_msgs / DEVICES), "--duration", str(seconds),
                                    "--tenant", "bench", "--qos", "1"], env=env_for(cfg), cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            expected = int(round(seconds * rate_msgs / DEVICES)) * DEVICES
            _, ids = consume(cfg, topic, expected, arrow=kind == "bridge", timeout=seconds + 60,
                             on_rows=lambda seen, batch: latencies.extend(seen - int(ts) for _, ts in batch))
            sim.wait(60)
        finally:
            stop_pid(proc.pid, timeout=30)
        p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (float("nan"), float("nan"))
        say(f"{kind}: latency at {rate_msgs} msgs/s: p50 {p50:.0f} ms, p99 {p99:.0f} ms ({len(latencies)} readings)")
        return {"p50_ms": float(p50), "p99_ms": float(p99), "lost": expected - len(ids)}

    def close(self) -> None:
        stop_server(self.mosquitto)
        stop_server(self.kafka)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small run (about a minute)")
    p.add_argument("--messages", type=int, help="backlog of single-reading messages (default 100000; quick 20000)")
    p.add_argument("--forwarder", nargs=2, metavar=("CLIENT_ID", "TOPIC"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.forwarder:
        from aimass.core.config import load_config
        forwarder(load_config(), *args.forwarder)
        return 0
    messages = args.messages or (20_000 if args.quick else 100_000)
    packs = messages // 4
    lat_rate, lat_s = (2000, 3.0) if args.quick else (5000, 10.0)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        bench = Bench(workdir)
        try:
            base_single = bench.drain("baseline", messages, 1)
            bridge_single = bench.drain("bridge", messages, 1)
            base_pack = bench.drain("baseline", packs, 10)
            bridge_pack = bench.drain("bridge", packs, 10)
            base_lat = bench.latency("baseline", lat_rate, lat_s)
            bridge_lat = bench.latency("bridge", lat_rate, lat_s)
        finally:
            bench.close()
    result = {
        "bridge_single_msgs_per_s": round(bridge_single["msgs_per_s"]),
        "baseline_single_msgs_per_s": round(base_single["msgs_per_s"]),
        "speedup_vs_baseline": round(bridge_single["msgs_per_s"] / base_single["msgs_per_s"], 2),
        "bridge_senml10_readings_per_s": round(bridge_pack["readings_per_s"]),
        "baseline_senml10_readings_per_s": round(base_pack["readings_per_s"]),
        "speedup_vs_baseline_senml10": round(bridge_pack["readings_per_s"] / base_pack["readings_per_s"], 2),
        "bridge_single_msgs_per_cpu_s": round(bridge_single["msgs_per_cpu_s"]),
        "baseline_single_msgs_per_cpu_s": round(base_single["msgs_per_cpu_s"]),
        "speedup_vs_baseline_per_cpu": round(bridge_single["msgs_per_cpu_s"] / base_single["msgs_per_cpu_s"], 2),
        "bridge_senml10_readings_per_cpu_s": round(bridge_pack["readings_per_cpu_s"]),
        "baseline_senml10_readings_per_cpu_s": round(base_pack["readings_per_cpu_s"]),
        "publisher_single_msgs_per_s": round(bridge_single["publisher_msgs_per_s"]),
        "mosquitto_cores_bridge_single": round(bridge_single["mosquitto_cores"], 2),
        "mosquitto_cores_bridge_senml10": round(bridge_pack["mosquitto_cores"], 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "latency_rate_msgs_per_s": lat_rate,
        "bridge_latency_p50_ms": round(bridge_lat["p50_ms"], 1),
        "bridge_latency_p99_ms": round(bridge_lat["p99_ms"], 1),
        "baseline_latency_p50_ms": round(base_lat["p50_ms"], 1),
        "baseline_latency_p99_ms": round(base_lat["p99_ms"], 1),
        "messages": messages,
        "lost": bridge_single["lost"] + bridge_pack["lost"] + bridge_lat["lost"],
        "baseline_lost": base_single["lost"] + base_pack["lost"] + base_lat["lost"],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
