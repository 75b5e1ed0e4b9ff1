"""The clean and window agents in an `aimass worker` on the real broker: known raw input ->
exactly the expected clean readings, dead letters, late readings and window rows."""
from __future__ import annotations

import math
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from confluent_kafka import Producer

from aimass.agents.window import batch_windows
from aimass.core.procs import free_port
from aimass.core import contract
from aimass.streams.kafka import producer_config
from tests.fixtures_stream import T0, consume, readings, rows_of, start_worker, stop_worker

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parent.parent

DEV = ("acme", "dev1", "temp")


def r(ts: int, value: float, unit: str = "Cel", received: int | None = None) -> tuple:
    return (*DEV, T0 + ts, value, unit, T0 + (ts + 100 if received is None else received))


RECORDS = [
    [r(0, 20.0), r(1000, 21.0), r(2000, math.nan), r(3000, 500.0), r(4000, 22.0, "lx"),
     r(5000, 295.15, "K"), r(6000, 23.0, received=6000 - 120_000)],
    [r(1000, 21.0), r(12_000, 23.0), r(45_000, 24.0), r(14_000, 25.0), r(16_000, 26.0)],
    [r(75_000, 27.0)],
]
CLEAN_TS = [0, 1000, 5000, 12_000, 45_000, 16_000, 75_000]
CLEAN_VALUES = [20.0, 21.0, 22.0, 23.0, 24.0, 26.0, 27.0]
DEAD = {(2000, "non_finite"), (3000, "out_of_range"), (4000, "bad_unit"), (6000, "future"), (1000, "duplicate")}
WATERMARK = T0 + 75_000 - 30_000  # after the last record: max event time - allowed lateness


def test_worker_cleans_and_windows_known_input(cfg, tmp_path):
    cfg.worker.metrics_port = free_port()
    cfg.clean.allowed_lateness_s = 30.0
    partition = contract.partition_for(*DEV[:2], cfg.kafka.partitions)
    producer = Producer(producer_config(cfg))
    raw = contract.RAW.name(cfg.kafka.topic_prefix)
    producer.produce(raw, b"not an arrow stream", partition=partition)
    for rows in RECORDS:
        producer.produce(raw, contract.encode(readings(rows), contract.READINGS), partition=partition)
    assert producer.flush(30) == 0

    # Window rows: exactly the windows the final watermark closed, with the offline helper's values.
    expected_clean = readings([(*DEV, T0 + t, v, "Cel", T0 + t + 100) for t, v in zip(CLEAN_TS, CLEAN_VALUES)])
    expected = pa.concat_tables([batch_windows(expected_clean, size, hop) for size, hop in cfg.window.specs()])
    expected = expected.filter(pa.compute.less_equal(expected["window_end_ms"], WATERMARK))
    assert expected.num_rows == 6

    worker = start_worker(cfg, tmp_path / "worker.log")
    try:
        windows = rows_of(consume(cfg, contract.WINDOW_ROWS, idle_s=3, timeout_s=120,
                                  until_rows=expected.num_rows), contract.WINDOWS)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{cfg.worker.metrics_port}/metrics", timeout=5).read().decode()
    finally:
        assert stop_worker(worker) == 0, (tmp_path / "worker.log").read_text()[-3000:]

    clean_records = consume(cfg, contract.CLEAN, idle_s=1)
    assert {p for p, _ in clean_records} == {partition}
    clean = rows_of(clean_records, contract.READINGS)
    assert clean["ts_ms"].to_pylist() == [T0 + t for t in CLEAN_TS]
    assert clean["value"].to_pylist() == pytest.approx(CLEAN_VALUES)
    assert set(clean["unit"].to_pylist()) == {"Cel"}

    dead = rows_of(consume(cfg, contract.DEAD_LETTER, idle_s=1), contract.REJECTS).to_pylist()
    assert [d["reason"] for d in dead if d["payload"] is not None] == ["bad_record"]
    assert {(d["ts_ms"] - T0, d["reason"]) for d in dead if d["payload"] is None} == DEAD
    assert all(d["stage"] == "clean" and d["detail"] for d in dead)
    late = rows_of(consume(cfg, contract.LATE, idle_s=1), contract.REJECTS).to_pylist()
    assert [(x["ts_ms"] - T0, x["reason"], x["value"]) for x in late] == [(14_000, "late", 25.0)]

    key = ["window_s", "window_start_ms"]
    got_df = windows.to_pandas().sort_values(key).reset_index(drop=True)
    want_df = expected.to_pandas().sort_values(key).reset_index(drop=True)
    assert got_df[key].values.tolist() == want_df[key].values.tolist()
    for col in ("count", "max_received_ms", "window_end_ms"):
        assert got_df[col].tolist() == want_df[col].tolist(), col
    for col in ("mean", "min", "max", "std", "first", "last", "rate", "ewma", "zscore"):
        np.testing.assert_allclose(got_df[col], want_df[col], rtol=1e-9, atol=1e-9, err_msg=col)
    first = got_df[(got_df.window_s == 10) & (got_df.window_start_ms == T0)].iloc[0]
    assert (first["count"], first["mean"], first["min"], first["max"]) == (3, pytest.approx(21.0), 20.0,
                                                                           pytest.approx(22.0))
    assert first["rate"] == pytest.approx(0.4) and first["max_received_ms"] == T0 + 5100
    second = got_df[(got_df.window_s == 10) & (got_df.window_start_ms == T0 + 10_000)].iloc[0]
    assert (second["count"], second["mean"]) == (2, pytest.approx(24.5))  # the in-lateness reading counts

    assert "aimass_clean_late_total 1.0" in metrics
    assert 'aimass_clean_rejected_total{reason="duplicate"} 1.0' in metrics
    assert f"aimass_window_rows_total {float(len(want_df))}" in metrics


# Run in a fresh interpreter: other tests compile the kernels too, which would hide a gap.
WARM_UP_CHECK = r"""
import pyarrow as pa
from aimass.agents import kernels, worker
from aimass.agents.clean import CleanEngine
from aimass.agents.window import WindowEngine
from aimass.core.config import load_config
from aimass.core import contract
from aimass.streams.units import UnitTable

def compiled():
    return {name: list(f.signatures) for name, f in vars(kernels).items() if hasattr(f, "signatures")}

cfg = load_config()
worker.warm_up(cfg)
before = compiled()
assert before["clean_update"] and before["window_update"], before
rows = [("t", f"d{i % 3}", "humidity", 60_000 + 700 * i, 40.0 + i % 5, "%RH", 60_100 + 700 * i) for i in range(200)]
table = pa.Table.from_pylist([dict(zip(contract.READINGS.names, r)) for r in rows], schema=contract.READINGS)
raw = contract.decode(contract.encode(table, contract.READINGS), contract.READINGS)
cleaner = CleanEngine(cfg.clean, UnitTable.load(cfg.clean.units_file))
windows = WindowEngine.from_config(cfg.window, cfg.clean.allowed_lateness_s)
result = cleaner.process(raw, 7)
clean = contract.decode(contract.encode(result.clean, contract.READINGS), contract.READINGS)
closed, _ = windows.update(clean, 3, 7)
windows.tick(10_000, 4)
windows.tick(10_000 + windows.forget_ms, 5)
assert closed.num_rows, "the batch should close windows"
cleaner.live_offset(), windows.live_offset()
assert compiled() == before, "a live batch compiled another kernel signature"
"""


def test_worker_warm_up_compiles_what_live_batches_use():
    """`aimass worker` warms its kernels at start; the first live batch must not compile anything."""
    r = subprocess.run([sys.executable, "-c", WARM_UP_CHECK], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
