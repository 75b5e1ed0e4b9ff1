"""Two `aimass worker` processes share the partitions; one is SIGKILLed mid-stream; the other takes
its partitions over and rebuilds their state by replay. The window rows equal those of an
undisturbed run: identical duplicates (at-least-once) are allowed, conflicting values are not."""
from __future__ import annotations

import copy
import os
import re
import signal
import time
import urllib.request

import pyarrow as pa
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from aimass.agents.clean import CleanEngine
from aimass.agents.window import WindowEngine
from aimass.core.procs import free_port, wait_until
from aimass.core import contract
from aimass.streams.kafka import consumer_config, producer_config
from aimass.streams.units import UnitTable
from tests.fixtures_stream import consume, partition_of, rows_of, start_worker, stop_worker, synthetic

pytestmark = pytest.mark.timeout(300)

PACE_S = 0.02  # between raw records
KEY = ["tenant", "device_id", "metric", "window_s", "window_start_ms"]


def raw_records(cfg, table: pa.Table, rows_per_record: int) -> list[tuple[int, pa.Table]]:
    """(partition, batch) in production order: partitions interleaved, each in arrival order."""
    parts = partition_of(table, cfg.kafka.partitions)
    per_partition = [table.filter(pa.array(parts == p)) for p in range(cfg.kafka.partitions)]
    records = []
    for start in range(0, max(t.num_rows for t in per_partition), rows_per_record):
        records += [(p, t.slice(start, rows_per_record)) for p, t in enumerate(per_partition)
                    if start < t.num_rows]
    return records


def undisturbed_windows(cfg, records: list[tuple[int, pa.Table]]) -> pa.Table:
    """What one uninterrupted worker emits: clean then window engine per partition, in order."""
    clean = {p: CleanEngine(cfg.clean, UnitTable.load()) for p in range(cfg.kafka.partitions)}
    window = {p: WindowEngine.from_config(cfg.window, cfg.clean.allowed_lateness_s)
              for p in range(cfg.kafka.partitions)}
    out, clean_offset = [], dict.fromkeys(range(cfg.kafka.partitions), 0)
    raw_offset = dict.fromkeys(range(cfg.kafka.partitions), -1)
    for p, batch in records:
        raw_offset[p] += 1
        result = clean[p].process(batch, raw_offset[p])
        if result.clean.num_rows:
            out.append(window[p].update(result.clean, clean_offset[p], raw_offset[p])[0])
            clean_offset[p] += 1
    return pa.concat_tables(out)


def assignments(log) -> list[tuple[set[int], set[int]]]:
    """(raw partitions, partitions replayed before emitting) of every assignment the worker logged."""
    text = log.read_text() if log.exists() else ""
    return [({int(p) for p in re.findall(r"\d+", parts)}, {int(p) for p in re.findall(r"(\d+):", marks)})
            for parts, marks in re.findall(r"telemetry\.raw: assigned partitions \[([\d, ]*)\]; "
                                           r"replaying up to \{([^}]*)\}", text)]


def assigned(log) -> bool:
    found = assignments(log)
    return bool(found and found[-1][0])


def test_sigkilled_worker_is_replaced_without_changing_any_window(cfg, tmp_path):
    # Short horizons, so restart offsets move well inside the stream (replay from the middle).
    cfg.clean.allowed_lateness_s = 5.0
    cfg.clean.dedup_horizon_s = 10.0
    cfg.window.sizes_s, cfg.window.sliding_s, cfg.window.zscore_history = "5,10", "20/5", 3
    cfg.window.zscore_min_history = 2  # z-scores from the first windows on, so they are compared too
    records = raw_records(cfg, synthetic(devices=12, seconds=150, rate_hz=2.0, seed=5), rows_per_record=40)
    expected = undisturbed_windows(cfg, records).to_pandas()
    assert len(expected) > 500 and not expected.duplicated(KEY).any()

    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    survivor_cfg = copy.deepcopy(cfg)
    survivor_cfg.worker.metrics_port = metrics_port = free_port()
    workers = [start_worker(cfg, logs[0]), start_worker(survivor_cfg, logs[1])]
    victim, survivor = workers
    raw = contract.RAW.name(cfg.kafka.topic_prefix)
    producer = Producer(producer_config(cfg))
    clean_topic = contract.CLEAN.name(cfg.kafka.topic_prefix)
    groups = {name: Consumer(consumer_config(cfg, f"{cfg.kafka.topic_prefix}-{name}"))
              for name in ("worker", "worker-clean-emitted", "worker-window-emitted")}

    def produce(batch_records):
        for p, batch in batch_records:
            producer.produce(raw, contract.encode(batch, contract.READINGS), partition=p)
            producer.poll(0)
            time.sleep(PACE_S)
        assert producer.flush(30) == 0

    def committed(group: str, topic: str, partitions) -> list[int]:
        return [tp.offset for tp in groups[group].committed([TopicPartition(topic, p) for p in partitions],
                                                             timeout=10)]

    def victim_committed(partitions) -> bool:
        """Restart offsets of both agents moved past 0 on every victim partition (so a new owner
        replays from the middle of the stream)."""
        return all(o > 0 for topic in (raw, clean_topic) for o in committed("worker", topic, partitions))

    try:
        wait_until(lambda: all(assigned(log) for log in logs), 90, "both workers to get partitions")
        victim_partitions = assignments(logs[0])[-1][0]
        half = len(records) // 2
        produce(records[:half])
        # Mid-stream: once the victim has committed progress on its partitions, kill it.
        wait_until(lambda: victim_committed(victim_partitions), 60, "the victim to commit its progress")
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        restart = committed("worker", clean_topic, victim_partitions)
        emitted = committed("worker-window-emitted", clean_topic, victim_partitions)
        assert all(0 < r <= e for r, e in zip(restart, emitted)), (restart, emitted)
        produce(records[half:])
        got = rows_of(consume(cfg, contract.WINDOW_ROWS, idle_s=8, timeout_s=150, until_rows=len(expected)),
                      contract.WINDOWS).to_pandas()
        # The survivor owns every partition now and has emitted all it read: lag 0 on each, per stage.
        want_lag = {(stage, f"{cfg.kafka.topic_prefix}-worker", topic, str(p)): 0.0
                    for stage, topic in (("clean", raw), ("window", clean_topic)) for p in range(cfg.kafka.partitions)}
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            lag = {(s.labels["stage"], s.labels["group"], s.labels["topic"], s.labels["partition"]): s.value
                   for f in text_string_to_metric_families(r.read().decode()) if f.name == "aimass_consumer_lag"
                   for s in f.samples}
        assert want_lag.items() <= lag.items(), lag
    finally:
        for consumer in groups.values():
            consumer.close()
        for w in workers:
            if w.poll() is None:
                assert stop_worker(w) == 0
    assert victim.returncode == -signal.SIGKILL
    # The survivor took the victim's partitions over and replayed some of them past state it had emitted.
    taken_over, replayed = assignments(logs[1])[-1]
    assert victim_partitions and victim_partitions <= taken_over
    assert victim_partitions & replayed, (victim_partitions, replayed)

    # Every key has exactly one distinct row (duplicates from replay are identical) ...
    distinct = got.drop_duplicates()
    conflicting = distinct[distinct.duplicated(KEY, keep=False)]
    assert conflicting.empty, conflicting.sort_values(KEY).head(10).to_string()
    # ... and the set of rows is exactly the undisturbed run's.
    merged = distinct.merge(expected, on=list(expected.columns), how="outer", indicator=True)
    assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"].head(10).to_string()
    assert len(got) >= len(expected)
