"""Helpers for the clean/window tests: synthetic readings, producing raw batches, reading topics,
running `aimass worker` subprocesses."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
from confluent_kafka import Consumer, Producer, TopicPartition

from aimass.core.config import Config, to_env
from aimass.core import contract
from aimass.streams.kafka import consumer_config, producer_config

T0 = 1_763_899_980_000  # a fixed ms timestamp, aligned to 60 s


def readings(rows: list[tuple]) -> pa.Table:
    """READINGS from (tenant, device, metric, ts_ms, value, unit[, received_ms]) tuples."""
    cols = list(zip(*rows)) if rows else [[]] * 6
    n = len(rows)
    received = cols[6] if rows and len(rows[0]) > 6 else [t + 100 for t in cols[3]]
    return pa.table({"tenant": list(cols[0]), "device_id": list(cols[1]), "metric": list(cols[2]),
                     "ts_ms": pa.array(list(cols[3]), pa.int64()), "value": pa.array(list(cols[4]), pa.float64()),
                     "unit": list(cols[5]), "received_ms": pa.array(list(received), pa.int64())},
                    schema=contract.READINGS) if n else contract.empty(contract.READINGS)


def synthetic(devices: int, seconds: int, rate_hz: float = 1.0, seed: int = 0, tenant: str = "acme",
              metrics: tuple[str, ...] = ("temp", "humidity")) -> pa.Table:
    """Readings of ``devices`` x ``metrics`` at ``rate_hz`` over ``seconds``, in event-time order."""
    rng = np.random.default_rng(seed)
    step = int(1000 / rate_hz)
    ts = np.arange(T0, T0 + seconds * 1000, step, dtype=np.int64)
    n_series = devices * len(metrics)
    ts_all = np.repeat(ts, n_series) + rng.integers(0, step, ts.size * n_series)
    dev = np.tile(np.repeat(np.arange(devices), len(metrics)), ts.size)
    met = np.tile(np.arange(len(metrics)), ts.size * devices)
    base = np.array([21.0 if m == "temp" else 45.0 for m in metrics])
    table = pa.table({
        "tenant": pa.array([tenant] * ts_all.size),
        "device_id": pa.array(np.array([f"dev{d:04d}" for d in range(devices)], dtype=object)[dev]),
        "metric": pa.array(np.array(metrics, dtype=object)[met]),
        "ts_ms": ts_all,
        "value": base[met] + rng.normal(0, 1, ts_all.size),
        "unit": pa.array(np.array(["Cel" if m == "temp" else "%RH" for m in metrics], dtype=object)[met]),
        "received_ms": ts_all + 50,
    }, schema=contract.READINGS)
    return table.take(np.argsort(ts_all, kind="stable"))


def partition_of(table: pa.Table, partitions: int) -> np.ndarray:
    return contract.partitions_for(table["tenant"].to_numpy(zero_copy_only=False),
                                   table["device_id"].to_numpy(zero_copy_only=False), partitions)


def produce_raw(cfg: Config, table: pa.Table, batch_rows: int = 500) -> int:
    """Produce ``table`` to the raw topic like the bridge: per partition, batches in arrival order."""
    producer = Producer(producer_config(cfg))
    parts = partition_of(table, cfg.kafka.partitions)
    topic = contract.RAW.name(cfg.kafka.topic_prefix)
    records = 0
    for p in range(cfg.kafka.partitions):
        rows = table.filter(pa.array(parts == p))
        for start in range(0, rows.num_rows, batch_rows):
            producer.produce(topic, contract.encode(rows.slice(start, batch_rows), contract.READINGS), partition=p)
            producer.poll(0)
            records += 1
    assert producer.flush(30) == 0
    return records


def consume(cfg: Config, topic: contract.Topic, idle_s: float = 3.0, timeout_s: float = 60.0,
            until_rows: int | None = None) -> list[tuple[int, pa.Table]]:
    """Every record of ``topic`` as (partition, table), read until idle (end offsets are unreliable here)."""
    consumer = Consumer(consumer_config(cfg, f"reader-{uuid.uuid4().hex[:8]}"))
    name = topic.name(cfg.kafka.topic_prefix)
    consumer.assign([TopicPartition(name, p, 0) for p in range(contract.topic_partitions(topic, cfg.kafka.partitions))])
    out: list[tuple[int, pa.Table]] = []
    rows = 0
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                if time.monotonic() - last > idle_s and (until_rows is None or rows >= until_rows):
                    break
                continue
            assert msg.error() is None, msg.error()
            table = contract.decode(msg.value(), topic.schema)
            out.append((msg.partition(), table))
            rows += table.num_rows
            last = time.monotonic()
    finally:
        consumer.close()
    return out


def rows_of(records: list[tuple[int, pa.Table]], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables([t for _, t in records]) if records else contract.empty(schema)


def config_env(cfg: Config) -> dict[str, str]:
    """Environment that makes an `aimass` subprocess use ``cfg``'s broker, prefix and run dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMASS_")}
    env.update(to_env(cfg))
    return env


def start_worker(cfg: Config, log: Path) -> subprocess.Popen:
    """An `aimass worker` subprocess (its own process group) logging to ``log``."""
    return subprocess.Popen([sys.executable, "-m", "aimass.cli", "worker"], env=config_env(cfg),
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def stop_worker(proc: subprocess.Popen) -> int:
    """SIGTERM the worker and wait (SIGKILL after 30 s); returns its exit code."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise
