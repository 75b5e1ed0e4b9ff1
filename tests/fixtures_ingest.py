"""Helpers for the ingest tests: run `aimass bridge` as a real process, read topics back from Kafka."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
from confluent_kafka import Consumer, TopicPartition

from aimass.core.config import Config, to_env
from aimass.core.procs import stop_pid
from aimass.core import contract
from aimass.streams.kafka import consumer_config

REPO = Path(__file__).resolve().parent.parent


def isolate(cfg: Config) -> Config:
    """Own MQTT topic root and share group per test, so no other test's bridge session sees its messages."""
    root = cfg.kafka.topic_prefix
    cfg.mqtt.topic_pattern = f"{root}/{{tenant}}/{{device_id}}/telemetry"
    cfg.mqtt.labels_pattern = f"{root}/{{tenant}}/{{device_id}}/labels"
    cfg.bridge.share_group = root
    cfg.bridge.session_expiry_s = 120
    return cfg


def config_env(cfg: Config) -> dict[str, str]:
    """The environment that makes a child `aimass` process use ``cfg``."""
    return {**os.environ, **to_env(cfg)}


class BridgeProcess:
    """`aimass bridge` in a child process, logging to a file."""

    def __init__(self, cfg: Config, client_id: str, log: Path):
        self.log = log
        self.offset = log.stat().st_size if log.exists() else 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aimass.cli", "bridge", "--client-id", client_id],
            env=config_env(cfg), cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        self.wait_for("subscribed to")

    def text(self) -> str:
        return self.log.read_text(errors="replace")[self.offset:]

    def wait_for(self, needle: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert self.proc.poll() is None, f"bridge exited {self.proc.returncode}:\n{self.text()}"
            assert time.monotonic() < deadline, f"bridge never logged {needle!r}:\n{self.text()}"
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> dict[str, int]:
        """SIGTERM, expect a clean exit 0; returns the counts of its final log line."""
        stop_pid(self.proc.pid, timeout=30)
        assert self.proc.wait(5) == 0, self.text()
        m = re.search(r"stopped: (\d+) messages, (\d+) readings to Kafka, (\d+) rejected", self.text())
        assert m, self.text()
        return dict(zip(("messages", "readings", "rejected"), map(int, m.groups())))

    def __enter__(self) -> "BridgeProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            stop_pid(self.proc.pid, timeout=10)


def read_records(cfg: Config, topic: contract.Topic, until_rows: int, timeout: float = 60,
                 settle_s: float = 1.0) -> list[tuple[int, pa.Table]]:
    """(partition, table) of every record of ``topic``, in offset order per partition.

    Reads until ``until_rows`` rows arrived, then ``settle_s`` longer to catch extra rows.
    """
    name = topic.name(cfg.kafka.topic_prefix)
    consumer = Consumer(consumer_config(cfg, f"check-{name}-{time.monotonic_ns()}"))
    n_parts = contract.topic_partitions(topic, cfg.kafka.partitions)
    consumer.assign([TopicPartition(name, p, 0) for p in range(n_parts)])
    records: list[tuple[int, pa.Table]] = []
    rows = 0
    deadline = time.monotonic() + timeout
    settle_until = None
    try:
        while time.monotonic() < (settle_until or deadline):
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                table = contract.decode(msg.value(), topic.schema)
                records.append((msg.partition(), table))
                rows += table.num_rows
            if rows >= until_rows and settle_until is None:
                settle_until = time.monotonic() + settle_s
    finally:
        consumer.close()
    return records


def rows_of(records: list[tuple[int, pa.Table]]) -> list[dict]:
    """Every row, with its partition, in read order."""
    return [{**row, "partition": p} for p, table in records for row in table.to_pylist()]
