"""The predict stage on the real broker and tritonserver: windows in, predictions / drift / dead letters out,
offsets committed after outputs, detector state resumed from its checkpoint after a restart."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from aimass.agents.predict import SERIES_MODEL_NAME, PredictStage, state_from
from aimass.core.procs import free_port
from aimass.core.stack import create_topics
from aimass.models import registry
from aimass.models import series_model as sm
from aimass.core import contract
from aimass.streams.kafka import consumer_config, producer_config
from aimass.streams.statestore import open_store
from tests.conftest import make_config
from tests.fixtures_predict import synthetic_windows

pytestmark = pytest.mark.integration
SERIES, STEPS = 12, 40
DEVICES = SERIES // 2  # the main test pairs the series: devices of two metrics (a device model each)
DEVICE_WARMUP = 30
REPO = Path(__file__).resolve().parent.parent / "triton_repo"


def _produce_windows(cfg, windows: pa.Table, extra: list[tuple[int, bytes]] = ()) -> dict[int, int]:
    """One record per (time step, partition) as the window stage would; returns records per partition."""
    producer = Producer(producer_config(cfg))
    topic = contract.WINDOW_ROWS.name(cfg.kafka.topic_prefix)
    counts: dict[int, int] = {}
    for t in range(windows.num_rows // SERIES):
        step = windows.slice(t * SERIES, SERIES)
        parts = contract.partitions_for(step["tenant"].to_numpy(zero_copy_only=False),
                                        step["device_id"].to_numpy(zero_copy_only=False), cfg.kafka.partitions)
        for p in np.unique(parts):
            producer.produce(topic, contract.encode(step.filter(pa.array(parts == p)), contract.WINDOWS),
                             partition=int(p))
            counts[int(p)] = counts.get(int(p), 0) + 1
    for p, value in extra:
        producer.produce(topic, value, partition=p)
        counts[p] = counts.get(p, 0) + 1
    assert producer.flush(30) == 0
    return counts


def _paired(windows: pa.Table) -> pa.Table:
    """The synthetic series as DEVICES devices of two metrics each (series 2i, 2i+1 -> device i)."""
    series = np.array([int(d[4:]) for d in windows["device_id"].to_pylist()])
    windows = windows.set_column(windows.schema.get_field_index("device_id"), "device_id",
                                 pa.array([f"dev-{i // 2:04d}" for i in series]))
    return windows.set_column(windows.schema.get_field_index("metric"), "metric",
                              pa.array(["temp" if i % 2 == 0 else "humidity" for i in series]))


def _read(cfg, topic: contract.Topic, consumer: Consumer, want_rows: int, timeout: float = 60) -> list[tuple[int, pa.Table]]:
    got, rows, deadline = [], 0, time.monotonic() + timeout
    while rows < want_rows and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is None or msg.error():
            continue
        table = contract.decode(msg.value(), topic.schema)
        got.append((msg.partition(), table))
        rows += table.num_rows
    return got


def _reader(cfg, topic: contract.Topic) -> Consumer:
    c = Consumer(consumer_config(cfg, f"reader-{topic.suffix}-{time.monotonic_ns()}"))
    name = topic.name(cfg.kafka.topic_prefix)
    c.assign([TopicPartition(name, p, 0) for p in range(contract.topic_partitions(topic, cfg.kafka.partitions))])
    return c


async def _run_until(stage: PredictStage, done) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(stage.run(stop))
    await asyncio.to_thread(done)
    stop.set()
    await task


def test_stage_predicts_every_window_commits_and_resumes(tmp_path, kafka, triton):
    cfg = make_config(tmp_path, kafka=kafka, triton=triton)
    cfg.predict.checkpoint_every_s = 0.5
    cfg.detect.device_warmup_windows = DEVICE_WARMUP
    create_topics(cfg)
    windows = _paired(synthetic_windows(SERIES, STEPS + 10)[0])
    first, later = windows.slice(0, SERIES * STEPS), windows.slice(SERIES * STEPS)
    nan_row = first.slice(0, 1).set_column(first.schema.get_field_index("mean"), "mean", pa.array([float("nan")]))
    counts = _produce_windows(cfg, first, extra=[(0, b"not arrow"), (1, contract.encode(nan_row, contract.WINDOWS))])

    predictions, dead = _reader(cfg, contract.PREDICTION_ROWS), _reader(cfg, contract.DEAD_LETTER)
    got: list = []
    expected = SERIES * STEPS + DEVICES * (STEPS - DEVICE_WARMUP)
    asyncio.run(_run_until(PredictStage(cfg), lambda: got.extend(_read(cfg, contract.PREDICTION_ROWS, predictions,
                                                                      expected))))
    both = pa.concat_tables(t for _, t in got)
    device = both.filter(pc.equal(both["metric"], contract.DEVICE_METRIC)).to_pydict()
    table = both.filter(pc.not_equal(both["metric"], contract.DEVICE_METRIC))
    assert table.num_rows == SERIES * STEPS
    # one device row per device and window once its model is fitted (after DEVICE_WARMUP windows)
    assert len(set(zip(device["device_id"], device["window_end_ms"]))) == len(device["device_id"]) == \
        DEVICES * (STEPS - DEVICE_WARMUP)
    assert all(0 <= a <= 1 for a in device["anomaly_device"]) and device["anomaly"] == device["anomaly_device"]
    d = table.to_pydict()
    assert len(set(zip(d["device_id"], d["metric"], d["window_end_ms"]))) == SERIES * STEPS  # one per window
    live = {name: f"{name}:{registry.live_version(REPO, name)}" for name in registry.MODELS}
    assert not any(d["degraded"]) and set(d["forecaster_model"]) == {live["forecaster"]}
    assert set(d["anomaly_model"]) == {SERIES_MODEL_NAME}  # `anomaly` is the online detectors'; Triton's beside it
    assert all(0 <= a <= 1 for a in d["anomaly_triton"])
    assert all(lo <= f <= hi for lo, f, hi in zip(d["band_low"], d["forecast"], d["band_high"]))
    assert all(0 <= a <= 1 for a in d["anomaly"] + d["anomaly_level"] + d["anomaly_spread"] + d["anomaly_change"])
    # the series scores together; where the fitted device model judges the metric, its level is left to it
    assert all(max(s, c) <= a <= max(lv, s, c) for a, lv, s, c in
               zip(d["anomaly"], d["anomaly_level"], d["anomaly_spread"], d["anomaly_change"]))
    assert all(t - e == 10_000 for t, e in zip(d["target_end_ms"], d["window_end_ms"]))
    assert d["max_received_ms"] == [e + 5 for e in d["window_end_ms"]]  # passed through from the window
    for p, t in got:  # every device's predictions in the device's partition
        assert set(contract.partitions_for(t["tenant"].to_numpy(zero_copy_only=False),
                                           t["device_id"].to_numpy(zero_copy_only=False), cfg.kafka.partitions)) == {p}
    rejected = pa.concat_tables(t for _, t in _read(cfg, contract.DEAD_LETTER, dead, 2)).to_pydict()
    assert sorted(rejected["reason"]) == ["bad_record", "non_finite_mean"]
    assert b"not arrow" in rejected["payload"]

    # Offsets committed for everything consumed, detector state checkpointed per partition.
    group = Consumer(consumer_config(cfg, f"{cfg.kafka.topic_prefix}-predict"))
    src = contract.WINDOW_ROWS.name(cfg.kafka.topic_prefix)
    committed = group.committed([TopicPartition(src, p) for p in counts], timeout=10)
    group.close()
    assert {tp.partition: tp.offset for tp in committed} == counts
    store = open_store(cfg)
    states = {p: state_from(store.load(f"{cfg.kafka.topic_prefix}-predict", p), cfg) for p in counts}
    assert sum(len(s) for s in states.values()) == SERIES
    last_end = int(first["window_end_ms"].to_numpy().max())
    assert all((s.state[:len(s), sm.LAST_END] == last_end).all() for s in states.values())

    # Restart: only the new windows are predicted, from the restored (not relearned) state.
    _produce_windows(cfg, later)
    more: list = []
    asyncio.run(_run_until(PredictStage(cfg), lambda: more.extend(_read(cfg, contract.PREDICTION_ROWS, predictions,
                                                                        (SERIES + DEVICES) * 10))))
    again = pa.concat_tables(t for _, t in more)
    assert again.num_rows == (SERIES + DEVICES) * 10  # series rows and a device row per new window
    assert min(again["window_end_ms"].to_pylist()) > last_end
    assert _read(cfg, contract.PREDICTION_ROWS, predictions, 1, timeout=2) == []  # nothing replayed
    predictions.close()
    dead.close()


def test_aimass_predict_command_serves_metrics_and_stops_cleanly_on_sigterm(tmp_path, kafka, triton):
    cfg = make_config(tmp_path, kafka=kafka, triton=triton)
    create_topics(cfg)
    windows, _ = synthetic_windows(SERIES, 10)  # fewer windows than the device warm-up: series rows only
    _produce_windows(cfg, windows)
    metrics_port = free_port()
    env = {**os.environ, "AIMASS_KAFKA_BOOTSTRAP": cfg.kafka.bootstrap, "AIMASS_KAFKA_TOPIC_PREFIX": cfg.kafka.topic_prefix,
           "AIMASS_TRITON_GRPC_PORT": str(cfg.triton.grpc_port), "AIMASS_RUN_DIR": str(tmp_path),
           "AIMASS_PREDICT_METRICS_PORT": str(metrics_port)}
    proc = subprocess.Popen([sys.executable, "-m", "aimass.cli", "predict"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        reader = _reader(cfg, contract.PREDICTION_ROWS)
        got = _read(cfg, contract.PREDICTION_ROWS, reader, SERIES * 10)
        reader.close()
        assert sum(t.num_rows for _, t in got) == SERIES * 10
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert f"aimass_predict_rows_total {float(SERIES * 10)}" in text
        assert "aimass_predict_breaker_open 0.0" in text and "aimass_predict_triton_seconds_count" in text
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert list((tmp_path / "state" / f"{cfg.kafka.topic_prefix}-predict").glob("p*.state"))  # checkpointed


def test_rebalance_hands_detector_state_to_the_new_owner(tmp_path, kafka, triton):
    cfg = make_config(tmp_path, kafka=kafka, triton=triton)
    cfg.detect.device_warmup_windows = 256  # series rows only here
    create_topics(cfg)
    windows, _ = synthetic_windows(SERIES, 30)
    first, later = windows.slice(0, SERIES * 20), windows.slice(SERIES * 20)
    _produce_windows(cfg, first)
    last_end = int(first["window_end_ms"].to_numpy().max())
    reader = _reader(cfg, contract.PREDICTION_ROWS)
    a, b = PredictStage(cfg), PredictStage(cfg)
    restored: dict[tuple, tuple[int, int]] = {}  # series -> (last window end, history length) when B got it

    async def scenario() -> list:
        stop = asyncio.Event()
        task_a = asyncio.create_task(a.run(stop))
        got = await asyncio.to_thread(_read, cfg, contract.PREDICTION_ROWS, reader, SERIES * 20)
        task_b = asyncio.create_task(b.run(stop))  # joins the group: A revokes, B is assigned some partitions
        deadline = time.monotonic() + 60
        while not b.predictor.partitions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        restored.update({key: int(state.state[i, sm.LAST_END]) for state in list(b.predictor.partitions.values())
                         for i, key in enumerate(state.series_slots.keys)})
        await asyncio.to_thread(_produce_windows, cfg, later)
        got += await asyncio.to_thread(_read, cfg, contract.PREDICTION_ROWS, reader, SERIES * 10)
        stop.set()
        await asyncio.gather(task_a, task_b)
        return got

    got = asyncio.run(scenario())
    reader.close()
    assert restored, "the second stage was never assigned a partition with series"
    assert set(restored.values()) == {last_end}  # state moved, not relearned
    table = pa.concat_tables(t for _, t in got)
    seen = set(zip(table["device_id"].to_pylist(), table["window_end_ms"].to_pylist()))
    assert seen == set(zip(windows["device_id"].to_pylist(), windows["window_end_ms"].to_pylist()))


def test_a_batch_whose_prediction_fails_goes_to_dead_letters_and_the_stage_runs_on(tmp_path, kafka):
    cfg = make_config(tmp_path, kafka=kafka)
    create_topics(cfg)
    windows, _ = synthetic_windows(SERIES, 6)
    _produce_windows(cfg, windows.slice(0, SERIES * 3))
    stage = PredictStage(cfg, use_triton=False)
    real = stage.predictor.predict
    failures = []

    async def failing_once(batches, now_ms=None):  # the defect: one batch trips the detectors
        if not failures:
            failures.append(sum(t.num_rows for _, t in batches))
            raise FloatingPointError("injected")
        return await real(batches, now_ms)

    stage.predictor.predict = failing_once
    dead, predictions = _reader(cfg, contract.DEAD_LETTER), _reader(cfg, contract.PREDICTION_ROWS)

    def both() -> None:
        got = _read(cfg, contract.DEAD_LETTER, dead, 1)  # the failed batch may span several records
        got += _read(cfg, contract.DEAD_LETTER, dead, failures[0] - sum(t.num_rows for _, t in got))
        _produce_windows(cfg, windows.slice(SERIES * 3))  # later windows: predicted as usual
        got_p = _read(cfg, contract.PREDICTION_ROWS, predictions, windows.num_rows - failures[0])
        both.dead, both.predicted = got, got_p

    asyncio.run(_run_until(stage, both))
    rejected = pa.concat_tables(t for _, t in both.dead).to_pydict()
    assert set(rejected["reason"]) == {"predict_failed"} and "FloatingPointError: injected" in rejected["detail"][0]
    assert len(rejected["reason"]) == failures[0]  # every window of the failed batch, by identity below
    failed = set(zip(rejected["device_id"], rejected["ts_ms"]))
    predicted = pa.concat_tables(t for _, t in both.predicted)
    seen = set(zip(predicted["device_id"].to_pylist(), predicted["window_end_ms"].to_pylist()))
    every = set(zip(windows["device_id"].to_pylist(), windows["window_end_ms"].to_pylist()))
    assert failed | seen == every and not failed & seen  # each window predicted or dead-lettered, once
    dead.close()
    predictions.close()
